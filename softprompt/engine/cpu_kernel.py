"""The compiled CPU paged-attention kernel: the custom op ``softprompt::paged_attention``
(``csrc/paged_attention.cpp``), its build, and the planned per-layer call.

On the CPU a decode step's attention through torch ops must first gather every row's own K/V out
of the pages into a padded batch (a copy of the whole running cache per layer) and then run the
prefix and own parts separately. The kernel reads both in place — the prefix from the store's
blocks, the own tokens from the engine's pages — in one softmax per query (all its heads), the
queries split over ATen's intra-op thread pool (``at::parallel_for``). It serves decode steps (one
query per row) and packed causal prefills (one query per new token). Inference only: it computes
no gradients (the engine runs it under ``torch.inference_mode``).

It is built on first use by ``torch.utils.cpp_extension.load`` (ninja, the system C++ compiler;
about 20 s) into ``$SOFTPROMPT_CACHE_DIR/torch_extensions`` or torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); torch's file lock there
serialises concurrent builds. The extension's name carries a hash of the source, the flags and
the torch and Python versions, so different versions live side by side and none is ever deleted
(another process may have it loaded). Where there is no compiler, the build fails, or ``SOFTPROMPT_CPU_KERNEL=0`` is set,
:func:`load` returns None (``unavailable_reason()`` says why) and the CPU decoder keeps the torch
path (:class:`~softprompt.engine.decode_attention.DecodeAttention`). Tests check the kernel against
the ``reference`` backend.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"

_op = None
_reason: Optional[str] = None
_tried = False


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list:
    """Optimised, vectorisable, IEEE-safe where it matters (no -ffast-math: the kernel relies on
    exact rounding in its exp range reduction); fused multiply-adds allowed (ISO C++ mode turns
    them off by default); OpenMP, since ``at::parallel_for`` is
    inline and needs it to use torch's pool; AVX2/FMA only where this CPU reports them (part of
    the extension's name, so a cache shared with a CPU without them never serves it this build)."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def extension_name(source: bytes, flags: list) -> str:
    """One name (and cache folder) per source, flags, torch and Python version and machine: a
    build is never rebuilt in place under a process that has it loaded, and none is deleted."""
    key = hashlib.sha256(source + " ".join(flags + [torch.__version__, sys.version, platform.machine()]).encode())
    return f"softprompt_paged_attention_{key.hexdigest()[:16]}"


def _build_directory(name: str, cpp_extension) -> Path:
    """$SOFTPROMPT_CACHE_DIR/torch_extensions/<name>, else torch's extension cache folder for it."""
    root = os.environ.get("SOFTPROMPT_CACHE_DIR")
    base = (Path(root) / "torch_extensions" if root else
            Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()))
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


STALE_LOCK_S = 900      # a build takes well under a minute; a lock this old was left by a killed one


def _build():
    """Builds (or finds in the cache) and loads the extension; raises on any failure."""
    from torch.utils import cpp_extension           # imports setuptools: only when building

    flags = compile_flags()
    name = extension_name(SOURCE.read_bytes(), flags)
    folder = _build_directory(name, cpp_extension)
    lock = folder / "lock"
    # torch's file lock has no timeout: a build killed midway leaves it behind and every later
    # load would wait forever. Not deleted here (it may be a live build's): reported instead.
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        raise RuntimeError(f"the build lock {lock} is {time.time() - lock.stat().st_mtime:.0f} s old, left by a "
                           f"killed build; delete it to rebuild")
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), is_python_module=False, verbose=False)
    return torch.ops.softprompt.paged_attention


def load():
    """The op ``torch.ops.softprompt.paged_attention``, or None when it cannot be used here (see
    :func:`unavailable_reason`)."""
    global _op, _reason, _tried
    if _tried:
        return _op
    _tried, _op = True, None
    if os.environ.get("SOFTPROMPT_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        _reason = "disabled by SOFTPROMPT_CPU_KERNEL"
        return None
    try:
        _op = _build()
    # a build can fail in many ways (no compiler or ninja, compiler errors, an unwritable cache,
    # a loader error); each means "use the torch path", with the reason kept for the user
    except Exception as err:                        # noqa: BLE001
        _reason = f"could not build or load {SOURCE.name}: {type(err).__name__}: {str(err).strip()[-1000:]}"
        return None
    _reason = None
    return _op


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned None (None when the kernel is available)."""
    load()
    return _reason


def _index(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu" or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"PagedAttention: `{name}` must be an integer CPU tensor; got {t.dtype} on {t.device}")
    return t.to(torch.int64).contiguous()


def _pages_read(page_table: torch.Tensor, visible: torch.Tensor, own_seen: torch.Tensor, rows: torch.Tensor,
                page_size: int) -> int:
    """Own-pool slots the kernel reads (checked against the pools per layer). Only the pages of
    tokens a query sees are read, so only those entries must be page ids (>= 0); the rest of a
    row (pages not yet written, freed, -1) may hold anything."""
    B, W = page_table.shape
    if not B or not visible.numel():
        return 0
    first = (visible - own_seen) // page_size                           # first page of each query
    last = (visible - 1) // page_size                                   # its last page
    cols = torch.arange(W)[None, :]
    per_query = (cols >= first[:, None]) & (cols <= last[:, None])     # [N, W]
    used = torch.zeros(B, W, dtype=torch.int32).index_add_(0, rows, per_query.int()) > 0
    ids = page_table[used]
    if int(ids.min()) < 0:
        raise ValueError(f"PagedAttention: `page_table` holds page {int(ids.min())} where a query reads "
                         f"its tokens; expected page ids >= 0")
    return (int(ids.max()) + 1) * page_size


def _blocks_read(block_table: torch.Tensor, prefix_lens: torch.Tensor, task_ids: torch.Tensor,
                 block_size: int) -> int:
    """Prefix-pool blocks the kernel reads: the first ``ceil(prefix_lens[t] / block_size)`` entries
    of each task present; the rest of a row is never read and may hold anything."""
    T, width = block_table.shape
    if not task_ids.numel():
        return 0
    if bool((prefix_lens < 0).any()) or bool((prefix_lens > width * block_size).any()):
        raise ValueError(f"PagedAttention: `prefix_lens` must lie in [0, {width} x {block_size}] (the block "
                         f"table's width x block_size); got {prefix_lens.tolist()}")
    lens = prefix_lens.index_select(0, task_ids)
    used = torch.arange(width)[None, :] * block_size < lens[:, None]
    ids = block_table.index_select(0, task_ids)[used]
    if not ids.numel():
        return 0
    if int(ids.min()) < 0:
        raise ValueError(f"PagedAttention: `block_table` holds block {int(ids.min())} where a prefix is read; "
                         f"expected block ids >= 0")
    return int(ids.max()) + 1


class PagedAttention:
    """Prefix + own-token attention through the compiled kernel, planned once per forward (the
    page table, what each query sees, the prefix tables) and called once per layer.

    Each of the ``N`` queries belongs to a row: it sees its row's task prefix in full and the first
    ``visible`` own tokens of its row (the last ``window`` of them with a sliding window). A decode
    step has one query per row, seeing all of the row's tokens; a causal prefill has one query per
    new token, seeing up to itself.

    Args:
        page_table: ``[B, W]`` page ids of each row's own tokens, in token order.
        visible: ``[N]`` own tokens each query sees (>= 1: at least itself).
        page_size: slots per page of the pools.
        task_ids: ``[B]`` store task ids of the rows, -1 for a row without a prefix (None: no row has one).
        block_table, prefix_lens, block_size: the prefix store's (``[T, nb]``, ``[T]``).
        query_rows: ``[N]`` row of each query (None: query i is row i, N == B).
        num_kv_heads, group_size, head_dim, scale: the layer's attention shape.
        window: sliding window over own keys (None: none), as in the attention contract.
        num_threads: at most this many threads for the call (default, and at most: torch's intra-op count).
    """

    def __init__(self, page_table: torch.Tensor, visible: torch.Tensor, page_size: int,
                 task_ids: Optional[torch.Tensor], block_table: torch.Tensor, prefix_lens: torch.Tensor,
                 block_size: int, *, query_rows: Optional[torch.Tensor] = None, num_kv_heads: int,
                 group_size: int, head_dim: int, scale: float, window: Optional[int] = None,
                 num_threads: Optional[int] = None):
        self.op = load()
        if self.op is None:
            raise RuntimeError(f"PagedAttention: the compiled kernel is unavailable: {_reason}")
        for name, n in (("page_size", page_size), ("block_size", block_size), ("head_dim", head_dim),
                        ("num_kv_heads", num_kv_heads), ("group_size", group_size)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:       # the kernel divides by sizes
                raise ValueError(f"PagedAttention: `{name}` {n!r} is invalid; expected an int >= 1")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"PagedAttention: `window` {window!r} is invalid; expected None or an int >= 1")
        self.page_table, self.visible = _index(page_table, "page_table"), _index(visible, "visible")
        if self.page_table.dim() != 2:
            raise ValueError(f"PagedAttention: `page_table` must be [B, W]; got {list(page_table.shape)}")
        B, N = self.page_table.shape[0], self.visible.shape[0]
        if query_rows is None:
            if N != B:
                raise ValueError(f"PagedAttention: {N} queries for {B} rows need `query_rows`")
            self.query_rows, rows = None, torch.arange(B)
        else:
            self.query_rows = rows = _index(query_rows, "query_rows")
            if rows.shape != (N,) or (N and (int(rows.min()) < 0 or int(rows.max()) >= B)):
                raise ValueError(f"PagedAttention: `query_rows` must be [N={N}] rows in [0, {B})")
        if N and (int(self.visible.min()) < 1 or int(self.visible.max()) > self.page_table.shape[1] * page_size):
            raise ValueError(f"PagedAttention: every query sees 1 .. {self.page_table.shape[1] * page_size} own tokens "
                             f"(its row's pages); `visible` holds {int(self.visible.min())} .. {int(self.visible.max())}")
        self.block_table, self.prefix_lens = _index(block_table, "block_table"), _index(prefix_lens, "prefix_lens")
        if self.block_table.dim() != 2:
            raise ValueError(f"PagedAttention: `block_table` must be [T, blocks]; got {list(block_table.shape)}")
        if self.prefix_lens.shape != self.block_table.shape[:1]:
            raise ValueError(f"PagedAttention: `prefix_lens` must be [T={self.block_table.shape[0]}] (one per "
                             f"block-table row); got {list(prefix_lens.shape)}")
        own_seen = self.visible if window is None else self.visible.clamp_max(window)
        self.slots_needed = _pages_read(self.page_table, self.visible, own_seen, rows, page_size)
        self.task_ids, self.blocks_needed = None, 0
        if task_ids is not None:
            self.task_ids = _index(task_ids, "task_ids")
            if self.task_ids.shape != (B,) or (B and (int(self.task_ids.min()) < -1
                                                    or int(self.task_ids.max()) >= self.prefix_lens.shape[0])):
                raise ValueError(f"PagedAttention: `task_ids` must be [B={B}] ids of the store's tasks (or -1)")
            has = self.task_ids >= 0
            self.blocks_needed = _blocks_read(self.block_table, self.prefix_lens, self.task_ids[has], block_size)
        self.queries, self.page_size, self.block_size = N, page_size, block_size
        self.num_kv_heads, self.group_size, self.head_dim = num_kv_heads, group_size, head_dim
        self.scale, self.window = float(scale), int(window or 0)
        self.num_threads = num_threads or 0                             # 0: ATen's intra-op count

    def __call__(self, q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                 prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> torch.Tensor:
        """``q [N, Hkv, G, D]``; own pools ``[slots, Hkv, D]``; prefix pools ``[blocks, Hkv, block_size, D]``
        (all fp32 CPU) -> ``[N, Hkv, G, D]``."""
        N, Hkv, G, D = self.queries, self.num_kv_heads, self.group_size, self.head_dim
        if tuple(q.shape) != (N, Hkv, G, D) or q.device.type != "cpu":
            raise ValueError(f"PagedAttention: `q` must be a CPU tensor {[N, Hkv, G, D]}; got {list(q.shape)} on {q.device}")
        for name, t, tail in (("pool_k", pool_k, (Hkv, D)), ("pool_v", pool_v, (Hkv, D)),
                              ("prefix_k", prefix_k, (Hkv, self.block_size, D)),
                              ("prefix_v", prefix_v, (Hkv, self.block_size, D))):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() \
                    or tuple(t.shape[1:]) != tail:
                raise ValueError(f"PagedAttention: `{name}` must be a contiguous fp32 CPU tensor [*, "
                                 f"{', '.join(map(str, tail))}]; got {t.dtype} {list(t.shape)} on {t.device}")
        if pool_k.shape[0] != pool_v.shape[0] or pool_k.shape[0] < self.slots_needed:
            raise ValueError(f"PagedAttention: the page table reaches slot {self.slots_needed - 1}; the pools "
                             f"hold {pool_k.shape[0]} / {pool_v.shape[0]}")
        if prefix_k.shape[0] != prefix_v.shape[0] or prefix_k.shape[0] < self.blocks_needed:
            raise ValueError(f"PagedAttention: the block table reaches block {self.blocks_needed - 1}; the "
                             f"prefix pools hold {prefix_k.shape[0]} / {prefix_v.shape[0]}")
        return self.op(q.to(torch.float32).contiguous(), pool_k, pool_v, self.page_table, self.visible,
                       self.query_rows, self.page_size, prefix_k, prefix_v, self.block_table, self.prefix_lens,
                       self.task_ids, self.scale, self.window, self.num_threads)
