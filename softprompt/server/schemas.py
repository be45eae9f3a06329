"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their mapping to engine sampling.

Unknown fields are refused (400 naming the field) rather than silently ignored; OpenAI fields the
engine cannot honour (``logprobs``, ``echo``, penalties, ...) are accepted only at their neutral
values. ``top_k``, ``min_tokens`` and ``ignore_eos`` are the usual extensions (vLLM's names).
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8                 # choices per request
MAX_STOP = 8              # stop strings per request
MAX_STOP_CHARS = 64
MAX_PROMPTS = 16          # prompts in one completions request

TokenIds = List[int]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: Optional[int] = Field(default=None, ge=0, lt=2 ** 63)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    user: Optional[str] = Field(default=None, max_length=256)
    # OpenAI fields the engine does not implement: only their neutral values pass.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "echo", "logprobs", "best_of",
                     "suffix", check_fields=False)
    @classmethod
    def _neutral(cls, value, info):
        if value not in (None, 0, False, {}, "") and not (info.field_name == "best_of" and value == 1):
            raise ValueError("is not supported by this server; leave it out")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"expected at most {MAX_STOP} non-empty stop strings of at most {MAX_STOP_CHARS} "
                             "characters")
        return stops

    def sampling(self, default_max_tokens: int, choice: int) -> dict:
        """The engine's SamplingParams fields for choice number ``choice`` (seeded choices differ)."""
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return dict(max_new_tokens=max_tokens, min_new_tokens=min(self.min_tokens, max_tokens),
                    temperature=float(self.temperature), top_p=float(self.top_p), top_k=max(self.top_k, 0),
                    seed=None if self.seed is None else (self.seed + choice) % 2 ** 63,
                    stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], TokenIds, List[TokenIds]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def prompts(self) -> list:
        """The prompts of this request: texts or token-id lists (one request may carry several)."""
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or len(out) > MAX_PROMPTS:
            raise ValueError(f"expected 1 to {MAX_PROMPTS} prompts, got {len(out)}")
        if any(len(x) == 0 for x in out):
            raise ValueError("expected non-empty prompts")
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: Optional[str] = Field(default=None, max_length=256)


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: Optional[bool] = None
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int, choice: int) -> dict:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            default_max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens, choice)


class LoadAdapterRequest(BaseModel):
    """``path``: a folder (or ``<name>.safetensors`` file) under ``--adapter-root``, relative to it."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(default=None, min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=1024)
    method: Optional[Literal["prefix_tuning", "p_tuning_v2"]] = None


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
