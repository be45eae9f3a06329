"""What ``attach`` installs on a model and ``detach`` takes off, shared by both adapters.

``install`` switches the model to a registered attention implementation, registers the store as
``model.softprompt_store``, gives each attention module a weak back-reference (a :class:`Slot`)
and replaces ``model.forward`` with a :class:`TaskIdsForward`, which exposes ``task_ids`` in the
forward's signature so ``generate()`` (which repeat-interleaves it for beams /
``num_return_sequences``) and ``Trainer`` (``remove_unused_columns``) keep it. ``uninstall``
undoes all of it, except that it leaves a :class:`DetachedForward`: the original signature, but
``task_ids`` is refused (transformers would accept and silently ignore it, running every row
without its prefix).
"""
from __future__ import annotations

import copy
import inspect
import types

import torch
from torch import nn

from .attention import SLOT, Slot, forward_plans, softprompt_mask

STOCK = "stock"                     # store.calls key: calls handed to transformers' SDPA (no prefix)

STORE_NAME = "softprompt_store"
SAVED = "_softprompt_saved"         # the model's __dict__ key of what uninstall restores


def check_model(model, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"softprompt.{caller}: `model` of type {type(model).__name__} is invalid; expected a "
                         "loaded transformers model (a torch.nn.Module with a `config`)")


def check_backend(backend) -> None:
    from softprompt.kernels import BACKENDS
    if backend is not None and backend not in ("auto", *BACKENDS):
        raise ValueError(f"softprompt.attach: `backend` {backend!r} is invalid; expected None (Triton on CUDA, "
                         f"torch on the CPU) or one of {['auto', *BACKENDS]}")


def is_attached(model: nn.Module) -> bool:
    return SAVED in model.__dict__


def register_attention(name: str, attention) -> None:
    """Register ``attention`` and the shared mask function with transformers under ``name``
    (class level; registering again rewrites the same entries)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, softprompt_mask)


def batch_has_prefix(store, task_ids, batch: int, device) -> bool:
    """Whether any row of the forward's batch has a prefix row (decided once per forward)."""
    if store is None or task_ids is None:
        return False
    lens = store.prefix_lens

    def build():
        ids = store.resolve_task_ids(task_ids, batch=batch, device=lens.device)
        return bool((lens[ids] > 0).any())
    return forward_plans(store).get(("has_prefix", batch, device), (task_ids, lens), build)


def stock_without_prefix(attention):
    """``attention`` that hands a call to transformers' SDPA attention when no row of the batch has a
    prefix (prompt tuning, P-tuning v1, rows without a task): the model then runs as if it were not
    attached. Soft-capped attention (gemma2) always takes ``attention``, which implements it."""
    def run(module, query, key, value, attention_mask, *args, task_ids=None, softcap=None, **kwargs):
        slot = module.__dict__.get(SLOT)
        store = slot.store_ref() if slot is not None else None
        if softcap is None and store is not None and not batch_has_prefix(store, task_ids, query.shape[0],
                                                                          query.device):
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            store.calls[STOCK] = store.calls.get(STOCK, 0) + 1
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        return attention(module, query, key, value, attention_mask, *args, task_ids=task_ids, softcap=softcap,
                         **kwargs)
    run.__doc__ = attention.__doc__
    return run


def install(model: nn.Module, store: nn.Module, attn_name: str, slots, forward_cls) -> None:
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
    model.__dict__[SAVED] = saved
    model.forward = forward


def uninstall(model: nn.Module):
    """Undo :func:`install` on an attached model (leaving a :class:`DetachedForward`); returns the store."""
    saved = model.__dict__.pop(SAVED)
    for module in saved["modules"]:
        module.__dict__.pop(SLOT, None)
    model.__dict__.pop("forward", None)
    original = saved["forward"] if saved["had_forward"] else model.forward
    model.__dict__["forward"] = DetachedForward(original, saved["had_forward"])
    model.set_attn_implementation(saved["attn"])
    return model._modules.pop(STORE_NAME, None)


def _own_forward(model: nn.Module, remove_guard: bool = False):
    """``(had_forward, forward)``: whether the model has its own instance ``forward`` (not counting
    the guard ``uninstall`` left) and that forward (None when it has none); ``remove_guard``: put
    the model back as it was before the guard."""
    guard = model.__dict__.get("forward")
    if not isinstance(guard, DetachedForward):
        return "forward" in model.__dict__, guard
    if remove_guard:
        del model.__dict__["forward"]
        if guard.had_forward:
            model.__dict__["forward"] = guard.original
    return guard.had_forward, guard.original if guard.had_forward else None


class DetachedForward:
    """A detached model's forward: the original one (an instance attribute if ``had_forward``, else
    the class's bound method), refusing ``task_ids``. ``install`` takes it off again."""

    def __init__(self, original, had_forward: bool):
        self.original, self.had_forward = original, had_forward
        self.__signature__ = inspect.signature(original)
        self.__name__ = "forward"
        self.__qualname__ = getattr(original, "__qualname__", "forward")
        self.__doc__ = original.__doc__

    def __deepcopy__(self, memo):
        twin = object.__new__(DetachedForward)
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


class TaskIdsForward:
    """``model.forward`` with a ``task_ids`` keyword in its signature; task names are resolved to
    ids once per forward (not per layer). Adapters subclass it and override :meth:`prepare`.

    A callable object rather than a closure so that ``copy.deepcopy(model)`` gives a copy whose
    forward calls the copy (with the copy's store), not the original.
    """

    def __init__(self, model: nn.Module, store, original):
        self.model, self.store, self.original = model, store, original
        sig = inspect.signature(original)
        if "task_ids" in sig.parameters:
            raise ValueError(f"softprompt.attach: {type(model).__name__}.forward already has a `task_ids` argument")
        params = list(sig.parameters.values())
        task_param = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.insert(var_kw[0] if var_kw else len(params), task_param)
        self.original_signature = sig
        self.__signature__ = sig.replace(parameters=params)
        self.__name__ = "forward"
        self.__qualname__ = f"{type(model).__name__}.forward"
        self.__doc__ = (original.__doc__ or "") + (
            "\n\n        task_ids (`torch.LongTensor [B]` or list of task names, *optional*): added by "
            "softprompt.attach: the task (prefix) of each sequence.")

    def __deepcopy__(self, memo):
        model = copy.deepcopy(self.model, memo)
        original = self.original
        if getattr(original, "__self__", None) is self.model:
            original = types.MethodType(original.__func__, model)
        else:
            original = copy.deepcopy(original, memo)
        twin = object.__new__(type(self))               # the model copy is still being built: no checks
        twin.__dict__.update(self.__dict__)
        twin.model, twin.store, twin.original = model, copy.deepcopy(self.store, memo), original
        return twin

    def __call__(self, *args, task_ids=None, **kwargs):
        forward_plans(self.store).new_forward()      # the layers of this forward plan afresh, once
        args, kwargs, task_ids = self.prepare(args, kwargs, task_ids)
        if task_ids is None:
            return self.original(*args, **kwargs)
        return self.original(*args, task_ids=task_ids, **kwargs)

    def prepare(self, args: tuple, kwargs: dict, task_ids):
        """``(args, kwargs, task_ids)`` for the original forward; this one resolves task names."""
        if task_ids is not None and not isinstance(task_ids, torch.Tensor):
            task_ids = self.store.resolve_task_ids(task_ids)
        return args, kwargs, task_ids
