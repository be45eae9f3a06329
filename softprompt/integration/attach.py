"""``attach`` / ``detach``: switch a loaded transformers model to prefix attention and back.

``attach`` registers the attention and mask functions with transformers' own
``AttentionInterface`` / ``AttentionMaskInterface`` (name ``"softprompt"``), switches the model
with ``set_attn_implementation``, creates the model's :class:`ModelPrefixStore` (registered once,
as ``model.softprompt_store``), gives each self-attention module a weak back-reference to it,
and exposes ``task_ids`` in the model's ``forward`` signature so ``generate()`` (which
repeat-interleaves it for beams / ``num_return_sequences``) and ``Trainer``
(``remove_unused_columns``) keep it. For learned absolute positions the forward wrapper also
shifts ``position_ids`` by each row's prefix length. ``detach`` undoes all of it.
"""
from __future__ import annotations

import inspect
import types
from typing import Optional

import torch
from torch import nn

from .attention import ATTN_NAME, SLOT, Slot, register
from .families import family_of, geometry, rotary_params, self_attention_modules, text_config
from .positions import offset_position_ids
from .store import ModelPrefixStore

STORE_NAME = "softprompt_store"
_SAVED = "_softprompt_saved"


def attached_store(model: nn.Module) -> Optional[ModelPrefixStore]:
    """The model's store if it is attached, else None."""
    return model._modules.get(STORE_NAME) if _SAVED in model.__dict__ else None


def attach(model: nn.Module, backend: Optional[str] = None, block_size: int = 16, *,
           trainable: bool = False) -> ModelPrefixStore:
    """Route ``model``'s attention through ``kernels.prefix_attention`` and return its prefix store.

    Args:
        model: a loaded transformers model of a supported family (see ``SUPPORTED_FAMILIES``).
        backend: ``prefix_attention`` backend; ``None`` = Triton on CUDA, ``torch`` on the CPU.
        block_size: prefix rows per store block.
        trainable: keep the store's pools as ``nn.Parameter`` (gradients reach the prefixes).

    Returns:
        The :class:`ModelPrefixStore` sized from the config (layers, kv heads, head_dim) in the
        model's dtype and device. ``store.add(name, k, v)`` takes a prefix in cache convention
        ``[L, Hkv, P, D]``; then ``model(..., task_ids=...)`` / ``model.generate(..., task_ids=...)``.
    """
    if _SAVED in model.__dict__:
        raise ValueError("softprompt.attach: `model` is already attached; call softprompt.detach(model) first")
    from .encdec import attach_encoder_decoder, is_encoder_decoder
    if is_encoder_decoder(model):       # t5 / bart: encoder, decoder and cross-attention prefixes
        return attach_encoder_decoder(model, backend, block_size, trainable=trainable)
    family = family_of(model)
    from kernels import BACKENDS
    if backend is not None and backend not in ("auto", *BACKENDS):
        raise ValueError(f"softprompt.attach: `backend` {backend!r} is invalid; expected None (Triton on CUDA, "
                         f"torch on the CPU) or one of {['auto', *BACKENDS]}")
    modules = self_attention_modules(model, family)
    num_layers, kv_heads, head_dim = geometry(model)
    inv_freq, rotary_dim = rotary_params(model) if family.rope else (None, 0)
    param = next(model.parameters())
    store = ModelPrefixStore(num_layers, kv_heads, head_dim, family=family, inv_freq=inv_freq,
                             rotary_dim=rotary_dim, backend=backend, block_size=block_size,
                             dtype=param.dtype, device=param.device, trainable=trainable)

    register()
    saved = {"attn": model.config._attn_implementation, "had_forward": "forward" in model.__dict__,
             "forward": model.__dict__.get("forward")}
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(saved["attn"])
        raise ValueError(f"softprompt.attach: transformers refused to switch {type(model).__name__} to the "
                         f"{ATTN_NAME!r} attention implementation")
    model.add_module(STORE_NAME, store)
    for layer, module in enumerate(modules):
        module.__dict__[SLOT] = Slot(store, layer)
    saved["modules"] = modules
    model.__dict__[_SAVED] = saved
    model.forward = _forward_with_task_ids(model, store)
    return store


def detach(model: nn.Module) -> Optional[ModelPrefixStore]:
    """Restore the model's original attention implementation and forward; returns the detached store."""
    saved = model.__dict__.pop(_SAVED, None)
    if saved is None:
        raise ValueError("softprompt.detach: `model` is not attached (softprompt.attach was not called on it)")
    for module in saved["modules"]:
        module.__dict__.pop(SLOT, None)
    if not saved["had_forward"]:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = saved["forward"]
    model.set_attn_implementation(saved["attn"])
    return model._modules.pop(STORE_NAME, None)


def _past_length(bound: dict) -> int:
    for name in ("cache", "past_key_values"):
        cache = bound.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


class _TaskIdsForward:
    """``model.forward`` with a ``task_ids`` keyword in its signature (and learned-position offsets).

    A callable object rather than a closure so that ``copy.deepcopy(model)`` gives a copy whose
    forward calls the copy (with the copy's store), not the original.
    """

    def __init__(self, model: nn.Module, store: ModelPrefixStore, original):
        self.model, self.store, self.original = model, store, original
        sig = inspect.signature(original)
        if "task_ids" in sig.parameters:
            raise ValueError(f"softprompt.attach: {type(model).__name__}.forward already has a `task_ids` argument")
        params = list(sig.parameters.values())
        task_param = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.insert(var_kw[0] if var_kw else len(params), task_param)
        self._sig = sig
        self.__signature__ = sig.replace(parameters=params)
        self.__name__ = "forward"
        self.__qualname__ = f"{type(model).__name__}.forward"
        self.__doc__ = (original.__doc__ or "") + (
            "\n\n        task_ids (`torch.LongTensor [B]` or list of task names, *optional*): added by "
            "softprompt.attach: the task (prefix) of each sequence.")
        self.family = family_of(model)
        self.padding_idx = getattr(text_config(model), "pad_token_id", None)

    def __deepcopy__(self, memo):
        import copy
        model = copy.deepcopy(self.model, memo)
        original = self.original
        if getattr(original, "__self__", None) is self.model:
            original = types.MethodType(original.__func__, model)
        else:
            original = copy.deepcopy(original, memo)
        twin = object.__new__(_TaskIdsForward)          # the model copy is still being built: no checks
        twin.__dict__.update(self.__dict__)
        twin.model, twin.store, twin.original = model, copy.deepcopy(self.store, memo), original
        return twin

    def __call__(self, *args, task_ids=None, **kwargs):
        if task_ids is None:
            return self.original(*args, **kwargs)
        if self.family.rope:
            if not isinstance(task_ids, torch.Tensor):     # names resolved once, not per layer
                task_ids = self.store.resolve_task_ids(task_ids)
        else:
            args, kwargs, task_ids = self._offset_positions(args, kwargs, task_ids)
        return self.original(*args, task_ids=task_ids, **kwargs)

    def _offset_positions(self, args, kwargs, task_ids):
        sig = self._sig
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
            position_ids=arguments.get("position_ids"), past_length=_past_length(arguments),
            padding_idx=self.padding_idx)
        bound.arguments.pop("position_ids", None)
        kwargs = dict(bound.kwargs)
        kwargs["position_ids"] = position_ids
        return bound.args, kwargs, ids


def _forward_with_task_ids(model: nn.Module, store: ModelPrefixStore):
    return _TaskIdsForward(model, store, model.forward)
