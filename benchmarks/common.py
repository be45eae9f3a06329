"""Shared helpers for the CPU benchmarks: timing, peak memory, problem construction, number format, results files.

Where results go: a fresh run folder ``./softprompt-runs/<name>-<date>-<time>/`` by default (the
``softprompt-runs`` folder carries its own ``.gitignore``, so a run inside a checkout leaves
``git status`` clean), ``--out DIR`` for a folder of your choice, and ``--update-results`` to replace
the committed files in ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from softprompt import cli_support

RESULTS_DIR = Path(__file__).parent / "results"      # the committed results (--update-results)


def timed_seconds(fn: Callable[[], object], warmup: int, reps: int) -> List[float]:
    """Wall times of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of ``fn`` after warm-up (CPU: wall clock; compare ratios, not absolutes)."""
    return statistics.median(timed_seconds(fn, warmup, reps))


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep benchmark output readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated while ``fn`` runs (from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def prefix_problem(*, B: int, T: int, P: int, Sq: int, Skv: int, Hq: int, Hkv: int, D: int,
                   block_size: int = 16, dtype=torch.float32, requires_grad: bool = False, seed: int = 0):
    """Random inputs for ``prefix_attention``: T tasks of prefix length P, sequences spread over tasks."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-P // block_size)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    args = (
        randn(B, Hq, Sq, D), randn(B, Hkv, Skv, D), randn(B, Hkv, Skv, D),
        randn(T * blocks, Hkv, block_size, D), randn(T * blocks, Hkv, block_size, D),
        torch.randperm(T * blocks, generator=g).view(T, blocks),
        torch.full((T,), P, dtype=torch.long),
        torch.arange(B) % T,
    )
    return args


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, str]:
    import softprompt.kernels  # noqa: F401  (versions of what ran)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--update-results`` (replace the files in benchmarks/results/)."""
    cli_support.add_output_arguments(parser, RESULTS_DIR)


def output_dir(name: str, out=None, update_results: bool = False) -> Path:
    """Where a benchmark run writes: ``out``, benchmarks/results/ when ``update_results``, else a fresh
    run folder (see :func:`softprompt.cli_support.output_dir`)."""
    return cli_support.output_dir(name, out, RESULTS_DIR if update_results else None)


def number(value: float) -> str:
    """Three significant digits in plain notation (``1210``, ``976``, ``5.94``, ``0.0123``): one
    format for every time and size in the tables, never ``1.21e+03`` beside ``976``."""
    if not math.isfinite(value):
        return ""
    if value == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    rounded = round(value, digits)
    if rounded:                     # 99.96 rounds to 100: one digit fewer after the point
        digits = max(0, 2 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{digits}f}"


def ratio(value: float) -> str:
    """A ratio with three significant digits: ``0.00310x``, ``0.85x``, ``1.41x``, ``57.3x``, ``124x``."""
    if not math.isfinite(value):
        return ""
    if value < 0.1:
        return f"{number(value)}x"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def write_results(name: str, env: Dict[str, str], rows: List[Dict[str, object]], table: str,
                  directory=None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (atomically) into ``directory`` (default: a fresh run
    folder, see :func:`output_dir`) and return the .md path."""
    directory = Path(directory) if directory is not None else output_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    md = f"# {name}\n\n{', '.join(f'{k}: {v}' for k, v in env.items())}\n\n{table}\n"
    for suffix, text in ((".json", json.dumps({"environment": env, "rows": rows}, indent=2)), (".md", md)):
        path = directory / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return directory / f"{name}.md"
