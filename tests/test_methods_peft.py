"""PEFT interchange: adapters made with PEFT itself (0.21.x) load into SoftPromptModel and reproduce
PEFT's training-mode forward logits (fp32, 1e-5); exported adapters load in PEFT and reproduce ours.

Prefix tuning on BERT: PEFT 0.21 refuses its forward on transformers 5.x ("Model does not support past
key values ...": it looks for a ``past_key_values`` argument, now ``cache``), but it creates and saves
the adapter. There we compare against what PEFT would feed the model: the stock eager model with the
adapter's prefix in a pre-filled ``DynamicCache`` (PEFT's ``get_prompt`` layout) and a mask of P + S.
"""
import json

import pytest
import torch
import transformers as tf

peft = pytest.importorskip("peft")
from peft import (PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType,  # noqa: E402
                  get_peft_model)

from softprompt import SoftPromptModel  # noqa: E402
from softprompt.methods import PrefixTuning, PromptTuning, PTuningV1, PTuningV2, flat_to_kv  # noqa: E402
from test_integration_common import make_model, prefix_cache, random_rows  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def _bert_cls(seed=0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=3, max_position_embeddings=128)
    return tf.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()


def _batch(lengths=(6, 6, 6), seed=3):
    rows = random_rows(list(lengths), seed=seed)
    return torch.stack(rows)


CAUSAL = {
    "prefix_mlp": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=True,
                                             encoder_hidden_size=24),
    "prefix_raw": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "ptuning_mlp": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                               encoder_hidden_size=16),
    "ptuning_lstm": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                                encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
}
EXPECTED_METHOD = {"prefix_mlp": "prefix_tuning", "prefix_raw": "prefix_tuning", "prompt": "prompt_tuning",
                   "ptuning_mlp": "p_tuning_v1", "ptuning_lstm": "p_tuning_v1"}


@pytest.mark.parametrize("family,kind", [("llama", k) for k in CAUSAL] + [("gpt2", "prefix_mlp"), ("gpt2", "prompt")])
def test_peft_causal_adapter_reproduces_peft_training_forward(tmp_path, family, kind):
    torch.manual_seed(11)
    pm = get_peft_model(make_model(family), CAUSAL[kind]())
    pm.train()
    ids = _batch()
    labels = ids.clone()
    want = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    pm.save_pretrained(tmp_path)

    spm = SoftPromptModel(make_model(family))
    spm.load_peft(tmp_path, task="t")
    assert spm.method_of("t") == EXPECTED_METHOD[kind]
    spm.train()
    got = spm(ids, tasks="t", labels=labels)                 # the fused loss: no logits
    S = ids.shape[1]
    torch.testing.assert_close(spm(ids, tasks="t").logits, want.logits[:, -S:], **TOL)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    spm.fused_loss = False                                   # the model's own head and loss
    plain = spm(ids, tasks="t", labels=labels)
    torch.testing.assert_close(plain.logits, want.logits[:, -S:], **TOL)
    torch.testing.assert_close(plain.loss, want.loss, **TOL)


@pytest.mark.parametrize("kind", ["prompt", "ptuning_mlp"])
def test_peft_seq_cls_prompt_adapter_on_bert(tmp_path, kind):
    torch.manual_seed(5)
    cfg = (PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4) if kind == "prompt" else
           PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, encoder_hidden_size=16))
    pm = get_peft_model(_bert_cls(), cfg)
    with torch.no_grad():                           # a trained head differs from the base model's
        pm.base_model.classifier.modules_to_save["default"].weight.mul_(-2.0)
    pm.train()
    ids = _batch((7, 7))
    want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    pm.save_pretrained(tmp_path)
    spm = SoftPromptModel(_bert_cls(), trainable_heads=["classifier"])
    spm.load_peft(tmp_path, task="cls")
    spm.train()
    torch.testing.assert_close(spm(ids, tasks="cls").logits, want, **TOL)


@pytest.mark.parametrize("projection", [False, True])
def test_peft_prefix_adapter_on_bert_matches_cache_reference(tmp_path, projection):
    torch.manual_seed(7)
    cfg = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, prefix_projection=projection,
                             encoder_hidden_size=20)
    pm = get_peft_model(_bert_cls(), cfg)
    pm.save_pretrained(tmp_path)                    # PEFT's own forward raises on transformers 5.x here
    flat = peft.utils.load_peft_weights(str(tmp_path))["prompt_embeddings"]
    spm = SoftPromptModel(_bert_cls())
    spm.load_peft(tmp_path, task="v2", heads=False)
    assert spm.method_of("v2") == "p_tuning_v2"
    spm.train()
    ids = _batch((7, 7))
    got = spm(ids, tasks="v2").logits
    ref = _bert_cls().train()
    geometry = spm.geometry
    k, v = flat_to_kv(flat, geometry)
    mask = torch.ones(ids.shape[0], 4 + ids.shape[1], dtype=torch.long)
    want = ref(ids, attention_mask=mask, cache=prefix_cache(k, v, batch=ids.shape[0]), use_cache=True).logits
    torch.testing.assert_close(got, want, **TOL)


EXPORTS = {"prefix": PrefixTuning(5, projection_dim=12), "v2": PTuningV2(3), "prompt": PromptTuning(4),
           "ptuning": PTuningV1(num_virtual_tokens=3, encoder="lstm", hidden_size=8)}


@pytest.mark.parametrize("family,kind", [("llama", k) for k in EXPORTS] + [("gpt2", "prefix"), ("gpt2", "prompt")])
def test_exported_adapter_loads_in_peft(tmp_path, family, kind):
    config = EXPORTS[kind]
    torch.manual_seed(2)
    spm = SoftPromptModel(make_model(family))
    spm.add_task("t", config)
    with torch.no_grad():
        for p in spm.prompts["t"].parameters():
            p.mul_(0.5)
    spm.export_peft("t", tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    pm = PeftModel.from_pretrained(make_model(family), str(tmp_path))
    assert pm.peft_config["default"].peft_type.value == saved["peft_type"]
    pm.train()
    ids = _batch()
    spm.train()
    got = spm(ids, tasks="t").logits
    if config.kind == "deep":
        # PEFT's prefix-tuning generate path is broken on transformers 5.x, its training forward is not;
        # in inference_mode it reads the saved prefix directly
        want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    else:
        want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(got, want, **TOL)
    # and back: the exported adapter loads here again
    spm.load_peft(tmp_path, task="again")
    torch.testing.assert_close(spm(ids, tasks="again").logits, got, **TOL)


def test_load_peft_errors_leave_model_untouched(tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(make_model("llama"), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    pm.save_pretrained(tmp_path)
    spm = SoftPromptModel(make_model("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match="num_layers"):
        spm.load_peft(tmp_path, task="t")
    assert spm.tasks == []
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    spm2 = SoftPromptModel(make_model("llama"))
    with pytest.raises(ValueError, match="safetensors"):
        spm2.load_peft(tmp_path, task="t")
    assert spm2.tasks == [] and "t" not in spm2.store
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        spm2.load_peft(tmp_path / "nowhere", task="t")


def test_exported_seq_cls_adapter_with_head_loads_in_peft(tmp_path):
    torch.manual_seed(4)
    spm = SoftPromptModel(_bert_cls(), trainable_heads=["classifier"])
    spm.add_task("cls", PromptTuning(4))
    with torch.no_grad():
        spm.model.classifier.weight.mul_(-3.0)                 # a "trained" head
    spm.export_peft("cls", tmp_path)
    pm = PeftModel.from_pretrained(_bert_cls(), str(tmp_path))
    ids = _batch((7, 7))
    pm.eval()
    spm.eval()
    with torch.no_grad():
        torch.testing.assert_close(spm(ids, tasks="cls").logits,
                                   pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, **TOL)


def _exported(tmp_path, family="llama"):
    """A prefix-tuning adapter folder written by export_peft, and its (config, tensors)."""
    from safetensors.torch import load_file
    torch.manual_seed(1)
    spm = SoftPromptModel(make_model(family))
    spm.add_task("t", PTuningV2(3))
    spm.export_peft("t", tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text()), load_file(tmp_path / "adapter_model.safetensors")


def _rewrite(tmp_path, config=None, tensors=None):
    from safetensors.torch import save_file
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("key", ["base_model.model.embed_tokens.weight",
                                 "base_model.model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])
def test_load_peft_refuses_tensors_that_would_overwrite_the_base_model(tmp_path, key, heads):
    """Only prompt_embeddings and the modules the adapter declares in modules_to_save load; the old code
    copied any other base-model tensor of the adapter into the frozen model (heads=True, silently)."""
    config, tensors = _exported(tmp_path)
    model = make_model("llama")
    name = key[len("base_model."):] if key.startswith("base_model.") else key
    tensors[key] = torch.full_like(model.state_dict()[name], 7.0)
    _rewrite(tmp_path, tensors=tensors)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    spm = SoftPromptModel(model)
    with pytest.raises(ValueError, match=f"tensor '{key}' is neither 'prompt_embeddings' nor .*modules_to_save"):
        spm.load_peft(tmp_path, task="t", heads=heads)
    assert spm.tasks == []
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snap.items())
    # declared, the same module is a head and loads (heads=True) or is left alone (heads=False)
    config["modules_to_save"] = [name.rpartition(".")[0].rpartition(".")[2]]     # e.g. "embed_tokens"
    _rewrite(tmp_path, config=config)
    spm.load_peft(tmp_path, task="t", heads=heads)
    assert torch.equal(model.state_dict()[name], tensors[key] if heads else snap[name])


@pytest.mark.parametrize("content,why", [
    ("null", "the config is NoneType None; expected a JSON object"),
    ("[]", "the config is list \\[\\]; expected a JSON object"),
    ('{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": "3"}', "`num_virtual_tokens` '3' is invalid"),
    ('{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "modules_to_save": "classifier"}',
     "`modules_to_save` 'classifier' is invalid"),
    ('{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_transformer_submodules": 3}',
     "`num_transformer_submodules` is 3; only 1 is supported"),
])
def test_malformed_adapter_config_is_a_value_error_naming_file_and_field(tmp_path, content, why):
    """A config of null / [] raised AttributeError; num_transformer_submodules=3 was reported as 2."""
    _exported(tmp_path)
    (tmp_path / "adapter_config.json").write_text(content)
    spm = SoftPromptModel(make_model("llama"))
    with pytest.raises(ValueError, match=f"adapter_config.json' is invalid: {why}"):
        spm.load_peft(tmp_path, task="t")
    assert spm.tasks == []
