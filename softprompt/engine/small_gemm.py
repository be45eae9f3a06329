"""Decode-shaped linear layers on the CPU: ``y^T = W x^T`` instead of ``y = x W^T``.

A decode step multiplies a few dozen rows by every weight matrix of the model. For that shape
(few rows, a weight that is used transposed) the CPU BLAS that PyTorch ships can pick a slower
path than for the same product written the other way round, ``torch.mm(W, x.T).T``, which
computes the same dot products (``python -m benchmarks.engine --gemm-check`` compares the two on
the machine at hand).

:func:`small_batch_linears` swaps the forward of every ``nn.Linear`` of a model for the
transposed product while the engine runs a forward whose row count is at most ``max_rows``; the
model is unchanged outside it. It applies on the CPU only: GPU GEMMs need no such help.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def linear_transposed(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x^T)^T`` (contiguous result)."""
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        out = torch.mm(weight, rows.t())
    else:
        out = torch.addmm(bias[:, None], weight, rows.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _forward_of(module: nn.Linear, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and x.numel() // x.shape[-1] <= max_rows and x.dtype == module.weight.dtype:
            return linear_transposed(x, module.weight, module.bias)
        return F.linear(x, module.weight, module.bias)
    return forward


@contextlib.contextmanager
def small_batch_linears(model: nn.Module, max_rows: int = 128, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``nn.Linear`` layers of ``model`` on the CPU use :func:`linear_transposed`
    for inputs of at most ``max_rows`` rows (plain ``F.linear`` otherwise)."""
    if not enabled:
        yield
        return
    patched = []
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and "forward" not in module.__dict__:
            module.forward = _forward_of(module, max_rows)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
