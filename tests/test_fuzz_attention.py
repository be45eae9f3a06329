"""Property-based fuzzing of the attention contract (hypothesis).

Random shapes (B = 0/1/more, GQA, Sq = 0, Skv = 0, odd D), lengths (q_lens, kv_lens, kv_starts),
shuffled block tables whose unused tails hold junk (-1, ids past the pool), prefix length 0, task
mixes, causal / window / attn_mask, fp32 and fp16, and *poison*: NaN / inf written into everything
a query cannot see (own keys outside every query's view, the rest of a prefix's last block, pool
blocks no task uses, padding queries). Every CPU backend on the poisoned inputs must match the
``reference`` backend on the clean ones, forward and gradients (q, k, v, prefix pools); and
``reference`` itself must not be moved by the poison. A second property poisons *any* keys: a
query that sees a non-finite key or value returns a non-finite row, every other query is
untouched.

The engine's paged attention (``DecodeAttention``, the compiled ``PagedAttention``) is fuzzed the
same way with poisoned unused pages and junk table tails.

Default profile: fast (the Triton interpreter gets fewer, tinier examples); ``--hypothesis-profile
=long`` searches deeper.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import weighted_sum
from softprompt.kernels import available_backends, prefix_attention, validate_inputs
from softprompt.kernels.masks import own_key_visibility

POISONS = (float("nan"), float("inf"), float("-inf"))


# ------------------------------------------------------------------------------------- problems
@st.composite
def problems(draw, max_b=3, max_s=6, fp16=True, mask=True):
    """The drawn parameters of one problem (``build`` turns them into tensors)."""
    T = draw(st.integers(1, 3))
    B = draw(st.integers(0, max_b))
    Sq, Skv = draw(st.integers(0, max_s)), draw(st.integers(0, max_s))
    kv_lens = draw(st.lists(st.integers(0, Skv), min_size=B, max_size=B))
    return dict(
        seed=draw(st.integers(0, 2 ** 31 - 1)), B=B, T=T, Hkv=draw(st.sampled_from([1, 2])),
        G=draw(st.sampled_from([1, 2, 3])), Sq=Sq, Skv=Skv, D=draw(st.sampled_from([1, 3, 5, 8])),
        block_size=draw(st.integers(1, 4)), prefix_lens=draw(st.lists(st.integers(0, 9), min_size=T, max_size=T)),
        tasks=draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B)),
        lengths=draw(st.booleans()), q_lens=draw(st.lists(st.integers(0, Sq), min_size=B, max_size=B)),
        kv_lens=kv_lens, kv_starts=[draw(st.integers(0, n)) for n in kv_lens],
        causal=draw(st.booleans()), window=draw(st.none() | st.integers(1, 4)),
        mask=draw(st.sampled_from([None, 1, "per_head"])) if mask else None,
        half=fp16 and draw(st.integers(0, 3)) == 0, junk=draw(st.booleans()),
        spare_blocks=draw(st.integers(0, 2)), spare_cols=draw(st.integers(0, 1)))


def build(p):
    """``(args, kwargs)`` for ``prefix_attention``: clean fp tensors, a shuffled block table whose
    unused entries are -1 or junk past the pool."""
    g = torch.Generator().manual_seed(p["seed"])
    rnd = random.Random(p["seed"])
    B, T, Hkv, G, Sq, Skv, D, bs = (p[n] for n in ("B", "T", "Hkv", "G", "Sq", "Skv", "D", "block_size"))
    used = [-(-n // bs) for n in p["prefix_lens"]]
    num_blocks = sum(used) + p["spare_blocks"]
    order = list(range(num_blocks))
    rnd.shuffle(order)
    width = max(used + [0]) + p["spare_cols"]
    table = torch.full((T, width), -1, dtype=torch.long)
    at = 0
    for t, n in enumerate(used):
        table[t, :n] = torch.tensor(order[at:at + n], dtype=torch.long)
        if p["junk"]:
            table[t, n:] = torch.tensor([rnd.choice([-5, -1, num_blocks, num_blocks + 7, 10 ** 6])
                                         for _ in range(width - n)], dtype=torch.long)
        at += n
    dtype = torch.float16 if p["half"] else torch.float32
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    args = (randn(B, Hkv * G, Sq, D), randn(B, Hkv, Skv, D), randn(B, Hkv, Skv, D),
            randn(num_blocks, Hkv, bs, D), randn(num_blocks, Hkv, bs, D), table,
            torch.tensor(p["prefix_lens"], dtype=torch.long), torch.tensor(p["tasks"], dtype=torch.long))
    kw = dict(causal=p["causal"], window=p["window"])
    if p["lengths"]:
        kw.update(q_lens=torch.tensor(p["q_lens"], dtype=torch.long).view(B),
                  kv_lens=torch.tensor(p["kv_lens"], dtype=torch.long).view(B),
                  kv_starts=torch.tensor(p["kv_starts"], dtype=torch.long).view(B))
    if p["mask"] is not None:
        heads = Hkv * G if p["mask"] == "per_head" else 1
        kw["attn_mask"] = torch.rand(B, heads, Sq, Skv, generator=g) > 0.3
    return args, kw


def visibility(args, kw):
    """What the real queries can see: own keys ``[B, Hkv, Skv]`` (by any query of any head of the
    group), prefix rows of the pools ``[num_blocks, block_size]``, real queries ``[B, Sq]``."""
    x = validate_inputs(*args, **kw)
    B, Hkv, Skv, G, Sq = x.batch, x.num_kv_heads, x.kv_len, x.group_size, x.q_len
    own = own_key_visibility(x)                                         # [B, 1|Hq, Sq, Skv]
    own = own.expand(B, Hkv * G, Sq, Skv).reshape(B, Hkv, G * Sq, Skv).any(2)
    real = torch.arange(Sq)[None, :] < x.q_lens[:, None]
    rows = torch.zeros(x.prefix_k.shape[0], x.block_size, dtype=torch.bool)
    table, lens = args[5], args[6]
    for b in range(B):
        if bool(real[b].any()):
            t = int(x.task_ids[b])
            for r in range(int(lens[t])):
                rows[int(table[t, r // x.block_size]), r % x.block_size] = True
    return own, rows, real


def poison_invisible(args, kw, seed):
    """Copies of q, k, v, prefix_k, prefix_v with NaN / +-inf wherever no query may look."""
    own, rows, real = visibility(args, kw)
    rnd = torch.Generator().manual_seed(seed)
    q, k, v, pk, pv = (a.clone() for a in args[:5])

    def fill(t, where):
        values = torch.tensor(POISONS, dtype=t.dtype)[torch.randint(0, 3, t.shape, generator=rnd)]
        return torch.where(where, values, t)

    q = fill(q, ~real[:, None, :, None].expand(q.shape))
    k = fill(k, ~own[..., None].expand(k.shape))
    v = fill(v, ~own[..., None].expand(v.shape))
    hidden = ~rows[:, None, :, None].expand(pk.shape)
    return (q, k, v, fill(pk, hidden), fill(pv, hidden), *args[5:])


def run(backend, args, kw, grad, seed):
    """Output and (with ``grad``) gradients w.r.t. q, k, v, prefix_k, prefix_v."""
    leaves = [a.detach().clone().requires_grad_(grad) for a in args[:5]]
    with torch.set_grad_enabled(grad):
        out = prefix_attention(*leaves, *args[5:], **kw, backend=backend)
    if not grad:
        return out, []
    grads = torch.autograd.grad(weighted_sum(out.float(), seed), leaves, allow_unused=True)
    return out, [torch.zeros_like(a) if d is None else d for a, d in zip(leaves, grads)]


def tolerances(half):
    return dict(atol=2e-2, rtol=2e-2) if half else dict(atol=2e-4, rtol=2e-4)


def check_against_clean_reference(backend, p, grad):
    args, kw = build(p)
    poisoned = poison_invisible(args, kw, p["seed"] + 1)
    want, want_grads = run("reference", args, kw, grad, p["seed"])
    got, got_grads = run(backend, poisoned, kw, grad, p["seed"])
    tol = tolerances(p["half"])
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{backend} output, {p}: {m}")
    for name, a, b in zip(("q", "k", "v", "prefix_k", "prefix_v"), got_grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{backend} d{name}, {p}: {m}")


# ------------------------------------------------------------------------------------- properties
@given(p=problems())
def test_reference_is_not_moved_by_invisible_poison(p):
    check_against_clean_reference("reference", p, grad=True)


@given(p=problems(), grad=st.booleans())
def test_torch_on_poisoned_inputs_matches_clean_reference(p, grad):
    # grad=False takes the fused CPU flash path, grad=True the differentiable one
    check_against_clean_reference("torch", p, grad)


needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="Triton interpreter unavailable")


@needs_triton
@settings(max_examples=8)
@given(p=problems(max_b=2, max_s=5, mask=False), grad=st.booleans())
def test_triton_on_poisoned_inputs_matches_clean_reference(p, grad):
    # grad=False takes the decode kernels (Sq <= 16), grad=True the prefill forward + backward
    check_against_clean_reference("triton", p, grad)


def sees_bad(args, kw, k_bad, p_bad):
    """``[B, Hq, Sq]`` queries that see a poisoned own key (``k_bad [B, Hkv, Skv]``) or prefix row
    (``p_bad [num_blocks, Hkv, block_size]``), from the visibility rule itself."""
    x = validate_inputs(*args, **kw)
    B, Hq, Sq, G = x.batch, x.num_q_heads, x.q_len, x.group_size
    own = own_key_visibility(x).expand(B, Hq, Sq, x.kv_len)
    hit = (own & k_bad.repeat_interleave(G, 1)[:, :, None, :]).any(-1)
    real = torch.arange(Sq)[None, :] < x.q_lens[:, None]
    for b in range(B):
        t = int(x.task_ids[b])
        rows = torch.arange(int(x.prefix_lens[t]))
        seen = p_bad[args[5][t, rows // x.block_size], :, rows % x.block_size].any(0)     # [Hkv]
        hit[b] |= seen.repeat_interleave(G)[:, None] & real[b][None, :]
    return hit


@pytest.mark.parametrize("backend", ["reference", "torch",
                                     pytest.param("triton", marks=needs_triton)])
@settings(max_examples=10)
@given(p=problems(max_b=2, max_s=5, fp16=False), grad=st.booleans(), data=st.data())
def test_only_queries_that_see_a_non_finite_key_are_non_finite(backend, p, grad, data):
    # grad picks the path: torch differentiable / fused, triton prefill / decode
    if backend == "triton":
        p["mask"] = None
    args, kw = build(p)
    g = torch.Generator().manual_seed(p["seed"] + 2)
    rate = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    k_nan = torch.rand(args[1].shape[:3], generator=g) < rate
    v_inf = torch.rand(args[1].shape[:3], generator=g) < rate
    p_bad = torch.rand(args[3].shape[:3], generator=g) < rate
    k, v, pk = args[1].clone(), args[2].clone(), args[3].clone()
    k[k_nan], v[v_inf], pk[p_bad] = float("nan"), float("-inf"), float("inf")
    leaves = [t.clone().requires_grad_(grad) for t in (args[0], k, v, pk, args[4])]
    with torch.set_grad_enabled(grad):
        got = prefix_attention(*leaves, *args[5:], **kw, backend=backend).detach()
    clean = prefix_attention(*args, **kw, backend="reference")
    expect_nan = sees_bad(args, kw, k_nan | v_inf, p_bad)
    # NaN, or +-inf where the kernels let a visible infinite value through unflagged
    assert torch.equal(~torch.isfinite(got).all(-1), expect_nan), f"{backend}: rows differ from what sees poison, {p}"
    torch.testing.assert_close(got.masked_fill(expect_nan[..., None], 0), clean.masked_fill(expect_nan[..., None], 0),
                               **tolerances(False))


# ------------------------------------------------------------------------------------- engine
@st.composite
def decode_problems(draw):
    T = draw(st.integers(1, 3))
    B = draw(st.integers(1, 4))
    Skv = draw(st.integers(1, 8))
    return dict(seed=draw(st.integers(0, 2 ** 31 - 1)), B=B, T=T, Hkv=draw(st.sampled_from([1, 2])),
                G=draw(st.sampled_from([1, 2, 3])), D=draw(st.sampled_from([1, 3, 8])), Skv=Skv,
                own=draw(st.lists(st.integers(1, Skv), min_size=B, max_size=B)),
                block_size=draw(st.integers(1, 4)), page_size=draw(st.integers(1, 4)),
                prefix_lens=draw(st.lists(st.integers(0, 9), min_size=T, max_size=T)),
                tasks=draw(st.lists(st.integers(-1, T - 1), min_size=B, max_size=B)),
                window=draw(st.none() | st.integers(1, 4)), split=draw(st.booleans()))


def decode_case(p):
    """One decode step (one query per row, own keys right-aligned), its clean reference output,
    and the poisoned pieces the engine reads: own K/V with NaN in hidden columns, prefix pools
    with NaN in every row no task reads, a block table with junk in unused entries."""
    base = dict(p, Sq=1, spare_blocks=1, spare_cols=1, junk=True, lengths=False, causal=False, mask=None,
                half=False, tasks=[max(t, 0) for t in p["tasks"]])
    args, _ = build(base)
    q, k, v, pk, pv, table, lens, tids = args
    B, Skv = p["B"], p["Skv"]
    own = torch.tensor(p["own"])
    has = torch.tensor(p["tasks"]) >= 0
    kw = dict(causal=False, kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), window=p["window"])
    # rows without a task see an empty prefix: an extra task of length 0 in the reference
    want = prefix_attention(q, k, v, pk, pv, torch.cat([table, torch.zeros_like(table[:1])]),
                            torch.cat([lens, torch.zeros(1, dtype=torch.long)]), torch.where(has, tids, p["T"]),
                            **kw, backend="reference")
    own_seen, _, _ = visibility((q, k, v, pk, pv, table, lens, tids), kw)
    g = torch.Generator().manual_seed(p["seed"] + 3)
    nan_k = k.masked_fill(~own_seen[..., None], float("nan"))
    nan_v = v.masked_fill(~own_seen[..., None], float("inf"))
    read = torch.zeros(pk.shape[0], pk.shape[2], dtype=torch.bool)
    for b in range(B):
        if p["tasks"][b] >= 0:
            t = p["tasks"][b]
            for r in range(int(lens[t])):
                read[int(table[t, r // p["block_size"]]), r % p["block_size"]] = True
    hidden = ~read[:, None, :, None].expand(pk.shape)
    pk = pk.masked_fill(hidden, float("nan"))
    pv = pv.masked_fill(hidden & (torch.rand(pv.shape, generator=g) < 0.5), float("-inf"))
    return dict(q=q, k=nan_k, v=nan_v, pk=pk, pv=pv, table=table, lens=lens, tids=tids, has=has, own=own,
                want=want)


@given(p=decode_problems())
def test_decode_attention_ignores_poisoned_pages(p):
    from softprompt.engine.decode_attention import DecodeAttention, split_by_length
    c = decode_case(p)
    B, Hkv, G, D, Skv = p["B"], p["Hkv"], p["G"], p["D"], p["Skv"]
    token_major = lambda t: t.permute(0, 2, 1, 3).reshape(B, Skv, Hkv * D)   # noqa: E731
    own_k, own_v = token_major(c["k"]), token_major(c["v"])
    parts = split_by_length(c["own"], Skv, min_saving=0.0) if p["split"] else [(None, Skv)]
    own_kv = [(own_k, own_v) if rows is None else (own_k[rows][:, Skv - width:], own_v[rows][:, Skv - width:])
              for rows, width in parts]
    # DecodeAttention takes store task ids; rows without a prefix point at an empty task
    tids = torch.where(c["has"], c["tids"], p["T"])
    table = torch.cat([c["table"], torch.full((1, c["table"].shape[1]), -3, dtype=torch.long)])
    lens = torch.cat([c["lens"], torch.zeros(1, dtype=torch.long)])
    attention = DecodeAttention(tids, table, lens, p["block_size"], c["own"], Skv, num_kv_heads=Hkv,
                                group_size=G, scale=D ** -0.5, window=p["window"], parts=parts)
    got = attention(c["q"].view(B, Hkv, G, D), own_kv, c["pk"], c["pv"])
    torch.testing.assert_close(got.reshape(B, Hkv * G, 1, D), c["want"], atol=2e-5, rtol=1e-4,
                               msg=lambda m: f"{p}: {m}")


def _paged_pools(p, k, v, own, junk_rng):
    """Row b's ``own[b]`` tokens (the last of ``k, v [B, Hkv, Skv, D]``) in scattered pages of a
    token-major pool whose other slots are NaN; page-table tails hold junk."""
    B, Hkv, Skv, D = k.shape
    ps = p["page_size"]
    per_row = [-(-int(n) // ps) for n in own]
    order = list(range(sum(per_row) + 2))
    junk_rng.shuffle(order)
    width = max(per_row) + 1
    pages = torch.tensor([[junk_rng.choice([-1, -9, 10 ** 6]) for _ in range(width)] for _ in range(B)])
    pool_k = torch.full((len(order) * ps, Hkv, D), float("nan"))
    pool_v = torch.full_like(pool_k, float("inf"))
    at = 0
    for b, n in enumerate(own.tolist()):
        pages[b, :per_row[b]] = torch.tensor(order[at:at + per_row[b]])
        at += per_row[b]
        for t in range(n):
            slot = int(pages[b, t // ps]) * ps + t % ps
            pool_k[slot], pool_v[slot] = k[b, :, Skv - n + t], v[b, :, Skv - n + t]
    return pool_k, pool_v, pages


@given(p=decode_problems())
def test_compiled_paged_attention_ignores_poisoned_pages_and_junk_tails(p):
    from softprompt.engine import cpu_kernel
    if cpu_kernel.load() is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_kernel.unavailable_reason()}")
    c = decode_case(p)
    B, Hkv, G, D = p["B"], p["Hkv"], p["G"], p["D"]
    pool_k, pool_v, pages = _paged_pools(p, c["k"], c["v"], c["own"], random.Random(p["seed"]))
    attention = cpu_kernel.PagedAttention(pages, c["own"], p["page_size"], torch.where(c["has"], c["tids"], -1),
                                          c["table"], c["lens"], p["block_size"], num_kv_heads=Hkv, group_size=G,
                                          head_dim=D, scale=D ** -0.5, window=p["window"], num_threads=2)
    got = attention(c["q"].view(B, Hkv, G, D), pool_k, pool_v, c["pk"], c["pv"])
    torch.testing.assert_close(got.reshape(B, Hkv * G, 1, D), c["want"], atol=2e-5, rtol=1e-4,
                               msg=lambda m: f"{p}: {m}")


# ------------------------------------------------------------------------------------- targeted
def test_decode_attention_hidden_columns_may_hold_nan():
    """DecodeAttention's own part: left padding / keys outside the window are hidden with an -inf
    bias, but NaN + -inf is NaN and the block-diagonal product multiplies every key by zeros."""
    from softprompt.engine.decode_attention import DecodeAttention
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, Skv = 3, 2, 2, 8, 6
    own = torch.tensor([6, 2, 4])
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, Skv, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g)
    kw = dict(causal=False, kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), window=3)
    empty = (torch.zeros(0, Hkv, 1, D), torch.zeros(0, Hkv, 1, D), torch.zeros(1, 0, dtype=torch.long),
             torch.zeros(1, dtype=torch.long), torch.zeros(B, dtype=torch.long))
    want = prefix_attention(q, k, v, *empty, **kw, backend="reference")
    hidden = torch.arange(Skv)[None, :] < (Skv - own.clamp_max(3))[:, None]          # [B, Skv]
    k2 = k.masked_fill(hidden[:, None, :, None], float("nan"))
    v2 = v.masked_fill(hidden[:, None, :, None], float("inf"))
    token_major = lambda t: t.permute(0, 2, 1, 3).reshape(B, Skv, Hkv * D)   # noqa: E731
    attention = DecodeAttention(None, empty[2], empty[3], 1, own, Skv, num_kv_heads=Hkv, group_size=G,
                                scale=D ** -0.5, window=3)
    got = attention(q.view(B, Hkv, G, D), [(token_major(k2), token_major(v2))], empty[0], empty[1])
    torch.testing.assert_close(got.reshape(B, Hkv * G, 1, D), want, atol=2e-5, rtol=1e-4)
    v2[0, 1, Skv - 1, 0] = float("nan")                    # a visible NaN: kv head 1 of row 0 only
    got = attention(q.view(B, Hkv, G, D), [(token_major(k2), token_major(v2))], empty[0], empty[1])
    assert got[0, 1].isnan().all() and torch.isfinite(got[0, 0]).all() and torch.isfinite(got[1:]).all()
