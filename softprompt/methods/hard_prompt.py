"""Hard prompts through the prefix store: a text (system prompt, instruction, few-shot examples)
run once through the frozen base model, its per-layer K/V kept as the task's prefix.

A request under a hard-prompt task gives the same result as the text's tokens pasted in front of
the request's tokens (``text_ids + input_ids``) through the stock model: causal decoders compute
the text's keys and values without looking at what follows, and the store's position convention
puts the request's tokens right after the prefix (RoPE: keys pre-rotated by ``-P``; learned
absolute positions: ``position_ids + P``). Not exact, and refused with a ``ValueError``:

* bidirectional encoders (bert, roberta) and encoder-decoders (t5, bart): the text's tokens would
  see the input there, so their K/V depend on it;
* a text that does not fit a sliding-window layer's window (mistral, gemma2 configs with
  ``sliding_window``): the pasted text would drop out of the window, a stored prefix never does.
  Requests must keep ``text + request`` within the window too (checked by ``SoftPromptModel``).

Stacking: ``HardPrompt(..., after="soft")`` puts task ``soft``'s prefix first and computes the
text's K/V with that prefix in front, so the task's prefix is ``[soft prefix ; text]``, exactly the
soft task with the text pasted in front of the input.

Checkpoints keep the text, the token ids and the tokenizer's name, no tensors: the K/V are
recomputed from the token ids when the task is loaded (a few hundred tokens, one forward), so a
checkpoint is small and matches the model it is loaded into in dtype and device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import Geometry, MethodConfig, SoftPrompt, register


def _ids_of(value) -> Optional[List[int]]:
    """``value`` as a list of ints, or None when it is not a sequence of ints."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            return None
        return [int(i) for i in value.tolist()]
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return [int(i) for i in value]
    return None


def tokenizer_name(tokenizer) -> Optional[str]:
    """The tokenizer's ``name_or_path`` (what loads it again), when it has one."""
    name = getattr(tokenizer, "name_or_path", None)
    return str(name) if name else None


@register
@dataclass
class HardPrompt(MethodConfig):
    """A hand-written prompt kept in the prefix store.

    Args:
        text: the prompt, a string (needs ``tokenizer``) or its token ids.
        tokenizer: a transformers tokenizer; the text is tokenized without special tokens (put a
            BOS id in ``text`` as ids when the model wants one).
        after: a task of the same model whose prefix goes before the text (stacking).
        token_ids: the text's ids; filled from ``text`` (saved, so loading needs no tokenizer).
        tokenizer_name: the tokenizer's ``name_or_path``, kept with a checkpoint to say what
            produced ``token_ids``.
    """

    text: Union[str, Sequence[int]] = ""
    tokenizer: Any = None
    after: Optional[str] = None
    token_ids: Optional[Sequence[int]] = None
    tokenizer_name: Optional[str] = None

    method = "hard_prompt"
    kind = "hard"
    _not_saved = ("tokenizer",)

    def __post_init__(self):
        ids_given = None
        if self.token_ids is not None:
            ids_given = _ids_of(self.token_ids)
            if ids_given is None:
                raise ValueError(f"HardPrompt: `token_ids` {self.token_ids!r:.80} is invalid; expected a list of ints")
        if isinstance(self.text, str):
            if self.tokenizer is not None:
                ids = [int(i) for i in self.tokenizer(self.text, add_special_tokens=False)["input_ids"]]
                if ids_given is not None and ids_given != ids:
                    raise ValueError("HardPrompt: `token_ids` differ from what `tokenizer` makes of `text`; give one "
                                     "of them")
                self.tokenizer_name = self.tokenizer_name or tokenizer_name(self.tokenizer)
            elif ids_given is not None:
                ids = ids_given
            else:
                raise ValueError("HardPrompt: a string `text` needs `tokenizer` (or pass the token ids as `text`)")
        else:
            ids = _ids_of(self.text)
            if ids is None:
                raise ValueError(f"HardPrompt: `text` of type {type(self.text).__name__} is invalid; expected a "
                                 "string (with `tokenizer`) or a list of token ids")
            if ids_given is not None and ids_given != ids:
                raise ValueError("HardPrompt: `token_ids` differ from the ids given as `text`; give one of them")
            self.text = ids
        if not ids:
            raise ValueError(f"HardPrompt: `text` {self.text!r:.80} has no tokens; expected a non-empty prompt")
        if any(i < 0 for i in ids):
            raise ValueError(f"HardPrompt: `text` token ids must be >= 0; got {min(ids)}")
        if self.after is not None and (not isinstance(self.after, str) or not self.after):
            raise ValueError(f"HardPrompt: `after` {self.after!r} is invalid; expected None or a task name")
        self.token_ids = ids

    def build(self, geometry: Geometry, embedding: Optional[nn.Embedding] = None) -> "TextPrefix":
        return TextPrefix(self, geometry)

    def state_shapes(self, geometry: Geometry, structure: dict):
        return iter(())                       # no tensors: the K/V are recomputed from the token ids


class TextPrefix(SoftPrompt):
    """A hard-prompt task's module: no parameters, only the text's token ids. Its K/V come from
    :func:`text_prefix` (``SoftPromptModel`` writes them into the store)."""

    kind = "hard"

    def __init__(self, config: HardPrompt, geometry: Geometry):
        super().__init__(config, geometry)
        bad = [i for i in config.token_ids if i >= geometry.vocab_size]
        if bad:
            raise ValueError(f"HardPrompt: `text` token id {bad[0]} is outside the model's vocabulary "
                             f"[0, {geometry.vocab_size})")
        self.token_ids: Tuple[int, ...] = tuple(config.token_ids)

    @property
    def num_virtual_tokens(self) -> int:
        """Tokens of the text (a stacked task's prefix also holds the prefix of ``config.after``)."""
        return len(self.token_ids)


def _sliding_window(model: nn.Module) -> Optional[int]:
    """The smallest sliding window of the model's self-attention layers, None when none has one
    (from the config: ``sliding_window`` where ``layer_types`` has sliding layers or is absent,
    and from the attention modules that carry their own)."""
    from ..integration.attention import sliding_window_of
    from ..integration.families import family_of, self_attention_modules, text_config
    config = text_config(model)
    windows = [sliding_window_of(m) for m in self_attention_modules(model, family_of(model))]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or "sliding_attention" in layer_types:
        windows.append(sliding_window_of(None, getattr(config, "sliding_window", None)))
    windows = [w for w in windows if w is not None]
    return min(windows) if windows else None


def check_exact(model: nn.Module, prefix_len: int) -> Optional[int]:
    """ValueError unless a hard prompt of ``prefix_len`` tokens (stacked prefix included) is exact
    on ``model``; returns the model's sliding window (None when it has none)."""
    from ..integration.families import family_of, is_encoder_decoder
    family = family_of(model)
    if is_encoder_decoder(model) or family.bidirectional:
        raise ValueError(f"HardPrompt: model family {family.name!r} is not supported: its attention is "
                         "bidirectional, so the text's K/V would depend on the input after it; hard prompts are "
                         "exact on causal decoders only")
    window = _sliding_window(model)
    if window is not None and prefix_len >= window:
        raise ValueError(f"HardPrompt: a prefix of {prefix_len} tokens is invalid for this model's sliding window "
                         f"of {window}; expected fewer than {window} tokens (text pasted before a request would "
                         "leave the window, a stored prefix does not)")
    return window


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def cache_kv(out, n: int, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k, v [L, Hkv, n, D]`` of a one-row forward's KV cache (``out.cache`` or ``past_key_values``)."""
    cache = out.get("cache", None) if hasattr(out, "get") else None
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise ValueError(f"softprompt: {type(model).__name__} returned no KV cache for the prompt's tokens")
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    if k.shape[2] != n:
        raise ValueError(f"softprompt: the model's cache kept {k.shape[2]} of the prompt's {n} positions (sliding "
                         "window?); the prompt cannot be stored as a prefix")
    return k, v


@torch.no_grad()
def text_prefix(model: nn.Module, token_ids: Sequence[int], after: Optional[str] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` once over ``token_ids`` and return the prefix ``k, v [L, Hkv, P, D]`` in cache
    convention, ready for ``store.add(name, k, v)``.

    With ``after`` (a task of the model's prefix store; the model must be attached), the text is
    run behind that task's prefix and the result is ``[after's prefix ; text]`` (``P`` counts both).
    """
    from ..integration.attach import attached_store
    ids = _ids_of(token_ids)
    if not ids:
        raise ValueError(f"text_prefix: `token_ids` {token_ids!r:.80} is invalid; expected a non-empty list of ints")
    vocab = model.get_input_embeddings().num_embeddings
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"text_prefix: `token_ids` must lie in [0, {vocab}); got {min(ids)}..{max(ids)}")
    store = attached_store(model)
    front = None
    if after is not None:
        if store is None or after not in store:
            raise ValueError(f"text_prefix: `after` {after!r} is not a task of the model's prefix store"
                             + (" (the model is not attached)" if store is None else ""))
        front = store.get(after)
    P0 = 0 if front is None else front[0].shape[2]
    check_exact(model, P0 + len(ids))
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    n = len(ids)
    kw = {} if front is None else {"task_ids": store.task_ids([after]).to(device)}
    with _eval(model):
        out = model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=torch.arange(n, device=device)[None],
                    use_cache=True, **kw)
    k, v = cache_kv(out, n, model)
    if front is None:
        return k, v
    # the text ran at positions 0..n-1 behind the stored prefix: in cache convention it sits at P0..P0+n-1
    k = store.to_cache(k.to(store.dtype), P0)
    return torch.cat([front[0], k], dim=2), torch.cat([front[1], v.to(store.dtype)], dim=2)
