"""Reuse bookkeeping across the layers of one model forward (CPU index tensors only).

Every layer of a forward calls attention with the same task ids and lengths, so the work that
depends only on them (range checks, task buckets, visibility masks) is the same 30 times over.
:class:`ValueMemo` remembers such results keyed by the *values* of the small index tensors they
came from (compared with ``torch.equal`` against private copies, so an in-place change of a
caller's tensor can never return a stale result) plus plain Python values. Comparing a few
``[B]`` CPU tensors costs microseconds; on a GPU the comparison would synchronise the device, so
callers only use the memo for CPU tensors.
"""
from __future__ import annotations

import threading
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import torch


def _same(saved: Optional[torch.Tensor], current: Optional[torch.Tensor]) -> bool:
    if saved is None or current is None:
        return saved is None and current is None
    return (saved.shape == current.shape and saved.dtype == current.dtype
            and saved.device == current.device and torch.equal(saved, current))


class ValueMemo:
    """A small most-recently-used table: ``get(tensors, extra, compute)``."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: List[Tuple[Tuple, Hashable, object]] = []
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, tensors: Sequence[Optional[torch.Tensor]], extra: Hashable, compute: Callable[[], object]):
        tensors = tuple(tensors)
        if not all(t is None or (t.device.type == "cpu" and t.numel() <= 1 << 16) for t in tensors):
            return compute()                       # only cheap CPU comparisons are worth it
        with self._lock:
            for i, (saved, saved_extra, value) in enumerate(self._entries):
                if saved_extra == extra and len(saved) == len(tensors) and all(map(_same, saved, tensors)):
                    self.hits += 1
                    if i:
                        self._entries.insert(0, self._entries.pop(i))
                    return value
        value = compute()
        saved = tuple(None if t is None else t.detach().clone() for t in tensors)
        with self._lock:
            self.misses += 1
            self._entries.insert(0, (saved, extra, value))
            del self._entries[self.size:]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
