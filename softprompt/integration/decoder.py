"""The adapter of single-stack models (``FAMILIES``: decoder-only and encoder-only): one prefix per
self-attention layer, in a :class:`ModelPrefixStore` sized from the config.

RoPE families keep the model's own position ids (the store holds pre-rotated keys, see
:mod:`.positions`); for learned absolute positions the forward wrapper shifts ``position_ids`` by
each row's prefix length (:class:`PositionOffsetForward`).
"""
from __future__ import annotations

import inspect

from torch import nn

from .attention import ATTN_NAME, softprompt_attention
from .families import family_of, geometry, is_encoder_decoder, rotary_params, self_attention_modules, text_config
from .positions import offset_position_ids
from .store import ModelPrefixStore
from .wiring import TaskIdsForward, check_backend, stock_without_prefix


class DecoderAdapter:
    """``attach`` for the families of ``FAMILIES``."""

    attn_name = ATTN_NAME
    attention = staticmethod(stock_without_prefix(softprompt_attention))

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return not is_encoder_decoder(model)

    @staticmethod
    def build(model: nn.Module, backend, block_size: int, trainable: bool):
        """``(store, [(layer, module)], forward class)`` for ``wiring.install``."""
        family = family_of(model)
        check_backend(backend)
        modules = self_attention_modules(model, family)
        num_layers, kv_heads, head_dim = geometry(model)
        inv_freq, rotary_dim = rotary_params(model) if family.rope else (None, 0)
        param = next(model.parameters())
        store = ModelPrefixStore(num_layers, kv_heads, head_dim, family=family, inv_freq=inv_freq,
                                 rotary_dim=rotary_dim, backend=backend, block_size=block_size,
                                 dtype=param.dtype, device=param.device, trainable=trainable)
        return store, list(enumerate(modules)), TaskIdsForward if family.rope else PositionOffsetForward


def past_length(arguments: dict) -> int:
    """Own tokens already in the HF cache given to a forward (``cache`` / ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        cache = arguments.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


class PositionOffsetForward(TaskIdsForward):
    """The forward of learned-absolute-position families: ``position_ids`` shifted by each row's
    prefix length (computed the way the family computes its default positions)."""

    def __init__(self, model: nn.Module, store, original):
        super().__init__(model, store, original)
        self.family = family_of(model)
        self.padding_idx = getattr(text_config(model), "pad_token_id", None)

    def prepare(self, args: tuple, kwargs: dict, task_ids):
        if task_ids is None:
            return args, kwargs, task_ids
        sig = self.original_signature
        bound = sig.bind_partial(*args, **kwargs)
        arguments = dict(bound.arguments)
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(p.name, {}))
        ref = arguments.get("input_ids")
        if ref is None:
            ref = arguments.get("inputs_embeds")
        if ref is None:
            return args, kwargs, task_ids
        ids = self.store.resolve_task_ids(task_ids, batch=ref.shape[0], device=ref.device)
        position_ids = offset_position_ids(
            self.family.positions, self.store.prefix_offsets(ids), input_ids=arguments.get("input_ids"),
            inputs_embeds=arguments.get("inputs_embeds"), attention_mask=arguments.get("attention_mask"),
            position_ids=arguments.get("position_ids"), past_length=past_length(arguments),
            padding_idx=self.padding_idx)
        bound.arguments.pop("position_ids", None)
        kwargs = dict(bound.kwargs)
        kwargs["position_ids"] = position_ids
        return bound.args, kwargs, ids
