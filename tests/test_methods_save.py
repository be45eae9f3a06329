"""Saving and loading a SoftPromptModel: exact round trips (training state: MLP / LSTM / heads),
atomic writes, and clear errors that leave the model untouched on truncated or mismatched files."""
import json

import pytest
import torch
import transformers as tf

from softprompt import PrefixTuning, PromptTuning, PTuningV1, PTuningV2, SoftPromptModel
from softprompt.integration.attach import attached_store
from test_integration_common import config_for, make_model, random_rows

TASKS = {
    "prefix": PrefixTuning(5, projection_dim=12, prefix_dropout=0.1),
    "v2": PTuningV2(3),
    "prompt": PromptTuning(4, init="text", init_text=[9, 10, 11]),
    "ptuning": PTuningV1(template=[2, "{x}", 1, [5, 6]], encoder="lstm", hidden_size=8),
}


def _trained(family="llama", seed=0):
    torch.manual_seed(seed)
    spm = SoftPromptModel(make_model(family))
    for name, cfg in TASKS.items():
        spm.add_task(name, cfg)
    with torch.no_grad():
        for p in spm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return spm


def _logits(spm, ids):
    spm.eval()
    with torch.no_grad():
        return spm(ids, tasks=list(TASKS)).logits


def test_round_trip_is_exact_and_keeps_training_state(tmp_path):
    spm = _trained()
    spm.prompts["v2"].fold()                                 # no-op for v2; structure recorded either way
    spm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["softprompt.json", "softprompt.safetensors"]
    ids = torch.stack(random_rows([6] * 4))
    loaded = SoftPromptModel.load(make_model("llama"), tmp_path)
    assert loaded.tasks == spm.tasks
    for name in TASKS:
        a, b = spm.prompts[name].state_dict(), loaded.prompts[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        assert loaded.prompts[name].config.to_dict() == spm.prompts[name].config.to_dict()
    assert hasattr(loaded.prompts["prefix"], "transform")     # the MLP is kept: training can resume
    assert hasattr(loaded.prompts["ptuning"], "lstm_head")
    torch.testing.assert_close(_logits(loaded, ids), _logits(spm, ids), atol=1e-5, rtol=1e-5)
    # a folded prefix round-trips folded
    spm.prompts["prefix"].fold()
    spm.save(tmp_path / "folded")
    again = SoftPromptModel.load(make_model("llama"), tmp_path / "folded")
    assert not hasattr(again.prompts["prefix"], "transform")
    torch.testing.assert_close(_logits(again, ids), _logits(spm, ids), atol=1e-5, rtol=1e-5)


def test_heads_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(config_for("bert", num_labels=2),
                                                              attn_implementation="eager")
    spm = SoftPromptModel(model, trainable_heads=["classifier"])
    spm.add_task("v2", PTuningV2(4))
    with torch.no_grad():
        spm.model.classifier.weight.mul_(3)
    spm.save(tmp_path)
    torch.manual_seed(1)
    fresh = tf.AutoModelForSequenceClassification.from_config(config_for("bert", num_labels=2),
                                                              attn_implementation="eager")
    loaded = SoftPromptModel.load(fresh, tmp_path)
    assert loaded.trainable_heads == ["classifier"]
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert fresh.classifier.weight.requires_grad


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model, snap, attached=False):
    assert (attached_store(model) is not None) == attached
    state = model.state_dict()
    for k, v in snap.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("damage", ["truncate", "garbage", "checksum", "json", "missing"])
def test_damaged_checkpoint_is_a_clear_error_and_model_untouched(tmp_path, damage):
    _trained().save(tmp_path)
    w, c = tmp_path / "softprompt.safetensors", tmp_path / "softprompt.json"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "garbage":
        blob = bytearray(w.read_bytes())
        blob[-8:] = b"\xff" * 8
        w.write_bytes(bytes(blob))
    elif damage == "checksum":
        meta = json.loads(c.read_text())
        meta["weights_sha256"] = "0" * 64
        c.write_text(json.dumps(meta))
    elif damage == "json":
        c.write_text(c.read_text()[:50])
    else:
        w.unlink()
    model = make_model("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="softprompt checkpoint .* is invalid"):
        SoftPromptModel.load(model, tmp_path)
    _untouched(model, snap)
    # loading into an existing SoftPromptModel leaves its tasks and the store as they were
    spm = SoftPromptModel(model)
    spm.add_task("mine", PTuningV2(2))
    before = spm.store.get("mine")
    with pytest.raises(ValueError, match="is invalid"):
        spm.load_tasks(tmp_path)
    assert spm.tasks == ["mine"] and len(spm.store) == 2
    assert all(torch.equal(a, b) for a, b in zip(spm.store.get("mine"), before))


@pytest.mark.parametrize("change,field", [({"num_hidden_layers": 3}, "num_layers"),
                                          ({"num_key_value_heads": 4}, "num_kv_heads"),
                                          ({"hidden_size": 48, "head_dim": 8}, "hidden_size"),
                                          ({"vocab_size": 100}, "vocab_size")])
def test_mismatched_model_is_a_clear_error(tmp_path, change, field):
    _trained().save(tmp_path)
    model = make_model("llama", **change)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=f"does not fit the model: {field}"):
        SoftPromptModel.load(model, tmp_path)
    _untouched(model, snap)


def test_tampered_shapes_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file
    import hashlib
    _trained().save(tmp_path)
    w, c = tmp_path / "softprompt.safetensors", tmp_path / "softprompt.json"
    tensors = load_file(w)
    tensors["tasks.v2.embedding.weight"] = tensors["tasks.v2.embedding.weight"][:2].contiguous()
    save_file(tensors, w)
    meta = json.loads(c.read_text())
    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    c.write_text(json.dumps(meta))
    model = make_model("llama")
    with pytest.raises(ValueError, match="task 'v2' tensor 'embedding.weight' has shape"):
        SoftPromptModel.load(model, tmp_path)
    assert attached_store(model) is None


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    spm = _trained()
    spm.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import softprompt.methods.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck.os, "replace", boom)
    spm.add_task("extra", PTuningV2(2))
    with pytest.raises(OSError):
        spm.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # no temp files left, old intact


def test_training_resumes_identically_after_load(tmp_path):
    spm = _trained()
    spm.save(tmp_path)
    loaded = SoftPromptModel.load(make_model("llama"), tmp_path)
    ids = torch.stack(random_rows([6] * 4, seed=5))
    for m in (spm, loaded):
        m.train()
        m.prompts["prefix"].dropout.p = 0.0  # dropout off so both runs are deterministic
        opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
        m(ids, tasks=list(TASKS), labels=ids).loss.backward()
        opt.step()
    for name in TASKS:
        for (k, a), b in zip(spm.prompts[name].state_dict().items(), loaded.prompts[name].state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}.{k}: {m}")


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_v1_text_init_starts_at_the_text_and_round_trips(tmp_path, encoder):
    """init='text': the encoder's first output is the word embeddings of the text (repeated to P);
    a saved text-initialised prompt loads back exactly (the load needs no word embeddings)."""
    torch.manual_seed(0)
    spm = SoftPromptModel(make_model("llama"))
    tok = type("Tok", (), {"__call__": lambda self, text, add_special_tokens=False: {"input_ids": [7, 8, 9]}})()
    spm.add_task("t", PTuningV1(num_virtual_tokens=5, encoder=encoder, hidden_size=32, init="text",
                                init_text="seven eight nine", tokenizer=tok))   # a string: the saved config has no tokenizer
    words = spm.model.get_input_embeddings().weight.detach()[[7, 8, 9, 7, 8]]
    got = spm.prompts["t"].embeddings().detach()
    torch.testing.assert_close(got, words, atol=2e-3 * float(words.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="init_text"):
        PTuningV1(num_virtual_tokens=5, init="text")
    spm.save(tmp_path / "ckpt")
    back = SoftPromptModel(make_model("llama"))
    back.model.load_state_dict(spm.model.state_dict())
    back.load_tasks(tmp_path / "ckpt")
    torch.testing.assert_close(back.prompts["t"].embeddings(), spm.prompts["t"].embeddings())


@pytest.mark.parametrize("projection", [None, 24])
def test_deep_prompt_start_from_a_given_prefix(projection):
    """start_from: a raw prefix is copied; an MLP-reparameterised one is fitted to output it."""
    torch.manual_seed(0)
    spm = SoftPromptModel(make_model("llama"))
    spm.add_task("t", PrefixTuning(4, projection_dim=projection, init="zero"))
    module = spm.prompts["t"]
    k0, v0 = module.prefix()
    k, v = torch.randn_like(k0) * 0.5, torch.randn_like(v0) * 0.5
    module.start_from(k, v)
    got_k, got_v = module.prefix()
    tol = 0 if projection is None else 3e-3
    torch.testing.assert_close(got_k, k, atol=tol, rtol=0)
    torch.testing.assert_close(got_v, v, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        module.start_from(k[:, :, :2], v[:, :, :2])
