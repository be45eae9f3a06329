"""The ``triton`` backend: dispatch between the fused training/prefill kernels and the decode kernels.

The kernels themselves live in ``triton_prefill.py`` (forward + backward) and ``triton_decode.py``
(mixed-task decoding). Until they are built, asking for this backend raises a clear error.
"""
from __future__ import annotations

import importlib.util
import os

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


def decode_kernels_built() -> bool:
    return importlib.util.find_spec("softprompt.kernels.triton_decode") is not None


def wants_decode_path(x: PrefixAttentionInputs) -> bool:
    """Few queries per sequence and no gradient needed: the decode kernels serve it."""
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x.q, x.k, x.v, x.prefix_k, x.prefix_v))
    return x.q_len <= 16 and not needs_grad and x.attn_mask is None and decode_kernels_built()


def triton_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    if wants_decode_path(x):
        from .triton_decode import decode_attention
        return decode_attention(x)
    from .triton_prefill import prefill_attention
    return prefill_attention(x)
