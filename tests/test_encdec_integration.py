"""Encoder-decoder integration (T5, BART): prefixes on encoder self-, decoder self- and cross-attention.

Each row of a mixed-task, right-padded batch must equal the stock eager model run on that row
alone with its task's three prefixes concatenated into K/V (see ``encdec_common.Reference``):
logits, and the gradients of the prefixes (summed over a task's rows) and of the model weights.
Greedy ``generate()`` on a mixed batch must equal each row generated alone, and the reference.
"""
import copy

import pytest
import torch

import softprompt
from softprompt.integration.encdec import ATTN_NAME_ENCDEC, KINDS, EncoderDecoderPrefixStore
from encdec_common import (FAMILIES, Reference, layer_counts, make_model, pad_id, random_prefixes,
                           random_rows, right_pad)

LENGTHS = [5, 3, 0]
TASKS = [0, 1, 2, 0]
ENC = [7, 5, 6, 4]
DEC = [5, 3, 4, 6]
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _attach(model, prefixes, **kw):
    store = softprompt.attach(model, block_size=4, **kw)
    for name, prefix in prefixes.items():
        store.add_kinds(name, prefix)
    return store


def _weights(shape, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_materialised_reference_with_grads(family, monkeypatch):
    # BART with more decoder than encoder layers (T5's own generate cache needs equal counts,
    # its forward does not): the three kinds have their own layer counts.
    model = make_model(family, decoder_layers=3)
    model.train()                                   # dropout is 0: train() only enables grads paths
    prefixes = random_prefixes(model, LENGTHS, scale=1.5)
    names = list(prefixes)
    enc_rows, dec_rows = random_rows(ENC, seed=3), random_rows(DEC, seed=4)
    ref_model = copy.deepcopy(model)
    ref = Reference(ref_model, monkeypatch)

    # ---- reference: each row alone, unpadded, its task's three prefixes as leaves
    leaves = {n: {kind: (k.clone().requires_grad_(), v.clone().requires_grad_()) for kind, (k, v) in p.items()}
              for n, p in prefixes.items()}
    ref_logits = []
    for b, (e, d) in enumerate(zip(enc_rows, dec_rows)):
        with ref.using(leaves[names[TASKS[b]]]):
            logits = ref_model(input_ids=e[None], decoder_input_ids=d[None]).logits[0]
        (logits * _weights(logits.shape, seed=b)).sum().backward()
        ref_logits.append(logits.detach())

    # ---- integration: one mixed-task padded batch
    store = _attach(model, prefixes, trainable=True)
    assert isinstance(store, EncoderDecoderPrefixStore) and model.config._attn_implementation == ATTN_NAME_ENCDEC
    assert store.layers == layer_counts(model) and store.num_layers == sum(layer_counts(model).values())
    ids, mask = right_pad(enc_rows, family)
    dec_ids, dec_mask = right_pad(dec_rows, family)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
                task_ids=torch.tensor(TASKS)).logits
    loss = 0
    for b, n in enumerate(DEC):
        torch.testing.assert_close(out[b, :n], ref_logits[b], **TOL, msg=lambda m: f"{family} row {b}: {m}")
        loss = loss + (out[b, :n] * _weights(ref_logits[b].shape, seed=b)).sum()
    loss.backward()

    # every kind was routed: T5 self-attention on the dense path (relative bias), the rest on kernels
    if family == "t5":
        assert store.calls["dense"] == 2 + 3 and store.calls["lengths"] + store.calls["mask"] == 3
    else:
        assert store.calls["dense"] == 0 and store.calls["lengths"] + store.calls["mask"] == 2 + 3 + 3

    # prefix gradients per task and kind (a task's gradient sums its rows)
    worst = 0.0
    for n in names:
        gk, gv = store.prefix_grad(n)
        for kind in KINDS:
            sk, sv = store.split(gk)[kind], store.split(gv)[kind]
            rk, rv = leaves[n][kind][0].grad, leaves[n][kind][1].grad
            if rk is None:                      # P = 0
                assert sk.numel() == 0
                continue
            assert rk.abs().sum() > 0, (n, kind)
            torch.testing.assert_close(sk, rk, **TOL, msg=lambda m: f"{family} {n} {kind} dK: {m}")
            torch.testing.assert_close(sv, rv, **TOL, msg=lambda m: f"{family} {n} {kind} dV: {m}")
            worst = max(worst, (sk - rk).abs().max().item(), (sv - rv).abs().max().item())
    # weight gradients (summed over rows) equal the batch's
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("softprompt_store"):
            continue
        r = ref_params[name].grad
        if r is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(p.grad, r, atol=5e-5, rtol=1e-4, msg=lambda m: f"{family} {name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_kind_matters_and_empty_prefix_is_stock(family):
    """A prefix on one kind alone changes the output (so each kind is reached); P = 0 is the stock model."""
    model = make_model(family)
    ids, mask = right_pad(random_rows([6, 4]), family)
    dec = torch.stack(random_rows([4, 4], seed=5))
    plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    prefixes = random_prefixes(model, [4, 0], scale=2.0)
    store = softprompt.attach(model, block_size=4)
    store.add_kinds("none", prefixes["task1"])
    base = prefixes["task0"]
    for kind in KINDS:
        only = {k: (v[0] if k == kind else torch.zeros_like(v[0]), v[1] if k == kind else torch.zeros_like(v[1]))
                for k, v in base.items()}
        # zeros elsewhere still take softmax mass; compare against an all-zero prefix instead
        zeros = {k: (torch.zeros_like(v[0]), torch.zeros_like(v[1])) for k, v in base.items()}
        store.add_kinds("only", only)
        store.add_kinds("zeros", zeros)
        a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, task_ids=["only", "only"]).logits
        z = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, task_ids=["zeros", "zeros"]).logits
        assert (a - z).abs().max() > 1e-5, kind        # (stock-level noise is ~1e-7)
        store.remove("only")
        store.remove("zeros")
    none = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, task_ids=["none", "none"]).logits
    torch.testing.assert_close(none, plain, atol=2e-6, rtol=0)
    # get / split / join round trip
    k, v = store.get("none")
    assert k.shape == (store.num_layers, *k.shape[1:2], 0, k.shape[3])
    with pytest.raises(ValueError, match="share one length"):
        store.join({"encoder": base["encoder"], "decoder": base["decoder"],
                    "cross": (base["cross"][0][:, :, :2], base["cross"][1][:, :, :2])})
    with pytest.raises(ValueError, match="must map exactly"):
        store.join({"encoder": base["encoder"]})
    softprompt.detach(model)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, plain,
                               atol=1e-5, rtol=1e-5)


def _gen(family, new=5):
    return dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id(family),
                eos_token_id=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_mixed_batch_equals_rows_alone_and_reference(family, monkeypatch):
    model = make_model(family)
    prefixes = random_prefixes(model, LENGTHS, scale=2.0)
    names = list(prefixes)
    rows = random_rows(ENC, seed=6)
    gen = _gen(family)
    ref_model = copy.deepcopy(model)
    ref = Reference(ref_model, monkeypatch)
    refs = []
    for b, r in enumerate(rows):
        with ref.using(prefixes[names[TASKS[b]]]):
            refs.append(ref_model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                           **gen)[0].tolist())
    _attach(model, prefixes)
    ids, mask = right_pad(rows, family)
    res = model.generate(ids, attention_mask=mask, task_ids=torch.tensor(TASKS), output_scores=True,
                         return_dict_in_generate=True, **gen)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               task_ids=torch.tensor([TASKS[b]]), **gen)[0].tolist()
        assert res.sequences[b].tolist() == alone == refs[b], f"{family} row {b} (task {TASKS[b]})"
    # the prefixes matter: first-step scores differ from the stock model's for tasks with P > 0
    plain = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                           **{**gen, "max_new_tokens": 1, "min_new_tokens": 1}).scores[0]
    changed = torch.nan_to_num(res.scores[0] - plain, nan=0.0).abs().amax(-1)
    for b, t in enumerate(TASKS):
        assert (changed[b] > 1e-3) if LENGTHS[t] else (changed[b] < 1e-5), (family, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_mixed_batch_equals_rows_alone(family):
    """generate() repeat-interleaves task_ids for beams / num_return_sequences (encoder and decoder)."""
    model = make_model(family)
    prefixes = random_prefixes(model, LENGTHS, scale=2.0)
    _attach(model, prefixes)
    rows = random_rows(ENC, seed=8)
    ids, mask = right_pad(rows, family)
    gen = dict(_gen(family, new=4), num_beams=2, num_return_sequences=2)
    out = model.generate(ids, attention_mask=mask, task_ids=torch.tensor(TASKS), **gen)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               task_ids=torch.tensor([TASKS[b]]), **gen)
        assert out[2 * b: 2 * b + 2].tolist() == alone.tolist(), f"{family} row {b}"


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_keeps_all_three_prefixes(family):
    """The prefixes live in the store, not in the HF cache that checkpointing drops."""
    model = make_model(family)
    model.train()
    store = _attach(model, random_prefixes(model, LENGTHS), trainable=True)
    ids, mask = right_pad(random_rows(ENC), family)
    labels = torch.stack(random_rows([4, 4, 4, 4], seed=9))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor(TASKS)).loss
        loss.backward()
        return loss.detach(), store.k_blocks.grad.clone(), store.v_blocks.grad.clone()

    plain = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = run()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert plain[1].abs().sum() > 0


def test_deepcopy_of_an_attached_model_has_its_own_store():
    model = make_model("t5")
    store = _attach(model, random_prefixes(model, [3]))
    twin = copy.deepcopy(model)
    ids = torch.stack(random_rows([5]))
    dec = torch.stack(random_rows([3], seed=5))
    a = model(input_ids=ids, decoder_input_ids=dec, task_ids=["task0"]).logits
    torch.testing.assert_close(twin(input_ids=ids, decoder_input_ids=dec, task_ids=["task0"]).logits, a,
                               atol=1e-5, rtol=1e-5)
    twin_store = twin.softprompt_store
    assert twin_store is not store and isinstance(twin_store, EncoderDecoderPrefixStore)
    with torch.no_grad():
        twin_store.v_blocks.mul_(2)
    assert not torch.allclose(twin(input_ids=ids, decoder_input_ids=dec, task_ids=["task0"]).logits, a)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec, task_ids=["task0"]).logits, a,
                               atol=1e-5, rtol=1e-5)
