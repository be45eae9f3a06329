"""Every supported family: attached model == stock eager model with the prefix pre-filled in a cache.

One batch mixes three tasks with different prefix lengths (5, 2, 0) under left padding; each row
is compared with the stock model run alone on that row, its prefix in a ``DynamicCache`` (cache
convention) and an attention mask covering it (PEFT-style). Logits, prefix gradients (trainable
store, mapped back to cache convention) and weight gradients must match to 1e-5.
"""
import inspect

import pytest
import torch

import softprompt
from test_integration_common import (ENCODERS, FAMILIES, left_pad, make_model, positions_from_mask,
                                     random_prefixes, random_rows, reference_logits, uses_positions_from_mask)

LENGTHS = [5, 2, 0]
ROWS = [7, 4, 6, 3]
TASKS = [0, 1, 2, 0]
ATOL = 1e-5
MAX_ERRORS = {}


def _loss_weights(rows, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(len(r), 96, generator=g) for r in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_cache_prefilled_reference(family):
    model = make_model(family)
    prefixes = random_prefixes(model, LENGTHS)
    names = list(prefixes)
    rows = random_rows(ROWS)
    weights = _loss_weights(rows)

    # Reference: stock eager model, one row at a time, prefix in a pre-filled DynamicCache.
    leaves = {n: (k.clone().requires_grad_(), v.clone().requires_grad_()) for n, (k, v) in prefixes.items()}
    ref_logits = []
    for b, row in enumerate(rows):
        k, v = leaves[names[TASKS[b]]]
        logits = reference_logits(model, row, k, v)
        (logits * weights[b]).sum().backward()
        ref_logits.append(logits.detach())
    ref_param_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # Ours: one left-padded mixed-task batch through the attached model.
    original_forward_sig = inspect.signature(model.forward)
    store = softprompt.attach(model, block_size=4, trainable=True)
    assert isinstance(store, softprompt.integration.ModelPrefixStore)
    for n, (k, v) in prefixes.items():
        store.add(n, k, v)
    ids, mask = left_pad(rows, family)
    kw = {"position_ids": positions_from_mask(mask)} if uses_positions_from_mask(family) else {}
    logits = model(ids, attention_mask=mask, task_ids=store.task_ids([names[t] for t in TASKS]), **kw).logits
    loss = sum((logits[b, -len(r):] * weights[b]).sum() for b, r in enumerate(rows))
    loss.backward()

    err = max((logits[b, -len(r):] - ref_logits[b]).abs().max().item() for b, r in enumerate(rows))
    MAX_ERRORS[family] = err
    assert err < ATOL, f"{family}: logits differ by {err}"
    for n in names:
        gk, gv = store.prefix_grad(n)
        rk, rv = leaves[n][0].grad, leaves[n][1].grad
        if rk is None:                                    # P = 0: nothing to train
            assert gk.numel() == 0
            continue
        torch.testing.assert_close(gk, rk, atol=ATOL, rtol=1e-4, msg=lambda m: f"{family} {n} dK: {m}")
        torch.testing.assert_close(gv, rv, atol=ATOL, rtol=1e-4, msg=lambda m: f"{family} {n} dV: {m}")
    for n, p in model.named_parameters():
        if n.startswith("softprompt_store") or n not in ref_param_grads:
            continue
        torch.testing.assert_close(p.grad, ref_param_grads[n], atol=ATOL, rtol=1e-4,
                                   msg=lambda m: f"{family} weight grad {n}: {m}")
    # the attention calls took the kernel path (mask reduced to lengths), except gemma2's softcap
    assert store.calls["dense" if family == "gemma2" else "lengths"] > 0, store.calls

    # Detach restores the stock model exactly.
    assert softprompt.detach(model) is store
    assert model.config._attn_implementation == "eager"
    assert inspect.signature(model.forward) == original_forward_sig
    assert "softprompt_store" not in dict(model.named_modules())
    with torch.no_grad():
        k, v = prefixes[names[0]]
        again = reference_logits(model, rows[0], k, v)
    torch.testing.assert_close(again, ref_logits[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_right_padding_falls_back_to_mask(family):
    """Right padding with a causal mask is not 'plain lengths' for queries: bool attn_mask path."""
    from test_integration_common import right_pad
    model = make_model(family)
    prefixes = random_prefixes(model, [4, 3])
    names = list(prefixes)
    rows = random_rows([6, 3, 5])
    tasks = [1, 0, 1]
    with torch.no_grad():
        refs = [reference_logits(model, r, *prefixes[names[t]]) for r, t in zip(rows, tasks)]
    store = softprompt.attach(model)
    for n, (k, v) in prefixes.items():
        store.add(n, k, v)
    ids, mask = right_pad(rows, family)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, task_ids=[names[t] for t in tasks]).logits
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b, : len(r)], refs[b], atol=ATOL, rtol=0)
    if family in ENCODERS:
        assert store.calls["lengths"] > 0          # bidirectional + padding reduces to kv lengths
    else:
        assert store.calls["mask"] > 0


def test_report_max_errors():
    """Prints the per-family maximum logit error measured above (run with -s to see it)."""
    if MAX_ERRORS:
        print("\nmax |logits - reference| per family:",
              ", ".join(f"{f}={e:.1e}" for f, e in sorted(MAX_ERRORS.items())))
