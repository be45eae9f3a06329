"""Encoder-decoder models (T5, BART): a prefix on encoder self-attention, decoder self-attention
and decoder cross-attention, as published prefix tuning does (Li & Liang's BART code keeps three
prefixes per layer; PEFT only reaches the decoder's self-attention).

Layout. One :class:`EncoderDecoderPrefixStore` (a :class:`ModelPrefixStore`) holds the three
kinds as *virtual layers* of one pool, in this order::

    [ encoder self-attention 0..Le-1 | decoder self-attention 0..Ld-1 | cross-attention 0..Ld-1 ]

so a task has one id, one block list and one prefix length ``P`` for all three kinds (the paper's
and PEFT's setting), ``store.add(name, k, v)`` takes ``k, v [Le + 2*Ld, Hkv, P, D]`` and
``store.join({...}) / store.split(k)`` convert from / to per-kind tensors. The soft-prompt
methods see ``Geometry.num_layers = Le + 2*Ld``, so ``PrefixTuning`` / ``PTuningV2`` train all
three kinds with no change (their flat PEFT-style layout ``[P, L*2*Hkv*D]`` is layer-major over
the virtual layers).

Attention modules are chosen by *name* (:func:`.families.encoder_decoder_modules`).

Semantics (the prefix is *position-free* in both families; real tokens keep the model's own
positions ``0 .. S-1`` in the encoder and the decoder, whatever ``P`` is, so tasks of different
lengths share a batch):

* Every query sees all ``P`` prefix rows of its task: encoder queries (non-causal), decoder
  queries in self-attention (the prefix is in front of the causal own keys) and decoder queries
  in cross-attention (the task's cross prefix, then the encoder outputs under the encoder's
  padding mask, non-causal).
* T5: the relative position bias of the prefix columns is **zero** (the own-token columns keep
  T5's bias). A PEFT cache prefix would instead get the bias of positions ``0..P-1`` with real
  decoder tokens at ``P..``. T5 cross-attention has no position bias.
* BART: learned absolute positions are **not** shifted: encoder and decoder tokens sit at
  ``0..S-1`` (BART computes them internally and takes no ``position_ids``). A PEFT seq2seq cache
  prefix would put decoder tokens at ``P..`` (its cache length) and leave the encoder at ``0..``.
* The decode path reads the cross-attention prefix from the store like the self-attention one
  (through ``prefix_attention``), never from the cross-attention cache, which holds only the
  encoder outputs' K/V.

Paths. BART attention and T5 cross-attention run on the kernels (``prefix_attention``). T5's
relative position bias is the plan's ``bias`` run argument (an additive bias on own-key scores,
zero on the prefix columns), which the ``torch`` backend computes on its dense path.

Limitations: same ``P`` for the three kinds of a task; encoder and decoder must have the same
attention geometry (kv heads, head dim), true of every released T5/BART checkpoint; families
``t5`` and ``bart`` only (mt5/mbart/... are untested and refused); T5 generate needs
``num_decoder_layers == num_layers`` (a transformers limitation of T5's cache, stock models too).
``SoftPromptModel`` works unchanged on top (``Geometry.num_layers`` is the virtual-layer count);
``PrefixTuning(projection_dim=...)`` uses one MLP for all three kinds (Li & Liang used one per
kind). Input-level methods (prompt tuning, P-tuning v1) put their soft tokens in front of the
*encoder* input in forward/training (labels stay decoder-side); ``SoftPromptModel.generate``
refuses them on encoder-decoder models (no compiled form here).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .attention import SLOT, softprompt_attention
from .families import (ENCODER_DECODER_FAMILIES, KINDS, Family, encoder_decoder_modules, geometry, is_encoder_decoder,
                       text_config)
from .store import ModelPrefixStore
from .wiring import TaskIdsForward, check_backend

ATTN_NAME_ENCDEC = "softprompt_encdec"
__all__ = ["ATTN_NAME_ENCDEC", "ENCODER_DECODER_FAMILIES", "KINDS", "EncoderDecoderAdapter",
           "EncoderDecoderPrefixStore", "encdec_attention"]


class EncoderDecoderPrefixStore(ModelPrefixStore):
    """The prefix store of an attached encoder-decoder model: the three prefix kinds as virtual
    layers ``[encoder | decoder self | cross]`` (see the module docstring).

    Extra attributes: ``layers`` (``{kind: count}``), ``kinds``; ``calls`` counts the attention
    paths as in :class:`ModelPrefixStore`.
    """

    def __init__(self, layers: Dict[str, int], num_kv_heads: int, head_dim: int, *, family: Family,
                 backend=None, block_size: int = 16, dtype=torch.float32, device=None, trainable: bool = False):
        self.layers = {kind: int(layers[kind]) for kind in KINDS}
        super().__init__(sum(self.layers.values()), num_kv_heads, head_dim, family=family, backend=backend,
                         block_size=block_size, dtype=dtype, device=device, trainable=trainable)
        self.kinds = KINDS

    def layer_range(self, kind: str) -> Tuple[int, int]:
        """``(start, stop)`` of ``kind``'s virtual layers."""
        if kind not in KINDS:
            raise ValueError(f"EncoderDecoderPrefixStore: `kind` {kind!r} is invalid; expected one of {KINDS}")
        start = 0
        for k in KINDS:
            if k == kind:
                return start, start + self.layers[k]
            start += self.layers[k]
        raise AssertionError

    def virtual_layer(self, kind: str, layer: int) -> int:
        start, stop = self.layer_range(kind)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < stop - start:
            raise ValueError(f"EncoderDecoderPrefixStore: `layer` {layer!r} is invalid for kind {kind!r}; "
                             f"expected an int in [0, {stop - start})")
        return start + layer

    def join(self, prefixes: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``{"encoder": (k, v), "decoder": (k, v), "cross": (k, v)}`` with ``[L_kind, Hkv, P, D]``
        each (one ``P``) -> ``k, v [Le + 2*Ld, Hkv, P, D]``."""
        if not isinstance(prefixes, dict) or set(prefixes) != set(KINDS):
            raise ValueError(f"EncoderDecoderPrefixStore.join: `prefixes` must map exactly {KINDS} to (k, v)")
        ks, vs = [], []
        for kind in KINDS:
            pair = prefixes[kind]
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(t, torch.Tensor) for t in pair)):
                raise ValueError(f"EncoderDecoderPrefixStore.join: `{kind}` prefix of type {type(pair).__name__} "
                                 "is invalid; expected a pair of tensors (k, v)")
            k, v = pair
            if k.dim() != 4 or k.shape[0] != self.layers[kind] or v.shape != k.shape:
                raise ValueError(f"EncoderDecoderPrefixStore.join: `{kind}` prefix with shapes {tuple(k.shape)}, "
                                 f"{tuple(v.shape)} is invalid; expected k, v [{self.layers[kind]}, "
                                 f"{self.num_kv_heads}, P, {self.head_dim}]")
            ks.append(k)
            vs.append(v)
        if len({k.shape[2] for k in ks}) != 1:
            raise ValueError(f"EncoderDecoderPrefixStore.join: prefix lengths {[k.shape[2] for k in ks]} differ; "
                             "the three kinds of a task share one length P")
        return torch.cat(ks), torch.cat(vs)

    def split(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``[Le + 2*Ld, ...]`` -> ``{kind: [L_kind, ...]}`` (views)."""
        return {kind: x[slice(*self.layer_range(kind))] for kind in KINDS}

    def add_kinds(self, name: str, prefixes) -> int:
        """``add`` from per-kind prefixes (see :meth:`join`)."""
        return self.add(name, *self.join(prefixes))

    def get_kind(self, name: str, kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self.get(name)
        sl = slice(*self.layer_range(kind))
        return k[sl], v[sl]

    def extra_repr(self) -> str:
        return f"layers={self.layers}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------- attention
def _kind(module) -> Optional[str]:
    slot = module.__dict__.get(SLOT)
    store = slot.store_ref() if slot is not None else None
    if not isinstance(store, EncoderDecoderPrefixStore):
        return None
    for kind in KINDS:
        start, stop = store.layer_range(kind)
        if start <= slot.layer < stop:
            return kind
    return None


def encdec_attention(module, query, key, value, attention_mask, position_bias=None, **kwargs):
    """The registered attention function of encoder-decoder models.

    T5 self-attention passes its relative ``position_bias`` (``[1|B, H, Sq, Skv]``, own keys):
    ``softprompt_attention`` adds it to the own-key scores (``bias``; the prefix columns get none).
    T5 cross-attention's ``position_bias`` is all zeros by construction (no relative bias) and is
    dropped so the call stays on the kernels.
    """
    if position_bias is not None and _kind(module) != "cross":
        kwargs["bias"] = position_bias[..., -query.shape[2]:, :key.shape[2]]
    return softprompt_attention(module, query, key, value, attention_mask, **kwargs)


# ---------------------------------------------------------------------------------------- attach
class EncoderDecoderAdapter:
    """``attach`` for T5 / BART: the three prefix kinds per layer."""

    attn_name = ATTN_NAME_ENCDEC
    attention = staticmethod(encdec_attention)

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return is_encoder_decoder(model)

    @staticmethod
    def build(model: nn.Module, backend, block_size: int, trainable: bool):
        """``(store, [(virtual layer, module)], forward class)`` for ``wiring.install``."""
        check_backend(backend)
        family = ENCODER_DECODER_FAMILIES[text_config(model).model_type]
        modules = encoder_decoder_modules(model)
        _, heads, head_dim = geometry(model)
        param = next(model.parameters())
        store = EncoderDecoderPrefixStore({k: len(ms) for k, ms in modules.items()}, heads, head_dim,
                                          family=family, backend=backend, block_size=block_size,
                                          dtype=param.dtype, device=param.device, trainable=trainable)
        slots = [(store.virtual_layer(kind, layer), module)
                 for kind in KINDS for layer, module in enumerate(modules[kind])]
        return store, slots, EncDecForward


class EncDecForward(TaskIdsForward):
    """``model.forward`` with ``task_ids`` in its signature and no position offsets (the prefix is
    position-free). ``position_ids`` is dropped: T5/BART take none (it would only leak into the
    attention kwargs)."""

    def prepare(self, args: tuple, kwargs: dict, task_ids):
        kwargs.pop("position_ids", None)
        return super().prepare(args, kwargs, task_ids)
