"""The ``compiled`` backend: the C++ op ``softprompt::prefix_paged_attention`` (CPU, fp32, inference).

A plan with ``backend="compiled"`` derives the op's index tensors once (:class:`CompiledPlan`):
each row's lengths and page table, and the queries of every task stacked into tiles, so that the
op reads each task's prefix once per call for all of its rows (``csrc/prefix_paged_attention.cpp``);
every layer's ``run`` then only calls the op. Own keys come paged (token-major page pools
``[num_pages, page_size, Hkv, D]``, read in place) or dense ``[B, Hkv, Skv, D]`` (copied per call
into one page per row).

Covered: causal or not, per-row lengths (``q_lens``, ``kv_lens``, ``kv_starts``), sliding window,
GQA, prefix length 0, on the CPU in fp32 without gradients. Not covered (a ``ValueError`` names
it): ``attn_mask``, other devices, other dtypes, gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import compiled_build

# query rows (queries x GQA group) per prefix tile: one task's decode rows fit in one tile, and
# the tile's scores against a long prefix still fit in L2
TILE_ROWS = 64


def unsupported_reason(device: torch.device, attn_mask) -> Optional[str]:
    """Why a plan with these options cannot run on the compiled backend (None: it can)."""
    if device.type != "cpu":
        return f"`device` {device} is not supported by backend 'compiled' (CPU only)"
    if attn_mask is not None:
        return "`attn_mask` is not supported by backend 'compiled' (per-row lengths, causal and window are)"
    return None


def prefix_tiles(task_ids: torch.Tensor, prefix_lens: torch.Tensor, q_lens: torch.Tensor, q_len: int,
                 group: int):
    """The real queries (``b * q_len + i``) of rows whose task has a prefix, task after task, and
    tiles ``[n, 3]`` (task, first, end) over them of at most ``TILE_ROWS // group`` queries."""
    per_tile = max(1, TILE_ROWS // group)
    queries, tiles = [], []
    tasks, lens, plens = task_ids.tolist(), q_lens.tolist(), prefix_lens.tolist()
    rows_of = {}
    for b, t in enumerate(tasks):
        if plens[t] > 0 and lens[b] > 0:
            rows_of.setdefault(t, []).append(b)
    for t, rows in rows_of.items():
        mine = [b * q_len + i for b in rows for i in range(lens[b])]
        for first in range(0, len(mine), per_tile):
            part = mine[first: first + per_tile]
            tiles.append((t, len(queries), len(queries) + len(part)))
            queries.extend(part)
    return (torch.tensor(queries, dtype=torch.int64),
            torch.tensor(tiles, dtype=torch.int64).reshape(len(tiles), 3))


class CompiledPlan:
    """The op's arguments derived from a plan's validated metadata (``BatchMeta``: every index
    int64 on the CPU, unused table entries 0), and the per-layer call."""

    def __init__(self, meta):
        reason = unsupported_reason(meta.device, meta.attn_mask)
        if reason is not None:
            raise ValueError(f"prefix_attention: {reason}")
        self.op = compiled_build.load()
        if self.op is None:
            raise ValueError(f"prefix_attention: `backend` 'compiled' is unavailable: "
                             f"{compiled_build.unavailable_reason()}")
        self.meta = meta
        self.paged = meta.own_page_table is not None
        contiguous = lambda t: t.to(torch.int64).contiguous()       # noqa: E731
        self.index = dict(q_lens=contiguous(meta.q_lens), kv_lens=contiguous(meta.kv_lens),
                          kv_starts=contiguous(meta.kv_starts), block_table=contiguous(meta.block_table),
                          prefix_lens=contiguous(meta.prefix_lens), task_ids=contiguous(meta.task_ids))
        # dense own keys: row b is page b of a pool with one page of Skv slots per row
        self.index["page_table"] = (contiguous(meta.own_page_table) if self.paged else
                                    torch.arange(meta.batch, dtype=torch.int64)[:, None].contiguous())
        queries, tiles = prefix_tiles(meta.task_ids, meta.prefix_lens, meta.q_lens, meta.q_len,
                                      meta.num_q_heads // meta.num_kv_heads)
        self.index.update(prefix_queries=queries, tiles=tiles)

    def __call__(self, q, k, v, prefix_k, prefix_v) -> torch.Tensor:
        """``q [B, Hq, Sq, D]``; ``k, v`` page pools ``[num_pages, page_size, Hkv, D]`` (paged plan)
        or ``[B, Hkv, Skv, D]``; prefix block pools -> ``[B, Hq, Sq, D]``. Shapes and devices
        are checked by the plan; dtype and gradients here."""
        if q.dtype != torch.float32:
            raise ValueError(f"prefix_attention: `q` with dtype {q.dtype} is invalid; expected float32 "
                             "(backend 'compiled')")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v)):
            raise ValueError("prefix_attention: `backend` 'compiled' computes no gradients; expected inputs "
                             "that do not require grad (or torch.no_grad())")
        if not self.paged:
            k, v = (_one_page_per_row(t) for t in (k, v))
        m, ix = self.meta, self.index
        out = self.op(q.transpose(1, 2).contiguous(), k.contiguous(), v.contiguous(), ix["page_table"],
                      ix["q_lens"], ix["kv_lens"], ix["kv_starts"], prefix_k.contiguous(), prefix_v.contiguous(),
                      ix["block_table"], ix["prefix_lens"], ix["task_ids"], ix["prefix_queries"], ix["tiles"],
                      m.causal, m.scale, m.window or 0)          # threads: ATen's intra-op count
        return out.transpose(1, 2)


def _one_page_per_row(t: torch.Tensor) -> torch.Tensor:
    """Dense own keys ``[B, Hkv, Skv, D]`` as a page pool ``[B, max(Skv, 1), Hkv, D]``."""
    pool = t.transpose(1, 2)
    if pool.shape[1] == 0:              # no own keys: a page that is never read
        pool = pool.new_zeros(pool.shape[0], 1, *pool.shape[2:])
    return pool.contiguous()
