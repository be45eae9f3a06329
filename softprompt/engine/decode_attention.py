"""Prefix + own-token attention of one CPU decode step, planned once and reused by every layer.

In a decode step all layers share the batch's tasks, prefix lengths and own-key ranges, so
:class:`DecodeAttention` derives them once per step and each layer only does the arithmetic:

- own keys: two batched matrix products over the rows, each reading a row's gathered own K (V)
  once as ``[Skv, Hkv*D]``: the queries enter block-diagonally (``[Hkv*G, Hkv*D]``, query head
  ``(h, g)`` nonzero only in KV head h's columns), so every head of a row is scored in one small
  GEMM with K/V never repeated or transposed; the scores outside a head's own block are never
  used. It does Hkv times the (tiny) arithmetic of per-head products in a fraction of their
  calls, which beats the fused CPU flash kernel when each (row, head) has only G query rows. An
  additive bias hides left padding and keys outside a sliding window;
- prefixes, read in place from the store's block pool: tasks with the same prefix length and the
  same number of rows are stacked into one flash call whose queries are all of those rows
  (each prefix block is read once per task, not per row);
- the two parts merged through their log-sum-exps (fp32).

It computes what ``prefix_attention(..., backend="torch")`` computes for one query per row (rows
right-aligned: row b's own keys are the last ``own_lens[b]`` columns); tests check it against the
``reference`` backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from softprompt.kernels.masks import all_finite
from softprompt.kernels.torch_backend import HAS_CPU_FLASH, cpu_flash, merge_states, read_prefixes


@dataclass
class _OwnPart:
    """Rows whose own keys are gathered together, right-aligned in one width."""
    rows: Optional[torch.Tensor]            # [B_k] batch rows, None = all
    bias: torch.Tensor                      # [B_k, Hkv*G, width] 0 / -inf (padding, window)
    block_q: Optional[torch.Tensor] = None  # [B_k, Hkv*G, Hkv*D] block-diagonal queries, reused by layers


def split_by_length(own_lens: torch.Tensor, kv_len: int, min_saving: float = 0.15):
    """Parts ``[(rows, width)]`` for :class:`DecodeAttention`: the rows in one part, or — when it
    cuts the gathered own-key slots by at least ``min_saving`` — the shorter rows in a second part
    only as wide as its longest row (each part is one more gather and product pair per layer)."""
    B = own_lens.shape[0]
    lens, order = torch.sort(own_lens)
    if B < 2:
        return [(None, kv_len)]
    # slots with a split after the m shortest rows: m * lens[m-1] + (B - m) * kv_len
    m = torch.arange(1, B)
    slots = m * lens[:-1] + (B - m) * kv_len
    best = int(slots.argmin())
    if float(slots[best]) > (1 - min_saving) * B * kv_len:
        return [(None, kv_len)]
    cut = best + 1
    short, long_ = order[:cut].sort().values, order[cut:].sort().values
    return [(short, int(lens[cut - 1])), (long_, kv_len)]


@dataclass
class _PrefixGroup:
    """Tasks of one prefix length whose row counts are equal: one flash call."""
    rows: torch.Tensor                      # [n * W] batch rows, task after task
    span: Optional[Tuple[int, int]]         # the same rows as a slice start..stop, when consecutive
    blocks: torch.Tensor                    # [n, nb] block ids of the n tasks' prefixes
    length: int                             # prefix rows P
    tasks: int                              # n
    width: int                              # W rows per task


class DecodeAttention:
    """The attention of one decode step (one query per row) for every layer.

    Args:
        task_ids: ``[B]`` store task ids of the rows (None: no row has a prefix).
        block_table, prefix_lens, block_size: the store's (shared by all layers).
        own_lens: ``[B]`` own keys of each row, right-aligned in ``Skv`` columns (>= 1: the new token).
        kv_len: ``Skv``.
        num_kv_heads, group_size: ``Hkv`` and ``G = Hq / Hkv``.
        scale: softmax scale.
        window: sliding window over own keys (None: none).
        parts: the rows' own keys come in these parts: ``[(rows, kv_len_k)]``, each part's rows
            (a LongTensor, or None for all rows) with their own keys right-aligned in ``kv_len_k``
            columns (see :func:`split_by_length`); default one part, all rows, ``Skv`` columns.
    """

    def __init__(self, task_ids: Optional[torch.Tensor], block_table: torch.Tensor, prefix_lens: torch.Tensor,
                 block_size: int, own_lens: torch.Tensor, kv_len: int, *, num_kv_heads: int, group_size: int,
                 scale: float, window: Optional[int] = None, parts=None):
        if not HAS_CPU_FLASH:
            raise RuntimeError("DecodeAttention needs torch's CPU flash-attention operator")
        B = own_lens.shape[0]
        if B and (int(own_lens.min()) < 1 or int(own_lens.max()) > kv_len):
            raise ValueError(f"DecodeAttention: `own_lens` must lie in [1, {kv_len}] (the new token is always seen)")
        self.batch, self.kv_len = B, kv_len
        self.num_kv_heads, self.group_size, self.scale = num_kv_heads, group_size, scale
        self.parts = []
        for rows, width in (parts if parts is not None else [(None, kv_len)]):
            lens = own_lens if rows is None else own_lens.index_select(0, rows)
            if int(lens.max()) > width:
                raise ValueError(f"DecodeAttention: a part of {width} columns holds a row of {int(lens.max())} own keys")
            first = width - lens                                        # first visible own column per row
            if window is not None:
                first = torch.maximum(first, torch.full_like(first, width - window))
            hidden = torch.arange(width)[None, :] < first[:, None]      # [B_k, width]
            bias = torch.zeros(lens.shape[0], 1, width).masked_fill_(hidden[:, None, :], float("-inf"))
            self.parts.append(_OwnPart(rows, bias.expand(-1, num_kv_heads * group_size, width)))
        self.groups = [] if task_ids is None else self._groups(task_ids.tolist(), block_table,
                                                               prefix_lens.tolist(), block_size)

    @staticmethod
    def _groups(task_list: List[int], block_table: torch.Tensor, lens: List[int],
                block_size: int) -> List[_PrefixGroup]:
        members = {}
        for b, t in enumerate(task_list):
            if lens[t] > 0:
                members.setdefault(t, []).append(b)
        by_shape = {}
        for t, rows in members.items():
            by_shape.setdefault((lens[t], len(rows)), []).append(t)
        groups = []
        for (length, width), tasks in by_shape.items():
            rows = [b for t in tasks for b in members[t]]
            span = (rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else None
            groups.append(_PrefixGroup(rows=torch.tensor(rows, dtype=torch.long), span=span,
                                       blocks=block_table[tasks, : -(-length // block_size)],
                                       length=length, tasks=len(tasks), width=width))
        return groups

    def own(self, part: "_OwnPart", q: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor):
        """Attention of ``q [B_k, Hkv, G, D]`` over one part's own keys ``[B_k, width, Hkv*D]``:
        output ``[B_k, Hkv, G, D]`` and log-sum-exp ``[B_k, Hkv, G]``."""
        out, lse = self._own(part, q, own_k, own_v)
        # Hidden columns may hold NaN / inf (left padding, an uninitialised page): any of them
        # reaches the output (NaN + -inf bias, 0 * NaN), so the small output tells whether the
        # gathered K/V need a scan; then non-finite keys are zeroed and the heads that see one
        # are NaN.
        if all_finite(out):
            return out, lse
        own_k, own_v, sees_bad = _clean_own(part, own_k, own_v, q.shape[1])
        out, lse = self._own(part, q, own_k, own_v)
        return out.masked_fill(sees_bad[:, :, None, None], float("nan")), lse

    def _own(self, part: "_OwnPart", q: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor):
        B, Hkv, G, D = q.shape
        if part.block_q is None:
            part.block_q = q.new_zeros(B, Hkv * G, Hkv * D)
        blocks = part.block_q.view(B, Hkv, G, Hkv, D)
        torch.diagonal(blocks, dim1=1, dim2=3).copy_(q.permute(0, 2, 3, 1))     # block (h, h) = q[:, h]
        scores = torch.baddbmm(part.bias, part.block_q, own_k.transpose(1, 2), alpha=self.scale)
        top = scores.amax(-1, keepdim=True)                                     # finite: the new token is seen
        p = torch.exp_(scores.sub_(top))
        total = p.sum(-1, keepdim=True)
        out = torch.bmm(p, own_v).view(B, Hkv, G, Hkv, D)
        out = torch.diagonal(out, dim1=1, dim2=3).permute(0, 3, 1, 2) / total.view(B, Hkv, G, 1)
        return out.contiguous(), (top + torch.log(total)).view(B, Hkv, G)

    def __call__(self, q: torch.Tensor, own_kv, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> torch.Tensor:
        """``q [B, Hkv, G, D]`` (fp32); ``own_kv``: per part, its rows' own K and V token-major
        ``[B_k, width, Hkv*D]`` (fp32); the layer's prefix block pools ``[num_blocks, Hkv,
        block_size, D]`` -> ``[B, Hkv, G, D]`` fp32."""
        if len(self.parts) == 1 and self.parts[0].rows is None:
            out, lse = self.own(self.parts[0], q, *own_kv[0])
        else:
            out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
            for part, (k, v) in zip(self.parts, own_kv):
                o, l = self.own(part, q.index_select(0, part.rows), k, v)
                out.index_copy_(0, part.rows, o)
                lse.index_copy_(0, part.rows, l)
        Hkv, G = self.num_kv_heads, self.group_size
        D = q.shape[-1]
        for g in self.groups:
            n, W, P = g.tasks, g.width, g.length
            rows = q[g.span[0]: g.span[1]] if g.span else q.index_select(0, g.rows)
            stacked = rows.view(n, W, Hkv, G, D).transpose(1, 2).reshape(n, Hkv, W * G, D)
            pk = read_prefixes(prefix_k, g.blocks, P)
            pv = read_prefixes(prefix_v, g.blocks, P)
            p_out, p_lse = cpu_flash(stacked, pk, pv, self.scale)
            p_out = p_out.view(n, Hkv, W, G, D).transpose(1, 2).reshape(n * W, Hkv, G, D)
            p_lse = p_lse.view(n, Hkv, W, G).transpose(1, 2).reshape(n * W, Hkv, G)
            if g.span:
                start, stop = g.span
                out[start:stop], lse[start:stop] = merge_states(out[start:stop], lse[start:stop], p_out, p_lse)
            else:
                merged, merged_lse = merge_states(out.index_select(0, g.rows), lse.index_select(0, g.rows), p_out, p_lse)
                out.index_copy_(0, g.rows, merged)
                lse.index_copy_(0, g.rows, merged_lse)
        return out


def _clean_own(part: _OwnPart, own_k: torch.Tensor, own_v: torch.Tensor, Hkv: int):
    """Own K/V ``[B_k, width, Hkv*D]`` with every non-finite (key, head) zeroed, and ``[B_k, Hkv]``
    the heads that see one. Hidden columns (left padding, an uninitialised page, keys outside the
    window) may hold anything: an -inf bias does not hide a NaN score, ``0 * NaN`` in ``p @ v`` is
    NaN, and the block-diagonal product multiplies every head's keys by the zeros of the others."""
    B, width, _ = own_k.shape
    k, v = own_k.reshape(B, width, Hkv, -1), own_v.reshape(B, width, Hkv, -1)
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))             # [B_k, width, Hkv]
    seen = part.bias[:, 0, :] == 0                                              # [B_k, width]
    sees_bad = (bad & seen[..., None]).any(1)
    clean = lambda t: t.masked_fill(bad[..., None], 0.0).reshape(B, width, -1)  # noqa: E731
    return clean(k), clean(v), sees_bad
