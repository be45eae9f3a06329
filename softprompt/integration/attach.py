"""``attach`` / ``detach``: switch a loaded transformers model to prefix attention and back.

``attach`` registers the attention and mask functions with transformers' own
``AttentionInterface`` / ``AttentionMaskInterface`` (name ``"softprompt"``), switches the model
with ``set_attn_implementation``, creates the model's :class:`ModelPrefixStore` (registered once,
as ``model.softprompt_store``), gives each self-attention module a weak back-reference to it,
and exposes ``task_ids`` in the model's ``forward`` signature so ``generate()`` (which
repeat-interleaves it for beams / ``num_return_sequences``) and ``Trainer``
(``remove_unused_columns``) keep it. For learned absolute positions the forward wrapper also
shifts ``position_ids`` by each row's prefix length. ``detach`` undoes all of it, except that it
leaves a forward with the original signature that refuses ``task_ids`` (transformers would accept
and silently ignore it, running every row without its prefix).
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


def _check_model(model, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"softprompt.{caller}: `model` of type {type(model).__name__} is invalid; expected a "
                         "loaded transformers model (a torch.nn.Module with a `config`)")


def attached_store(model: nn.Module) -> Optional[ModelPrefixStore]:
    """The model's store if it is attached, else None."""
    _check_model(model, "attached_store")
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
    _check_model(model, "attach")
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
    install(model, store, ATTN_NAME, list(enumerate(modules)), _TaskIdsForward)
    return store


def install(model: nn.Module, store: ModelPrefixStore, attn_name: str, slots, forward_cls) -> None:
    """Switch ``model`` to ``attn_name``, register ``store``, give each module of ``slots``
    (``[(layer, module)]``) its back-reference and wrap the forward in ``forward_cls``; the model is
    unchanged when this raises."""
    had_forward, own = _own_forward(model)
    forward = forward_cls(model, store, own if had_forward else types.MethodType(type(model).forward, model))
    saved = {"attn": model.config._attn_implementation, "had_forward": had_forward, "forward": own}
    model.set_attn_implementation(attn_name)
    if model.config._attn_implementation != attn_name:
        model.set_attn_implementation(saved["attn"])
        raise ValueError(f"softprompt.attach: transformers refused to switch {type(model).__name__} to the "
                         f"{attn_name!r} attention implementation")
    _own_forward(model, remove_guard=True)
    model.add_module(STORE_NAME, store)
    for layer, module in slots:
        module.__dict__[SLOT] = Slot(store, layer)
    saved["modules"] = [module for _, module in slots]
    model.__dict__[_SAVED] = saved
    model.forward = forward


def detach(model: nn.Module) -> Optional[ModelPrefixStore]:
    """Restore the model's original attention implementation and forward; returns the detached store.

    The forward left behind has the original signature and behaviour but raises a ``ValueError``
    when given ``task_ids`` (stock transformers forwards take ``**kwargs`` and would drop it)."""
    _check_model(model, "detach")
    saved = model.__dict__.pop(_SAVED, None)
    if saved is None:
        raise ValueError("softprompt.detach: `model` is not attached (softprompt.attach was not called on it)")
    for module in saved["modules"]:
        module.__dict__.pop(SLOT, None)
    model.__dict__.pop("forward", None)
    original = saved["forward"] if saved["had_forward"] else model.forward
    model.__dict__["forward"] = _DetachedForward(original, saved["had_forward"])
    model.set_attn_implementation(saved["attn"])
    return model._modules.pop(STORE_NAME, None)


def _own_forward(model: nn.Module, remove_guard: bool = False):
    """``(had_forward, forward)``: whether the model has its own instance ``forward`` (not counting
    the guard ``detach`` left) and that forward (None when it has none); ``remove_guard``: put the
    model back as it was before the guard."""
    guard = model.__dict__.get("forward")
    if not isinstance(guard, _DetachedForward):
        return "forward" in model.__dict__, guard
    if remove_guard:
        del model.__dict__["forward"]
        if guard.had_forward:
            model.__dict__["forward"] = guard.original
    return guard.had_forward, guard.original if guard.had_forward else None


class _DetachedForward:
    """A detached model's forward: the original one (an instance attribute if ``had_forward``, else
    the class's bound method), refusing ``task_ids``. ``attach`` takes it off again."""

    def __init__(self, original, had_forward: bool):
        self.original, self.had_forward = original, had_forward
        self.__signature__ = inspect.signature(original)
        self.__name__ = "forward"
        self.__qualname__ = getattr(original, "__qualname__", "forward")
        self.__doc__ = original.__doc__

    def __deepcopy__(self, memo):
        import copy
        twin = object.__new__(_DetachedForward)
        twin.__dict__.update(self.__dict__)
        twin.original = copy.deepcopy(self.original, memo)     # a bound method: bound to the model's copy
        return twin

    def __call__(self, *args, **kwargs):
        if kwargs.get("task_ids") is not None:
            raise ValueError("softprompt: `task_ids` was given to a model detached from its prefix store "
                             "(softprompt.detach); it would be ignored and every row run without its prefix. "
                             "Attach the model again (softprompt.attach) or drop `task_ids`")
        kwargs.pop("task_ids", None)
        return self.original(*args, **kwargs)


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

