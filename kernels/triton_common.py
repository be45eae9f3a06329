"""``@triton.jit`` helpers shared by the prefill (``triton_prefill.py``) and decode
(``triton_decode.py``) kernels: the visibility rule of ``kernels/masks.py`` on own keys, the band
of own keys a query range can see, and the fp32 online-softmax step with its non-finite handling.

Each is a ``@triton.jit`` function, so it is inlined into the calling kernel (the pattern of the
Triton tutorial's ``_attn_fwd_inner``); ``tl.constexpr`` arguments stay compile-time, so a
branch that is off costs nothing. Scores are in log2 units (``qk_scale = scale * log2(e)``).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def seq_lens(QLENS, KVLENS, KVSTARTS, b):
    """``(q_len, kv_len, kv_start)`` of sequence ``b`` as int32."""
    return (tl.load(QLENS + b).to(tl.int32), tl.load(KVLENS + b).to(tl.int32),
            tl.load(KVSTARTS + b).to(tl.int32))


@triton.jit
def own_key_band(kv_start, kv_len, off, q_lo, q_hi, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``(lo, hi)``: the own keys ``[lo, hi)`` that queries ``[q_lo, q_hi)`` of a sequence may see
    (query ``i`` sits at absolute position ``off + i``); empty (``lo == hi``) when no query is
    given. Keys before ``kv_start`` are never in it; ``hi >= 0`` whatever ``//`` rounds to."""
    lo = kv_start
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, off + q_hi)
    if HAS_WINDOW:
        lo = tl.maximum(lo, off + q_lo - window + 1)
    hi = tl.maximum(tl.where(q_lo < q_hi, hi, 0), 0)
    return tl.minimum(lo, hi), hi


@triton.jit
def visible(ok, pos, j, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``ok`` restricted to the pairs where own key ``j`` is visible to the query at absolute
    position ``pos`` (causal, sliding window). ``pos`` and ``j`` come broadcastable to ``ok``'s
    shape, so the same rule serves score tiles ``[M, N]`` and transposed ones ``[N, M]``."""
    if CAUSAL:
        ok = ok & (j <= pos)
    if HAS_WINDOW:
        ok = ok & (pos - j < window)
    return ok


@triton.jit
def flag_rows(poison, hit):
    """``poison [M]`` raised on the rows of ``hit [M, N]`` with any true entry."""
    return tl.maximum(poison, tl.max(hit.to(tl.int32), 1))


@triton.jit
def clean_values(v):
    """Value tile ``[BLOCK_N, BLOCK_D]`` with non-finite elements zeroed, and ``[BLOCK_N]`` the
    keys that had one. A value masked for one query of a tile (causal, window) may hold anything,
    and ``0 * NaN`` in ``p @ v`` is NaN. (Keys need no cleaning in the forward: a masked score is
    replaced by -inf; a visible non-finite score is flagged instead, see ``flag_scores``.)"""
    ok = (v == v) & (tl.abs(v) != float("inf"))
    return tl.where(ok, v, 0.0), tl.min(ok.to(tl.int32), 1) == 0


@triton.jit
def flag_scores(s, vis, poison):
    """Scores with masked and non-finite entries at -inf, and ``poison`` raised on the rows that
    see a non-finite score (a NaN / inf key): the max would drop it or it would zero the row, so
    the row's output is made NaN instead (a visible NaN stays visible)."""
    finite = (s == s) & (tl.abs(s) != float("inf"))
    return tl.where(vis & finite, s, float("-inf")), flag_rows(poison, vis & ~finite)


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Empty online-softmax state ``(m, l, acc, poison)`` of a ``BLOCK_M``-row query tile."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, BLOCK_D], tl.float32), tl.zeros([BLOCK_M], tl.int32))


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One online-softmax update with scores ``s`` (log2 units, -inf where masked). Rows that
    saw nothing yet keep ``m = -inf`` and ``l = 0`` without ever producing NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc
