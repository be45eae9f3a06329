"""What every ``softprompt`` command shares: one-line errors, ``--debug``, checked argument types.

A command's failure prints one line on stderr — ``softprompt train: error: <what, where, how to fix>`` —
and exits 2 for bad input (usage, arguments, files, data) or 1 for anything else. ``--debug`` anywhere
on the command line, or ``SOFTPROMPT_DEBUG=1``, lets the exception through with its traceback.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

RUNS_DIR = "softprompt-runs"       # fresh run folders go under ./softprompt-runs/ (which git ignores)
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SOFTPROMPT_DEBUG"

# Exceptions that mean "the input is wrong" (exit 2): our own validation raises ValueError/TypeError
# naming the argument; missing or unreadable paths come as OSError subclasses.
INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's layout and shows each option's default (flags, empty lists
    and unset options have none worth showing)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or isinstance(default, bool) or (isinstance(default, (list, str)) and not default) \
                or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = " ".join(str(text).split())          # messages may wrap; an error is one line
    return text or type(exc).__name__


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(prog: str, command: Callable[[List[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``command(argv)`` (``--debug`` removed) and turn any exception into one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return command(argv)
    except BrokenPipeError:
        # the reader went away (`softprompt tasks DIR | head`): stop quietly, as other command-line tools do
        sys.stdout = open(os.devnull, "w")
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything a user can cause
        if debug:
            raise
        bad_input = isinstance(exc, INPUT_ERRORS)
        kind = "" if bad_input else f"{type(exc).__name__}: "
        hint = f"(rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)"
        print(f"{prog}: error: {kind}{_one_line(exc)} {hint}", file=sys.stderr)
        return 2 if bad_input else 1


def _number(kind, low, low_open: bool, high=None):
    """An argparse ``type`` that parses ``kind`` and checks ``low < x`` (or ``<=``) and ``x <= high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or (low_open and value <= low) or (not low_open and value < low) or \
                (high is not None and value > high):
            bound = f"> {low}" if low_open else f">= {low}"
            if high is not None:
                bound += f" and <= {high}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; expected a value {bound}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, low_open=True)
nonnegative_int = _number(int, 0, low_open=False)
positive_float = _number(float, 0.0, low_open=True)
nonnegative_float = _number(float, 0.0, low_open=False)
probability = _number(float, 0.0, low_open=True, high=1.0)


def add_output_arguments(parser: argparse.ArgumentParser, committed: Path) -> None:
    """``--out DIR`` and ``--update-results`` (write to ``committed``): where a run writes its files."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", metavar="DIR", default=None,
                       help=f"write the results files to DIR (default: a fresh ./{RUNS_DIR}/<name>-<time>/ folder)")
    group.add_argument("--update-results", action="store_true",
                       help=f"replace the committed results in {committed} (otherwise they are never touched)")


def output_dir(name: str, out=None, committed: Optional[Path] = None) -> Path:
    """The folder a run named ``name`` writes to (created): ``out``; else ``committed`` (the results
    kept in git, given only when the user asked to update them); else a new
    ``./softprompt-runs/<name>-<UTC date>-<time>/``. ``softprompt-runs`` holds a ``.gitignore`` of
    ``*``, so a run inside a checkout leaves ``git status`` clean."""
    if out is not None and committed is not None:
        raise ValueError(f"--out and --update-results are exclusive: --update-results writes to {committed}")
    if out is not None or committed is not None:
        path = Path(out if out is not None else committed)
    else:
        runs = Path.cwd() / RUNS_DIR
        runs.mkdir(parents=True, exist_ok=True)
        ignore = runs / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# benchmark and demo runs: local output, never committed\n*\n")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path, n = runs / f"{name}-{stamp}", 1
        while path.exists():
            n += 1
            path = runs / f"{name}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path
