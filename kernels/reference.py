"""The ``reference`` backend: materialise ``[prefix ; own]`` per sequence, run plain attention.

This is the ground truth every other backend is tested against, and the naive baseline the
benchmarks beat: it copies each task's prefix into every sequence of the batch, exactly what
PEFT-style prefix caches do.
"""
from __future__ import annotations

import torch

from .inputs import PrefixAttentionInputs
from .masks import own_key_visibility, prefix_row_count, query_valid


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32; fp32 and fp64 in their own precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def materialise_prefix(x: PrefixAttentionInputs, pool: torch.Tensor, rows: int) -> torch.Tensor:
    """Copy each sequence's task prefix out of the block pool: ``[B, Hkv, rows, D]``."""
    blocks = -(-rows // x.block_size)
    table = x.block_table[x.task_ids, :blocks].clamp_min(0)          # unused entries may be -1
    gathered = pool[table]                                             # [B, blocks, Hkv, bs, D]
    B, _, Hkv, bs, D = gathered.shape
    return gathered.permute(0, 2, 1, 3, 4).reshape(B, Hkv, blocks * bs, D)[:, :, :rows]


def reference_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    cdt = compute_dtype(x.q.dtype)
    G = x.group_size
    rows = prefix_row_count(x)
    keys = torch.cat([materialise_prefix(x, x.prefix_k, rows), x.k], dim=2).to(cdt)
    values = torch.cat([materialise_prefix(x, x.prefix_v, rows), x.v], dim=2).to(cdt)
    keys = keys.repeat_interleave(G, dim=1)
    values = values.repeat_interleave(G, dim=1)

    prefix_visible = (torch.arange(rows, device=x.q.device)[None, :]
                      < x.prefix_lens[x.task_ids][:, None])            # [B, rows]
    prefix_visible = prefix_visible[:, None, :] & query_valid(x)[:, :, None]   # [B, Sq, rows]
    own_visible = own_key_visibility(x)                                # [B, 1|Hq, Sq, Skv]
    Hm = own_visible.shape[1]
    visible = torch.cat([prefix_visible[:, None].expand(-1, Hm, -1, -1), own_visible], dim=-1)

    scores = torch.matmul(x.q.to(cdt), keys.transpose(-1, -2)) * x.scale
    any_visible = visible.any(-1, keepdim=True)
    # Rows that see nothing get finite scores, then zero probabilities: zeros, never NaN.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    probs = torch.softmax(scores, dim=-1) * any_visible
    return torch.matmul(probs, values).to(x.q.dtype)
