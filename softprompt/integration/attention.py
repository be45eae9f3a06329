"""The attention function and mask function registered with transformers under ``ATTN_NAME``.

``softprompt_mask`` is transformers' ``sdpa_mask`` that always materialises a bool mask
``[B, 1, Sq, Skv]`` over the sequence's own keys (never the "skip the causal mask" shortcut:
with a prefix in front, an upper-left ``is_causal`` would be wrong).

``softprompt_attention`` receives, after the HF cache update, ``query [B, Hq, Sq, D]`` and the
sequence's own ``key/value [B, Hkv, Skv, D]`` plus that mask, and runs
the kernels' prefix attention with the task prefix of this layer from the model's prefix store:

0. The batch metadata (task ids, the store's block table, the mask) is planned once per forward
   (:class:`ForwardPlans`, kept on the store): the first layer plans, every layer runs the plan.
1. The mask is reduced to per-sequence ``kv_starts / kv_lens`` (+ ``causal`` and the layer's
   sliding ``window``) when it is exactly plain padding + causal (or bidirectional) + window;
   the reduction is verified against the mask, and anything else goes to the kernel as a bool
   ``attn_mask`` (``causal=False``; the mask already says everything).
2. Soft-capping (gemma2) is a plan option; an additive (non-binary) float mask and a caller's
   ``bias`` (T5's relative position bias, see ``encdec.py``) go to ``plan.run`` as ``bias``, and
   attention dropout in training as ``dropout_p``. The ``torch`` backend computes those calls on
   its dense path (``kernels/dense_backend.py``); the store counts them as ``"dense"``.

Modules without a store back-reference (cross-attention) are computed with an empty prefix.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from softprompt.kernels import plan_prefix_attention

ATTN_NAME = "softprompt"
SLOT = "_softprompt_slot"


class Slot:
    """The per-attention-module back-reference: a weak reference to the store, and the layer."""

    __slots__ = ("store_ref", "layer")

    def __init__(self, store, layer: int):
        self.store_ref = weakref.ref(store)
        self.layer = layer

    def __deepcopy__(self, memo):
        # copy.deepcopy(model): the copy's modules point at the copy's store (same memo)
        import copy
        store = self.store_ref()
        return Slot(copy.deepcopy(store, memo), self.layer) if store is not None else self

    def __repr__(self):
        return f"Slot(layer={self.layer})"


# ---------------------------------------------------------------------------------------- mask
def softprompt_mask(*args, **kwargs):
    """``sdpa_mask`` that always materialises (no causal or bidirectional skip)."""
    from transformers.masking_utils import sdpa_mask
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _to_visibility(mask: torch.Tensor, Skv: int):
    """HF mask -> ``(bool visibility, additive float bias or None)`` for own keys; the bias is
    zero where the mask blocks a key."""
    if mask.shape[-1] > Skv:
        mask = mask[..., :Skv]
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.dtype.is_floating_point:
        return mask != 0, None                      # int 0/1 masks (1 = visible)
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if bool(((mask == 0) | blocked).all()):
        return ~blocked, None
    return ~blocked, mask.masked_fill(blocked, 0.0)   # a real additive bias


def _rebuild(kv_starts, kv_lens, Sq: int, Skv: int, causal: bool, window: Optional[int]):
    """The kernel's own-key visibility for lengths (q_lens = Sq), as ``[B, Sq, Skv]``."""
    device = kv_lens.device
    i = torch.arange(Sq, device=device)[None, :, None]
    j = torch.arange(Skv, device=device)[None, None, :]
    visible = (j >= kv_starts[:, None, None]) & (j < kv_lens[:, None, None])
    position = (kv_lens - Sq)[:, None, None] + i
    if causal:
        visible = visible & (j <= position)
    if window is not None:
        visible = visible & (position - j < window)
    return visible.expand(kv_lens.shape[0], Sq, Skv)


def derive_lengths(visible: torch.Tensor, window: Optional[int]):
    """``(causal, kv_starts, kv_lens)`` when the bool mask ``[B, 1, Sq, Skv]`` is exactly plain
    padding (a contiguous run of visible keys per sequence) + causal/bidirectional (+ window);
    ``None`` otherwise."""
    if visible.shape[1] != 1:
        return None
    m = visible[:, 0]
    B, Sq, Skv = m.shape
    keys = m.any(1)                                            # [B, Skv]
    idx = torch.arange(Skv, device=m.device)[None]
    has = keys.any(1)
    starts = torch.where(keys, idx, Skv).amin(1) if Skv else torch.zeros(B, dtype=torch.long, device=m.device)
    ends = torch.where(keys, idx + 1, 0).amax(1) if Skv else torch.zeros(B, dtype=torch.long, device=m.device)
    starts = torch.where(has, starts, 0).long()
    ends = torch.where(has, ends, 0).long()
    for causal in (True, False):
        if torch.equal(_rebuild(starts, ends, Sq, Skv, causal, window), m):
            return causal, starts, ends
    return None


# ---------------------------------------------------------------------------------------- attention
def _backend(store, device: torch.device) -> str:
    if store is not None and store.backend is not None:
        return store.backend
    return "triton" if device.type == "cuda" else "torch"


def sliding_window_of(module, sliding_window: Optional[int] = None) -> Optional[int]:
    """The attention module's sliding window (the caller's ``sliding_window`` first), None when it
    has none: transformers marks "no window" with None, 0 or a non-int."""
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


class ForwardPlans:
    """The attention plans of the current forward, kept on the store: the first layer that sees
    the forward's batch metadata plans (validation, task grouping, mask -> lengths) and every
    other layer runs that plan. :meth:`new_forward` (called by the model's wrapped forward) drops
    the previous forward's plans. An entry is reused only for the very same metadata objects,
    unmodified (tensor identity and in-place version: mask, task ids, the store's block table and
    prefix lengths) and the same sizes and settings, so a forward that bypasses the wrapper (or a
    gradient-checkpointing recomputation after another forward) plans again instead of reusing a
    stale plan. Copies (deepcopy, pickle) start empty."""

    SIZE = 8                              # distinct plans per forward (windows, encoder / decoder, devices)

    def __init__(self):
        self.entries = []                 # [(key, [(weakref or holder, version)], value)]

    def new_forward(self) -> None:
        self.entries = []

    def get(self, key, objects, build):
        idents = [_ident(o) for o in objects]
        for saved_key, saved, value in self.entries:
            if saved_key == key and all(_same(s, o) for s, o in zip(saved, objects)):
                return value
        value = build()
        self.entries = self.entries[-(self.SIZE - 1):] + [(key, idents, value)]
        return value

    def __getstate__(self):
        return {"entries": []}            # weak references do not pickle; plans are per forward

    def __deepcopy__(self, memo):
        return ForwardPlans()


def _version(t: torch.Tensor):
    try:
        return t._version                 # bumped by every in-place change
    except RuntimeError:                  # inference tensors keep no version counter
        return None


def _ident(obj):
    if isinstance(obj, torch.Tensor):
        return weakref.ref(obj), _version(obj)
    return (lambda: obj), None            # None, lists of names: held (they are small)


def _same(saved, obj) -> bool:
    ref, version = saved
    return ref() is obj and (not isinstance(obj, torch.Tensor) or _version(obj) == version)


def forward_plans(store) -> ForwardPlans:
    plans = store.__dict__.get("_forward_plans")
    if plans is None:
        plans = store.__dict__["_forward_plans"] = ForwardPlans()
    return plans


def _batch_tasks(store, tables, task_ids, B: int, device: torch.device):
    """``(block_table, prefix_lens, task_ids)`` of the batch on ``device`` (``tables``: the store's
    block table and prefix lengths); no prefix without a store (cross-attention) or task ids."""
    if store is None or task_ids is None:
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        return torch.zeros(1, 0, dtype=torch.long, device=device), zeros[:1], zeros
    ids = store.resolve_task_ids(task_ids, batch=B, device=device)
    return tables[0].to(device), tables[1].to(device), ids


def _plan(store, tables, query, key, prefix_k, task_ids, visible, causal: bool, window, scale: float, softcap):
    """``(plan, path)``: the forward's plan for this layer's metadata; ``path`` is ``"lengths"``
    when the mask reduced to per-sequence lengths, ``"mask"`` when it goes as a bool mask."""
    B, Hq, Sq, D = query.shape
    device = query.device
    table, lens, ids = _batch_tasks(store, tables, task_ids, B, device)
    kw, path = dict(causal=causal, window=window), "lengths"
    if visible is not None:
        derived = derive_lengths(visible, window)
        if derived is not None:
            kw["causal"], kw["kv_starts"], kw["kv_lens"] = derived
        else:
            kw, path = dict(causal=False, attn_mask=visible), "mask"
    plan = plan_prefix_attention(table, lens, ids, num_q_heads=Hq, num_kv_heads=key.shape[1], head_dim=D,
                                 q_len=Sq, kv_len=key.shape[2], num_blocks=prefix_k.shape[0],
                                 block_size=prefix_k.shape[2], device=device, scale=scale, softcap=softcap,
                                 backend=_backend(store, device), **kw)
    return plan, path


def softprompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, softcap: Optional[float] = None,
                         sliding_window: Optional[int] = None, task_ids=None, bias=None, **kwargs):
    """transformers attention function: prefix attention through the forward's kernel plan.
    ``bias`` (``[B|1, 1|H, Sq, Skv]``, own keys; from ``encdec.py``: T5's position bias) is added
    to the scaled scores, like an additive float mask."""
    slot = module.__dict__.get(SLOT)
    store = slot.store_ref() if slot is not None else None
    B, Hq, Sq, D = query.shape
    Skv = key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    device = query.device

    if store is not None:
        prefix_k, prefix_v, *tables = store.layer(slot.layer)
    else:   # cross-attention or a module the store does not cover: no prefix
        prefix_k = query.new_zeros(0, key.shape[1], 1, D)
        prefix_v, tables = prefix_k, None
    # (a copy only when the model is split over devices or runs in another dtype than the store)
    prefix_k = prefix_k.to(device=device, dtype=query.dtype)
    prefix_v = prefix_v.to(device=device, dtype=query.dtype)

    if attention_mask is None:
        causal = bool(getattr(module, "is_causal", False)) and Sq > 1
        visible = None
    else:
        causal = False
        visible, mask_bias = _to_visibility(attention_mask, Skv)
        if visible.shape[0] != B:                     # a broadcast [1, ...] mask from the caller
            visible = visible.expand(B, *visible.shape[1:])
        if mask_bias is not None:
            bias = mask_bias if bias is None else bias + mask_bias
    window = sliding_window_of(module, sliding_window)
    dropout_p = float(dropout) if dropout and module.training else 0.0

    build = lambda: _plan(store, tables, query, key, prefix_k, task_ids, visible, causal, window, scale,  # noqa: E731
                          softcap)
    if store is None:
        plan, path = build()
    else:
        settings = (B, Hq, key.shape[1], Sq, Skv, D, prefix_k.shape[0], prefix_k.shape[2], device, causal,
                    window, scale, softcap, store.backend)
        plan, path = forward_plans(store).get(settings, (attention_mask, task_ids, *tables), build)
        dense = softcap is not None or bias is not None or dropout_p > 0
        store.calls["dense" if dense else path] += 1
    out = plan.run(query, key, value, prefix_k, prefix_v, bias=bias, dropout_p=dropout_p)
    return out.transpose(1, 2).contiguous(), None
