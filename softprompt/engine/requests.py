"""Request, sampling parameters and result types of the generation engine, with validation.

Validation raises :class:`RequestError` (a ``ValueError``) naming the field, the value seen and
what is allowed. The engine catches it per request: a bad request finishes at once with its error
in its result, and the rest of the batch goes on.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

Prompt = Union[str, Sequence[int], torch.Tensor]

FINISH_REASONS = ("stop", "eos", "length", "error", "aborted")


class RequestError(ValueError):
    """A request that cannot be served (bad prompt, unknown task, invalid sampling values)."""


def _bad(name: str, seen, allowed: str) -> RequestError:
    return RequestError(f"`{name}` {seen!r} is invalid; expected {allowed}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_tuple(name: str, value, allowed: str) -> tuple:
    try:
        return tuple(value)
    except TypeError:
        raise _bad(name, value, allowed) from None


# Sampling temperatures allowed besides 0 (greedy). Outside, float32 logits / temperature round to
# 0 or inf (1e-300 is 0 in float32); inside, sampling stays finite for any finite logits.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3


@dataclass
class SamplingParams:
    """How one request samples its tokens.

    Args:
        max_new_tokens: most tokens to generate (>= 1).
        min_new_tokens: end-of-sequence tokens and ``stop_token_ids`` are suppressed until this
            many were generated (as ``generate(min_new_tokens=...)`` does); the engine rejects a
            request whose suppressed ids cover the whole vocabulary.
        temperature: 0 means greedy (argmax); else a number in [MIN_TEMPERATURE, MAX_TEMPERATURE]
            = [1e-3, 1e3] samples from ``softmax(logits / temperature)``.
        top_k: keep the k most likely tokens (0 = off). Only when sampling.
        top_p: nucleus sampling, keep the smallest set with cumulative probability >= top_p (1 = off).
        seed: seed of this request's own ``torch.Generator`` (None = drawn from torch's global RNG
            at admission), so a seeded request samples the same tokens whatever else is batched.
        stop: stop strings; the request ends when its text contains one (the text is cut before it).
        stop_token_ids: extra token ids that end the request (kept in the output, like EOS); the
            engine checks them against the model's vocabulary.
        ignore_eos: keep generating past the model's EOS token.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise _bad("max_new_tokens", self.max_new_tokens, "an int >= 1")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise _bad("min_new_tokens", self.min_new_tokens, f"an int in [0, max_new_tokens={self.max_new_tokens}]")
        if not _is_num(self.temperature) or not (
                self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise _bad("temperature", self.temperature,
                       f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _bad("top_k", self.top_k, "an int >= 0 (0 = off)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            raise _bad("seed", self.seed, "None or an int in [0, 2**63)")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = _as_tuple("stop", self.stop, "a tuple of non-empty strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise _bad("stop", self.stop, "a tuple of non-empty strings")
        self.stop_token_ids = _as_tuple("stop_token_ids", self.stop_token_ids, "a tuple of token ids (ints >= 0)")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "a tuple of token ids (ints >= 0)")
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", self.ignore_eos, "a bool")
        return self


@dataclass
class Request:
    """One generation request: a prompt (text or token ids), a task (a name in the model's prefix
    store, or None for no soft prompt) and its sampling parameters."""

    prompt: Prompt
    task: Optional[str] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: Optional[str] = None


@dataclass
class Result:
    """What one request produced. ``error`` is set (and ``finish_reason == "error"``) for a request
    that could not be served: rejected when added (``token_ids`` empty), or failed while running
    (a forward or a sampling step tied to it raised; ``token_ids`` holds the tokens made before)."""

    request_id: str
    task: Optional[str]
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: Optional[str]
    finish_reason: str
    error: Optional[str] = None
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StreamEvent:
    """One streamed token of a request (``token_id`` None for an error or an end without a token)."""

    request_id: str
    index: int                      # position of the request in the stream() call
    token_id: Optional[int]
    text: str                       # newly decoded text ("" without a tokenizer or while incomplete)
    finished: bool
    finish_reason: Optional[str] = None
    error: Optional[str] = None


_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"
