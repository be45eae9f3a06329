"""The engine's forwards of Llama-family models on the CPU, computed without the HF forward.

A decode step feeds one token per running sequence. On the CPU its cost is the weight GEMMs plus
everything around them, and with a few dozen rows "everything around them" is most of it: the HF
forward's per-layer Python, the attention-interface plumbing, and the ``[B, hidden]`` layout, which
makes each ``nn.Linear`` a ``x @ W^T`` product (the slow form for CPU BLAS at this shape, see
``small_gemm.py``) followed by transposes and copies.

:class:`CpuDecoder` runs the same computation with activations kept *feature-major*,
``[hidden, B]``: every projection is ``W @ x`` straight from the module's own weight (no copy of
the model), its output is already the next product's input, and only the attention transposes
(small) tensors. A step of B rows computes with ``small_gemm.decode_columns(B)`` columns and, at a
few rows, a token-major operand: the shapes the CPU BLAS is fast at (see ``small_gemm.py``). Per
layer: RMSNorm, Q/K/V projections, RoPE with the model's own rotary module, new K/V written into
the engine's pages, output projection, gated MLP. The attention is the contract's
(``softprompt.kernels.plan_prefix_attention``): one plan per step over the rows' task prefixes and
their own keys paged in the engine's pools, run by every layer — on the ``compiled``
backend (the C++ op: each task's prefix blocks read once for all its rows, the own pages in place)
where it builds and the pools are fp32, else on the ``torch`` backend (own keys gathered out of
the pages). The result equals the HF forward up to floating-point summation order; the engine's
greedy-parity tests run through it.

:meth:`CpuDecoder.prefill` serves a step's prefills the same way but token-major (``[N, hidden]``
through the model's own modules, ``x W^T`` being the fast form at prefill row counts) with the real
tokens of every row packed, so the linear layers see no padding; the attention sees the step's
rows as one batch (each row's new tokens as its queries).

Only the families whose decoder layer is exactly that computation are taken (Llama, Mistral,
Qwen2 — see :func:`unsupported_reason`); every other model, a model in training mode, and every
GPU step keep the HF forward (:mod:`~softprompt.engine.runner` chooses).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from softprompt.kernels import compiled_build, plan_prefix_attention

from ..integration.attention import sliding_window_of
from .small_gemm import decode_columns, feature_major_operand

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
        compiled_attention: attention (decode steps and prefills) on the ``compiled`` backend
            (prefix and own pages read in place) when it builds and the pools are fp32; False
            keeps the ``torch`` backend.
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
        self.compiled_attention = bool(compiled_attention) and compiled_build.load() is not None

    def _use_kernel(self) -> bool:
        return (self.compiled_attention and self.kv.k.dtype == torch.float32
                and self.store.layer(0)[0].dtype == torch.float32)

    def attention_path(self) -> str:
        """How the attention runs now, in words (for reports)."""
        if self._use_kernel():
            return "compiled paged attention"
        if not self.compiled_attention:
            why = compiled_build.unavailable_reason() or "turned off"
        else:
            why = "the KV pools or the prefix store are not fp32"
        return f"attention through torch ops (compiled kernel: {why})"

    @staticmethod
    def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``module`` applied to feature-major ``x [in, B]``: ``[out, B]``."""
        x = feature_major_operand(x)
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
        dtype = self.embed.weight.dtype
        # C >= B columns: the extra ones (token 0 at position 0) only feed the products the BLAS's
        # fast column counts (small_gemm.decode_columns); attention, the pages and the logits see B
        C = decode_columns(B)
        extra = C - B
        ids = torch.nn.functional.pad(token_ids, (0, extra)) if extra else token_ids
        positions = torch.nn.functional.pad(cache.position_ids, (0, 0, 0, extra)) if extra else cache.position_ids
        x = self.embed(ids).t().contiguous()                                # [hidden, C]
        cos, sin = self.rotary(x, positions)                                # [C, 1, D]
        cos, sin = cos[:, 0].t().contiguous(), sin[:, 0].t().contiguous()   # [D, C]
        plans = {}                                   # one attention plan per (window, scale) in use
        ones = torch.ones(B, dtype=torch.long)
        attended = x.new_zeros(Hq * D, C) if extra else None    # the o_proj input, extra columns zero
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._rms_norm(layer.input_layernorm, x)
            q = self._rope(self._linear(attn.q_proj, h).view(Hq, D, C), cos, sin, dim=1)
            k = self._rope(self._linear(attn.k_proj, h).view(Hkv, D, C), cos, sin, dim=1)
            v = self._linear(attn.v_proj, h)
            pool_k, pool_v = self.kv.k[i], self.kv.v[i]
            # token-major copies first: index_copy_ from a transposed source is slower
            pool_k.view(-1, Hkv * D).index_copy_(0, cache.write_dst, k.view(Hkv * D, C)[:, :B].t().to(pool_k.dtype).contiguous())
            pool_v.view(-1, Hkv * D).index_copy_(0, cache.write_dst, v[:, :B].t().to(pool_v.dtype).contiguous())
            key = (sliding_window_of(attn), attn.scaling)
            if key not in plans:                     # planned on the step's first layer, run by the rest
                plans[key] = self._plan(key, [cache.page_table], ones, cache.own_lens, [task_ids], q_len=1)
            out = self._attend(plans[key], i, q[:, :, :B].permute(2, 0, 1).reshape(B, Hq, 1, D))
            out = out.reshape(B, Hq * D).t().to(dtype)
            if extra:
                attended[:, :B] = out
                out = attended
            x = x + self._linear(attn.o_proj, out)
            h = self._rms_norm(layer.post_attention_layernorm, x)
            gated = mlp.act_fn(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h)
            x = x + self._linear(mlp.down_proj, gated)
        return self._head_rows(self._rms_norm(self.final_norm, x), B)

    HEAD_CHUNK = 1024       # vocabulary rows per product: each [chunk, B] result is transposed while in cache

    def _head_rows(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of the first ``rows`` columns of feature-major ``h [hidden, C]``,
        a chunk of vocabulary rows at a time: each small ``[chunk, C]`` product is transposed while
        it is still in cache, instead of the whole ``[vocab, C]`` result with a cache-hostile
        stride (same rows of the same GEMM)."""
        weight, bias = self.head.weight, self.head.bias
        h = feature_major_operand(h)
        out = h.new_empty(rows, weight.shape[0])
        for start in range(0, weight.shape[0], self.HEAD_CHUNK):
            chunk = slice(start, start + self.HEAD_CHUNK)
            part = torch.mm(weight[chunk], h) if bias is None else torch.addmm(bias[chunk, None], weight[chunk], h)
            out[:, chunk].copy_(part[:, :rows].t())
        return out

    def prefill(self, parts) -> List[torch.Tensor]:
        """One forward over several prefill batches; returns each batch's logits ``[B_g, vocab]``
        (of every row's last new token) and writes their K/V into the pages.

        ``parts``: ``[(cache, token_ids [B_g, Sq_g] left-padded, task_ids or None)]``, one
        :class:`~softprompt.engine.kv_cache.StepCache` per batch. The real new tokens of all batches
        are packed token-major ``[N, hidden]`` and go through the model's own norm, linear and MLP
        modules (``x W^T``, the fast form at prefill row counts) with no padding. The attention
        takes the rows of all batches as one batch: each row's new tokens are its queries (causal,
        after its cached tokens), one plan for the step.
        """
        Hq, Hkv, D = self.num_q_heads, self.num_kv_heads, self.head_dim
        ids = torch.cat([t.reshape(-1).index_select(0, c.write_src) for c, t, _ in parts])       # [N]
        positions = torch.cat([c.position_ids.reshape(-1).index_select(0, c.write_src) for c, _, _ in parts])
        write_dst = torch.cat([c.write_dst for c, _, _ in parts])
        N = ids.shape[0]
        x = self.embed(ids)                                                  # [N, hidden]
        cos, sin = self.rotary(x, positions[None])                           # [1, N, D]
        cos, sin = cos[0, :, None], sin[0, :, None]                          # [N, 1, D]
        q_index, q_lens, q_len = self._query_layout(parts)
        kv_lens = torch.cat([c.own_lens for c, _, _ in parts])
        rows = kv_lens.shape[0]
        plans = {}
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rope(attn.q_proj(h).view(N, Hq, D), cos, sin, dim=-1)
            k = self._rope(attn.k_proj(h).view(N, Hkv, D), cos, sin, dim=-1)
            v = attn.v_proj(h).view(N, Hkv, D)
            pool_k, pool_v = self.kv.k[i], self.kv.v[i]
            pool_k.index_copy_(0, write_dst, k.to(pool_k.dtype))
            pool_v.index_copy_(0, write_dst, v.to(pool_v.dtype))
            key = (sliding_window_of(attn), attn.scaling)
            if key not in plans:
                plans[key] = self._plan(key, [c.page_table for c, _, _ in parts], q_lens, kv_lens,
                                        [t for _, _, t in parts], q_len=q_len)
            # packed queries into the batch layout [rows, Hq, q_len, D] (row b's new tokens first)
            padded = q.new_zeros(rows * q_len, Hq, D).index_copy_(0, q_index, q)
            out = self._attend(plans[key], i, padded.view(rows, q_len, Hq, D).transpose(1, 2))
            out = out.transpose(1, 2).reshape(rows * q_len, Hq, D).index_select(0, q_index).to(q.dtype)
            x = x + attn.o_proj(out.view(N, Hq * D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last, at = [], 0                           # packed index of every row's last new token
        for cache, _, _ in parts:
            last.append(at + self._last_of(cache))
            at += cache.write_src.numel()
        logits = self.head(self.final_norm(x.index_select(0, torch.cat(last))))
        return list(logits.split([c.batch for c, _, _ in parts]))

    @staticmethod
    def _query_layout(parts):
        """The step's rows as one batch: per packed query its index ``row * q_len + i`` (i: its
        place among the row's new tokens), each row's new-token count, and ``q_len``."""
        q_len = max(cache.Sq for cache, _, _ in parts)
        index, lens, first = [], [], 0
        for cache, _, _ in parts:
            rows = cache.write_src // cache.Sq                       # row (in its batch) of each query
            new = torch.bincount(rows, minlength=cache.batch)
            col = cache.write_src % cache.Sq - (cache.Sq - new).index_select(0, rows)   # left padding off
            index.append((rows + first) * q_len + col)
            lens.append(new)
            first += cache.batch
        return torch.cat(index), torch.cat(lens), q_len

    def _plan(self, key, page_tables, q_lens, kv_lens, task_ids, *, q_len: int):
        """The attention plan of one step (every layer of one ``(window, scale)``): the rows of
        ``page_tables`` (one per batch, ``[B_g, W_g]``) with ``q_lens`` new tokens, ``kv_lens`` own
        tokens and the store task ids of their batch (None: no prefix for the batch's rows)."""
        window, scale = key
        prefix_k, _, block_table, prefix_lens = self.store.layer(0)
        if any(t is None for t in task_ids):          # rows without a prefix: an extra empty task
            empty = block_table.shape[0]
            block_table = torch.cat([block_table, block_table.new_zeros(1, block_table.shape[1])])
            prefix_lens = torch.cat([prefix_lens, prefix_lens.new_zeros(1)])
            task_ids = [torch.full((table.shape[0],), empty, dtype=torch.long) if t is None else t.cpu()
                        for t, table in zip(task_ids, page_tables)]
        width = max(t.shape[1] for t in page_tables)
        page_table = torch.cat([nn.functional.pad(t, (0, width - t.shape[1])) for t in page_tables])
        return plan_prefix_attention(
            block_table, prefix_lens, torch.cat(task_ids), num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, q_len=q_len,
            kv_len=int(kv_lens.max()) if kv_lens.numel() else 0, num_blocks=prefix_k.shape[0],
            block_size=self.store.block_size, causal=True, scale=scale, q_lens=q_lens, kv_lens=kv_lens,
            window=window, own_page_table=page_table, own_page_size=self.kv.page_size,
            own_num_pages=self.kv.num_pages, backend="compiled" if self._use_kernel() else "torch")

    def _attend(self, plan, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s attention of ``q [B, Hq, Sq, D]`` through the step's ``plan``, over the
        engine's pages (in the pools' dtype; the compiled backend runs only where that is fp32)."""
        pool_k, pool_v = self.kv.k[layer], self.kv.v[layer]
        pages = (self.kv.num_pages, self.kv.page_size, self.num_kv_heads, self.head_dim)
        prefix_k, prefix_v, _, _ = self.store.layer(layer)
        dtype = pool_k.dtype
        return plan.run(q.to(dtype), pool_k.view(pages), pool_v.view(pages), prefix_k.to(dtype), prefix_v.to(dtype))

    @staticmethod
    def _last_of(cache) -> torch.Tensor:
        """Packed position (within its batch) of each row's last new token."""
        per_row = torch.zeros(cache.batch, dtype=torch.long).index_add_(
            0, cache.write_src // cache.Sq, torch.ones_like(cache.write_src))
        return per_row.cumsum(0) - 1

