"""`python -m benchmarks.train`: one training step of SmolLM2-135M (fp32, CPU) through softprompt vs PEFT.

Cases (batch 16 x 64 tokens, next-token loss, forward + backward + AdamW on the soft prompt only):
prefix tuning without projection at P=16 and P=128, prompt tuning at P=128. Both systems start from
the same prompt weights (PEFT's, copied into softprompt); the first step's loss difference and the
largest over the steps are reported (AdamW's normalised updates amplify rounding differences in
tiny gradient entries, so later steps drift apart slowly). Per case the two systems' steps run interleaved (alternating
order) and the medians are compared. Memory per step: peak tensor memory allocated during one step
(profiler memory events, ``benchmarks.common.cpu_peak_bytes``) and the bytes autograd saves for
the backward (unique storages, through ``saved_tensors_hooks``).

    python -m benchmarks.train                    # all cases, 7 timed steps each, writes results
    python -m benchmarks.train --steps 3 --warmup 1 --threads 1 --cases prefix16 --no-write
    python -m benchmarks.train --profile prefix16 # torch.profiler top ops of one step per system
    python -m benchmarks.train --fp64-check prefix16   # each system's fp32 gradient against fp64

The kernel-level train sweep is ``python -m benchmarks.run train``. Needs ``peft`` and the SmolLM2
asset (``softprompt assets --install``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from .common import add_output_arguments, cpu_peak_bytes, environment, output_dir

CASES = {"prefix16": ("prefix", 16), "prefix128": ("prefix", 128), "prompt128": ("prompt", 128)}
BATCH, SEQ, LR = 16, 64, 1e-3


def _base_model(dtype=torch.float32):
    from softprompt.assets import load_smollm2
    model, _ = load_smollm2(torch.float32)
    model.to(dtype).train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _peft_system(kind: str, P: int, dtype=torch.float32):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    config = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P) if kind == "prefix"
              else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    model = get_peft_model(_base_model(dtype), config)
    model.train()
    weight = model.prompt_encoder["default"].embedding.weight
    return model, weight, lambda batch: model(**batch).loss


def _our_system(kind: str, P: int, start: torch.Tensor, dtype=torch.float32):
    from softprompt import PrefixTuning, PromptTuning, SoftPromptModel
    spm = SoftPromptModel(_base_model(dtype))
    spm.add_task("task", PrefixTuning(num_virtual_tokens=P) if kind == "prefix" else PromptTuning(num_virtual_tokens=P))
    spm.prompts["task"].to(dtype)          # the prompt in the model's dtype (fp64 for --fp64-check), as PEFT's is
    weight = spm.prompts["task"].embedding.weight
    with torch.no_grad():
        weight.copy_(start)
    spm.train()
    return spm, weight, lambda batch: spm(**batch, tasks="task").loss


def _stepper(loss_fn: Callable, weight: torch.Tensor):
    opt = torch.optim.AdamW([weight], lr=LR)
    losses = []

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return step, losses


def saved_bytes(loss_fn: Callable, batch) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    storages: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(batch)
    del loss
    return sum(storages.values())


def first_gradient(loss_fn: Callable, weight: torch.Tensor, batch) -> torch.Tensor:
    """The prompt weight's gradient of one forward from the shared starting weights."""
    weight.grad = None
    loss_fn(batch).backward()
    grad, weight.grad = weight.grad.clone(), None
    return grad


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (norms, in fp64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 49000, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_case(name: str, steps: int, warmup: int = 2) -> dict:
    kind, P = CASES[name]
    torch.manual_seed(0)
    peft_model, peft_w, peft_loss = _peft_system(kind, P)
    ours_model, ours_w, ours_loss = _our_system(kind, P, peft_w.detach())
    batch = make_batch()
    grads = {"peft": first_gradient(peft_loss, peft_w, batch), "softprompt": first_gradient(ours_loss, ours_w, batch)}
    grad_diff = relative_difference(grads["softprompt"], grads["peft"])
    systems = {"peft": _stepper(peft_loss, peft_w), "softprompt": _stepper(ours_loss, ours_w)}
    times = {s: [] for s in systems}
    for i in range(warmup + steps):
        order = list(systems) if i % 2 == 0 else list(reversed(systems))
        for s in order:
            start = time.perf_counter()
            systems[s][0](batch)
            if i >= warmup:
                times[s].append(time.perf_counter() - start)
    losses = {s: systems[s][1] for s in systems}
    peak = {s: cpu_peak_bytes(lambda s=s: systems[s][0](batch)) for s in systems}
    saved = {"peft": saved_bytes(peft_loss, batch), "softprompt": saved_bytes(ours_loss, batch)}
    med = {s: statistics.median(times[s]) for s in systems}
    row = {"case": name, "method": kind, "P": P, "batch": BATCH, "seq": SEQ,
           "peft_s": med["peft"], "softprompt_s": med["softprompt"], "time_ratio": med["softprompt"] / med["peft"],
           "peft_peak_MiB": peak["peft"] / 2**20, "softprompt_peak_MiB": peak["softprompt"] / 2**20,
           "peak_ratio": peak["softprompt"] / peak["peft"],
           "peft_saved_MiB": saved["peft"] / 2**20, "softprompt_saved_MiB": saved["softprompt"] / 2**20,
           "saved_ratio": saved["softprompt"] / saved["peft"],
           "first_loss_diff": abs(losses["peft"][0] - losses["softprompt"][0]),
           "max_loss_diff": max(abs(a - b) for a, b in zip(losses["peft"], losses["softprompt"])),
           "first_grad_rel_diff": grad_diff, "first_loss": losses["peft"][0], "steps": steps, "times": times}
    del peft_model, ours_model
    return row


def profile_case(name: str, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile
    kind, P = CASES[name]
    torch.manual_seed(0)
    _, peft_w, peft_loss = _peft_system(kind, P)
    _, ours_w, ours_loss = _our_system(kind, P, peft_w.detach())
    batch = make_batch()
    for label, (step, _) in (("peft", _stepper(peft_loss, peft_w)), ("softprompt", _stepper(ours_loss, ours_w))):
        step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch)
        print(f"\n## {label}, {name}: one step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def fp64_check(name: str, rows: int = 4) -> dict:
    """How close each system's fp32 first-step gradient is to the fp64 one of the same system and of
    the other (``rows`` rows of the batch): the two computations' difference in fp32 against this
    gradient's own rounding sensitivity."""
    kind, P = CASES[name]
    grads = {}
    batch = {k: v[:rows] for k, v in make_batch().items()}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        _, peft_w, peft_loss = _peft_system(kind, P, dtype)
        peft_w.data = peft_w.data.to(dtype)
        _, ours_w, ours_loss = _our_system(kind, P, peft_w.detach(), dtype)
        grads["peft", dtype] = first_gradient(peft_loss, peft_w, batch)
        grads["softprompt", dtype] = first_gradient(ours_loss, ours_w, batch)

    def rel(a, b):
        return relative_difference(grads[a], grads[b])
    f32, f64 = torch.float32, torch.float64
    out = {"case": name, "rows": rows,
           "peft_fp32_vs_fp64": rel(("peft", f32), ("peft", f64)),
           "softprompt_fp32_vs_fp64": rel(("softprompt", f32), ("softprompt", f64)),
           "softprompt_vs_peft_fp32": rel(("softprompt", f32), ("peft", f32)),
           "softprompt_vs_peft_fp64": rel(("softprompt", f64), ("peft", f64))}
    print(", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def _markdown(rows, env) -> str:
    lines = [f"# training step: softprompt vs PEFT (SmolLM2-135M fp32, batch {BATCH} x {SEQ}, AdamW)\n",
             ", ".join(f"{k}: {v}" for k, v in env.items()) + ".",
             "Median step times of interleaved steps in one process; time ratio = softprompt / PEFT "
             "(< 1: softprompt faster). Peak = tensor memory allocated during one step; saved = bytes "
             "autograd keeps for the backward. Gradient diff = |g_ours - g_PEFT| / |g_PEFT| of the first "
             "step, from the same weights (how far apart the two computations are before AdamW's "
             "normalised updates amplify it).\n",
             "| case | PEFT s | softprompt s | time ratio | peak MiB PEFT / ours (ratio) | "
             "saved MiB PEFT / ours (ratio) | gradient diff | loss diff: first step / max |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['peft_s']:.3f} | {r['softprompt_s']:.3f} | {r['time_ratio']:.2f} | "
                     f"{r['peft_peak_MiB']:.0f} / {r['softprompt_peak_MiB']:.0f} ({r['peak_ratio']:.2f}) | "
                     f"{r['peft_saved_MiB']:.0f} / {r['softprompt_saved_MiB']:.0f} ({r['saved_ratio']:.2f}) | "
                     f"{r.get('first_grad_rel_diff', float('nan')):.1e} | "
                     f"{r.get('first_loss_diff', float('nan')):.1e} / {r['max_loss_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def _write(rows, env, directory: Path) -> None:
    stem = directory / "train-peft"
    for suffix, content in ((".json", json.dumps({"environment": env, "rows": rows}, indent=2, default=str)),
                            (".md", _markdown(rows, env))):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, stem.with_suffix(suffix))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=7, help="timed steps per system and case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system and case first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", choices=list(CASES), help="print the profile of one step per system and exit")
    parser.add_argument("--no-write", action="store_true", help="do not write train-peft.{json,md}")
    parser.add_argument("--fp64-check", choices=list(CASES),
                        help="compare both systems' fp32 first-step gradients with their fp64 ones and exit")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile_case(args.profile)
        return 0
    if args.fp64_check:
        fp64_check(args.fp64_check)
        return 0
    env = environment()
    directory = None if args.no_write else output_dir("train-peft", args.out, args.update_results)
    rows = []
    for name in args.cases:
        row = run_case(name, args.steps, args.warmup)
        print(f"{name}: PEFT {row['peft_s']:.3f} s, softprompt {row['softprompt_s']:.3f} s, "
              f"ratio {row['time_ratio']:.2f}; peak {row['peak_ratio']:.2f}x, saved {row['saved_ratio']:.2f}x; "
              f"gradient diff {row['first_grad_rel_diff']:.1e}; "
              f"loss diff first step {row['first_loss_diff']:.1e}, max {row['max_loss_diff']:.1e}", flush=True)
        rows.append(row)
        if not args.no_write:           # after every case: a partial run keeps what it measured
            _write(rows, env, directory)
    print(_markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
