"""Deep prompts: prefix tuning (Li & Liang; optional MLP reparameterisation) and P-tuning v2.

Both produce a per-layer prefix K/V. The parameters mirror PEFT's ``PrefixEncoder`` so PEFT
adapters map one to one: ``embedding`` is ``[P, L*2*kv_width]`` (the raw prefix; P-tuning v2 and
prefix tuning without projection) or ``[P, kv_width]`` followed by ``transform`` =
``Linear(kv_width, projection_dim) -> Tanh -> Linear(projection_dim, L*2*kv_width)``. The flat
row layout is PEFT's: ``view(P, L, 2, Hkv, D)`` (layer-major, K then V).

``fold()`` runs the MLP once and keeps only its output (the paper's "discard the MLP after
training"); the prompt is then plain K/V, as cheap as P-tuning v2 at inference.
Prefix dropout (P-tuning v2) is applied in training to the task's prefix, once per task per
forward (the prefix is shared by every sequence of the task, never copied per sequence).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .base import DeepPrompt, Geometry, MethodConfig, check_positive, check_prob, fit_output, register


def flat_to_kv(flat: torch.Tensor, geometry: Geometry) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flat prefix ``[P, L*2*Hkv*D]`` -> cache-convention ``k, v [L, Hkv, P, D]``."""
    P = flat.shape[0]
    x = flat.view(P, geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim)
    x = x.permute(2, 1, 3, 0, 4)                                   # [2, L, Hkv, P, D]
    return x[0], x[1]


def kv_to_flat(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flat_to_kv`."""
    x = torch.stack([k, v])                                        # [2, L, Hkv, P, D]
    P = x.shape[3]
    return x.permute(3, 1, 0, 2, 4).reshape(P, -1)


@register
@dataclass
class PrefixTuning(MethodConfig):
    """Prefix tuning: a trainable per-layer prefix of ``num_virtual_tokens`` K/V rows.

    Args:
        num_virtual_tokens: prefix length P.
        projection_dim: if set, the prefix is produced by PEFT's MLP reparameterisation
            (``prefix_projection=True``, ``encoder_hidden_size=projection_dim``).
        prefix_dropout: dropout on the prefix in training.
        init: "random" (``nn.Embedding``'s N(0, 1), as PEFT) or "zero" (PEFT ``init_weights="zero"``:
            zero last MLP layer / zero prefix).
    """

    num_virtual_tokens: int = 16
    projection_dim: Optional[int] = None
    prefix_dropout: float = 0.0
    init: str = "random"

    method = "prefix_tuning"
    kind = "deep"

    def __post_init__(self):
        name = type(self).__name__
        check_positive(name, "num_virtual_tokens", self.num_virtual_tokens)
        check_positive(name, "projection_dim", self.projection_dim, allow_none=True)
        check_prob(name, "prefix_dropout", self.prefix_dropout)
        if self.init not in ("random", "zero"):
            raise ValueError(f"{name}: `init` {self.init!r} is invalid; expected 'random' or 'zero'")

    def build(self, geometry: Geometry, embedding=None) -> "PrefixEncoder":
        return PrefixEncoder(self, geometry)

    def state_shapes(self, geometry: Geometry, structure: dict):
        P, width = self.num_virtual_tokens, geometry.kv_width
        flat = geometry.num_layers * 2 * width
        if self.projection_dim is None or _folded(structure):
            yield "embedding.weight", (P, flat)
            return
        h = self.projection_dim
        yield from (("embedding.weight", (P, width)), ("transform.0.weight", (h, width)), ("transform.0.bias", (h,)),
                    ("transform.2.weight", (flat, h)), ("transform.2.bias", (flat,)))

    def for_loading(self, structure: dict) -> "PrefixTuning":
        # a folded prefix is built without its MLP (whose size the checkpoint's tensors do not bound)
        if _folded(structure) and self.projection_dim is not None:
            return dataclasses.replace(self, projection_dim=None)
        return self


def _folded(structure: dict) -> bool:
    folded = structure.get("folded", False)
    if not isinstance(folded, bool):
        raise ValueError(f"prefix structure `folded` {folded!r} is invalid; expected true or false")
    return folded


@register
@dataclass
class PTuningV2(MethodConfig):
    """P-tuning v2: deep prompts at every layer, no MLP, prefix dropout in training (for NLU:
    sequence / token classification with a trainable task head).

    Args:
        num_virtual_tokens: prefix length P.
        prefix_dropout: dropout on the prefix in training (the v2 repo uses hidden_dropout_prob).
        init: "random" (N(0, 1)) or "zero".
    """

    num_virtual_tokens: int = 16
    prefix_dropout: float = 0.0
    init: str = "random"

    method = "p_tuning_v2"
    kind = "deep"
    projection_dim = None

    def __post_init__(self):
        PrefixTuning.__post_init__(self)

    def build(self, geometry: Geometry, embedding=None) -> "PrefixEncoder":
        return PrefixEncoder(self, geometry)

    state_shapes = PrefixTuning.state_shapes
    for_loading = PrefixTuning.for_loading


class PrefixEncoder(DeepPrompt):
    def __init__(self, config: PrefixTuning, geometry: Geometry):
        super().__init__(config, geometry)
        P, width = config.num_virtual_tokens, geometry.kv_width
        flat = geometry.num_layers * 2 * width
        self.folded = config.projection_dim is None
        if self.folded:
            self.embedding = nn.Embedding(P, flat)
            if config.init == "zero":
                nn.init.zeros_(self.embedding.weight)
        else:
            self.embedding = nn.Embedding(P, width)
            self.transform = nn.Sequential(nn.Linear(width, config.projection_dim), nn.Tanh(),
                                           nn.Linear(config.projection_dim, flat))
            if config.init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        self.dropout = nn.Dropout(config.prefix_dropout)

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def flat(self) -> torch.Tensor:
        """The prefix as PEFT saves it: ``[P, L*2*kv_width]`` (after the MLP, before dropout)."""
        if self.folded:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def prefix(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return flat_to_kv(self.dropout(self.flat()), self.geometry)

    def start_from(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start training from a given prefix ``k, v [L, Hkv, P, D]`` (e.g. the K/V the model computes
        for a text, as the prefix-tuning paper's "init with real words"): copied into a raw prefix; with
        the MLP reparameterisation, the MLP is fitted so that its output is that prefix."""
        target = kv_to_flat(k, v).detach().to(self.embedding.weight.dtype)
        if tuple(target.shape) != (self.num_virtual_tokens, self.geometry.num_layers * 2 * self.geometry.kv_width):
            raise ValueError(f"start_from: prefix of shape {tuple(k.shape)} does not fit this prompt "
                             f"(L={self.geometry.num_layers}, P={self.num_virtual_tokens})")
        if self.folded:
            with torch.no_grad():
                self.embedding.weight.copy_(target)
        else:
            fit_output(self, self.flat, target)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output (inference form); training then continues on the raw prefix."""
        if self.folded:
            return
        out = self.flat().detach().clone()
        self.embedding = nn.Embedding(out.shape[0], out.shape[1], device=out.device, dtype=out.dtype)
        self.embedding.weight.copy_(out)
        del self.transform
        self.folded = True

    def structure(self) -> dict:
        """What the saved state dict's shapes depend on beyond the config."""
        return {"folded": self.folded}

    def apply_structure(self, structure: dict) -> None:
        if _folded(structure) and not self.folded:
            self.fold()
