"""The PEFT-style way of serving prefixes, which the demos and benchmarks compare the engine against:
each row's task prefix copied into its own KV cache, prompts left-padded into one batch."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def copied_prefix_cache(prefixes: Dict[str, Tuple[torch.Tensor, torch.Tensor]], names: Sequence[str]):
    """A transformers ``DynamicCache`` whose row b holds the prefix of task ``names[b]``, copied.

    ``prefixes[name] = (k, v)``, each ``[L, Hkv, P, D]`` in cache convention.
    """
    from transformers import DynamicCache
    cache = DynamicCache()
    num_layers = next(iter(prefixes.values()))[0].shape[0]
    for layer in range(num_layers):
        k = torch.stack([prefixes[n][0][layer] for n in names])
        v = torch.stack([prefixes[n][1][layer] for n in names])
        cache.update(k, v, layer)
    return cache


def left_pad(rows: List[torch.Tensor], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of 1-D token rows left-padded with ``pad`` to the longest."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = r
        mask[b, S - len(r):] = 1
    return ids, mask
