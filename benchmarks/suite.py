"""Run a sweep of prefix-attention problems through every available method, side by side.

Each case: build one random problem, check every method against ``reference``, then time each
(medians after warm-up; on a GPU ``triton.testing.do_bench``) and measure its peak memory. Rows
carry speed-ups of our best method over each baseline; on a GPU also achieved TFLOP/s and GB/s of
unique bytes (each task's prefix counted once) against the measured matrix rate and copy bandwidth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from .baselines import METHODS, OURS, unavailable
from .common import cpu_peak_bytes, median_seconds, number, ratio

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Shape:
    B: int
    T: int
    P: int
    Sq: int
    Skv: int
    Hq: int
    Hkv: int
    D: int
    dtype: str = "fp32"
    train: bool = False          # time forward + backward
    block_size: int = 16

    def label(self) -> str:
        return (f"B={self.B} T={self.T} P={self.P} Sq={self.Sq} Skv={self.Skv} "
                f"Hq={self.Hq} Hkv={self.Hkv} D={self.D} {self.dtype}")


@dataclass
class Problem:
    shape: Shape
    args: tuple
    kwargs: dict = field(default_factory=dict)


def build_problem(shape: Shape, device: torch.device, seed: int = 0) -> Problem:
    s = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[s.dtype]
    blocks = max(1, -(-s.P // s.block_size))

    def randn(*dims):
        return torch.randn(*dims, generator=g).to(device=device, dtype=dtype).requires_grad_(s.train)

    args = (randn(s.B, s.Hq, s.Sq, s.D), randn(s.B, s.Hkv, s.Skv, s.D), randn(s.B, s.Hkv, s.Skv, s.D),
            randn(s.T * blocks, s.Hkv, s.block_size, s.D), randn(s.T * blocks, s.Hkv, s.block_size, s.D),
            torch.randperm(s.T * blocks, generator=g).view(s.T, blocks).to(device),
            torch.full((s.T,), s.P, dtype=torch.long, device=device),
            (torch.arange(s.B) % s.T).to(device))
    return Problem(shape, args, dict(causal=True))


def visible_keys(s: Shape) -> float:
    """Average keys a query sees: its task prefix plus the causal part of its own cache."""
    own = sum(min(s.Skv, s.Skv - s.Sq + i + 1) for i in range(s.Sq)) / s.Sq
    return s.P + own


def flops(s: Shape) -> float:
    fwd = 4 * s.B * s.Hq * s.Sq * visible_keys(s) * s.D
    return fwd * (3.5 if s.train else 1.0)      # backward counted as 2.5x forward


def unique_bytes(s: Shape) -> float:
    elt = torch.finfo(DTYPES[s.dtype]).bits // 8
    prefix = 2 * s.T * s.Hkv * s.P * s.D           # each task's prefix once
    own = 2 * s.B * s.Hkv * s.Skv * s.D
    qo = 2 * s.B * s.Hq * s.Sq * s.D
    return (prefix + own + qo) * elt


def _step(run, train: bool, args):
    if not train:
        def fwd():
            with torch.no_grad():
                return run()
        return fwd

    def fwd_bwd():
        out = run()
        grads = torch.autograd.grad(out.float().sum(), [a for a in args[:5] if a.requires_grad])
        return out, grads
    return fwd_bwd


def _time(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return median_seconds(fn, warmup=1, reps=5)


def _peak(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(fn)


def device_ceilings(device: torch.device) -> Dict[str, float]:
    """Measured copy bandwidth (GB/s) and bf16 matrix rate (TFLOP/s) of a GPU."""
    if device.type != "cuda":
        return {}
    import triton.testing
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms_mm = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return {"copy GB/s": 2 * n / ms / 1e6, "bf16 TFLOP/s": 2 * 8192 ** 3 / ms_mm / 1e9}


def run_sweep(shapes: List[Shape], methods: List[str], device: torch.device, title: str = "cases") -> List[dict]:
    rows = []
    ceilings = device_ceilings(device)
    skipped = {m: unavailable(m, device) for m in methods}
    for shape in tqdm(shapes, desc=title, leave=False):
        problem = build_problem(shape, device)
        row: Dict[str, object] = {"shape": shape.label(), **asdict(shape)}
        runs = {m: _step(METHODS[m](problem), shape.train, problem.args) for m in methods if not skipped[m]}
        with torch.no_grad():
            ref = METHODS["reference"](problem)().float()
        for name, fn in runs.items():
            try:
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                row[f"{name} max|diff|"] = float((out.detach().float() - ref).abs().max())
                row[f"{name} ms"] = 1e3 * _time(fn, device)
                row[f"{name} MiB"] = _peak(fn, device) / 2**20
            except (RuntimeError, torch.OutOfMemoryError) as exc:    # e.g. a baseline out of memory
                row[f"{name} error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        ours = [m for m in OURS if f"{m} ms" in row]
        if ours:
            best = min(ours, key=lambda m: row[f"{m} ms"])
            row["ours"] = best
            for name in runs:
                if name not in OURS and f"{name} ms" in row:
                    row[f"speed-up vs {name}"] = row[f"{name} ms"] / row[f"{best} ms"]
                    row[f"memory vs {name}"] = row[f"{name} MiB"] / max(row[f"{best} MiB"], 1e-9)
            if device.type == "cuda":
                sec = row[f"{best} ms"] / 1e3
                row["TFLOP/s"] = flops(shape) / sec / 1e12
                row["GB/s unique"] = unique_bytes(shape) / sec / 1e9
                for key, value in ceilings.items():
                    row[f"measured {key}"] = value
        rows.append(row)
    for name, why in skipped.items():
        if why:
            print(f"skipped {name}: {why}")
    return rows


def column_title(key: str) -> str:
    """The Markdown title of a row key: ratios say which way they go (above 1: ours is better)."""
    for prefix, unit in (("speed-up vs ", "ms"), ("memory vs ", "MiB")):
        if key.startswith(prefix):
            base = key[len(prefix):]
            return f"{prefix.split()[0]}: {base} {unit} / ours"
    return key


def format_rows(rows: List[dict], methods: List[str]) -> tuple:
    """Markdown columns for a sweep: times, speed-ups and memory ratios of our best over each baseline
    (each ratio is baseline / ours, so above 1 means ours is faster or smaller). Numbers have three
    significant digits in plain notation."""
    present = [m for m in methods if any(f"{m} ms" in r for r in rows)]
    baselines = [m for m in present if m not in OURS]
    keys = ["shape"] + [f"{m} ms" for m in present] + [f"speed-up vs {m}" for m in baselines] \
        + [f"{m} MiB" for m in present] + [f"memory vs {m}" for m in baselines]
    if any("TFLOP/s" in r for r in rows):
        keys += ["TFLOP/s", "GB/s unique"]
    if any("ours" in r for r in rows):
        keys.insert(1, "ours")
    table_rows = []
    for r in rows:
        out = {}
        for c in keys:
            v = r.get(c, r.get(c.replace(" ms", " error"), ""))
            if isinstance(v, float):
                v = ratio(v) if c.startswith(("speed-up", "memory vs")) else number(v)
            out[column_title(c)] = v
        table_rows.append(out)
    return table_rows, [column_title(c) for c in keys]
