"""Validation and normalisation of ``prefix_attention`` arguments.

Every backend receives one :class:`PrefixAttentionInputs`: shapes checked, optional
per-sequence lengths filled in with their defaults, all index tensors int64 on the
query's device. The batch metadata is validated once per plan (:func:`check_metadata`),
the per-layer tensors cheaply on every run (:func:`check_layer_tensors`); backends may
assume everything below holds.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class PrefixAttentionInputs:
    """Validated arguments of one ``prefix_attention`` call.

    Shapes: ``q [B,Hq,Sq,D]``, ``k, v [B,Hkv,Skv,D]``, ``prefix_k, prefix_v
    [num_blocks,Hkv,block_size,D]``, ``block_table [T,max_blocks]``, ``prefix_lens [T]``,
    ``task_ids, q_lens, kv_lens, kv_starts [B]`` (int64), ``attn_mask`` bool
    ``[B,1|Hq,Sq,Skv]`` or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    block_table: torch.Tensor
    prefix_lens: torch.Tensor
    task_ids: torch.Tensor
    q_lens: torch.Tensor
    kv_lens: torch.Tensor
    kv_starts: torch.Tensor
    causal: bool
    scale: float
    window: Optional[int]
    attn_mask: Optional[torch.Tensor]
    # True when the caller passed the lengths (False: the defaults, nothing is padded).
    lengths_given: bool
    # What backends derive from the metadata, shared by every layer run with one plan (see derived()).
    derived: dict = field(default_factory=dict, compare=False, repr=False)
    # False when attn_mask came with this call rather than with the plan (mask-derived data is per call).
    mask_planned: bool = True
    # Options of the dense path (kernels/dense_backend.py): tanh soft-capping of the scaled scores
    # (planned), an additive float bias on own-key scores [B|1, 1|Hq, Sq, Skv] and dropout on the
    # probabilities (per run).
    softcap: Optional[float] = None
    bias: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    generator: Optional[torch.Generator] = None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def num_q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def block_size(self) -> int:
        return self.prefix_k.shape[2]

    @property
    def num_tasks(self) -> int:
        return self.block_table.shape[0]


def _fail(name: str, seen, allowed: str) -> None:
    raise ValueError(f"prefix_attention: `{name}` {seen} is invalid; expected {allowed}")


def _check_tensor(name: str, t, rank: int, dtypes, dtype_text: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, f"of type {type(t).__name__}", "a torch.Tensor")
    if t.device.type == "meta":
        _fail(name, "on device meta (a tensor without data)", "a tensor on a real device (cpu, cuda, ...)")
    if t.dim() != rank:
        _fail(name, f"with shape {tuple(t.shape)} (rank {t.dim()})", f"a rank-{rank} tensor")
    if t.dtype not in dtypes:
        _fail(name, f"with dtype {t.dtype}", dtype_text)


def _lengths(name: str, t, batch: int, default: int, device) -> torch.Tensor:
    if t is None:
        return torch.full((batch,), default, dtype=torch.int64, device=device)
    if isinstance(t, (list, tuple)):
        # torch.tensor(..., dtype=int64) would silently truncate 2.7 to 2 and turn True into 1
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in t):
            _fail(name, f"{list(t)!r}", "ints (a list of ints or an int32/int64 tensor of shape [B])")
        t = torch.tensor(t, dtype=torch.int64, device=device)
    _check_tensor(name, t, 1, INT_DTYPES, "an int32/int64 tensor of shape [B]")
    if t.shape[0] != batch:
        _fail(name, f"with shape {tuple(t.shape)}", f"shape [B] = [{batch}]")
    if t.device != device:
        _fail(name, f"on device {t.device}", f"the device of q ({device})")
    return t.long()


def check_layer_tensors(q, k, v, prefix_k, prefix_v) -> dict:
    """Check the per-layer tensors against each other; return the shapes they imply (the keyword
    arguments of :func:`check_metadata` that describe them)."""
    float_text = "float16, bfloat16, float32 or float64"
    _check_tensor("q", q, 4, FLOAT_DTYPES, float_text)
    B, Hq, Sq, D = q.shape
    device, dtype = q.device, q.dtype
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _check_tensor(name, t, 4, FLOAT_DTYPES, float_text)
        if t.dtype != dtype:
            _fail(name, f"with dtype {t.dtype}", f"the dtype of q ({dtype})")
        if t.device != device:
            _fail(name, f"on device {t.device}", f"the device of q ({device})")
    if D == 0:
        _fail("q", f"with shape {tuple(q.shape)}", "a head dimension D > 0")
    Hkv, Skv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        _fail("k", f"with shape {tuple(k.shape)}", f"[B={B}, Hkv, Skv, D={D}]")
    if Hkv == 0 or Hq % Hkv != 0:
        _fail("k", f"with {Hkv} heads", f"a head count that divides Hq={Hq} (GQA)")
    if v.shape != k.shape:
        _fail("v", f"with shape {tuple(v.shape)}", f"the shape of k {tuple(k.shape)}")
    num_blocks, _, block_size, _ = prefix_k.shape
    if prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        _fail("prefix_k", f"with shape {tuple(prefix_k.shape)}",
              f"[num_blocks, Hkv={Hkv}, block_size, D={D}]")
    if block_size == 0:
        _fail("prefix_k", f"with shape {tuple(prefix_k.shape)}", "block_size > 0")
    if prefix_v.shape != prefix_k.shape:
        _fail("prefix_v", f"with shape {tuple(prefix_v.shape)}",
              f"the shape of prefix_k {tuple(prefix_k.shape)}")
    return dict(batch=B, num_q_heads=Hq, num_kv_heads=Hkv, q_len=Sq, kv_len=Skv, head_dim=D,
                num_blocks=num_blocks, block_size=block_size, device=device)


@dataclass(frozen=True)
class BatchMeta:
    """The validated batch metadata a plan is built from (everything but the per-layer tensors).

    Index tensors are int64 copies owned by the metadata (a caller changing its own tensors
    afterwards changes nothing here); ``block_table`` has every entry a task does not use set to 0.
    """

    batch: int
    num_q_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    num_blocks: int
    block_size: int
    device: torch.device
    block_table: torch.Tensor
    prefix_lens: torch.Tensor
    task_ids: torch.Tensor
    q_lens: torch.Tensor
    kv_lens: torch.Tensor
    kv_starts: torch.Tensor
    causal: bool
    scale: float
    window: Optional[int]
    attn_mask: Optional[torch.Tensor]
    lengths_given: bool
    # paged own keys: [B, pages] int64 (unused entries 0), the pool's page size and page count
    own_page_table: Optional[torch.Tensor] = None
    own_page_size: int = 0
    own_num_pages: int = 0
    softcap: Optional[float] = None           # tanh soft-capping of the scaled scores (dense path)


def check_metadata(block_table, prefix_lens, task_ids, *, batch, num_q_heads, num_kv_heads, q_len, kv_len,
                   head_dim, num_blocks, block_size, device, causal=True, scale=None, q_lens=None,
                   kv_lens=None, kv_starts=None, window=None, attn_mask=None) -> BatchMeta:
    """Check the batch metadata of ``prefix_attention`` once (one device synchronisation for all
    the range checks); raise ``ValueError`` naming the bad argument."""
    B, Hq, Sq, Skv = batch, num_q_heads, q_len, kv_len
    _check_tensor("block_table", block_table, 2, INT_DTYPES, "an int32/int64 tensor [T, max_blocks]")
    T, max_blocks = block_table.shape
    _check_tensor("prefix_lens", prefix_lens, 1, INT_DTYPES, "an int32/int64 tensor [T]")
    if prefix_lens.shape[0] != T:
        _fail("prefix_lens", f"with shape {tuple(prefix_lens.shape)}", f"shape [T] = [{T}] (rows of block_table)")
    _check_tensor("task_ids", task_ids, 1, INT_DTYPES, "an int32/int64 tensor [B]")
    if task_ids.shape[0] != B:
        _fail("task_ids", f"with shape {tuple(task_ids.shape)}", f"shape [B] = [{B}]")
    for name, t in (("block_table", block_table), ("prefix_lens", prefix_lens), ("task_ids", task_ids)):
        if t.device != device:
            _fail(name, f"on device {t.device}", f"the device of q ({device})")

    scale = _scale(scale, head_dim)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        _fail("window", repr(window), "a positive int or None")

    lengths_given = not (q_lens is None and kv_lens is None and kv_starts is None)
    q_lens = _lengths("q_lens", q_lens, B, Sq, device)
    kv_lens = _lengths("kv_lens", kv_lens, B, Skv, device)
    kv_starts = _lengths("kv_starts", kv_starts, B, 0, device)
    if attn_mask is not None:
        check_mask(attn_mask, B, Hq, Sq, Skv, device)

    block_table = _check_values(block_table, prefix_lens, task_ids, q_lens, kv_lens, kv_starts,
                                num_blocks, block_size, Sq, Skv)
    # copies: a caller changing its tensors in place after planning cannot reach the plan
    own = lambda t: t.to(torch.int64, copy=True)       # noqa: E731
    return BatchMeta(batch=B, num_q_heads=Hq, num_kv_heads=num_kv_heads, q_len=Sq, kv_len=Skv, head_dim=head_dim,
                     num_blocks=num_blocks, block_size=block_size, device=device, block_table=block_table,
                     prefix_lens=own(prefix_lens), task_ids=own(task_ids), q_lens=own(q_lens),
                     kv_lens=own(kv_lens), kv_starts=own(kv_starts), causal=bool(causal), scale=scale,
                     window=window, attn_mask=attn_mask, lengths_given=lengths_given)


def check_mask(attn_mask, B: int, Hq: int, Sq: int, Skv: int, device) -> None:
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
        seen = (f"with dtype {attn_mask.dtype} and shape {tuple(attn_mask.shape)}"
                if isinstance(attn_mask, torch.Tensor) else f"of type {type(attn_mask).__name__}")
        _fail("attn_mask", seen, f"a bool tensor [B={B}, 1 or Hq={Hq}, Sq={Sq}, Skv={Skv}]")
    if (attn_mask.shape[0] != B or attn_mask.shape[1] not in (1, Hq)
            or attn_mask.shape[2] != Sq or attn_mask.shape[3] != Skv):
        _fail("attn_mask", f"with shape {tuple(attn_mask.shape)}",
              f"[B={B}, 1 or Hq={Hq}, Sq={Sq}, Skv={Skv}]")
    if attn_mask.device != device:
        _fail("attn_mask", f"on device {attn_mask.device}", f"the device of q ({device})")


def inputs_of(meta: BatchMeta, q, k, v, prefix_k, prefix_v, attn_mask=None, derived=None, bias=None,
              dropout_p: float = 0.0, generator=None) -> "PrefixAttentionInputs":
    """One layer's inputs: the plan's metadata and this layer's tensors. ``attn_mask`` replaces
    the planned mask for this call; ``derived`` is the plan's cache (None: a fresh one); ``bias``,
    ``dropout_p``, ``generator`` are this call's dense-path options (validated by the caller)."""
    planned = attn_mask is None
    return PrefixAttentionInputs(
        q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, block_table=meta.block_table,
        prefix_lens=meta.prefix_lens, task_ids=meta.task_ids, q_lens=meta.q_lens, kv_lens=meta.kv_lens,
        kv_starts=meta.kv_starts, causal=meta.causal, scale=meta.scale, window=meta.window,
        attn_mask=meta.attn_mask if planned else attn_mask, lengths_given=meta.lengths_given,
        derived={} if derived is None else derived, mask_planned=planned, softcap=meta.softcap, bias=bias,
        dropout_p=dropout_p, generator=generator)


def validate_inputs(q, k, v, prefix_k, prefix_v, block_table, prefix_lens, task_ids, *,
                    causal=True, scale=None, q_lens=None, kv_lens=None, kv_starts=None,
                    window=None, attn_mask=None) -> PrefixAttentionInputs:
    """Check every argument of ``prefix_attention``; raise ``ValueError`` naming the bad one."""
    shapes = check_layer_tensors(q, k, v, prefix_k, prefix_v)
    meta = check_metadata(block_table, prefix_lens, task_ids, causal=causal, scale=scale, q_lens=q_lens,
                          kv_lens=kv_lens, kv_starts=kv_starts, window=window, attn_mask=attn_mask, **shapes)
    return inputs_of(meta, q, k, v, prefix_k, prefix_v)


def derived(x: "PrefixAttentionInputs", key: str, compute, mask_dependent: bool = False):
    """What a backend derives from the batch metadata alone, computed once per plan (shared by
    every layer that runs it). ``mask_dependent`` results are recomputed when the call brought
    its own ``attn_mask``."""
    if mask_dependent and not x.mask_planned:
        return compute()
    if key not in x.derived:
        x.derived[key] = compute()
    return x.derived[key]


def _scale(scale, D: int) -> float:
    """The softmax scale as a float: a real number or a one-element tensor, finite and > 0."""
    if scale is None:
        return D ** -0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype == torch.bool or scale.device.type == "meta":
            _fail("scale", f"tensor with shape {tuple(scale.shape)}, dtype {scale.dtype} on {scale.device}",
                  "a finite positive number, a one-element real tensor, or None")
        scale = scale.item()
    # bool is an int subclass: scale=True is a mistake, never a scale of 1
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        _fail("scale", repr(scale), "a finite positive number or None")
    return float(scale)


def _check_values(block_table, prefix_lens, task_ids, q_lens, kv_lens, kv_starts,
                  num_blocks, block_size, Sq, Skv) -> torch.Tensor:
    """Range checks on index tensors, gathered so the device is synchronised only once.

    Returns ``block_table`` (int64) with every entry a task does not use set to 0: those entries
    may hold anything (-1, stale ids past the pool), and a backend that gathers whole rows for the
    longest prefix in a batch must never index the pool with them.
    """
    T, max_blocks = block_table.shape
    plens = prefix_lens.long()
    tids = task_ids.long()
    # Blocks a task actually uses must point into the pool; the rest of its row is ignored.
    used = torch.arange(max_blocks, device=block_table.device)[None, :] * block_size < plens[:, None]
    bad_block = used & ((block_table < 0) | (block_table >= num_blocks))
    checks = torch.stack([
        (tids < 0).any() | (tids >= T).any(),
        (plens < 0).any() | (plens > max_blocks * block_size).any(),
        bad_block.any(),
        (q_lens < 0).any() | (q_lens > Sq).any(),
        (kv_lens < 0).any() | (kv_lens > Skv).any(),
        (kv_starts < 0).any() | (kv_starts > kv_lens).any(),
    ]).tolist() if tids.numel() or T else [False] * 6
    if checks[0]:
        _fail("task_ids", f"with values {_span(tids)}", f"task ids in [0, T={T})")
    if checks[1]:
        _fail("prefix_lens", f"with values {_span(plens)}",
              f"lengths in [0, max_blocks*block_size = {max_blocks}*{block_size}]")
    if checks[2]:
        t, j = bad_block.nonzero()[0].tolist()
        _fail("block_table", f"entry [{t},{j}] = {int(block_table[t, j])}",
              f"block indices in [0, num_blocks={num_blocks}) for every block a prefix uses")
    if checks[3]:
        _fail("q_lens", f"with values {_span(q_lens)}", f"lengths in [0, Sq={Sq}]")
    if checks[4]:
        _fail("kv_lens", f"with values {_span(kv_lens)}", f"lengths in [0, Skv={Skv}]")
    if checks[5]:
        _fail("kv_starts", f"with values {_span(kv_starts)}", "starts in [0, kv_lens[b]] per sequence")
    return torch.where(used, block_table.long(), 0)


def check_own_pages(page_table, kv_lens: torch.Tensor, *, batch: int, kv_len: int, page_size: int,
                    num_pages: int, device) -> torch.Tensor:
    """Paged own keys: ``page_table [B, max_pages]`` int, row b's own key j at page
    ``page_table[b, j // page_size]``, slot ``j % page_size`` of a token-major
    ``[num_pages, page_size, Hkv, D]`` pool. Returns the int64 table of the pages ``kv_len`` spans,
    with every entry a row does not use (past ``kv_lens[b]``) set to 0; the used ones must point
    into the pool."""
    _check_tensor("own_page_table", page_table, 2, INT_DTYPES, "an int32/int64 tensor [B, max_pages]")
    pages = -(-kv_len // page_size)
    longest = int(kv_lens.max()) if kv_lens.numel() else 0
    needed = -(-longest // page_size)
    if page_table.shape[0] != batch or page_table.shape[1] < needed:
        _fail("own_page_table", f"with shape {tuple(page_table.shape)}",
              f"[B={batch}, max_pages >= ceil(max(kv_lens) / page_size) = {needed}]")
    if page_table.device != device:
        _fail("own_page_table", f"on device {page_table.device}", f"the device of q ({device})")
    table = page_table[:, :pages].long()
    if table.shape[1] < pages:             # pages past every row's kv_lens: never read
        table = torch.nn.functional.pad(table, (0, pages - table.shape[1]))
    used = torch.arange(pages, device=device)[None, :] * page_size < kv_lens[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        b, j = bad.nonzero()[0].tolist()
        _fail("own_page_table", f"entry [{b},{j}] = {int(table[b, j])}",
              f"page indices in [0, num_pages={num_pages}) for every page a row's kv_lens uses")
    return torch.where(used, table, 0)


def gather_pages(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Rows' own keys (or values) read out of a page pool ``[num_pages, page_size, Hkv, D]`` through
    ``table [B, pages]``: ``[B, Hkv, length, D]`` (differentiable: gradients reach the pool)."""
    B, n = table.shape
    g = pool[table]                                                     # [B, pages, ps, Hkv, D]
    _, _, ps, Hkv, D = g.shape
    return g.reshape(B, n * ps, Hkv, D)[:, :length].transpose(1, 2)


# ------------------------------------------------------------------ options of the dense path
def check_softcap(softcap):
    """``softcap`` as a float (None: no capping); a finite number > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) \
            or softcap <= 0:
        _fail("softcap", repr(softcap), "a finite positive number or None")
    return float(softcap)


def check_bias(bias, batch: int, num_q_heads: int, q_len: int, kv_len: int, device) -> None:
    """``bias``: a float tensor ``[B|1, 1|Hq, Sq, Skv]`` on the plan's device."""
    _check_tensor("bias", bias, 4, FLOAT_DTYPES, "a float tensor [B|1, 1|Hq, Sq, Skv]")
    shape = tuple(bias.shape)
    if shape[0] not in (1, batch) or shape[1] not in (1, num_q_heads) or shape[2:] != (q_len, kv_len):
        _fail("bias", f"with shape {shape}",
              f"[B={batch} or 1, 1 or Hq={num_q_heads}, Sq={q_len}, Skv={kv_len}] (own keys only)")
    if bias.device != device:
        _fail("bias", f"on device {bias.device}", f"the plan's device ({device})")


def check_dropout(dropout_p, generator, device) -> float:
    """``dropout_p`` as a float in [0, 1); ``generator`` None or a ``torch.Generator`` on ``device``."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        _fail("dropout_p", repr(dropout_p), "a number in [0, 1)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            _fail("generator", f"of type {type(generator).__name__}", "a torch.Generator or None")
        if generator.device.type != torch.device(device).type:
            _fail("generator", f"on device {generator.device}", f"a generator on the plan's device ({device})")
    return float(dropout_p)


def _span(t: torch.Tensor) -> str:
    if t.numel() == 0:
        return "[]"
    return f"in [{int(t.min())}, {int(t.max())}]"
