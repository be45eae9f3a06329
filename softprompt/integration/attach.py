"""``attach`` / ``detach``: switch a loaded transformers model to prefix attention and back.

``attach`` picks the model's adapter (:func:`adapter_for`): :class:`.encdec.EncoderDecoderAdapter`
for T5 / BART, :class:`.decoder.DecoderAdapter` for every other family. The adapter builds the
model's prefix store, the ``[(layer, attention module)]`` slots and the forward wrapper; ``attach``
registers the adapter's attention function with transformers' ``AttentionInterface`` /
``AttentionMaskInterface`` and installs them (:func:`.wiring.install`). ``detach`` undoes it,
leaving a forward with the original signature that refuses ``task_ids``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .decoder import DecoderAdapter
from .encdec import EncoderDecoderAdapter
from .store import ModelPrefixStore
from .wiring import STORE_NAME, check_model, install, is_attached, register_attention, uninstall

# the first adapter that accepts a model attaches it; DecoderAdapter accepts every other model
ADAPTERS = (EncoderDecoderAdapter, DecoderAdapter)


def adapter_for(model: nn.Module):
    """The adapter class that attaches ``model``."""
    return next(adapter for adapter in ADAPTERS if adapter.accepts(model))


def attached_store(model: nn.Module) -> Optional[ModelPrefixStore]:
    """The model's store if it is attached, else None."""
    check_model(model, "attached_store")
    return model._modules.get(STORE_NAME) if is_attached(model) else None


def attach(model: nn.Module, backend: Optional[str] = None, block_size: int = 16, *,
           trainable: bool = False) -> ModelPrefixStore:
    """Route ``model``'s attention through ``kernels.prefix_attention`` and return its prefix store.

    Args:
        model: a loaded transformers model of a supported family (see ``SUPPORTED_FAMILIES`` and
            ``ENCODER_DECODER_FAMILIES``).
        backend: ``prefix_attention`` backend; ``None`` = Triton on CUDA, ``torch`` on the CPU.
        block_size: prefix rows per store block.
        trainable: keep the store's pools as ``nn.Parameter`` (gradients reach the prefixes).

    Returns:
        The :class:`ModelPrefixStore` sized from the config (layers, kv heads, head_dim) in the
        model's dtype and device (an :class:`.encdec.EncoderDecoderPrefixStore` for T5 / BART).
        ``store.add(name, k, v)`` takes a prefix in cache convention ``[L, Hkv, P, D]``; then
        ``model(..., task_ids=...)`` / ``model.generate(..., task_ids=...)``.
    """
    check_model(model, "attach")
    if is_attached(model):
        raise ValueError("softprompt.attach: `model` is already attached; call softprompt.detach(model) first")
    adapter = adapter_for(model)
    store, slots, forward_cls = adapter.build(model, backend, block_size, trainable)
    register_attention(adapter.attn_name, adapter.attention)
    install(model, store, adapter.attn_name, slots, forward_cls)
    return store


def detach(model: nn.Module) -> Optional[ModelPrefixStore]:
    """Restore the model's original attention implementation and forward; returns the detached store.

    The forward left behind has the original signature and behaviour but raises a ``ValueError``
    when given ``task_ids`` (stock transformers forwards take ``**kwargs`` and would drop it)."""
    check_model(model, "detach")
    if not is_attached(model):
        raise ValueError("softprompt.detach: `model` is not attached (softprompt.attach was not called on it)")
    return uninstall(model)
