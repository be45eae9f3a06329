"""Training-side behaviour of an attached model, windows, store conventions, attach/detach contract."""
import importlib.util
import inspect

import pytest
import torch
import transformers as tf

import softprompt
from softprompt.integration import ModelPrefixStore, SUPPORTED_FAMILIES
from softprompt.integration.attention import ATTN_NAME, _backend
from test_integration_common import (config_for, left_pad, make_model, positions_from_mask, prefix_cache, random_prefixes,
                                     random_rows, reference_logits)

TASKS = [0, 1, 2, 1]


def _attached(family, lengths=(5, 2, 3), trainable=True, **overrides):
    model = make_model(family, **overrides)
    prefixes = random_prefixes(model, list(lengths))
    store = softprompt.attach(model, block_size=4, trainable=trainable)
    for n, (k, v) in prefixes.items():
        store.add(n, k, v)
    return model, store, prefixes


def _grads(model, store, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=labels,
                task_ids=torch.tensor(TASKS))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_identical_gradients(family):
    model, store, _ = _attached(family)
    model.train()
    ids, mask = left_pad(random_rows([6, 4, 5, 3]), family)
    labels = ids.masked_fill(mask == 0, -100)
    loss0, g0 = _grads(model, store, ids, mask, labels)
    assert "softprompt_store.k_blocks" in g0 and g0["softprompt_store.k_blocks"].abs().sum() > 0
    for reentrant in (True, False):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_activation_checkpointing
        loss1, g1 = _grads(model, store, ids, mask, labels)
        model.activation_checkpointing_disable()
        # Recomputation runs the same math but not always the same kernels on the same memory
        # layout (oneDNN/MKL pick by alignment and CPU; AVX-512 machines differ in the last bits),
        # so equal means equal up to float reassociation, not bitwise.
        torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-6)
        assert g1.keys() == g0.keys()
        for n in g0:
            tol = 1e-5 * float(g0[n].abs().max()) + 1e-8
            torch.testing.assert_close(g1[n], g0[n], atol=tol, rtol=1e-5, msg=lambda m: f"{n} reentrant={reentrant}: {m}")


def test_trainer_keeps_task_ids_column(tmp_path):
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("Trainer needs accelerate")
    model, store, prefixes = _attached("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    store.k_blocks.requires_grad_(True)
    store.v_blocks.requires_grad_(True)
    rows = random_rows([5, 5, 5, 5])
    data = [{"input_ids": r, "labels": r, "task_ids": t, "junk": 1} for r, t in zip(rows, TASKS)]
    seen = []

    def collate(features):
        seen.append(sorted(features[0]))
        return {"input_ids": torch.stack([f["input_ids"] for f in features]),
                "labels": torch.stack([f["labels"] for f in features]),
                "task_ids": torch.tensor([f["task_ids"] for f in features])}

    before = {n: store.get(n) for n in prefixes}
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                learning_rate=0.1, report_to=[], save_strategy="no", use_cpu=True,
                                logging_strategy="no", remove_unused_columns=True, dataloader_num_workers=0)
    tf.Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    assert seen and all(keys == ["input_ids", "labels", "task_ids"] for keys in seen)
    # the tasks in the trained rows moved; their gradients came through task_ids
    assert any(not torch.allclose(store.get(n)[1], before[n][1]) for n in prefixes)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_own_keys_only(family):
    """With a window shorter than the sequence, own keys are windowed and the prefix stays visible
    (the prefix is exempt from the window: a PEFT cache would let the window evict it)."""
    W = 3
    model = make_model(family, sliding_window=W)
    prefixes = random_prefixes(model, [4, 2])
    names = list(prefixes)
    rows = random_rows([7, 5])
    tasks = [0, 1]
    refs = []
    with torch.no_grad():
        for r, t in zip(rows, tasks):
            k, v = prefixes[names[t]]
            P, S = k.shape[2], len(r)
            i = torch.arange(S)[:, None]
            j = torch.arange(S)[None]
            own = (j <= i) & (i - j < W)
            full_own = j <= i
            def float_mask(o):
                m = torch.cat([torch.ones(S, P, dtype=torch.bool), o], dim=1)
                return torch.zeros(1, 1, S, P + S).masked_fill(~m, torch.finfo(torch.float32).min)
            if family == "gemma2":   # alternating sliding / full layers
                mask = {"sliding_attention": float_mask(own), "full_attention": float_mask(full_own)}
            else:
                mask = float_mask(own)
            refs.append(model(r[None], attention_mask=mask, cache=prefix_cache(k, v), use_cache=True).logits[0])
    store = softprompt.attach(model)
    for n, (k, v) in prefixes.items():
        store.add(n, k, v)
    ids, mask = left_pad(rows, family)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       task_ids=torch.tensor(tasks)).logits
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b, -len(r):], refs[b], atol=1e-5, rtol=0)
    if family == "mistral":
        assert store.calls["lengths"] > 0 and store.calls["mask"] == 0, store.calls


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_store_cache_convention_round_trip(family):
    model, store, prefixes = _attached(family, trainable=False)
    L, H, D = store.num_layers, store.num_kv_heads, store.head_dim
    assert (L, H, D) == (2, model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads")
                         else 4, 8)
    assert store.dtype == torch.float32 and list(dict(model.named_modules())).count("softprompt_store") == 1
    for n, (k, v) in prefixes.items():
        gk, gv = store.get(n)
        torch.testing.assert_close(gk, k, atol=1e-6, rtol=0)
        assert torch.equal(gv, v)
        stored_k, _ = store.get_stored(n)
        assert torch.equal(stored_k, k) == (family == "gpt2")     # RoPE keys are held pre-rotated
    # replace changes the length and keeps the id
    k2, v2 = torch.randn(L, H, 9, D), torch.randn(L, H, 9, D)
    tid = store.task_id("task0")
    assert store.replace("task0", k2, v2) == tid and store.prefix_len("task0") == 9
    torch.testing.assert_close(store.get("task0")[0], k2, atol=1e-6, rtol=0)
    # per-module back references: weak, not registered as submodules
    mods = [m for m in model.modules() if "_softprompt_slot" in m.__dict__]
    assert len(mods) == L and all(m.__dict__["_softprompt_slot"].store_ref() is store for m in mods)
    assert sum(1 for _ in store.parameters()) == 0 and sum(isinstance(m, ModelPrefixStore)
                                                           for m in model.modules()) == 1


def test_backend_selection_and_override():
    model, store, prefixes = _attached("llama", trainable=False)
    assert store.backend is None
    assert _backend(store, torch.device("cpu")) == "torch"
    assert _backend(store, torch.device("cuda")) == "triton"
    ids, mask = left_pad(random_rows([5, 3, 4, 2]), "llama")
    kw = dict(attention_mask=mask, position_ids=positions_from_mask(mask), task_ids=torch.tensor(TASKS))
    with torch.no_grad():
        default = model(ids, **kw).logits
    softprompt.detach(model)
    store2 = softprompt.attach(model, backend="reference")
    for n, (k, v) in prefixes.items():
        store2.add(n, k, v)
    assert _backend(store2, torch.device("cuda")) == "reference"
    with torch.no_grad():
        torch.testing.assert_close(model(ids, **kw).logits, default, atol=1e-6, rtol=0)
    softprompt.detach(model)
    with pytest.raises(ValueError, match="backend"):
        softprompt.attach(model, backend="nope")
    assert model.config._attn_implementation == "eager"


def test_attach_contract_and_errors():
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config_for("llama")).eval()     # default implementation
    sdpa_like = model.config._attn_implementation
    sig = inspect.signature(model.forward)
    store = softprompt.attach(model)
    assert model.config._attn_implementation == ATTN_NAME
    assert not any(word in ATTN_NAME for word in ("flash", "sdpa", "flex", "paged"))
    assert "task_ids" in inspect.signature(model.forward).parameters
    assert "task_ids" not in sig.parameters
    with pytest.raises(ValueError, match="already attached"):
        softprompt.attach(model)
    ids = torch.tensor([random_rows([5])[0].tolist()])
    with torch.no_grad():   # no task_ids: the plain model
        plain = model(ids).logits
    store.add("t", torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8))
    with torch.no_grad():   # the HF cache holds only the sequence's own tokens
        out = model(ids, task_ids=torch.tensor([0]), use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    softprompt.detach(model)
    assert model.config._attn_implementation == sdpa_like and inspect.signature(model.forward) == sig
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not attached"):
        softprompt.detach(model)

    class Fake(torch.nn.Module):
        config = tf.FalconConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="supported families: " + ", ".join(SUPPORTED_FAMILIES)):
        softprompt.attach(Fake())
    assert set(SUPPORTED_FAMILIES) == {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt_neox",
                                       "gpt2", "opt", "bert", "roberta"}


def test_cross_attention_modules_get_no_prefix():
    """gpt2 with cross-attention: only the self-attention modules get a back reference; the
    cross-attention calls run through the same function with an empty prefix."""
    model = make_model("gpt2", add_cross_attention=True)
    enc = torch.randn(2, 5, 32)
    ids, mask = left_pad(random_rows([4, 3]), "gpt2")
    kw = dict(attention_mask=mask, encoder_hidden_states=enc, position_ids=positions_from_mask(mask),
              encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
    with torch.no_grad():
        ref = model(ids, **kw).logits
    store = softprompt.attach(model)
    assert sum("_softprompt_slot" in m.__dict__ for m in model.modules()) == 2
    with torch.no_grad():
        got = model(ids, **kw).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    store.add("t", torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8))
    with torch.no_grad():
        with_prefix = model(ids, task_ids=torch.tensor([0, 0]), **kw).logits
    assert (with_prefix - got).abs().max() > 1e-3


def test_sliding_window_generate_consistent_and_bf16_smoke():
    """Windowed decode (DynamicSlidingWindowLayer evicts own keys; the prefix stays): a mixed batch
    generates what each row generates alone. bf16: the store follows the model dtype."""
    model, store, prefixes = _attached("mistral", trainable=False, sliding_window=3)
    rows = random_rows([6, 3, 5, 4])
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=3)
    ids, mask = left_pad(rows, "mistral")
    out = model.generate(ids, attention_mask=mask, task_ids=torch.tensor(TASKS), **gen)[:, ids.shape[1]:]
    for b, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               task_ids=torch.tensor([TASKS[b]]), **gen)[0, len(r):]
        assert out[b].tolist() == alone.tolist()

    model = make_model("llama")
    prefixes = random_prefixes(model, [4, 2])
    rows = random_rows([5, 3])
    with torch.no_grad():
        refs = [reference_logits(model, r, *prefixes[f"task{t}"]) for r, t in zip(rows, [0, 1])]
    model = model.to(torch.bfloat16)
    store = softprompt.attach(model)
    assert store.dtype == torch.bfloat16
    for n, (k, v) in prefixes.items():
        store.add(n, k, v)
    ids, mask = left_pad(rows, "llama")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       task_ids=torch.tensor([0, 1])).logits
    assert logits.dtype == torch.bfloat16
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b, -len(r):].float(), refs[b], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deepcopy_of_attached_model_is_independent(family):
    import copy
    model, store, prefixes = _attached(family, trainable=False)
    twin = copy.deepcopy(model)
    twin_store = softprompt.integration.attached_store(twin)
    assert twin_store is not store and twin_store.names == store.names
    assert all(m.__dict__["_softprompt_slot"].store_ref() is twin_store
               for m in twin.modules() if "_softprompt_slot" in m.__dict__)
    ids, mask = left_pad(random_rows([5, 3, 4, 2]), family)
    kw = dict(attention_mask=mask, position_ids=positions_from_mask(mask), task_ids=torch.tensor(TASKS))
    with torch.no_grad():
        a, b = model(ids, **kw).logits, twin(ids, **kw).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)     # same weights, other memory
        twin_store.replace("task1", *(t * 3 for t in prefixes["task1"]))
        torch.testing.assert_close(model(ids, **kw).logits, a, atol=1e-5, rtol=1e-5)  # original untouched
        changed = (twin(ids, **kw).logits - a).abs().amax()
        assert changed > 1e-2, f"the twin's new prefix should change its logits (max change {changed:.2e})"
    softprompt.detach(twin)
    assert twin.config._attn_implementation == "eager" and "task_ids" not in inspect.signature(twin.forward).parameters
    assert "task_ids" in inspect.signature(model.forward).parameters


def test_user_4d_masks_and_attention_dropout():
    """A 4D float mask passed by the caller (returned as is by transformers) is converted: 0/-inf
    masks go to the kernel, a real additive bias to the dense path. Attention dropout in training
    takes the dense path too."""
    model, store, prefixes = _attached("llama", trainable=False)
    rows = random_rows([5, 3, 4, 2])
    ids, mask = left_pad(rows, "llama")
    kw = dict(position_ids=positions_from_mask(mask), task_ids=torch.tensor(TASKS))
    S = ids.shape[1]
    visible = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    float_mask = torch.zeros(len(rows), 1, S, S).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        base = model(ids, attention_mask=mask, **kw).logits
        calls = dict(store.calls)
        four_d = model(ids, attention_mask=float_mask, **kw).logits
        assert store.calls["dense"] == calls["dense"]
        # -1e4 is a finite additive bias (not "blocked"): the dense path, same result
        biased = model(ids, attention_mask=torch.zeros_like(float_mask).masked_fill(~visible, -1e4), **kw).logits
        assert store.calls["dense"] > calls["dense"]
    real = mask.bool()
    torch.testing.assert_close(four_d[real], base[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(biased[real], base[real], atol=1e-5, rtol=0)

    model, store, _ = _attached("gpt2", trainable=True, attn_pdrop=0.5)
    model.train()
    ids, mask = left_pad(rows, "gpt2")
    torch.manual_seed(0)
    out = model(ids, attention_mask=mask, labels=ids, task_ids=torch.tensor(TASKS))
    out.loss.backward()
    assert store.calls["dense"] > 0 and torch.isfinite(out.loss)
    assert store.k_blocks.grad is not None and store.k_blocks.grad.abs().sum() > 0
