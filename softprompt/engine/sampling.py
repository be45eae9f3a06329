"""Choosing each request's next token: greedy, temperature, top-k, top-p, per-request seeded
generators, EOS suppression before ``min_new_tokens``; and stop detection (EOS, stop token ids,
stop strings, max new tokens)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .requests import SamplingParams


def make_generator(params: SamplingParams, device) -> Optional[torch.Generator]:
    """The request's own generator (None for greedy). Unseeded requests draw a seed from torch's
    global RNG, so ``torch.manual_seed`` still makes a whole run reproducible."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
    device = torch.device(device)
    g = torch.Generator(device=device if device.type != "mps" else "cpu")
    g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF ``generate`` order) on one row ``[V]`` (float32)."""
    logits = logits / params.temperature
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False                                # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence,
                  suppress: Sequence[Sequence[int]]) -> List[int]:
    """Next token of every row of ``logits [B, V]``.

    ``suppress[b]``: token ids (EOS) that row b may not produce yet (``min_new_tokens``).
    Greedy rows share one argmax; sampled rows each draw from their own generator.
    """
    logits = logits.float()
    for b, ids in enumerate(suppress):
        if ids:
            logits[b, list(ids)] = float("-inf")
    out = logits.argmax(-1).tolist()
    for b, p in enumerate(params):
        if p.greedy:
            continue
        probs = filter_logits(logits[b], p).softmax(-1)
        out[b] = int(torch.multinomial(probs, 1, generator=generators[b]).item())
    return out


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int:
    """Index of the earliest stop string in ``text`` starting at or after ``search_from`` (-1 if none)."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, search_from))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
