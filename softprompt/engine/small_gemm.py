"""Decode-shaped linear layers on the CPU: ``y^T = W x^T`` instead of ``y = x W^T``.

A decode step multiplies a few dozen rows by every weight matrix of the model. For that shape
(few rows, a weight that is used transposed) the CPU BLAS that PyTorch ships can pick a slower
path than for the same product written the other way round, ``torch.mm(W, x.T).T``, which
computes the same dot products (``python -m benchmarks.engine --gemm-check`` compares the two on
the machine at hand).

:func:`small_batch_linears` swaps the forward of every ``nn.Linear`` of a model for the
transposed product while the engine runs a forward whose row count is at most ``max_rows``; the
model is unchanged outside it. It applies on the CPU only: GPU GEMMs need no such help.

:func:`decode_columns` and :func:`feature_major_operand` serve the engine's CPU decoder, whose
activations are feature-major ``[in, B]`` (one column per running sequence). The BLAS PyTorch ships
is uneven over the column count of ``W @ x``: measured on SmolLM2's weights streamed from memory
(``python -m benchmarks.engine --gemm-check``), 16 columns cost about as much as 1 (a GEMV), 13-15
or 31 columns cost 1.5-2x as much as 16 or 32, and 2-11 columns with a contiguous ``[in, B]``
operand (leading dimension ``B``) cost 2-3x as much as the same product with the operand stored
token-major and passed transposed. So a decode step runs on ``decode_columns(B)`` columns (zero
columns added up to the next multiple of 16 where that is cheaper) and, at 2-8 columns, on a
token-major operand.
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


TRANSPOSED_OPERAND_MAX_ROWS = 8     # 2..this many columns: token-major operand
COLUMN_MULTIPLE = 16                # the column counts the BLAS is fastest at
MAX_PADDING_COLUMNS = 7             # pad to the next multiple when that adds at most this many


def decode_columns(rows: int) -> int:
    """Columns a decode step of ``rows`` sequences computes with: ``rows`` itself, or the next
    multiple of ``COLUMN_MULTIPLE`` when the zero columns that adds are few enough to cost less
    than the BLAS's slow path for ``rows`` (9-15, 25-31, 41-47, ... rows)."""
    padded = -(-rows // COLUMN_MULTIPLE) * COLUMN_MULTIPLE
    if rows > TRANSPOSED_OPERAND_MAX_ROWS and padded - rows <= MAX_PADDING_COLUMNS:
        return padded
    return rows


def feature_major_operand(x: torch.Tensor) -> torch.Tensor:
    """``x [in, B]`` as the right operand of ``W @ x`` in the layout the CPU BLAS is fastest with
    for ``B`` columns: the same values, token-major in memory (a transposed view of a ``[B, in]``
    copy, a few KiB) when ``2 <= B <= TRANSPOSED_OPERAND_MAX_ROWS``, else ``x`` itself."""
    if 2 <= x.shape[1] <= TRANSPOSED_OPERAND_MAX_ROWS and x.is_contiguous():
        return x.t().contiguous().t()
    return x


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
