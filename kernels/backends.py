"""Backend registry: name -> implementation, and which backends can run on a device."""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict

import torch

from .inputs import PrefixAttentionInputs
from .reference import reference_attention
from .torch_backend import torch_attention

BackendFn = Callable[[PrefixAttentionInputs], torch.Tensor]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    from .triton_backend import triton_attention  # imported lazily: triton is optional
    return triton_attention(x)


BACKENDS: Dict[str, BackendFn] = {
    "reference": reference_attention,
    "torch": torch_attention,
    "triton": _triton_attention,
}


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU through ``TRITON_INTERPRET=1``."""
    if not triton_installed():
        return False
    from .triton_backend import triton_kernels_built, interpreter_enabled
    if not triton_kernels_built():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def available_backends(device="cpu") -> list:
    device = torch.device(device)
    names = ["reference", "torch"]
    if triton_runs_on(device):
        names.append("triton")
    return names


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The backend ``name`` stands for on ``device`` (``auto`` resolved); ValueError when it cannot run."""
    if name == "auto":
        # The Triton interpreter is a correctness tool, never the CPU default.
        name = "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"prefix_attention: `backend` {name!r} is invalid; expected one of "
                         f"{['auto', *BACKENDS]}")
    if name == "triton" and not triton_runs_on(device):
        from .triton_backend import triton_unavailable_reason
        raise ValueError(f"prefix_attention: `backend` 'triton' cannot run on {device}: "
                         f"{triton_unavailable_reason(device)}")
    return name
