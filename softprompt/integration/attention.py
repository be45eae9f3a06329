"""The attention function and mask function registered with transformers under ``ATTN_NAME``.

``softprompt_mask`` is transformers' ``sdpa_mask`` that always materialises a bool mask
``[B, 1, Sq, Skv]`` over the sequence's own keys (never the "skip the causal mask" shortcut:
with a prefix in front, an upper-left ``is_causal`` would be wrong).

``softprompt_attention`` receives, after the HF cache update, ``query [B, Hq, Sq, D]`` and the
sequence's own ``key/value [B, Hkv, Skv, D]`` plus that mask, and calls
``kernels.prefix_attention`` with the task prefix of this layer from the model's prefix store:

1. The mask is reduced to per-sequence ``kv_starts / kv_lens`` (+ ``causal`` and the layer's
   sliding ``window``) when it is exactly plain padding + causal (or bidirectional) + window;
   the reduction is verified against the mask, and anything else goes to the kernel as a bool
   ``attn_mask`` (``causal=False``; the mask already says everything).
2. Soft-capping (gemma2), attention dropout in training, and additive (non-binary) float masks
   are not in the kernel contract: those calls take ``dense_prefix_attention``, a PyTorch path
   that materialises ``[prefix ; own]`` per sequence and follows the families' eager code
   (scale, softcap, mask, fp32 softmax, dropout). Correctness first; it is slower.

Modules without a store back-reference (cross-attention) are computed with an empty prefix.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from softprompt.kernels import prefix_attention
from softprompt.kernels.masks import all_finite, nonfinite_rows, zero_rows

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
    """HF mask -> ``(bool visibility, additive float bias or None)`` for own keys."""
    if mask.shape[-1] > Skv:
        mask = mask[..., :Skv]
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.dtype.is_floating_point:
        return mask != 0, None                      # int 0/1 masks (1 = visible)
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if bool(((mask == 0) | blocked).all()):
        return ~blocked, None
    return ~blocked, mask                          # a real additive bias: dense path


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


def _memo_derive(store, mask: torch.Tensor, window):
    """Layers of one forward share the mask object: derive once per (mask, window)."""
    for ref, w, result in store._mask_memo:
        if ref() is mask and w == window:
            return result
    result = derive_lengths(mask, window)
    store._mask_memo = [e for e in store._mask_memo if e[0]() is not None][-3:]
    store._mask_memo.append((weakref.ref(mask), window, result))
    return result


# ---------------------------------------------------------------------------------------- dense path
def gather_prefix(pool: torch.Tensor, block_table: torch.Tensor, prefix_lens: torch.Tensor,
                  task_ids: torch.Tensor):
    """Each row's task prefix copied out of the block pool: ``[B, Hkv, Pmax, D]`` and ``valid [B, Pmax]``."""
    B = task_ids.shape[0]
    lens = prefix_lens[task_ids]
    rows = int(lens.max()) if B else 0
    bs = pool.shape[2]
    if rows == 0:
        return pool.new_zeros(B, pool.shape[1], 0, pool.shape[3]), lens.new_zeros(B, 0, dtype=torch.bool)
    nb = -(-rows // bs)
    # Entries past the blocks a task uses may hold anything (-1, stale ids past the pool): a
    # shorter task's row is read as deep as the longest prefix, so they are replaced, never used.
    used = torch.arange(nb, device=block_table.device)[None, :] * bs < lens[:, None]
    table = torch.where(used, block_table[task_ids, :nb].long(), 0)
    g = pool[table]                                            # [B, nb, Hkv, bs, D]
    g = g.permute(0, 2, 1, 3, 4).reshape(B, pool.shape[1], nb * bs, pool.shape[3])[:, :, :rows]
    valid = torch.arange(rows, device=lens.device)[None] < lens[:, None]
    return g, valid


def dense_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_valid, own_visible, *, scale: float,
                           softcap: Optional[float] = None, bias=None, dropout: float = 0.0,
                           training: bool = False) -> torch.Tensor:
    """Eager-style attention over ``[prefix ; own]``: ``[B, Hq, Sq, D]``.

    ``own_visible`` bool ``[B, 1|Hq, Sq, Skv]``; ``prefix_valid`` ``[B, Pmax]`` (every query sees
    its task's prefix rows); ``bias`` an optional additive float mask on own keys. Soft-capping
    is applied to the scaled scores before masking (gemma2). Rows that see nothing give zeros.
    """
    B, Hq, Sq, D = q.shape
    G = Hq // k.shape[1]
    keys = torch.cat([prefix_k.to(q.dtype), k], dim=2)
    values = torch.cat([prefix_v.to(q.dtype), v], dim=2)
    # Keys a query cannot see never reach it, whatever they hold (an uninitialised page, the rest
    # of a prefix's last block): non-finite rows are zeroed before the products (0 * NaN is NaN)
    # and a query that does see one gets NaN explicitly.
    bad = None
    if not all_finite(keys, values):
        bad = nonfinite_rows(keys, values)                     # [B, Hkv, P+Skv]
        keys, values = zero_rows(keys, bad), zero_rows(values, bad)
        bad = bad.repeat_interleave(G, dim=1)[:, :, None, :]
    keys = keys.repeat_interleave(G, dim=1)
    values = values.repeat_interleave(G, dim=1)
    P = prefix_k.shape[2]
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    Hm = own_visible.shape[1]
    visible = torch.cat([prefix_valid[:, None, None, :].expand(B, Hm, Sq, P), own_visible], dim=-1)
    if bias is not None:
        bias = bias[..., : k.shape[2]].to(scores.dtype)
        scores = scores + torch.cat([bias.new_zeros(*bias.shape[:-1], P), bias], dim=-1)
    any_visible = visible.any(-1, keepdim=True)
    scores = scores.float().masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    probs = (torch.softmax(scores, dim=-1) * any_visible).to(q.dtype)
    if dropout and training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, values)
    if bad is not None:        # a visible NaN stays visible (filled after: no NaN in the backward)
        out = out.masked_fill((visible & bad).any(-1, keepdim=True), float("nan"))
    return out


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


def softprompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, softcap: Optional[float] = None,
                         sliding_window: Optional[int] = None, task_ids=None, **kwargs):
    """transformers attention function: prefix attention through ``kernels.prefix_attention``."""
    slot = module.__dict__.get(SLOT)
    store = slot.store_ref() if slot is not None else None
    B, Hq, Sq, D = query.shape
    Skv = key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    device = query.device

    if store is not None:
        prefix_k, prefix_v, block_table, prefix_lens = store.layer(slot.layer)
        if task_ids is None:
            task_ids = torch.zeros(B, dtype=torch.long, device=device)
            block_table = block_table.new_zeros(1, 0)
            prefix_lens = prefix_lens.new_zeros(1)
        else:
            task_ids = store.resolve_task_ids(task_ids, batch=B, device=device)
    else:   # cross-attention or a module the store does not cover: no prefix
        prefix_k = query.new_zeros(0, key.shape[1], 1, D)
        prefix_v = prefix_k
        block_table = torch.zeros(1, 0, dtype=torch.long, device=device)
        prefix_lens = torch.zeros(1, dtype=torch.long, device=device)
        task_ids = torch.zeros(B, dtype=torch.long, device=device)
    # (a copy only when the model is split over devices or runs in another dtype than the store)
    prefix_k = prefix_k.to(device=device, dtype=query.dtype)
    prefix_v = prefix_v.to(device=device, dtype=query.dtype)
    block_table = block_table.to(device)
    prefix_lens = prefix_lens.to(device)

    if attention_mask is None:
        causal = bool(getattr(module, "is_causal", False)) and Sq > 1
        visible, bias = None, None
    else:
        causal = False
        visible, bias = _to_visibility(attention_mask, Skv)
        if visible.shape[0] != B:                     # a broadcast [1, ...] mask from the caller
            visible = visible.expand(B, *visible.shape[1:])
            bias = bias.expand(B, *bias.shape[1:]) if bias is not None else None

    window = sliding_window_of(module, sliding_window)
    use_dense = softcap is not None or bias is not None or (dropout and module.training)

    if use_dense:
        if store is not None:
            store.calls["dense"] += 1
        if visible is None:
            i = torch.arange(Sq, device=device)[:, None] + (Skv - Sq)
            j = torch.arange(Skv, device=device)[None]
            visible = ((j <= i) if causal else torch.ones(Sq, Skv, dtype=torch.bool, device=device))
            visible = visible[None, None].expand(B, 1, Sq, Skv)
        pk, valid = gather_prefix(prefix_k, block_table, prefix_lens, task_ids)
        pv, _ = gather_prefix(prefix_v, block_table, prefix_lens, task_ids)
        out = dense_prefix_attention(query, key, value, pk, pv, valid, visible, scale=scale, softcap=softcap,
                                     bias=bias, dropout=dropout, training=module.training)
        return out.transpose(1, 2).contiguous(), None

    kw = dict(causal=causal, scale=scale)
    derived = _memo_derive(store, visible, window) if (visible is not None and store is not None) else (
        derive_lengths(visible, window) if visible is not None else None)
    if derived is not None:
        kw["causal"], kw["kv_starts"], kw["kv_lens"] = derived
        kw["window"] = window
        if store is not None:
            store.calls["lengths"] += 1
    elif visible is not None:
        kw["attn_mask"] = visible
        if store is not None:
            store.calls["mask"] += 1
    else:
        kw["window"] = window
        if store is not None:
            store.calls["lengths"] += 1
    out = prefix_attention(query, key, value, prefix_k, prefix_v, block_table, prefix_lens, task_ids,
                           backend=_backend(store, device), **kw)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register() -> None:
    """Register the attention and mask functions with transformers (class level, idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, softprompt_attention)
    AttentionMaskInterface.register(ATTN_NAME, softprompt_mask)
    _REGISTERED = True
