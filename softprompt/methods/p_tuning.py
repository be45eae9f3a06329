"""P-tuning v1 ("GPT Understands, Too"): soft tokens produced by a prompt encoder and placed by a
template (see :mod:`.template`), not only in front.

The encoder mirrors PEFT's ``PromptEncoder`` (so PEFT adapters and weights map one to one):
``embedding [P, hidden]`` then
* "mlp": ``Linear(hidden, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, hidden)`` (``mlp_head``);
* "lstm": bidirectional ``LSTM(hidden, h, num_layers, dropout)`` (``lstm_head``) then
  ``Linear(2h, 2h) -> ReLU -> Linear(2h, hidden)`` (``mlp_head``);
* "none": the embeddings themselves (what a PEFT P-tuning adapter stores: the encoder output).
The encoder runs once per forward on the P tokens (never per sequence).

Init: "random" (PEFT's: random input embeddings through a randomly initialised encoder) or "text":
the input embeddings start as the word embeddings of ``init_text`` (repeated / cut to P) and the
encoder is fitted for a few hundred tiny steps to reproduce them, so training starts from the text
prompt as prompt tuning's text init does. On SmolLM2 the random init started above chance loss and
was unstable at learning rates where the text-initialised prompt learned (see demo_real.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .base import Geometry, InputPrompt, MethodConfig, check_positive, check_prob, fit_output, register
from .prompt_tuning import init_ids
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
    init: str = "random"
    init_text: Optional[Union[str, Sequence[int]]] = None
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
        if self.init not in ("random", "text"):
            raise ValueError(f"PTuningV1: `init` {self.init!r} is invalid; expected 'random' or 'text'")
        if self.init == "text":
            if self.init_text is None or len(self.init_text) == 0:
                raise ValueError("PTuningV1: init='text' needs `init_text` (a string with `tokenizer`, or token ids)")
            if isinstance(self.init_text, str) and self.tokenizer is None:
                raise ValueError("PTuningV1: init='text' with a string `init_text` needs `tokenizer`")
        if not isinstance(self.init_text, (str, type(None))):
            self.init_text = [int(i) for i in self.init_text]
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
        return PromptEncoder(self, geometry, embedding)

    def state_shapes(self, geometry: Geometry, structure: dict):
        D = geometry.hidden_size
        h = self.hidden_size or D
        yield "embedding.weight", (self.num_virtual_tokens, D)
        if self.encoder == "lstm":
            for i in range(self.num_layers):
                for suffix in ("", "_reverse"):
                    yield f"lstm_head.weight_ih_l{i}{suffix}", (4 * h, D if i == 0 else 2 * h)
                    yield f"lstm_head.weight_hh_l{i}{suffix}", (4 * h, h)
                    yield f"lstm_head.bias_ih_l{i}{suffix}", (4 * h,)
                    yield f"lstm_head.bias_hh_l{i}{suffix}", (4 * h,)
            layers = ((0, 2 * h, 2 * h), (2, D, 2 * h))
        elif self.encoder == "mlp":
            layers = ((0, h, D), (2, h, h), (4, D, h))
        else:
            layers = ()
        for index, out, inp in layers:
            yield f"mlp_head.{index}.weight", (out, inp)
            yield f"mlp_head.{index}.bias", (out,)

    def for_loading(self, structure: dict) -> "PTuningV1":
        return dataclasses.replace(self, init="random")


class PromptEncoder(InputPrompt):
    def __init__(self, config: PTuningV1, geometry: Geometry, embedding=None):
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
        if config.init == "text":
            if embedding is None:
                raise ValueError("PTuningV1: init='text' needs the model's word embeddings")
            ids = init_ids(config, geometry.vocab_size)
            self._fit_to(embedding.weight[ids.to(embedding.weight.device)].detach().float().cpu())
        self._template = parse_template(config.template, owner="PTuningV1")
        for seg in self._template:
            if seg[0] == "tokens" and any(not 0 <= i < geometry.vocab_size for i in seg[1]):
                raise ValueError(f"PTuningV1: template anchor token ids {list(seg[1])} are invalid; expected ids "
                                 f"in [0, {geometry.vocab_size})")

    def _fit_to(self, target: torch.Tensor) -> None:
        """Start the input embeddings at ``target`` and fit the encoder so its output is ``target``."""
        with torch.no_grad():
            self.embedding.weight.copy_(target)
        if self.config.encoder != "none":
            fit_output(self, self.embeddings, target)

    def embeddings(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.config.encoder == "lstm":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]
        if self.config.encoder == "mlp":
            return self.mlp_head(x)
        return x
