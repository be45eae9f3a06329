"""Plan once, run per layer: :func:`plan_prefix_attention` and :class:`PrefixAttentionPlan`.

Every layer of a forward pass (or engine step) attends with the same batch metadata: task ids,
the store's block table and prefix lengths, query / key lengths, causality, window. A plan takes
that metadata once, validates it (one device synchronisation for all range checks) and keeps
what the backends derive from it (task grouping, per-task block tables, visibility masks) for
every layer; :meth:`PrefixAttentionPlan.run` then only checks the per-layer tensors' shapes,
dtypes and device (no host synchronisation) and runs the arithmetic. ``prefix_attention`` is
plan + run in one call.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .backends import BACKENDS, resolve_backend_name
from .compiled_backend import CompiledPlan
from .dense_backend import dense_attention
from .inputs import (FLOAT_DTYPES, BatchMeta, _check_tensor, _fail, check_bias, check_dropout, check_layer_tensors,
                     check_mask, check_metadata, check_own_pages, check_softcap, gather_pages, inputs_of)
from .reference import reference_attention
from .triton_backend import OwnPages, triton_attention

# backends that compute the dense-path options (softcap, bias, dropout), and the function they use
DENSE_OPTION_BACKENDS = {"reference": reference_attention, "torch": dense_attention}
_SHAPE_NAMES = ("batch", "num_q_heads", "num_kv_heads", "q_len", "kv_len", "head_dim", "num_blocks",
                "block_size", "device")


class PrefixAttentionPlan:
    """Validated batch metadata plus a backend; :meth:`run` per layer. Build with
    :func:`plan_prefix_attention`. Holds its own copies of the index tensors, so a caller changing
    its tensors afterwards changes nothing: plan again for new metadata."""

    def __init__(self, meta: BatchMeta, backend: str = "auto"):
        if not isinstance(backend, str):
            raise ValueError(f"prefix_attention: `backend` {backend!r} is invalid; expected a backend name")
        self.meta = meta
        self.backend = resolve_backend_name(backend, meta.device)
        if meta.softcap is not None:
            _dense_backend(self.backend, "softcap")
        # paged own keys: compiled and triton's decode kernels read the pages in place, the other
        # backends get each layer's own keys gathered out of them
        self._compiled = CompiledPlan(meta) if self.backend == "compiled" else None
        self._run = BACKENDS.get(self.backend)
        self._derived: dict = {}           # what the backend derives from the metadata, for every layer

    def run(self, q, k, v, prefix_k, prefix_v, attn_mask=None, *, bias=None, dropout_p: float = 0.0,
            generator=None) -> torch.Tensor:
        """Prefix attention of one layer: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]``,
        ``prefix_k, prefix_v [num_blocks, Hkv, block_size, D]`` with the plan's sizes (any float
        dtype, the same for all five, on the plan's device). With paged own keys (the plan has an
        ``own_page_table``) ``k, v`` are token-major page pools ``[num_pages, page_size, Hkv, D]``.
        ``attn_mask`` (bool ``[B, 1|Hq, Sq, Skv]``) replaces the planned mask for this call only.

        Dense-path options of this call (``reference`` and ``torch`` only; see ``dense_backend.py``):
        ``bias`` float ``[B|1, 1|Hq, Sq, Skv]`` added to the own-key scores (after scale and
        soft-capping), ``dropout_p`` in [0, 1) on the probabilities, its keep mask drawn from
        ``generator`` (None: torch's global generator)."""
        m = self.meta
        pools = pages = None
        if m.own_page_table is not None:
            pools = self._check_pools(k, v)
            if self._compiled is not None:   # read in place: a stand-in of the logical shape for the checks
                k = v = pools[0].new_empty(1).expand(m.batch, m.num_kv_heads, m.kv_len, m.head_dim)
            elif self.backend == "triton":
                pages = OwnPages(pools[0], pools[1], m.own_page_table, m.own_page_size)
                k = v = pages.shape_of(m.batch, m.kv_len)
            else:
                k, v = (gather_pages(t, m.own_page_table, m.kv_len) for t in pools)
        shapes = check_layer_tensors(q, k, v, prefix_k, prefix_v)
        meta = self.meta
        for name in _SHAPE_NAMES:
            if shapes[name] != getattr(meta, name):
                _mismatch(name, shapes[name], getattr(meta, name))
        if attn_mask is not None:
            check_mask(attn_mask, meta.batch, meta.num_q_heads, meta.q_len, meta.kv_len, meta.device)
        run = self._run
        if bias is not None:
            check_bias(bias, meta.batch, meta.num_q_heads, meta.q_len, meta.kv_len, meta.device)
            run = _dense_backend(self.backend, "bias")
        if dropout_p != 0 or generator is not None:
            dropout_p = check_dropout(dropout_p, generator, meta.device)
            run = _dense_backend(self.backend, "dropout_p") if dropout_p > 0 else run
        if meta.softcap is not None:
            run = DENSE_OPTION_BACKENDS[self.backend]
        if self._compiled is not None:
            if attn_mask is not None:
                _fail("attn_mask", "given to run()", "None with backend 'compiled' (it takes no mask)")
            return self._compiled(q, *(pools or (k, v)), prefix_k, prefix_v)
        x = inputs_of(meta, q, k, v, prefix_k, prefix_v, attn_mask, self._derived, bias=bias,
                      dropout_p=dropout_p, generator=generator)
        return run(x) if pages is None else triton_attention(x, own_pages=pages)

    def _check_pools(self, k, v):
        """The own-key page pools ``[num_pages, page_size, Hkv, D]`` checked against the plan."""
        m = self.meta
        want = (m.own_num_pages, m.own_page_size, m.num_kv_heads, m.head_dim)
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, 4, FLOAT_DTYPES, "a float page pool [num_pages, page_size, Hkv, D]")
            if tuple(t.shape) != want:
                _fail(name, f"with shape {tuple(t.shape)}", f"the plan's page pool shape {list(want)} "
                      "[num_pages, page_size, Hkv, D]")
            if t.device != m.device:
                _fail(name, f"on device {t.device}", f"the plan's device ({m.device})")
        return k, v

    def __repr__(self):
        m = self.meta
        return (f"PrefixAttentionPlan(B={m.batch}, Hq={m.num_q_heads}, Hkv={m.num_kv_heads}, Sq={m.q_len}, "
                f"Skv={m.kv_len}, D={m.head_dim}, blocks={m.num_blocks}x{m.block_size}, causal={m.causal}, "
                f"window={m.window}, softcap={m.softcap}, device={m.device})")


def _dense_backend(backend: str, option: str):
    """The function computing ``backend`` with a dense-path option; ValueError when it has none."""
    if backend not in DENSE_OPTION_BACKENDS:
        raise ValueError(f"prefix_attention: `{option}` is invalid with backend {backend!r}; expected "
                         f"backend 'torch' or 'reference' (the {backend} kernels have no {option})")
    return DENSE_OPTION_BACKENDS[backend]


# which tensor (and dimension) of run() carries each planned size, for the error message
_WHERE = {"batch": "q", "num_q_heads": "q", "q_len": "q", "head_dim": "q", "num_kv_heads": "k",
          "kv_len": "k", "num_blocks": "prefix_k", "block_size": "prefix_k", "device": "q"}


def _mismatch(name: str, seen, planned) -> None:
    tensor = _WHERE[name]
    what = "on device" if name == "device" else f"with {name} ="
    _fail(tensor, f"{what} {seen}", f"the plan's {name} = {planned} (plan again for a new batch layout)")


def plan_prefix_attention(block_table, prefix_lens, task_ids, *, num_q_heads: int, num_kv_heads: int,
                          head_dim: int, q_len: int, kv_len: int, num_blocks: int, block_size: int,
                          causal: bool = True, scale=None, q_lens=None, kv_lens=None, kv_starts=None,
                          window: Optional[int] = None, attn_mask=None, device=None, batch=None,
                          own_page_table=None, own_page_size: Optional[int] = None,
                          own_num_pages: Optional[int] = None, softcap: Optional[float] = None,
                          backend: str = "auto") -> PrefixAttentionPlan:
    """Validate the batch metadata of ``prefix_attention`` once and return a plan to run per layer.

    The arguments mean what they mean for :func:`~kernels.prefix_attention`; the sizes of the
    per-layer tensors are given instead of the tensors (``batch`` is ``task_ids``' length;
    ``num_blocks, block_size`` describe the prefix pools; ``device`` defaults to ``task_ids``',
    ``batch`` to its length).

    Paged own keys: ``own_page_table [B, max_pages]`` int puts own key j of row b at page
    ``own_page_table[b, j // own_page_size]`` (slot ``j % own_page_size``) of token-major page
    pools ``[own_num_pages, own_page_size, Hkv, D]`` that ``run`` then takes as ``k, v``; ``kv_len``
    is the logical own length (``kv_lens`` per row). ``compiled`` and triton's decode kernels read
    the pages in place; the other backends get each layer's own keys gathered out of them.

    ``backend="compiled"`` (the C++ op, CPU, fp32, no gradients) rejects ``attn_mask`` here and a
    wrong dtype or inputs that require grad in ``run``, with a ``ValueError``.

    ``softcap``: Gemma 2's soft-capping of the scaled scores, ``tanh(s / softcap) * softcap``
    (``reference`` and ``torch``, which runs it on its dense path).
    """
    if batch is None or device is None:
        if not isinstance(task_ids, torch.Tensor):
            _fail("task_ids", f"of type {type(task_ids).__name__}", "an int32/int64 tensor [B]")
        device = task_ids.device if device is None else device
        if batch is None:
            batch = task_ids.shape[0] if task_ids.dim() == 1 else 0   # a wrong rank is reported below
    sizes = {"device": torch.device(device)}
    for name, value, least in (("batch", batch, 0), ("num_q_heads", num_q_heads, 0),
                               ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1), ("q_len", q_len, 0),
                               ("kv_len", kv_len, 0), ("num_blocks", num_blocks, 0), ("block_size", block_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            _fail(name, repr(value), f"an int >= {least}")
        sizes[name] = value
    if num_q_heads % num_kv_heads:
        _fail("num_kv_heads", repr(num_kv_heads), f"a head count that divides num_q_heads={num_q_heads} (GQA)")
    meta = check_metadata(block_table, prefix_lens, task_ids, causal=causal,
                          scale=scale, q_lens=q_lens, kv_lens=kv_lens, kv_starts=kv_starts, window=window,
                          attn_mask=attn_mask, **sizes)
    meta = dataclasses.replace(meta, softcap=check_softcap(softcap))
    if own_page_table is not None:
        for name, value, least in (("own_page_size", own_page_size, 1), ("own_num_pages", own_num_pages, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                _fail(name, repr(value), f"an int >= {least} (with own_page_table)")
        table = check_own_pages(own_page_table, meta.kv_lens, batch=meta.batch, kv_len=meta.kv_len,
                                page_size=own_page_size, num_pages=own_num_pages, device=meta.device)
        meta = dataclasses.replace(meta, own_page_table=table, own_page_size=own_page_size,
                                   own_num_pages=own_num_pages)
    return PrefixAttentionPlan(meta, backend)
