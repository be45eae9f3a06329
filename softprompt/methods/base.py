"""Shared pieces of the soft-prompt methods: the model geometry they are sized from, the two kinds
of prompt module (deep = per-layer prefix K/V, input = soft tokens spliced into the embeddings),
and the registry that maps a method name to its config class (used by save/load).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, Iterator, Optional, Tuple, Type

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """What a method needs to know about the model it prompts."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @property
    def kv_width(self) -> int:
        """Per-layer K (or V) width, PEFT's prefix ``token_dim`` (sized to the KV heads under GQA)."""
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, model: nn.Module) -> "Geometry":
        from ..integration.families import geometry, text_config
        cfg = text_config(model)
        L, H, D = geometry(model)
        return cls(model_type=str(getattr(cfg, "model_type", "")), num_layers=int(L), num_kv_heads=int(H),
                   head_dim=int(D), hidden_size=int(cfg.hidden_size), vocab_size=int(cfg.vocab_size))


def check_positive(owner: str, name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: `{name}` {value!r} is invalid; expected a positive int")


def fit_output(module: nn.Module, output, target: torch.Tensor, max_steps: int = 2000,
               tolerance: float = 1e-3) -> None:
    """Fit ``module``'s parameters so that ``output()`` equals ``target`` (Adam, stops once the relative
    RMS error is below ``tolerance``). Used to start a reparameterised prompt (an MLP or LSTM encoder)
    from a chosen value; prompts have few rows, so a step takes milliseconds."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    scale = target.pow(2).mean().clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(max_steps):
            opt.zero_grad()
            loss = (output() - target).pow(2).mean()
            if float(loss.detach() / scale) < tolerance ** 2:
                break
            loss.backward()
            opt.step()
    for p in params:
        p.grad = None


def check_prob(owner: str, name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: `{name}` {value!r} is invalid; expected a float in [0, 1)")


class MethodConfig:
    """Base of the method configs (dataclasses). ``build(geometry, embedding)`` makes the module."""

    method: ClassVar[str] = ""
    kind: ClassVar[str] = ""                  # "deep" | "input" | "hard"
    _not_saved: ClassVar[Tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._not_saved}

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}; expected a subset of "
                             f"{sorted(names)}")
        return cls(**data)

    def build(self, geometry: Geometry, embedding: Optional[nn.Embedding] = None) -> "SoftPrompt":
        raise NotImplementedError

    def state_shapes(self, geometry: Geometry, structure: dict) -> Iterator[Tuple[str, Tuple[int, ...]]]:
        """Yield ``(name, shape)`` of every tensor of the module's state dict, without building it: a
        checkpoint's tensors are checked against these before anything is allocated. A consumer may
        stop early (an LSTM's layer count comes from the file, so the sequence can be long)."""
        raise NotImplementedError

    def for_loading(self, structure: dict) -> "MethodConfig":
        """The config to build a module whose state a checkpoint then overwrites: no init work (text and
        vocabulary inits need the word embeddings) and nothing the saved ``structure`` dropped."""
        return self


class SoftPrompt(nn.Module):
    """A task's prompt module. ``kind`` says how it reaches attention."""

    kind: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, geometry: Geometry):
        super().__init__()
        self.config = config
        self.geometry = geometry

    @property
    def num_virtual_tokens(self) -> int:
        raise NotImplementedError


class DeepPrompt(SoftPrompt):
    """Per-layer prefix: ``prefix()`` returns ``k, v [L, Hkv, P, D]`` in cache convention."""

    kind = "deep"

    def prefix(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class InputPrompt(SoftPrompt):
    """Input-embedding soft tokens: ``embeddings()`` returns ``[P, hidden]`` placed by ``template``."""

    kind = "input"

    def embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def template(self):
        """The parsed template; subclasses set ``self._template`` when they are built."""
        return self._template


METHODS: Dict[str, Type[MethodConfig]] = {}


def register(cls):
    METHODS[cls.method] = cls
    return cls


def config_from_dict(method: str, data: dict) -> MethodConfig:
    if method not in METHODS:
        raise ValueError(f"softprompt: method {method!r} is unknown; expected one of {sorted(METHODS)}")
    return METHODS[method].from_dict(data)
