"""Paged own keys for tests: dense ``k, v [B, Hkv, Skv, D]`` scattered into token-major page pools
``[num_pages, page_size, Hkv, D]`` (the contract's and the engine's layout) plus a page table."""
import random

import torch


def paged(k, v, kv_lens, page_size, seed, *, fill=float("nan"), junk_tail=False, shift=None):
    """Row b's own keys ``0 .. kv_lens[b]-1`` (``k[b, :, shift[b] + t]``; ``shift`` default 0)
    written in token order into pages shuffled over the pools; every other slot holds ``fill``
    (unused slots, spare pages, page 0). The table's unused entries are -1, or with ``junk_tail``
    random junk (-1, -9, ids past the pool). Returns ``(pool_k, pool_v), table``."""
    rnd = random.Random(seed)
    B, Hkv, Skv, D = k.shape
    lens = [int(n) for n in kv_lens]
    shift = [0] * B if shift is None else [int(s) for s in shift]
    per_row = [-(-n // page_size) for n in lens]
    num_pages = sum(per_row) + 3                          # page 0 and two more stay unused
    order = list(range(1, num_pages))
    rnd.shuffle(order)
    width = max(per_row + [0]) + 1
    if junk_tail:
        table = torch.tensor([[rnd.choice([-1, -9, 10 ** 6]) for _ in range(width)] for _ in range(B)],
                             dtype=torch.long).view(B, width)
    else:
        table = torch.full((B, width), -1, dtype=torch.long)
    pools = []
    for src in (k, v):
        pool = torch.full((num_pages, page_size, Hkv, D), fill, dtype=src.dtype)
        pools.append(pool)
    at = 0
    for b in range(B):
        table[b, :per_row[b]] = torch.tensor(order[at:at + per_row[b]], dtype=torch.long)
        at += per_row[b]
        for t in range(lens[b]):
            page, slot = int(table[b, t // page_size]), t % page_size
            for pool, src in zip(pools, (k, v)):
                pool[page, slot] = src[b, :, shift[b] + t].detach()
    return tuple(pools), table
