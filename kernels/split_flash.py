"""Differentiable attention over disjoint key parts through ATen's fused CPU flash kernels.

Each part (a sequence's own keys, a task's prefix shared by its rows) runs through
``_scaled_dot_product_flash_attention_for_cpu``, which returns its output and log-sum-exp without
materialising scores; the parts merge in fp32 through their log-sum-exps. The backward uses the
split-KV identity: given the *merged* output ``O`` and log-sum-exp ``L``, a part's probabilities
are ``exp(s - L)`` and ``rowsum(dO * O)`` is the global one, so ATen's flash backward run per part
on (``dO``, ``O``, ``L``) gives exactly that part's ``dQ``, ``dK``, ``dV``. A part whose queries are
stacked (all rows of a task against its prefix in one kernel call) gets ``dK``/``dV`` already
summed over those rows.

Queries are ``q [B, H, M, D]`` (GQA heads stacked into rows by the caller). A part is read either
by every row (``rows=None``: keys ``[B, H, N, D]``) or by rows grouped as ``[Gb, W]``
(:class:`Rows`: keys ``[Gb, H, N, D]``). Grouped queries are stacked into ``[Gb, H, W * M, D]``,
one kernel call per group; a single group of consecutive rows instead reads its keys broadcast
(stride 0) over its rows, with no copy of either. Merges are one ``lerp`` per part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
HAS_SPLIT_FLASH = _FLASH is not None and _FLASH_BACKWARD is not None


@dataclass
class Rows:
    """Batch rows ``seqs`` at ``(group, slot)`` of a ``[groups, width]`` layout; ``start`` is set
    when they are the consecutive rows ``start .. start + groups * width``, group after group (the
    layout is then a view)."""
    seqs: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    groups: int
    width: int
    start: Optional[int] = None


@dataclass
class KeyPart:
    """Keys ``k, v`` of one part, an additive fp32 ``bias`` broadcastable to its scores (or None),
    the rows that read it (None: all), and ``blind`` ``[B, 1|H, M]``: rows (of an all-rows part)
    that see none of its keys, or None."""
    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor] = None
    rows: Optional[Rows] = None
    blind: Optional[torch.Tensor] = None


def _dense(t: torch.Tensor) -> torch.Tensor:
    # The CPU kernels read rows as if the last dimension were dense: a strided one gives garbage.
    return t if t.stride(-1) == 1 else t.contiguous()


def _shared(rows: Optional[Rows]) -> bool:
    """One group of consecutive rows: its keys are broadcast over them (a stride-0 view), so the
    queries need no restacking and the keys no copy."""
    return rows is not None and rows.groups == 1 and rows.start is not None


def stack_rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Per-row ``[B, H, M, X]`` -> a part's stacked ``[Gb, H, W * M, X]``."""
    _, H, M, X = t.shape
    if rows.start is not None:
        grouped = t[rows.start: rows.start + rows.groups * rows.width].view(rows.groups, rows.width, H, M, X)
    else:
        grouped = t.new_zeros(rows.groups, rows.width, H, M, X).index_put((rows.group, rows.slot), t[rows.seqs])
    return grouped.transpose(1, 2).reshape(rows.groups, H, rows.width * M, X)


def unstack_rows(t: torch.Tensor, rows: Rows, M: int) -> torch.Tensor:
    """A part's stacked ``[Gb, H, W * M, X]`` -> ``[n, H, M, X]`` for its rows (in ``rows.seqs`` order)."""
    Gb, H, _, X = t.shape
    grouped = t.view(Gb, H, rows.width, M, X).transpose(1, 2)
    if rows.start is not None:
        return grouped.reshape(Gb * rows.width, H, M, X)
    return grouped[rows.group, rows.slot]


def merge(out, lse, part_out, part_lse):
    """Two attention states over disjoint keys -> one, weighted through the fp32 log-sum-exps:
    the new part's share is ``sigmoid(part_lse - lse)``. Rows where both are -inf keep ``out``."""
    share = torch.sigmoid(torch.nan_to_num(part_lse - lse, nan=float("-inf")))
    return torch.lerp(out, part_out, share[..., None]), torch.logaddexp(lse, part_lse)


def _part_queries(t: torch.Tensor, rows: Optional[Rows]) -> torch.Tensor:
    """``[B, H, M, X]`` -> what the part's kernel call reads for those rows."""
    if rows is None:
        return t
    if _shared(rows):
        return t[rows.start: rows.start + rows.width]
    return stack_rows(t, rows)


def _part_keys(t: torch.Tensor, rows: Optional[Rows]) -> torch.Tensor:
    return _dense(t).expand(rows.width, -1, -1, -1) if _shared(rows) else _dense(t)


class _SplitFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parts: List[KeyPart], scale: float, q: torch.Tensor, *kv: torch.Tensor):
        B, H, M, D = q.shape
        out = lse = None
        for part in parts:
            rows = part.rows
            o, l = _FLASH(_dense(_part_queries(q, rows)), _part_keys(part.k, rows), _part_keys(part.v, rows), 0.0,
                          False, attn_mask=part.bias, scale=scale)
            if part.blind is not None:          # the kernel gives rows that see nothing a log-sum-exp of 0
                l = l.masked_fill(part.blind, float("-inf"))
            whole = rows is None or (_shared(rows) and rows.start == 0 and rows.width == B)
            if out is None and whole:
                out, lse = o, l
                continue
            if out is None:
                out, lse = q.new_zeros(B, H, M, D), q.new_full((B, H, M), float("-inf"))
            if rows is None:
                out, lse = merge(out, lse, o, l)
            elif rows.start is not None:
                stop = rows.start + rows.groups * rows.width
                if not _shared(rows):
                    o, l = unstack_rows(o, rows, M), unstack_rows(l[..., None], rows, M)[..., 0]
                out[rows.start:stop], lse[rows.start:stop] = merge(out[rows.start:stop], lse[rows.start:stop], o, l)
            else:
                o, l = unstack_rows(o, rows, M), unstack_rows(l[..., None], rows, M)[..., 0]
                o, l = merge(out[rows.seqs], lse[rows.seqs], o, l)
                out, lse = out.index_copy(0, rows.seqs, o), lse.index_copy(0, rows.seqs, l)
        if out is None:
            out, lse = q.new_zeros(B, H, M, D), q.new_full((B, H, M), float("-inf"))
        nothing = torch.isinf(lse)
        if bool(nothing.any()):
            # Rows that see nothing: zeros, and a finite log-sum-exp so that the backward's
            # exp(s - L) is exp(-inf) = 0 for them rather than NaN.
            out = out.masked_fill(nothing[..., None], 0.0)
            lse = lse.masked_fill(nothing, 0.0)
        ctx.parts, ctx.scale = parts, scale
        ctx.save_for_backward(q, out, lse, *kv)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        M = q.shape[2]
        grad_out = grad_out.contiguous()
        dq = None
        dkv = []
        for i, part in enumerate(ctx.parts):
            rows = part.rows
            k, v = _part_keys(kv[2 * i], rows), _part_keys(kv[2 * i + 1], rows)
            g, o = _part_queries(grad_out, rows), _part_queries(out, rows)
            l = _part_queries(lse[..., None], rows)[..., 0]
            dqs, dk, dv = _FLASH_BACKWARD(g.contiguous(), _dense(_part_queries(q, rows)), k, v, o.contiguous(),
                                          l.contiguous(), 0.0, False, attn_mask=part.bias, scale=ctx.scale)
            if rows is None:
                dq = dqs if dq is None else dq.add_(dqs)
            else:
                dq = torch.zeros_like(q) if dq is None else dq
                if _shared(rows):
                    dq[rows.start: rows.start + rows.width] += dqs
                    dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
                else:
                    dq.index_add_(0, rows.seqs, unstack_rows(dqs, rows, M))
            dkv += [dk, dv]
        return (None, None, dq, *dkv)


def split_flash_attention(q: torch.Tensor, parts: List[KeyPart], scale: float) -> torch.Tensor:
    """``softmax(scale * q @ [keys of all parts]^T) @ [values]`` for ``q [B, H, M, D]``, the parts
    merged through their log-sum-exps: ``[B, H, M, D]`` in ``q``'s dtype (fp32 or lower; the CPU
    kernels accumulate in fp32). Rows that see no key give zeros. Differentiable in ``q`` and every
    part's ``k``, ``v``."""
    kv = [t for part in parts for t in (part.k, part.v)]
    return _SplitFlash.apply(parts, scale, q, *kv)
