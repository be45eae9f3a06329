"""The ``torch`` backend: prefix attention in plain PyTorch without copying a prefix per sequence.

The batch is grouped by task. Each task's prefix is read out of the block pool once per call
and scored against the queries of all of that task's sequences in one matrix product (GQA
heads stacked into the rows), so prefix memory does not grow with the batch. Own keys are
scored per sequence. Both parts share one softmax: every score is exponentiated against the
joint row maximum, and the two partial sums of ``p`` and ``p @ v`` are added before the single
normalisation. Autograd provides the backward; a task's prefix gradient sums over its sequences
through the gather's scatter-add.
"""
from __future__ import annotations

import torch

from .inputs import PrefixAttentionInputs
from .masks import own_key_visibility, query_valid
from .reference import compute_dtype


def task_groups(task_ids: torch.Tensor, prefix_lens: torch.Tensor):
    """Yield ``(task, rows)`` for every task present in the batch with a non-empty prefix."""
    if task_ids.numel() == 0:
        return []
    order = torch.argsort(task_ids, stable=True)
    counts = torch.bincount(task_ids, minlength=prefix_lens.shape[0])
    present = (counts > 0) & (prefix_lens > 0)
    groups = []
    for task, rows in zip(range(counts.shape[0]), torch.split(order, counts.tolist())):
        if present[task]:
            groups.append((task, rows))
    return groups


def task_prefix(x: PrefixAttentionInputs, pool: torch.Tensor, task: int, length: int) -> torch.Tensor:
    """One task's prefix rows gathered out of the block pool: ``[Hkv, length, D]``."""
    blocks = x.block_table[task, : -(-length // x.block_size)]
    gathered = pool[blocks]                                            # [blocks, Hkv, bs, D]
    nb, Hkv, bs, D = gathered.shape
    return gathered.permute(1, 0, 2, 3).reshape(Hkv, nb * bs, D)[:, :length]


def torch_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    cdt = compute_dtype(x.q.dtype)
    B, Hq, Sq, D = x.q.shape
    Hkv, G, Skv = x.num_kv_heads, x.group_size, x.kv_len
    q = (x.q.to(cdt) * x.scale).view(B, Hkv, G, Sq, D)

    own_visible = own_key_visibility(x)                                # [B, 1|Hq, Sq, Skv]
    per_head = own_visible.shape[1] != 1
    own_visible = own_visible.view(B, Hkv if per_head else 1, G if per_head else 1, Sq, Skv)
    own_scores = torch.einsum("bhgsd,bhkd->bhgsk", q, x.k.to(cdt))
    own_scores = own_scores.masked_fill(~own_visible, float("-inf"))

    qvalid = query_valid(x)                                            # [B, Sq]
    lengths = x.prefix_lens.tolist()
    prefix_parts = []
    for task, rows in task_groups(x.task_ids, x.prefix_lens):
        pk = task_prefix(x, x.prefix_k, task, lengths[task]).to(cdt)
        pv = task_prefix(x, x.prefix_v, task, lengths[task]).to(cdt)
        scores = torch.einsum("bhgsd,hpd->bhgsp", q[rows], pk)         # one product per task
        scores = scores.masked_fill(~qvalid[rows][:, None, None, :, None], float("-inf"))
        prefix_parts.append((rows, scores, pv))

    # Joint row maximum over prefix and own scores. Softmax is shift-invariant, so it is
    # detached; rows that see nothing use 0 so every exponent stays finite.
    with torch.no_grad():
        row_max = own_scores.amax(-1) if Skv else torch.full(q.shape[:-1], float("-inf"), dtype=cdt,
                                                             device=q.device)
        for rows, scores, _ in prefix_parts:
            row_max[rows] = torch.maximum(row_max[rows], scores.amax(-1))
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))

    p_own = torch.exp(own_scores - row_max[..., None])
    denom = p_own.sum(-1)
    acc = torch.einsum("bhgsk,bhkd->bhgsd", p_own, x.v.to(cdt))
    for rows, scores, pv in prefix_parts:
        p = torch.exp(scores - row_max[rows][..., None])
        denom = denom.index_add(0, rows, p.sum(-1))
        acc = acc.index_add(0, rows, torch.einsum("bhgsp,hpd->bhgsd", p, pv))

    out = acc / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    return out.reshape(B, Hq, Sq, D).to(x.q.dtype)
