"""The engine's forwards of Llama-family models on the CPU, computed without the HF forward.

A decode step feeds one token per running sequence. On the CPU its cost is the weight GEMMs plus
everything around them, and with a few dozen rows "everything around them" is most of it: the HF
forward's per-layer Python, the attention-interface plumbing, and the ``[B, hidden]`` layout, which
makes each ``nn.Linear`` a ``x @ W^T`` product (the slow form for CPU BLAS at this shape, see
``small_gemm.py``) followed by transposes and copies.

:class:`CpuDecoder` runs the same computation with activations kept *feature-major*,
``[hidden, B]``: every projection is ``W @ x`` straight from the module's own weight (no copy of
the model), its output is already the next product's input, and only the attention transposes
(small) tensors. Per layer: RMSNorm, Q/K/V projections, RoPE with the model's own rotary module,
new K/V written into the engine's pages, prefix + own attention planned once per step, output
projection, gated MLP. The attention is the compiled kernel (:mod:`~softprompt.engine.cpu_kernel`:
the task's prefix blocks and the row's own pages read in place) where it builds and the pools are
fp32, else torch ops (:mod:`~softprompt.engine.decode_attention`: own K/V gathered from the pages,
the prefix read in place from the store). The result equals the HF forward up to floating-point
summation order; the engine's greedy-parity tests run through it.

:meth:`CpuDecoder.prefill` serves a step's prefills the same way but token-major (``[N, hidden]``
through the model's own modules, ``x W^T`` being the fast form at prefill row counts) with the real
tokens of every row packed, so the linear layers see no padding; the kernel attends the packed
tokens where they are, the torch path unpacks them per batch.

Only the families whose decoder layer is exactly that computation are taken (Llama, Mistral,
Qwen2 — see :func:`unsupported_reason`); every other model, a model in training mode, and every
GPU step keep the HF forward (:mod:`~softprompt.engine.runner` chooses).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from softprompt.kernels import plan_for_layer

from ..integration.attention import sliding_window_of
from . import cpu_kernel
from .decode_attention import DecodeAttention, split_by_length

# Causal-LM classes whose decoder layer is: x += o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)));
# x += down(act(gate(n2 x)) * up(n2 x)), RMSNorm everywhere, RoPE on the full head.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """None when :class:`CpuDecoder` computes this model's decode step exactly; else why not."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of {SUPPORTED}"
    body = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or any(not hasattr(body, n) for n in needed) or not hasattr(model, "lm_head"):
        return f"{name} lacks the expected modules {needed}"
    if type(model.lm_head) is not nn.Linear:
        return "the output head is not a plain nn.Linear"
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not nn.Linear for m in linears):
            return "a projection is not a plain nn.Linear (quantised or adapted weights)"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return "per-head q/k norms are not part of this decode path"
    cfg = model.config
    rotary = body.rotary_emb
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embeddings are not part of this decode path"
    if not hasattr(rotary, "forward"):
        return "no rotary embedding module"
    return None


class CpuDecoder:
    """The engine's CPU forwards of a supported model: :meth:`step` (a decode step, one new token
    per row, feature-major) and :meth:`prefill` (a step's prefills, packed token-major).

    Args:
        model: a supported causal LM (:func:`unsupported_reason` is None), attached to ``store``.
        store: the model's prefix store (``softprompt.attach``).
        kv: the engine's :class:`~softprompt.engine.kv_cache.PagedKVCache`.
        compiled_attention: attention (decode steps and prefills) through the compiled kernel
            (:mod:`~softprompt.engine.cpu_kernel`: prefix and own pages read in place) when it is
            available and the pools are fp32; False keeps torch ops (:class:`DecodeAttention`,
            ``kernels.prefix_attention``).
    """

    def __init__(self, model: nn.Module, store, kv, *, compiled_attention: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"CpuDecoder: the model is not supported: {reason}")
        self.model, self.store, self.kv = model, store, kv
        body = model.model
        self.embed, self.final_norm, self.rotary, self.head = body.embed_tokens, body.norm, body.rotary_emb, model.lm_head
        self.layers: List[nn.Module] = list(body.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_q_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.compiled_attention = bool(compiled_attention) and cpu_kernel.load() is not None

    def _use_kernel(self) -> bool:
        return (self.compiled_attention and self.kv.k.dtype == torch.float32
                and self.store.layer(0)[0].dtype == torch.float32)

    def attention_path(self) -> str:
        """How the attention runs now, in words (for reports)."""
        if self._use_kernel():
            return "compiled paged attention"
        if not self.compiled_attention:
            why = cpu_kernel.unavailable_reason() or "turned off"
        else:
            why = "the KV pools or the prefix store are not fp32"
        return f"attention through torch ops (compiled kernel: {why})"

    @staticmethod
    def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``module`` applied to feature-major ``x [in, B]``: ``[out, B]``."""
        if module.bias is None:
            return torch.mm(module.weight, x)
        return torch.addmm(module.bias[:, None], module.weight, x)

    @staticmethod
    def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The families' RMSNorm (fp32 statistics, weight applied in the input dtype) over dim 0."""
        eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            eps = norm.eps
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + eps)
        return norm.weight[:, None] * h.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` rotated (rotate_half layout) along its head dimension ``dim`` by ``cos, sin``
        (broadcastable to ``x``): ``[H, D, B]`` with ``dim=1`` when decoding, ``[N, H, D]`` with
        ``dim=-1`` in a packed prefill."""
        first, second = x.chunk(2, dim=dim)
        return x * cos + torch.cat([-second, first], dim=dim) * sin

    def step(self, token_ids: torch.Tensor, cache, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one decode step; writes the new K/V into ``cache``'s slots.

        Args:
            token_ids: ``[B]`` the rows' newest tokens.
            cache: the step's :class:`~softprompt.engine.kv_cache.StepCache` (every row ``Sq == 1``).
            task_ids: ``[B]`` store task ids, or None (no prefix for any row).
        """
        B = token_ids.shape[0]
        if cache.Sq != 1 or cache.batch != B:
            raise ValueError(f"CpuDecoder.step: a decode step needs one new token per row; got Sq={cache.Sq} "
                             f"for {cache.batch} rows and {B} tokens")
        Hq, Hkv, D = self.num_q_heads, self.num_kv_heads, self.head_dim
        Skv, dtype = cache.Skv, self.embed.weight.dtype
        x = self.embed(token_ids).t().contiguous()                          # [hidden, B]
        cos, sin = self.rotary(x, cache.position_ids)                       # [B, 1, D]
        cos, sin = cos[:, 0].t().contiguous(), sin[:, 0].t().contiguous()   # [D, B]
        _, _, block_table, prefix_lens = self.store.layer(0)
        plans = {}                                   # one attention plan per (window, scale) in use
        use_kernel = self._use_kernel()
        if not use_kernel:
            # the rows' own K/V are gathered in one or two parts (short rows apart when that saves
            # enough padding); each part's gather index and buffer are reused by every layer
            parts = split_by_length(cache.own_lens, Skv)
            table = cache.gather_index.view(B, Skv)
            gathers = [(cache.gather_index if rows is None
                        else table.index_select(0, rows)[:, Skv - width:].reshape(-1),
                        torch.empty(2, (B if rows is None else rows.shape[0]) * width, Hkv, D, dtype=self.kv.k.dtype),
                        width) for rows, width in parts]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._rms_norm(layer.input_layernorm, x)
            q = self._rope(self._linear(attn.q_proj, h).view(Hq, D, B), cos, sin, dim=1)
            k = self._rope(self._linear(attn.k_proj, h).view(Hkv, D, B), cos, sin, dim=1)
            v = self._linear(attn.v_proj, h)
            pool_k, pool_v = self.kv.k[i], self.kv.v[i]
            # token-major copies first: index_copy_ from a transposed source is slower
            pool_k.view(-1, Hkv * D).index_copy_(0, cache.write_dst, k.view(Hkv * D, B).t().to(pool_k.dtype).contiguous())
            pool_v.view(-1, Hkv * D).index_copy_(0, cache.write_dst, v.t().to(pool_v.dtype).contiguous())
            prefix_k, prefix_v, _, _ = self.store.layer(i)
            q4 = q.permute(2, 0, 1).reshape(B, Hkv, Hq // Hkv, D).float()    # [B, Hkv, G, D]
            key = (sliding_window_of(attn), attn.scaling)
            if use_kernel:
                if key not in plans:
                    plans[key] = cpu_kernel.PagedAttention(
                        cache.page_table, cache.own_lens, self.kv.page_size, task_ids, block_table, prefix_lens,
                        self.store.block_size, num_kv_heads=Hkv, group_size=Hq // Hkv, head_dim=D,
                        scale=key[1], window=key[0])
                out = plans[key](q4, pool_k, pool_v, prefix_k, prefix_v)
            else:
                own = []
                for index, buffer, width in gathers:
                    torch.index_select(pool_k, 0, index, out=buffer[0])
                    torch.index_select(pool_v, 0, index, out=buffer[1])
                    own.append([t.view(-1, width, Hkv * D).float() for t in buffer])
                if key not in plans:
                    plans[key] = DecodeAttention(task_ids, block_table, prefix_lens, self.store.block_size,
                                                 cache.own_lens, Skv, num_kv_heads=Hkv, group_size=Hq // Hkv,
                                                 scale=key[1], window=key[0], parts=parts)
                out = plans[key](q4, own, prefix_k.float(), prefix_v.float())
            x = x + self._linear(attn.o_proj, out.view(B, Hq * D).t().to(dtype))
            h = self._rms_norm(layer.post_attention_layernorm, x)
            gated = mlp.act_fn(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h)
            x = x + self._linear(mlp.down_proj, gated)
        return self._head_rows(self._rms_norm(self.final_norm, x))

    HEAD_CHUNK = 1024       # vocabulary rows per product: each [chunk, B] result is transposed while in cache

    def _head_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of feature-major ``h [hidden, B]``, a chunk of vocabulary rows at a
        time: each small ``[chunk, B]`` product is transposed while it is still in cache, instead of
        the whole ``[vocab, B]`` result with a cache-hostile stride (same rows of the same GEMM)."""
        weight, bias = self.head.weight, self.head.bias
        out = h.new_empty(h.shape[1], weight.shape[0])
        for start in range(0, weight.shape[0], self.HEAD_CHUNK):
            rows = slice(start, start + self.HEAD_CHUNK)
            part = torch.mm(weight[rows], h) if bias is None else torch.addmm(bias[rows, None], weight[rows], h)
            out[:, rows].copy_(part.t())
        return out

    def prefill(self, parts) -> List[torch.Tensor]:
        """One forward over several prefill batches; returns each batch's logits ``[B_g, vocab]``
        (of every row's last new token) and writes their K/V into the pages.

        ``parts``: ``[(cache, token_ids [B_g, Sq_g] left-padded, task_ids or None)]``, one
        :class:`~softprompt.engine.kv_cache.StepCache` per batch. The real new tokens of all batches
        are packed token-major ``[N, hidden]`` and go through the model's own norm, linear and MLP
        modules (``x W^T``, the fast form at prefill row counts) with no padding. The compiled
        kernel attends each packed query in place (its row's prefix and own pages up to itself);
        the torch path unpacks each batch into its left-padded ``[B_g, Hq, Sq_g, D]`` layout.
        """
        Hq, Hkv, D = self.num_q_heads, self.num_kv_heads, self.head_dim
        ids = torch.cat([t.reshape(-1).index_select(0, c.write_src) for c, t, _ in parts])       # [N]
        positions = torch.cat([c.position_ids.reshape(-1).index_select(0, c.write_src) for c, _, _ in parts])
        sizes = [c.write_src.numel() for c, _, _ in parts]
        N = ids.shape[0]
        x = self.embed(ids)                                                  # [N, hidden]
        cos, sin = self.rotary(x, positions[None])                           # [1, N, D]
        cos, sin = cos[0, :, None], sin[0, :, None]                          # [N, 1, D]
        _, _, block_table, prefix_lens = self.store.layer(0)
        use_kernel = self._use_kernel()
        if use_kernel:
            packed = self._packed_queries(parts)
            plans = {}
        else:
            shapes = self._padded_shapes(parts, block_table, prefix_lens)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rope(attn.q_proj(h).view(N, Hq, D), cos, sin, dim=-1)
            k = self._rope(attn.k_proj(h).view(N, Hkv, D), cos, sin, dim=-1)
            v = attn.v_proj(h).view(N, Hkv, D)
            pool_k, pool_v = self.kv.k[i], self.kv.v[i]
            prefix_k, prefix_v, _, _ = self.store.layer(i)
            if use_kernel:
                # every query in place: its row's prefix and own pages up to itself, no unpacking
                page_table, visible, query_rows, task_ids, write_dst = packed
                pool_k.index_copy_(0, write_dst, k.to(pool_k.dtype))
                pool_v.index_copy_(0, write_dst, v.to(pool_v.dtype))
                key = (sliding_window_of(attn), attn.scaling)
                if key not in plans:
                    plans[key] = cpu_kernel.PagedAttention(
                        page_table, visible, self.kv.page_size, task_ids, block_table, prefix_lens,
                        self.store.block_size, query_rows=query_rows, num_kv_heads=Hkv, group_size=Hq // Hkv,
                        head_dim=D, scale=key[1], window=key[0])
                out = plans[key](q.view(N, Hkv, Hq // Hkv, D), pool_k, pool_v, prefix_k, prefix_v)
                out = out.view(N, Hq, D).to(q.dtype)                   # the kernel works in fp32
            else:
                out = self._padded_attention(parts, shapes, sizes, q, k, v, pool_k, pool_v, prefix_k, prefix_v,
                                             attn)
            x = x + attn.o_proj(out.view(N, Hq * D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last, at = [], 0                           # packed index of every row's last new token
        for (cache, _, _), n in zip(parts, sizes):
            last.append(at + self._last_of(cache))
            at += n
        logits = self.head(self.final_norm(x.index_select(0, torch.cat(last))))
        return list(logits.split([c.batch for c, _, _ in parts]))

    @staticmethod
    def _packed_queries(parts):
        """For the kernel: one page table over the rows of every batch, and per packed query its
        row, how many own tokens it sees (its position + 1) and where its K/V go."""
        width = max(cache.page_table.shape[1] for cache, _, _ in parts)
        tables, tasks, rows, visible, dst = [], [], [], [], []
        first = 0
        for cache, _, task_ids in parts:
            tables.append(nn.functional.pad(cache.page_table, (0, width - cache.page_table.shape[1])))
            tasks.append(task_ids.cpu() if task_ids is not None else torch.full((cache.batch,), -1, dtype=torch.long))
            rows.append(cache.write_src // cache.Sq + first)
            visible.append(cache.position_ids.reshape(-1).index_select(0, cache.write_src) + 1)
            dst.append(cache.write_dst)
            first += cache.batch
        any_task = any(task_ids is not None for _, _, task_ids in parts)
        return (torch.cat(tables), torch.cat(visible), torch.cat(rows), torch.cat(tasks) if any_task else None,
                torch.cat(dst))

    @staticmethod
    def _padded_shapes(parts, block_table, prefix_lens):
        """For the torch path, per batch: own-key ranges and its prefix table."""
        shapes = []
        for cache, _, task_ids in parts:
            starts = cache.Skv - cache.own_lens
            if task_ids is None:                                 # no row has a prefix: an empty table
                prefix = (block_table.new_zeros(1, 0), prefix_lens.new_zeros(1),
                          torch.zeros(cache.batch, dtype=torch.long))
            else:
                prefix = (block_table, prefix_lens, task_ids)
            shapes.append((starts, torch.full_like(starts, cache.Skv), *prefix, {}))   # {}: its plans by (window, scale)
        return shapes

    def _padded_attention(self, parts, shapes, sizes, q, k, v, pool_k, pool_v, prefix_k, prefix_v, attn):
        """The torch path: each batch's K/V written and gathered, its queries unpacked into their
        left-padded layout for ``kernels.prefix_attention``, the result packed again."""
        Hq, D = q.shape[1], q.shape[2]
        Hkv = k.shape[1]
        backend = self.store.backend or "torch"
        out = torch.empty_like(q)
        at = 0
        window = sliding_window_of(attn)
        for (cache, _, _), (starts, lens, table, plens, tids, plans), n in zip(parts, shapes, sizes):
            B, Sq, Skv = cache.batch, cache.Sq, cache.Skv
            pool_k.index_copy_(0, cache.write_dst, k[at: at + n].to(pool_k.dtype))
            pool_v.index_copy_(0, cache.write_dst, v[at: at + n].to(pool_v.dtype))
            own_k = pool_k.index_select(0, cache.gather_index).view(B, Skv, Hkv, D).transpose(1, 2)
            own_v = pool_v.index_select(0, cache.gather_index).view(B, Skv, Hkv, D).transpose(1, 2)
            padded = q.new_zeros(B * Sq, Hq, D).index_copy_(0, cache.write_src, q[at: at + n])
            layer = (padded.view(B, Sq, Hq, D).transpose(1, 2), own_k.to(q.dtype), own_v.to(q.dtype),
                     prefix_k.to(q.dtype), prefix_v.to(q.dtype))
            key = (window, attn.scaling)          # planned on the step's first layer, run by the rest
            if key not in plans:
                plans[key] = plan_for_layer(*layer, table, plens, tids, causal=True, scale=attn.scaling,
                                            kv_starts=starts, kv_lens=lens, window=window, backend=backend)
            plan = plans[key]
            o = plan.run(*layer)                                                             # [B, Hq, Sq, D]
            out[at: at + n] = o.transpose(1, 2).reshape(B * Sq, Hq, D).index_select(0, cache.write_src)
            at += n
        return out

    @staticmethod
    def _last_of(cache) -> torch.Tensor:
        """Packed position (within its batch) of each row's last new token."""
        per_row = torch.zeros(cache.batch, dtype=torch.long).index_add_(
            0, cache.write_src // cache.Sq, torch.ones_like(cache.write_src))
        return per_row.cumsum(0) - 1

