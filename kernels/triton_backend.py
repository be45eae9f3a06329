"""The ``triton`` backend: dispatch between the fused training/prefill kernels and the decode kernels.

The kernels themselves live in ``triton_prefill.py`` (forward + backward) and ``triton_decode.py``
(mixed-task decoding). Until they are built, asking for this backend raises a clear error.

Paged own keys (:class:`OwnPages`): the decode kernels read them in place through the page table;
the prefill kernels (training, long prompts) get them gathered into ``[B, Hkv, Skv, D]`` here
(differentiable: gradients reach the pools).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from .inputs import PrefixAttentionInputs


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_kernels_built() -> bool:
    return importlib.util.find_spec("softprompt.kernels.triton_prefill") is not None


def triton_unavailable_reason(device: torch.device) -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    if not triton_kernels_built():
        return "the Triton kernels are not built yet in this version; use backend='torch'"
    if device.type == "cpu":
        return "Triton runs on the CPU only through its interpreter: set TRITON_INTERPRET=1 before importing kernels"
    return f"Triton does not support device type {device.type!r}"


class OwnPages(NamedTuple):
    """Paged own keys: page pools ``k, v [num_pages, page_size, Hkv, D]`` (token-major; any
    strides) and ``table [B, pages]`` int, own key j of row b at page ``table[b, j // page_size]``,
    slot ``j % page_size`` (entries a row does not use must still index the pool, e.g. 0)."""

    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor
    page_size: int

    def gather(self, pool: torch.Tensor, length: int) -> torch.Tensor:
        """Rows' own keys (or values) out of ``pool``: ``[B, Hkv, length, D]``."""
        B, n = self.table.shape
        g = pool[self.table.long()]                                    # [B, pages, page_size, Hkv, D]
        return g.reshape(B, n * self.page_size, *pool.shape[2:])[:, :length].transpose(1, 2)

    def gathered(self, x: PrefixAttentionInputs) -> PrefixAttentionInputs:
        """``x`` with its own keys and values gathered out of the pools."""
        return dataclasses.replace(x, k=self.gather(self.k, x.kv_len), v=self.gather(self.v, x.kv_len))

    def shape_of(self, batch: int, kv_len: int) -> torch.Tensor:
        """A stand-in ``[B, Hkv, kv_len, D]`` with no storage of its own (one element, zero
        strides) for ``PrefixAttentionInputs.k / v``: it carries the logical shape only."""
        return self.k.new_zeros(()).expand(batch, self.k.shape[2], kv_len, self.k.shape[3])


def decode_kernels_built() -> bool:
    return importlib.util.find_spec("softprompt.kernels.triton_decode") is not None


def wants_decode_path(x: PrefixAttentionInputs, own_pages: Optional[OwnPages] = None) -> bool:
    """Few queries per sequence and no gradient needed: the decode kernels serve it."""
    own = (x.k, x.v) if own_pages is None else (own_pages.k, own_pages.v)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x.q, *own, x.prefix_k, x.prefix_v))
    return x.q_len <= 16 and not needs_grad and x.attn_mask is None and decode_kernels_built()


def triton_attention(x: PrefixAttentionInputs, own_pages: Optional[OwnPages] = None) -> torch.Tensor:
    """The backend; with ``own_pages``, ``x.k, x.v`` only carry the logical own-key shape."""
    if wants_decode_path(x, own_pages):
        from .triton_decode import decode_attention
        return decode_attention(x, own_pages=own_pages)
    from .triton_prefill import prefill_attention
    return prefill_attention(x if own_pages is None else own_pages.gathered(x))
