"""The LM loss of a training step without the ``[B, T, V]`` logits.

A causal LM's head turns each position's last hidden state into ``V`` logits (49k for SmolLM2), and
the loss then runs log-softmax forward, its backward and a zero fill over that whole tensor: at
batch 16 x 64 that is 200 MB written and read several times per step, almost a fifth of a CPU
training step and the largest tensor in it. Soft-prompt training only needs the gradient with
respect to the hidden states (the head is frozen), so the loss and that gradient are computed here
chunk by chunk of rows in one cache-sized buffer: logits = h W^T, log-sum-exp, then in place
softmax - one-hot, times W, straight into ``d hidden``. The backward only scales that stored
gradient. Same arithmetic as the unfused head (two GEMMs) in one reused buffer of >= 256 rows (the
GEMMs' efficiency drops below that): on SmolLM2's head at 1008 rows 0.89 s against 0.98 s for
``cross_entropy(linear(...))`` run alone, and against ~1.9 s inside a training step, where the
unfused log-softmax, its backward and the zero fill touch fresh 200 MB tensors. (Liger-Kernel's
fused linear cross-entropy does the same on GPUs.)

:func:`head_for_fused_loss` says whether a model's head qualifies (a plain frozen ``nn.Linear``
with no logit post-processing) and :func:`captured_hidden_states` runs the model with the head
swapped for a stand-in that records its input and returns zero-width logits.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

BUFFER_BYTES = 32 << 20         # logits chunk; reused, so never page-faulted in again
MIN_ROWS = 256                  # below this many rows the head's GEMMs lose ~20-50% of their speed
IGNORE_INDEX = -100
# config attributes that transform logits after the head (gemma2/3 soft-capping, cohere, granite)
_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ weight.T + bias, targets, ignore_index=-100)) / divisor`` with
    the gradient for ``hidden`` only (``weight``/``bias`` frozen), chunk by chunk of ``rows``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, divisor, rows):
        keep = (targets != IGNORE_INDEX).nonzero().flatten()
        h, t = hidden.index_select(0, keep), targets.index_select(0, keep)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        V = weight.shape[0]
        buffer = torch.empty(min(rows, max(h.shape[0], 1)), V, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start:start + rows], t[start:start + rows]
            n = hc.shape[0]
            logits = torch.mm(hc, weight.t(), out=buffer[:n])
            if bias is not None:
                logits.add_(bias)
            z = logits.float()
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_grad:                                   # d loss / d logits = softmax - one-hot
                z.sub_(lse[:, None]).exp_()
                z[torch.arange(n, device=z.device), tc] -= 1.0
                grad.index_copy_(0, keep[start:start + n], torch.mm(z.to(weight.dtype), weight))
        ctx.save_for_backward(grad)
        ctx.divisor = divisor
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss / ctx.divisor).to(grad.dtype), None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``-100`` (or their sum over
    ``num_items_in_batch``, as transformers' loss does when given it). ``hidden [N, H]``,
    ``weight [V, H]``, ``targets [N]``."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_linear_cross_entropy: hidden {tuple(hidden.shape)} is invalid with targets "
                         f"{tuple(targets.shape)}; expected [N, H] and [N]")
    if num_items_in_batch is None:
        divisor = float((targets != IGNORE_INDEX).sum())
    else:
        divisor = float(num_items_in_batch)
    rows = max(MIN_ROWS, BUFFER_BYTES // (weight.shape[0] * 4))
    if divisor == 0:                         # no target: the mean is NaN, as torch's would be
        return hidden.sum() * float("nan")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, divisor, rows)


def head_for_fused_loss(model: nn.Module) -> Optional[nn.Linear]:
    """The model's LM head if its loss can be fused: a frozen ``nn.Linear`` whose output is the
    logits as they are (no soft-capping or scaling in the config); None otherwise."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return None
    if head.bias is not None and head.bias.requires_grad:
        return None
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    for cfg in configs:
        for name in _POST_PROCESSING:
            value = getattr(cfg, name, None)
            if value not in (None, 1, 1.0):
                return None
    return head


class _HiddenCapture(nn.Module):
    """Stands in for the LM head: records its input, returns zero-width logits."""

    def __init__(self):
        super().__init__()
        self.seen: List[torch.Tensor] = []

    def forward(self, hidden):
        self.seen.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)


def _parent_of(model: nn.Module, module: nn.Module) -> Tuple[nn.Module, str]:
    for name, child in model.named_modules():
        for attr, sub in child.named_children():
            if sub is module:
                return child, attr
    raise LookupError("the LM head is not a submodule of the model")


@contextlib.contextmanager
def captured_hidden_states(model: nn.Module, head: nn.Linear) -> Iterator[_HiddenCapture]:
    """Within: the model's ``head`` is replaced by a recorder (``.seen``: its inputs)."""
    parent, attr = _parent_of(model, head)
    capture = _HiddenCapture()
    setattr(parent, attr, capture)
    try:
        yield capture
    finally:
        setattr(parent, attr, head)
