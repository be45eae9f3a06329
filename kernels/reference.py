"""The ``reference`` backend: materialise ``[prefix ; own]`` per sequence, run plain attention.

It also defines the dense-path options (soft-capping, an additive bias, dropout) that the
``torch`` backend computes through ``dense_backend.py`` with this same code.

This is the ground truth every other backend is tested against, and the naive baseline the
benchmarks beat: it copies each task's prefix into every sequence of the batch, exactly what
PEFT-style prefix caches do.
"""
from __future__ import annotations

import torch

from .inputs import PrefixAttentionInputs
from .masks import all_finite, nonfinite_rows, own_key_visibility, prefix_row_count, query_valid, zero_rows


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
    return materialised_attention(x, compute_dtype(x.q.dtype))


def materialised_attention(x: PrefixAttentionInputs, matmul_dtype: torch.dtype) -> torch.Tensor:
    """The contract computed on ``[prefix ; own]`` materialised per sequence, products in
    ``matmul_dtype`` and the softmax in fp32 (fp64 for fp64 inputs). Applies the dense-path
    options in the families' eager order: scale, soft-cap, bias (own columns only), mask,
    softmax, dropout."""
    cdt = matmul_dtype
    G = x.group_size
    rows = prefix_row_count(x)
    keys = torch.cat([materialise_prefix(x, x.prefix_k, rows), x.k], dim=2).to(cdt)
    values = torch.cat([materialise_prefix(x, x.prefix_v, rows), x.v], dim=2).to(cdt)
    bad = None
    if not all_finite(keys, values):                                   # [B, Hkv, rows + Skv]
        bad = nonfinite_rows(keys, values)
        keys, values = zero_rows(keys, bad), zero_rows(values, bad)
    keys = keys.repeat_interleave(G, dim=1)
    values = values.repeat_interleave(G, dim=1)

    prefix_visible = (torch.arange(rows, device=x.q.device)[None, :]
                      < x.prefix_lens[x.task_ids][:, None])            # [B, rows]
    prefix_visible = prefix_visible[:, None, :] & query_valid(x)[:, :, None]   # [B, Sq, rows]
    own_visible = own_key_visibility(x)                                # [B, 1|Hq, Sq, Skv]
    Hm = own_visible.shape[1]
    visible = torch.cat([prefix_visible[:, None].expand(-1, Hm, -1, -1), own_visible], dim=-1)

    # Padding queries are zeroed first: whatever they hold, they return zeros.
    q = x.q.to(cdt).masked_fill(~query_valid(x)[:, None, :, None], 0.0)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * x.scale
    if x.softcap is not None:
        scores = torch.tanh(scores / x.softcap) * x.softcap
    sdt = compute_dtype(x.q.dtype)
    scores = scores.to(sdt)
    if x.bias is not None:                                             # prefix columns get no bias
        scores = scores + torch.nn.functional.pad(x.bias.to(sdt), (rows, 0))
    any_visible = visible.any(-1, keepdim=True)
    # Rows that see nothing get finite scores, then zero probabilities: zeros, never NaN.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    probs = torch.softmax(scores, dim=-1) * any_visible
    if x.dropout_p > 0:
        keep = torch.rand(probs.shape, generator=x.generator, device=probs.device) >= x.dropout_p
        probs = probs * keep / (1.0 - x.dropout_p)
    out = torch.matmul(probs.to(cdt), values)
    if bad is not None:        # a visible NaN stays visible (filled after: no NaN in the backward)
        sees_bad = (visible & bad.repeat_interleave(G, dim=1)[:, :, None, :]).any(-1, keepdim=True)
        out = out.masked_fill(sees_bad, float("nan"))
    return out.to(x.q.dtype)
