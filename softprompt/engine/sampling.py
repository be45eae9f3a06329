"""Choosing each request's next token: greedy, temperature, top-k, top-p, per-request seeded
generators, EOS suppression before ``min_new_tokens``; and stop detection (EOS, stop token ids,
stop strings, max new tokens)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

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
    """Temperature, then top-k, then top-p (HF ``generate`` order) on one row ``[V]`` (float32)
    whose maximum is finite. The maximum is subtracted first, so no temperature in the validated
    range can overflow: the best token's scaled logit is exactly 0 and the softmax stays finite."""
    logits = (logits - logits.max()) / params.temperature
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
                  suppress: Sequence[Sequence[int]]) -> Tuple[List[Optional[int]], Dict[int, str]]:
    """Next token of every row of ``logits [B, V]``, each row on its own.

    ``suppress[b]``: token ids (EOS, stop ids) that row b may not produce yet (``min_new_tokens``).
    Greedy rows share one max; sampled rows each draw from their own generator.

    Returns ``(tokens, errors)``: a row that cannot be sampled (NaN or +inf logits, every token
    suppressed, a failing draw) gets ``None`` in ``tokens`` and its reason in ``errors[b]``; the
    other rows are unaffected (a failing row never consumes another row's generator).
    """
    logits = logits.float()
    errors: Dict[int, str] = {}
    for b, ids in enumerate(suppress):
        if ids:
            try:
                logits[b, list(ids)] = float("-inf")
            except (IndexError, RuntimeError) as exc:
                errors[b] = f"cannot suppress token ids {sorted(ids)[-3:]}: {exc}"
    best, chosen = logits.max(-1)                       # max propagates NaN: one check covers both
    out: List[Optional[int]] = chosen.tolist()
    for b in torch.nonzero(~torch.isfinite(best)).flatten().tolist():
        errors.setdefault(b, "every token is suppressed" if best[b] == float("-inf")
                          else f"the model's logits are not finite (max {best[b].item()})")
    for b, p in enumerate(params):
        if p.greedy or b in errors:
            continue
        try:
            probs = filter_logits(logits[b], p).softmax(-1)
            out[b] = int(torch.multinomial(probs, 1, generator=generators[b]).item())
        except RuntimeError as exc:
            errors[b] = f"sampling failed: {exc}"
    for b in errors:
        out[b] = None
    return out, errors


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int:
    """Index of the earliest stop string in ``text`` starting at or after ``search_from`` (-1 if none)."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, search_from))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
