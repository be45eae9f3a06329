"""The ``torch`` backend: prefix attention in plain PyTorch without copying a prefix per sequence.

The batch is grouped by task. Each task's prefix is gathered out of the block pool once per call
and scored against the stacked queries of all of that task's sequences (GQA heads and query rows
stacked too) in one matrix product, so prefix memory does not grow with the batch. Tasks with
similar group sizes share one batched product: groups are bucketed by size (powers of two) and
padded to the bucket's largest, which bounds padding waste at 2x and the number of products at
log2(B) + 1 — whether every sequence shares one task or has its own. Own keys are scored per
sequence. Both parts share one softmax: every score is exponentiated against the joint row maximum
and the partial sums of ``p`` and ``p @ v`` are added before the single normalisation. Autograd
provides the backward; a task's prefix gradient sums over its sequences through the gather.

On the CPU the score matrices are never materialised: calls without gradients run each part
through ATen's fused flash kernel and merge the log-sum-exps (:func:`fused_inference_attention`);
calls with gradients do the same with a custom backward (:func:`split_flash_training_attention`,
see :mod:`.split_flash`). The score-matrix path above serves float64, other devices, and calls
where a non-finite key or value must be kept away from the queries that cannot see it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .inputs import PrefixAttentionInputs, derived
from .masks import all_finite, nonfinite_rows, own_key_visibility, query_valid, zero_rows
from .reference import compute_dtype
from .split_flash import HAS_SPLIT_FLASH, KeyPart, Rows, split_flash_attention


@dataclass
class Bucket:
    """Task groups of similar size, scored in one batched product."""
    tasks: torch.Tensor      # [Gb] task ids
    lengths: torch.Tensor    # [Gb] their prefix lengths
    rows: int                # prefix rows to gather (max length in the bucket)
    width: int               # sequences per group after padding (max group size in the bucket)
    seqs: torch.Tensor       # [n] batch rows in this bucket
    group: torch.Tensor      # [n] index of each row's group within the bucket
    slot: torch.Tensor       # [n] position of each row within its group


def task_buckets(x: PrefixAttentionInputs) -> List[Bucket]:
    """Group the batch by task (tasks with an empty prefix are left out) and bucket groups by size
    (once per plan)."""
    return derived(x, "task_buckets", lambda: _task_buckets(x))


def _task_buckets(x: PrefixAttentionInputs) -> List[Bucket]:
    task_list = x.task_ids.tolist()               # one host sync for all the bookkeeping
    lengths = x.prefix_lens.tolist()
    members = {}
    for b, t in enumerate(task_list):
        if lengths[t] > 0:
            members.setdefault(t, []).append(b)
    by_size = {}
    for t, seqs in members.items():
        by_size.setdefault((len(seqs) - 1).bit_length(), []).append(t)
    buckets = []
    device = x.q.device
    for _, tasks in sorted(by_size.items()):
        seqs, group, slot = [], [], []
        for g, t in enumerate(tasks):
            seqs += members[t]
            group += [g] * len(members[t])
            slot += range(len(members[t]))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        buckets.append(Bucket(tasks=as_tensor(tasks), lengths=as_tensor([lengths[t] for t in tasks]),
                              rows=max(lengths[t] for t in tasks),
                              width=max(len(members[t]) for t in tasks),
                              seqs=as_tensor(seqs), group=as_tensor(group), slot=as_tensor(slot)))
    return buckets


def gather_prefixes(x: PrefixAttentionInputs, pool: torch.Tensor, tasks: torch.Tensor, rows: int) -> torch.Tensor:
    """The prefixes of ``tasks`` read out of the block pool, once each: ``[Gb, Hkv, rows, D]``."""
    blocks = -(-rows // x.block_size)
    table = x.block_table[tasks, :blocks].clamp_min(0)      # entries past a task's length may be -1
    g = pool[table]                                          # [Gb, blocks, Hkv, bs, D]
    Gb, n, Hkv, bs, D = g.shape
    return g.permute(0, 2, 1, 3, 4).reshape(Gb, Hkv, n * bs, D)[:, :, :rows]


def _to_groups(values: torch.Tensor, bucket: Bucket, fill: float = 0.0) -> torch.Tensor:
    """Scatter per-sequence ``[n, ...]`` into the padded group layout ``[Gb, width, ...]``."""
    out = values.new_full((bucket.tasks.shape[0], bucket.width, *values.shape[1:]), fill)
    return out.index_put((bucket.group, bucket.slot), values)


def torch_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    if _fused_inference_applies(x):
        return fused_inference_attention(x)
    if _split_flash_applies(x):
        out = split_flash_training_attention(x)
        if out is not None:
            return out
    return differentiable_attention(x)


def differentiable_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    cdt = compute_dtype(x.q.dtype)
    B, Hq, Sq, D = x.q.shape
    Hkv, G, Skv = x.num_kv_heads, x.group_size, x.kv_len
    valid = query_valid(x)                                             # [B, Sq]
    # Padding queries are zeroed first, so whatever they hold reaches no score or gradient.
    q = (x.q.to(cdt).masked_fill(~valid[:, None, :, None], 0.0) * x.scale).view(B, Hkv, G, Sq, D)

    own_visible = own_key_visibility(x)                                # [B, 1|Hq, Sq, Skv]
    per_head = own_visible.shape[1] != 1
    own_visible = own_visible.view(B, Hkv if per_head else 1, G if per_head else 1, Sq, Skv)
    k, v, own_bad = x.k.to(cdt), x.v.to(cdt), None
    if not all_finite(k, v):
        own_bad = nonfinite_rows(k, v)[:, :, None, None, :]           # [B, Hkv, 1, 1, Skv]
        k, v = zero_rows(k, own_bad[:, :, 0, 0]), zero_rows(v, own_bad[:, :, 0, 0])
    own_scores = torch.einsum("bhgsd,bhkd->bhgsk", q, k)
    own_scores = own_scores.masked_fill(~own_visible, float("-inf"))
    # queries that see a non-finite key or value: NaN, filled in at the end (no NaN in the backward)
    sees_bad = (own_visible & own_bad).any(-1) if own_bad is not None else None   # [B, Hkv, 1|G, Sq]

    # Prefix scores, one batched product per bucket: [Gb, Hkv, width*G*Sq, rows].
    parts = []
    for bucket in task_buckets(x):
        Gb, W, P = bucket.tasks.shape[0], bucket.width, bucket.rows
        pk = gather_prefixes(x, x.prefix_k, bucket.tasks, P).to(cdt)
        pv = gather_prefixes(x, x.prefix_v, bucket.tasks, P).to(cdt)
        stacked = _to_groups(q[bucket.seqs], bucket)                   # [Gb, W, Hkv, G, Sq, D]
        stacked = stacked.permute(0, 2, 1, 3, 4, 5).reshape(Gb, Hkv, W * G * Sq, D)
        beyond = torch.arange(P, device=q.device)[None, :] >= bucket.lengths[:, None]
        pk, pv, bad = _clean_prefix(pk, pv, beyond)
        if bad is not None:                 # every real query of a task sees its whole prefix
            task_bad = bad.any(-1)[bucket.group][:, :, None, None]     # [n, Hkv, 1, 1]
            seq_bad = torch.zeros(B, Hkv, 1, 1, dtype=torch.bool, device=q.device).index_copy(0, bucket.seqs, task_bad)
            sees_bad = seq_bad if sees_bad is None else sees_bad | seq_bad
        scores = stacked @ pk.transpose(-1, -2)
        scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
        parts.append((bucket, scores, pv))

    # Joint row maximum over prefix and own scores. Softmax is shift-invariant, so it is
    # detached; rows that see nothing use 0 so every exponent stays finite.
    with torch.no_grad():
        row_max = own_scores.amax(-1) if Skv else q.new_full(q.shape[:-1], float("-inf"))
        for bucket, scores, _ in parts:
            Gb, W = bucket.tasks.shape[0], bucket.width
            m = scores.amax(-1).view(Gb, Hkv, W, G, Sq).transpose(1, 2)[bucket.group, bucket.slot]
            row_max[bucket.seqs] = torch.maximum(row_max[bucket.seqs], m)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))

    p_own = torch.exp(own_scores - row_max[..., None])
    denom = p_own.sum(-1)
    acc = torch.einsum("bhgsk,bhkd->bhgsd", p_own, v)
    for bucket, scores, pv in parts:
        Gb, W = bucket.tasks.shape[0], bucket.width
        shift = _to_groups(row_max[bucket.seqs], bucket)               # [Gb, W, Hkv, G, Sq]
        shift = shift.permute(0, 2, 1, 3, 4).reshape(Gb, Hkv, W * G * Sq, 1)
        p = torch.exp(scores - shift)
        pick = lambda t: t.view(Gb, Hkv, W, G, Sq, *t.shape[3:]).transpose(1, 2)[bucket.group, bucket.slot]  # noqa: E731
        denom = denom.index_add(0, bucket.seqs, pick(p.sum(-1, keepdim=True)).squeeze(-1))
        acc = acc.index_add(0, bucket.seqs, pick(p @ pv))

    out = acc / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    if sees_bad is not None:
        out = out.masked_fill(sees_bad[..., None], float("nan"))
    # padding queries give zeros (a select: their rows may be NaN when a visible key is)
    out = out.reshape(B, Hq, Sq, D).masked_fill(~valid[:, None, :, None], 0.0)
    return out.to(x.q.dtype)


def _clean_prefix(pk, pv, beyond):
    """Gathered prefixes ``[Gb, Hkv, P, D]`` with non-finite rows zeroed, and ``[Gb, Hkv, P]`` the
    visible ones among them (None when every row is finite). Rows past a task's length (the rest
    of its last block, or a longer task's rows in a bucket) are never seen, whatever they hold."""
    if all_finite(pk, pv):
        return pk, pv, None
    bad = nonfinite_rows(pk, pv)
    return zero_rows(pk, bad), zero_rows(pv, bad), bad & ~beyond[:, None, :]


# ---------------------------------------------------------------------------------------------
# Inference on the CPU: PyTorch's fused flash-attention kernel returns each part's log-sum-exp,
# so prefix and own parts run fused (no score matrices in memory) and merge in fp32. Its
# log-sum-exp output carries no gradient, hence this path serves calls that need none.
# Everything that depends only on the batch metadata is derived once per plan and reused by
# every layer that runs it.

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
HAS_CPU_FLASH = _FLASH_CPU is not None


def _fused_inference_applies(x: PrefixAttentionInputs) -> bool:
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x.q, x.k, x.v, x.prefix_k, x.prefix_v))
    return (_FLASH_CPU is not None and not needs_grad and x.q.device.type == "cpu"
            and x.q.dtype != torch.float64 and x.q.numel() > 0)   # the CPU flash kernel divides by Sq


def cpu_flash(q, k, v, scale, bias=None):
    """Fused attention over ``[N, H, M, D]`` queries: fp32 output and log-sum-exp ``[N, H, M]``."""
    # The CPU kernel reads rows as if the last dimension were dense: a strided one gives garbage.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return out, lse


@dataclass
class _PrefixPart:
    bucket: Bucket
    table: torch.Tensor                # [Gb, blocks] block indices of the bucket's prefixes
    bias: Optional[torch.Tensor]       # [Gb, 1, 1, P] -inf past a shorter prefix, or None
    span: Optional[Tuple[int, int]]    # batch rows start..stop already in group order, or None


@dataclass
class _OwnPlan:
    """What the own-key part needs (depends on the mask: per call when the call brings one)."""
    own_bias: Optional[torch.Tensor]   # [B, 1|Hkv, G*Sq, Skv] additive (0 / -inf), None when Skv == 0
    own_blind: Optional[torch.Tensor]  # [B, 1|Hkv, G*Sq] rows that see no own key, or None
    sees_nothing: Optional[torch.Tensor]   # [B, 1|Hkv, G*Sq] rows that see no key at all, or None


@dataclass
class _PrefixPlan:
    """What the prefix parts need (the metadata alone: once per plan)."""
    query_pad: Optional[torch.Tensor]      # [B, 1, Sq, 1] padding queries, None when every query is real
    prefixes: List[_PrefixPart]


def _span_of(bucket: Bucket, seqs: List[int], group_sizes: List[int]) -> Optional[Tuple[int, int]]:
    """(start, stop) when the bucket's rows are consecutive batch rows, group after group, all of
    the bucket's width: then stacking queries is a view instead of a scatter."""
    if not seqs or any(n != bucket.width for n in group_sizes):
        return None
    start = seqs[0]
    return (start, start + len(seqs)) if seqs == list(range(start, start + len(seqs))) else None


def _own_plan(x: PrefixAttentionInputs) -> _OwnPlan:
    B, Sq, Skv = x.batch, x.q_len, x.kv_len
    Hkv, G = x.num_kv_heads, x.group_size
    own_bias = own_blind = None
    sees = torch.zeros(B, 1, G * Sq, dtype=torch.bool)
    if Skv:
        visible = own_key_visibility(x)                                # [B, 1|Hq, Sq, Skv]
        if visible.shape[1] == 1:
            visible = visible.expand(B, G, Sq, Skv).reshape(B, 1, G * Sq, Skv)
        else:
            visible = visible.reshape(B, Hkv, G * Sq, Skv)
        own_bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
        sees = visible.any(-1)
        # The kernel gives rows that see nothing a log-sum-exp of 0; they must contribute nothing.
        own_blind = None if bool(sees.all()) else ~sees
    has_prefix = (x.prefix_lens[x.task_ids] > 0)[:, None, None]
    nothing = ~(sees | has_prefix)
    return _OwnPlan(own_bias=own_bias, own_blind=own_blind, sees_nothing=nothing if bool(nothing.any()) else None)


def _prefix_plan(x: PrefixAttentionInputs) -> _PrefixPlan:
    valid = query_valid(x)
    prefixes = []
    for bucket in task_buckets(x):
        blocks = -(-bucket.rows // x.block_size)
        table = x.block_table[bucket.tasks, :blocks].clamp_min(0)   # entries past a length may be -1
        bias = None
        if bool((bucket.lengths < bucket.rows).any()):
            beyond = torch.arange(bucket.rows)[None, :] >= bucket.lengths[:, None]
            bias = torch.zeros(bucket.tasks.shape[0], 1, 1, bucket.rows, dtype=torch.float32).masked_fill_(
                beyond[:, None, None, :], float("-inf"))
        seqs = bucket.seqs.tolist()
        sizes = torch.bincount(bucket.group, minlength=bucket.tasks.shape[0]).tolist()
        ordered = bucket.group.tolist() == sorted(bucket.group.tolist())
        prefixes.append(_PrefixPart(bucket, table, bias, _span_of(bucket, seqs, sizes) if ordered else None))
    return _PrefixPlan(query_pad=None if bool(valid.all()) else ~valid[:, None, :, None], prefixes=prefixes)


def merge_states(own_out, own_lse, pre_out, pre_lse):
    """Two attention states over disjoint keys -> one (fp32 log-sum-exp weighting). ``pre_lse`` is
    finite (a prefix row sees at least one key), so the shared maximum is finite too."""
    top = torch.maximum(own_lse, pre_lse)
    w_own, w_pre = torch.exp(own_lse - top), torch.exp(pre_lse - top)
    total = w_own + w_pre                                               # in [1, 2]
    merged = (own_out * w_own[..., None] + pre_out * w_pre[..., None]) / total[..., None]
    return merged, top + torch.log(total)


def fused_inference_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    # Optimistic: a non-finite key or value anywhere it is read (hidden or not) makes the output
    # non-finite (NaN + -inf bias, 0 * NaN), so checking the small output is enough to know that
    # nothing needs cleaning; only then are K/V scanned, zeroed and the affected rows flagged.
    out = _fused_inference(x, clean=False)
    return out if all_finite(out) else _fused_inference(x, clean=True)


def _stacked_queries(x: PrefixAttentionInputs):
    """What the fused inference and split-flash training paths share: the plan's own-key and prefix
    layouts (derived once per plan) and the queries in fp32, padding queries zeroed (whatever they
    hold reaches nothing), GQA heads of a kv head stacked into rows: ``[B, Hkv, G*Sq, D]``, K/V
    never repeated."""
    plan = derived(x, "fused_own", lambda: _own_plan(x), mask_dependent=True)
    pre = derived(x, "fused_prefix", lambda: _prefix_plan(x))
    q = x.q.to(torch.float32)
    if pre.query_pad is not None:
        q = q.masked_fill(pre.query_pad, 0.0)
    return plan, pre, q.reshape(x.batch, x.num_kv_heads, x.group_size * x.q_len, x.head_dim)


def _fused_inference(x: PrefixAttentionInputs, clean: bool) -> torch.Tensor:
    B, Hq, Sq, D = x.q.shape
    Hkv, G, Skv = x.num_kv_heads, x.group_size, x.kv_len
    M = G * Sq
    f32 = torch.float32
    plan, pre, q = _stacked_queries(x)
    sees_bad = None                       # [B, Hkv, M] queries that see a non-finite key or value
    if Skv:
        k, v = x.k.to(f32), x.v.to(f32)
        if clean and not all_finite(k, v):
            bad = nonfinite_rows(k, v)                                  # [B, Hkv, Skv]
            k, v = zero_rows(k, bad), zero_rows(v, bad)
            sees_bad = ((plan.own_bias == 0) & bad[:, :, None, :]).any(-1).expand(B, Hkv, M)
        out, lse = cpu_flash(q, k, v, x.scale, plan.own_bias)
        if plan.own_blind is not None:
            lse = lse.masked_fill(plan.own_blind, float("-inf"))
    else:
        out, lse = q.new_zeros(B, Hkv, M, D), q.new_full((B, Hkv, M), float("-inf"))
    for part in pre.prefixes:
        bucket = part.bucket
        Gb, W, P = bucket.tasks.shape[0], bucket.width, bucket.rows
        pk = read_prefixes(x.prefix_k, part.table, P).to(f32)
        pv = read_prefixes(x.prefix_v, part.table, P).to(f32)
        bad = None
        if clean:
            pk, pv, bad = _clean_prefix(pk, pv, torch.arange(P)[None, :] >= bucket.lengths[:, None])
        rows = q[part.span[0]: part.span[1]] if part.span else q[bucket.seqs]
        stacked = rows.view(Gb, W, Hkv, M, D) if part.span else _to_groups(rows, bucket)
        stacked = stacked.transpose(1, 2).reshape(Gb, Hkv, W * M, D)
        p_out, p_lse = cpu_flash(stacked, pk, pv, x.scale, part.bias)
        if bad is not None:                                             # a visible NaN stays visible
            p_out = p_out.masked_fill(bad.any(-1)[:, :, None, None], float("nan"))
        p_out = p_out.view(Gb, Hkv, W, M, D).transpose(1, 2)
        p_lse = p_lse.view(Gb, Hkv, W, M).transpose(1, 2)
        if part.span:
            start, stop = part.span
            merged, merged_lse = merge_states(out[start:stop], lse[start:stop],
                                        p_out.reshape(stop - start, Hkv, M, D), p_lse.reshape(stop - start, Hkv, M))
            out[start:stop] = merged
            lse[start:stop] = merged_lse
        else:
            pick = (bucket.group, bucket.slot)
            merged, merged_lse = merge_states(out[bucket.seqs], lse[bucket.seqs], p_out[pick], p_lse[pick])
            out = out.index_copy(0, bucket.seqs, merged)
            lse = lse.index_copy(0, bucket.seqs, merged_lse)
    if plan.sees_nothing is not None:
        out = out.masked_fill(plan.sees_nothing.expand(B, Hkv, M)[..., None], 0.0)
    if sees_bad is not None:
        out = out.masked_fill(sees_bad[..., None], float("nan"))
    out = out.reshape(B, Hq, Sq, D)
    if pre.query_pad is not None:
        out = out.masked_fill(pre.query_pad, 0.0)                      # padding queries give zeros
    return out.to(x.q.dtype)


def read_prefixes(pool: torch.Tensor, table: torch.Tensor, rows: int) -> torch.Tensor:
    """Prefixes read out of the block pool through ``table`` ``[Gb, blocks]``: ``[Gb, Hkv, rows, D]``."""
    Gb, n = table.shape
    g = pool.index_select(0, table.reshape(-1))                         # [Gb * blocks, Hkv, bs, D]
    _, Hkv, bs, D = g.shape
    return g.view(Gb, n, Hkv, bs, D).permute(0, 2, 1, 3, 4).reshape(Gb, Hkv, n * bs, D)[:, :, :rows]


# ---------------------------------------------------------------------------------------------
# Training on the CPU: the same fused per-part kernels with a custom backward (split_flash): no
# score matrix in memory in either direction, each task's prefix gradient summed by the kernel.

def _split_flash_applies(x: PrefixAttentionInputs) -> bool:
    return (HAS_SPLIT_FLASH and x.q.device.type == "cpu" and x.q.dtype != torch.float64
            and x.q.numel() > 0)


def _prefix_rows(part: _PrefixPart) -> Rows:
    b = part.bucket
    return Rows(seqs=b.seqs, group=b.group, slot=b.slot, groups=b.tasks.shape[0], width=b.width,
                start=part.span[0] if part.span else None)


def _train_layout(x: PrefixAttentionInputs) -> List[Tuple[Rows, Optional[int]]]:
    """Per prefix part: its rows, and the first block when the part is one task whose blocks are
    consecutive in the pool (its prefix is then a view of the pool, and its gradient a slice)."""
    out = []
    for part in derived(x, "fused_prefix", lambda: _prefix_plan(x)).prefixes:
        table = part.table.tolist()
        first = table[0][0] if len(table) == 1 and table[0] == list(range(table[0][0], table[0][0] + len(table[0]))) \
            else None
        out.append((_prefix_rows(part), first))
    return out


def _train_prefix(pool: torch.Tensor, part: _PrefixPart, first: Optional[int]) -> torch.Tensor:
    """``[Gb, Hkv, rows, D]`` of the part's tasks, read from the pool (a view when it can be)."""
    if first is None:
        return read_prefixes(pool, part.table, part.bucket.rows)
    n, (_, Hkv, bs, D) = part.table.shape[1], pool.shape
    return pool[first: first + n].permute(1, 0, 2, 3).reshape(1, Hkv, n * bs, D)[:, :, :part.bucket.rows]


def split_flash_training_attention(x: PrefixAttentionInputs) -> Optional[torch.Tensor]:
    """Differentiable prefix attention through :func:`split_flash_attention`; None when a key or
    value it reads, or the output, is not finite: the caller then takes the path that keeps hidden
    non-finite keys out of the result *and* out of the gradients (a NaN key that no query sees still
    turns its zero scores into NaN in the flash backward: 0 x NaN)."""
    B, Hq, Sq, D = x.q.shape
    f32 = torch.float32
    plan, pre, q = _stacked_queries(x)
    parts = []
    if x.kv_len:
        parts.append(KeyPart(x.k.to(f32), x.v.to(f32), plan.own_bias, blind=plan.own_blind))
    layout = derived(x, "train_layout", lambda: _train_layout(x))
    for part, (rows, first) in zip(pre.prefixes, layout):
        parts.append(KeyPart(_train_prefix(x.prefix_k, part, first).to(f32),
                             _train_prefix(x.prefix_v, part, first).to(f32), part.bias, rows))
    if not all_finite(*[t for part in parts for t in (part.k, part.v)]):
        return None
    out = split_flash_attention(q, parts, x.scale)
    if not all_finite(out):
        return None
    out = out.reshape(B, Hq, Sq, D)
    if pre.query_pad is not None:
        out = out.masked_fill(pre.query_pad, 0.0)                      # padding queries give zeros
    return out.to(x.q.dtype)
