"""The CPU training path: split flash attention (kernels/split_flash.py, used by the ``torch``
backend when gradients are needed) against ``reference``, forward and gradients; and attached
models whose batch has no prefix running through transformers' SDPA."""
import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softprompt
from cases import Case, outputs_and_grads
from softprompt.kernels import prefix_attention
from softprompt.kernels import torch_backend
from softprompt.kernels.split_flash import HAS_SPLIT_FLASH
from test_integration_common import VOCAB, config_for

pytestmark = pytest.mark.skipif(not HAS_SPLIT_FLASH, reason="this torch has no CPU flash attention kernels")

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]


@contextlib.contextmanager
def counting_split():
    """Counts of the torch backend's training calls: split flash taken / declined (non-finite)."""
    calls = {"split": 0, "declined": 0}
    real = torch_backend.split_flash_training_attention

    def spy(x):
        out = real(x)
        calls["split" if out is not None else "declined"] += 1
        return out
    with mock.patch.object(torch_backend, "split_flash_training_attention", spy):
        yield calls


@pytest.fixture
def split_calls():
    with counting_split() as calls:
        yield calls


def check_against_reference(case: Case, atol=2e-5, rtol=1e-4):
    args, kw = case.build()
    ref = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="reference", **k), args, kw, case.seed)
    got = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="torch", **k), args, kw, case.seed)
    for name, r, g in zip(NAMES, [ref[0], *ref[1]], [got[0], *got[1]]):
        assert torch.isfinite(g).all(), f"{name} has NaN/inf ({case})"
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name} differs for {case}: {m}")


problems = st.fixed_dictionaries(dict(
    B=st.integers(1, 5), T=st.integers(1, 4), Hkv=st.integers(1, 3), G=st.integers(1, 3),
    Sq=st.integers(1, 9), extra_kv=st.integers(0, 4), D=st.sampled_from([3, 8, 13, 16]),
    block_size=st.integers(1, 5), lens=st.lists(st.integers(0, 12), min_size=4, max_size=4),
    padding=st.sampled_from(["none", "left", "right", "ragged"]), causal=st.booleans(),
    tasks=st.lists(st.integers(0, 3), min_size=5, max_size=5), seed=st.integers(0, 2**31 - 1)))


@given(p=problems)
def test_split_flash_matches_reference_forward_and_gradients(p):
    """Odd sizes, P = 0 among others, GQA / MHA / MQA, every padding, several tasks per batch,
    causal and not; gradients of q, k, v and both prefix pools (each task's summed over its rows)."""
    T = p["T"]
    case = Case(seed=p["seed"], B=p["B"], T=T, Hq=p["Hkv"] * p["G"], Hkv=p["Hkv"], Sq=p["Sq"],
                Skv=p["Sq"] + p["extra_kv"], D=p["D"], block_size=p["block_size"], prefix_lens=p["lens"][:T],
                padding=p["padding"], causal=p["causal"], tasks=[t % T for t in p["tasks"][:p["B"]]])
    with counting_split() as calls:
        check_against_reference(case)
    assert calls == {"split": 1, "declined": 0}


@pytest.mark.parametrize("kw", [
    dict(Skv=0, causal=False, prefix_lens=[3, 0, 5]),            # prefix only; a row that sees nothing
    dict(prefix_lens=[0, 0, 0]),                                 # own keys only
    dict(B=6, T=3, tasks=[0, 0, 1, 1, 2, 2], prefix_lens=[4, 7, 2]),   # sorted equal groups: a view
    dict(B=6, T=3, tasks=[2, 0, 2, 1, 2, 0], prefix_lens=[4, 7, 2]),   # scattered, padded groups
    dict(B=5, T=2, tasks=[1] * 5, prefix_lens=[3, 6]),          # one task: keys broadcast, no copy
    dict(B=6, T=3, tasks=[0, 1, 1, 1, 0, 2], prefix_lens=[4, 7, 2]),   # a broadcast group mid-batch
    dict(B=4, T=2, tasks=[0] * 4, prefix_lens=[13, 5], block_size=16),  # one block: a view of the pool
    dict(window=3, Sq=9, Skv=9, padding="left"),
    dict(mask=True, padding="right"),
], ids=["prefix_only", "no_prefix", "span", "scattered", "one_task", "one_task_mid_batch", "one_block", "window_left_pad",
     "explicit_mask"])
def test_split_flash_layouts(kw, seed, split_calls):
    check_against_reference(Case(seed=seed, **kw))
    assert split_calls["split"] == 1


def test_split_flash_half_precision(seed, split_calls):
    for dtype in (torch.float16, torch.bfloat16):
        check_against_reference(Case(seed=seed, dtype=dtype, B=4, T=2, Hq=6, Hkv=2), atol=2e-2, rtol=2e-2)
    assert split_calls["split"] == 2


def test_split_flash_keeps_no_score_matrix_for_the_backward(seed, split_calls):
    """What autograd keeps is O(rows x D), never O(rows x keys)."""
    case = Case(seed=seed, B=3, T=2, Hq=4, Hkv=2, Sq=32, Skv=32, D=4, block_size=8, prefix_lens=[40, 24])
    args, kw = case.build()
    scores = case.B * case.Hq * case.Sq * (40 + case.Skv)
    largest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: largest.append(t.numel()) or t, lambda t: t):
        out = prefix_attention(*args, backend="torch", **kw)
    out.sum().backward()
    assert split_calls["split"] == 1 and max(largest) < scores / 4, (max(largest), scores)


def test_non_finite_hidden_key_declines_to_the_safe_path(seed, split_calls):
    """NaN in a key nobody can see: the fused kernels would spread it, so the call is redone by
    the path that keeps hidden keys out; the result still matches reference."""
    case = Case(seed=seed, B=3, T=2, prefix_lens=[5, 3], block_size=4, padding="right")
    args, kw = case.build()
    with torch.no_grad():
        args[1][0, :, -1] = float("nan")            # past row 0's kv_lens unless it uses every key
        kw["kv_lens"][0] = min(int(kw["kv_lens"][0]), case.Skv - 1)
        kw["q_lens"][0] = min(int(kw["q_lens"][0]), int(kw["kv_lens"][0]))
    ref = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="reference", **k), args, kw, seed)
    got = outputs_and_grads(lambda *a, **k: prefix_attention(*a, backend="torch", **k), args, kw, seed)
    for name, r, g in zip(NAMES, [ref[0], *ref[1]], [got[0], *got[1]]):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert split_calls == {"split": 0, "declined": 1}


# ------------------------------------------------------------------ attached models without a prefix
def _llama(seed):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config_for("llama"), attn_implementation="sdpa").eval()


def test_batch_without_prefix_runs_stock_sdpa(seed):
    """Rows whose tasks have no prefix: the attached model is the stock model (same logits and
    input gradients, no kernel call); a batch with a prefix row still takes the kernels."""
    import copy
    stock = _llama(seed)
    model = copy.deepcopy(stock)
    store = softprompt.attach(model)
    L, H, D = store.num_layers, store.num_kv_heads, store.head_dim
    store.add("empty", torch.zeros(L, H, 0, D), torch.zeros(L, H, 0, D))
    store.add("deep", torch.randn(L, H, 5, D), torch.randn(L, H, 5, D))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                                   # left padding on one row
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)

    def logits_and_grad(m, **kw):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids, **kw).logits
        out[mask.bool()].sum().backward()
        return out[mask.bool()], emb.grad
    want = logits_and_grad(stock)
    got = logits_and_grad(model, task_ids=store.task_ids(["empty"] * 3))
    assert store.calls.get("stock", 0) == L and store.calls["lengths"] + store.calls["mask"] == 0, store.calls
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)
    got = logits_and_grad(model)                                      # no task_ids: no prefix either
    assert store.calls["stock"] == 2 * L
    logits_and_grad(model, task_ids=store.task_ids(["empty", "deep", "empty"]))
    assert store.calls["stock"] == 2 * L and store.calls["lengths"] + store.calls["mask"] == L, store.calls


def test_prompt_tuning_model_trains_through_stock_attention(seed):
    """An attached model whose tasks are all input-level never reaches the prefix kernels, and
    its loss and prompt gradient match the same prompt spliced in front of the stock model."""
    from softprompt import PromptTuning, SoftPromptModel
    stock = _llama(seed)
    import copy
    spm = SoftPromptModel(copy.deepcopy(stock))
    spm.add_task("pt", PromptTuning(num_virtual_tokens=4))
    spm.train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 6), generator=g)
    loss = spm(input_ids=ids, labels=ids, tasks="pt").loss
    loss.backward()
    prompt = spm.prompts["pt"].embedding.weight
    store = spm.store
    assert store.calls.get("stock", 0) > 0 and store.calls["lengths"] + store.calls["mask"] == 0, store.calls

    soft = prompt.detach().clone().requires_grad_(True)
    emb = torch.cat([soft[None].expand(2, -1, -1), stock.get_input_embeddings()(ids)], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), ids], dim=1)
    want = stock(inputs_embeds=emb, labels=labels).loss
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompt.grad, soft.grad, atol=1e-5, rtol=1e-4)
