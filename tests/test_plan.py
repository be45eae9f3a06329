"""Plan once, run per layer: every backend through ``plan_prefix_attention(...).run`` against the
``reference`` one-shot call, dense and with paged own keys, a plan reused across layers, and run()
refusing tensors the plan does not describe. Triton runs through its interpreter
(``TRITON_INTERPRET=1``): tiny shapes. ``compiled`` (the C++ op, where it builds) computes no
gradients: it is checked on the forward."""
import pytest
import torch

from cases import Case, outputs_and_grads
from paging import paged
from softprompt.kernels import available_backends, plan_prefix_attention, prefix_attention
from softprompt.kernels.inputs import check_layer_tensors

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
BACKENDS = available_backends("cpu")
GRAD_BACKENDS = [b for b in BACKENDS if b != "compiled"]
needs_compiled = pytest.mark.skipif("compiled" not in BACKENDS, reason="the compiled backend does not build here")
TOL = {"reference": dict(atol=1e-6, rtol=1e-6), "torch": dict(atol=2e-5, rtol=1e-4),
       "triton": dict(atol=1e-4, rtol=1e-4), "compiled": dict(atol=2e-5, rtol=1e-4)}

# Small enough for the Triton interpreter, still odd sizes, P = 0, GQA, padding, several tasks.
CASES = {
    "mixed_tasks_gqa": dict(B=3, T=3, Hq=4, Hkv=2, Sq=3, Skv=4, D=8, tasks=[2, 0, 2]),
    "prefix_zero_and_odd": dict(B=3, T=3, Hq=2, Hkv=1, Sq=5, Skv=5, D=5, block_size=3, prefix_lens=[0, 7, 2]),
    "no_prefix_at_all": dict(B=2, T=2, Hq=2, Hkv=2, Sq=3, Skv=3, D=8, prefix_lens=[0, 0]),
    "ragged_padding": dict(B=3, T=2, Hq=2, Hkv=1, Sq=4, Skv=6, D=8, padding="ragged"),
    "left_padding_window": dict(B=3, T=2, Hq=2, Hkv=2, Sq=5, Skv=5, D=8, padding="left", window=2),
    "decode": dict(B=4, T=3, Hq=4, Hkv=2, Sq=1, Skv=7, D=8, padding="right"),
    "explicit_mask": dict(B=3, T=2, Hq=2, Hkv=1, Sq=3, Skv=4, D=8, mask=True, causal=False),
}


def plan_for(args, kw, backend):
    """The plan of a case's metadata (sizes read off its tensors)."""
    return plan_prefix_attention(*args[5:], backend=backend, **kw, **check_layer_tensors(*args[:5]))


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_plan_run_matches_reference(backend, name, seed):
    case = Case(seed=seed, **CASES[name])
    args, kw = case.build()
    plan = plan_for(args, kw, backend)
    want = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="reference", **k), args, kw, seed)
    got = outputs_and_grads(lambda *a: plan.run(*a[:5]), args, {}, seed)
    for n, w, g in zip(NAMES, [want[0], *want[1]], [got[0], *got[1]]):
        torch.testing.assert_close(g, w, **TOL[backend], msg=lambda m: f"{n} differs for {case}: {m}")
    with torch.no_grad():                 # the inference paths (torch: fused CPU kernel; triton: decode)
        torch.testing.assert_close(plan.run(*args[:5]), want[0], **TOL[backend])


@needs_compiled
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", [n for n in CASES if n != "explicit_mask"])
def test_compiled_plan_run_matches_reference(name, threads, seed):
    args, kw = Case(seed=seed, requires_grad=False, **CASES[name]).build()
    plan = plan_for(args, kw, "compiled")
    want = prefix_attention(*args, backend="reference", **kw)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):                     # a plan runs any number of layers
            torch.testing.assert_close(plan.run(*args[:5]), want, **TOL["compiled"])
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_mask_given_to_run_replaces_the_planned_one(backend, seed):
    case = Case(seed=seed, **CASES["explicit_mask"])
    args, kw = case.build()
    planned = kw.pop("attn_mask")
    other = ~planned
    plan = plan_for(args, dict(kw, attn_mask=planned), backend)
    with torch.no_grad():
        for mask in (other, None, other):                 # a per-call mask never sticks to the plan
            want = prefix_attention(*args, backend="reference", attn_mask=planned if mask is None else mask, **kw)
            torch.testing.assert_close(plan.run(*args[:5], attn_mask=mask), want, **TOL[backend])


def _layer(args, seed):
    """Fresh per-layer tensors (q, k, v and the layer's pools) with the sizes of ``args``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g).requires_grad_() for t in args[:5])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plan_reused_across_layers_equals_one_shot_calls(backend, seed):
    case = Case(seed=seed, B=5, T=3, Hq=4, Hkv=2, Sq=4, Skv=6, D=8, padding="ragged")
    args, kw = case.build()
    plan = plan_for(args, kw, backend)
    for layer in range(4):
        tensors = _layer(args, seed + layer)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                want = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend=backend, **k),
                                         (*tensors, *args[5:]), kw, seed) if grad else \
                    (prefix_attention(*tensors, *args[5:], backend=backend, **kw),)
                got = outputs_and_grads(lambda *a: plan.run(*a), tensors, {}, seed) if grad else \
                    (plan.run(*tensors),)
            torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
            if grad:
                for w, g in zip(want[1], got[1]):
                    torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_backend_work_on_the_metadata_happens_once_per_plan(monkeypatch, seed):
    """Task grouping and the fused CPU plan are derived by the first run and reused by later layers."""
    from softprompt.kernels import torch_backend
    calls = {"buckets": 0, "own": 0, "prefix": 0}

    def counting(name, fn):
        def wrapped(x):
            calls[name] += 1
            return fn(x)
        return wrapped

    monkeypatch.setattr(torch_backend, "_task_buckets", counting("buckets", torch_backend._task_buckets))
    monkeypatch.setattr(torch_backend, "_own_plan", counting("own", torch_backend._own_plan))
    monkeypatch.setattr(torch_backend, "_prefix_plan", counting("prefix", torch_backend._prefix_plan))
    args, kw = Case(seed=seed, B=4, T=3, Sq=1, Skv=6, padding="right", prefix_lens=[3, 5, 2],
                    requires_grad=False).build()
    plan = plan_for(args, kw, "torch")
    with torch.no_grad():                 # the fused CPU path (the gradient path groups tasks only)
        for layer in range(5):
            plan.run(*_layer(args, seed + layer))
    assert calls == {"buckets": 1, "own": 1, "prefix": 1}
    with torch.no_grad():                 # a per-call mask: the own-key part again, the rest reused
        plan.run(*args[:5], attn_mask=torch.ones(4, 1, 1, 6, dtype=torch.bool))
    assert calls == {"buckets": 1, "own": 2, "prefix": 1}


def _bad_layers(args):
    q, k, v, pk, pv = (t.detach() for t in args[:5])
    return {
        "batch": ("q", (q[:-1], k[:-1], v[:-1], pk, pv)),
        "q heads": ("q", (q[:, :2], k, v, pk, pv)),              # 2 heads over Hkv=2: only the plan objects
        "q rows": ("q", (q[:, :, :-1], k, v, pk, pv)),
        "head dim": ("k", (q[..., :-1], k, v, pk, pv)),          # q now disagrees with k first
        "k rows": ("k", (q, k[:, :, :-1], v[:, :, :-1], pk, pv)),
        "v shape": ("v", (q, k, v[:, :, :-1], pk, pv)),
        "kv heads": ("k", (q, k[:, :1], v[:, :1], pk[:, :1], pv[:, :1])),
        "pool blocks": ("prefix_k", (q, k, v, pk[:-1], pv[:-1])),
        "pool block size": ("prefix_k", (q, k, v, pk[:, :, :-1], pv[:, :, :-1])),
        "dtype": ("k", (q, k.double(), v, pk, pv)),
        "not a tensor": ("v", (q, k, v.tolist(), pk, pv)),
        "rank": ("q", (q[0], k, v, pk, pv)),
    }


@pytest.mark.parametrize("what", list(_bad_layers(Case(seed=0).build()[0])))
def test_run_rejects_tensors_the_plan_does_not_describe(what, seed):
    args, kw = Case(seed=seed, B=4, T=2, Hq=4, Hkv=2, Sq=3, Skv=5, D=8, block_size=4, prefix_lens=[3, 6]).build()
    plan = plan_for(args, kw, "torch")
    name, tensors = _bad_layers(args)[what]
    with pytest.raises(ValueError, match=f"`{name}`"):
        plan.run(*tensors)


def test_run_rejects_a_mask_of_the_wrong_shape(seed):
    args, kw = Case(seed=seed, B=3, Sq=2, Skv=4).build()
    plan = plan_for(args, kw, "torch")
    with pytest.raises(ValueError, match="`attn_mask`"):
        plan.run(*args[:5], attn_mask=torch.ones(3, 1, 2, 5, dtype=torch.bool))


@pytest.mark.parametrize("bad, name", [
    (dict(num_kv_heads=3), "num_kv_heads"), (dict(q_len=-1), "q_len"), (dict(head_dim=0), "head_dim"),
    (dict(block_size=True), "block_size"), (dict(num_blocks=2.0), "num_blocks"), (dict(batch=7), "task_ids"),
    (dict(num_blocks=1), "block_table"), (dict(backend="nope"), "backend"),
])
def test_plan_rejects_bad_metadata(bad, name, seed):
    args, kw = Case(seed=seed, B=4, T=2, Hq=4, Hkv=2, block_size=4, prefix_lens=[3, 6]).build()
    sizes = check_layer_tensors(*args[:5])
    with pytest.raises(ValueError, match=f"`{name}`"):
        plan_prefix_attention(*args[5:], **kw, **{**sizes, **bad})


def test_integration_plans_once_per_forward(monkeypatch):
    """Every layer of a forward runs the plan its first layer built; the next forward plans again."""
    import softprompt
    from softprompt.integration import attention
    from test_integration_common import make_model, random_prefixes

    model = make_model("llama", num_hidden_layers=3)
    store = softprompt.attach(model, block_size=4)
    for n, (k, v) in random_prefixes(model, [5, 2]).items():
        store.add(n, k, v)
    built = []
    monkeypatch.setattr(attention, "plan_prefix_attention",
                        lambda *a, **k: built.append(1) or plan_prefix_attention(*a, **k))
    ids = torch.randint(4, 90, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
        assert len(built) == 1 and store.calls["lengths"] == 3
        model(ids, attention_mask=mask, task_ids=torch.tensor([1, 0]))
    assert len(built) == 2 and store.calls["lengths"] == 6


# ---- paged own keys: a page pool + a per-row page table ---------------------------------------

# odd sizes, P = 0, GQA, several tasks, rows of different lengths, decode and causal prefill
PAGED_CASES = {
    "decode_gqa": dict(B=5, T=3, Hq=6, Hkv=2, Sq=1, Skv=9, D=8, block_size=4, prefix_lens=[5, 0, 9],
                       padding="right"),
    "prefill_odd": dict(B=4, T=3, Hq=3, Hkv=1, Sq=4, Skv=7, D=5, block_size=3, prefix_lens=[0, 7, 2],
                        padding="right"),
    "ragged_window": dict(B=4, T=2, Hq=4, Hkv=2, Sq=3, Skv=6, D=8, padding="ragged", window=2),
    "non_causal_left": dict(B=3, T=2, Hq=2, Hkv=2, Sq=2, Skv=5, D=8, padding="left", causal=False),
}


def _paged_case(name, seed, page_size, requires_grad=False):
    args, kw = Case(seed=seed, requires_grad=requires_grad, **PAGED_CASES[name]).build()
    B, _, Skv, _ = args[1].shape
    pools, table = paged(args[1], args[2], kw.get("kv_lens", torch.full((B,), Skv)), page_size, seed,
                         junk_tail=seed % 2 == 1)
    plan_kw = dict(kw, own_page_table=table, own_page_size=page_size, own_num_pages=pools[0].shape[0],
                   **check_layer_tensors(*args[:5]))
    return args, kw, pools, plan_kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 3])
@pytest.mark.parametrize("name", list(PAGED_CASES))
def test_every_backend_with_paged_own_keys_matches_reference(backend, name, page_size, seed):
    """Own keys in shuffled pages (NaN in every slot no row uses, junk in unused table entries)."""
    args, kw, (kpool, vpool), plan_kw = _paged_case(name, seed, page_size)
    plan = plan_prefix_attention(*args[5:], backend=backend, **plan_kw)
    want = prefix_attention(*args, backend="reference", **kw)
    with torch.no_grad():
        got = plan.run(args[0], kpool, vpool, *args[3:5])
    torch.testing.assert_close(got, want, **TOL[backend], msg=lambda m: f"{backend} {name} (seed {seed}): {m}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("page_size", [1, 3, 4])
def test_paged_own_keys_match_dense_with_gradients(backend, page_size, seed):
    args, kw, pools, plan_kw = _paged_case("prefill_odd", seed, page_size, requires_grad=True)
    q, k, v, pk, pv = args[:5]
    kpool, vpool = (p.requires_grad_() for p in pools)
    plan = plan_prefix_attention(*args[5:], backend=backend, **plan_kw)
    want = outputs_and_grads(lambda *a, **k_: prefix_attention(*a, backend="reference", **k_), args, kw, seed)
    got = outputs_and_grads(lambda *a: plan.run(*a), (q, kpool, vpool, pk, pv), {}, seed)
    torch.testing.assert_close(got[0], want[0], **TOL[backend])
    dq, dkpool, dvpool, dpk, dpv = got[1]
    for name, w, g in (("dq", want[1][0], dq), ("dprefix_k", want[1][3], dpk), ("dprefix_v", want[1][4], dpv)):
        torch.testing.assert_close(g, w, **TOL[backend], msg=lambda m: f"{name}: {m}")
    from softprompt.kernels.inputs import gather_pages
    mine = (torch.arange(k.shape[2])[None, :] < kw["kv_lens"][:, None])[:, None, :, None]   # a row's own slots
    for name, w, pool_grad in (("dk", want[1][1], dkpool), ("dv", want[1][2], dvpool)):
        assert torch.isfinite(pool_grad).all(), name       # NaN in unused slots never reaches a gradient
        got_rows = gather_pages(pool_grad, plan.meta.own_page_table, k.shape[2]) * mine
        torch.testing.assert_close(got_rows, w, **TOL[backend], msg=lambda m: f"{name}: {m}")
    assert float(dkpool.abs().sum()) == pytest.approx(float(want[1][1].abs().sum()), rel=1e-4)   # nothing elsewhere


def test_paged_own_keys_reject_bad_tables_and_pools(seed):
    args, kw = Case(seed=seed, B=3, T=2, Hq=2, Hkv=1, Sq=2, Skv=5, D=8).build()
    sizes = check_layer_tensors(*args[:5])
    (kpool, vpool), table = paged(args[1], args[2], kw.get("kv_lens", torch.full((3,), 5)), 2, seed)
    make = lambda **over: plan_prefix_attention(*args[5:], **kw, **sizes, **{  # noqa: E731
        "own_page_table": table, "own_page_size": 2, "own_num_pages": kpool.shape[0], "backend": "torch", **over})
    bad = table.clone()
    bad[1, 0] = kpool.shape[0]
    for over, name in ((dict(own_page_table=bad), "own_page_table"),
                       (dict(own_page_table=table[:, :2]), "own_page_table"),
                       (dict(own_page_size=0), "own_page_size"), (dict(own_num_pages=None), "own_num_pages")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            make(**over)
    plan = make()
    with pytest.raises(ValueError, match="`k`"):
        plan.run(args[0], args[1], args[2], *args[3:5])       # dense own keys given to a paged plan
    with pytest.raises(ValueError, match="`v`"):
        plan.run(args[0], kpool, vpool[:-1], *args[3:5])
    with pytest.raises(ValueError, match="`k`"):               # the head-major layout is not the contract's
        plan.run(args[0], kpool.transpose(1, 2), vpool.transpose(1, 2), *args[3:5])


@needs_compiled
def test_compiled_backend_rejects_what_it_does_not_cover(seed):
    """attn_mask (at plan time), other dtypes and gradients (per run): a ValueError naming them."""
    args, kw = Case(seed=seed, B=3, T=2, Hq=2, Hkv=1, Sq=2, Skv=4, D=8, requires_grad=False).build()
    sizes = check_layer_tensors(*args[:5])
    with pytest.raises(ValueError, match="`attn_mask`"):
        plan_prefix_attention(*args[5:], **kw, **sizes, attn_mask=torch.ones(3, 1, 2, 4, dtype=torch.bool),
                              backend="compiled")
    plan = plan_prefix_attention(*args[5:], **kw, **sizes, backend="compiled")
    with pytest.raises(ValueError, match="`attn_mask`"):
        plan.run(*args[:5], attn_mask=torch.ones(3, 1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="`q` with dtype torch.float16"):
        plan.run(*(t.half() for t in args[:5]))
    leaves = [t.clone().requires_grad_() for t in args[:5]]
    with pytest.raises(ValueError, match="no gradients"):
        plan.run(*leaves)
    with torch.no_grad():
        torch.testing.assert_close(plan.run(*leaves), prefix_attention(*args, **kw, backend="reference"),
                                   **TOL["compiled"])
