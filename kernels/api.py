"""The public entry points: :func:`prefix_attention` (one call) = plan + run."""
from __future__ import annotations

import torch

from .inputs import check_layer_tensors
from .plan import plan_prefix_attention


def prefix_attention(q, k, v, prefix_k, prefix_v, block_table, prefix_lens, task_ids, *,
                     causal=True, scale=None, q_lens=None, kv_lens=None, kv_starts=None,
                     window=None, attn_mask=None, backend="auto") -> torch.Tensor:
    """Attention of each sequence over its task's prefix (read from a block pool) and its own keys.

    Args:
        q: ``[B, Hq, Sq, D]`` queries.
        k, v: ``[B, Hkv, Skv, D]`` the sequences' own keys and values (``Hq % Hkv == 0``, not repeated).
        prefix_k, prefix_v: ``[num_blocks, Hkv, block_size, D]`` block pools holding every task's prefix.
        block_table: ``[T, max_blocks]`` int, the blocks of task t in order.
        prefix_lens: ``[T]`` int, prefix rows of each task (0 allowed).
        task_ids: ``[B]`` int, the task of each sequence.
        causal: own key j visible to query i only if ``j <= kv_lens - q_lens + i``.
        scale: softmax scale, default ``D ** -0.5``.
        q_lens, kv_lens, kv_starts: ``[B]`` int; real queries ``i < q_lens``, visible own keys
            ``kv_starts <= j < kv_lens`` (defaults ``Sq``, ``Skv``, ``0``).
        window: sliding window over own keys, ``(kv_lens - q_lens + i) - j < window``.
        attn_mask: bool ``[B, 1|Hq, Sq, Skv]``, True where an own key may be seen.
        backend: ``"auto"`` (Triton on a GPU, ``torch`` elsewhere), ``"torch"``, ``"triton"`` or
            ``"reference"``.

    Returns:
        ``[B, Hq, Sq, D]`` in the dtype of ``q``. Prefix rows are seen by every real query with no
        causal or padding restriction; padding queries and rows that see nothing are zero. What a
        query cannot see never influences it, whatever it holds (NaN in an uninitialised page,
        in the rest of a prefix's last block, in unused ``block_table`` entries); a query that
        sees a NaN / inf key or value returns a non-finite row.

    Layers that share the metadata should plan once (:func:`~kernels.plan_prefix_attention`) and
    ``run`` per layer: this function validates and derives everything on every call.
    """
    plan = plan_for_layer(q, k, v, prefix_k, prefix_v, block_table, prefix_lens, task_ids, causal=causal,
                          scale=scale, q_lens=q_lens, kv_lens=kv_lens, kv_starts=kv_starts, window=window,
                          attn_mask=attn_mask, backend=backend)
    return plan.run(q, k, v, prefix_k, prefix_v)


def plan_for_layer(q, k, v, prefix_k, prefix_v, block_table, prefix_lens, task_ids, **options):
    """The plan of :func:`prefix_attention` for layers shaped like these tensors (sizes read from them).

    ``options`` are ``prefix_attention``'s keywords. ``plan.run(q, k, v, prefix_k, prefix_v)`` then
    serves every layer of the same shapes without validating or deriving anything again.
    """
    shapes = check_layer_tensors(q, k, v, prefix_k, prefix_v)
    return plan_prefix_attention(block_table, prefix_lens, task_ids, **options, **shapes)
