"""GPU benchmark of the mixed-task decode path of ``backend="triton"`` (``kernels/triton_decode.py``).

1. Correctness on the GPU: the Triton decode kernels (both paths, forced KV splits, bf16 / fp16 /
   fp32) against ``backend="reference"`` on ragged small problems, and on the timed cases against
   SDPA on the materialised ``[prefix ; own]`` keys. Any mismatch stops the script (exit 1).
2. Timing, medians of ``triton.testing.do_bench`` (L2 flushed between runs), side by side in one run:
   - ``decode``: ``decode_attention`` on pre-validated inputs, path chosen by the heuristic;
   - ``per_sequence``: the same kernels forced onto the plain per-sequence path;
   - ``grouped``: forced onto the grouped path;
   - ``api``: through ``prefix_attention(..., backend="triton")`` (adds input validation, one sync);
   - ``sdpa_materialised``: ``F.scaled_dot_product_attention`` on keys/values already materialised
     as ``[prefix ; own]`` per sequence (GQA via ``enable_gqa``; the copy is *not* timed);
   - ``gather+sdpa``: the same including the per-sequence prefix copy (what a PEFT-style cache does);
   - ``floor``: unique bytes / measured copy bandwidth, where unique bytes count each task's prefix
     K/V once, every sequence's own K/V once, q and the output.
   Achieved bandwidth = unique bytes / time, reported against the copy bandwidth measured here
   (``dst.copy_(src)`` on a 2 GiB buffer, read + write bytes).
3. A Markdown table is printed and written to ``benchmarks/results/gpu_decode_<date>_<device>.md``.

Cases (defaults; see ``--help``): 256 sequences in 8 tasks, prefix 2048, own cache 256, Hq=32, Hkv=8,
D=128, bf16, one query per sequence — targets >= 70% of copy bandwidth on unique bytes and >= 5x
faster than SDPA on the materialised input; and the same with every sequence its own task — target
no slower than 0.8x SDPA (i.e. time <= 1.25x SDPA's).

``--cpu-smoke`` runs the whole script logic on the CPU through the Triton interpreter with tiny
shapes and wall-clock timing (numbers meaningless; nothing written unless ``--out-dir`` is given).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark the Triton mixed-task decode kernels against SDPA on the materialised "
                    "[prefix ; own] input and the bandwidth floor (needs a CUDA GPU).")
    p.add_argument("--seqs", type=int, default=256, help="sequences in the batch (default 256)")
    p.add_argument("--tasks", type=int, default=8, help="tasks of the shared case (default 8)")
    p.add_argument("--prefix", type=int, default=2048, help="prefix rows per task (default 2048)")
    p.add_argument("--own", type=int, default=256, help="own cache length per sequence (default 256)")
    p.add_argument("--hq", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--hkv", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--sq", type=int, default=1, help="queries per sequence, 1..16 (default 1)")
    p.add_argument("--block-size", type=int, default=16, help="prefix pool block size (default 16)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="timed dtype (default bfloat16)")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms (default 200)")
    p.add_argument("--out-dir", default=None,
                   help="where the Markdown table goes (default benchmarks/results; --cpu-smoke: not written)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--skip-correctness", action="store_true", help="skip the reference checks")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise the script on the CPU through TRITON_INTERPRET=1 with tiny shapes")
    p.add_argument("--compile-check", action="store_true",
                   help="no GPU needed: compile the decode kernels ahead of time for sm_90 with the "
                        "launch configs decode_attention uses for the benchmark shapes, print ptxas' "
                        "register/spill report, exit 1 on a compile error")
    p.add_argument("--quick", action="store_true", help="with --compile-check: bf16 and D=128 only")
    args = p.parse_args(argv)
    if not 1 <= args.sq <= 16:
        p.error("--sq must be in 1..16 (the decode path)")
    if args.hq % args.hkv:
        p.error("--hq must be a multiple of --hkv")
    if args.cpu_smoke:
        args.seqs, args.tasks, args.prefix, args.own = 6, 2, 19, 11
        args.hq, args.hkv, args.head_dim, args.block_size = 4, 2, 16, 4
        args.dtype = "float16"
    return args


# ---- problem construction ---------------------------------------------------------------------

def build_problem(torch, *, B, T, P, S, Hq, Hkv, D, Sq, block_size, dtype, device, seed,
                  ragged=False, window=None, prefix_lens=None):
    """Inputs of one decode step: a shuffled block pool holding every task's prefix."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = prefix_lens if prefix_lens is not None else [P] * T
    per_task = [-(-p // block_size) for p in lens]
    num_blocks = sum(per_task) + 1
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros((T, max(per_task + [1])), dtype=torch.long)
    at = 0
    for t, n in enumerate(per_task):
        table[t, :n] = perm[at:at + n]
        at += n

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = randn(B, Hq, Sq, D)
    k = randn(B, Hkv, S, D)
    v = randn(B, Hkv, S, D)
    pk = randn(num_blocks, Hkv, block_size, D)
    pv = randn(num_blocks, Hkv, block_size, D)
    task_ids = (torch.arange(B) % T)[torch.randperm(B, generator=g)]
    kw = dict(causal=True, window=window)
    if ragged:
        kv_lens = torch.randint(0, S + 1, (B,), generator=g)
        kv_lens[0] = S
        q_lens = torch.minimum(torch.randint(0, Sq + 1, (B,), generator=g), kv_lens)
        q_lens[0] = Sq
        kv_starts = (torch.rand(B, generator=g) * (kv_lens - q_lens + 1)).long().clamp_min(0)
        kw.update(q_lens=q_lens.to(device), kv_lens=kv_lens.to(device), kv_starts=kv_starts.to(device))
    args = (q, k, v, pk, pv, table.to(device), torch.tensor(lens, device=device), task_ids.to(device))
    return args, kw


def materialise(torch, args):
    """``[prefix ; own]`` K and V per sequence, ``[B, Hkv, P + S, D]`` (the naive layout)."""
    q, k, v, pk, pv, table, lens, tids = args
    P = int(lens.max())
    bs = pk.shape[2]
    blocks = -(-P // bs)
    idx = table[tids, :blocks]                                            # [B, blocks]
    B, Hkv, D = q.shape[0], pk.shape[1], pk.shape[3]

    def gather(pool, own):
        pre = pool[idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, blocks * bs, D)[:, :, :P]
        return torch.cat([pre, own], dim=2)

    return gather(pk, k), gather(pv, v)


def unique_bytes(args, kw):
    q, k, v, pk, pv, table, lens, tids = args
    el = q.element_size()
    Hkv, D = k.shape[1], k.shape[3]
    present = sorted(set(tids.tolist()))
    prefix_rows = sum(int(lens[t]) for t in present)
    if "kv_lens" in kw:
        own_rows = int((kw["kv_lens"] - kw["kv_starts"]).sum())
    else:
        own_rows = k.shape[0] * k.shape[2]
    kv = 2 * (prefix_rows + own_rows) * Hkv * D * el
    return kv + 2 * q.numel() * el, kv


# ---- timing -------------------------------------------------------------------------------------

def make_timer(torch, smoke, rep):
    if not smoke:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e-3
        return bench

    def bench(fn):                                   # CPU smoke: wall clock, a few runs
        fn()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)
    return bench


def copy_bandwidth(torch, device, bench, smoke):
    n = (1 << 20) if smoke else (1 << 30)            # elements of bf16: 2 GiB on the GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t


# ---- correctness --------------------------------------------------------------------------------

def correctness(torch, device, smoke):
    from softprompt.kernels import prefix_attention, validate_inputs
    from softprompt.kernels.triton_decode import decode_attention

    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
    shapes = [dict(B=5, T=3, P=13, S=11, Hq=4, Hkv=2, D=16, Sq=1, block_size=4)] if smoke else [
        dict(B=37, T=7, P=301, S=190, Hq=8, Hkv=2, D=128, Sq=1, block_size=16),
        dict(B=19, T=5, P=77, S=333, Hq=12, Hkv=4, D=64, Sq=4, block_size=7),
        dict(B=9, T=9, P=520, S=64, Hq=32, Hkv=8, D=96, Sq=16, block_size=32),
    ]
    # bf16 on every shape (the interpreter cannot check it); fp16 / fp32 on the first one only,
    # to bound Triton compile time on a fresh machine.
    combos = [(0, torch.float16), (0, torch.float32)] if smoke else (
        [(i, torch.bfloat16) for i in range(len(shapes))] + [(0, torch.float16), (0, torch.float32)])
    checked = 0
    t_start = time.perf_counter()
    for si, dtype in combos:
        shape = shapes[si]
        for window in (None, 50):
            rnd_lens = [(shape["P"] * (t + 1)) // shape["T"] if t % 3 else 0 for t in range(shape["T"])]
            args, kw = build_problem(torch, **shape, dtype=dtype, device=device, seed=100 + si,
                                     ragged=True, window=window, prefix_lens=rnd_lens)
            ref = prefix_attention(*args, backend="reference", **kw).float()
            x = validate_inputs(*args, **kw)
            for path, overlap in (("grouped", False), ("grouped", True), ("per_sequence", False)):
                for splits in (None, 3):
                    got = decode_attention(x, path=path, num_splits=splits, prefix_splits=splits,
                                           overlap=overlap)
                    err = (got.float() - ref).abs().max().item()
                    ok = torch.isfinite(got).all().item() and err <= tol[dtype] * (1 + ref.abs().max().item())
                    checked += 1
                    if not ok:
                        sys.exit(f"FAIL correctness: shape={shape} dtype={dtype} window={window} "
                                 f"path={path} overlap={overlap} splits={splits}: max abs err {err:.3g}")
    print(f"correctness: {checked} decode runs match backend='reference' "
          f"({time.perf_counter() - t_start:.0f} s incl. Triton compiles)", flush=True)


# ---- the benchmark ------------------------------------------------------------------------------

def run_case(torch, F, device, bench, copy_bw, name, args_ns, T):
    from softprompt.kernels import prefix_attention, validate_inputs
    from softprompt.kernels.triton_decode import choose_path, decode_attention

    dtype = getattr(torch, args_ns.dtype)
    args, kw = build_problem(torch, B=args_ns.seqs, T=T, P=args_ns.prefix, S=args_ns.own,
                             Hq=args_ns.hq, Hkv=args_ns.hkv, D=args_ns.head_dim, Sq=args_ns.sq,
                             block_size=args_ns.block_size, dtype=dtype, device=device, seed=7)
    q = args[0]
    x = validate_inputs(*args, **kw)
    K, V = materialise(torch, args)
    Sq = args_ns.sq
    G = args_ns.hq // args_ns.hkv
    # Causal decode with full lengths: query i sees the P prefix rows and own keys j <= S - Sq + i.
    L = K.shape[2]
    mask = None if Sq == 1 else (torch.arange(L, device=device)[None, :]
                                 <= (L - Sq + torch.arange(Sq, device=device))[:, None])
    gqa_note = "enable_gqa"
    try:
        F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)

        def sdpa_on(K_, V_):
            return F.scaled_dot_product_attention(q, K_, V_, attn_mask=mask, enable_gqa=True)
    except (RuntimeError, TypeError) as e:          # older torch / unsupported backend combination
        gqa_note = f"heads repeated ({type(e).__name__} with enable_gqa)"
        K, V = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)

        def sdpa_on(K_, V_):
            if K_.shape[1] != q.shape[1]:
                K_, V_ = K_.repeat_interleave(G, 1), V_.repeat_interleave(G, 1)
            return F.scaled_dot_product_attention(q, K_, V_, attn_mask=mask)

    def sdpa():
        return sdpa_on(K, V)

    def gather_sdpa():
        return sdpa_on(*materialise(torch, args))

    chosen = choose_path(x)
    out = decode_attention(x)
    want = sdpa()
    err = (out.float() - want.float()).abs().max().item()
    if not torch.isfinite(out).all() or err > 3e-2:
        sys.exit(f"FAIL {name}: decode vs SDPA on the materialised input, max abs err {err:.3g}")

    ub, kv_bytes = unique_bytes(args, kw)
    with torch.no_grad():
        t = {
            "decode": bench(lambda: decode_attention(x)),
            "grouped": bench(lambda: decode_attention(x, path="grouped")),
            "overlap": bench(lambda: decode_attention(x, path="grouped", overlap=True)),
            "per_sequence": bench(lambda: decode_attention(x, path="per_sequence")),
            "api": bench(lambda: prefix_attention(*args, backend="triton", **kw)),
            "sdpa_materialised": bench(sdpa),
            "gather+sdpa": bench(gather_sdpa),
        }
    t["floor"] = ub / copy_bw
    naive_bytes = 2 * K.numel() // (G if K.shape[1] == q.shape[1] else 1) * K.element_size() \
        + 2 * q.numel() * q.element_size()
    del K, V
    return dict(name=name, T=T, path=chosen, times=t, unique_bytes=ub, naive_bytes=naive_bytes,
                max_err=err, gqa_note=gqa_note)


def fmt_us(s):
    return f"{s * 1e6:,.1f}"


def table(results, copy_bw, args_ns, device_name):
    lines = []
    lines.append(f"Decode benchmark — {device_name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines.append("")
    lines.append(f"B={args_ns.seqs}, prefix={args_ns.prefix}, own={args_ns.own}, Hq={args_ns.hq}, "
                 f"Hkv={args_ns.hkv}, D={args_ns.head_dim}, Sq={args_ns.sq}, block_size={args_ns.block_size}, "
                 f"{args_ns.dtype}; "
                 + ("CPU SMOKE RUN through the Triton interpreter: wall-clock medians, numbers meaningless. "
                    if args_ns.cpu_smoke else "medians of triton.testing.do_bench (L2 flushed). ")
                 + f"Measured copy bandwidth: {copy_bw / 1e9:,.0f} GB/s.")
    lines.append("")
    lines.append("| case | path (auto) | decode µs | grouped µs | grouped+overlap µs | per-seq µs | api µs | "
                 "SDPA materialised µs | gather+SDPA µs | floor µs | unique GB/s | % of copy BW | "
                 "speed-up vs SDPA | target | met |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        t = r["times"]
        gbs = r["unique_bytes"] / t["decode"]
        frac = gbs / copy_bw
        speed = t["sdpa_materialised"] / t["decode"]
        if r["kind"] == "shared":
            target = ">=70% copy BW, >=5x SDPA"
            met = frac >= 0.70 and speed >= 5.0
        else:
            target = ">=0.8x SDPA speed"
            met = speed >= 0.8
        lines.append(
            f"| {r['name']} (T={r['T']}) | {r['path']} | {fmt_us(t['decode'])} | {fmt_us(t['grouped'])} | "
            f"{fmt_us(t['overlap'])} | "
            f"{fmt_us(t['per_sequence'])} | {fmt_us(t['api'])} | {fmt_us(t['sdpa_materialised'])} | "
            f"{fmt_us(t['gather+sdpa'])} | {fmt_us(t['floor'])} | {gbs / 1e9:,.0f} | {100 * frac:.0f}% | "
            f"{speed:.2f}x | {target} | {'yes' if met else 'NO'} |")
    lines.append("")
    lines.append("unique bytes: each task's prefix K/V once + every sequence's own K/V + q + output. "
                 "SDPA materialised: the per-sequence [prefix ; own] copy is made before timing; "
                 "gather+SDPA times it too. api: through prefix_attention(backend='triton') incl. validation. "
                 "grouped+overlap: experimental side-stream prefix phase (decode_attention(overlap=True)); "
                 "decode/%/speed-up columns use the default (auto) call.")
    for r in results:
        lines.append(f"- {r['name']}: unique {r['unique_bytes'] / 1e6:,.1f} MB, materialised "
                     f"{r['naive_bytes'] / 1e6:,.1f} MB, max |decode - SDPA| = {r['max_err']:.2e}, "
                     f"SDPA GQA: {r['gqa_note']}")
    return "\n".join(lines) + "\n"


def compile_check(args_ns):
    """Ahead-of-time compile for sm_90 (no GPU): the configs ``decode_attention`` picks on a GPU."""
    os.environ.pop("TRITON_INTERPRET", None)          # must happen before triton is imported
    import subprocess
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, str(ROOT))
    from softprompt.kernels import triton_decode as td

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception as e:                            # noqa: BLE001 - report and go on without it
        ptxas = None
        print(f"(no ptxas register report: {e})")
    target = GPUTarget("cuda", 90, 32)
    ptrs16 = {"Q", "K", "V", "PK", "PV", "OUT"}
    ptrs32 = {"PO", "PL"}
    ptrs64 = {"BT", "PLENS", "QLENS", "ORDER", "TSEQ_START", "TCOUNT", "TTILE_END", "SORTED",
              "TIDS", "KVLENS", "KVSTARTS", "OPT"}
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    B, Hq, Hkv, Sq, S, bs = args_ns.seqs, args_ns.hq, args_ns.hkv, args_ns.sq, args_ns.own, args_ns.block_size
    G = Hq // Hkv
    failures = 0
    dtypes = [torch.bfloat16] if args_ns.quick else [torch.bfloat16, torch.float16, torch.float32]
    dims = [args_ns.head_dim] if args_ns.quick else sorted({args_ns.head_dim, 64, 256})
    for dtype in dtypes:
        for D in dims:
            block_d, block_n, max_m, stages = td._config("cuda", dtype, D)
            prec = "ieee" if dtype == torch.float32 else "tf32"
            seq_m = min(max_m, max(16, td._pow2(G * Sq)))
            tile_m = min(max_m, max(16, td._pow2(B * G * Sq)))
            # Integer arguments as a contiguous launch of the benchmark shapes passes them.
            ints = dict(s_qb=Hq * Sq * D, s_qh=Sq * D, s_qs=D, s_qd=1, s_kb=Hkv * S * D, s_kh=S * D,
                        s_ks=D, s_kd=1, s_vb=Hkv * S * D, s_vh=S * D, s_vs=D, s_vd=1,
                        s_pkb=Hkv * bs * D, s_pkh=bs * D, s_pkn=D, s_pkd=1, s_pvb=Hkv * bs * D,
                        s_pvh=bs * D, s_pvn=D, s_pvd=1, s_bt0=args_ns.prefix // bs, s_bt1=1,
                        s_ob=Hq * Sq * D, s_oh=Sq * D, s_os=D, s_od=1, T=args_ns.tasks, Hq=Hq, Sq=Sq,
                        D=D, block_size=bs, window=0, NS=3, slot_off=2, num_pre=2, chunk=1024,
                        n_iter_t=args_ns.tasks.bit_length(), B=B, GS=G * Sq, tile_m=tile_m,
                        n_iter=B.bit_length(), s_opt0=S // 16, s_opt1=1, page_size=16)
            jobs = [
                ("group setup", td._group_setup_kernel,
                 dict(BLOCK_T=min(1024, max(16, td._pow2(args_ns.tasks)))), 4),
                ("grouped prefix", td._grouped_prefix_kernel,
                 dict(G=G, BLOCK_M=tile_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=prec),
                 td._grouped_warps(tile_m, block_d)),
                ("own + fused merge", td._sequence_kernel,
                 dict(G=G, M_TILES=td._cdiv(G * Sq, seq_m), BLOCK_M=seq_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      INCLUDE_PREFIX=False, CAUSAL=True, HAS_WINDOW=False, FINALIZE=True, PER_ROW_MASK=False,
                      OWN_PAGED=False, PREC=prec),
                 td._sequence_warps(block_d)),
                ("own paged + fused merge", td._sequence_kernel,
                 dict(G=G, M_TILES=td._cdiv(G * Sq, seq_m), BLOCK_M=seq_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      INCLUDE_PREFIX=False, CAUSAL=True, HAS_WINDOW=False, FINALIZE=True, PER_ROW_MASK=False,
                      OWN_PAGED=True, PREC=prec),
                 td._sequence_warps(block_d)),
                ("per-sequence, window, split", td._sequence_kernel,
                 dict(G=G, M_TILES=td._cdiv(G * Sq, seq_m), BLOCK_M=seq_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      INCLUDE_PREFIX=True, CAUSAL=True, HAS_WINDOW=True, FINALIZE=False, PER_ROW_MASK=True,
                      OWN_PAGED=False, PREC=prec),
                 td._sequence_warps(block_d)),
                ("merge", td._merge_kernel, dict(BLOCK_S=4, BLOCK_D=block_d), td._merge_warps(block_d)),
            ]
            for label, fn, consts, warps in jobs:
                sig, attrs, cst = {}, {}, dict(consts)
                missing = [n for i, n in enumerate(fn.arg_names) if fn.params[i].is_constexpr and n not in consts]
                if missing:                                  # would silently compile as a runtime int
                    failures += 1
                    print(f"FAIL {names[dtype]} D={D} {label}: constexpr {missing} not given")
                    continue
                for i, n in enumerate(fn.arg_names):
                    if n in consts:
                        sig[n] = "constexpr"
                    elif n in ptrs16 or n in ptrs32 or n in ptrs64:
                        sig[n] = "*" + (names[dtype] if n in ptrs16 else "fp32" if n in ptrs32 else "i64")
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    elif n == "qk_scale":
                        sig[n] = "fp32"
                    elif ints.get(n, 7) == 1:                 # Triton specialises ints equal to 1
                        sig[n], cst[n] = "constexpr", 1
                    else:
                        sig[n] = "i32"
                        if ints.get(n, 7) % 16 == 0:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                what = f"{names[dtype]} D={D} {label}: warps={warps} stages={stages}"
                try:
                    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs),
                                       target=target, options=dict(num_warps=warps, num_stages=stages))
                except Exception as e:                       # noqa: BLE001 - a compile error is the finding
                    failures += 1
                    print(f"FAIL {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                report = ""
                if ptxas:
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                        f.write(k.asm["ptx"])
                    r = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name,
                                        "-o", os.devnull], capture_output=True, text=True)
                    os.unlink(f.name)
                    report = " ; ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines()
                                        if "registers" in line or "spill" in line)
                print(f"ok   {what}: smem {k.metadata.shared} B | {report}", flush=True)
    if failures:
        sys.exit(f"compile-check: {failures} kernel configuration(s) failed to compile")
    print("compile-check: all decode kernel configurations compile for sm_90")


def main(argv=None):
    args_ns = parse_args(argv)
    if args_ns.compile_check:
        return compile_check(args_ns)
    if args_ns.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"          # before triton / kernels are imported
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        sys.exit("gpu_decode: torch is not installed")
    if not args_ns.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_decode: CUDA is not available — this benchmark needs an NVIDIA GPU "
                 "(use --cpu-smoke to exercise the script logic through the Triton interpreter)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("gpu_decode: triton is not installed")
    sys.path.insert(0, str(ROOT))

    device = torch.device("cpu" if args_ns.cpu_smoke else "cuda")
    device_name = "cpu-interpreter" if args_ns.cpu_smoke else torch.cuda.get_device_name(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    if not args_ns.skip_correctness:
        correctness(torch, device, args_ns.cpu_smoke)
    bench = make_timer(torch, args_ns.cpu_smoke, args_ns.rep)
    copy_bw = copy_bandwidth(torch, device, bench, args_ns.cpu_smoke)
    print(f"copy bandwidth: {copy_bw / 1e9:,.0f} GB/s", flush=True)
    results = []
    for kind, T in (("shared", args_ns.tasks), ("own_task", args_ns.seqs)):
        name = f"{args_ns.seqs} seqs / {T} tasks"
        t0 = time.perf_counter()
        r = run_case(torch, F, device, bench, copy_bw, name, args_ns, T)
        r["kind"] = kind
        print(f"{name}: decode {fmt_us(r['times']['decode'])} µs, SDPA materialised "
              f"{fmt_us(r['times']['sdpa_materialised'])} µs ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = table(results, copy_bw, args_ns, device_name)
    print(text)
    out_dir = args_ns.out_dir or (None if args_ns.cpu_smoke else str(ROOT / "benchmarks" / "results"))
    if out_dir and not args_ns.no_write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
        path = Path(out_dir) / f"gpu_decode_{datetime.date.today():%Y-%m-%d}_{slug}.md"
        path.write_text(text)
        print(f"written: {path}")


if __name__ == "__main__":
    main()
