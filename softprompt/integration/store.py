"""``ModelPrefixStore``: a :class:`~softprompt.PrefixStore` that speaks the cache convention.

``add/replace`` take and ``get`` returns a prefix as ``k, v [L, Hkv, P, D]`` in cache convention
(the K/V a KV cache would hold in front of the sequence; real tokens at ``P .. P+S-1``). For RoPE
families the pools hold the keys rotated by ``-P`` (see :mod:`.positions`); that conversion is
invisible to callers. Learned-position families store keys unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ..store import PrefixStore
from .families import Family
from .positions import rotate_keys


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ModelPrefixStore(PrefixStore):
    """The prefix store of one attached model (created by :func:`softprompt.attach`).

    Extra attributes: ``family`` (a :class:`Family`), ``backend`` (``None`` = Triton on CUDA,
    ``torch`` elsewhere, or a ``prefix_attention`` backend name), ``calls`` (how many attention
    calls took each path: ``"lengths"`` (mask reduced to q/kv lengths), ``"mask"`` (bool
    ``attn_mask``), ``"dense"`` (calls with a plan option the no-copy kernels lack: soft-capping,
    attention dropout, an additive float bias; computed on ``kernels/dense_backend.py``)).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, family: Family,
                 inv_freq: Optional[torch.Tensor] = None, rotary_dim: int = 0, backend=None,
                 block_size: int = 16, dtype=torch.float32, device=None, trainable: bool = False):
        super().__init__(num_layers, num_kv_heads, head_dim, block_size=block_size, dtype=dtype,
                         device=device, trainable=trainable)
        self.family = family
        self._inv_freq = inv_freq          # float64 on the CPU; None for learned positions
        self.rotary_dim = rotary_dim
        self.backend = backend
        self.calls = {"lengths": 0, "mask": 0, "dense": 0}

    # ------------------------------------------------------------------ conventions
    def to_stored(self, k: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """Cache-convention keys ``[..., P, D]`` -> what the pools hold (differentiable)."""
        if self._inv_freq is None:
            return k
        return rotate_keys(k, -prefix_len, self._inv_freq, self.rotary_dim)

    def to_cache(self, k: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """Stored keys (or their gradients) ``[..., P, D]`` -> cache convention (differentiable)."""
        if self._inv_freq is None:
            return k
        return rotate_keys(k, prefix_len, self._inv_freq, self.rotary_dim)

    def add(self, name: str, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store a task's prefix given in cache convention, ``k, v [L, Hkv, P, D]``; returns its id."""
        self._check_shapes(k, v)       # values are checked by the base class after rotation and cast
        return super().add(name, self.to_stored(k.detach(), k.shape[2]), v.detach())

    def replace(self, name: str, k: torch.Tensor, v: torch.Tensor) -> int:
        """Overwrite a task's prefix (cache convention); its task id is kept."""
        self._check_shapes(k, v)
        return super().replace(name, self.to_stored(k.detach(), k.shape[2]), v.detach())

    def get(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """A copy of a task's prefix in cache convention, ``k, v [L, Hkv, P, D]``."""
        k, v = super().get(name)
        return self.to_cache(k, k.shape[2]), v

    def get_stored(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """A copy of a task's prefix exactly as the pools hold it."""
        return super().get(name)

    def prefix_grad(self, name: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Gradients of a task's prefix (trainable store), in cache convention ``[L, Hkv, P, D]``.

        For RoPE families the pools hold ``R(-P) k``, an orthogonal map of the cache-convention
        keys, so ``dL/dk = R(+P) dL/dk_stored``.
        """
        task = self.task_id(name)
        P, blocks = self._lens[task], self._blocks[task]
        out = []
        for pool in (self.k_blocks, self.v_blocks):
            g = getattr(pool, "grad", None)
            if g is None:
                out.append(None)
                continue
            g = g[:, torch.tensor(blocks, dtype=torch.long, device=g.device)]
            L, n, H, bs, D = g.shape
            out.append(g.permute(0, 2, 1, 3, 4).reshape(L, H, n * bs, D)[:, :, :P].clone())
        if out[0] is not None:
            out[0] = self.to_cache(out[0], P)
        return out[0], out[1]

    # ------------------------------------------------------------------ batches
    def resolve_task_ids(self, task_ids: Union[torch.Tensor, Sequence, int, str], batch: Optional[int] = None,
                         device=None) -> torch.Tensor:
        """Task ids of a batch as a LongTensor: ids (tensor/list/int) or task names (str/list of str).
        Ids must name stored tasks: negative ids, ids past the table and ids of removed tasks are a
        ``ValueError`` naming ``task_ids`` (never a silent empty prefix)."""
        if isinstance(task_ids, str):
            task_ids = [task_ids]
        if isinstance(task_ids, (list, tuple)) and task_ids and all(isinstance(t, str) for t in task_ids):
            ids = self.task_ids(task_ids)                  # names: always live ids
        elif isinstance(task_ids, torch.Tensor):
            if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool or task_ids.dim() > 1:
                raise ValueError(f"softprompt: `task_ids` with dtype {task_ids.dtype} and shape "
                                 f"{tuple(task_ids.shape)} is invalid; expected an int tensor [B] or task names")
            self.check_task_ids(task_ids)                  # memoised: the layers of a forward share it
            ids = task_ids.reshape(-1).long()
        elif _is_int(task_ids) or (isinstance(task_ids, (list, tuple)) and all(_is_int(t) for t in task_ids)):
            ids = torch.tensor([task_ids] if _is_int(task_ids) else list(task_ids), dtype=torch.long)
            self.check_task_ids(ids)
        else:
            raise ValueError(f"softprompt: `task_ids` {task_ids!r} is invalid; expected an int tensor [B], "
                             "a list of ints, or task names")
        ids = ids.to(device if device is not None else self.device)
        if batch is not None and ids.numel() != batch:
            if ids.numel() == 1:
                ids = ids.expand(batch)
            else:
                raise ValueError(f"softprompt: `task_ids` with {ids.numel()} entries is invalid for a batch of "
                                 f"{batch} sequences; expected one task id per sequence (pass a tensor to "
                                 "generate() so beams/num_return_sequences repeat it)")
        return ids

    def prefix_offsets(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` prefix length of each row's task."""
        self.check_task_ids(task_ids)
        return self.prefix_lens.to(task_ids.device)[task_ids]

    def extra_repr(self) -> str:
        return f"family={self.family.name}, " + super().extra_repr()
