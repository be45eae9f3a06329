"""Backend registry: name -> implementation, and which backends can run on a device.

``BACKENDS`` run on validated inputs (:class:`PrefixAttentionInputs`); ``compiled`` (the C++ op,
CPU only) runs only through a plan, which derives its index tensors once
(:mod:`~softprompt.kernels.compiled_backend`)."""
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
PLANNED_BACKENDS = ("compiled",)            # run only through a plan
BACKEND_NAMES = (*BACKENDS, *PLANNED_BACKENDS)


def compiled_runs_on(device: torch.device) -> bool:
    """The compiled backend runs on the CPU where its C++ op builds (built on the first call)."""
    from . import compiled_build
    return device.type == "cpu" and compiled_build.load() is not None


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
    if compiled_runs_on(device):
        names.append("compiled")
    return names


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The backend ``name`` stands for on ``device`` (``auto`` resolved); ValueError when it cannot run."""
    if name == "auto":
        # The Triton interpreter is a correctness tool, never the CPU default.
        name = "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if name not in BACKEND_NAMES:
        raise ValueError(f"prefix_attention: `backend` {name!r} is invalid; expected one of "
                         f"{['auto', *BACKEND_NAMES]}")
    if name == "compiled" and not compiled_runs_on(device):
        from . import compiled_build
        why = compiled_build.unavailable_reason() if device.type == "cpu" else "it runs on the CPU only"
        raise ValueError(f"prefix_attention: `backend` 'compiled' cannot run on {device}: {why}")
    if name == "triton" and not triton_runs_on(device):
        from .triton_backend import triton_unavailable_reason
        raise ValueError(f"prefix_attention: `backend` 'triton' cannot run on {device}: "
                         f"{triton_unavailable_reason(device)}")
    return name
