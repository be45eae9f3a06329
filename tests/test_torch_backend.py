"""The no-copy ``torch`` backend against the materialising ``reference`` backend."""
import pytest
import torch

from cases import Case, outputs_and_grads
from softprompt.kernels import prefix_attention

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]


def assert_matches_reference(case: Case, backend="torch", atol=2e-5, rtol=1e-4):
    args, kw = case.build()
    ref = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="reference", **k), args, kw, case.seed)
    got = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend=backend, **k), args, kw, case.seed)
    for name, r, g in zip(NAMES, [ref[0], *ref[1]], [got[0], *got[1]]):
        assert torch.isfinite(g).all(), f"{name} has NaN/inf ({case})"
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name} differs for {case}: {m}")


CASES = {
    "mixed_tasks_gqa": dict(B=6, T=4, Hq=6, Hkv=2),
    "mha": dict(Hq=3, Hkv=3),
    "mqa": dict(Hq=4, Hkv=1),
    "prefix_zero_everywhere": dict(prefix_lens=[0, 0, 0]),
    "prefix_zero_and_odd": dict(prefix_lens=[0, 7, 13], block_size=3),
    "block_size_1": dict(block_size=1, prefix_lens=[5, 1, 2]),
    "block_size_16": dict(block_size=16, prefix_lens=[17, 3, 33]),
    "not_causal": dict(causal=False),
    "left_padding": dict(padding="left"),
    "right_padding": dict(padding="right"),
    "ragged_lengths": dict(padding="ragged", Sq=5, Skv=9),
    "decode_long_cache": dict(Sq=1, Skv=37, padding="right", B=7, T=4),
    "chunked_prefill": dict(Sq=4, Skv=19, padding="ragged"),
    "sliding_window": dict(window=3, Sq=9, Skv=9),
    "window_left_padding": dict(window=2, padding="left", Sq=8, Skv=8),
    "explicit_mask": dict(mask=True),
    "mask_and_causal_padding": dict(mask=True, padding="right", causal=True),
    "odd_head_dim": dict(D=13),
    "no_own_keys": dict(Skv=0, causal=False),
    "single_sequence": dict(B=1, T=5),
    # group sizes 5, 1, 2, 1 and an unused task: several size buckets, one padded
    "skewed_groups": dict(B=9, T=5, tasks=[0, 2, 0, 1, 0, 3, 0, 2, 0], prefix_lens=[6, 3, 9, 1, 4]),
    "every_sequence_its_own_task": dict(B=6, T=6, tasks=[5, 4, 3, 2, 1, 0]),
    # the engine's decode layout: rows sorted by task, equal groups (stacking is a view), left padding
    "sorted_equal_groups_decode": dict(B=8, T=4, tasks=[1, 1, 3, 3, 0, 0, 2, 2],
                                       Sq=1, Skv=11, padding="left", prefix_lens=[5, 9, 0, 4]),
    "sorted_equal_groups_prefill": dict(B=6, T=3, tasks=[0, 0, 1, 1, 2, 2], Sq=5, Skv=5, padding="left",
                                        prefix_lens=[4, 7, 2]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_matches_reference_fp32(name, seed):
    assert_matches_reference(Case(seed=seed, **CASES[name]))


@pytest.mark.parametrize("name", ["mixed_tasks_gqa", "left_padding", "decode_long_cache"])
def test_torch_matches_reference_half(name, seed):
    # fp16/bf16 are computed in fp32 inside both backends; only the final rounding differs.
    for dtype in (torch.float16, torch.bfloat16):
        assert_matches_reference(Case(seed=seed, dtype=dtype, **CASES[name]), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["mixed_tasks_gqa", "ragged_lengths", "sliding_window", "explicit_mask"])
def test_torch_gradcheck_fp64(name, seed):
    small = dict(B=3, T=3, D=5, Sq=5, Skv=5, block_size=2, prefix_lens=[3, 0, 5], window=CASES[name].get("window"))
    case = Case(seed=seed, dtype=torch.float64, **{**CASES[name], **small})
    args, kw = case.build()
    fn = lambda *t: prefix_attention(*t, *args[5:], backend="torch", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args[:5], eps=1e-6, atol=1e-6, fast_mode=True), case


def test_padding_rows_are_zero_and_never_nan(seed):
    case = Case(seed=seed, padding="ragged", prefix_lens=[0, 0, 0], Sq=6, Skv=6)
    args, kw = case.build()
    kw["q_lens"] = torch.tensor([6, 0, 3, 6, 2])
    kw["kv_starts"] = torch.zeros(5, dtype=torch.long)
    kw["kv_lens"] = torch.tensor([0, 0, 6, 6, 6])      # sequence 0 sees nothing at all
    for backend in ("reference", "torch"):
        out, grads = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend=backend, **k),
                                       args, kw, seed)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        assert (out[0] == 0).all(), "a sequence with no visible key must give zeros"
        assert (out[1] == 0).all() and (out[2, :, 3:] == 0).all(), "padding queries must give zeros"
        assert out[2, :, :3].abs().sum() > 0


def test_prefix_visible_to_padding_free_rows_only(seed):
    """With a prefix, a query that sees no own key still attends to the prefix."""
    case = Case(seed=seed, prefix_lens=[4, 4, 4], requires_grad=False)
    args, kw = case.build()
    kw.update(q_lens=torch.full((5,), 7), kv_lens=torch.zeros(5, dtype=torch.long),
              kv_starts=torch.zeros(5, dtype=torch.long))
    out = prefix_attention(*args, backend="torch", **kw)
    ref = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(out, ref)
    assert (out.abs().sum(-1) > 0).all()


def literal_attention(q, k, v, pk, pv, table, plens, tids, causal, q_lens, kv_lens, kv_starts, window):
    """The contract written as loops over sequences, heads and queries: checks the reference itself."""
    B, Hq, Sq, D = q.shape
    Hkv, bs = k.shape[1], pk.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        t = int(tids[b])
        P = int(plens[t])
        rows = [(int(table[t, r // bs]), r % bs) for r in range(P)]
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            keys = [pk[blk, hk, o] for blk, o in rows]
            vals = [pv[blk, hk, o] for blk, o in rows]
            for i in range(int(q_lens[b])):
                pos = int(kv_lens[b]) - int(q_lens[b]) + i
                ks, vs = list(keys), list(vals)
                for j in range(int(kv_starts[b]), int(kv_lens[b])):
                    if causal and j > pos:
                        continue
                    if window is not None and pos - j >= window:
                        continue
                    ks.append(k[b, hk, j]); vs.append(v[b, hk, j])
                if not ks:
                    continue
                s = torch.stack(ks) @ q[b, h, i] * D ** -0.5
                out[b, h, i] = torch.softmax(s, 0) @ torch.stack(vs)
    return out


@pytest.mark.parametrize("name", ["mixed_tasks_gqa", "ragged_lengths", "window_left_padding", "decode_long_cache"])
def test_reference_matches_literal_definition(name, seed):
    case = Case(seed=seed, dtype=torch.float64, requires_grad=False, **CASES[name])
    args, kw = case.build()
    B, Sq, Skv = case.B, case.Sq, case.Skv
    lens = dict(q_lens=kw.get("q_lens", torch.full((B,), Sq)), kv_lens=kw.get("kv_lens", torch.full((B,), Skv)),
                kv_starts=kw.get("kv_starts", torch.zeros(B, dtype=torch.long)))
    want = literal_attention(*args, causal=case.causal, window=case.window, **lens)
    got = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(got, want, msg=lambda m: f"{case}: {m}")


def test_prefix_gradient_sums_over_sequences_of_a_task(seed):
    """Two identical sequences of one task give twice the prefix gradient of one."""
    case = Case(seed=seed, B=1, T=1, prefix_lens=[6])
    args, kw = case.build()
    q, k, v, pk, pv, table, plens, tids = args
    one = torch.autograd.grad(prefix_attention(q, k, v, pk, pv, table, plens, tids, backend="torch").sum(), pk)[0]
    two = torch.autograd.grad(prefix_attention(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), pk, pv,
                                               table, plens, torch.cat([tids, tids]), backend="torch").sum(), pk)[0]
    torch.testing.assert_close(two, 2 * one)


def test_inference_plan_is_never_stale(seed):
    """Layers share one plan (task buckets, masks derived once); the plan owns copies of the index
    tensors, so a caller changing its tensors in place after planning changes neither the plan's
    answer nor the next one-shot call's."""
    from softprompt.kernels import plan_prefix_attention
    from softprompt.kernels.inputs import check_layer_tensors, validate_inputs
    from softprompt.kernels.torch_backend import _prefix_plan
    case = Case(seed=seed, B=6, T=3, tasks=[0, 0, 1, 1, 2, 2], Sq=1, Skv=9, padding="left",
                prefix_lens=[3, 8, 5], requires_grad=False)
    args, kw = case.build()
    tids = args[7]
    assert all(part.span for part in _prefix_plan(validate_inputs(*args, **kw)).prefixes)   # the view path
    plan = plan_prefix_attention(*args[5:], backend="torch", **kw, **check_layer_tensors(*args[:5]))
    want = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(plan.run(*args[:5]), want)
    assert "fused_prefix" in plan._derived                         # derived once, kept for the next layer
    tids.copy_(torch.tensor([2, 1, 0, 2, 1, 0]))                    # same tensor object, new tasks
    kw["kv_starts"].copy_(kw["kv_starts"].flip(0))
    torch.testing.assert_close(plan.run(*args[:5]), want)          # the plan kept its own copies
    torch.testing.assert_close(prefix_attention(*args, backend="torch", **kw),
                               prefix_attention(*args, backend="reference", **kw))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_inference_path_matches_reference(name, seed):
    """Calls that need no gradient take the fused CPU path (flash kernel + fp32 state merge)."""
    from softprompt.kernels.inputs import validate_inputs
    from softprompt.kernels.torch_backend import _fused_inference_applies
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        case = Case(seed=seed, dtype=dtype, requires_grad=False, **CASES[name])
        args, kw = case.build()
        assert _fused_inference_applies(validate_inputs(*args, **kw))
        got = prefix_attention(*args, backend="torch", **kw)
        want = prefix_attention(*args, backend="reference", **kw)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{case}: {m}")


@pytest.mark.parametrize("name", ["decode_long_cache", "sorted_equal_groups_decode", "mixed_tasks_gqa"])
def test_inference_path_reads_strided_inputs(name, seed):
    # q/k/v whose last dimension is not dense (e.g. permuted out of a feature-major buffer): the
    # CPU flash kernel behind the no-grad path would read them as dense; the result must not change.
    args, kw = Case(seed=seed, **CASES[name]).build()
    q, k, v = args[:3]
    strided = [t.detach().transpose(-1, 0).contiguous().transpose(-1, 0) for t in (q, k, v)]
    assert all(t.stride(-1) != 1 for t in strided)
    with torch.no_grad():
        want = prefix_attention(*[t.detach() for t in args[:5]], *args[5:], backend="reference", **kw)
        got = prefix_attention(*strided, *[t.detach() for t in args[3:5]], *args[5:], backend="torch", **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ---- hardening: bad input may not crash the process or leak NaN ----------------------------

EMPTY_SHAPES_SCRIPT = r"""
import torch
from softprompt.kernels import prefix_attention
pk, pv = torch.randn(4, 2, 4, 8), torch.randn(4, 2, 4, 8)
table, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 3])
for B, Hq, Sq, Skv in ((3, 4, 0, 5), (0, 4, 3, 5), (3, 4, 2, 0), (3, 4, 0, 0), (3, 0, 2, 5), (2, 2, 1, 5)):
    tids = torch.tensor([0, 1, 0][:B], dtype=torch.long)
    q, k, v = torch.randn(B, Hq, Sq, 8), torch.randn(B, 2, Skv, 8), torch.randn(B, 2, Skv, 8)
    for backend in ("reference", "torch"):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out = prefix_attention(q.requires_grad_(grad), k, v, pk, pv, table, lens, tids,
                                       causal=False, backend=backend)
            assert out.shape == (B, Hq, Sq, 8) and bool(torch.isfinite(out).all()), (B, Hq, Sq, Skv, backend)
print("ok")
"""


def test_empty_query_chunk_skv_zero_and_empty_batch_do_not_kill_the_process():
    """Sq = 0 without gradients reached the CPU flash kernel, which divides by the query length:
    SIGFPE ended Python (exit 136). Run in a subprocess so a crash fails this test, not pytest."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", EMPTY_SHAPES_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("grad", [False, True])
def test_junk_in_unused_block_table_entries_is_never_read(backend, grad, seed):
    """A shorter task's row is read as deep as the longest prefix of its bucket (tasks 0 and 1:
    one sequence each): its unused entries (stale ids past the pool, negatives) were gathered
    (IndexError), now they are never used."""
    case = Case(seed=seed, B=4, T=3, tasks=[0, 1, 2, 2], prefix_lens=[9, 2, 0], block_size=4,
                requires_grad=grad)
    args, kw = case.build()
    junk = args[5].clone()
    junk[1, 1:], junk[2, :] = 10 ** 6, -5
    want = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="reference", **k), args, kw, seed) \
        if grad else (prefix_attention(*args, backend="reference", **kw), [])
    junk_args = (*args[:5], junk, *args[6:])
    with torch.set_grad_enabled(grad):
        got = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend=backend, **k), junk_args, kw, seed) \
            if grad else (prefix_attention(*junk_args, backend=backend, **kw), [])
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
def test_nan_in_padding_queries_gives_zeros(grad, seed):
    """Padding queries (i >= q_lens) return zeros whatever they hold; the torch backend used to
    multiply their rows by 0, which keeps NaN (and its backward spread it to the prefix)."""
    case = Case(seed=seed, B=4, T=2, Sq=5, Skv=6, padding="ragged", requires_grad=grad)
    args, kw = case.build()
    q = args[0].detach().clone()
    pad = torch.arange(5)[None, :] >= kw["q_lens"][:, None]
    q[pad[:, None, :, None].expand(q.shape)] = float("nan")
    poisoned = (q.requires_grad_(grad), *args[1:])
    for backend in ("reference", "torch"):
        with torch.set_grad_enabled(grad):
            out = prefix_attention(*poisoned, backend=backend, **kw)
        assert (out[pad[:, None, :, None].expand(out.shape)] == 0).all(), backend
        torch.testing.assert_close(out, prefix_attention(*args, backend="reference", **kw), atol=2e-5, rtol=1e-4)
        if grad:
            grads = torch.autograd.grad(out.sum(), [poisoned[i] for i in (0, 1, 2, 3, 4)])
            assert all(torch.isfinite(g).all() for g in grads), backend


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("grad", [False, True])
def test_keys_a_query_cannot_see_never_reach_it(backend, grad, seed):
    """NaN / inf in own keys outside [kv_starts, kv_lens), in window- and causal-masked keys, in
    pool rows past a prefix's end: every backend (reference included) gave NaN rows (0 x NaN in
    probs @ V). Now only the queries that see a poisoned key are NaN."""
    from cases import masked_key_poison_case
    clean, poisoned, kw, sees = masked_key_poison_case(seed)
    leaves = [t.clone().requires_grad_(grad) for t in poisoned[:5]]
    clean_leaves = [t.clone().requires_grad_(grad) for t in clean[:5]]
    with torch.set_grad_enabled(grad):
        out = prefix_attention(*leaves, *poisoned[5:], backend=backend, **kw)
        want = prefix_attention(*clean_leaves, *clean[5:], backend="reference", **kw)
    assert out[:, :, sees].isnan().all() and torch.isfinite(out[:, :, ~sees]).all()
    torch.testing.assert_close(out[:, :, ~sees], want[:, :, ~sees], atol=2e-5, rtol=1e-4)
    if grad:
        # the queries that see no poison: their gradient flows through their visible keys only
        got = torch.autograd.grad(out[:, :, ~sees].sum(), leaves)
        ref = torch.autograd.grad(want[:, :, ~sees].sum(), clean_leaves)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)
