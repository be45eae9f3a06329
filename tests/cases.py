"""Random prefix-attention problems for the tests: fresh draws, odd sizes, shuffled block tables."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Optional

import torch


def fresh_seed() -> int:
    """A new seed per call unless SOFTPROMPT_SEED pins one (to reproduce a failure)."""
    pinned = os.environ.get("SOFTPROMPT_SEED")
    return int(pinned) if pinned else random.SystemRandom().randrange(2**31)


@dataclass
class Case:
    seed: int
    B: int = 5
    T: int = 3
    Hq: int = 4
    Hkv: int = 2
    Sq: int = 7
    Skv: int = 7
    D: int = 16
    block_size: int = 4
    prefix_lens: Optional[list] = None   # per task; random in [0, 11] when None
    padding: str = "none"                 # none | left | right | ragged
    causal: bool = True
    window: Optional[int] = None
    mask: bool = False
    dtype: torch.dtype = torch.float32
    requires_grad: bool = True
    tasks: Optional[list] = None          # task of each sequence; random when None
    kwargs: dict = field(default_factory=dict)

    def build(self):
        """Return ``(args, kwargs)`` for ``prefix_attention``."""
        g = torch.Generator().manual_seed(self.seed)
        rnd = random.Random(self.seed)
        B, T = self.B, self.T
        lens = self.prefix_lens or [rnd.randint(0, 11) for _ in range(T)]
        blocks_per_task = [-(-p // self.block_size) for p in lens]
        max_blocks = max(blocks_per_task + [1])
        num_blocks = sum(blocks_per_task) + 3                   # a few unused blocks in the pool
        order = list(range(num_blocks))
        rnd.shuffle(order)                                       # tasks' blocks scattered in the pool
        table = torch.full((T, max_blocks), -1, dtype=torch.long)
        at = 0
        for t, n in enumerate(blocks_per_task):
            table[t, :n] = torch.tensor(order[at:at + n], dtype=torch.long)
            at += n

        def randn(*shape):
            x = torch.randn(*shape, generator=g, dtype=torch.float64).to(self.dtype)
            return x.requires_grad_(self.requires_grad)

        q = randn(B, self.Hq, self.Sq, self.D)
        k = randn(B, self.Hkv, self.Skv, self.D)
        v = randn(B, self.Hkv, self.Skv, self.D)
        pk = randn(num_blocks, self.Hkv, self.block_size, self.D)
        pv = randn(num_blocks, self.Hkv, self.block_size, self.D)
        tasks = self.tasks if self.tasks is not None else [rnd.randrange(T) for _ in range(B)]
        task_ids = torch.tensor(tasks, dtype=torch.long)
        kw = dict(causal=self.causal, window=self.window, **self.kwargs)
        if self.padding != "none":
            q_lens, kv_lens, kv_starts = [], [], []
            for _ in range(B):
                real = rnd.randint(0, self.Skv)
                if self.padding == "left":       # real tokens at the end; queries = all positions
                    q_lens.append(self.Sq); kv_lens.append(self.Skv); kv_starts.append(self.Skv - real)
                elif self.padding == "right":    # real tokens first, then padding
                    kv = real
                    q_lens.append(min(self.Sq, kv)); kv_lens.append(kv); kv_starts.append(0)
                else:                            # ragged: any lengths the contract allows
                    kv = real
                    q_lens.append(rnd.randint(0, self.Sq)); kv_lens.append(kv)
                    kv_starts.append(rnd.randint(0, kv))
            kw.update(q_lens=torch.tensor(q_lens), kv_lens=torch.tensor(kv_lens),
                      kv_starts=torch.tensor(kv_starts))
        if self.mask:
            kw["attn_mask"] = torch.rand(B, 1, self.Sq, self.Skv, generator=g) > 0.3
        args = (q, k, v, pk, pv, table, torch.tensor(lens, dtype=torch.long), task_ids)
        return args, kw


def weighted_sum(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A scalar loss with a random upstream gradient, so every output element matters."""
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return (out * w).sum()


def outputs_and_grads(fn, args, kwargs, seed):
    out = fn(*args, **kwargs)
    diff = [a for a in args[:5] if a.requires_grad]
    grads = torch.autograd.grad(weighted_sum(out, seed), diff, allow_unused=True)
    grads = [torch.zeros_like(a) if gr is None else gr for a, gr in zip(diff, grads)]
    return out, grads


def masked_key_poison_case(seed: int, dtype=torch.float32):
    """Keys masked for *some* queries of a tile hold NaN / inf (issue: invisible keys leak NaN).

    One sequence per task, Sq = 4 queries at positions 4..7 of Skv = 8 own keys, causal with a
    window of 3, ``kv_starts = 1``: query i sees own keys ``[max(1, 2 + i), 4 + i]``. Poisoned:
    key 0 (before kv_starts, seen by none), k[2] (seen by query 0 only: window-masked for the
    others), v[7] (seen by query 3 only: causal-masked for the others), and the pool rows past
    the prefix's end. Returns ``(clean_args, poisoned_args, kw, sees_poison [Sq])``: queries 0
    and 3 must come out NaN, queries 1 and 2 equal to the clean result."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq, Skv, D, bs = 2, 2, 1, 4, 8, 8, 4
    q, k, v = (torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    pk, pv = torch.randn(4, Hkv, bs, D, generator=g).to(dtype), torch.randn(4, Hkv, bs, D, generator=g).to(dtype)
    table = torch.tensor([[3, 1], [0, -1]])
    lens, tids = torch.tensor([5, 2]), torch.tensor([0, 1])
    kw = dict(causal=True, window=3, q_lens=torch.tensor([Sq, Sq]), kv_lens=torch.tensor([Skv, Skv]),
              kv_starts=torch.tensor([1, 1]))
    pq, pk2, pv2, k2, v2 = q.clone(), pk.clone(), pv.clone(), k.clone(), v.clone()
    k2[:, :, 0], v2[:, :, 0] = float("nan"), float("inf")
    k2[:, :, 2] = float("nan")
    v2[:, :, 7] = float("-inf")
    pk2[1, :, 1:], pv2[1, :, 1:] = float("nan"), float("nan")          # task 0's rows 5..7
    pk2[0, :, 2:], pv2[0, :, 2:] = float("inf"), float("nan")          # task 1's rows 2..3
    pk2[2], pv2[2] = float("nan"), float("nan")                          # a block nobody uses
    clean = (q, k, v, pk, pv, table, lens, tids)
    poisoned = (pq, k2, v2, pk2, pv2, table, lens, tids)
    return clean, poisoned, kw, torch.tensor([True, False, False, True])
