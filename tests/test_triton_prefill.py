"""The fused Triton prefill kernels (forward + backward) against the reference backend.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set below before triton
is imported), so shapes are tiny. Every case draws fresh random inputs; the seed is printed in
every assertion message. Reproduce a failure with ``SOFTPROMPT_SEED=<seed>``.
bf16 is not tested here: the interpreter's ``tl.dot`` on bf16 is wrong on the CPU
(``benchmarks/gpu_prefill.py`` checks bf16 on a GPU).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from softprompt.kernels import prefix_attention, validate_inputs  # noqa: E402
from softprompt.kernels.triton_prefill import PrefillConfig, prefill_attention  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
DIFF = ("q", "k", "v", "prefix_k", "prefix_v")


def fresh_seed() -> int:
    pinned = os.environ.get("SOFTPROMPT_SEED")
    return int(pinned) if pinned else random.SystemRandom().randrange(2**31)


def make_problem(seed, *, B=3, T=2, Hq=2, Hkv=1, Sq=7, Skv=7, D=16, block_size=4, prefix_lens=None,
                 padding="none", causal=True, window=None, dtype=torch.float32, shared_block=False,
                 dense_layout=False, grad=True):
    """Random inputs for ``prefix_attention``: ``(args, kwargs)``.

    ``padding``: none | left (``kv_starts``) | right (``q_lens = kv_lens``) | ragged (any lengths).
    Block tables are shuffled through the pool (with a few unused blocks); ``dense_layout`` uses the
    training layout ``[T, Hkv, Pmax, D]`` (``block_size = Pmax``, ``block_table[t] = [t]``).
    """
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lens = list(prefix_lens) if prefix_lens is not None else [rnd.randint(0, 11) for _ in range(T)]
    T = len(lens)
    if dense_layout:
        block_size = max(lens + [1])
        table = torch.arange(T, dtype=torch.long)[:, None]
        num_blocks = T
    else:
        per_task = [-(-p // block_size) for p in lens]
        num_blocks = sum(per_task) + 2
        order = list(range(num_blocks))
        rnd.shuffle(order)
        table = torch.full((T, max(per_task + [1])), -1, dtype=torch.long)
        at = 0
        for t, n in enumerate(per_task):
            table[t, :n] = torch.tensor(order[at:at + n], dtype=torch.long)
            at += n
        if shared_block == "within":   # task 0 uses its first block twice
            assert per_task[0] >= 2
            table[0, 1] = table[0, 0]
        elif shared_block:             # task 1 reuses task 0's first block
            assert per_task[0] and per_task[1]
            table[1, 0] = table[0, 0]

    def randn(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
        return x.requires_grad_(grad)

    q = randn(B, Hq, Sq, D)
    k = randn(B, Hkv, Skv, D)
    v = randn(B, Hkv, Skv, D)
    pk = randn(num_blocks, Hkv, block_size, D)
    pv = randn(num_blocks, Hkv, block_size, D)
    tids = [rnd.randrange(T) for _ in range(B)]
    if B >= T:                       # every task present at least once
        tids[:T] = range(T)
        rnd.shuffle(tids)
    kw = dict(causal=causal, window=window)
    if padding != "none":
        q_lens, kv_lens, kv_starts = [], [], []
        for _ in range(B):
            real = rnd.randint(0, Skv)
            if padding == "left":
                q_lens.append(Sq); kv_lens.append(Skv); kv_starts.append(Skv - real)
            elif padding == "right":
                q_lens.append(min(Sq, real)); kv_lens.append(real); kv_starts.append(0)
            else:
                q_lens.append(rnd.randint(0, Sq)); kv_lens.append(real); kv_starts.append(rnd.randint(0, real))
        kw.update(q_lens=torch.tensor(q_lens, device=DEVICE), kv_lens=torch.tensor(kv_lens, device=DEVICE),
                  kv_starts=torch.tensor(kv_starts, device=DEVICE))
    args = (q, k, v, pk, pv, table.to(DEVICE), torch.tensor(lens, dtype=torch.long, device=DEVICE),
            torch.tensor(tids, dtype=torch.long, device=DEVICE))
    return args, kw


def run_with_grads(fn, args, kw, seed):
    """Output and the five gradients under a random upstream gradient (fresh leaves each call)."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) for a in args[:5]]
    out = fn(*leaves, *args[5:], **kw)
    diff = [a for a in leaves if a.requires_grad]
    if not diff:
        return out, []
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad((out * w).sum(), diff, allow_unused=True)
    return out, [torch.zeros_like(a) if gr is None else gr for a, gr in zip(diff, grads)]


def triton_public(*a, **kw):
    return prefix_attention(*a, backend="triton", **kw)


def triton_direct(*a, deterministic=None, config=None, **kw):
    return prefill_attention(validate_inputs(*a, **kw), deterministic=deterministic, config=config)


def reference(*a, **kw):
    return prefix_attention(*a, backend="reference", **kw)


def check(seed, args, kw, fn=triton_public, label=""):
    dtype = args[0].dtype
    out, grads = run_with_grads(fn, args, kw, seed)
    ref, ref_grads = run_with_grads(reference, args, kw, seed)
    ctx = f"seed={seed} {label} kw={ {k: v for k, v in kw.items() if not torch.is_tensor(v)} }"
    assert out.dtype == dtype and out.shape == ref.shape, ctx
    assert torch.isfinite(out).all(), f"non-finite output, {ctx}"
    torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"output: {m}\n{ctx}")
    names = [n for n, a in zip(DIFF, args[:5]) if a.requires_grad]
    for name, g, rg in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), f"non-finite d{name}, {ctx}"
        torch.testing.assert_close(g, rg, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}\n{ctx}")
    return out, grads


# --------------------------------------------------------------------------------------------
# Forward + all five gradients, through the public entry point
# --------------------------------------------------------------------------------------------

CASES = {
    # several tasks, prefix 0 and odd lengths, shuffled tables, GQA
    "tasks_p0_odd_gqa": dict(B=4, T=3, Hq=4, Hkv=2, prefix_lens=[0, 7, 3], block_size=3),
    "noncausal_mqa": dict(B=3, T=2, Hq=3, Hkv=1, causal=False, prefix_lens=[5, 9], block_size=4),
    "left_padding": dict(B=4, T=2, Hq=2, Hkv=2, padding="left", block_size=5, Skv=9, Sq=9),
    "right_padding": dict(B=4, T=3, padding="right", block_size=2, Skv=11, Sq=11),
    "ragged_noncausal": dict(B=4, T=3, Hq=4, Hkv=2, padding="ragged", causal=False, Sq=6, Skv=13),
    # blocks larger than a 16-row tile but not a multiple of it: tiles straddle blocks
    "short_q_long_cache": dict(B=3, T=2, Sq=3, Skv=19, block_size=20, prefix_lens=[37, 4]),
    "sq1_long_cache": dict(B=4, T=3, Hq=4, Hkv=1, Sq=1, Skv=17, padding="right"),
    "window_causal": dict(B=3, T=2, Sq=13, Skv=13, window=4, padding="left"),
    "window_noncausal": dict(B=2, T=2, Sq=9, Skv=9, window=3, causal=False, block_size=1),
    "head_dim_24_gqa3": dict(B=2, T=2, Hq=3, Hkv=1, D=24, Sq=11, Skv=11, prefix_lens=[13, 0]),
    "head_dim_32_odd_skv": dict(B=2, T=1, D=32, Sq=5, Skv=20, prefix_lens=[17], block_size=16),
    # the diagonal key of the second query tile is the first key of a tile (Sq = 16 + 1)
    "block_32_long_prefix": dict(B=3, T=2, Sq=17, Skv=17, prefix_lens=[20, 33], block_size=32),
    # longer than two 16-row tiles: fully masked tiles are skipped (causal, window, left padding)
    "tile_skipping_window": dict(B=2, T=2, Hq=2, Hkv=1, D=8, Sq=37, Skv=40, window=5, padding="left",
                                 prefix_lens=[3, 18], block_size=16),
    # query 15 sees key 16: the first query tile must still reach the second key tile
    "diag_tile_boundary": dict(B=2, T=2, Hq=2, Hkv=1, D=8, Sq=16, Skv=17, prefix_lens=[0, 2]),
    "dense_training_layout": dict(B=4, T=3, dense_layout=True, prefix_lens=[6, 1, 9], Sq=9, Skv=9),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_fp32(name):
    seed = fresh_seed()
    args, kw = make_problem(seed, **CASES[name])
    check(seed, args, kw, label=name)


FP16_CASES = ["tasks_p0_odd_gqa", "ragged_noncausal", "window_causal", "head_dim_24_gqa3"]


@pytest.mark.parametrize("name", FP16_CASES)
def test_matches_reference_fp16(name):
    seed = fresh_seed()
    args, kw = make_problem(seed, dtype=torch.float16, **CASES[name])
    check(seed, args, kw, label=name)


def test_random_mix_fp32():
    """A randomly drawn configuration (all knobs at once), different every run."""
    seed = fresh_seed()
    rnd = random.Random(seed)
    Hkv = rnd.choice([1, 2])
    Sq = rnd.randint(1, 18)
    cfg = dict(B=rnd.randint(1, 4), T=rnd.randint(1, 3), Hq=Hkv * rnd.choice([1, 2]), Hkv=Hkv, Sq=Sq,
               Skv=rnd.randint(Sq, 20), D=rnd.choice([8, 16, 24]), block_size=rnd.choice([1, 2, 3, 4, 7, 16]),
               padding=rnd.choice(["none", "left", "right", "ragged"]), causal=rnd.random() < 0.7,
               window=rnd.choice([None, None, 2, 5]))
    args, kw = make_problem(seed, **cfg)
    check(seed, args, kw, label=f"random {cfg}")


# --------------------------------------------------------------------------------------------
# The module directly (the dispatcher may route gradient-free short queries to decode kernels)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_direct_forward_no_grad_short_queries(dtype):
    seed = fresh_seed()
    args, kw = make_problem(seed, B=4, T=3, Hq=4, Hkv=2, Sq=2, Skv=9, padding="ragged", dtype=dtype, grad=False)
    with torch.no_grad():
        out = triton_direct(*args, **kw)
        ref = reference(*args, **kw)
    torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"{m}\nseed={seed}")


def test_direct_atomics_path_matches_reference():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=4, T=2, Hq=4, Hkv=2, Sq=6, Skv=6, block_size=3, padding="ragged")
    check(seed, args, kw, fn=lambda *a, **k: triton_direct(*a, deterministic=False, **k), label="atomics")


def test_direct_deterministic_path_is_bitwise_reproducible():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=4, T=2, Sq=5, Skv=5, prefix_lens=[6, 9], block_size=2)
    fn = lambda *a, **k: triton_direct(*a, deterministic=True, **k)  # noqa: E731
    o1, g1 = run_with_grads(fn, args, kw, seed)
    o2, g2 = run_with_grads(fn, args, kw, seed)
    assert torch.equal(o1, o2), f"seed={seed}"
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), f"seed={seed}"


def test_direct_larger_tiles_config():
    """The GPU tile sizes (64 x 64) also work, with prefix blocks larger and smaller than a tile."""
    seed = fresh_seed()
    args, kw = make_problem(seed, B=2, T=2, Sq=5, Skv=7, prefix_lens=[70, 3], block_size=5, padding="ragged")
    cfg = PrefillConfig(block_m=32, block_n=64, num_warps=1, num_stages=1)
    check(seed, args, kw, fn=lambda *a, **k: triton_direct(*a, config=cfg, **k), label="tiles 32x64")


@pytest.mark.parametrize("splits", [2, 3])
def test_direct_split_deterministic_prefix_backward(splits):
    """Each task's sequences split into chunks (fp32 partials summed in a fixed order), as on a GPU."""
    seed = fresh_seed()
    args, kw = make_problem(seed, B=5, T=2, Hq=2, Hkv=1, Sq=5, Skv=6, block_size=3, padding="ragged",
                            shared_block=splits == 3, prefix_lens=[5, 4])
    cfg = PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, prefix_splits=splits)
    fn = lambda *a, **k: triton_direct(*a, deterministic=True, config=cfg, **k)  # noqa: E731
    _, g1 = check(seed, args, kw, fn=fn, label=f"splits={splits}")
    _, g2 = run_with_grads(fn, args, kw, seed)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), f"not reproducible, seed={seed}"


def test_shared_block_between_tasks():
    """A block index in two tasks' tables: its gradient is the sum over both tasks."""
    seed = fresh_seed()
    args, kw = make_problem(seed, B=4, T=2, prefix_lens=[6, 5], block_size=3, shared_block=True)
    check(seed, args, kw, label="shared block")
    check(seed, args, kw, fn=lambda *a, **k: triton_direct(*a, deterministic=False, **k), label="shared atomics")
    args, kw = make_problem(seed, B=3, T=2, prefix_lens=[7, 2], block_size=3, shared_block="within")
    check(seed, args, kw, label="block twice in one table")


def test_frozen_prefix_only_qkv_grads():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=3, T=2, Sq=5, Skv=5)
    args = (*args[:3], args[3].detach(), args[4].detach(), *args[5:])
    check(seed, args, kw, label="frozen prefix")


def test_non_contiguous_inputs_and_strided_pool():
    """q/k/v in [B, S, H, D] memory order, a pool with padded rows, a strided block table."""
    seed = fresh_seed()
    args, kw = make_problem(seed, B=3, T=2, Hq=4, Hkv=2, Sq=6, Skv=8, D=8, prefix_lens=[5, 7], block_size=3,
                            grad=False)
    q, k, v, pk, pv, table, lens, tids = args
    q = q.transpose(1, 2).contiguous().transpose(1, 2)              # stride(-1) == 1, not contiguous
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)          # stride(-1) != 1: copied
    v = v.transpose(1, 2).contiguous().transpose(1, 2)
    big = torch.randn(pk.shape[0], pk.shape[1], pk.shape[2], 2 * pk.shape[3], device=DEVICE)
    big[..., :8] = pk
    pk = big[..., :8]                                                # padded rows, read in place
    pv = pv.transpose(-1, -2).contiguous().transpose(-1, -2)         # column-major rows, read in place
    wide = torch.full((table.shape[0], 2 * table.shape[1]), -7, dtype=table.dtype, device=DEVICE)
    wide[:, ::2] = table
    table = wide[:, ::2]                                             # non-unit column stride
    args = tuple(a.requires_grad_(True) for a in (q, k, v, pk, pv)) + (table, lens, tids)
    check(seed, args, kw, label="non-contiguous")


# --------------------------------------------------------------------------------------------
# Degenerate shapes and rows that see nothing
# --------------------------------------------------------------------------------------------

def test_rows_that_see_nothing_are_zero_with_zero_grads():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=3, T=2, Sq=5, Skv=5, prefix_lens=[0, 4])
    tids = torch.tensor([0, 0, 1], device=DEVICE)
    kw.update(q_lens=torch.tensor([5, 3, 2], device=DEVICE), kv_lens=torch.tensor([0, 5, 1], device=DEVICE),
              kv_starts=torch.tensor([0, 5, 1], device=DEVICE))
    args = (*args[:7], tids)
    out, grads = check(seed, args, kw, label="empty rows")
    assert (out[0] == 0).all() and (out[1] == 0).all(), f"seed={seed}"       # task 0: no prefix, no keys
    assert (out[2, :, 2:] == 0).all(), f"seed={seed}"                        # padding queries


def test_no_own_keys_skv_zero():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=3, T=2, Sq=4, Skv=0, prefix_lens=[3, 0], causal=False)
    out, _ = check(seed, args, kw, label="Skv=0")
    check(seed, args, kw, fn=triton_direct, label="Skv=0 direct")


def test_empty_batch_and_no_prefix_pool():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=0, T=2, Sq=4, Skv=4, prefix_lens=[3, 2])
    out, grads = run_with_grads(triton_direct, args, kw, seed)
    assert out.shape == (0, 2, 4, 16)
    assert all(g.abs().sum() == 0 for g in grads)
    # every prefix empty, pool with zero blocks, table of -1
    q, k, v = (torch.randn(2, 2, 3, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    pk = torch.zeros(0, 2, 4, 16, device=DEVICE, requires_grad=True)
    pv = torch.zeros(0, 2, 4, 16, device=DEVICE, requires_grad=True)
    args = (q, k, v, pk, pv, torch.full((2, 1), -1, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE),
            torch.tensor([1, 0], device=DEVICE))
    check(seed, args, dict(causal=True), label="empty pool")


def test_explicit_mask_falls_back_and_matches():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=2, T=2, Sq=4, Skv=6)
    kw["attn_mask"] = torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(seed)).to(DEVICE) > 0.3
    check(seed, args, kw, label="attn_mask")


def test_float64_falls_back_and_matches():
    seed = fresh_seed()
    args, kw = make_problem(seed, B=2, T=2, Sq=4, Skv=5, dtype=torch.float64)
    out, grads = run_with_grads(triton_direct, args, kw, seed)
    ref, ref_grads = run_with_grads(reference, args, kw, seed)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, msg=lambda m: f"{m}\nseed={seed}")
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, msg=lambda m: f"{m}\nseed={seed}")


def _nan_guarded(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """The same values, as a view into a NaN-filled buffer: any read outside ``t`` poisons the result."""
    shape = [n + 2 * pad for n in t.shape]
    big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
    view = big[tuple(slice(pad, pad + n) for n in t.shape)]
    view.copy_(t.detach())
    return view


@pytest.mark.parametrize("layout", ["more_queries_than_keys", "ragged_window"])
def test_no_out_of_bounds_reads(layout):
    """Inputs surrounded by NaN: the kernels never read outside them (in place, no copies)."""
    seed = fresh_seed()
    if layout == "more_queries_than_keys":   # causal band below key 0 for a whole query tile
        args, kw = make_problem(seed, B=2, T=2, Sq=20, Skv=3, prefix_lens=[0, 5], block_size=2, grad=False)
        kw.update(q_lens=torch.tensor([20, 19], device=DEVICE), kv_lens=torch.tensor([1, 3], device=DEVICE),
                  kv_starts=torch.tensor([0, 1], device=DEVICE))
    else:
        args, kw = make_problem(seed, B=3, T=2, Hq=2, Hkv=1, Sq=18, Skv=19, window=4, padding="ragged",
                                block_size=3, grad=False)
    guarded = [_nan_guarded(a).requires_grad_(True) for a in args[:5]]
    args = (*guarded, *args[5:])
    check(seed, args, kw, label=f"NaN-guarded {layout}")
    check(seed, args, kw, fn=lambda *a, **k: triton_direct(*a, deterministic=False, **k),
          label=f"NaN-guarded {layout} atomics")


def test_unused_pool_rows_are_never_read():
    """Pool rows no task uses (past prefix_lens[t] in a last block, unused blocks) hold NaN."""
    seed = fresh_seed()
    args, kw = make_problem(seed, B=3, T=3, Hq=2, Hkv=1, Sq=6, Skv=6, prefix_lens=[5, 0, 3], block_size=4,
                            padding="ragged")
    table, lens = args[5], args[6]
    pool_rows = torch.zeros(args[3].shape[0], args[3].shape[2], dtype=torch.bool, device=DEVICE)
    for t in range(table.shape[0]):
        for r in range(int(lens[t])):
            pool_rows[table[t, r // 4], r % 4] = True
    poisoned = []
    for a in args[3:5]:
        p = a.detach().clone()
        p.permute(0, 2, 1, 3)[~pool_rows] = float("nan")
        poisoned.append(p.requires_grad_(True))
    triton_args = (*args[:3], *poisoned, *args[5:])
    for deterministic in (True, False):
        fn = lambda *a, **k: triton_direct(*a, deterministic=deterministic, **k)  # noqa: E731
        out, grads = run_with_grads(fn, triton_args, kw, seed)
        ref, ref_grads = run_with_grads(reference, args, kw, seed)
        ctx = f"seed={seed} deterministic={deterministic}"
        torch.testing.assert_close(out, ref, **TOL[torch.float32], msg=lambda m: f"{m}\n{ctx}")
        for g, rg in zip(grads, ref_grads):
            assert torch.isfinite(g).all(), ctx
            torch.testing.assert_close(g, rg, **TOL[torch.float32], msg=lambda m: f"{m}\n{ctx}")


@pytest.mark.parametrize("deterministic", [True, False])
def test_keys_masked_for_some_queries_of_a_tile_never_reach_them(deterministic):
    """A key tile holds keys that are window- or causal-masked for some of its queries (and keys
    before kv_starts): NaN / inf there reached every query of the tile (0 x NaN in p @ v, and in
    dS @ k in the backward). Now only the queries that see one are NaN; the others and their
    gradients equal the clean reference."""
    from dataclasses import replace

    from cases import masked_key_poison_case
    seed = fresh_seed()
    clean, poisoned, kw, sees = masked_key_poison_case(seed)
    leaves = [t.clone().requires_grad_(True) for t in poisoned[:5]]
    clean_leaves = [t.clone().requires_grad_(True) for t in clean[:5]]
    x = validate_inputs(*leaves, *poisoned[5:], **kw)
    out = prefill_attention(x, deterministic=deterministic)
    want = reference(*clean_leaves, *clean[5:], **kw)
    assert out[:, :, sees].isnan().all() and torch.isfinite(out[:, :, ~sees]).all(), f"seed={seed}"
    torch.testing.assert_close(out[:, :, ~sees], want[:, :, ~sees], **TOL[torch.float32])
    got = torch.autograd.grad(out[:, :, ~sees].sum(), leaves)
    ref = torch.autograd.grad(want[:, :, ~sees].sum(), clean_leaves)
    for name, g, r in zip(DIFF, got, ref):
        torch.testing.assert_close(g, r, **TOL[torch.float32], msg=lambda m: f"d{name} seed={seed}: {m}")
    # The kernels read a block-table entry only for rows < prefix_lens[t]: junk past them is
    # never used to form an address (here handed to the kernels directly, unnormalised).
    junk = poisoned[5].clone()
    junk[1, 1] = 10 ** 9
    x = replace(validate_inputs(*clean, **kw), block_table=junk)
    torch.testing.assert_close(prefill_attention(x, deterministic=deterministic).detach(),
                               reference(*clean, **kw).detach(), **TOL[torch.float32])


# --------------------------------------------------------------------------------------------
# The shared jit helpers (kernels/triton_common.py) against the contract's dense masks
# --------------------------------------------------------------------------------------------

import types  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from softprompt.kernels.masks import own_key_visibility  # noqa: E402
from softprompt.kernels.triton_common import own_key_band, visible  # noqa: E402

PROBE_S, PROBE_TILE = 16, 4


@triton.jit
def _visibility_probe(VIS, BAND, q_len, kv_len, kv_start, window, S: tl.constexpr, TILE: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The visibility of every (query, own key) of one sequence, and the band of each query tile."""
    i = tl.arange(0, S)
    j = tl.arange(0, S)
    off = kv_len - q_len
    ok = (i < q_len)[:, None] & ((j >= kv_start) & (j < kv_len))[None, :]
    vis = visible(ok, (off + i)[:, None], j[None, :], window, CAUSAL, HAS_WINDOW)
    tl.store(VIS + i[:, None] * S + j[None, :], vis.to(tl.int32))
    for m_lo in tl.static_range(0, S, TILE):
        lo, hi = own_key_band(kv_start, kv_len, off, m_lo, tl.minimum(m_lo + TILE, q_len), window,
                              CAUSAL, HAS_WINDOW)
        tl.store(BAND + 2 * (m_lo // TILE), lo)
        tl.store(BAND + 2 * (m_lo // TILE) + 1, hi)


@st.composite
def _sequences(draw):
    kv_len = draw(st.integers(0, PROBE_S))
    return dict(kv_len=kv_len, q_len=draw(st.integers(0, kv_len)), kv_start=draw(st.integers(0, kv_len)),
                causal=draw(st.booleans()), window=draw(st.none() | st.integers(1, PROBE_S + 2)))


@given(seq=_sequences())
def test_shared_visibility_helpers_match_masks(seq):
    """``visible`` is the rule of ``masks.own_key_visibility``, and ``own_key_band`` of a query tile
    holds every key any of its queries sees (the kernels skip key tiles outside it)."""
    S, n_tiles = PROBE_S, PROBE_S // PROBE_TILE
    vis = torch.zeros((S, S), dtype=torch.int32)
    band = torch.zeros(2 * n_tiles, dtype=torch.int32)
    _visibility_probe[(1,)](vis, band, seq["q_len"], seq["kv_len"], seq["kv_start"], seq["window"] or 0,
                            S=S, TILE=PROBE_TILE, CAUSAL=seq["causal"], HAS_WINDOW=seq["window"] is not None)
    lens = lambda n: torch.tensor([n])  # noqa: E731
    x = types.SimpleNamespace(q=torch.zeros(1, 1, S, 1), q_len=S, kv_len=S, batch=1, attn_mask=None,
                              q_lens=lens(seq["q_len"]), kv_lens=lens(seq["kv_len"]),
                              kv_starts=lens(seq["kv_start"]), causal=seq["causal"], window=seq["window"],
                              derived={}, mask_planned=True)        # what a plan's inputs carry
    expected = own_key_visibility(x)[0, 0]
    assert torch.equal(vis.bool(), expected), f"{seq}\n{vis}\n{expected.int()}"
    keys = torch.arange(S)
    for tile in range(n_tiles):
        lo, hi = int(band[2 * tile]), int(band[2 * tile + 1])
        seen = expected[tile * PROBE_TILE:(tile + 1) * PROBE_TILE].any(0)
        assert 0 <= hi and lo <= hi, f"{seq} tile {tile}: band [{lo}, {hi})"
        assert not (seen & ((keys < lo) | (keys >= hi))).any(), f"{seq} tile {tile}: band [{lo}, {hi}) misses {seen}"
        if tile * PROBE_TILE >= seq["q_len"]:
            assert lo == hi, f"{seq} tile {tile}: a tile of padding rows scans [{lo}, {hi})"
