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
(:class:`Rows`: its queries ``[Gb, H, W * M, D]`` against keys ``[Gb, H, N, D]``).
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


def stack_rows(t: torch.Tensor, rows: Optional[Rows]) -> torch.Tensor:
    """Per-row ``[B, H, M, X]`` -> a part's stacked ``[Gb, H, W * M, X]``."""
    if rows is None:
        return t
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
    """Two attention states over disjoint keys -> one (fp32 log-sum-exp weighting); rows where both
    log-sum-exps are -inf stay -inf with their output unchanged."""
    top = torch.maximum(lse, part_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w, w_part = torch.exp(lse - top), torch.exp(part_lse - top)
    total = w + w_part
    safe = torch.where(total > 0, total, torch.ones_like(total))
    merged = (out * w[..., None] + part_out * w_part[..., None]) / safe[..., None]
    return merged, torch.where(total > 0, top + torch.log(safe), lse)


class _SplitFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parts: List[KeyPart], scale: float, q: torch.Tensor, *kv: torch.Tensor):
        B, H, M, D = q.shape
        out = q.new_zeros(B, H, M, D)
        lse = q.new_full((B, H, M), float("-inf"))
        for part in parts:
            qs = _dense(stack_rows(q, part.rows))
            o, l = _FLASH(qs, _dense(part.k), _dense(part.v), 0.0, False, attn_mask=part.bias, scale=scale)
            if part.blind is not None:          # the kernel gives rows that see nothing a log-sum-exp of 0
                l = l.masked_fill(part.blind, float("-inf"))
            if part.rows is None:
                out, lse = merge(out, lse, o, l)
            else:
                seqs = part.rows.seqs
                o, l = unstack_rows(o, part.rows, M), unstack_rows(l[..., None], part.rows, M)[..., 0]
                if part.rows.start is not None:
                    start, stop = part.rows.start, part.rows.start + seqs.shape[0]
                    out[start:stop], lse[start:stop] = merge(out[start:stop], lse[start:stop], o, l)
                else:
                    o, l = merge(out[seqs], lse[seqs], o, l)
                    out, lse = out.index_copy(0, seqs, o), lse.index_copy(0, seqs, l)
        # Rows that see nothing: zeros, and a finite log-sum-exp so that the backward's exp(s - L)
        # is exp(-inf) = 0 for them rather than NaN.
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        ctx.parts, ctx.scale = parts, scale
        ctx.save_for_backward(q, out, lse, *kv)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        M = q.shape[2]
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q)
        dkv = []
        for i, part in enumerate(ctx.parts):
            k, v = kv[2 * i], kv[2 * i + 1]
            g, o = stack_rows(grad_out, part.rows), stack_rows(out, part.rows)
            l = stack_rows(lse[..., None], part.rows)[..., 0]
            dqs, dk, dv = _FLASH_BACKWARD(_dense(g.contiguous()), _dense(stack_rows(q, part.rows)), _dense(k),
                                          _dense(v), o.contiguous(), l.contiguous(), 0.0, False,
                                          attn_mask=part.bias, scale=ctx.scale)
            if part.rows is None:
                dq += dqs
            else:
                dq.index_add_(0, part.rows.seqs, unstack_rows(dqs, part.rows, M))
            dkv += [dk, dv]
        return (None, None, dq, *dkv)


def split_flash_attention(q: torch.Tensor, parts: List[KeyPart], scale: float) -> torch.Tensor:
    """``softmax(scale * q @ [keys of all parts]^T) @ [values]`` for ``q [B, H, M, D]``, the parts
    merged through their log-sum-exps: ``[B, H, M, D]`` in ``q``'s dtype (fp32 or lower; the CPU
    kernels accumulate in fp32). Rows that see no key give zeros. Differentiable in ``q`` and every
    part's ``k``, ``v``."""
    kv = [t for part in parts for t in (part.k, part.v)]
    return _SplitFlash.apply(parts, scale, q, *kv)
