"""GPU check and benchmark of the fused Triton prefill kernels (``kernels/triton_prefill.py``).

What it does, on one CUDA device:

1. Correctness: forward and the five gradients (q, k, v, prefix_k, prefix_v) of the Triton kernels
   against ``backend="reference"`` in bf16 and fp16 (plus fp32), on reduced shapes, for both the
   deterministic and the atomics prefix-gradient paths, paged and dense prefix layouts.
2. Speed, side by side in one run, ``triton.testing.do_bench`` medians:
   * ``triton``            fused kernels, prefix read in place (paged pool, block_size 16 and dense
                           ``[T, Hkv, P, D]`` layout), deterministic and atomics backward;
   * ``sdpa+materialise``  torch SDPA on ``[prefix ; own]`` materialised per sequence (the gather
                           is inside the timed region: it is the cost a PEFT-style cache pays);
                           bottom-right causal bias, GQA through ``enable_gqa``;
   * ``flex packed``       FlexAttention (compiled) on a packed layout ``[all prefixes | all docs]``
                           whose block mask admits each document's task prefix + its own causal
                           keys. Tensors are packed and the BlockMask built *outside* the timed
                           region (amortised across layers in a model) — this favours FlexAttention.
   Reports TFLOP/s on visible (unmasked) query-key pairs: forward ``4 * Hq * D * pairs``, backward
   ``2.5x`` that (Triton tutorial convention), ratios against the Triton default, and the peak
   memory above the inputs (``torch.cuda.max_memory_allocated``) of one forward+backward.
3. Prints a Markdown table and writes it to ``benchmarks/results/gpu_prefill_<date>_<device>.md``.

Shapes: the main case B=32, 4 tasks, prefix 128, own 1024, Hq=32, Hkv=8, D=128, bf16, causal;
plus two smaller ones. ``--quick`` runs only the smallest case.

Usage: ``python benchmarks/gpu_prefill.py [--cases main,small,long_prefix] [--quick] [--no-flex]``.
Needs CUDA; exits with a clear message (status 2) without one. ``--help`` works anywhere.
``--compile-only 90`` needs no GPU: it compiles every kernel variant for sm_90 (or any SM) with
Triton's bundled toolchain, which catches what the CPU interpreter cannot.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its benchmarks/kernels.py would
# shadow the `kernels` package: put the repository root first and drop the script folder.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT) and Path(p or ".").resolve() != Path(_HERE)]


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int
    P: int            # prefix rows per task
    S: int            # own tokens per sequence (Sq = Skv = S, causal)
    Hq: int
    Hkv: int
    D: int


SHAPES = {
    "main": Shape("main", B=32, T=4, P=128, S=1024, Hq=32, Hkv=8, D=128),
    "long_prefix": Shape("long_prefix", B=16, T=4, P=1024, S=512, Hq=32, Hkv=8, D=128),
    "small": Shape("small", B=8, T=2, P=64, S=256, Hq=8, Hkv=2, D=64),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="main,long_prefix,small",
                    help=f"comma-separated shapes among {sorted(SHAPES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="only the small case, fewer repetitions")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="benchmark dtype")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline")
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where the table goes")
    ap.add_argument("--compile-only", type=int, metavar="SM", default=None,
                    help="no GPU needed: compile every kernel variant for CUDA compute capability SM "
                         "(e.g. 90 or 80) with Triton's bundled toolchain and report shared memory / MMA use")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------

def build(shape: Shape, dtype, block_size, seed=0, device="cuda"):
    """Inputs for ``prefix_attention``: a paged pool (``block_size``) or dense (``block_size=None``)."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, P, Hkv, D = shape.T, shape.P, shape.Hkv, shape.D
    if block_size is None:                       # dense training layout [T, Hkv, P, D]
        bs, per_task = P, 1
        table = torch.arange(T)[:, None]
        num_blocks = T
    else:
        bs, per_task = block_size, -(-P // block_size)
        num_blocks = T * per_task + 3
        perm = torch.randperm(num_blocks, generator=g)[: T * per_task]
        table = perm.view(T, per_task)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.5).to(device=device, dtype=dtype)

    q = rnd(shape.B, shape.Hq, shape.S, D)
    k = rnd(shape.B, Hkv, shape.S, D)
    v = rnd(shape.B, Hkv, shape.S, D)
    pk = rnd(num_blocks, Hkv, bs, D)
    pv = rnd(num_blocks, Hkv, bs, D)
    tids = (torch.arange(shape.B) % T)[torch.randperm(shape.B, generator=g)]
    plens = torch.full((T,), P, dtype=torch.long)
    return [q, k, v, pk, pv], (table.to(device), plens.to(device), tids.to(device))


def visible_pairs(x) -> int:
    """Unmasked (query, key) pairs of a validated call: prefix pairs + own pairs."""
    from softprompt.kernels.masks import own_key_visibility
    prefix = int((x.q_lens * x.prefix_lens[x.task_ids]).sum())
    return prefix + int(own_key_visibility(x).sum())


# --------------------------------------------------------------------------------------------
# Methods: each returns (forward fn, forward+backward fn) on fixed inputs
# --------------------------------------------------------------------------------------------

def triton_method(tensors, index, deterministic):
    import torch
    from softprompt.kernels import validate_inputs
    from softprompt.kernels.triton_prefill import prefill_attention
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    x = validate_inputs(*leaves, *index, causal=True)            # validated once, outside the timing
    x_ng = validate_inputs(*tensors, *index, causal=True)
    dout = torch.randn_like(tensors[0])

    def fwd():
        with torch.no_grad():
            return prefill_attention(x_ng, deterministic=deterministic)

    def fwd_bwd():
        out = prefill_attention(x, deterministic=deterministic)
        return torch.autograd.grad(out, leaves, dout)
    return fwd, fwd_bwd


def sdpa_method(tensors, index, shape: Shape):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    table, plens, tids = index
    P, S = shape.P, shape.S
    bias = causal_lower_right(S, P + S)      # query i (at P + i) sees keys <= P + i
    dout = torch.randn_like(tensors[0])

    def materialised(pool, own):
        bs = pool.shape[2]
        nb = -(-P // bs)
        g = pool[table[tids, :nb]]                               # [B, nb, Hkv, bs, D]: the per-sequence copy
        B, _, H, _, D = g.shape
        prefix = g.permute(0, 2, 1, 3, 4).reshape(B, H, nb * bs, D)[:, :, :P]
        return torch.cat([prefix, own], dim=2)

    G = shape.Hq // shape.Hkv
    native = [True]

    def run(q, k, v, pk, pv):
        keys, values = materialised(pk, k), materialised(pv, v)
        if native[0]:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=True)
        return F.scaled_dot_product_attention(q, keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1),
                                              attn_mask=bias)

    def fwd():
        with torch.no_grad():
            return run(*tensors)

    def fwd_bwd():
        out = run(*leaves)
        return torch.autograd.grad(out, leaves, dout)

    try:                          # GQA inside SDPA where this torch/GPU supports it with the bias
        fwd_bwd()
    except Exception as exc:      # else repeat K/V heads (part of the naive baseline's cost)
        print(f"sdpa: enable_gqa with a lower-right causal bias failed ({type(exc).__name__}); "
              f"repeating K/V heads instead", file=sys.stderr)
        native[0] = False
    return fwd, fwd_bwd


def flex_method(tensors, index, shape: Shape):
    """FlexAttention on a packed layout: KV = [prefix_0 .. prefix_{T-1} | doc_0 .. doc_{B-1}]."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v, pk, pv = tensors
    table, plens, tids = index
    B, T, P, S = shape.B, shape.T, shape.P, shape.S
    Hq, Hkv, D = shape.Hq, shape.Hkv, shape.D
    nb = -(-P // pk.shape[2])

    def dense_prefix(pool):                                      # [T, Hkv, P, D], one copy per task
        g = pool[table[:, :nb]]
        return g.permute(0, 2, 1, 3, 4).reshape(T, Hkv, nb * pool.shape[2], D)[:, :, :P]

    def pack_q(x):                                               # [1, Hq, B*S, D]
        return x.permute(1, 0, 2, 3).reshape(1, Hq, B * S, D)

    def pack_kv(prefix, own):                                    # [1, Hkv, T*P + B*S, D]
        return torch.cat([prefix.permute(1, 0, 2, 3).reshape(1, Hkv, T * P, D),
                          own.permute(1, 0, 2, 3).reshape(1, Hkv, B * S, D)], dim=2)

    doc_task = tids.clone()
    PT = T * P

    def mask_mod(b, h, q_idx, kv_idx):
        q_doc = q_idx // S
        q_pos = q_idx % S
        is_prefix = kv_idx < PT
        prefix_ok = (kv_idx // P) == doc_task[q_doc]
        own = kv_idx - PT
        own_ok = ((own // S) == q_doc) & ((own % S) <= q_pos)
        return (is_prefix & prefix_ok) | (~is_prefix & own_ok)

    block_mask = create_block_mask(mask_mod, None, None, B * S, PT + B * S, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    qp = pack_q(q).contiguous()
    kp = pack_kv(dense_prefix(pk), k).contiguous()
    vp = pack_kv(dense_prefix(pv), v).contiguous()
    leaves = [t.detach().clone().requires_grad_(True) for t in (qp, kp, vp)]
    dout = torch.randn_like(qp)

    def fwd():
        with torch.no_grad():
            return flex(qp, kp, vp, block_mask=block_mask, enable_gqa=True)

    def fwd_bwd():
        out = flex(*leaves, block_mask=block_mask, enable_gqa=True)
        return torch.autograd.grad(out, leaves, dout)

    def unpack(out):                                             # for the correctness check
        return out.reshape(Hq, B, S, D).permute(1, 0, 2, 3)
    return fwd, fwd_bwd, unpack


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------

def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


CHECK_SHAPE = Shape("check", B=6, T=3, P=77, S=200, Hq=8, Hkv=2, D=128)


def check_correctness(dtype_names, lines, shape: Shape = CHECK_SHAPE, device="cuda"):
    """Triton vs reference on reduced shapes; returns True if every error is within tolerance.

    Ragged lengths (left/right padding, a 1-query row, an empty row), prefix lengths P, 0 and an
    odd one, paged (block 16 and 5) and dense layouts, with and without a sliding window, both
    prefix-gradient paths.
    """
    import torch
    from softprompt.kernels import prefix_attention
    from softprompt.kernels.triton_prefill import prefill_attention
    from softprompt.kernels import validate_inputs
    assert shape.B == 6 and shape.T == 3
    tol = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 3e-2}
    ok = True
    S, P = shape.S, shape.P
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        for block_size in (16, None, 5):
            tensors, index = build(shape, dtype, block_size, seed=1, device=device)
            plens = torch.tensor([P, 0, P // 2 | 1], device=device)
            index = (index[0], plens, index[2])
            kw = dict(causal=True,
                      q_lens=torch.tensor([S, S * 3 // 4, S, 1, 0, S // 2], device=device),
                      kv_lens=torch.tensor([S, S * 9 // 10, S, S, min(10, S), S // 2], device=device),
                      kv_starts=torch.tensor([0, S // 7, min(5, S), 0, 0, 0], device=device), window=None)
            for window in (None, max(1, S // 3)):
                kw["window"] = window
                for deterministic in (True, False):
                    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
                    ref_leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
                    out = prefill_attention(validate_inputs(*leaves, *index, **kw), deterministic=deterministic)
                    ref = prefix_attention(*ref_leaves, *index, backend="reference", **kw)
                    dout = torch.randn_like(ref)
                    grads = torch.autograd.grad(out, leaves, dout)
                    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
                    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
                    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
                    good = finite and max(errs) <= tol[dtype_name]
                    ok &= good
                    lines.append(f"| {dtype_name} | {'dense' if block_size is None else block_size} | {window} | "
                                 f"{'det' if deterministic else 'atomic'} | "
                                 + " | ".join(f"{e:.1e}" for e in errs) + f" | {'ok' if good else 'FAIL'} |")
    return ok


# --------------------------------------------------------------------------------------------
# Offline compile check (no GPU): catches what the CPU interpreter cannot (typing, layouts, smem)
# --------------------------------------------------------------------------------------------

def compile_check(sm: int) -> int:
    import os
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" in sys.modules:
        print("gpu_prefill --compile-only: run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import softprompt.kernels.triton_prefill as tp
    from softprompt.kernels import validate_inputs

    names = ["_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dq_kernel", "_bwd_dkdv_own_kernel",
             "_bwd_dkdv_prefix_kernel"]
    originals = {n: getattr(tp, n) for n in names}
    captured = []

    class Capture:                       # stands in for a kernel: records the launch arguments
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: captured.append((self.fn, a, kw))

    ptr_types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                 torch.int64: "*i64", torch.int32: "*i32"}

    def arg_type(v):
        if isinstance(v, tuple):                     # a tensor's strides, passed as one tuple
            return tuple(arg_type(e) for e in v)
        if isinstance(v, torch.Tensor):
            return ptr_types[v.dtype]
        if isinstance(v, bool):
            return "i1"
        if isinstance(v, int):
            return "i32" if -2**31 <= v < 2**31 else "i64"
        return "fp32"

    def compile_one(fn, args, kw, target):
        opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        vals = dict(zip(fn.arg_names, args))
        vals.update(kw)
        sig, consts = {}, {}
        for i, n in enumerate(fn.arg_names):
            v = vals[n]
            if fn.params[i].is_constexpr:
                sig[n], consts[n] = "constexpr", v
            else:
                sig[n] = arg_type(v)
        return triton.compile(ASTSource(fn, sig, consts), target=target, options=opts)

    target = GPUTarget("cuda", sm, 32)
    failures = 0
    variants = [(torch.bfloat16, 128, 16, None, True, True), (torch.float16, 64, 128, 7, True, False),
                (torch.float32, 24, 5, None, False, True), (torch.bfloat16, 128, 64, 1, True, True)]
    try:
        for n in names:
            setattr(tp, n, Capture(originals[n]))
        for dtype, D, bs, window, causal, det in variants:
            tensors, index = build(Shape("c", B=4, T=2, P=9, S=9, Hq=8, Hkv=2, D=D), dtype, bs, device="cpu")
            x = validate_inputs(*tensors, *index, causal=causal, window=window)
            meta = tp._Meta(x, tp.PrefillConfig(prefix_splits=2 if det else None), det)
            captured.clear()
            out, lse = tp._forward(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.block_table, x.prefix_lens,
                                   x.task_ids, x.q_lens, x.kv_lens, x.kv_starts, meta)
            tp._backward(torch.randn_like(x.q), x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.block_table,
                         x.prefix_lens, x.task_ids, x.q_lens, x.kv_lens, x.kv_starts, out, lse, meta, (True,) * 5)
            for fn, a, kw in captured:
                label = f"sm_{sm} {str(dtype)[6:]:8} D={D:<3} block={bs:<3} window={window} det={det} {fn.__name__}"
                try:
                    k = compile_one(fn, a, dict(kw), target)
                    ptx = k.asm.get("ptx", "")
                    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
                    print(f"{label}: ok, shared {k.metadata.shared} B, warps {k.metadata.num_warps}, mma {mma}")
                except Exception as exc:
                    failures += 1
                    print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:500]}")
    finally:
        for n in names:
            setattr(tp, n, originals[n])
    print("compile check:", "all kernels compiled" if not failures else f"{failures} failures")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------

def peak_mib(fn) -> float:
    import torch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(shape: Shape, dtype, args, rows):
    import torch
    from triton.testing import do_bench
    from softprompt.kernels import validate_inputs
    bench = dict(warmup=args.warmup, rep=args.rep, return_mode="median")

    tensors16, index16 = build(shape, dtype, 16)
    tensors_dense, index_dense = build(shape, dtype, None)
    pairs = visible_pairs(validate_inputs(*tensors16, *index16, causal=True))
    flop_fwd = 4.0 * shape.Hq * shape.D * pairs
    flop_bwd = 2.5 * flop_fwd

    methods = [
        ("triton det, dense", lambda: triton_method(tensors_dense, index_dense, True)),
        ("triton atomics, dense", lambda: triton_method(tensors_dense, index_dense, False)),
        ("triton det, paged bs16", lambda: triton_method(tensors16, index16, True)),
        ("sdpa + materialise", lambda: sdpa_method(tensors16, index16, shape)),
    ]
    if not args.no_flex:
        def make_flex():
            fwd, fwd_bwd, unpack = flex_method(tensors16, index16, shape)
            # The packed mask must give the same answer as the kernels (else its timing is meaningless).
            from softprompt.kernels.triton_prefill import prefill_attention
            with torch.no_grad():
                mine = prefill_attention(validate_inputs(*tensors16, *index16, causal=True))
            err = rel_err(unpack(fwd()), mine)
            print(f"[{shape.name}] flex packed vs triton: rel err {err:.1e}", flush=True)
            if err > 5e-2:
                raise RuntimeError(f"flex packed layout disagrees with the kernels (rel err {err:.1e})")
            return fwd, fwd_bwd
        methods.append(("flex packed", make_flex))

    results = []
    for name, make in methods:
        try:
            fwd, fwd_bwd = make()
            t_fwd = do_bench(fwd, **bench)
            t_all = do_bench(fwd_bwd, **bench)
            mem = peak_mib(fwd_bwd)
            results.append((name, t_fwd, t_all, mem))
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            results.append((name, None, None, None))
            print(f"[{shape.name}] {name}: failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        torch.cuda.empty_cache()

    ref_fwd, ref_all = results[0][1], results[0][2]
    for name, t_fwd, t_all, mem in results:
        if t_fwd is None:
            rows.append(f"| {shape.name} | {name} | failed | | | | | | | |")
            continue
        t_bwd = max(t_all - t_fwd, 1e-9)
        rows.append(
            f"| {shape.name} | {name} | {t_fwd:.3f} | {flop_fwd / t_fwd / 1e9:.1f} | {t_all:.3f} | "
            f"{t_bwd:.3f} | {flop_bwd / t_bwd / 1e9:.1f} | {(flop_fwd + flop_bwd) / t_all / 1e9:.1f} | "
            f"{(t_fwd / ref_fwd if ref_fwd else math.nan):.2f} / {(t_all / ref_all if ref_all else math.nan):.2f} | "
            f"{mem:.0f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_check(args.compile_only)
    try:
        import torch
    except ImportError:
        print("gpu_prefill: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_prefill: no CUDA device is available; this script checks and times the Triton kernels on a "
              "GPU only (CPU correctness lives in tests/test_triton_prefill.py under TRITON_INTERPRET=1).",
              file=sys.stderr)
        return 2
    import triton
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name()
    names = ["small"] if args.quick else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        print(f"gpu_prefill: unknown case(s) {unknown}; expected among {sorted(SHAPES)}", file=sys.stderr)
        return 2
    if args.quick:
        args.rep, args.warmup = min(args.rep, 30), min(args.warmup, 10)

    stamp = _dt.datetime.now(_dt.timezone.utc)
    out = [f"# Triton prefill kernels on {device_name}", "",
           f"{stamp:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, triton {triton.__version__}, "
           f"benchmark dtype {args.dtype}, causal.", ""]
    ok = True
    if not args.skip_check:
        check = ["## Correctness vs reference (max |err| / max |ref|: out, dq, dk, dv, dprefix_k, dprefix_v)", "",
                 "| dtype | block | window | prefix grads | out | dq | dk | dv | dpk | dpv | |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        ok = check_correctness(["bfloat16", "float16", "float32"], check)
        out += check + [""]
        print("\n".join(check), flush=True)

    rows = ["## Speed (do_bench median)", "",
            "TFLOP/s on visible pairs (fwd 4·Hq·D·pairs, bwd 2.5x). ratio = time / time of `triton det, dense` "
            "(fwd / fwd+bwd; >1 means slower than it). peak = max_memory_allocated above inputs, one fwd+bwd.", "",
            "| case | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | bwd ms | bwd TFLOP/s | fwd+bwd TFLOP/s | "
            "ratio | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = SHAPES[n]
        rows.append(f"| {n}: B={s.B} T={s.T} P={s.P} S={s.S} Hq={s.Hq} Hkv={s.Hkv} D={s.D} | | | | | | | | | |")
        bench_shape(s, dtype, args, rows)
        print(rows[-1], flush=True)
    out += rows
    text = "\n".join(out) + "\n"
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    path = out_dir / f"gpu_prefill_{stamp:%Y%m%d-%H%M}_{dev}.md"
    path.write_text(text)
    print(f"wrote {path}")
    if not ok:
        print("gpu_prefill: CORRECTNESS CHECK FAILED (see the table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
