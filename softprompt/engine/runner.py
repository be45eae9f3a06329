"""The engine's model forwards: a :class:`ModelRunner` turns one phase of a step into logits.

The engine hands its runner a :class:`ForwardPlan`: the step's prefill batches (grouped by length)
or its decode batch, each a :class:`ForwardBatch` (rows, their
:class:`~softprompt.engine.kv_cache.StepCache`, left-padded new token ids, store task ids).
:meth:`ModelRunner.execute` returns each batch's logits of every row's last new token and writes
the rows' new K/V into their pages. It changes nothing else (no sequence's tokens or counts), so
a forward that raises can be run again on a subset of its rows.

- :class:`HFRunner`: the attached model's own forward, one per batch, with the batch's
  ``StepCache`` as the cache (any family, any device).
- :class:`CpuDecoderRunner`: Llama-family models on the CPU through
  :class:`~softprompt.engine.cpu_decode.CpuDecoder`: a decode step feature-major, all of a step's
  prefills packed in one forward. While the model is in training mode it runs the HF forward.

:func:`choose_runner` picks one when the engine is built and records why.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from .cpu_decode import CpuDecoder, unsupported_reason
from .kv_cache import PagedKVCache, StepCache
from .scheduler import Sequence
from .small_gemm import small_batch_linears

HF_FORWARD = "HF forward, attention through the patched interface"


@dataclass
class ForwardBatch:
    """Rows that run in one model forward."""
    rows: List[Tuple[Sequence, int]]        # (sequence, new tokens of this forward)
    cache: StepCache
    input_ids: torch.Tensor                 # [B, cache.Sq] the new tokens, left-padded, on the CPU
    task_ids: Optional[torch.Tensor]        # [B] store task ids on the model's device; None: no prefixes

    @property
    def padding(self) -> int:
        """Padding positions in ``input_ids``."""
        return self.input_ids.numel() - sum(n for _, n in self.rows)


@dataclass
class ForwardPlan:
    """One phase of an engine step: its prefill batches, or its decode batch (one token per row)."""
    prefill: bool
    batches: List[ForwardBatch]


@dataclass
class RunnerOutput:
    logits: List[torch.Tensor]              # per batch: [B, vocab], each row's last new token
    forwards: int                           # model forwards run
    padded_tokens: int                      # padding positions computed besides the real tokens


class ModelRunner(abc.ABC):
    """Runs the model forward of a :class:`ForwardPlan` (see the module docstring for the contract)."""

    @abc.abstractmethod
    def execute(self, plan: ForwardPlan) -> RunnerOutput:
        """Logits of ``plan``'s batches; writes their new K/V and changes nothing else."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Which forward serves the steps now, in words (for reports)."""


class HFRunner(ModelRunner):
    """The attached model's forward, one per batch.

    Args:
        model: the attached causal LM.
        small_gemm_rows: forwards of at most this many token positions run the linear layers as
            ``W @ x^T`` (:mod:`~softprompt.engine.small_gemm`, CPU only); 0 turns it off.
        reason: why this runner serves the engine (shown by :meth:`describe`), or None.
    """

    def __init__(self, model: nn.Module, *, small_gemm_rows: int = 0, reason: Optional[str] = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.small_gemm_rows = small_gemm_rows
        self.reason = reason

    def execute(self, plan: ForwardPlan) -> RunnerOutput:
        logits = [self._forward(batch) for batch in plan.batches]
        return RunnerOutput(logits, len(plan.batches), sum(batch.padding for batch in plan.batches))

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        cache, positions = batch.cache, batch.input_ids.numel()
        with small_batch_linears(self.model, self.small_gemm_rows, enabled=0 < positions <= self.small_gemm_rows):
            out = self.model(input_ids=batch.input_ids.to(self.device), attention_mask=cache.attention_mask,
                             position_ids=cache.position_ids, cache=cache, use_cache=True,
                             task_ids=batch.task_ids, logits_to_keep=1)
        return out.logits[:, -1]

    def describe(self) -> str:
        return HF_FORWARD if self.reason is None else f"{HF_FORWARD} ({self.reason})"


class CpuDecoderRunner(ModelRunner):
    """:class:`~softprompt.engine.cpu_decode.CpuDecoder` forwards: :meth:`CpuDecoder.step` for a
    decode batch, one :meth:`CpuDecoder.prefill` over all prefill batches (no padding). While the
    model is in training mode, ``fallback`` (the HF forward) runs instead.
    """

    def __init__(self, decoder: CpuDecoder, fallback: HFRunner, *, small_gemm_rows: int = 0):
        self.decoder = decoder
        self.fallback = fallback
        self.small_gemm_rows = small_gemm_rows

    @property
    def active(self) -> bool:
        """Whether the CPU decoder serves the steps now (not while the model trains)."""
        return not self.decoder.model.training

    def execute(self, plan: ForwardPlan) -> RunnerOutput:
        if not self.active:
            return self.fallback.execute(plan)
        if not plan.prefill:
            logits = [self.decoder.step(b.input_ids[:, -1], b.cache, b.task_ids) for b in plan.batches]
            return RunnerOutput(logits, len(plan.batches), 0)
        tokens = sum(b.cache.write_dst.numel() for b in plan.batches)
        with small_batch_linears(self.decoder.model, self.small_gemm_rows, enabled=tokens <= self.small_gemm_rows):
            logits = self.decoder.prefill([(b.cache, b.input_ids, b.task_ids) for b in plan.batches])
        return RunnerOutput(logits, 1, 0)

    def describe(self) -> str:
        if not self.active:
            return f"{HF_FORWARD} (the model is in training mode)"
        return f"CPU decoder, {self.decoder.attention_path()}"


def cpu_decoder_unfit(model: nn.Module, store, device: torch.device, wanted: bool) -> Optional[str]:
    """None when the CPU decoder can serve ``model``'s forwards; else why not."""
    if not wanted:
        return "cpu_decoder=False"
    if device.type != "cpu":
        return f"the model is on {device.type}"
    if store.backend not in (None, "torch"):
        return f"the prefix attention backend is {store.backend!r}"
    return unsupported_reason(model)


def choose_runner(model: nn.Module, store, kv: PagedKVCache, *, cpu_decoder: bool,
                  small_gemm_rows: int) -> ModelRunner:
    """The runner of an engine's forwards: :class:`CpuDecoderRunner` when ``cpu_decoder`` is asked
    for and fits (the model on the CPU, a supported family, torch attention), else
    :class:`HFRunner`, whose :meth:`~HFRunner.describe` says why. ``small_gemm_rows`` applies on
    the CPU only."""
    device = next(model.parameters()).device
    rows = small_gemm_rows if device.type == "cpu" else 0
    why_not = cpu_decoder_unfit(model, store, device, cpu_decoder)
    hf = HFRunner(model, small_gemm_rows=rows, reason=None if why_not is None else f"CPU decoder: {why_not}")
    if why_not is not None:
        return hf
    return CpuDecoderRunner(CpuDecoder(model, store, kv), hf, small_gemm_rows=rows)
