"""The methods a benchmark compares, each a function ``problem -> callable`` running one forward.

Ours: the ``torch`` and ``triton`` backends of ``prefix_attention``. Baselines: the materialising
``reference``; ``sdpa_concat``, PEFT-style per-sequence prefix caches (each sequence's task prefix
copied in front of its own K/V) run through PyTorch SDPA; ``flex_packed``, FlexAttention on a packed
layout whose block mask admits each document's task prefix; ``flashinfer``, FlashInfer's cascade
attention where it is installed. ``unavailable(name, device)`` says why a method is skipped.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from softprompt.kernels import plan_for_layer
from softprompt.kernels.backends import triton_runs_on


def _ours(backend: str):
    """One layer's attention through a plan built beforehand: in a model the plan is built once per
    forward and every layer runs it, so a layer costs ``run`` alone (as FlashInfer's plan/run)."""
    def make(p):
        plan = plan_for_layer(*p.args, backend=backend, **p.kwargs)
        layer = p.args[:5]
        return lambda: plan.run(*layer)
    return make


def _materialised(p):
    """Per-sequence [prefix ; own] K/V and the matching boolean mask (the PEFT-style cache)."""
    q, k, v, pk, pv, table, lens, tids = p.args
    rows = int(lens.max())
    blocks = -(-rows // pk.shape[2])

    def gather(pool):
        g = pool[table[tids, :blocks]]                                  # [B, blocks, Hkv, bs, D]
        B, n, H, bs, D = g.shape
        return g.permute(0, 2, 1, 3, 4).reshape(B, H, n * bs, D)[:, :, :rows]

    Sq, Skv = q.shape[2], k.shape[2]
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Skv, device=q.device)[None, :]
    own = j <= (Skv - Sq) + i if p.kwargs.get("causal", True) else torch.ones(Sq, Skv, dtype=torch.bool,
                                                                                device=q.device)
    prefix = torch.arange(rows, device=q.device)[None, :] < lens[tids][:, None]   # [B, rows]
    mask = torch.cat([prefix[:, None, :].expand(-1, Sq, -1), own.expand(q.shape[0], -1, -1)], -1)[:, None]
    return gather, mask


def _sdpa_concat(p):
    q, k, v, pk, pv = p.args[:5]

    def run():
        gather, mask = _materialised(p)      # the per-sequence copy is part of what is timed
        keys = torch.cat([gather(pk), k], 2)
        values = torch.cat([gather(pv), v], 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    return run


def _flex_packed(p):
    """All task prefixes once, then every sequence's own tokens, packed along one axis."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, pk, pv, table, lens, tids = p.args
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    T = lens.shape[0]
    blocks = table.shape[1]
    dense_k = pk[table].permute(0, 2, 1, 3, 4).reshape(T, Hkv, -1, D)[:, :, :int(lens.max())]
    dense_v = pv[table].permute(0, 2, 1, 3, 4).reshape(T, Hkv, -1, D)[:, :, :int(lens.max())]
    Pm = dense_k.shape[2]
    # keys: [T*Pm prefix rows | B*Skv own rows]; queries: B*Sq rows (one batch, packed)
    keys = torch.cat([dense_k.permute(1, 0, 2, 3).reshape(Hkv, T * Pm, D),
                      k.permute(1, 0, 2, 3).reshape(Hkv, B * Skv, D)], 1)[None]
    values = torch.cat([dense_v.permute(1, 0, 2, 3).reshape(Hkv, T * Pm, D),
                        v.permute(1, 0, 2, 3).reshape(Hkv, B * Skv, D)], 1)[None]
    queries = q.permute(1, 0, 2, 3).reshape(Hq, B * Sq, D)[None]
    doc_task, prefix_len = tids.clone(), lens.clone()
    causal = p.kwargs.get("causal", True)
    npre = T * Pm

    def mask_mod(b, h, qi, kj):
        doc = qi // Sq
        i = qi % Sq
        in_prefix = kj < npre
        task = kj // Pm
        prefix_ok = in_prefix & (task == doc_task[doc]) & ((kj % Pm) < prefix_len[doc_task[doc]])
        own_j = (kj - npre).clamp(min=0)
        own_ok = (~in_prefix) & (own_j // Skv == doc)
        if causal:
            own_ok = own_ok & ((own_j % Skv) <= (Skv - Sq) + i)
        return prefix_ok | own_ok

    block_mask = create_block_mask(mask_mod, None, None, B * Sq, npre + B * Skv, device=q.device)
    fn = torch.compile(flex_attention) if q.is_cuda else flex_attention

    def run():
        out = fn(queries, keys, values, block_mask=block_mask, enable_gqa=True)
        return out[0].view(Hq, B, Sq, D).permute(1, 0, 2, 3)
    return run


METHODS: Dict[str, Callable] = {
    "torch": _ours("torch"),
    "triton": _ours("triton"),
    "reference": _ours("reference"),
    "sdpa_concat": _sdpa_concat,
    "flex_packed": _flex_packed,
}
OURS = ("torch", "triton")


def unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why ``name`` cannot run on ``device`` here, or None when it can."""
    if name == "triton" and not (device.type == "cuda" and triton_runs_on(device)):
        return "needs a CUDA GPU (the CPU interpreter is a correctness tool, not a benchmark)"
    if name == "flex_packed" and device.type != "cuda":
        return "FlexAttention on the CPU must be compiled per shape (over a minute each); GPU preset only"
    if name == "flashinfer":
        if importlib.util.find_spec("flashinfer") is None:
            return "flashinfer is not installed"
        return "flashinfer cascade baseline is not wired up yet"
    return None
