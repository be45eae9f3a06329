"""The dense-path options of the plan: ``softcap`` (plan option), ``bias`` and ``dropout_p`` /
``generator`` (run arguments). ``reference`` and ``torch`` (its dense path) are checked, forward and
gradients (bias included), against an eager per-sequence definition written out here in fp64 on
fresh random inputs (odd sizes, P = 0, GQA, padding, several tasks, explicit masks); ``triton``
and bad values are refused with a ValueError naming the option."""
import math

import pytest
import torch

from cases import Case, masked_key_poison_case, weighted_sum
from softprompt.kernels import available_backends, plan_prefix_attention, prefix_attention
from softprompt.kernels.inputs import check_layer_tensors, validate_inputs
from softprompt.kernels.masks import own_key_visibility

CASES = {
    "mixed_tasks_gqa": dict(B=3, T=3, Hq=4, Hkv=2, Sq=3, Skv=4, D=8, tasks=[2, 0, 2]),
    "prefix_zero_and_odd": dict(B=3, T=3, Hq=3, Hkv=1, Sq=5, Skv=5, D=5, block_size=3, prefix_lens=[0, 7, 2]),
    "no_prefix_at_all": dict(B=2, T=2, Hq=2, Hkv=2, Sq=3, Skv=3, D=8, prefix_lens=[0, 0]),
    "ragged_padding": dict(B=4, T=2, Hq=2, Hkv=1, Sq=4, Skv=6, D=7, padding="ragged"),
    "left_padding_window": dict(B=3, T=2, Hq=4, Hkv=2, Sq=5, Skv=5, D=8, padding="left", window=2),
    "explicit_mask": dict(B=3, T=2, Hq=2, Hkv=1, Sq=3, Skv=4, D=8, mask=True, causal=False),
}
TOL = {"reference": dict(atol=1e-5, rtol=1e-5), "torch": dict(atol=1e-5, rtol=1e-5)}


def plan_for(args, kw, backend, **options):
    return plan_prefix_attention(*args[5:], backend=backend, **kw, **options, **check_layer_tensors(*args[:5]))


def eager(args, kw, softcap, bias, dropout_p, seed):
    """The options' definition, one sequence at a time in fp64: scores = scale·q·kᵀ over
    [task prefix ; own keys], soft-capped, plus the bias on own columns, masked, softmax, and
    dropout with the keep mask ``rand([B, Hq, Sq, Pmax + Skv]) >= p`` of a generator seeded
    ``seed`` (Pmax: the longest prefix in the batch), rescaled by 1 / (1 - p)."""
    q, k, v, pk, pv, table, lens, tids = args
    x = validate_inputs(*args, **kw)
    own_visible = own_key_visibility(x)                     # the mask rule itself is tested elsewhere
    B, Hq, Sq, D = q.shape
    G = Hq // k.shape[1]
    rows = int(lens[tids].max()) if B else 0
    keep = None
    if dropout_p:
        gen = torch.Generator().manual_seed(seed)
        keep = (torch.rand(B, Hq, Sq, rows + k.shape[2], generator=gen) >= dropout_p).double() / (1 - dropout_p)
    outs = []
    for b in range(B):
        t = int(tids[b])
        P = int(lens[t])
        pos = torch.arange(P)
        blocks = table[t, pos // pk.shape[2]]
        keys = torch.cat([pk[blocks, :, pos % pk.shape[2]].transpose(0, 1), k[b]], 1).double()
        values = torch.cat([pv[blocks, :, pos % pk.shape[2]].transpose(0, 1), v[b]], 1).double()
        keys, values = keys.repeat_interleave(G, 0), values.repeat_interleave(G, 0)     # [Hq, P+Skv, D]
        s = q[b].double() @ keys.transpose(-1, -2) * x.scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + torch.cat([s.new_zeros(Hq, Sq, P), bias[b % bias.shape[0]].double().expand(Hq, -1, -1)], -1)
        real = (torch.arange(Sq) < x.q_lens[b])[:, None]
        vis = torch.cat([real.expand(Sq, P).expand(Hq, -1, -1), own_visible[b].expand(Hq, -1, -1)], -1)
        s = s.masked_fill(~vis, -math.inf)
        p = torch.where(vis.any(-1, keepdim=True), torch.softmax(s.masked_fill(~vis.any(-1, keepdim=True), 0), -1),
                        0.0)
        if keep is not None:
            p = p * torch.cat([keep[b, :, :, :P], keep[b, :, :, rows:]], -1)
        outs.append(p @ values)
    return torch.stack(outs) if outs else q.new_zeros(q.shape).double()


def _options(case, seed, bias_shape):
    g = torch.Generator().manual_seed(seed + 7)
    softcap = float(torch.empty(1).uniform_(0.5, 3.0, generator=g))
    B, H = bias_shape
    bias = (torch.randn(B, H, case.Sq, case.Skv, generator=g) * 2).requires_grad_()
    return softcap, bias


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_options_match_the_eager_definition(backend, name, seed):
    case = Case(seed=seed, **CASES[name])
    args, kw = case.build()
    B, Hq = case.B, case.Hq
    for softcap, bias_shape, dropout_p in ((True, (B, Hq), 0.0), (None, (1, 1), 0.0), (True, (B, 1), 0.4),
                                           (None, None, 0.3)):
        cap, bias = _options(case, seed, bias_shape or (1, 1))
        cap = cap if softcap else None
        bias = bias if bias_shape else None
        plan = plan_for(args, kw, backend, softcap=cap)
        gen = torch.Generator().manual_seed(seed + 3)
        leaves = [*args[:5]] + ([bias] if bias is not None else [])
        got = plan.run(*args[:5], bias=bias, dropout_p=dropout_p, generator=gen)
        want = eager(args, kw, cap, bias, dropout_p, seed + 3)
        label = f"{case} softcap={cap} bias={bias_shape} p={dropout_p}"
        torch.testing.assert_close(got.double(), want, **TOL[backend], msg=lambda m: f"out {label}: {m}")
        g_got = torch.autograd.grad(weighted_sum(got, seed), leaves, allow_unused=True)
        g_want = torch.autograd.grad(weighted_sum(want, seed), leaves, allow_unused=True)
        for i, (a, w) in enumerate(zip(g_got, g_want)):
            a = torch.zeros_like(leaves[i]) if a is None else a
            w = torch.zeros_like(leaves[i]) if w is None else w
            torch.testing.assert_close(a.double(), w.double(), **TOL[backend],
                                       msg=lambda m: f"grad {i} {label}: {m}")


def test_half_precision_dense_path_matches_reference(seed):
    """fp16 on the torch backend's dense path (products in fp16, softmax in fp32) against the
    reference (all fp32), with every option and a padded, windowed GQA batch."""
    case = Case(seed=seed, **CASES["left_padding_window"], dtype=torch.float16)
    args, kw = case.build()
    cap, bias = _options(case, seed, (case.B, 1))
    outs = []
    for backend in ("reference", "torch"):
        gen = torch.Generator().manual_seed(seed)
        plan = plan_for(args, kw, backend, softcap=cap)
        outs.append(plan.run(*args[:5], bias=bias.half(), dropout_p=0.2, generator=gen))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)


def test_without_options_the_fast_paths_run_and_agree(seed):
    """bias=None, dropout_p=0, softcap=None: the ordinary backends (a tiny softcap-free check that
    the option plumbing changes nothing), and a huge softcap approaches no capping."""
    case = Case(seed=seed, **CASES["ragged_padding"])
    args, kw = case.build()
    want = prefix_attention(*args, backend="reference", **kw)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(plan_for(args, kw, backend).run(*args[:5], dropout_p=0.0), want,
                                   atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(plan_for(args, kw, backend, softcap=1e6).run(*args[:5]), want,
                                   atol=2e-5, rtol=1e-4)


def test_dense_path_ignores_junk_table_tails_and_invisible_poison(seed):
    """Unused block-table entries past the pool and NaN / inf in keys a query cannot see never
    reach it on the dense path; a query that sees one returns NaN; gradients stay finite."""
    clean, poisoned, kw, sees = masked_key_poison_case(seed % 1000)
    q, k, v, pk, pv, table, lens, tids = poisoned
    junk = table.clone()
    junk[1, 1] = 10 ** 6                                   # task 1 uses one block; task 0 uses two
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    args = (*leaves, pk, pv, junk, lens, tids)
    bias = torch.zeros(1, 1, q.shape[2], k.shape[2])
    out = plan_for(args, kw, "torch", softcap=50.0).run(*args[:5], bias=bias)
    want = prefix_attention(*clean, **kw, backend="reference")
    assert out[:, :, sees].isnan().all()
    torch.testing.assert_close(out[:, :, ~sees], want[:, :, ~sees], atol=1e-3, rtol=1e-3)   # softcap 50 ~ none
    grads = torch.autograd.grad(out[:, :, ~sees].sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_paged_own_keys_with_options(seed):
    """Options compose with paged own keys (the plan gathers the pages for the dense path)."""
    case = Case(seed=seed, B=3, T=2, Hq=2, Hkv=1, Sq=1, Skv=6, D=8, padding="right")
    args, kw = case.build()
    q, k, v = (t.detach() for t in args[:3])
    ps = 4
    pages = -(-case.Skv // ps)
    table = torch.randperm(case.B * pages).view(case.B, pages)
    pool_k = k.new_zeros(case.B * pages, *_page_shape(k, ps))
    pool_v = torch.zeros_like(pool_k)
    pool_k[table.flatten()] = _pages(k, ps)
    pool_v[table.flatten()] = _pages(v, ps)
    plan = plan_prefix_attention(*args[5:], backend="torch", own_page_table=table, own_page_size=ps,
                                 own_num_pages=case.B * pages, softcap=2.0, **kw,
                                 **check_layer_tensors(q, k, v, *args[3:5]))
    got = plan.run(q, pool_k, pool_v, *args[3:5], bias=torch.ones(1, 1, 1, case.Skv))
    want = plan_for(args, kw, "reference", softcap=2.0).run(q, k, v, *args[3:5], bias=torch.ones(1, 1, 1, case.Skv))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _page_shape(k, ps):
    """A page of the contract's pools: token-major ``[page_size, Hkv, D]``."""
    return (ps, k.shape[1], k.shape[3])


def _pages(k, ps):
    """``k [B, Hkv, S, D]`` cut into pages of ``_page_shape``, row-major over (row, page)."""
    B, H, S, D = k.shape
    n = -(-S // ps)
    padded = torch.nn.functional.pad(k, (0, 0, 0, n * ps - S))
    return padded.view(B, H, n, ps, D).permute(0, 2, 3, 1, 4).reshape(B * n, ps, H, D)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("softcap", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_softcap_is_refused(softcap):
    args, kw = Case(seed=0, **CASES["mixed_tasks_gqa"]).build()
    with pytest.raises(ValueError, match="`softcap`"):
        plan_for(args, kw, "torch", softcap=softcap)


def test_bad_bias_and_dropout_are_refused():
    case = Case(seed=0, **CASES["mixed_tasks_gqa"])
    args, kw = case.build()
    plan = plan_for(args, kw, "torch")
    B, Hq, Sq, Skv = case.B, case.Hq, case.Sq, case.Skv
    for bias, what in ((torch.zeros(B, Hq, Sq, Skv + 1), r"with shape"), (torch.zeros(2, 1, Sq, Skv), r"with shape"),
                       (torch.zeros(B, 3, Sq, Skv), r"with shape"), (torch.zeros(B, Sq, Skv), r"rank"),
                       (torch.zeros(B, 1, Sq, Skv, dtype=torch.long), r"dtype"), ([0.0], r"type")):
        with pytest.raises(ValueError, match=rf"`bias`.*{what}"):
            plan.run(*args[:5], bias=bias)
    for p in (1.0, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match="`dropout_p`"):
            plan.run(*args[:5], dropout_p=p)
    with pytest.raises(ValueError, match="`generator`"):
        plan.run(*args[:5], dropout_p=0.1, generator=0)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="Triton interpreter not available")
def test_triton_refuses_the_options():
    args, kw = Case(seed=0, **CASES["mixed_tasks_gqa"], requires_grad=False).build()
    with pytest.raises(ValueError, match="`softcap`.*triton"):
        plan_for(args, kw, "triton", softcap=2.0)
    plan = plan_for(args, kw, "triton")
    with pytest.raises(ValueError, match="`bias`.*triton"):
        plan.run(*args[:5], bias=torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="`dropout_p`.*triton"):
        plan.run(*args[:5], dropout_p=0.1)
