"""The engine's own-token KV cache: block-paged, per-layer page pools, per-sequence page lists.

Only each sequence's own tokens live here; a task's prefix stays in the model's prefix store and
is read in place by the attention kernels.

``PagedKVCache`` holds, per layer, K and V pools ``[num_pages * page_size, Hkv, D]`` (token-major
slots; page p owns slots ``p*page_size .. (p+1)*page_size-1``): viewed as ``[num_pages, page_size,
Hkv, D]`` they are the attention contract's paged own keys, and a row's page list its page table. Page 0 is a null page that is
never handed out (gather indices of padding point at it). A sequence owns a list of pages; a
free list hands pages out and takes them back as soon as a sequence finishes. The pools grow by
doubling up to ``max_pages``.

``StepCache`` is the ``transformers.Cache`` one model forward receives. It carries the step's
bookkeeping (which slots the new tokens go to, which slots each row reads) and:

- ``update(k, v, layer)``: writes the rows' real new tokens into their slots, then returns each
  row's whole own K/V gathered from its pages as ``[B, Hkv, Skv, D]``, *right-aligned* (row b's
  ``len_b`` tokens at ``Skv - len_b .. Skv-1``, null slots before them), exactly the layout of a
  left-padded HF batch;
- ``get_seq_length() = get_query_offset() = Skv - Sq`` and ``get_mask_sizes(Sq) = (Skv, 0)``, so
  transformers builds the usual causal (and sliding-window) mask from a 2D padding mask
  ``[B, Skv]`` that the engine passes with it. New queries are left-padded to ``Sq`` too, so each
  row's real queries are its last ones and the mask reduces to per-row key ranges (the fast
  length path of the attention kernels, and the Triton decode path on a GPU).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class OutOfPages(RuntimeError):
    """The pool cannot grow any further (``max_pages`` reached)."""


class PagedKVCache:
    """Block-paged storage of every running sequence's own keys and values."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
                 num_pages: int = 64, max_pages: Optional[int] = None, dtype=torch.float32, device=None):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("page_size", page_size), ("num_pages", num_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PagedKVCache: `{name}` {value!r} is invalid; expected a positive int")
        if max_pages is not None and max_pages < 2:
            raise ValueError(f"PagedKVCache: `max_pages` {max_pages!r} is invalid; expected None or an int >= 2")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size = page_size
        self.max_pages = max_pages
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        num_pages = max(2, num_pages if max_pages is None else min(num_pages, max_pages))
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._free: List[int] = list(range(num_pages - 1, 0, -1))     # page 0 is the null page
        self._pages: Dict[object, List[int]] = {}
        self.peak_pages_used = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_pages(self) -> int:
        return self.k.shape[1] // self.page_size

    @property
    def pages_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.k.element_size()

    def _grow(self, needed: int) -> None:
        old = self.num_pages
        new = max(2 * old, old + needed)
        if self.max_pages is not None:
            new = min(new, self.max_pages)
        if new - old < needed - len(self._free):
            raise OutOfPages(f"PagedKVCache: {needed} more pages needed, {len(self._free)} free and the pool is "
                             f"at max_pages={self.max_pages}")
        shape = (self.num_layers, new * self.page_size, self.num_kv_heads, self.head_dim)
        for name in ("k", "v"):
            # new pages need no zeroing: a slot is read only after its token is written (padding
            # reads the null page 0, which is among the old pages and stays zero)
            pool = torch.empty(shape, dtype=self.dtype, device=self.device)
            pool[:, : old * self.page_size] = getattr(self, name)
            setattr(self, name, pool)
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def can_hold(self, extra_pages: int) -> bool:
        room = len(self._free) + (float("inf") if self.max_pages is None else self.max_pages - self.num_pages)
        return extra_pages <= room

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------------ sequences
    def ensure(self, seq, num_tokens: int) -> None:
        """Give ``seq`` enough pages to hold ``num_tokens`` own tokens (raises OutOfPages)."""
        pages = self._pages.setdefault(seq, [])
        needed = self.pages_for(num_tokens) - len(pages)
        if needed <= 0:
            return
        if needed > len(self._free):
            self._grow(needed)
        for _ in range(needed):
            pages.append(self._free.pop())
        self.peak_pages_used = max(self.peak_pages_used, self.pages_used)

    def free(self, seq) -> int:
        """Return a sequence's pages to the free list at once; returns how many."""
        pages = self._pages.pop(seq, [])
        self._free.extend(reversed(pages))
        return len(pages)

    def pages(self, seq) -> List[int]:
        return list(self._pages.get(seq, []))

    def holds(self, seq) -> bool:
        return seq in self._pages

    def reset_peak(self) -> None:
        """Start the peak of ``pages_used`` (in :meth:`stats`) again from now."""
        self.peak_pages_used = self.pages_used

    def stats(self) -> dict:
        per = self.bytes_per_page
        return {"page_size": self.page_size, "pages_total": self.num_pages - 1, "pages_used": self.pages_used,
                "pages_peak": self.peak_pages_used, "bytes_allocated": per * self.num_pages,
                "bytes_used": per * self.pages_used, "bytes_peak": per * self.peak_pages_used,
                "sequences": len(self._pages)}

    # ------------------------------------------------------------------ one forward
    def step_cache(self, seqs: Sequence, past_lens: Sequence[int], new_lens: Sequence[int]) -> "StepCache":
        """The ``Cache`` of one forward over ``seqs`` (rows), each with ``past_lens[b]`` tokens already
        cached and ``new_lens[b]`` new tokens (left-padded to the longest); pages must be ensured."""
        return StepCache(self, seqs, past_lens, new_lens)


class _PagedLayer(CacheLayerMixin):
    """Per-layer facade (transformers inspects ``cache.layers``); the work happens in StepCache."""

    is_sliding = False

    def __init__(self, owner: "StepCache", layer: int):
        super().__init__()
        self.owner, self.layer = owner, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer)

    def get_mask_sizes(self, query_length: int):
        return self.owner.get_mask_sizes(query_length, self.layer)

    def get_seq_length(self) -> int:
        return self.owner.past_length

    def get_max_length(self) -> int:
        return -1


class StepCache(Cache):
    """The cache one forward sees: writes new tokens into pages, returns gathered per-row K/V."""

    def __init__(self, paged: PagedKVCache, seqs: Sequence, past_lens: Sequence[int], new_lens: Sequence[int]):
        super().__init__(layers=[_PagedLayer(self, i) for i in range(paged.num_layers)])
        self.paged = paged
        device = paged.device
        B = len(seqs)
        ps = paged.page_size
        past = torch.tensor(list(past_lens), dtype=torch.long)
        new = torch.tensor(list(new_lens), dtype=torch.long)
        total = past + new
        self.Sq = int(new.max()) if B else 0
        self.Skv = int(total.max()) if B else 0
        row_pages = [paged.pages(s) for s in seqs]
        width = max(map(len, row_pages), default=0)
        table = torch.zeros(B, max(width, 1), dtype=torch.long)
        for b, pages in enumerate(row_pages):
            if pages:
                table[b, : len(pages)] = torch.tensor(pages, dtype=torch.long)
        # Read layout: row b's token t sits at column Skv - len_b + t (right-aligned).
        j = torch.arange(self.Skv)[None, :]
        t = j - (self.Skv - total)[:, None]                        # [B, Skv] token index or negative
        valid = t >= 0
        tc = t.clamp_min(0)
        slots = table.gather(1, tc // ps) * ps + tc % ps
        self.page_table = table                                    # [B, W] each row's pages in token order
        self.gather_index = torch.where(valid, slots, torch.zeros_like(slots)).reshape(-1).to(device)
        self.attention_mask = valid.to(torch.long).to(device)      # [B, Skv] 2D padding mask
        # Write: row b's real new tokens are its last new_b query columns.
        i = torch.arange(self.Sq)[None, :]
        real = i >= (self.Sq - new)[:, None]                        # [B, Sq]
        tok = past[:, None] + i - (self.Sq - new)[:, None]          # token index of query column i
        tokc = tok.clamp_min(0)
        dst = table.gather(1, (tokc // ps).clamp_max(table.shape[1] - 1)) * ps + tokc % ps
        src = (torch.arange(B)[:, None] * self.Sq + i).expand(B, self.Sq)
        self.write_src = src[real].to(device)
        self.write_dst = dst[real].to(device)
        # Positions of the new tokens among the row's own tokens (padding columns: 0).
        self.position_ids = torch.where(real, tok, torch.zeros_like(tok)).to(device)
        self.past_length = self.Skv - self.Sq
        self.own_lens = total.to(device)                            # [B] own tokens after this step
        self.batch = B

    # ------------------------------------------------------------------ Cache API used by the models
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        paged = self.paged
        B, H, Sq, D = key_states.shape
        pk, pv = paged.k[layer_idx], paged.v[layer_idx]
        if self.write_dst.numel():
            pk.index_copy_(0, self.write_dst,
                           key_states.transpose(1, 2).reshape(B * Sq, H, D).index_select(0, self.write_src).to(pk.dtype))
            pv.index_copy_(0, self.write_dst,
                           value_states.transpose(1, 2).reshape(B * Sq, H, D).index_select(0, self.write_src).to(pv.dtype))
        keys = pk.index_select(0, self.gather_index).view(B, self.Skv, H, D).transpose(1, 2)
        values = pv.index_select(0, self.gather_index).view(B, self.Skv, H, D).transpose(1, 2)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.Skv, 0

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False
