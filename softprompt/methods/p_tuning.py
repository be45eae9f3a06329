"""P-tuning v1 ("GPT Understands, Too"): soft tokens produced by a prompt encoder and placed by a
template (see :mod:`.template`), not only in front.

The encoder mirrors PEFT's ``PromptEncoder`` (so PEFT adapters and weights map one to one):
``embedding [P, hidden]`` then
* "mlp": ``Linear(hidden, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, hidden)`` (``mlp_head``);
* "lstm": bidirectional ``LSTM(hidden, h, num_layers, dropout)`` (``lstm_head``) then
  ``Linear(2h, 2h) -> ReLU -> Linear(2h, hidden)`` (``mlp_head``);
* "none": the embeddings themselves (what a PEFT P-tuning adapter stores: the encoder output).
The encoder runs once per forward on the P tokens (never per sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .base import Geometry, InputPrompt, MethodConfig, check_positive, check_prob, register
from .template import front, num_virtual, parse_template, to_json


@register
@dataclass
class PTuningV1(MethodConfig):
    """Args:
        template: where the soft tokens go (string or list, see :mod:`softprompt.methods.template`);
            default: ``num_virtual_tokens`` in front.
        num_virtual_tokens: only without a template (or must agree with it).
        encoder: "mlp" (PEFT default), "lstm" or "none".
        hidden_size: encoder width ``h`` (default: the model's hidden size).
        num_layers, dropout: of the LSTM.
        tokenizer: to tokenize literal text in the template (not saved; the tokenized ids are).
    """

    template: Any = None
    num_virtual_tokens: Optional[int] = None
    encoder: str = "mlp"
    hidden_size: Optional[int] = None
    num_layers: int = 2
    dropout: float = 0.0
    tokenizer: Any = None

    method = "p_tuning_v1"
    kind = "input"
    _not_saved = ("tokenizer",)

    def __post_init__(self):
        check_positive("PTuningV1", "num_virtual_tokens", self.num_virtual_tokens, allow_none=True)
        check_positive("PTuningV1", "hidden_size", self.hidden_size, allow_none=True)
        check_positive("PTuningV1", "num_layers", self.num_layers)
        check_prob("PTuningV1", "dropout", self.dropout)
        if self.encoder not in ("mlp", "lstm", "none"):
            raise ValueError(f"PTuningV1: `encoder` {self.encoder!r} is invalid; expected 'mlp', 'lstm' or 'none'")
        if self.template is None:
            if self.num_virtual_tokens is None:
                raise ValueError("PTuningV1: give `template` (e.g. '[P] [P] {x} [P]') or `num_virtual_tokens`")
            segments = front(self.num_virtual_tokens)
        else:
            segments = parse_template(self.template, self.tokenizer, "PTuningV1")
            n = num_virtual(segments)
            if self.num_virtual_tokens is not None and self.num_virtual_tokens != n:
                raise ValueError(f"PTuningV1: `num_virtual_tokens` {self.num_virtual_tokens} disagrees with the "
                                 f"template, which has {n} soft tokens")
        self.template = to_json(segments)          # normalised, JSON-able (anchor text is tokenized here)
        self.num_virtual_tokens = num_virtual(segments)

    def build(self, geometry: Geometry, embedding=None) -> "PromptEncoder":
        return PromptEncoder(self, geometry)


class PromptEncoder(InputPrompt):
    def __init__(self, config: PTuningV1, geometry: Geometry):
        super().__init__(config, geometry)
        D = geometry.hidden_size
        h = config.hidden_size or D
        self.embedding = nn.Embedding(config.num_virtual_tokens, D)
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(D, h, num_layers=config.num_layers, dropout=config.dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, D))
        elif config.encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(D, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, D))
        self._template = parse_template(config.template, owner="PTuningV1")
        for seg in self._template:
            if seg[0] == "tokens" and any(not 0 <= i < geometry.vocab_size for i in seg[1]):
                raise ValueError(f"PTuningV1: template anchor token ids {list(seg[1])} are invalid; expected ids "
                                 f"in [0, {geometry.vocab_size})")

    def embeddings(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.config.encoder == "lstm":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]
        if self.config.encoder == "mlp":
            return self.mlp_head(x)
        return x
