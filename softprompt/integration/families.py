"""Per-family facts for the transformers integration, and the lists of supported families.

A family is a ``config.model_type``. For each one we record which attention-module classes are
the self-attention layers that get a prefix (in decoder-only and encoder-only families,
cross-attention modules share the attention function but never get one), and how the family
encodes positions:

* ``"rope"``: rotary keys. Stored prefix keys are pre-rotated by ``-P_t`` so real tokens keep the
  model's own position ids (see :mod:`softprompt.integration.positions`).
* ``"arange"`` (gpt2, bert), ``"mask_cumsum"`` (opt), ``"padding_idx"`` (roberta): learned absolute
  positions. Real tokens get ``position_ids + P_t``, computed the way the family computes its
  default position ids.

Encoder-decoder families (``ENCODER_DECODER_FAMILIES``: t5, bart) get a prefix on three kinds of
attention (``KINDS``), found by module *name* (T5 reuses one ``T5Attention`` class and the same
``layer_idx`` for all three roles):

* T5: ``encoder.block.i.layer.0.SelfAttention``, ``decoder.block.i.layer.0.SelfAttention``,
  ``decoder.block.i.layer.1.EncDecAttention``;
* BART: ``encoder.layers.i.self_attn``, ``decoder.layers.i.self_attn``,
  ``decoder.layers.i.encoder_attn``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    attention_classes: Tuple[str, ...]
    positions: str                      # "rope" | "arange" | "mask_cumsum" | "padding_idx"
    bidirectional: bool = False

    @property
    def rope(self) -> bool:
        return self.positions == "rope"


FAMILIES = {
    "llama": Family("llama", ("LlamaAttention",), "rope"),
    "qwen2": Family("qwen2", ("Qwen2Attention",), "rope"),
    "qwen3": Family("qwen3", ("Qwen3Attention",), "rope"),
    "mistral": Family("mistral", ("MistralAttention",), "rope"),
    "gemma": Family("gemma", ("GemmaAttention",), "rope"),
    "gemma2": Family("gemma2", ("Gemma2Attention",), "rope"),
    "phi3": Family("phi3", ("Phi3Attention",), "rope"),
    "gpt_neox": Family("gpt_neox", ("GPTNeoXAttention",), "rope"),
    "gpt2": Family("gpt2", ("GPT2Attention",), "arange"),
    "opt": Family("opt", ("OPTAttention",), "mask_cumsum"),
    "bert": Family("bert", ("BertSelfAttention",), "arange", bidirectional=True),
    "roberta": Family("roberta", ("RobertaSelfAttention",), "padding_idx", bidirectional=True),
}

SUPPORTED_FAMILIES: Tuple[str, ...] = tuple(FAMILIES)

ENCODER_DECODER_FAMILIES: Dict[str, Family] = {
    "t5": Family("t5", ("T5Attention",), "relative_bias"),
    "bart": Family("bart", ("BartAttention",), "learned"),
}

# the prefix kinds of an encoder-decoder model, in the order of the store's virtual layers
KINDS = ("encoder", "decoder", "cross")

# module-name patterns (matched at the end of the qualified name, any wrapper prefix allowed)
_PATTERNS = {
    "t5": {"encoder": r"(?:^|\.)encoder\.block\.(\d+)\.layer\.0\.SelfAttention$",
           "decoder": r"(?:^|\.)decoder\.block\.(\d+)\.layer\.0\.SelfAttention$",
           "cross": r"(?:^|\.)decoder\.block\.(\d+)\.layer\.1\.EncDecAttention$"},
    "bart": {"encoder": r"(?:^|\.)encoder\.layers\.(\d+)\.self_attn$",
             "decoder": r"(?:^|\.)decoder\.layers\.(\d+)\.self_attn$",
             "cross": r"(?:^|\.)decoder\.layers\.(\d+)\.encoder_attn$"},
}

# Rope schedules whose frequencies depend on the sequence length: a fixed pre-rotation is not exact.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(model: nn.Module) -> Family:
    """The model's :class:`Family`, or a ``ValueError`` listing the supported ones."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"softprompt.attach: `model` of type {type(model).__name__} is invalid; "
                         "expected a transformers PreTrainedModel with a `config`")
    model_type = getattr(text_config(model), "model_type", None)
    if model_type in ENCODER_DECODER_FAMILIES:
        return ENCODER_DECODER_FAMILIES[model_type]
    if model_type not in FAMILIES:
        raise ValueError(f"softprompt.attach: model family {model_type!r} ({type(model).__name__}) is not "
                         f"supported; supported families: {', '.join(SUPPORTED_FAMILIES)} (encoder-decoder: "
                         f"{', '.join(ENCODER_DECODER_FAMILIES)})")
    return FAMILIES[model_type]


def is_encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(text_config(model), "model_type", None) in ENCODER_DECODER_FAMILIES


def geometry(model: nn.Module) -> Tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` from the model's config (encoder-decoder models:
    ``num_layers`` counts the virtual layers encoder + decoder self + cross, see ``encdec``)."""
    if is_encoder_decoder(model):
        return _encoder_decoder_geometry(model)
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def self_attention_modules(model: nn.Module, family: Family) -> List[nn.Module]:
    """The self-attention modules, in layer order (cross-attention modules are left out)."""
    found = [m for m in model.modules()
             if type(m).__name__ in family.attention_classes and not getattr(m, "is_cross_attention", False)]
    num_layers = geometry(model)[0]
    if len(found) != num_layers:
        raise ValueError(f"softprompt.attach: found {len(found)} self-attention modules of classes "
                         f"{family.attention_classes} in {type(model).__name__}; expected one per layer "
                         f"(num_hidden_layers={num_layers})")
    return found


def encoder_decoder_modules(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """``{kind: [module of layer 0, 1, ...]}`` selected by name; ``ValueError`` if the model does
    not have exactly one module per layer for each kind."""
    cfg = text_config(model)
    family = ENCODER_DECODER_FAMILIES[cfg.model_type]
    patterns = {kind: re.compile(p) for kind, p in _PATTERNS[family.name].items()}
    found: Dict[str, Dict[int, nn.Module]] = {kind: {} for kind in KINDS}
    for name, module in model.named_modules():
        for kind, pattern in patterns.items():
            m = pattern.search(name)
            if m and type(module).__name__ in family.attention_classes:
                layer = int(m.group(1))
                if layer in found[kind]:
                    raise ValueError(f"softprompt.attach: two {kind} attention modules for layer {layer} in "
                                     f"{type(model).__name__}")
                found[kind][layer] = module
    if family.name == "t5":
        expected = {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers}
    else:
        expected = {"encoder": cfg.encoder_layers, "decoder": cfg.decoder_layers}
    expected["cross"] = expected["decoder"]
    out = {}
    for kind in KINDS:
        layers = found[kind]
        if sorted(layers) != list(range(expected[kind])):
            raise ValueError(f"softprompt.attach: found {kind} attention modules for layers {sorted(layers)} in "
                             f"{type(model).__name__}; expected layers 0..{expected[kind] - 1} (an encoder-decoder "
                             f"model with its encoder and decoder, e.g. {family.name} ForConditionalGeneration)")
        out[kind] = [layers[i] for i in range(expected[kind])]
    return out


def _module_geometry(module: nn.Module) -> Tuple[int, int]:
    if hasattr(module, "key_value_proj_dim"):                         # T5Attention
        return int(module.n_heads), int(module.key_value_proj_dim)
    return int(module.num_heads), int(module.head_dim)                # BartAttention


def _encoder_decoder_geometry(model: nn.Module) -> Tuple[int, int, int]:
    """``(virtual layers Le + 2*Ld, kv heads, head dim)``; the three kinds must share heads/head dim."""
    modules = encoder_decoder_modules(model)
    shapes = {_module_geometry(m) for ms in modules.values() for m in ms}
    if len(shapes) != 1:
        raise ValueError(f"softprompt.attach: the attention modules of {type(model).__name__} have different "
                         f"(heads, head_dim) {sorted(shapes)}; encoder and decoder must share one geometry")
    heads, head_dim = shapes.pop()
    return sum(len(ms) for ms in modules.values()), heads, head_dim


def rotary_params(model: nn.Module) -> Tuple[Optional[torch.Tensor], int]:
    """``(inv_freq, rotary_dim)`` of the model's rotary embedding (``rotary_dim = 2 * len(inv_freq)``).

    The rotation used to pre-rotate prefix keys is the pure rotation from ``inv_freq`` (without a
    yarn-style ``attention_scaling``, which multiplies queries and keys alike and cancels out of
    the relative shift).
    """
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries:
        raise ValueError(f"softprompt.attach: no rotary embedding (a module with `inv_freq`) found in "
                         f"{type(model).__name__}")
    inv = rotaries[0].inv_freq
    for other in rotaries[1:]:
        if other.inv_freq.shape != inv.shape or not torch.equal(other.inv_freq, inv):
            raise ValueError("softprompt.attach: the model has several different rotary embeddings; "
                             "per-layer rotary schedules are not supported")
    rope_type = getattr(rotaries[0], "rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise ValueError(f"softprompt.attach: rope_type {rope_type!r} has length-dependent frequencies, so a "
                         f"pre-rotated prefix would not be exact; supported: static schedules (not "
                         f"{_LENGTH_DEPENDENT_ROPE})")
    inv = inv.detach().to(device="cpu", dtype=torch.float64)
    return inv, 2 * inv.numel()
