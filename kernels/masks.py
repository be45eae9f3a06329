"""The visibility rule of the contract, as dense boolean masks (used by the PyTorch backends)."""
from __future__ import annotations

import torch

from .inputs import PrefixAttentionInputs, derived


def query_valid(x: PrefixAttentionInputs) -> torch.Tensor:
    """``[B, Sq]`` bool: query row i of sequence b is real (``i < q_lens[b]``); once per plan."""
    return derived(x, "query_valid", lambda: _query_valid(x))


def _query_valid(x: PrefixAttentionInputs) -> torch.Tensor:
    rows = torch.arange(x.q_len, device=x.q.device)
    return rows[None, :] < x.q_lens[:, None]


def own_key_visibility(x: PrefixAttentionInputs) -> torch.Tensor:
    """``[B, 1|Hq, Sq, Skv]`` bool: own key j is visible to query i of sequence b.

    ``kv_starts[b] <= j < kv_lens[b]``; with ``causal`` also ``j <= kv_lens - q_lens + i``;
    with ``window`` also ``(kv_lens - q_lens + i) - j < window``; and the explicit mask.
    Rows of padding queries (``i >= q_lens[b]``) are all False. Once per plan (and mask).
    """
    return derived(x, "own_visible", lambda: _own_key_visibility(x), mask_dependent=True)


def _own_key_visibility(x: PrefixAttentionInputs) -> torch.Tensor:
    i = torch.arange(x.q_len, device=x.q.device)[None, :, None]      # [1, Sq, 1]
    j = torch.arange(x.kv_len, device=x.q.device)[None, None, :]     # [1, 1, Skv]
    starts = x.kv_starts[:, None, None]
    ends = x.kv_lens[:, None, None]
    visible = (j >= starts) & (j < ends)                               # [B, 1, Skv]
    position = (x.kv_lens - x.q_lens)[:, None, None] + i               # absolute position of query i
    if x.causal:
        visible = visible & (j <= position)
    if x.window is not None:
        visible = visible & (position - j < x.window)
    visible = visible & query_valid(x)[:, :, None]
    visible = visible.expand(x.batch, x.q_len, x.kv_len)[:, None]      # [B, 1, Sq, Skv]
    if x.attn_mask is not None:
        visible = visible & x.attn_mask
    return visible


def prefix_row_count(x: PrefixAttentionInputs) -> int:
    """Prefix rows the widest task in this batch uses (a host sync, once per plan)."""
    if x.batch == 0:
        return 0
    return derived(x, "prefix_rows", lambda: int(x.prefix_lens[x.task_ids].max()))


# Keys a query cannot see must never reach its output, whatever they hold (an uninitialised
# cache page, the rows of a prefix's last block past its length). Masking scores is not enough:
# a zero probability times a NaN value is NaN in ``p @ v``, and in the backward a zero score
# gradient times a NaN key is NaN in ``dS @ k``. So non-finite key rows are zeroed before any
# product, and a query that does see one gets NaN explicitly (a visible NaN is never hidden).

def all_finite(*tensors: torch.Tensor) -> bool:
    """True when no element is NaN or inf: one reduction per tensor (a non-finite element makes
    the sum non-finite), so the common clean case pays no mask. Summed in fp32 (fp64 kept): a
    half-precision sum overflows for large finite tensors; a false alarm only costs the exact path."""
    with torch.no_grad():
        return all(bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)))
                   for t in tensors if t.numel())


def nonfinite_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[..., S]`` bool: key row s holds a NaN or inf in its key or its value."""
    with torch.no_grad():
        return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def zero_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t [..., S, D]`` with the rows flagged in ``rows [..., S]`` replaced by zeros (out of place;
    their gradient is zero)."""
    return t.masked_fill(rows[..., None], 0.0)
