"""Fused Triton prefix attention for training and prefill: forward + backward.

``prefill_attention(x)`` computes, for every sequence ``b`` of task ``t = task_ids[b]``,
``softmax(scale * q @ [prefix_k_t ; k_b]^T) @ [prefix_v_t ; v_b]`` under the visibility rule of
``kernels/masks.py`` — without ever copying a prefix into a sequence. Each task's prefix rows are
read *in place* from the block pools ``prefix_k / prefix_v [num_blocks, Hkv, block_size, D]``
through ``block_table[t]``.

Kernels (FlashAttention-2 structure, in the spirit of the Triton fused-attention tutorial; written
for this contract, not copied):

``_fwd_kernel``            one program per (sequence, q head, query tile). Loops over the task's
                           prefix rows (gathered through the block table, masked by
                           ``prefix_lens[t]``), then over the own-key tiles that can be visible
                           (bounds from ``kv_starts``, ``kv_lens``, causal offset and window, so
                           fully masked tiles are skipped). Online softmax in fp32 with ``exp2``;
                           writes O (dtype of q) and the row log-sum-exp (fp32, log2 units).
``_bwd_dq_kernel``         same tiling as the forward: dQ over prefix + own keys. No atomics.
``_bwd_dkdv_own_kernel``   one program per (sequence, kv head, own-key tile): loops over the GQA
                           group's q heads and the query tiles that can see the tile; dK, dV
                           accumulated in fp32 registers, written once. No atomics.
``_bwd_dkdv_prefix_kernel`` one program per (unit, kv head, prefix-row tile). Deterministic mode:
                           a unit is a *task*: the batch is grouped by task once per call on the
                           device (stable argsort of task_ids + bincount, no host sync) and the
                           program loops over every query tile of every sequence of that task, so
                           a task's prefix gradient is summed in fp32 registers and written once
                           (no atomics, bitwise reproducible). Few tasks x short prefixes give few
                           programs, so on CUDA each task's sequences are split into
                           ``prefix_splits`` chunks (auto: ~2 programs per SM); each chunk writes
                           fp32 partials to its own scratch slots and the chunks are summed in a
                           fixed order (still no atomics, still reproducible).
                           Atomics mode: a unit is a *sequence*; partial gradients are
                           ``tl.atomic_add``-ed into an fp32 pool-shaped buffer (most
                           parallelism, no scratch; summation order varies run to run).

The visibility rule, own-key band, online-softmax step and non-finite flags are the shared
``@triton.jit`` helpers of ``triton_common.py`` (also used by the decode kernels); each tensor's
strides reach a kernel as one tuple argument.

Default: the deterministic path. This was written without access to a GPU, so neither path's
speed has been measured (``benchmarks/gpu_prefill.py`` times both); we chose the path whose
results are reproducible. Set ``SOFTPROMPT_PREFILL_ATOMICS=1`` or pass ``deterministic=False`` to
use atomics; ``torch.use_deterministic_algorithms(True)`` always forces the deterministic path.

Shared blocks. The deterministic kernel writes a task's prefix gradient straight into the
gradient pool through that task's block table, which is race-free only if every block index is
used by at most one (task, position) among the tasks present in the batch. When a block index is
shared (by two tasks' tables, or twice in one table), the kernel instead writes each task's
gradient into a scratch buffer in logical ``[task, block slot]`` order and the slots are summed
into the pool with ``index_add_`` (exact on CPU; on CUDA ``index_add_`` uses atomics, so only
this rare configuration may lose bitwise reproducibility). This check costs one host sync per
backward call that needs prefix gradients.

Fallbacks to the ``torch`` backend (autograd there): an explicit ``attn_mask`` and float64 inputs.
Causal, per-sequence lengths and the sliding window always run in the kernels.

Bounds: every load and store is masked by the tensor extents (``Sq``, ``Skv``, ``D`` padded to a
power of two) and by the per-sequence lengths; block-table entries are only read for prefix rows
``< prefix_lens[t]`` (entries past a task's used blocks may be -1). Offsets are int64.

Tuning: ``PrefillConfig`` (``block_m``, ``block_n``, ``num_warps``, ``num_stages``,
``prefix_splits``). Defaults on CUDA: 64 x 64 tiles, 4 warps (8 for head_dim > 64), 2 stages;
untuned (no GPU was available; all four kernels were compiled for sm_90 offline and use wgmma
for fp16/bf16, ~255 registers per thread with small spills at head_dim 128). Under the Triton CPU
interpreter: 16 x 16 tiles so the tests stay fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import PrefixAttentionInputs
from .torch_backend import torch_attention
from .triton_common import (clean_values, flag_rows, flag_scores, online_softmax_step, own_key_band, seq_lens,
                            softmax_state, visible)

LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillConfig:
    """Tile sizes and launch parameters (all compile-time for the kernels)."""

    block_m: int = 64          # query rows per program tile
    block_n: int = 64          # key rows per inner-loop tile (prefix and own keys)
    num_warps: Optional[int] = None   # None: 4 for head_dim <= 64, 8 above (fp32 dK/dV tiles)
    num_stages: int = 2
    # Deterministic prefix backward: split each task's sequences into this many chunks, each a
    # program writing fp32 partials that are summed in a fixed order afterwards (None: on CUDA
    # enough chunks for ~2 programs per SM, on the CPU interpreter 1).
    prefix_splits: Optional[int] = None

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"PrefillConfig: `{name}` {val} is invalid; expected a power of two >= 16")
        if self.prefix_splits is not None and self.prefix_splits < 1:
            raise ValueError(f"PrefillConfig: `prefix_splits` {self.prefix_splits} is invalid; expected >= 1 or None")

    def warps(self, block_d: int) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return 8 if block_d >= 128 else 4


GPU_CONFIG = PrefillConfig()
INTERPRETER_CONFIG = PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, prefix_splits=1)


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_config(device: torch.device) -> PrefillConfig:
    return GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG


def atomics_requested() -> bool:
    return os.environ.get("SOFTPROMPT_PREFILL_ATOMICS", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _prefix_rows(bt_row, stride_btc, start, P, offs_n, PBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Physical (block, row-in-block) of logical prefix rows ``start + offs_n`` of one task.

    Returns ``(blk, within, valid)``; block-table entries are read only for rows ``< P``. When
    the block size is a multiple of the tile, ``blk`` is a scalar (the tile lies in one block).
    """
    rows = start + offs_n
    valid = rows < P
    if PBS % BLOCK_N == 0:
        # The whole tile lies in one block: one table read, contiguous rows.
        blk = tl.load(bt_row + (start // PBS) * stride_btc, mask=start < P, other=0).to(tl.int64)
        within = (start % PBS) + offs_n
    else:
        blk = tl.load(bt_row + (rows // PBS) * stride_btc, mask=valid, other=0).to(tl.int64)
        within = rows % PBS
    return blk, within, valid


@triton.jit
def _prefix_tile_ptrs(base, st, blk, within, hk, offs_d, PBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers ``[BLOCK_N, BLOCK_D]`` to rows ``within`` of blocks ``blk`` (head ``hk``) of a pool
    with strides ``st``."""
    if PBS % BLOCK_N == 0:
        # scalar 64-bit block base + 32-bit in-tile offsets (no per-element 64-bit arithmetic)
        return (base + blk * st[0] + hk * st[1]) + (within[:, None] * st[2] + offs_d[None, :] * st[3])
    else:
        return (base + hk * st[1]) + (blk * st[0] + within * st[2])[:, None] + offs_d[None, :] * st[3]


@triton.jit
def _rows_ptrs(base, st, b, h, offs, offs_d):
    """Pointers ``[len(offs), BLOCK_D]`` to rows ``offs`` of sequence ``b``, head ``h`` of a
    ``[B, H, S, D]`` tensor with strides ``st``."""
    return base + b * st[0] + h * st[1] + offs[:, None] * st[2] + offs_d[None, :] * st[3]


@triton.jit
def _clean_keys(k, v):
    """Key/value tiles ``[BLOCK_N, BLOCK_D]`` with non-finite elements zeroed (the backward: a key
    masked for a query may hold anything, and ``0 * NaN`` in ``dS @ k`` or ``dO @ v^T`` is NaN)."""
    return tl.where((k == k) & (tl.abs(k) != float("inf")), k, 0.0), clean_values(v)[0]


@triton.jit
def _query_tile(TIDS, QLENS, KVLENS, KVSTARTS, PLENS, Hq, D, window, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Set-up of a (sequence, q head, query tile) program of the forward / dQ grid, heaviest
    (last, causal) tiles first. Returns ``(pid_bh, b, h, hk, t, P, kv_len, kv_start, pos,
    offs_m, m_valid, offs_d, d_valid, p_end, lo, hi)``: ``pos`` the queries' absolute positions,
    ``[0, p_end)`` the prefix rows to scan (none for a tile of padding rows), ``[lo, hi)`` the
    band of own keys the tile can see (so fully masked key tiles are skipped)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    m_lo = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = pid_bh // Hq
    h = pid_bh % Hq
    t = tl.load(TIDS + b)
    P = tl.load(PLENS + t).to(tl.int32)
    q_len, kv_len, kv_start = seq_lens(QLENS, KVLENS, KVSTARTS, b)
    off = kv_len - q_len                      # absolute position of query i is off + i
    lo, hi = own_key_band(kv_start, kv_len, off, m_lo, tl.minimum(m_lo + BLOCK_M, q_len), window,
                          CAUSAL, HAS_WINDOW)
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return (pid_bh, b, h, h // GROUP, t, P, kv_len, kv_start, off + offs_m, offs_m, offs_m < q_len,
            offs_d, offs_d < D, tl.where(m_lo < q_len, P, 0), lo, hi)


@triton.jit
def _load_prefix_kv(PK, PV, spk, spv, bt_row, sbt1, start, P, hk, offs_d, d_valid,
                    PBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key and value tiles of the task's prefix rows ``[start, start + BLOCK_N)``, read in place
    through the block table (rows ``>= P`` are zeros), and ``[BLOCK_N]`` the rows ``< P``."""
    blk, within, r_valid = _prefix_rows(bt_row, sbt1, start, P, tl.arange(0, BLOCK_N), PBS, BLOCK_N)
    kv_mask = r_valid[:, None] & d_valid[None, :]
    k = tl.load(_prefix_tile_ptrs(PK, spk, blk, within, hk, offs_d, PBS, BLOCK_N), mask=kv_mask, other=0.0)
    v = tl.load(_prefix_tile_ptrs(PV, spv, blk, within, hk, offs_d, PBS, BLOCK_N), mask=kv_mask, other=0.0)
    return k, v, r_valid


@triton.jit
def _load_own_kv(K, V, sk, sv, b, hk, offs_j, kv_start, kv_len, offs_d, d_valid):
    """Key and value tiles of own keys ``offs_j`` of sequence ``b`` (keys outside
    ``[kv_start, kv_len)`` are never read: zeros), and ``[BLOCK_N]`` the keys inside."""
    j_valid = (offs_j < kv_len) & (offs_j >= kv_start)
    kv_mask = j_valid[:, None] & d_valid[None, :]
    k = tl.load(_rows_ptrs(K, sk, b, hk, offs_j, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_rows_ptrs(V, sv, b, hk, offs_j, offs_d), mask=kv_mask, other=0.0)
    return k, v, j_valid


@triton.jit
def _dq_step(q, k, v, do, vis, lse, delta, dq, qk_scale, DOT_PREC: tl.constexpr):
    """dQ of one query tile accumulated over one key tile (``vis``: the visible pairs)."""
    s = tl.where(vis, tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


# Kernel arguments: tensors, then their strides (one tuple per tensor, in the same order), then
# scalars, then compile-time constants.

@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, BT, PLENS, TIDS, QLENS, KVLENS, KVSTARTS, O, LSE,
    sq, sk, sv, spk, spv, sbt, so,
    Hq, Sq, D, qk_scale, window,
    GROUP: tl.constexpr, PBS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """O and the row log-sum-exp of one query tile: online softmax over the task's prefix, then
    over the own keys it can see."""
    (pid_bh, b, h, hk, t, P, kv_len, kv_start, pos, offs_m, m_valid, offs_d, d_valid,
     p_end, lo, hi) = _query_tile(TIDS, QLENS, KVLENS, KVSTARTS, PLENS, Hq, D, window,
                                  GROUP, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_D)
    q = tl.load(_rows_ptrs(Q, sq, b, h, offs_m, offs_d), mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    m_i, l_i, acc, poison = softmax_state(BLOCK_M, BLOCK_D)   # poison: rows that see a non-finite key or value

    # 1) the task's prefix, read in place through the block table; no causal/padding rule on it.
    for start in range(0, p_end, BLOCK_N):
        k, v, r_valid = _load_prefix_kv(PK, PV, spk, spv, BT + t * sbt[0], sbt[1], start, P, hk, offs_d,
                                        d_valid, PBS, BLOCK_N)
        # every prefix row < P is seen by every real query: a NaN value reaches them through a
        # non-zero probability, and padding rows are zeroed at the end
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s, poison = flag_scores(s, m_valid[:, None] & r_valid[None, :], poison)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)

    # 2) own keys: only tiles that intersect the visible band of this query tile.
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        k, v, j_valid = _load_own_kv(K, V, sk, sv, b, hk, offs_j, kv_start, kv_len, offs_d, d_valid)
        v, bad = clean_values(v)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        vis = visible(m_valid[:, None] & j_valid[None, :], pos[:, None], offs_j[None, :], window,
                      CAUSAL, HAS_WINDOW)
        s, poison = flag_scores(s, vis, flag_rows(poison, vis & bad[None, :]))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)   # rows that saw nothing: zeros
    out = tl.where(poison[:, None] > 0, float("nan"), out)   # a visible NaN stays visible
    # +inf for rows that see nothing, so exp2(s - lse) is 0 in the backward; also for rows made
    # NaN above: a constant NaN, nothing flows back through it (as a masked_fill would do).
    lse = tl.where(seen & (poison == 0), m_i + tl.log2(l_safe), float("inf"))
    row_ok = offs_m < Sq
    tl.store(_rows_ptrs(O, so, b, h, offs_m, offs_d), out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh * Sq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, so, sdo, Hq, Sq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Delta = rowsum(O * dO)`` in fp32 (the softmax-backward correction), without fp32 copies."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b = pid_bh // Hq
    h = pid_bh % Hq
    mask = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(_rows_ptrs(O, so, b, h, offs_m, offs_d), mask=mask, other=0.0)
    do = tl.load(_rows_ptrs(DO, sdo, b, h, offs_m, offs_d), mask=mask, other=0.0)
    o = o.to(tl.float32)
    # rows the forward made NaN (they see a non-finite key) have no gradient: a finite Delta keeps
    # their zero probabilities (lse = +inf) from turning into 0 * NaN
    delta = tl.sum(tl.where(o == o, o, 0.0) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, BT, PLENS, TIDS, QLENS, KVLENS, KVSTARTS, DO, LSE, DELTA, DQ,
    sq, sk, sv, spk, spv, sbt, sdo, sdq,
    Hq, Sq, D, qk_scale, scale, window,
    GROUP: tl.constexpr, PBS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dQ of one query tile (same tiling as the forward), over the prefix and the visible own
    keys. No atomics."""
    (pid_bh, b, h, hk, t, P, kv_len, kv_start, pos, offs_m, m_valid, offs_d, d_valid,
     p_end, lo, hi) = _query_tile(TIDS, QLENS, KVLENS, KVSTARTS, PLENS, Hq, D, window,
                                  GROUP, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_D)
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(_rows_ptrs(Q, sq, b, h, offs_m, offs_d), mask=qd_mask, other=0.0)
    do = tl.load(_rows_ptrs(DO, sdo, b, h, offs_m, offs_d), mask=qd_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * Sq + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Sq + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start in range(0, p_end, BLOCK_N):
        k, v, r_valid = _load_prefix_kv(PK, PV, spk, spv, BT + t * sbt[0], sbt[1], start, P, hk, offs_d,
                                        d_valid, PBS, BLOCK_N)
        dq = _dq_step(q, k, v, do, m_valid[:, None] & r_valid[None, :], lse, delta, dq, qk_scale, DOT_PREC)

    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        k, v, j_valid = _load_own_kv(K, V, sk, sv, b, hk, offs_j, kv_start, kv_len, offs_d, d_valid)
        k, v = _clean_keys(k, v)
        vis = visible(m_valid[:, None] & j_valid[None, :], pos[:, None], offs_j[None, :], window,
                      CAUSAL, HAS_WINDOW)
        dq = _dq_step(q, k, v, do, vis, lse, delta, dq, qk_scale, DOT_PREC)

    dq = dq * scale
    row_ok = offs_m < Sq
    tl.store(_rows_ptrs(DQ, sdq, b, h, offs_m, offs_d), dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_valid[None, :])


@triton.jit
def _bwd_kv_tile_step(k, v, dk, dv, Q, DO, sq, sdo, LSE, DELTA, b, h, q_len, m_start, key_vis, offs_m0, offs_d,
                      d_valid, qk_scale, pos_off, offs_j, window,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile against one query tile (transposed scores [N, M]).
    Prefix keys pass ``CAUSAL = HAS_WINDOW = False``: every real query sees them."""
    offs_m = m_start + offs_m0
    m_valid = offs_m < q_len
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(_rows_ptrs(Q, sq, b, h, offs_m, offs_d), mask=qd_mask, other=0.0)
    do = tl.load(_rows_ptrs(DO, sdo, b, h, offs_m, offs_d), mask=qd_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=m_valid, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale      # [N, M]
    vis = visible(key_vis[:, None] & m_valid[None, :], (pos_off + offs_m)[None, :], offs_j[:, None], window,
                  CAUSAL, HAS_WINDOW)
    sT = tl.where(vis, sT, float("-inf"))
    pT = tl.exp2(sT - lse[None, :])
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_own_kernel(
    Q, K, V, QLENS, KVLENS, KVSTARTS, DO, LSE, DELTA, DK, DV,
    sq, sk, sv, sdo, sdk, sdv,
    Hq, Hkv, Sq, Skv, D, qk_scale, scale, window,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dK, dV of one own-key tile of one kv head: loops over the GROUP q heads and the query
    tiles that can see the tile; accumulated in fp32 registers, written once. No atomics."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    q_len, kv_len, kv_start = seq_lens(QLENS, KVLENS, KVSTARTS, b)
    off = kv_len - q_len

    n_lo = pid_n * BLOCK_N
    offs_j = n_lo + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    k, v, key_vis = _load_own_kv(K, V, sk, sv, b, hk, offs_j, kv_start, kv_len, offs_d, d_valid)
    k, v = _clean_keys(k, v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Visible keys of this tile: [j_lo, j_hi); queries that can see any of them: [q_lo, q_hi).
    j_lo = tl.maximum(n_lo, kv_start)
    j_hi = tl.minimum(n_lo + BLOCK_N, kv_len)
    q_lo = 0
    q_hi = q_len
    if CAUSAL:
        q_lo = tl.maximum(j_lo - off, 0)
    if HAS_WINDOW:
        q_hi = tl.minimum(q_hi, j_hi - 1 - off + window)
    q_hi = tl.where(j_lo < j_hi, q_hi, 0)
    q_lo = tl.minimum(q_lo, tl.maximum(q_hi, 0))
    for g in range(GROUP):
        h = hk * GROUP + g
        row = b * Hq + h
        for m_start in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
            dk, dv = _bwd_kv_tile_step(k, v, dk, dv, Q, DO, sq, sdo, LSE + row * Sq, DELTA + row * Sq, b, h,
                                       q_len, m_start, key_vis, offs_m0, offs_d, d_valid, qk_scale,
                                       off, offs_j, window, CAUSAL, HAS_WINDOW, DOT_PREC)
    dk = dk * scale
    st_mask = (offs_j < Skv)[:, None] & d_valid[None, :]
    tl.store(_rows_ptrs(DK, sdk, b, hk, offs_j, offs_d), dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(_rows_ptrs(DV, sdv, b, hk, offs_j, offs_d), dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _bwd_dkdv_prefix_kernel(
    Q, PK, PV, BT, OUT_BT, PLENS, QLENS, ORDER, UNIT_TASK, UNIT_START, UNIT_COUNT,
    DO, LSE, DELTA, DPK, DPV,
    sq, spk, spv, sbt, sobt, sdo, sgk, sgv,
    Hq, Hkv, Sq, D, qk_scale, scale,
    GROUP: tl.constexpr, PBS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dK/dV of one tile of prefix rows of one task, summed over the sequences of one unit.

    A unit is task ``UNIT_TASK[u]`` and its sequences ``ORDER[UNIT_START[u] : + UNIT_COUNT[u]]``.
    Deterministic mode: a unit is a whole task (or a fixed chunk of its sequences, written to
    scratch slots and summed afterwards); the result is stored once through row u of OUT_BT.
    Atomics mode: a unit is one sequence; the result is atomically added.
    """
    pid_u = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    hk = tl.program_id(2).to(tl.int64)
    t = tl.load(UNIT_TASK + pid_u)
    first = tl.load(UNIT_START + pid_u)
    count = tl.load(UNIT_COUNT + pid_u).to(tl.int32)
    P = tl.load(PLENS + t).to(tl.int32)
    n_lo = pid_n * BLOCK_N
    live = (n_lo < P) & (count > 0)

    offs_n = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    k, v, r_valid = _load_prefix_kv(PK, PV, spk, spv, BT + t * sbt[0], sbt[1], n_lo, P, hk, offs_d, d_valid,
                                    PBS, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    n_seq = tl.where(live, count, 0)
    for si in range(0, n_seq):
        b = tl.load(ORDER + first + si)
        q_len = tl.load(QLENS + b).to(tl.int32)
        for g in range(GROUP):
            h = hk * GROUP + g
            row = b * Hq + h
            for m_start in range(0, q_len, BLOCK_M):
                dk, dv = _bwd_kv_tile_step(k, v, dk, dv, Q, DO, sq, sdo, LSE + row * Sq, DELTA + row * Sq, b, h,
                                           q_len, m_start, r_valid, offs_m0, offs_d, d_valid, qk_scale,
                                           0, offs_n, 0, False, False, DOT_PREC)
    dk = dk * scale
    # Where this unit's rows go: row ``pid_u`` of OUT_BT (the pool table, or scratch slots).
    oblk, owithin, _ = _prefix_rows(OUT_BT + pid_u * sobt[0], sobt[1], n_lo, P, offs_n, PBS, BLOCK_N)
    # Rows this program owns, or none when the task is absent from the batch (count 0).
    st_mask = ((n_lo + offs_n) < tl.where(live, P, 0))[:, None] & d_valid[None, :]
    gk = _prefix_tile_ptrs(DPK, sgk, oblk, owithin, hk, offs_d, PBS, BLOCK_N)
    gv = _prefix_tile_ptrs(DPV, sgv, oblk, owithin, hk, offs_d, PBS, BLOCK_N)
    if ATOMIC:
        tl.atomic_add(gk, dk, mask=st_mask)
        tl.atomic_add(gv, dv, mask=st_mask)
    else:
        tl.store(gk, dk.to(DPK.dtype.element_ty), mask=st_mask)
        tl.store(gv, dv.to(DPV.dtype.element_ty), mask=st_mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _strides(t: torch.Tensor):
    """A tensor's strides as one kernel argument (a tuple; Triton specialises each element)."""
    return tuple(t.stride())


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Per-sequence tensors (q, k, v, dO) get a contiguous copy if rows are not unit-stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _nonnull(t: torch.Tensor) -> torch.Tensor:
    """A zero-size tensor is passed as a 1-element stand-in (never read: every access is masked),
    so no kernel argument is a null pointer (older Triton launchers reject those)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _dot_precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 inputs: full-precision products (no TF32) so fp32 results match the reference;
    # fp16/bf16: the backend's default (the setting only matters for fp32 operands).
    return "ieee" if dtype == torch.float32 else None


class _Meta:
    """Non-tensor arguments of one call, carried from forward to backward."""

    def __init__(self, x: PrefixAttentionInputs, config: PrefillConfig, deterministic: bool):
        self.causal = x.causal
        self.scale = x.scale
        self.window = x.window
        self.config = config
        self.deterministic = deterministic


def _forward(q, k, v, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, meta: _Meta):
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    cfg = meta.config
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    grid = (B * Hq, triton.cdiv(Sq, cfg.block_m))
    _fwd_kernel[grid](
        q, _nonnull(k), _nonnull(v), _nonnull(pk), _nonnull(pv), _nonnull(bt), plens, tids, qlens, kvlens,
        kvstarts, out, lse,
        _strides(q), _strides(k), _strides(v), _strides(pk), _strides(pv), _strides(bt),
        _strides(out),
        Hq, Sq, D, meta.scale * LOG2E, meta.window or 0,
        GROUP=Hq // Hkv, PBS=pk.shape[2], CAUSAL=meta.causal, HAS_WINDOW=meta.window is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D), DOT_PREC=_dot_precision(q.dtype),
        num_warps=cfg.warps(_block_d(D)), num_stages=cfg.num_stages,
    )
    return out, lse


def _shared_blocks(bt, plens, counts, block_size) -> bool:
    """True if a block index is used at two (task, slot) places among tasks present in the batch."""
    T, max_blocks = bt.shape
    used = (torch.arange(max_blocks, device=bt.device)[None, :] * block_size < plens[:, None]) & (counts > 0)[:, None]
    ids = bt[used]
    if ids.numel() < 2:
        return False
    return bool(torch.unique(ids).numel() != ids.numel())


def _backward(do, q, k, v, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, out, lse, meta: _Meta,
              needs):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cfg = meta.config
    dev = q.device
    BLOCK_D = _block_d(D)
    prec = _dot_precision(q.dtype)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=BLOCK_D, DOT_PREC=prec,
                  num_warps=cfg.warps(BLOCK_D), num_stages=cfg.num_stages)
    qk_scale = meta.scale * LOG2E
    window = meta.window or 0
    has_window = meta.window is not None
    need_q, need_k, need_v, need_pk, need_pv = needs

    do = _last_dim_contiguous(do)
    # Delta_i = rowsum(dO_i * O_i) (fp32), the softmax-backward correction term.
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    if delta.numel():
        _bwd_preprocess_kernel[(B * Hq, triton.cdiv(Sq, cfg.block_m))](
            out, do, delta, _strides(out), _strides(do), Hq, Sq, D,
            BLOCK_M=cfg.block_m, BLOCK_D=BLOCK_D, num_warps=cfg.warps(BLOCK_D), num_stages=1)

    dq = dk = dv = dpk = dpv = None
    work = B * Hq * Sq > 0
    if need_q:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        if work and dq.numel():
            _bwd_dq_kernel[(B * Hq, triton.cdiv(Sq, cfg.block_m))](
                q, _nonnull(k), _nonnull(v), _nonnull(pk), _nonnull(pv), _nonnull(bt), plens, tids, qlens,
                kvlens, kvstarts, do, lse, delta, dq,
                _strides(q), _strides(k), _strides(v), _strides(pk), _strides(pv), _strides(bt),
                _strides(do), _strides(dq),
                Hq, Sq, D, qk_scale, meta.scale, window,
                GROUP=G, PBS=pk.shape[2], CAUSAL=meta.causal, HAS_WINDOW=has_window, **common)
    if need_k or need_v:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        if dk.numel():
            if work:
                _bwd_dkdv_own_kernel[(B * Hkv, triton.cdiv(Skv, cfg.block_n))](
                    q, k, v, qlens, kvlens, kvstarts, do, lse, delta, dk, dv,
                    _strides(q), _strides(k), _strides(v), _strides(do), _strides(dk), _strides(dv),
                    Hq, Hkv, Sq, Skv, D, qk_scale, meta.scale, window,
                    GROUP=G, CAUSAL=meta.causal, HAS_WINDOW=has_window, **common)
            else:
                dk.zero_()
                dv.zero_()
    if need_pk or need_pv:
        dpk, dpv = _prefix_grads(q, pk, pv, bt, plens, tids, qlens, do, lse, delta, meta, common)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            dpk if need_pk else None, dpv if need_pv else None)


def _prefix_splits(cfg: PrefillConfig, dev: torch.device, B: int, T: int, row_tiles: int, Hkv: int,
                   slot_bytes: int) -> int:
    """Chunks per task for the deterministic prefix backward (host arithmetic only, no sync)."""
    if cfg.prefix_splits is not None:
        n = cfg.prefix_splits
    elif dev.type != "cuda":
        n = 1
    else:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        n = -(-2 * sms // max(1, T * row_tiles * Hkv))
    # Never more chunks than sequences; scratch (T * n slots) capped at ~256 MiB.
    cap = max(1, (256 << 20) // max(1, T * slot_bytes))
    return max(1, min(n, B, cap))


def _prefix_grads(q, pk, pv, bt, plens, tids, qlens, do, lse, delta, meta: _Meta, common):
    B, Hq, Sq, D = q.shape
    num_blocks, Hkv, PBS, _ = pk.shape
    T, max_blocks = bt.shape
    dev = q.device
    rows_tiles = triton.cdiv(max_blocks * PBS, meta.config.block_n)
    dpk = torch.zeros(pk.shape, dtype=pk.dtype, device=dev)
    dpv = torch.zeros(pv.shape, dtype=pv.dtype, device=dev)
    if B == 0 or Sq == 0 or T == 0 or rows_tiles == 0 or dpk.numel() == 0:
        return dpk, dpv

    def launch(order, unit_task, unit_start, unit_count, out_bt, gk, gv, atomic):
        _bwd_dkdv_prefix_kernel[(unit_task.shape[0], rows_tiles, Hkv)](
            q, pk, pv, bt, out_bt, plens, qlens, order, unit_task, unit_start, unit_count,
            do, lse, delta, gk, gv,
            _strides(q), _strides(pk), _strides(pv), _strides(bt), _strides(out_bt),
            _strides(do), _strides(gk), _strides(gv),
            Hq, Hkv, Sq, D, meta.scale * LOG2E, meta.scale,
            GROUP=Hq // Hkv, PBS=PBS, ATOMIC=atomic, **common)

    if not meta.deterministic:
        # One unit per sequence; partial sums meet in an fp32 buffer through atomics. The output
        # table is the tiny index gather bt[task_ids] (block ids only, never prefix data).
        seqs = torch.arange(B, device=dev, dtype=torch.int64)
        gk = torch.zeros(pk.shape, dtype=torch.float32, device=dev)
        gv = torch.zeros(pv.shape, dtype=torch.float32, device=dev)
        launch(seqs, tids, seqs, torch.ones_like(seqs), bt[tids], gk, gv, True)
        return gk.to(pk.dtype), gv.to(pv.dtype)

    # Group the batch by task once, on the device: the sequences of task t are
    # order[starts[t] : starts[t] + counts[t]].
    order = torch.argsort(tids, stable=True)
    counts = torch.bincount(tids, minlength=T)
    starts = torch.cumsum(counts, 0) - counts
    tasks = torch.arange(T, device=dev, dtype=torch.int64)
    slot_bytes = max_blocks * Hkv * PBS * D * 4
    n_split = _prefix_splits(meta.config, dev, B, T, rows_tiles, Hkv, slot_bytes)
    shared = _shared_blocks(bt, plens, counts, PBS)
    if n_split == 1 and not shared:
        # Each task's gradient summed in registers and stored once, straight into the pool.
        launch(order, tasks, starts, counts, bt, dpk, dpv, False)
        return dpk, dpv

    # Units = (task, chunk): chunk c of task t holds its sequences [c*per, (c+1)*per). Each unit
    # writes fp32 partials to its own scratch slots (logical block order); the chunks are then
    # summed in a fixed order, and the slots moved into the pool through the block table.
    per = (counts + n_split - 1) // n_split
    chunk = torch.arange(n_split, device=dev, dtype=torch.int64)
    unit_start = (starts[:, None] + chunk[None, :] * per[:, None]).reshape(-1)
    unit_count = torch.minimum((counts[:, None] - chunk[None, :] * per[:, None]).clamp_min(0),
                               per[:, None]).reshape(-1)
    unit_task = tasks.repeat_interleave(n_split)
    U = T * n_split
    slots = torch.arange(U * max_blocks, device=dev, dtype=torch.int64).view(U, max_blocks)
    gk = torch.zeros((U * max_blocks, Hkv, PBS, D), dtype=torch.float32, device=dev)
    gv = torch.zeros_like(gk)
    launch(order, unit_task, unit_start, unit_count, slots, gk, gv, False)
    gk = gk.view(T, n_split, max_blocks, Hkv, PBS, D).sum(1).view(T * max_blocks, Hkv, PBS, D)
    gv = gv.view(T, n_split, max_blocks, Hkv, PBS, D).sum(1).view(T * max_blocks, Hkv, PBS, D)
    used = ((torch.arange(max_blocks, device=dev)[None, :] * PBS < plens[:, None])
            & (counts > 0)[:, None]).reshape(-1)
    dest = bt.reshape(-1)[used]
    if not shared:
        # Every used block has exactly one source slot: a plain (deterministic) scatter.
        dpk[dest] = gk[used].to(pk.dtype)
        dpv[dest] = gv[used].to(pv.dtype)
        return dpk, dpv
    # A block index is used at several (task, slot) places: sum them (index_add_ uses atomics
    # on CUDA, so only this configuration may not be bitwise reproducible there).
    acc_k = torch.zeros(pk.shape, dtype=torch.float32, device=dev).index_add_(0, dest, gk[used])
    acc_v = torch.zeros(pv.shape, dtype=torch.float32, device=dev).index_add_(0, dest, gv[used])
    return acc_k.to(pk.dtype), acc_v.to(pv.dtype)


class _PrefillAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, meta):
        q_c, k_c, v_c = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        out, lse = _forward(q_c, k_c, v_c, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, meta)
        ctx.save_for_backward(q_c, k_c, v_c, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, out, lse)
        ctx.meta = meta
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        grads = _backward(do, q, k, v, pk, pv, bt, plens, tids, qlens, kvlens, kvstarts, out, lse,
                          ctx.meta, needs)
        return (*grads, None, None, None, None, None, None, None)


def kernel_unsupported_reason(x: PrefixAttentionInputs) -> Optional[str]:
    """Why this call is served by the torch backend instead of the kernels (None: kernels run)."""
    if x.attn_mask is not None:
        return "an explicit attn_mask is served by the torch backend"
    if x.q.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.q.dtype} is served by the torch backend (kernels: fp16, bf16, fp32)"
    return None


def prefill_attention(x: PrefixAttentionInputs, *, deterministic: Optional[bool] = None,
                      config: Optional[PrefillConfig] = None) -> torch.Tensor:
    """Fused prefix attention (forward + autograd backward) on validated inputs.

    Args:
        x: validated inputs (``kernels.validate_inputs``).
        deterministic: prefix-gradient reduction without atomics (default True unless
            ``SOFTPROMPT_PREFILL_ATOMICS=1``; always True under
            ``torch.use_deterministic_algorithms(True)``).
        config: tile sizes / launch parameters; default per device (see ``default_config``).

    Returns:
        ``[B, Hq, Sq, D]`` in the dtype of ``q``.
    """
    if kernel_unsupported_reason(x) is not None:
        return torch_attention(x)
    dev = x.q.device
    if dev.type == "cpu" and not _interpreter_enabled():
        raise ValueError("prefill_attention: tensors on cpu need the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    if deterministic is None:
        deterministic = not atomics_requested()
    if torch.are_deterministic_algorithms_enabled():
        deterministic = True
    meta = _Meta(x, config or default_config(dev), deterministic)
    return _PrefillAttention.apply(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.block_table, x.prefix_lens,
                                   x.task_ids, x.q_lens, x.kv_lens, x.kv_starts, meta)


__all__ = ["prefill_attention", "PrefillConfig", "default_config", "kernel_unsupported_reason",
           "GPU_CONFIG", "INTERPRETER_CONFIG"]
