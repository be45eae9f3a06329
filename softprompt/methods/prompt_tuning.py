"""Prompt tuning (Lester et al.): ``num_virtual_tokens`` trainable input embeddings in front.

Parameters mirror PEFT's ``PromptEmbedding`` (``embedding [P, hidden]``). Init: "random"
(``nn.Embedding``'s N(0, 1), PEFT RANDOM), "vocab" (embeddings of P random vocabulary tokens,
PEFT SAMPLE_VOCAB), "text" (embeddings of ``init_text`` tokenized, repeated / truncated to P,
PEFT TEXT; ``init_text`` may also be a list of token ids, then no tokenizer is needed).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .base import Geometry, InputPrompt, MethodConfig, check_positive, register
from .template import front


@register
@dataclass
class PromptTuning(MethodConfig):
    num_virtual_tokens: int = 16
    init: str = "random"
    init_text: Optional[Union[str, Sequence[int]]] = None
    tokenizer: Any = None
    seed: int = 0

    method = "prompt_tuning"
    kind = "input"
    _not_saved = ("tokenizer",)

    def __post_init__(self):
        check_positive("PromptTuning", "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"PromptTuning: `init` {self.init!r} is invalid; expected 'random', 'vocab' or 'text'")
        if self.init == "text":
            if self.init_text is None or len(self.init_text) == 0:
                raise ValueError("PromptTuning: init='text' needs `init_text` (a string with `tokenizer`, or token ids)")
            if isinstance(self.init_text, str) and self.tokenizer is None:
                raise ValueError("PromptTuning: init='text' with a string `init_text` needs `tokenizer`")
        if not isinstance(self.init_text, (str, type(None))):
            self.init_text = [int(i) for i in self.init_text]

    def build(self, geometry: Geometry, embedding: Optional[nn.Embedding] = None) -> "PromptEmbedding":
        return PromptEmbedding(self, geometry, embedding)

    def state_shapes(self, geometry: Geometry, structure: dict):
        yield "embedding.weight", (self.num_virtual_tokens, geometry.hidden_size)

    def for_loading(self, structure: dict) -> "PromptTuning":
        return dataclasses.replace(self, init="random")


def init_ids(config, vocab_size: int) -> Optional[torch.Tensor]:
    P = config.num_virtual_tokens
    if config.init == "vocab":
        g = torch.Generator().manual_seed(config.seed)
        return torch.randint(0, vocab_size, (P,), generator=g)
    if config.init == "text":
        ids = config.init_text
        if isinstance(ids, str):
            ids = config.tokenizer(ids, add_special_tokens=False)["input_ids"]
        ids = list(ids)
        if not ids:
            raise ValueError("PromptTuning: `init_text` tokenized to nothing")
        ids = (ids * math.ceil(P / len(ids)))[:P]
        t = torch.tensor(ids, dtype=torch.long)
        if int(t.max()) >= vocab_size or int(t.min()) < 0:
            raise ValueError(f"PromptTuning: `init_text` token ids must be in [0, {vocab_size})")
        return t
    return None


class PromptEmbedding(InputPrompt):
    def __init__(self, config: PromptTuning, geometry: Geometry, embedding: Optional[nn.Embedding] = None):
        super().__init__(config, geometry)
        self.embedding = nn.Embedding(config.num_virtual_tokens, geometry.hidden_size)
        ids = init_ids(config, geometry.vocab_size)
        if ids is not None:
            if embedding is None:
                raise ValueError(f"PromptTuning: init={config.init!r} needs the model's word embeddings")
            with torch.no_grad():
                self.embedding.weight.copy_(embedding.weight[ids.to(embedding.weight.device)].float())
        self._template = front(config.num_virtual_tokens)

    def embeddings(self) -> torch.Tensor:
        return self.embedding.weight
