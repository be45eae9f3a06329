"""Mixed-task decode kernels of the ``triton`` backend: few queries per sequence, many sequences.

``decode_attention(x)`` serves calls with ``Sq <= 16`` and no gradient (the dispatcher in
``triton_backend.py`` routes them here). Every query sees its task's whole prefix (read in place
through ``block_table``) and its own keys under the causal / length / window rule of the contract.

Two paths, both exact (checked against ``reference`` in ``tests/test_triton_decode.py``):

``grouped`` (shared-prefix / cascade form; FlashInfer cascade, Hydragen, ChunkAttention)
    1. *Prefix phase* (``_grouped_prefix_kernel``): the batch is grouped by task on the device
       with no host sync (one stable ``torch.sort`` of the task ids, then ``_group_setup_kernel``,
       a single program that binary-searches each task's range and running-sums its query tiles:
       counts / offsets in one launch instead of bincount + cumsum + ...). One program per (tile of a task's
       stacked queries, kv head, prefix split) stacks ``sequences x GQA heads x Sq`` query rows
       of one task into a ``BLOCK_M``-row tile and runs a matrix-matrix online softmax over the
       task's prefix blocks, so each prefix block is loaded once per (task, query tile) instead of
       once per sequence. Tiles of all tasks are laid out CSR-style in one flat grid axis whose
       size is a shape-only upper bound (``cdiv(B*G*Sq, BLOCK_M) + min(T, B)``); each program finds
       its task by a binary search over the tasks' running tile counts; surplus programs do nothing.
    2. *Own phase* (``_sequence_kernel`` with ``INCLUDE_PREFIX=False``): per (sequence, kv head,
       KV split), the G query heads x Sq queries of the sequence are stacked in one tile and its own
       cache is scanned (split-K / flash-decoding when the grid would otherwise be small).
    3. *Merge*: every phase writes a normalised fp32 partial output plus its fp32 log2-sum-exp.
       When the own phase is not split, the own kernel merges the prefix partials in registers and
       writes the final output itself (no extra launch); otherwise ``_merge_kernel`` combines all
       partial states in fp32. Nothing is rounded to fp16/bf16 before the final store.

``per_sequence`` (plain flash-decoding over ``[prefix ; own]``)
    ``_sequence_kernel`` with ``INCLUDE_PREFIX=True``: each program reads its own sequence's
    prefix through the block table and then its own cache, in one virtual key range split over
    KV; a single split writes the output directly, several are merged by ``_merge_kernel``.

The visibility rule, own-key band and online-softmax step are the shared ``@triton.jit`` helpers
of ``triton_common.py`` (also used by the prefill kernels).

Own keys are dense ``[B, Hkv, Skv, D]`` or paged (``decode_attention(x, own_pages=...)``):
token-major page pools ``[num_pages, page_size, Hkv, D]`` read in place through the per-row page
table by ``_sequence_kernel`` (``OWN_PAGED``); the prefix phase never touches own keys.

Choosing the path: :func:`choose_path`. Grouping pays when tasks have several sequences each:
the grouped path is taken when the batch has on average at least ``GROUP_MIN_SEQS`` (2)
sequences per task present in the batch and some prefix can be non-empty. ``B >= 2*T`` decides
it from shapes alone; otherwise the number of tasks present is counted on the device and read
back (one small host sync of a single int). Force a path with ``decode_attention(x, path=...)``
or the environment variable ``SOFTPROMPT_DECODE_PATH=grouped|per_sequence`` (``auto`` default).

Host syncs: none in the kernels' setup apart from the heuristic's one int above (and none when
the path is forced or ``B >= 2*T``). Grid sizes come from shapes: the prefix bound is
``max_blocks * block_size``, the own bound is ``Skv``; programs past a sequence's real length do
no work and write an empty state.

Launches per call: grouped = ``torch.sort`` + setup + prefix + own (+ merge when the own phase
is split); per_sequence = one kernel (+ merge when split).

Limitations: float64 inputs are computed by the no-copy ``torch`` backend (no fp64 ``tl.dot``
path here); ``head_dim`` up to 256; ``attn_mask`` is not supported here (the dispatcher never
sends it). Status: correctness is tested on the CPU interpreter (fp32/fp16) and every GPU launch
configuration compiles for sm_90 without spills for 16-bit inputs
(``benchmarks/gpu_decode.py --compile-check``); speed on a GPU has not been measured yet
(``benchmarks/gpu_decode.py``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import PrefixAttentionInputs
from .triton_backend import OwnPages
from .triton_common import (clean_values, flag_rows, flag_scores, online_softmax_step, own_key_band, seq_lens,
                            softmax_state, visible)

LOG2E = 1.4426950408889634
GROUP_MIN_SEQS = 2          # mean sequences per present task from which grouping pays
MAX_HEAD_DIM = 256
PATHS = ("auto", "grouped", "per_sequence")
ENV_PATH = "SOFTPROMPT_DECODE_PATH"
ENV_OVERLAP = "SOFTPROMPT_DECODE_OVERLAP"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _online_step(q, k, v, vis, m_i, l_i, acc, poison, qk_scale, PREC: tl.constexpr):
    """One key tile of the online softmax. ``k`` is ``[BLOCK_D, BLOCK_N]``, ``v`` ``[BLOCK_N, BLOCK_D]``,
    ``vis`` the visible (row, key) pairs; see ``triton_common.flag_scores`` for non-finite keys
    (a visible NaN value needs no flag: it reaches ``acc`` through a non-zero probability)."""
    s, poison = flag_scores(tl.dot(q, k, input_precision=PREC) * qk_scale, vis, poison)
    m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PREC)
    return m_i, l_i, acc, poison


@triton.jit
def _store_partial(PO, PL, slot, D, offs_d, rmask, dmask, m_i, l_i, acc, poison):
    """Store the state of rows ``slot`` into the partial buffers: the normalised fp32 partial output
    (``PO``) and its log2-sum-exp (``PL``). An empty state is ``(0, -inf)``; a poisoned one
    ``(NaN, 0)``: a finite log-sum-exp, so every merge keeps it NaN."""
    has = l_i > 0
    flagged = poison > 0
    o = tl.where(flagged[:, None], float("nan"), acc / tl.where(has, l_i, 1.0)[:, None])
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(PL + slot, tl.where(flagged, 0.0, lse), mask=rmask)
    tl.store(PO + slot[:, None] * D + offs_d[None, :], o, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _prefix_tile(q, PK, PV, BT, bt_row, start, end, h,
                 s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd, s_bt1,
                 block_size, rvalid, offs_d, dmask, m_i, l_i, acc, poison, qk_scale,
                 BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of the query tile over prefix rows ``[start, end)`` read through the table
    (every one visible to every real row: nothing to clean; ``poison`` flags non-finite keys)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        nmask = n < end
        blk = tl.load(BT + bt_row + (n // block_size).to(tl.int64) * s_bt1, mask=nmask, other=0)
        row = (n % block_size).to(tl.int64)
        k_off = blk * s_pkb + h * s_pkh + row * s_pkn
        k = tl.load(PK + k_off[None, :] + offs_d[:, None] * s_pkd,
                    mask=nmask[None, :] & dmask[:, None], other=0.0)
        v_off = blk * s_pvb + h * s_pvh + row * s_pvn
        v = tl.load(PV + v_off[:, None] + offs_d[None, :] * s_pvd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc, poison = _online_step(q, k, v, rvalid[:, None] & nmask[None, :], m_i, l_i, acc, poison,
                                             qk_scale, PREC)
    return m_i, l_i, acc, poison


@triton.jit
def _search_sorted(SORTED, x, lo, hi, n_iter, RIGHT: tl.constexpr):
    """Binary search in the ascending ``SORTED[lo:hi)`` (elementwise over ``x``, ``lo``, ``hi``):
    the first index whose value is ``> x`` (``RIGHT``) or ``>= x``; ``hi`` when there is none.
    ``n_iter`` >= ``(hi - lo).bit_length()`` rounds."""
    for _ in range(n_iter):
        act = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(SORTED + mid, mask=act, other=0)
        if RIGHT:
            go = val <= x
        else:
            go = val < x
        hi = tl.where(act & ~go, mid, hi)
        lo = tl.where(act & go, mid + 1, lo)
    return lo


@triton.jit
def _group_setup_kernel(SORTED, TSEQ_START, TCOUNT, TTILE_END, B, T, GS, tile_m, n_iter,
                        BLOCK_T: tl.constexpr):
    """One program: CSR grouping of the batch by task from the sorted task ids.

    For every task t: ``TSEQ_START[t]`` (first position of t in the sorted batch, a vectorised
    binary search), ``TCOUNT[t]`` (its sequences) and ``TTILE_END[t]`` (inclusive running sum of
    its query tiles ``cdiv(count * G * Sq, tile_m)``). Replaces a dozen small torch launches.
    """
    carry = tl.zeros([1], tl.int64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < T
        zero = tl.zeros([BLOCK_T], tl.int32)
        lo_a = _search_sorted(SORTED, t, zero, zero + B, n_iter, RIGHT=False)   # first position of t
        lo_b = _search_sorted(SORTED, t, zero, zero + B, n_iter, RIGHT=True)    # first past t
        count = tl.where(tmask, lo_b - lo_a, 0).to(tl.int64)
        tiles = (count * GS + tile_m - 1) // tile_m
        tile_end = carry + tl.cumsum(tiles, 0)
        carry = carry + tl.sum(tiles, 0)
        tl.store(TSEQ_START + t, lo_a.to(tl.int64), mask=tmask)
        tl.store(TCOUNT + t, count, mask=tmask)
        tl.store(TTILE_END + t, tile_end, mask=tmask)


@triton.jit
def _grouped_prefix_kernel(
        Q, PK, PV, BT, PLENS, QLENS, ORDER, TSEQ_START, TCOUNT, TTILE_END, n_iter_t,
        PO, PL, qk_scale,
        s_qb, s_qh, s_qs, s_qd,
        s_pkb, s_pkh, s_pkn, s_pkd,
        s_pvb, s_pvh, s_pvn, s_pvd,
        s_bt0, s_bt1,
        T, Hq, Sq, D, block_size, NS, chunk,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PREC: tl.constexpr):
    """Prefix phase of the grouped path: one program per (query tile of a task, kv head, split)."""
    pid_tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    # This program's task: the first t with TTILE_END[t] > pid_tile (binary search); T when the
    # program is surplus (the grid is a shape-only upper bound on the number of tiles).
    lo = _search_sorted(TTILE_END, pid_tile, pid_tile * 0, pid_tile * 0 + T, n_iter_t, RIGHT=True)
    live = lo < T
    task = tl.minimum(lo, T - 1)
    count = tl.where(live, tl.load(TCOUNT + task), 0)
    tile_end = tl.load(TTILE_END + task)
    tile = pid_tile - (tile_end - (count * (G * Sq) + BLOCK_M - 1) // BLOCK_M)
    seq0 = tl.load(TSEQ_START + task)

    GS = G * Sq
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)           # stacked row: (sequence, head, query)
    rmask = r < count * GS
    s_local = r // GS
    g = (r % GS) // Sq
    i = r % Sq
    b = tl.load(ORDER + seq0 + s_local, mask=rmask, other=0)
    qlen = tl.load(QLENS + b, mask=rmask, other=0)
    rvalid = rmask & (i < qlen)
    hq = h * G + g

    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b[:, None] * s_qb + hq[:, None] * s_qh + i[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=rvalid[:, None] & dmask[None, :], other=0.0)

    plen = tl.where(live, tl.load(PLENS + task), 0)
    start = split * chunk
    end = tl.minimum(plen, start + chunk)
    m_i, l_i, acc, poison = softmax_state(BLOCK_M, BLOCK_D)
    m_i, l_i, acc, poison = _prefix_tile(q, PK, PV, BT, task * s_bt0, start, end, h,
                                         s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd, s_bt1,
                                         block_size, rvalid, offs_d, dmask, m_i, l_i, acc, poison, qk_scale,
                                         BLOCK_N, PREC)
    _store_partial(PO, PL, ((b * Hq + hq) * Sq + i) * NS + split, D, offs_d, rmask, dmask, m_i, l_i, acc, poison)


@triton.jit
def _sequence_kernel(
        Q, K, V, PK, PV, BT, PLENS, TIDS, QLENS, KVLENS, KVSTARTS, PO, PL, OUT, OPT, qk_scale,
        s_qb, s_qh, s_qs, s_qd,
        s_kb, s_kh, s_ks, s_kd,
        s_vb, s_vh, s_vs, s_vd,
        s_pkb, s_pkh, s_pkn, s_pkd,
        s_pvb, s_pvh, s_pvn, s_pvd,
        s_bt0, s_bt1,
        s_ob, s_oh, s_os, s_od,
        s_opt0, s_opt1,
        Hq, Sq, D, block_size, window, NS, slot_off, num_pre, chunk, page_size,
        G: tl.constexpr, M_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, INCLUDE_PREFIX: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, FINALIZE: tl.constexpr, PER_ROW_MASK: tl.constexpr, OWN_PAGED: tl.constexpr,
        PREC: tl.constexpr):
    """Per-sequence program over one KV split of ``[prefix (optional) ; own keys]``.

    Rows stack the G query heads of kv head ``h`` x the Sq queries. With ``FINALIZE`` (a single
    split) the ``num_pre`` partial states already in ``PO/PL`` (the grouped prefix phase) are
    merged in registers and the final output is written; otherwise the state goes to slot
    ``slot_off + split`` of the partial buffers.

    Own keys are ``K, V [B, Hkv, Skv, D]`` (strides ``s_kb, s_kh, s_ks``), or with ``OWN_PAGED``
    page pools ``[num_pages, page_size, Hkv, D]`` (``s_kb`` the page stride, ``s_ks`` the slot
    stride) read through the page table ``OPT [B, pages]``: own key j of row b at page
    ``OPT[b, j // page_size]``, slot ``j % page_size``.
    """
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1)
    h = (pid1 // M_TILES).to(tl.int64)
    mt = pid1 % M_TILES
    split = tl.program_id(2)

    GS = G * Sq
    r = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < GS
    g = r // Sq
    i = r % Sq
    hq = h * G + g
    qlen, kvlen, kvstart = seq_lens(QLENS, KVLENS, KVSTARTS, b)
    rvalid = rmask & (i < qlen)
    pos = kvlen - qlen + i                               # absolute position of query i

    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * s_qb + hq[:, None] * s_qh + i[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=rvalid[:, None] & dmask[None, :], other=0.0)

    lo, hi = own_key_band(kvstart, kvlen, kvlen - qlen, 0, qlen, window, CAUSAL, HAS_WINDOW)
    own_len = hi - lo
    if INCLUDE_PREFIX:
        task = tl.load(TIDS + b)
        plen = tl.load(PLENS + task)
    else:
        task = b * 0
        plen = kvlen * 0
    total = plen + own_len
    start = split * chunk
    end = tl.minimum(total, start + chunk)

    m_i, l_i, acc, poison = softmax_state(BLOCK_M, BLOCK_D)   # poison: rows that see a non-finite key/value
    if INCLUDE_PREFIX:
        m_i, l_i, acc, poison = _prefix_tile(q, PK, PV, BT, task * s_bt0, start, tl.minimum(end, plen), h,
                                             s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd, s_bt1,
                                             block_size, rvalid, offs_d, dmask, m_i, l_i, acc, poison,
                                             qk_scale, BLOCK_N, PREC)

    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(tl.maximum(start, plen), end, BLOCK_N):
        n = n0 + offs_n
        nmask = n < end
        j = (n - plen + lo).to(tl.int64)                 # own key index, in [kvstart, kvlen)
        if OWN_PAGED:
            page = tl.load(OPT + b * s_opt0 + (j // page_size) * s_opt1, mask=nmask, other=0).to(tl.int64)
            slot = j % page_size
            k_row = page * s_kb + slot * s_ks
            v_row = page * s_vb + slot * s_vs
        else:
            k_row = b * s_kb + j * s_ks
            v_row = b * s_vb + j * s_vs
        k = tl.load(K + h * s_kh + k_row[None, :] + offs_d[:, None] * s_kd,
                    mask=nmask[None, :] & dmask[:, None], other=0.0)
        v = tl.load(V + h * s_vh + v_row[:, None] + offs_d[None, :] * s_vd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        vis = visible(rvalid[:, None] & nmask[None, :], pos[:, None], j[None, :], window, CAUSAL, HAS_WINDOW)
        if PER_ROW_MASK:
            # rows of this program see different keys (several queries, causal or window): a key
            # masked for one row may be NaN, and 0 * NaN in p @ v is NaN
            v, bad = clean_values(v)
            poison = flag_rows(poison, vis & bad[None, :])
        m_i, l_i, acc, poison = _online_step(q, k, v, vis, m_i, l_i, acc, poison, qk_scale, PREC)

    prow = ((b * Hq + hq) * Sq + i) * NS
    if FINALIZE:
        # Merge the prefix-phase partial states (fp32) into this state, then normalise.
        for s in range(num_pre):
            lse_s = tl.load(PL + prow + s, mask=rmask, other=float("-inf"))
            o_s = tl.load(PO + (prow + s)[:, None] * D + offs_d[None, :],
                          mask=rmask[:, None] & dmask[None, :], other=0.0)
            m_new = tl.maximum(m_i, lse_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            beta = tl.exp2(lse_s - m_safe)
            acc = acc * alpha[:, None] + o_s * beta[:, None]
            l_i = l_i * alpha + beta
            m_i = m_new
        keep = rvalid & (l_i > 0)
        out = tl.where(keep[:, None], acc / tl.where(keep, l_i, 1.0)[:, None], 0.0)
        out = tl.where(poison[:, None] > 0, float("nan"), out)    # a visible NaN stays visible
        tl.store(OUT + b * s_ob + hq[:, None] * s_oh + i[:, None] * s_os + offs_d[None, :] * s_od,
                 out.to(OUT.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    else:
        _store_partial(PO, PL, prow + slot_off + split, D, offs_d, rmask, dmask, m_i, l_i, acc, poison)


@triton.jit
def _merge_kernel(PO, PL, QLENS, OUT, s_ob, s_oh, s_os, s_od, Hq, Sq, D, NS,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the ``NS`` fp32 partial states of one query row; padding rows and empty rows -> 0."""
    row = tl.program_id(0).to(tl.int64)                  # (b * Hq + hq) * Sq + i
    i = row % Sq
    hq = (row // Sq) % Hq
    b = row // (Sq * Hq)
    qlen = tl.load(QLENS + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < NS
    dmask = offs_d < D
    lse = tl.load(PL + row * NS + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    den = tl.sum(w, 0)
    o = tl.load(PO + (row * NS + offs_s)[:, None] * D + offs_d[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    keep = (den > 0) & (i < qlen)
    out = tl.where(keep, num / tl.where(keep, den, 1.0), 0.0)
    tl.store(OUT + b * s_ob + hq * s_oh + i * s_os + offs_d * s_od, out.to(OUT.dtype.element_ty),
             mask=dmask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _target_programs(device: torch.device) -> int:
    """Programs wanted in a launch: two waves of SMs on a GPU; 1 in the interpreter (no split)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _splits(base_programs: int, length_bound: int, block_n: int, target: int,
            forced: Optional[int] = None):
    """``(num_splits, chunk)``: split a key range of at most ``length_bound`` rows over KV so that
    ``base_programs * num_splits`` reaches ``target`` (flash-decoding). ``chunk`` is a multiple of
    ``block_n``; on a GPU each split keeps at least 256 rows so splitting never dominates. The
    bound comes from shapes (no sync): much shorter real lengths leave trailing splits empty."""
    if length_bound <= 0:
        return 1, block_n
    max_splits = _cdiv(length_bound, block_n)
    if forced is not None:
        ns = max(1, min(int(forced), max_splits))
    else:
        ns = max(1, min(max_splits, _cdiv(target, max(base_programs, 1))))
        ns = min(ns, max(1, length_bound // 256)) if target > 1 else ns
    chunk = _cdiv(_cdiv(length_bound, ns), block_n) * block_n
    return _cdiv(length_bound, chunk), chunk


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """A zero-size tensor (Skv = 0, an empty pool or table) is replaced by a one-element stand-in
    of the same dtype, so no null pointer reaches a launch; the kernels never read it (their loops
    are empty) and its strides are taken from the original where they matter."""
    return t if t.numel() > 0 else torch.zeros(1, dtype=t.dtype, device=t.device)


def _check_layout(x: PrefixAttentionInputs, own_pages: Optional[OwnPages] = None) -> None:
    """Checks the kernels rely on, made before any launch (ValueError naming the argument)."""
    D = x.head_dim
    if D > MAX_HEAD_DIM:
        raise ValueError(f"prefix_attention: `q` with head dimension {D} is invalid for the Triton "
                         f"decode kernels; expected D <= {MAX_HEAD_DIM} (use backend='torch')")
    if x.attn_mask is not None:
        raise ValueError("prefix_attention: `attn_mask` is not supported by the Triton decode kernels")
    dev = x.q.device
    tensors = {name: getattr(x, name) for name in ("q", "k", "v", "prefix_k", "prefix_v", "block_table",
                                                   "prefix_lens", "task_ids", "q_lens", "kv_lens", "kv_starts")}
    if own_pages is not None:
        tensors.update(k=own_pages.k, v=own_pages.v, own_page_table=own_pages.table)
    for name, t in tensors.items():
        if t.device != dev:
            raise ValueError(f"prefix_attention: `{name}` on {t.device} is invalid; expected {dev}")
        if any(s < 0 for s in t.stride()):
            raise ValueError(f"prefix_attention: `{name}` with strides {t.stride()} is invalid; "
                             f"expected non-negative strides")
        # Offsets are computed in int64 inside the kernels; the largest element offset must fit.
        span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
        if span >= 2 ** 62:
            raise ValueError(f"prefix_attention: `{name}` spans {span} elements; too large to address")
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        t = tensors[name]
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"prefix_attention: `{name}` with dtype {t.dtype} is invalid for the "
                             f"Triton decode kernels; expected float16, bfloat16 or float32")


def choose_path(x: PrefixAttentionInputs) -> str:
    """``"grouped"`` when sharing each task's prefix tile across its sequences pays, else
    ``"per_sequence"``. Mean sequences per present task >= ``GROUP_MIN_SEQS``; decided from
    shapes when ``B >= GROUP_MIN_SEQS * T`` (no sync), else one int read back from the device."""
    B, T = x.batch, x.num_tasks
    prefix_bound = x.block_table.shape[1] * x.block_size
    if B < GROUP_MIN_SEQS or prefix_bound == 0:
        return "per_sequence"
    if B >= GROUP_MIN_SEQS * T:
        return "grouped"
    seen = torch.zeros(T, dtype=torch.bool, device=x.task_ids.device).index_fill_(0, x.task_ids, True)
    present = int(seen.sum())                                            # the one host sync
    return "grouped" if B >= GROUP_MIN_SEQS * present else "per_sequence"


def _resolve_path(x: PrefixAttentionInputs, path: Optional[str]) -> str:
    path = path or os.environ.get(ENV_PATH, "auto") or "auto"
    if path not in PATHS:
        raise ValueError(f"decode_attention: `path` {path!r} is invalid; expected one of {PATHS} "
                         f"(argument or ${ENV_PATH})")
    return choose_path(x) if path == "auto" else path


def _config(device_type: str, dtype: torch.dtype, head_dim: int):
    """``(BLOCK_D, BLOCK_N, max BLOCK_M, num_stages)`` for a launch.

    GPU choices were checked by compiling for sm_90 (bf16, D=128, benchmark strides) and reading
    ptxas' register report (``benchmarks/gpu_decode.py --compile-check`` repeats it without a
    GPU): 16-bit inputs with BLOCK_N=64 compile without spills (sequence kernel 4 warps; grouped
    prefix kernel with a 64-row tile needs 8 warps — 255 registers and spills at 4). fp32 uses
    IEEE dots (FMA), so smaller key tiles and 2 stages."""
    block_d = max(16, _pow2(head_dim))
    if device_type != "cuda":                            # interpreter: small tiles, several of them
        return block_d, 16, 16, 1
    if dtype == torch.float32:
        return block_d, (32 if block_d <= 128 else 16), 64, 2
    return block_d, (64 if block_d <= 128 else 32), 64, 3


def _grouped_warps(tile_m: int, block_d: int) -> int:
    return 8 if tile_m * block_d >= 64 * 128 else 4


def _sequence_warps(block_d: int) -> int:
    return 4 if block_d <= 128 else 8


def _merge_warps(block_d: int) -> int:
    return 4 if block_d <= 128 else 8


_SIDE_STREAMS = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def decode_attention(x: PrefixAttentionInputs, *, path: Optional[str] = None,
                     num_splits: Optional[int] = None,
                     prefix_splits: Optional[int] = None,
                     overlap: Optional[bool] = None,
                     own_pages: Optional[OwnPages] = None) -> torch.Tensor:
    """Mixed-task decode attention, ``[B, Hq, Sq, D]`` in the dtype of ``q``.

    Args:
        x: validated inputs (``Sq <= 16`` is where this pays; any ``Sq`` is computed correctly).
        path: ``"auto"`` (default, :func:`choose_path`), ``"grouped"`` or ``"per_sequence"``;
            when None, ``$SOFTPROMPT_DECODE_PATH`` decides (default ``auto``).
        num_splits: force the KV split count of the per-sequence / own phase (tests).
        prefix_splits: force the split count of the grouped prefix phase (tests).
        overlap: EXPERIMENTAL, CUDA only, grouped path only, off by default (also
            ``SOFTPROMPT_DECODE_OVERLAP=1``): run the grouping and prefix phase on a side stream
            concurrently with the own phase, then merge with ``_merge_kernel``. Not yet measured
            on a GPU; ``benchmarks/gpu_decode.py`` times it and checks it against the reference.
            On the CPU the same kernels run in order (the tests check that data flow).
        own_pages: paged own keys, read in place through the page table (``x.k, x.v`` then only
            carry the logical shape ``[B, Hkv, Skv, D]``).
    """
    if x.q.dtype == torch.float64:
        from .torch_backend import torch_attention      # no fp64 tl.dot path here
        return torch_attention(x if own_pages is None else own_pages.gathered(x))
    _check_layout(x, own_pages)
    chosen = _resolve_path(x, path)
    B, Hq, Sq, D = x.q.shape
    Hkv, G, Skv, T = x.num_kv_heads, x.group_size, x.kv_len, x.num_tasks
    out = torch.empty((B, Hq, Sq, D), dtype=x.q.dtype, device=x.q.device)
    if out.numel() == 0:
        return out
    dev = x.q.device
    block_d, block_n, max_m, num_stages = _config(dev.type, x.q.dtype, D)
    prec = "ieee" if x.q.dtype == torch.float32 else "tf32"
    qk_scale = x.scale * LOG2E
    target = _target_programs(dev)
    bt = _nonempty(x.block_table)
    pk, pv = _nonempty(x.prefix_k), _nonempty(x.prefix_v)
    ints = [t.contiguous() for t in (x.prefix_lens, x.task_ids, x.q_lens, x.kv_lens, x.kv_starts)]
    plens, tids, qlens, kvlens, kvstarts = ints
    prefix_bound = x.block_table.shape[1] * x.block_size
    window = x.window if x.window is not None else 0

    # The sequence kernel: own phase (grouped path) or [prefix ; own] (per-sequence path).
    GS = G * Sq
    seq_m = min(max_m, max(16, _pow2(GS)))
    m_tiles = _cdiv(GS, seq_m)
    include_prefix = chosen == "per_sequence"
    length_bound = Skv + (prefix_bound if include_prefix else 0)
    ns_own, chunk_own = _splits(B * Hkv * m_tiles, length_bound, block_n, target, num_splits)

    nsp, chunk_p = 0, block_n
    tile_m = 16
    if chosen == "grouped":
        rows_bound = B * GS                              # stacked rows of the largest possible task
        tile_m = min(max_m, max(16, _pow2(rows_bound)))
        tiles_bound = _cdiv(rows_bound, tile_m) + min(T, B)
        nsp, chunk_p = _splits(tiles_bound * Hkv, prefix_bound, block_n, target, prefix_splits)
    if overlap is None:
        overlap = os.environ.get(ENV_OVERLAP, "0") not in ("", "0")
    # overlap: the own phase never merges the prefix slots itself (the merge kernel does, after
    # the join); the side stream exists on CUDA only, elsewhere the same kernels run in order.
    overlap = bool(overlap) and chosen == "grouped"
    use_overlap = overlap and dev.type == "cuda"
    finalize = ns_own == 1 and not overlap
    NS = nsp + (0 if finalize else ns_own)
    if NS > 0:
        part_o = torch.empty((B, Hq, Sq, NS, D), dtype=torch.float32, device=dev)
        part_l = torch.empty((B, Hq, Sq, NS), dtype=torch.float32, device=dev)
    else:                                                # nothing partial: never read
        part_o = torch.empty(1, dtype=torch.float32, device=dev)
        part_l = torch.empty(1, dtype=torch.float32, device=dev)
        NS = 1

    main_stream = side = None
    if use_overlap:                                      # fork: prefix phase on a side stream
        main_stream = torch.cuda.current_stream(dev)
        side = _side_stream(dev)
        side.wait_stream(main_stream)
    with (torch.cuda.stream(side) if use_overlap else contextlib.nullcontext()):
        if chosen == "grouped":
            _launch_grouped_prefix(x, pk, pv, bt, plens, tids, qlens, part_o, part_l, qk_scale,
                                   B, T, Hq, Hkv, G, Sq, D, GS, NS, nsp, chunk_p, tile_m,
                                   tiles_bound, block_n, block_d, prec, num_stages, dev)
    if use_overlap:
        part_o.record_stream(side)
        part_l.record_stream(side)

    if own_pages is None:
        k_own, v_own, opt, page_size = x.k, x.v, bt, 1
        k_strides, v_strides = x.k.stride(), x.v.stride()
    else:                                                # pools [pages, page_size, Hkv, D]: (page, head, slot, d)
        k_own, v_own, opt, page_size = own_pages.k, own_pages.v, own_pages.table, own_pages.page_size
        k_strides, v_strides = (tuple(t.stride()[i] for i in (0, 2, 1, 3)) for t in (k_own, v_own))
    opt_strides = opt.stride() if opt.dim() == 2 else (0, 0)
    _sequence_kernel[(B, Hkv * m_tiles, ns_own)](
        x.q, _nonempty(k_own), _nonempty(v_own), pk, pv, bt, plens, tids, qlens, kvlens, kvstarts,
        part_o, part_l, out, _nonempty(opt), qk_scale,
        *x.q.stride(), *k_strides, *v_strides, *x.prefix_k.stride(), *x.prefix_v.stride(),
        *x.block_table.stride(), *out.stride(), *opt_strides,
        Hq, Sq, D, x.block_size, window, NS, nsp, nsp, chunk_own, page_size,
        G=G, M_TILES=m_tiles, BLOCK_M=seq_m, BLOCK_N=block_n, BLOCK_D=block_d,
        INCLUDE_PREFIX=include_prefix, CAUSAL=x.causal, HAS_WINDOW=x.window is not None,
        FINALIZE=finalize, PER_ROW_MASK=Sq > 1 and (x.causal or x.window is not None),
        OWN_PAGED=own_pages is not None, PREC=prec,
        num_warps=_sequence_warps(block_d),
        num_stages=num_stages)
    if use_overlap:                                      # join before the merge reads the prefix slots
        main_stream.wait_stream(side)

    if not finalize:
        _merge_kernel[(B * Hq * Sq,)](
            part_o, part_l, qlens, out, *out.stride(), Hq, Sq, D, NS,
            BLOCK_S=max(2, _pow2(NS)), BLOCK_D=block_d, num_warps=_merge_warps(block_d))
    return out


def _launch_grouped_prefix(x, pk, pv, bt, plens, tids, qlens, part_o, part_l, qk_scale,
                           B, T, Hq, Hkv, G, Sq, D, GS, NS, nsp, chunk_p, tile_m,
                           tiles_bound, block_n, block_d, prec, num_stages, dev):
    """Grouping by task (sort + setup kernel) and the grouped prefix-phase launch."""
    # Group the batch by task on the device, no host sync: one stable sort, then one
    # single-program kernel for the CSR offsets of sequences and query tiles per task.
    sorted_tids, order = torch.sort(tids, stable=True)
    meta = torch.empty((3, T), dtype=torch.int64, device=dev)
    seq_start, counts, tile_end = meta[0], meta[1], meta[2]
    _group_setup_kernel[(1,)](
        sorted_tids, seq_start, counts, tile_end, B, T, GS, tile_m, B.bit_length(),
        BLOCK_T=min(1024, max(16, _pow2(T))), num_warps=4)
    _grouped_prefix_kernel[(tiles_bound, Hkv, nsp)](
        x.q, pk, pv, bt, plens, qlens, order, seq_start, counts, tile_end,
        T.bit_length(), part_o, part_l, qk_scale,
        *x.q.stride(), *x.prefix_k.stride(), *x.prefix_v.stride(), *x.block_table.stride(),
        T, Hq, Sq, D, x.block_size, NS, chunk_p,
        G=G, BLOCK_M=tile_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=prec,
        num_warps=_grouped_warps(tile_m, block_d), num_stages=num_stages)
