"""``SoftPromptModel``: one frozen transformers model serving many soft-prompt tasks at once.

Each task has its own method (prefix tuning, P-tuning v2, prompt tuning, P-tuning v1); one batch
may mix tasks *and* methods, in training and in inference:

* deep-prompt tasks (prefix tuning, P-tuning v2) reach attention as a per-layer prefix K/V in
  the model's prefix store. In training (``model.train()`` or gradients enabled) the store's
  pools are rebuilt for the forward differentiably from the modules' outputs (``index_copy`` of
  each task's blocks into a non-leaf copy of the pools), so gradients reach the MLP / raw
  prefix; the prefix memory stays per task, never per sequence. Under activation checkpointing
  the swapped pools stay in place for the backward's recomputation (as leaves whose gradient is
  pushed on into the prompt modules). In inference the outputs are written into the store once
  and reused until a prompt parameter changes.
* input-level tasks (prompt tuning, P-tuning v1) get their soft tokens (and the template's anchor
  tokens) spliced into ``inputs_embeds`` row by row, with the attention mask, labels (-100 on
  added tokens), token types (0) and positions (from the new attention mask) extended; rows of
  deep tasks get none. Returned logits ``[B, S, V]`` are mapped back to the caller's layout.
  When the soft tokens form a prefix of a causal decoder's input they are *compiled* for
  inference: run through the model once, their per-layer K/V stored as the task's prefix, so
  they then cost what prefix tuning costs (eval mode without gradients, and ``generate``).
* hard-prompt tasks (:class:`~softprompt.methods.HardPrompt`, or :meth:`SoftPromptModel.add_text`)
  hold a text's K/V, computed once by the frozen model when the task is added (and again when
  the task it is stacked ``after`` changes): a store task like a deep prompt, with nothing to
  train. A row of such a task gives the logits of the text's tokens pasted in front of its own.

Positions always follow the attention mask (``cumsum(mask) - 1``; roberta: its padding_idx rule),
so a row gives the same result alone or in a padded batch. Only the prompt modules and the heads
named in ``trainable_heads`` have ``requires_grad``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .integration import attach, detach
from .integration.attach import attached_store
from .integration.families import family_of, text_config
from .methods.base import Geometry, InputPrompt, MethodConfig, SoftPrompt
from .methods.hard_prompt import HardPrompt, cache_kv, check_exact, text_prefix
from .methods.template import is_prefix
from .fused_loss import captured_hidden_states, chunked_linear_cross_entropy, head_for_fused_loss
from .sliced_logits import KeptLogits, accepts_logits_to_keep, kept_positions, loss_on_kept, next_token_labels

NO_PROMPT = "__softprompt_none__"


def _with_loss(out, loss: torch.Tensor, drop: Sequence[str] = ()):
    """``out`` (a transformers ``ModelOutput``) rebuilt with ``loss`` in its place (first) and the
    fields in ``drop`` left out."""
    return type(out)(**{"loss": loss, **{k: v for k, v in out.items() if k != "loss" and k not in drop}})


class SoftPromptModel(nn.Module):
    """Args:
        model: a transformers model of a supported family (see ``softprompt.integration``).
        backend, block_size: passed to :func:`softprompt.attach`.
        trainable_heads: module paths in ``model`` left trainable (e.g. ``["classifier"]``).
        compile_prompts: compile prefix-shaped input prompts of causal decoders for inference.
        fused_loss: with gradients and token ``labels`` on a causal LM with a plain frozen head, take
            the loss chunk by chunk from the last hidden states (:mod:`softprompt.fused_loss`): the
            ``[B, T, V]`` logits are never built and the output's ``logits`` is None. False: the
            model's own head and loss, logits returned.
    """

    def __init__(self, model: nn.Module, *, backend: Optional[str] = None, block_size: int = 16,
                 trainable_heads: Sequence[str] = (), compile_prompts: bool = True, fused_loss: bool = True):
        super().__init__()
        if attached_store(model) is not None:
            raise ValueError("SoftPromptModel: `model` is already attached to a prefix store; detach it first")
        family = family_of(model)
        heads = list(trainable_heads)
        for head in heads:
            try:
                model.get_submodule(head)
            except AttributeError:
                raise ValueError(f"SoftPromptModel: `trainable_heads` entry {head!r} is not a module of "
                                 f"{type(model).__name__}") from None
        self.geometry = Geometry.of(model)
        store = attach(model, backend=backend, block_size=block_size, trainable=False)
        self.model = model
        self.__dict__["store"] = store            # owned by the model (model.softprompt_store)
        self.family = family
        self.encoder_decoder = bool(getattr(text_config(model), "is_encoder_decoder", False))
        self.causal = not family.bidirectional and not self.encoder_decoder
        for p in model.parameters():
            p.requires_grad_(False)
        for head in heads:
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)
        self.trainable_heads = heads
        self.compile_prompts = compile_prompts
        self.fused_loss = fused_loss
        self.prompts = nn.ModuleDict()
        L, H, D = self.geometry.num_layers, self.geometry.num_kv_heads, self.geometry.head_dim
        store.add(NO_PROMPT, torch.zeros(L, H, 0, D), torch.zeros(L, H, 0, D))
        self._stored: Dict[str, object] = {}      # task -> signature of what the store holds for it

    # ------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> List[str]:
        return list(self.prompts.keys())

    def method_of(self, name: str) -> str:
        return self._module(name).config.method

    def _module(self, name: str) -> SoftPrompt:
        if name not in self.prompts:
            raise ValueError(f"SoftPromptModel: task {name!r} is unknown; known tasks: {self.tasks}")
        return self.prompts[name]

    def _check_name(self, name) -> None:
        if not isinstance(name, str) or not name or "." in name or name == NO_PROMPT:
            raise ValueError(f"SoftPromptModel: task name {name!r} is invalid; expected a non-empty str without '.'")
        if name in self.prompts:
            raise ValueError(f"SoftPromptModel: task {name!r} already exists; remove_task() it first")

    def add_task(self, name: str, config: MethodConfig) -> SoftPrompt:
        """Add a task with its method config; returns the task's prompt module (trainable, except a
        hard prompt's, whose K/V are computed and stored here)."""
        self._check_name(name)
        if not isinstance(config, MethodConfig):
            raise ValueError(f"SoftPromptModel.add_task: `config` of type {type(config).__name__} is invalid; "
                             "expected PrefixTuning, PTuningV2, PromptTuning, PTuningV1 or HardPrompt")
        module = config.build(self.geometry, self.model.get_input_embeddings())
        return self._add_module(name, module)

    def add_text(self, name: str, text, tokenizer=None, after: Optional[str] = None) -> SoftPrompt:
        """Add a hard-prompt task: ``text`` (a string with ``tokenizer``, or token ids) run once through
        the model, its K/V stored as the task's prefix (``after``: a task whose prefix goes first)."""
        return self.add_task(name, HardPrompt(text=text, tokenizer=tokenizer, after=after))

    def _check_after(self, name: str, module: SoftPrompt, known) -> None:
        """A stacked hard prompt's ``after`` names a task (of ``known``) that is stored as a prefix."""
        after = module.config.after
        if after is None:
            return
        if after not in known:
            raise ValueError(f"SoftPromptModel: task {name!r} is stacked after {after!r}, which is not a task "
                             f"(known tasks: {sorted(known)})")
        other = known[after]
        if other.kind == "input" and not (self.causal and is_prefix(other.template)):
            raise ValueError(f"SoftPromptModel: task {name!r} is stacked after {after!r} ({other.config.method}), "
                             "whose soft tokens do not form a prefix; stacking needs a prefix in front of the text")

    def _add_module(self, name: str, module: SoftPrompt) -> SoftPrompt:
        self._check_name(name)
        if module.geometry != self.geometry:
            raise ValueError(f"SoftPromptModel: task {name!r} was built for {module.geometry}, not {self.geometry}")
        param = next(self.model.parameters())
        module = module.to(device=param.device)
        module.train(self.training)
        if module.kind == "hard":
            self._check_after(name, module, dict(self.prompts.items()))
            check_exact(self.model, module.num_virtual_tokens)
        L, H, D = self.geometry.num_layers, self.geometry.num_kv_heads, self.geometry.head_dim
        P = module.num_virtual_tokens if module.kind == "deep" else 0
        zeros = torch.zeros(L, H, P, D, dtype=self.store.dtype, device=self.store.device)
        self.store.add(name, zeros, zeros)
        self.prompts[name] = module
        self._stored[name] = None
        if module.kind == "hard":                 # a store task from the start (the engine reads the store)
            try:
                self.sync([name])
            except Exception:
                self.remove_task(name)
                raise
        return module

    def remove_task(self, name: str) -> None:
        self._module(name)
        stacked = [n for n, m in self.prompts.items() if m.kind == "hard" and m.config.after == name]
        if stacked:
            raise ValueError(f"SoftPromptModel.remove_task: hard-prompt tasks {stacked} are stacked after {name!r}; "
                             "remove them first")
        self.store.remove(name)
        del self.prompts[name]
        self._stored.pop(name, None)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def detach_model(self) -> nn.Module:
        """Detach the integration from the wrapped model and return it (this object is then unusable)."""
        detach(self.model)
        return self.model

    # ------------------------------------------------------------------ prompts -> store
    def _signature(self, module: nn.Module):
        """Changes whenever a prompt parameter (or a trainable head, which compiled K/V may depend on)
        is updated in place or replaced; for a stacked hard prompt, whenever its ``after`` task's does."""
        params = list(module.parameters())
        if module.kind in ("input", "hard"):
            for head in self.trainable_heads:
                params += list(self.model.get_submodule(head).parameters())
        sig = tuple((p.data_ptr(), p._version) for p in params)
        if module.kind == "hard" and module.config.after is not None:
            sig += (self._stored.get(module.config.after),)
        return sig

    def compilable(self, name: str) -> bool:
        """True when an input-level task's soft tokens form a prefix of a causal decoder's input."""
        module = self._module(name)
        return module.kind == "input" and self.causal and is_prefix(module.template)

    @contextlib.contextmanager
    def _eval_module(self, module):
        was = module.training
        module.eval()
        try:
            yield
        finally:
            module.train(was)

    def _front_embeddings(self, module: InputPrompt, prompt: torch.Tensor) -> torch.Tensor:
        """Embeddings of the template's segments before the input ``[n, hidden]``."""
        emb = self.model.get_input_embeddings()
        parts, vi = [], 0
        for seg in module.template:
            if seg[0] == "input":
                break
            if seg[0] == "virtual":
                parts.append(prompt[vi: vi + seg[1]])
                vi += seg[1]
            else:
                ids = torch.tensor(seg[1], dtype=torch.long, device=emb.weight.device)
                parts.append(emb(ids).to(prompt.dtype))
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def sync(self, names: Optional[Iterable[str]] = None) -> None:
        """Write the inference form of tasks into the store (deep: prefix K/V; compilable input tasks:
        compiled K/V; hard prompts: the text's K/V) where a prompt parameter changed since the last
        write (a stacked hard prompt: its ``after`` task first)."""
        for name in (self.tasks if names is None else dict.fromkeys(names)):
            module = self._module(name)
            if module.kind == "input" and not self.compilable(name):
                continue
            if module.kind == "hard" and module.config.after is not None:
                self.sync([module.config.after])
            sig = self._signature(module)
            if self._stored.get(name) == sig:
                continue
            with self._eval_module(module):
                if module.kind == "deep":
                    k, v = module.prefix()
                elif module.kind == "hard":
                    k, v = text_prefix(self.model, module.token_ids, after=module.config.after)
                else:
                    k, v = self._compile(module)
            self.store.replace(name, k.to(self.store.dtype), v.to(self.store.dtype))
            self._stored[name] = sig

    def _compile(self, module: InputPrompt):
        """Run the prefix tokens through the model once; their per-layer K/V in cache convention."""
        dtype = self.model.get_input_embeddings().weight.dtype
        x = self._front_embeddings(module, module.embeddings().to(dtype))[None]
        n = x.shape[1]
        out = self.model(inputs_embeds=x, attention_mask=torch.ones(1, n, dtype=torch.long, device=x.device),
                         position_ids=self._positions(torch.ones(1, n, dtype=torch.long, device=x.device)),
                         use_cache=True)
        return cache_kv(out, n, self.model)

    @contextlib.contextmanager
    def _differentiable_pools(self, names: Sequence[str]):
        """Swap the store's pools for copies holding the deep tasks' current (differentiable) prefixes."""
        store = self.store
        if not names:
            yield
            return
        L, H, D, bs = store.num_layers, store.num_kv_heads, store.head_dim, store.block_size
        blocks, ks, vs = [], [], []
        for name in names:
            k, v = self.prompts[name].prefix()
            P = k.shape[2]
            if store.prefix_len(name) != P:
                zeros = torch.zeros(L, H, P, D, dtype=store.dtype, device=store.device)
                store.replace(name, zeros, zeros)
                self._stored[name] = None
            n = -(-P // bs)
            blocks.append(store.block_table[store.task_id(name), :n])
            for t, out, rotate in ((k, ks, True), (v, vs, False)):
                t = t.to(store.dtype)
                if rotate:
                    t = store.to_stored(t, P)
                t = F.pad(t, (0, 0, 0, n * bs - P)).view(L, H, n, bs, D).permute(0, 2, 1, 3, 4)
                out.append(t)
        index = torch.cat(blocks).to(store.device)
        saved = store.k_blocks, store.v_blocks
        k_new = saved[0].detach().index_copy(1, index, torch.cat(ks, dim=1))
        v_new = saved[1].detach().index_copy(1, index, torch.cat(vs, dim=1))
        if self._checkpointing():
            # Activation checkpointing recomputes attention in the backward, reading the store again:
            # the pools stay swapped (until the next forward swaps its own) and are leaves whose
            # gradient is pushed on into the prompt modules, contribution by contribution (each
            # recomputed layer adds one; reentrant or not).
            leaves = []
            for new in (k_new, v_new):
                leaf = new.detach().requires_grad_(new.requires_grad)
                if new.requires_grad:
                    leaf.register_hook(lambda g, src=new: self._push_grad(src, g))
                leaves.append(leaf)
            store.swap_pools(*leaves)
            yield
            return
        store.swap_pools(k_new, v_new)
        try:
            yield
        finally:
            store.swap_pools(*saved)

    @staticmethod
    def _push_grad(src: torch.Tensor, grad: torch.Tensor):
        torch.autograd.backward(src, grad, retain_graph=True)
        return torch.zeros_like(grad)           # nothing to keep on the swapped pool itself

    # ------------------------------------------------------------------ batches
    def _row_tasks(self, tasks, task_ids, batch: int) -> List[str]:
        spec = tasks if tasks is not None else task_ids
        if spec is None:
            raise ValueError("SoftPromptModel: give `tasks` (a task name or one name per row)")
        if isinstance(spec, str):
            spec = [spec] * batch
        if isinstance(spec, torch.Tensor):
            spec = spec.tolist()
        spec = list(spec)
        names = self.tasks
        out = []
        for t in spec:
            if isinstance(t, int) and not isinstance(t, bool):
                if not 0 <= t < len(names):
                    raise ValueError(f"SoftPromptModel: task index {t} is invalid; expected 0..{len(names) - 1} "
                                     f"(tasks in order: {names})")
                t = names[t]
            self._module(t)
            out.append(t)
        if len(out) == 1 and batch != 1:
            out = out * batch
        if len(out) != batch:
            raise ValueError(f"SoftPromptModel: `tasks` with {len(out)} entries is invalid for a batch of {batch}; "
                             "expected one task per row (or a single task name)")
        return out

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.long()
        if self.family.positions == "padding_idx":
            pad = getattr(text_config(self.model), "pad_token_id", None) or 0
            return torch.cumsum(mask, dim=1) * mask + pad
        return (torch.cumsum(mask, dim=1) - 1).clamp_min(0)

    def _checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())

    def _use_compiled(self) -> bool:
        return self.compile_prompts and not self.training and not torch.is_grad_enabled()

    def forward(self, input_ids=None, attention_mask=None, tasks=None, task_ids=None, labels=None,
                inputs_embeds=None, token_type_ids=None, position_ids=None, **kwargs):
        """The wrapped model's forward with a task per row (``tasks``: names, or ``task_ids``: indices
        into ``self.tasks``). Position ids follow the attention mask unless given (and are always
        recomputed when soft tokens are spliced into the inputs)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("SoftPromptModel: give `input_ids` or `inputs_embeds`")
        B, S = ref.shape[0], ref.shape[1]
        names = self._row_tasks(tasks, task_ids, B)
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=ref.device)
        compiled = self._use_compiled()
        if compiled or not (self.training or torch.is_grad_enabled()):
            self.sync([n for n in names if self.prompts[n].kind == "deep" or (compiled and self.compilable(n))])
        self._prepare_hard(names, attention_mask, 0, self.training or torch.is_grad_enabled())
        store_names, inline = [], {}
        for n in names:
            module = self.prompts[n]
            if module.kind == "input" and not (compiled and self.compilable(n)):
                store_names.append(NO_PROMPT)
                inline[n] = module
            else:
                store_names.append(n)
        train_path = self.training or torch.is_grad_enabled()
        deep = [n for n in dict.fromkeys(names) if self.prompts[n].kind == "deep"] if train_path else []
        ids = self.store.task_ids(store_names)
        call = dict(kwargs)
        layout = None
        kept = None
        if inline:
            call.update(self._splice(names, inline, input_ids, inputs_embeds, attention_mask, labels, token_type_ids))
            layout = call.pop("_layout")
            source = call.pop("_source")
            head = self._fused_loss_head(call)
            kept = None if head is not None else self._kept_positions(call, source)
            if kept is not None:                # logits only where used; the loss is taken below
                spliced_labels = call.pop("labels")
                call["logits_to_keep"] = kept.argument
        else:
            call.update(attention_mask=attention_mask,
                        position_ids=position_ids if position_ids is not None else self._positions(attention_mask))
            if input_ids is not None:
                call["input_ids"] = input_ids
            else:
                call["inputs_embeds"] = inputs_embeds
            if labels is not None:
                call["labels"] = labels
            if token_type_ids is not None:
                call["token_type_ids"] = token_type_ids
            head = self._fused_loss_head(call)
        if head is not None:
            return self._forward_fused_loss(head, ids, call, deep, kwargs)
        with self._differentiable_pools(deep):
            out = self.model(task_ids=ids, **call)
        if kept is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
            out = _with_loss(out, loss_on_kept(self.model, out.logits, spliced_labels, kept, **loss_kwargs))
            layout = kept.where(call["attention_mask"].shape[1]).gather(1, layout)   # -> index among kept logits
        if layout is not None and not self.encoder_decoder:      # enc-dec: logits are decoder-side
            logits = getattr(out, "logits", None)
            T = call["attention_mask"].shape[1] if kept is None else kept.index.shape[1]
            if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == T:
                index = layout[..., None].expand(-1, -1, logits.shape[-1])
                out["logits"] = logits.gather(1, index)
        return out

    def _token_lm_labels(self, call: dict) -> Optional[torch.Tensor]:
        """The call's labels if they are a causal LM's token labels ``[B, T]`` (same shape as its
        input) for transformers' own shifted loss; None otherwise (no labels, sequence labels, an
        encoder or encoder-decoder, or the caller chose ``logits_to_keep`` / ``ignore_index``)."""
        labels = call.get("labels")
        ref = call.get("input_ids", call.get("inputs_embeds"))
        if (labels is None or not self.causal or labels.dim() != 2 or tuple(labels.shape) != tuple(ref.shape[:2])
                or "logits_to_keep" in call or "ignore_index" in call):
            return None
        return labels

    def _fused_loss_head(self, call: dict) -> Optional[nn.Linear]:
        """The LM head whose loss :meth:`_forward_fused_loss` fuses for this call, or None."""
        if not self.fused_loss or not torch.is_grad_enabled() or self._token_lm_labels(call) is None:
            return None
        if "_fused_head" not in self.__dict__:
            self.__dict__["_fused_head"] = head_for_fused_loss(self.model)
        return self.__dict__["_fused_head"]

    def _forward_fused_loss(self, head: nn.Linear, ids, call: dict, deep, kwargs):
        labels = call.pop("labels")
        with self._differentiable_pools(deep), captured_hidden_states(self.model, head) as capture:
            out = self.model(task_ids=ids, **call)
        if len(capture.seen) != 1:               # the model bypassed its head module: never fuse again
            self.__dict__["_fused_head"] = None
            call["labels"] = labels
            with self._differentiable_pools(deep):
                return self.model(task_ids=ids, **call)
        hidden = capture.seen[0]
        loss = chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                            next_token_labels(labels).reshape(-1), kwargs.get("num_items_in_batch"))
        return _with_loss(out, loss, drop=("logits",))

    def _kept_positions(self, call: dict, source: torch.Tensor) -> Optional[KeptLogits]:
        """The spliced positions whose logits a causal LM's training forward needs (see
        :mod:`softprompt.sliced_logits`), or None: all of them, or not a token-level LM loss."""
        labels = self._token_lm_labels(call)
        if labels is None:
            return None
        if "_slices_logits" not in self.__dict__:
            self.__dict__["_slices_logits"] = accepts_logits_to_keep(self.model)
        return kept_positions(source, labels) if self.__dict__["_slices_logits"] else None

    def _prepare_hard(self, names: Sequence[str], attention_mask: torch.Tensor, extra: int, train_path: bool) -> None:
        """Store the K/V of the batch's hard-prompt tasks; ValueError where a row would not be exact
        (a stacked task under gradients: its text K/V are constants; a row of its real tokens plus
        ``extra`` positions leaving the sliding window)."""
        hard = [n for n in dict.fromkeys(names) if self.prompts[n].kind == "hard"]
        if not hard:
            return
        if train_path:
            stacked = [n for n in hard if self.prompts[n].config.after is not None]
            if stacked:
                raise ValueError(f"SoftPromptModel: stacked hard-prompt tasks {stacked} are for inference (their text "
                                 "K/V are computed without gradients); train the soft task alone, or run under "
                                 "torch.no_grad() in eval mode")
        self.sync(hard)
        if "_window" not in self.__dict__:       # the model's sliding window (None: none), looked up once
            self.__dict__["_window"] = check_exact(self.model, 0)
        window = self.__dict__["_window"]
        if window is None:
            return
        for name, n in zip(names, (attention_mask.sum(-1) + extra).tolist()):
            P = self.store.prefix_len(name) if self.prompts[name].kind == "hard" else 0
            if P + n > window:
                raise ValueError(f"SoftPromptModel: a row of hard-prompt task {name!r} with {n} tokens is invalid "
                                 f"after its {P}-token prefix; expected prefix + row <= the sliding window {window} "
                                 "(the pasted text would leave the window)")

    def _splice(self, names, inline, input_ids, inputs_embeds, attention_mask, labels, token_type_ids) -> dict:
        emb_layer = self.model.get_input_embeddings()
        embeds = emb_layer(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = embeds.shape[:2]
        real = attention_mask.bool()
        prompts = {n: m.embeddings().to(embeds.dtype) for n, m in inline.items()}
        left = bool(((~real[:, 0]) & real.any(1)).any())
        rows, origins = [], []                 # per row: embeddings, and each position's source (-1 = added)
        for b, name in enumerate(names):
            idx = real[b].nonzero().flatten()
            if idx.numel() and int(idx[-1] - idx[0]) + 1 != idx.numel():
                raise ValueError(f"SoftPromptModel: `attention_mask` row {b} is not one contiguous run of tokens "
                                 "(left or right padding only)")
            module = inline.get(name)
            if module is None:
                rows.append(embeds[b, idx])
                origins.append(idx)
                continue
            parts, src, vi = [], [], 0
            for seg in module.template:
                if seg[0] == "input":
                    parts.append(embeds[b, idx])
                    src.append(idx)
                elif seg[0] == "virtual":
                    parts.append(prompts[name][vi: vi + seg[1]])
                    vi += seg[1]
                    src.append(torch.full((seg[1],), -1, dtype=torch.long, device=idx.device))
                else:
                    tok = torch.tensor(seg[1], dtype=torch.long, device=embeds.device)
                    parts.append(emb_layer(tok).to(embeds.dtype))
                    src.append(torch.full((len(seg[1]),), -1, dtype=torch.long, device=idx.device))
            rows.append(torch.cat(parts))
            origins.append(torch.cat(src))
        T = max(r.shape[0] for r in rows)
        ext = embeds.new_zeros(B, T, embeds.shape[-1])
        source = torch.full((B, T), -2, dtype=torch.long, device=embeds.device)     # -2 = padding
        for b, (r, o) in enumerate(zip(rows, origins)):
            sl = slice(T - r.shape[0], T) if left else slice(0, r.shape[0])
            ext[b, sl] = r
            source[b, sl] = o
        ext_mask = (source != -2).to(attention_mask.dtype)
        gather = source.clamp_min(0)
        call = {"inputs_embeds": ext, "attention_mask": ext_mask, "position_ids": self._positions(ext_mask)}
        if labels is not None:
            if self.encoder_decoder:                 # decoder-side labels: untouched
                call["labels"] = labels
            elif labels.dim() == 2 and tuple(labels.shape) == (B, S):
                call["labels"] = labels.gather(1, gather).masked_fill(source < 0, -100)
            else:                                # sequence-level labels (classification)
                call["labels"] = labels
        if token_type_ids is not None:
            call["token_type_ids"] = token_type_ids.gather(1, gather).masked_fill(source < 0, 0)
        # where each original position went (padding -> the row's first added/padded slot or 0)
        layout = torch.zeros(B, S, dtype=torch.long, device=embeds.device)
        for b in range(B):
            pos = (source[b] >= 0).nonzero().flatten()
            layout[b, source[b, pos]] = pos
        call["_layout"] = layout
        call["_source"] = source
        return call

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, tasks=None, task_ids=None, **kwargs):
        """``model.generate`` for a batch of mixed tasks. Input-level tasks must be compilable
        (soft tokens in front of a causal decoder's input)."""
        if input_ids is None:
            raise ValueError("SoftPromptModel.generate: give `input_ids`")
        names = self._row_tasks(tasks, task_ids, input_ids.shape[0])
        for n in dict.fromkeys(names):
            if self.prompts[n].kind == "input" and not self.compilable(n):
                raise ValueError(f"SoftPromptModel.generate: task {n!r} ({self.method_of(n)}) places soft tokens "
                                 "after the input or the model is not a causal decoder; generation needs them "
                                 "in front (compiled into a prefix)")
        self.sync(names)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = kwargs.get("max_new_tokens")
        if new is None:
            config = kwargs.get("generation_config") or self.model.generation_config
            new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
        self._prepare_hard(names, attention_mask, max(int(new) - 1, 0), False)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   task_ids=self.store.task_ids(names), **kwargs)

    # ------------------------------------------------------------------ saving
    def save(self, directory, tasks: Optional[Sequence[str]] = None) -> None:
        """Write every task (or only ``tasks``: a task name or a list of names; full training state) and
        the trainable heads to the folder ``directory``: a JSON manifest and a safetensors file, switched
        all-or-nothing (see :mod:`softprompt.methods.checkpoint`); a crash leaves the previous save."""
        from .methods import checkpoint
        names = self._save_names(tasks)
        tensors, entries = {}, []
        for name in names:
            module = self.prompts[name]
            for k, v in module.state_dict().items():
                tensors[f"tasks.{name}.{k}"] = v
            entry = {"name": name, "method": module.config.method, "config": module.config.to_dict()}
            if hasattr(module, "structure"):
                entry["structure"] = module.structure()
            entries.append(entry)
        for head in self.trainable_heads:
            for k, v in self.model.get_submodule(head).state_dict().items():
                tensors[f"heads.{head}.{k}"] = v
        for key, v in tensors.items():           # a save that could not be loaded back would lose the prompt
            if v.dtype.is_floating_point and not torch.isfinite(v).all():
                raise ValueError(f"SoftPromptModel.save: {key} contains NaN or inf; nothing was written")
        meta = {"geometry": self.geometry.to_dict(), "model_class": type(self.model).__name__,
                "tasks": entries, "heads": list(self.trainable_heads)}
        checkpoint.atomic_save(directory, meta, tensors)

    def _save_names(self, tasks) -> List[str]:
        if tasks is None:
            return list(self.prompts)
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(n, str) for n in tasks):
            raise ValueError(f"SoftPromptModel.save: `tasks` {tasks!r} is invalid; expected a task name or a "
                             f"list of task names (known: {self.tasks})")
        unknown = [n for n in tasks if n not in self.prompts]
        if unknown:
            raise ValueError(f"SoftPromptModel.save: `tasks` {unknown} are not tasks of this model "
                             f"(known: {self.tasks})")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"SoftPromptModel.save: `tasks` {list(tasks)} names a task twice")
        return list(tasks)

    def load_tasks(self, directory) -> List[str]:
        """Add the tasks (and head weights) of a checkpoint; validated first, nothing changes on error."""
        from .methods import checkpoint
        modules, heads, _ = checkpoint.read_checkpoint(directory, self.model, self.geometry)
        return self._install(modules, heads)

    def _install(self, modules, heads) -> List[str]:
        clash = [n for n, _ in modules if n in self.prompts]
        if clash:
            raise ValueError(f"SoftPromptModel.load_tasks: tasks {clash} already exist; remove_task() them first")
        known = dict(self.prompts.items())
        for name, module in modules:
            self._check_name(name)
            if module.kind == "hard":
                self._check_after(name, module, known)
                check_exact(self.model, module.num_virtual_tokens)
            known[name] = module
        for head, state in heads.items():
            target = self.model.get_submodule(head)
            with torch.no_grad():
                for k, t in target.state_dict().items():
                    t.copy_(state[k].to(t.dtype))
        for name, module in modules:
            self._add_module(name, module)
        return [n for n, _ in modules]

    @classmethod
    def load(cls, model: nn.Module, directory, **kwargs) -> "SoftPromptModel":
        """Wrap ``model`` and load a checkpoint written by :meth:`save`. The checkpoint is read once and
        validated against ``model`` before the model is touched (a checkpoint of another model is a
        ValueError saying which size differs); ``trainable_heads`` default to the saved ones."""
        from .methods import checkpoint
        family_of(model)
        modules, heads, meta = checkpoint.read_checkpoint(directory, model, Geometry.of(model))
        kwargs.setdefault("trainable_heads", meta["heads"])
        spm = cls(model, **kwargs)
        try:
            spm._install(modules, heads)
        except Exception:
            spm.detach_model()
            raise
        return spm

    # ------------------------------------------------------------------ PEFT
    def load_peft(self, path, task: str, method: Optional[str] = None, heads: bool = True) -> SoftPrompt:
        """Add a task from a PEFT prompt-learning adapter folder (see :mod:`softprompt.peft_io`);
        ``heads``: also copy the adapter's head weights (modules its config declares in
        ``modules_to_save``) into the model. Any other tensor in the adapter is a ValueError."""
        from .peft_io import load_peft
        return load_peft(self, path, task, method=method, heads=heads)

    def export_peft(self, task: str, path) -> None:
        """Write a task as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads."""
        from .peft_io import export_peft
        export_peft(self, task, path)
