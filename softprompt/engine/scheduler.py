"""Continuous batching: which sequences run in the next step, and with how many tokens.

A :class:`Sequence` holds its tokens (prompt + generated) and how many of them are already in the
KV cache (``num_computed``). Each step, every running sequence has ``pending = len(tokens) -
num_computed`` tokens to feed: 1 for a decoding sequence, a prompt (or a chunk of it) for a
prefilling one. The scheduler

1. keeps the running decoders (one token each) — they come first in the per-step token budget;
2. continues prefills that were chunked, then admits waiting requests (FIFO) while the batch has
   room (``max_batch_size``), the step's token budget (``max_num_batched_tokens``) has room
   (a prompt longer than what is left is prefilled in chunks), and the KV pool can hold them;
3. if the pool cannot hold a running sequence's next token, preempts the most recently admitted
   sequence (its pages are freed; it goes back to the front of the queue and is recomputed later,
   keeping the tokens it generated).

Requests join and leave between steps; a finished sequence frees its pages at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Tuple

import torch

from .kv_cache import OutOfPages, PagedKVCache
from .requests import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int                      # arrival order
    task: Optional[str]
    prompt_ids: List[int]
    sampling: SamplingParams
    prefix_len: int = 0
    max_total: int = 0              # most own tokens (prompt + generated) the model allows for this task
    generator: Optional[torch.Generator] = None
    output_ids: List[int] = field(default_factory=list)
    num_computed: int = 0
    text: str = ""                  # decoded output text (kept when a tokenizer is given)
    emitted_text: int = 0           # chars of `text` already streamed
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    admitted_step: int = -1

    @property
    def tokens(self) -> List[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepPlan:
    """One step: sequences to feed and how many of their pending tokens each gets."""
    prefill: List[Tuple[Sequence, int]]       # (seq, tokens this step), tokens may be a chunk
    decode: List[Sequence]                     # one token each
    preempted: List[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, kv: PagedKVCache, *, max_batch_size: int = 64, max_num_batched_tokens: int = 2048,
                 chunked_prefill: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"Scheduler: `max_batch_size` {max_batch_size!r} is invalid; expected an int >= 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"Scheduler: `max_num_batched_tokens` {max_num_batched_tokens!r} is invalid; "
                             "expected an int >= 1")
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, seq: Sequence) -> None:
        """A finished (or aborted) sequence leaves the batch and frees its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        self.kv.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def schedule(self) -> StepPlan:
        self.steps += 1
        budget = self.max_num_batched_tokens
        preempted: List[Sequence] = []
        decode: List[Sequence] = []
        prefill: List[Tuple[Sequence, int]] = []
        # 1. running sequences: decoders (1 token) first, then chunked prefills continue.
        for seq in sorted(self.running, key=lambda s: s.pending > 1):
            if seq not in self.running:          # preempted below while making room
                continue
            n = min(seq.pending, budget) if seq.pending > 1 else 1
            if n <= 0 or (n < seq.pending and not self.chunked_prefill):
                continue
            while True:
                try:
                    self.kv.ensure(seq, seq.num_computed + n)
                    break
                except OutOfPages:
                    victim = max(self.running, key=lambda s: s.admitted_step * 10 ** 6 + s.index)
                    self._preempt(victim)
                    preempted.append(victim)
                    decode = [s for s in decode if s is not victim]
                    prefill = [(s, k) for s, k in prefill if s is not victim]
                    if victim is seq:
                        break
            if seq not in self.running:
                continue
            budget -= n
            (decode.append(seq) if seq.pending == 1 else prefill.append((seq, n)))
        # 2. admit waiting requests while there is room.
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            n = seq.pending
            if n > budget:
                if not self.chunked_prefill:
                    break
                n = budget
            if not self.kv.can_hold(self.kv.pages_for(seq.num_computed + n) + 1):
                break
            self.kv.ensure(seq, seq.num_computed + n)     # first: if the pool cannot grow, seq stays queued
            self.waiting.popleft()
            seq.admitted_step = self.steps
            self.running.append(seq)
            budget -= n
            (decode.append(seq) if seq.pending == 1 and n == 1 else prefill.append((seq, n)))
        return StepPlan(prefill=prefill, decode=decode, preempted=preempted)
