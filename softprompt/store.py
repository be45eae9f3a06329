"""The prefix cache: every task's per-layer prefix K/V kept once, in blocks.

Per layer the store holds K and V block pools ``[num_blocks, Hkv, block_size, D]``; a task owns
a list of blocks (the same block indices in every layer), recorded in one block table. Adding,
replacing or removing a task touches only that task's blocks; freed blocks are reused, the
pools grow (doubling) when they run out and shrink (``compact``) when removals leave most of them
free, so a burst of large temporary tasks (long few-shot prompts in an evaluation) does not make
every later forward copy or differentiate a mostly empty pool. ``layer(i)`` returns exactly the
``(prefix_k, prefix_v, block_table, prefix_lens)`` that ``kernels.prefix_attention`` takes.

Task ids are rows of the block table and are never reused while the store lives: a removed task's
row stays behind, empty (prefix length 0, no blocks), so an id held by a caller after its task was
removed cannot silently come to mean another task. ``check_task_ids`` refuses such ids (the model
integration calls it on every ``task_ids`` it receives); ``kernels.prefix_attention`` called
directly on ``layer(i)`` cannot tell a dead row from an empty prefix. A row costs
``8 * (width + 1)`` bytes of the table; the pool blocks, which hold the data, are reused.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn


def _err(name: str, seen, allowed: str) -> ValueError:
    return ValueError(f"PrefixStore: `{name}` {seen} is invalid; expected {allowed}")


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def _dtype(dtype) -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or its name ("float16", "fp16", "torch.bfloat16", ...)."""
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in _DTYPE_NAMES:
            raise _err("dtype", repr(dtype), f"a floating torch.dtype or one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _err("dtype", repr(dtype), f"a floating torch.dtype or one of {sorted(_DTYPE_NAMES)}")
    return dtype


def _device(device) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` on which tensors can be made (None: torch's default)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise _err("device", repr(device), f"an available torch device ({exc})") from None
    return parsed


def _version(t: torch.Tensor) -> Optional[int]:
    """The tensor's in-place modification counter; None for inference tensors (they keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(name, repr(value), "a positive int" if minimum == 1 else f"an int >= {minimum}")


class PrefixStore(nn.Module):
    """Block-paged storage of per-task, per-layer prefix keys and values.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry.
        block_size: prefix rows per block.
        num_blocks: initial pool capacity (grows on demand).
        dtype, device: of the pools; ``dtype`` a floating ``torch.dtype`` or its name
            ("float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16", "float64").
        trainable: keep the pools as ``nn.Parameter`` so gradients reach stored prefixes.
            Growing the pool then replaces the parameters: create optimizers after adding tasks.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int = 16,
                 num_blocks: int = 0, dtype: torch.dtype = torch.float32, device=None,
                 trainable: bool = False):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("block_size", block_size)):
            _count(name, value, 1)
        _count("num_blocks", num_blocks, 0)
        dtype, device = _dtype(dtype), _device(device)
        if not isinstance(trainable, bool):
            raise _err("trainable", repr(trainable), "True or False")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.trainable = trainable
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self._set_pools(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("block_table", torch.zeros((0, 0), dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("prefix_lens", torch.zeros((0,), dtype=torch.long, device=device),
                             persistent=False)
        self._ids: Dict[str, int] = {}            # task name -> task id (row of the block table)
        self._names: Dict[int, str] = {}
        self._lens: Dict[int, int] = {}           # task id -> prefix length
        self._blocks: Dict[int, List[int]] = {}   # task id -> its blocks, in order
        self._free_blocks: List[int] = list(range(num_blocks))
        self._num_slots = 0                       # rows of the block table = ids ever given (never reused)
        self._live = torch.zeros((0,), dtype=torch.bool)   # [rows] task alive (CPU)
        self._table_version = 0                   # bumped by every change of the live ids
        self._checked = None                      # the task_ids tensor last checked (see _already_checked)

    def __getstate__(self):
        state = super().__getstate__()
        state["_checked"] = None                  # a weak reference does not pickle
        return state

    # ------------------------------------------------------------------ pools
    def _set_pools(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.trainable:
            self.k_blocks = nn.Parameter(k)
            self.v_blocks = nn.Parameter(v)
        else:
            for name, t in (("k_blocks", k), ("v_blocks", v)):
                if name in self._parameters:
                    del self._parameters[name]
                self.register_buffer(name, t)

    def swap_pools(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Put ``k, v`` (same shape, dtype and device as the pools; e.g. copies in which some tasks'
        blocks hold differentiable values) in place of the pools, without copying; returns the old
        pair, to swap back. Used by training to route gradients into prompt modules."""
        if self.trainable:
            raise ValueError("PrefixStore.swap_pools: the pools of a trainable store are parameters (an "
                             "optimizer holds them); swap only buffer pools")
        old = self.k_blocks, self.v_blocks
        for name, t, ref in (("k", k, old[0]), ("v", v, old[1])):
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise _err(name, f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}",
                           f"a tensor like the pool: {tuple(ref.shape)} {ref.dtype} on {ref.device}")
        self._buffers["k_blocks"], self._buffers["v_blocks"] = k, v
        return old

    @property
    def num_blocks(self) -> int:
        return self.k_blocks.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_blocks.dtype

    @property
    def device(self) -> torch.device:
        return self.k_blocks.device

    def reserve(self, num_blocks: int) -> None:
        """Grow the pools to at least ``num_blocks`` blocks; existing blocks keep their contents."""
        _count("num_blocks", num_blocks, 0)
        old = self.num_blocks
        if num_blocks <= old:
            return
        self._resize_pools(num_blocks, keep=None)
        self._free_blocks.extend(range(old, num_blocks))

    def _resize_pools(self, num_blocks: int, keep: Optional[torch.Tensor]) -> None:
        """New zeroed pools of ``num_blocks`` blocks starting with the old pools' blocks ``keep``
        (all of them, in place, when None)."""
        with torch.no_grad():
            pools = []
            for pool in (self.k_blocks, self.v_blocks):
                new = torch.zeros((pool.shape[0], num_blocks) + tuple(pool.shape[2:]), dtype=pool.dtype,
                                  device=pool.device)
                kept = pool.detach() if keep is None else pool.detach().index_select(1, keep)
                new[:, : kept.shape[1]] = kept
                pools.append(new)
        self._set_pools(*pools)

    def compact(self, spare: int = 0) -> None:
        """Move the blocks in use to the front of the pools and cut them to ``used + spare`` blocks
        (never grows them: that is ``reserve``'s job). Task ids and contents are kept; block indices
        change (the block table is rebuilt)."""
        _count("spare", spare, 0)
        order = [b for t in sorted(self._blocks) for b in self._blocks[t]]
        size = min(len(order) + spare, self.num_blocks)
        if size == self.num_blocks and order == list(range(len(order))):
            return
        self._resize_pools(size, keep=torch.tensor(order, dtype=torch.long, device=self.device))
        start = 0
        for t in sorted(self._blocks):
            n = len(self._blocks[t])
            self._blocks[t] = list(range(start, start + n))
            start += n
        self._free_blocks = list(range(start, size))
        self._rebuild_table()

    def _allocate(self, count: int) -> List[int]:
        if count > len(self._free_blocks):
            in_use = self.num_blocks - len(self._free_blocks)
            self.reserve(max(2 * self.num_blocks, in_use + count, 1))
        self._free_blocks.sort()
        blocks, self._free_blocks = self._free_blocks[:count], self._free_blocks[count:]
        return blocks

    # ------------------------------------------------------------------ tasks
    def _check_shapes(self, k, v) -> None:
        want = f"[L={self.num_layers}, Hkv={self.num_kv_heads}, P, D={self.head_dim}]"
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise _err(name, f"of type {type(t).__name__}", f"a tensor {want}")
            if not t.dtype.is_floating_point:
                raise _err(name, f"with dtype {t.dtype}", "a floating dtype")
            if (t.dim() != 4 or t.shape[0] != self.num_layers or t.shape[1] != self.num_kv_heads
                    or t.shape[3] != self.head_dim):
                raise _err(name, f"with shape {tuple(t.shape)}", want)
        if v.shape != k.shape:
            raise _err("v", f"with shape {tuple(v.shape)}", f"the shape of k {tuple(k.shape)}")

    def _check_prefix(self, k, v) -> Tuple[torch.Tensor, torch.Tensor]:
        """Valid ``k, v`` cast to the pools' dtype (detached); finiteness is checked after the cast,
        so values beyond the pool dtype's range (1e5 into float16) are refused, not stored as inf."""
        self._check_shapes(k, v)
        out = []
        for name, t in (("k", k), ("v", v)):
            cast = t.detach().to(self.dtype)
            if not bool(torch.isfinite(cast).all()):
                if not bool(torch.isfinite(t).all()):
                    raise _err(name, "containing NaN or inf", "finite values")
                limit = torch.finfo(self.dtype).max
                raise _err(name, f"with values up to {float(t.detach().abs().max()):.4g}",
                           f"values within the store dtype {self.dtype}'s range (|x| <= {limit:.4g})")
            out.append(cast)
        return out[0], out[1]

    def _write(self, task: int, k: torch.Tensor, v: torch.Tensor) -> None:
        P = k.shape[2]
        blocks = self._allocate(-(-P // self.block_size))
        bs = self.block_size
        try:
            with torch.no_grad():
                for n, block in enumerate(blocks):
                    rows = slice(n * bs, min((n + 1) * bs, P))
                    width = rows.stop - rows.start
                    for pool, src in ((self.k_blocks, k), (self.v_blocks, v)):
                        pool[:, block, :, :width] = src[:, :, rows]
                        pool[:, block, :, width:] = 0
        except BaseException:
            self._free_blocks.extend(blocks)            # a failed copy must not leak blocks
            raise
        self._blocks[task] = blocks
        self._lens[task] = P

    def _release(self, task: int) -> None:
        self._free_blocks.extend(self._blocks.pop(task, []))
        self._lens.pop(task, None)

    def add(self, name: str, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store a new task's prefix (``k, v [L, Hkv, P, D]``, P may be 0); returns its task id."""
        if not isinstance(name, str) or not name:
            raise _err("name", repr(name), "a non-empty str")
        if name in self._ids:
            raise _err("name", repr(name), "a name not already stored (use replace() to overwrite)")
        k, v = self._check_prefix(k, v)
        task = self._num_slots                  # a fresh row: ids of removed tasks are never reused
        self._write(task, k, v)
        self._num_slots += 1
        self._ids[name], self._names[task] = task, name
        self._rebuild_table()
        return task

    def replace(self, name: str, k: torch.Tensor, v: torch.Tensor) -> int:
        """Overwrite a stored task's prefix (its length may change); its task id is kept."""
        task = self.task_id(name)
        k, v = self._check_prefix(k, v)
        self._release(task)
        self._write(task, k, v)
        self._rebuild_table()
        return task

    def remove(self, name: str) -> None:
        """Forget a task; its blocks return to the free list. Its id is never given to another task:
        ``check_task_ids`` (and so the model integration) refuses it from now on. When more than
        three quarters of a pool over 64 blocks are then free, it shrinks to twice the blocks in use (not for
        trainable pools: an optimizer may hold them)."""
        task = self.task_id(name)
        self._release(task)
        del self._ids[name], self._names[task]
        self._rebuild_table()
        used = self.num_blocks - len(self._free_blocks)
        if not self.trainable and self.num_blocks > 64 and used < self.num_blocks // 4:
            self.compact(spare=used)

    def _rebuild_table(self) -> None:
        width = max((len(b) for b in self._blocks.values()), default=0)
        table = torch.full((self._num_slots, width), -1, dtype=torch.long)
        lens = torch.zeros((self._num_slots,), dtype=torch.long)
        for task, blocks in self._blocks.items():
            table[task, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            lens[task] = self._lens[task]
        self.block_table = table.to(self.device)
        self.prefix_lens = lens.to(self.device)
        self._live = torch.zeros((self._num_slots,), dtype=torch.bool)
        self._live[list(self._names)] = True
        self._table_version += 1

    # ------------------------------------------------------------------ lookup
    def task_id(self, name: str) -> int:
        if not isinstance(name, str) or name not in self._ids:
            raise _err("name", repr(name), f"one of the stored tasks {sorted(self._ids)}")
        return self._ids[name]

    def task_ids(self, names: Union[str, Iterable[str]]) -> torch.Tensor:
        """Task ids of a batch given by task names (one name: a batch of one), as a LongTensor
        ``[B]`` on the store's device."""
        if isinstance(names, str):
            names = [names]         # not its characters
        elif isinstance(names, torch.Tensor) or not isinstance(names, Iterable):
            raise _err("names", f"of type {type(names).__name__}", "a task name or a sequence of task names")
        return torch.tensor([self.task_id(n) for n in names], dtype=torch.long, device=self.device)

    def check_task_ids(self, task_ids: torch.Tensor) -> None:
        """``ValueError`` naming ``task_ids`` unless every entry is the id of a stored task: not
        negative, not past the table, not the id of a removed task. Synchronises once per new
        (or modified) ``task_ids`` tensor and change of the store (layers of one forward share it)."""
        if (not isinstance(task_ids, torch.Tensor) or task_ids.dtype.is_floating_point or task_ids.dtype.is_complex
                or task_ids.dtype == torch.bool):
            raise _err("task_ids", f"of type {type(task_ids).__name__} {getattr(task_ids, 'dtype', '')}".rstrip(),
                       "an integer tensor of task ids")
        if self._already_checked(task_ids):
            return
        ids = task_ids.reshape(-1).long()
        if ids.numel():
            live = torch.cat([self._live, self._live.new_zeros(1)]).to(ids.device)   # last: "out of range"
            T = self._live.shape[0]
            out_of_range = (ids < 0) | (ids >= T)
            dead = ~live[torch.where(out_of_range, T, ids)] & ~out_of_range
            bad_range, bad_dead = torch.stack([out_of_range.any(), dead.any()]).tolist()
            if bad_range:
                raise _err("task_ids", f"with values in [{int(ids.min())}, {int(ids.max())}]",
                           f"ids of stored tasks {self._short_ids()} (the table has {T} rows)")
            if bad_dead:
                gone = sorted(set(ids[dead].tolist()))
                raise _err("task_ids", f"naming removed tasks (ids {gone})",
                           f"ids of stored tasks {self._short_ids()}; ids of removed tasks are never reused")
        version = _version(task_ids)
        self._checked = (weakref.ref(task_ids), self._table_version, version,
                         task_ids.detach().clone() if version is None else None)

    def _already_checked(self, task_ids: torch.Tensor) -> bool:
        """The same tensor, unchanged since it was checked against this state of the store."""
        if self._checked is None:
            return False
        ref, table_version, version, values = self._checked
        if ref() is not task_ids or table_version != self._table_version:
            return False
        if values is not None:                  # no version counter: compare the values
            return values.shape == task_ids.shape and bool(torch.equal(values, task_ids))
        return version == _version(task_ids)

    def _short_ids(self, limit: int = 8) -> str:
        items = [f"{n!r}: {t}" for t, n in sorted(self._names.items())]
        more = f", ... ({len(items)} tasks)" if len(items) > limit else ""
        return "{" + ", ".join(items[:limit]) + more + "}"

    def task_name(self, task: int) -> str:
        if isinstance(task, bool) or not isinstance(task, int) or task not in self._names:
            raise _err("task", repr(task), f"one of the stored task ids {sorted(self._names)}")
        return self._names[task]

    @property
    def names(self) -> List[str]:
        return [self._names[t] for t in sorted(self._names)]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def prefix_len(self, name: str) -> int:
        return self._lens[self.task_id(name)]

    def get(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """A copy of a task's prefix as ``k, v [L, Hkv, P, D]``."""
        task = self.task_id(name)
        P, blocks = self._lens[task], self._blocks[task]
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        out = []
        for pool in (self.k_blocks, self.v_blocks):
            g = pool[:, idx]                                     # [L, n, Hkv, bs, D]
            L, n, H, bs, D = g.shape
            out.append(g.permute(0, 2, 1, 3, 4).reshape(L, H, n * bs, D)[:, :, :P].detach().clone())
        return out[0], out[1]

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prefix_k, prefix_v, block_table, prefix_lens)`` of layer ``i``, ready for prefix_attention."""
        if isinstance(i, bool) or not isinstance(i, int) or not -self.num_layers <= i < self.num_layers:
            raise _err("layer", repr(i), f"an int in [0, {self.num_layers})")
        return self.k_blocks[i], self.v_blocks[i], self.block_table, self.prefix_lens

    # ------------------------------------------------------------------ accounting
    def memory_stats(self) -> dict:
        """Bytes and blocks: allocated pools, blocks in use, free blocks, and each task's share."""
        per_block = 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim \
            * self.k_blocks.element_size()
        used = sum(len(b) for b in self._blocks.values())
        return {
            "block_size": self.block_size,
            "blocks_total": self.num_blocks,
            "blocks_used": used,
            "blocks_free": len(self._free_blocks),
            "bytes_per_block": per_block,
            "bytes_allocated": per_block * self.num_blocks,
            "bytes_used": per_block * used,
            "prefix_rows": sum(self._lens.values()),
            "table_rows": self._num_slots,      # ids ever given (rows of removed tasks stay, empty)
            "tasks": {self._names[t]: {"id": t, "prefix_len": self._lens[t], "blocks": len(b),
                                       "bytes": per_block * len(b)}
                      for t, b in sorted(self._blocks.items())},
        }

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, blocks={self.num_blocks}, tasks={len(self)}, "
                f"dtype={self.dtype}")
