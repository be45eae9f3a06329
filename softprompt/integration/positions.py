"""Positions of a prefix: RoPE rotation helpers and learned absolute position offsets.

Callers give a prefix in cache convention: the keys a KV cache would hold in front of the
sequence, so the sequence's real tokens sit at positions ``P .. P+S-1`` (PEFT's convention).

* RoPE families: the store keeps ``R(-P) k`` (every prefix key rotated back by ``P``). Since RoPE
  scores depend only on relative rotation, ``<R(P+i) q, k> = <R(i) q, R(-P) k>``, so real tokens
  can keep the model's own position ids ``0 .. S-1`` and tasks with different ``P`` share a batch.
  Only the first ``rotary_dim`` channels rotate (partial rotary: gpt_neox, phi3 variants), in the
  ``rotate_half`` layout every supported family uses.
* Learned absolute positions (gpt2, opt, bert, roberta): keys are stored unchanged and the real
  tokens' ``position_ids`` are offset by ``P_t`` per row (:func:`offset_position_ids`).
"""
from __future__ import annotations

from typing import Optional

import torch


def rotate_keys(k: torch.Tensor, shift: int, inv_freq: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate keys ``[..., D]`` by ``shift`` positions (differentiable; computed in float64).

    ``rotate_keys(k, -P, ...)`` maps cache convention to the stored convention, ``+P`` back.
    """
    if shift == 0 or k.numel() == 0:
        return k
    angles = float(shift) * inv_freq.to(device=k.device, dtype=torch.float64)   # [rotary_dim / 2]
    cos = torch.cat([angles.cos(), angles.cos()])
    sin = torch.cat([angles.sin(), angles.sin()])
    x = k.to(torch.float64)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)
    return out.to(k.dtype)


def offset_position_ids(kind: str, offsets: torch.Tensor, *, input_ids=None, inputs_embeds=None,
                        attention_mask=None, position_ids=None, past_length: int = 0,
                        padding_idx: Optional[int] = None) -> torch.Tensor:
    """``position_ids`` for learned absolute positions, shifted by each row's prefix length.

    Args:
        kind: the family's default-position rule: ``"arange"`` (gpt2, bert), ``"mask_cumsum"``
            (opt), ``"padding_idx"`` (roberta).
        offsets: ``[B]`` int, the prefix length of each row's task.
        position_ids: the caller's own positions (0-based for its own tokens), if given; then
            every position is shifted by the row's offset (as PEFT does).
        past_length: own tokens already in the HF cache.
    """
    offsets = offsets.to(torch.long)
    if position_ids is not None:
        return position_ids + offsets.to(position_ids.device)[:, None]
    ref = input_ids if input_ids is not None else inputs_embeds
    B, S = ref.shape[0], ref.shape[1]
    device = ref.device
    offsets = offsets.to(device)[:, None]
    if kind == "arange":
        pos = torch.arange(past_length, past_length + S, device=device)[None].expand(B, S)
        return pos + offsets
    if kind == "mask_cumsum":
        mask = (attention_mask.to(device=device, dtype=torch.long) if attention_mask is not None
                else torch.ones(B, past_length + S, dtype=torch.long, device=device))
        pos = (torch.cumsum(mask, dim=1) * mask - 1)[:, past_length:]
        return pos + offsets * mask[:, past_length:]
    if kind == "padding_idx":
        if input_ids is not None:
            valid = input_ids.ne(padding_idx).long()
            pos = (torch.cumsum(valid, dim=1) + past_length) * valid + padding_idx
            return pos + offsets * valid
        pos = torch.arange(padding_idx + 1, S + padding_idx + 1, device=device)[None].expand(B, S)
        return pos + offsets
    raise ValueError(f"offset_position_ids: `kind` {kind!r} is invalid; expected 'arange', 'mask_cumsum' "
                     "or 'padding_idx'")
