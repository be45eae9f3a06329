"""Saving and loading a SoftPromptModel: exact round trips (training state: MLP / LSTM / heads),
atomic writes, and clear errors that leave the model untouched on truncated or mismatched files.
(Kill -9 during saves: test_crash_safety.py; random operations and corruption: test_fuzz_checkpoint.py.)"""
import hashlib
import json
import math
import time

import pytest
import torch
import transformers as tf

from softprompt import PrefixTuning, PromptTuning, PTuningV1, PTuningV2, SoftPromptModel
from softprompt.integration.attach import attached_store
from softprompt.methods import checkpoint
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


def files(directory):
    """(weights path, manifest path) of a checkpoint folder: the manifest names the weights file."""
    manifest = directory / "softprompt.json"
    return directory / json.loads(manifest.read_text())["weights"], manifest


def resign(directory, meta=None):
    """Rewrite the manifest (``meta``, default: as it is) with both checksums recomputed, as a careful
    forger or a hand edit that knows the format would: the checks behind the checksums must hold."""
    w, c = files(directory)
    meta = json.loads(c.read_text()) if meta is None else meta
    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    if "sha256" in meta:                          # version 1 manifests had no checksum of their own
        meta["sha256"] = checkpoint._digest(meta)
    c.write_text(json.dumps(meta))


def _logits(spm, ids):
    spm.eval()
    with torch.no_grad():
        return spm(ids, tasks=list(TASKS)).logits


def test_round_trip_is_exact_and_keeps_training_state(tmp_path):
    spm = _trained()
    spm.prompts["v2"].fold()                                 # no-op for v2; structure recorded either way
    spm.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[1] == "softprompt.json" and files(tmp_path)[0].name == names[0]
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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "checksum", "manifest", "json", "missing"])
def test_damaged_checkpoint_is_a_clear_error_and_model_untouched(tmp_path, damage):
    _trained().save(tmp_path)
    w, c = files(tmp_path)
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "garbage":
        blob = bytearray(w.read_bytes())
        blob[-8:] = b"\xff" * 8
        w.write_bytes(bytes(blob))
    elif damage == "checksum":
        meta = json.loads(c.read_text())
        meta["weights_sha256"] = "0" * 64
        meta["sha256"] = checkpoint._digest(meta)           # the manifest is consistent, the weights not
        c.write_text(json.dumps(meta))
    elif damage == "manifest":                          # a field edited, the manifest's checksum not updated
        meta = json.loads(c.read_text())
        meta["model_class"] = "SomethingElse"
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
    _trained().save(tmp_path)
    w, c = files(tmp_path)
    tensors = load_file(w)
    tensors["tasks.v2.embedding.weight"] = tensors["tasks.v2.embedding.weight"][:2].contiguous()
    save_file(tensors, w)
    resign(tmp_path)
    model = make_model("llama")
    with pytest.raises(ValueError, match="task 'v2' tensor 'embedding.weight' has shape"):
        SoftPromptModel.load(model, tmp_path)
    assert attached_store(model) is None


def _state(directory):
    """What a checkpoint folder loads as: {task: {tensor: value}}."""
    spm = SoftPromptModel.load(make_model("llama"), directory)
    return {n: {k: v.clone() for k, v in spm.prompts[n].state_dict().items()} for n in spm.tasks}


def _same(a, b):
    return a.keys() == b.keys() and all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k])
                                                                            for k in a[n]) for n in a)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_save_is_atomic_on_failure(tmp_path, monkeypatch, fail_at):
    """A save that dies at its first rename (weights) or its second (the manifest: new weights already in
    place) leaves the previous save loadable and whole; the next save clears what it left. The old code
    replaced softprompt.safetensors first, so a failure at the second rename lost both saves."""
    spm = _trained()
    spm.save(tmp_path)
    before = _state(tmp_path)
    manifest = (tmp_path / "softprompt.json").read_bytes()
    real, calls = checkpoint.os.replace, []

    def flaky(*a, **k):
        calls.append(a)
        if len(calls) == fail_at:
            raise OSError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(checkpoint.os, "replace", flaky)
    spm.add_task("extra", PTuningV2(2))
    with pytest.raises(OSError):
        spm.save(tmp_path)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert (tmp_path / "softprompt.json").read_bytes() == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _same(_state(tmp_path), before)
    spm.save(tmp_path)                                   # the next save succeeds and leaves one version
    assert len(list(tmp_path.iterdir())) == 2
    assert _state(tmp_path).keys() == set(TASKS) | {"extra"}


def test_old_weights_and_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    spm = _trained()
    spm.save(tmp_path)
    old_weights = files(tmp_path)[0]
    for name in (".softprompt.json.x1.tmp", ".softprompt-0123456789abcdef.safetensors.x2.tmp",
                 "softprompt-0123456789abcdef.safetensors"):
        (tmp_path / name).write_bytes(b"left by a killed save")
    (tmp_path / "notes.txt").write_text("not ours")
    spm.remove_task("v2")
    spm.save(tmp_path)
    assert not old_weights.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([files(tmp_path)[0].name, "notes.txt",
                                                                 "softprompt.json"])
    assert sorted(_state(tmp_path)) == sorted(set(TASKS) - {"v2"})


def test_a_load_racing_a_save_reads_the_new_save(tmp_path, monkeypatch):
    """A save that lands between reading the manifest and reading the weights it names (whose file the
    save removes) makes the reader start over with the new manifest, not fail."""
    spm = _trained()
    spm.save(tmp_path)
    spm.remove_task("v2")
    parse, raced = checkpoint._parse_manifest, []

    def parse_then_save(*args):
        meta = parse(*args)
        if not raced:
            raced.append(True)
            spm.save(tmp_path)
        return meta
    monkeypatch.setattr(checkpoint, "_parse_manifest", parse_then_save)
    assert SoftPromptModel.load(make_model("llama"), tmp_path).tasks == spm.tasks
    assert raced


def test_version_1_folders_still_load(tmp_path):
    """The previous layout (softprompt.json + softprompt.safetensors, no manifest checksum) loads; the
    next save converts the folder (and removes the old weights file)."""
    spm = _trained()
    spm.save(tmp_path)
    w, c = files(tmp_path)
    meta = json.loads(c.read_text())
    del meta["sha256"]
    meta.update(version=1, weights="softprompt.safetensors")
    w.rename(tmp_path / "softprompt.safetensors")
    c.write_text(json.dumps(meta))
    want = _state(tmp_path)
    assert _same(want, {n: spm.prompts[n].state_dict() for n in spm.tasks})
    spm.save(tmp_path)
    assert not (tmp_path / "softprompt.safetensors").exists()
    assert _same(_state(tmp_path), want)


class _NoBigAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails, before it allocates, the tensor factory call that takes the elements created inside the
    block past ``limit`` (one huge tensor, or many small ones: an LSTM of 10**9 layers)."""

    def __init__(self, limit=10 ** 7):
        super().__init__()
        self.left = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema.arguments
        if schema and schema[0].name == "size":
            self.left -= math.prod(args[0])
            if self.left < 0:
                raise AssertionError(f"too much allocated; last: {func} of size {list(args[0])}")
        return func(*args, **(kwargs or {}))


BIG = 10 ** 9


def _task(meta, name):
    return next(t for t in meta["tasks"] if t["name"] == name)


TAMPER = {   # the manifest fields that size modules; each raised to "terabytes"
    "prefix.num_virtual_tokens": lambda m: _task(m, "prefix")["config"].update(num_virtual_tokens=BIG),
    "prefix.projection_dim": lambda m: _task(m, "prefix")["config"].update(projection_dim=BIG),
    "prefix.folded_projection_dim": lambda m: (_task(m, "prefix")["config"].update(projection_dim=BIG),
                                               _task(m, "prefix").update(structure={"folded": True})),
    "v2.num_virtual_tokens": lambda m: _task(m, "v2")["config"].update(num_virtual_tokens=BIG),
    "prompt.num_virtual_tokens": lambda m: _task(m, "prompt")["config"].update(num_virtual_tokens=BIG),
    "ptuning.hidden_size": lambda m: _task(m, "ptuning")["config"].update(hidden_size=BIG),
    "ptuning.num_layers": lambda m: _task(m, "ptuning")["config"].update(num_layers=BIG),
    "ptuning.template": lambda m: _task(m, "ptuning")["config"].update(template=[["virtual", BIG], ["input"]],
                                                                       num_virtual_tokens=BIG),
    "geometry.hidden_size": lambda m: m["geometry"].update(hidden_size=BIG),
}


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("field", list(TAMPER))
def test_tampered_sizes_fail_fast_without_allocating(tmp_path, field, signed):
    """A manifest that asks for huge modules is a ValueError before anything is allocated: first its
    checksum, and with the checksum recomputed the tensors' shapes (the old code built the modules
    first, allocating up to terabytes)."""
    _trained().save(tmp_path)
    c = tmp_path / "softprompt.json"
    meta = json.loads(c.read_text())
    TAMPER[field](meta)
    if signed:
        resign(tmp_path, meta)
    else:
        c.write_text(json.dumps(meta))
    model = make_model("llama")
    start = time.perf_counter()
    with _NoBigAllocations(), pytest.raises(ValueError, match="checksum" if not signed else
                                            "does not fit|has shape|lacks tensor|has tensors"):
        SoftPromptModel.load(model, tmp_path)
    assert time.perf_counter() - start < 10
    assert attached_store(model) is None


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(tasks="x"), "`tasks`"),
    (lambda m: m.update(tasks=["x"]), "`tasks`"),
    (lambda m: m.update(heads="classifier"), "`heads`"),
    (lambda m: m.update(geometry=[1, 2]), "`geometry`"),
    (lambda m: m.update(version="2"), "`version`"),
    (lambda m: m.update(weights="../elsewhere.safetensors"), "`weights`"),
    (lambda m: m["tasks"][0].update(config=None), "`config`"),
    (lambda m: m["tasks"][0].update(config={"num_virtual_tokens": "5"}), "`config`"),
    (lambda m: m["tasks"][0].update(structure=[]), "`structure`"),
    (lambda m: m["tasks"][0].update(structure={"folded": "yes"}), "`config`"),
    (lambda m: m["tasks"][0].update(name=None), "task `name`"),
    (lambda m: m["tasks"][0].update(method="lora"), "`method`"),
    (lambda m: _task(m, "ptuning")["config"].update(template=[["virtual", -2], ["virtual", 3], ["input"]]),
     "`config`"),
    (lambda m: _task(m, "ptuning")["config"].update(template=[["virtual", 3], ["input"], ["tokens"]]),
     "`config`"),
    (lambda m: _task(m, "ptuning")["config"].update(template=[["virtual", 3], ["input"], ["tokens", [-1]]]),
     "`config` does not fit the model"),
    (lambda m: m["tasks"][0].update(method=[]), "`method`"),
])
def test_malformed_manifest_fields_are_a_value_error_naming_the_field(tmp_path, edit, field):
    _trained().save(tmp_path)
    meta = json.loads((tmp_path / "softprompt.json").read_text())
    edit(meta)
    resign(tmp_path, meta)
    model = make_model("llama")
    with pytest.raises(ValueError, match=f"softprompt.json' is invalid: .*{field}"):
        SoftPromptModel.load(model, tmp_path)
    assert attached_store(model) is None


def test_stray_tensors_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file
    _trained().save(tmp_path)
    w, _ = files(tmp_path)
    tensors = load_file(w)
    tensors["tasks.ghost.embedding.weight"] = torch.zeros(2, 2)
    save_file(tensors, w)
    resign(tmp_path)
    with pytest.raises(ValueError, match="tasks.ghost.embedding.weight.* belong to no task"):
        SoftPromptModel.load(make_model("llama"), tmp_path)


def test_save_tasks_takes_one_name_or_a_list(tmp_path):
    """save(tasks="pt") saves the task "pt" (it used to save the tasks "p" and "t")."""
    spm = SoftPromptModel(make_model("llama"))
    for name in ("p", "t", "pt"):
        spm.add_task(name, PTuningV2(2))
    spm.save(tmp_path / "one", tasks="pt")
    assert SoftPromptModel.load(make_model("llama"), tmp_path / "one").tasks == ["pt"]
    spm.save(tmp_path / "two", tasks=("t", "p"))
    assert SoftPromptModel.load(make_model("llama"), tmp_path / "two").tasks == ["t", "p"]
    for bad, why in ((["p", "p"], "twice"), (["p", 3], "is invalid"), (5, "is invalid"), (["q"], "not tasks")):
        with pytest.raises(ValueError, match=f"`tasks` .*{why}"):
            spm.save(tmp_path / "bad", tasks=bad)
    assert not (tmp_path / "bad").exists()


def test_save_refuses_non_finite_prompts_and_keeps_the_previous_save(tmp_path):
    """A NaN prompt would be written and then refused by load: the save is refused instead."""
    spm = _trained()
    spm.save(tmp_path)
    before = _state(tmp_path)
    with torch.no_grad():
        spm.prompts["v2"].embedding.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="tasks.v2.embedding.weight contains NaN"):
        spm.save(tmp_path)
    assert _same(_state(tmp_path), before)


def test_checkpoint_of_another_model_says_what_differs(tmp_path):
    _trained().save(tmp_path)
    model = make_model("gpt2")
    with pytest.raises(ValueError, match=r"does not fit the model: (?s:.*)saved from a LlamaForCausalLM "
                                         r"\(model_type llama; num_layers=2(?s:.*)this model is a GPT2LMHeadModel"):
        SoftPromptModel.load(model, tmp_path)
    assert attached_store(model) is None
    with pytest.raises(TypeError, match="`directory`"):
        SoftPromptModel.load(make_model("llama"), None)


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
