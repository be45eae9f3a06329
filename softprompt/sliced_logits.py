"""Logits only where they are needed, for input-level prompts in training.

Prompt tuning and P-tuning v1 splice P soft tokens into every row, so the causal LM's head would
project ``P`` extra positions per row onto the vocabulary (and its loss would take a log-softmax
over them) only to mask them out with ``-100``. PEFT does exactly that. Here the spliced batch keeps
the logits of the positions someone can use: every caller position (the returned logits are
mapped back to the caller's layout) and every position whose next label is not ``-100`` (the last
soft token predicts the first real one). transformers' ``logits_to_keep`` (``[B, K]`` positions
per row; a shared 1-D set on versions without per-row slicing) slices the hidden states before the
LM head, and the loss is taken here with the model's own ``loss_function`` on the shifted labels of
the kept positions, which is the loss the full logits would give.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` slices its hidden states by ``logits_to_keep`` and has a
    ``loss_function`` to take the loss on the kept logits (transformers' causal LMs)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params and "labels" in params and hasattr(model, "loss_function")


def _per_row_slicing() -> bool:
    """transformers' ``slice_logits_to_keep`` takes ``[B, K]`` positions per row (later 5.x);
    before it, a tensor indexes the sequence axis as is, so only a 1-D (shared) one is safe."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return True


PER_ROW = _per_row_slicing()


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[B, T]``: each position's target, the label one position later (``ignore_index`` past the
    end), as a causal LM's loss shifts them."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]


@dataclass
class KeptLogits:
    """Which positions of a spliced ``[B, T]`` batch get logits.

    ``argument``: what the model's ``logits_to_keep`` receives; ``index`` ``[B, K]``: the position of
    each kept logit of each row; ``valid`` ``[B, K]``: False where a shorter row repeats its last
    position to fill ``K`` (those logits are duplicates and get no target)."""
    argument: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor

    def targets(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """``[B, K]``: each kept position's label one position later, as a causal LM's loss shifts
        them (``ignore_index`` past the end and on filler positions)."""
        return next_token_labels(labels, ignore_index).gather(1, self.index).masked_fill(~self.valid, ignore_index)

    def where(self, length: int) -> torch.Tensor:
        """``[B, T]``: for each position with a kept logit, its index among the row's kept logits."""
        B, K = self.index.shape
        k = torch.arange(K, device=self.index.device).expand(B, K)
        k = torch.where(self.valid, k, self.valid.sum(1, keepdim=True) - 1)   # fillers: the row's last kept logit
        return torch.zeros(B, length, dtype=torch.long, device=k.device).scatter_(1, self.index, k)


def kept_positions(source: torch.Tensor, labels: torch.Tensor, per_row: Optional[bool] = None) -> Optional[KeptLogits]:
    """The positions whose logits are needed, or None when that is all of them. ``source``: each
    position's caller position (``-1``: added token, ``-2``: padding); ``labels``: the spliced labels
    (``-100`` where nothing is predicted). ``per_row``: slice each row on its own (default: where
    transformers can), else keep the positions any row needs."""
    per_row = PER_ROW if per_row is None else per_row
    B, T = source.shape
    needed = source >= 0
    needed[:, :-1] |= labels[:, 1:] != -100
    if not per_row:
        needed = needed.any(0, keepdim=True).expand(B, T)
    counts = needed.sum(1)
    K = int(counts.max())
    if K == T:
        return None
    K = max(K, 1)
    order = torch.sort((~needed).to(torch.int8), dim=1, stable=True).indices[:, :K]   # needed ones first, in order
    valid = torch.arange(K, device=source.device) < counts[:, None]
    last = order.gather(1, (counts - 1).clamp_min(0)[:, None])
    index = torch.where(valid, order, last)
    return KeptLogits(index if per_row else index[0], index, valid)


def loss_on_kept(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, kept: KeptLogits,
                 **loss_kwargs) -> torch.Tensor:
    """The model's causal LM loss from the ``[B, K, V]`` logits of the kept positions only."""
    return model.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1],
                               shift_labels=kept.targets(labels).contiguous(), **loss_kwargs)
