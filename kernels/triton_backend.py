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
    return importlib.util.find_spec("kernels.triton_prefill") is not None


def triton_unavailable_reason(device: torch.device) -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    if not triton_kernels_built():
        return "the Triton kernels are not built yet in this version; use backend='torch'"
    if device.type == "cpu":
        return "Triton runs on the CPU only through its interpreter: set TRITON_INTERPRET=1 before importing kernels"
    return f"Triton does not support device type {device.type!r}"


def triton_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    from .triton_prefill import prefill_attention
    return prefill_attention(x)
