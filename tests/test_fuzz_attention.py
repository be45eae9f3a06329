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

Paged own keys (the engine's token-major pages) are fuzzed the same way through plan/run on the
backends that take them, the compiled one included, with poisoned unused pages and junk table tails.

Default profile: fast (the Triton interpreter gets fewer, tinier examples); ``--hypothesis-profile
=long`` searches deeper.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cases import weighted_sum
from paging import paged
from softprompt.kernels import available_backends, plan_prefix_attention, prefix_attention, validate_inputs
from softprompt.kernels.inputs import check_layer_tensors
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


# found by this test: fp16, an empty row whose invisible own key is NaN; the split-flash backward gave
# NaN for dk (0 x NaN in the scores) until it declined non-finite keys
EMPTY_ROW_NAN_KEY = {"seed": 0, "B": 1, "T": 1, "Hkv": 1, "G": 1, "Sq": 1, "Skv": 1, "D": 1, "block_size": 1,
                     "prefix_lens": [0], "tasks": [0], "lengths": True, "q_lens": [0], "kv_lens": [0],
                     "kv_starts": [0], "causal": False, "window": None, "mask": None, "half": True, "junk": False,
                     "spare_blocks": 0, "spare_cols": 0}


@given(p=problems(), grad=st.booleans())
@example(p=EMPTY_ROW_NAN_KEY, grad=True)
def test_torch_on_poisoned_inputs_matches_clean_reference(p, grad):
    # grad=False takes the fused CPU flash path, grad=True the differentiable one
    check_against_clean_reference("torch", p, grad)


needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="Triton interpreter unavailable")
needs_compiled = pytest.mark.skipif("compiled" not in available_backends("cpu"),
                                    reason="the compiled backend does not build here")


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


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton),
                                     pytest.param("compiled", marks=needs_compiled)])
@settings(max_examples=10)
@given(p=problems(max_b=2, max_s=5, fp16=False), grad=st.booleans(), data=st.data())
def test_only_queries_that_see_a_non_finite_key_are_non_finite(backend, p, grad, data):
    # grad picks the path: torch differentiable / fused, triton prefill / decode (compiled: no grad)
    if backend in ("triton", "compiled"):
        p["mask"] = None
    grad = grad and backend != "compiled"
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


# ------------------------------------------------------------------------------------- paged
@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("compiled", marks=needs_compiled)])
@given(p=problems(fp16=False, mask=False), page_size=st.integers(1, 4))
def test_paged_own_keys_on_poisoned_pages_match_clean_reference(backend, p, page_size):
    """Own keys in shuffled token-major pages (the engine's layout): the keys no query sees and every
    slot no row uses are poison, unused page-table entries junk; the plan's result must be the clean
    reference's."""
    args, kw = build(p)
    poisoned = poison_invisible(args, kw, p["seed"] + 1)
    B, _, Skv, _ = args[1].shape
    kv_lens = kw.get("kv_lens", torch.full((B,), Skv, dtype=torch.long))
    (kpool, vpool), table = paged(poisoned[1], poisoned[2], kv_lens, page_size, p["seed"], junk_tail=p["junk"])
    plan = plan_prefix_attention(*poisoned[5:], **kw, **check_layer_tensors(*args[:5]), own_page_table=table,
                                 own_page_size=page_size, own_num_pages=kpool.shape[0], backend=backend)
    want = prefix_attention(*args, **kw, backend="reference")
    with torch.no_grad():
        got = plan.run(poisoned[0], kpool, vpool, *poisoned[3:5])
    torch.testing.assert_close(got, want, **tolerances(False), msg=lambda m: f"{backend}, {p}: {m}")


# ------------------------------------------------------------------------------------- targeted
