"""``Engine``: continuous-batching multi-task generation over a model attached to prefix attention.

    engine = softprompt.Engine(model, tokenizer)          # attaches the model if needed
    engine.store.add("sentiment", k, v)                    # or tasks added before
    results = engine.generate(["Hello", "Bonjour"], tasks=["sentiment", None],
                              sampling=SamplingParams(max_new_tokens=32))
    for event in engine.stream(prompts, tasks): ...        # tokens as they are made

Each step the scheduler picks the sequences to feed (decoders one token each, prefills of
newly admitted requests within a token budget). The engine groups the prefills by length (so that
left-padding waste stays small), builds each batch's :class:`~softprompt.engine.kv_cache.StepCache`
(the own-token KV lives in the engine's paged pool) and hands the prefill batches, then the decode
batch, to its :class:`~softprompt.engine.runner.ModelRunner`, which returns the logits the engine
samples from. The runner is the attached model's HF forward (any family; each task's prefix is read
in place from the model's prefix store by the registered attention function, ``torch`` backend on
the CPU, Triton on a GPU) or, for Llama-family models on the CPU, the CPU decoder
(:mod:`~softprompt.engine.cpu_decode`). Requests join and leave the batch between steps.

Failures stay with their request: a bad request (prompt, task, sampling values checked against
the model and the engine's limits) is rejected when added, and a forward or sampling failure
inside a step ends only the requests it is tied to — each with ``finish_reason == "error"`` and
the message in its :class:`Result` / final :class:`StreamEvent` — while the batch goes on and the
engine stays usable (see :meth:`Engine.step`). ``generate()`` therefore returns a result per
prompt and never raises for one request's failure: check ``result.ok``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import resource
import sys
import time
from typing import Dict, Iterator, List, Optional, Union

import torch

from ..integration import attach
from ..integration.attach import attached_store
from . import sampling as S
from .cpu_decode import CpuDecoder
from .kv_cache import PagedKVCache
from .requests import Prompt, RequestError, Result, SamplingParams, StreamEvent, new_request_id
from .runner import CpuDecoderRunner, ForwardBatch, ForwardPlan, choose_runner
from .scheduler import Scheduler, Sequence

NO_PROMPT_TASK = "__softprompt_engine_no_prompt__"

logger = logging.getLogger(__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < low:
        allowed = f"{'None or ' if optional else ''}an int >= {low}"
        raise ValueError(f"Engine: `{name}` {value!r} is invalid; expected {allowed}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Engine: `{name}` {value!r} is invalid; expected True or False")


def _max_positions(config) -> Optional[int]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Engine:
    """Serve many soft-prompt tasks in one continuously batched generation loop.

    Not thread-safe: one thread owns an engine (``softprompt serve`` runs it in one worker thread
    that takes requests, aborts and store changes from the HTTP handlers between steps).

    Args:
        model: a transformers causal LM; attached with ``softprompt.attach`` if it is not yet.
        tokenizer: needed for text prompts, stop strings and text in results (optional otherwise).
        max_batch_size: most sequences in the running batch.
        max_num_batched_tokens: token budget of one step (decode tokens + prefill tokens).
        page_size: own-token rows per KV page.
        num_pages: initial KV pool size in pages (grows by doubling up to ``max_pages``).
        max_pages: cap of the KV pool (None = grow as needed, else >= 3); at the cap, sequences are
            preempted, and no sequence may hold more than ``(max_pages - 2) * page_size`` own
            tokens (it finishes with "length" there; a longer prompt is rejected).
        max_model_len: most positions a sequence may use, prefix included (default: the config's).
        eos_token_id: int or list overriding the model's / tokenizer's EOS ids (ids in the vocabulary).
        chunked_prefill: split prompts longer than the remaining token budget over steps; when False,
            a prompt must fit in ``max_num_batched_tokens``, and with ``max_pages`` no sequence may
            hold more than ``max_num_batched_tokens + 1`` own tokens (a preempted sequence is
            recomputed in one step).
        prefill_padding: extra padded tokens allowed per prefill forward (fraction of real tokens)
            before the prefills are split into another forward.
        small_gemm_rows: on the CPU, forwards of at most this many tokens (decode steps) run the
            model's linear layers as ``W @ x^T`` (faster there; see ``engine/small_gemm.py``);
            0 turns it off.
        cpu_decoder: on the CPU, run the forwards of Llama-family models (Llama, Mistral, Qwen2)
            through :class:`~softprompt.engine.cpu_decode.CpuDecoder` (no HF forward; same result
            up to summation order); False keeps the HF forward for them. ``stats()["forward_path"]``
            says which forward serves the steps (:func:`~softprompt.engine.runner.choose_runner`).
    """

    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 64, max_num_batched_tokens: int = 2048,
                 page_size: int = 16, num_pages: Optional[int] = None, max_pages: Optional[int] = None,
                 max_model_len: Optional[int] = None, eos_token_id=None, chunked_prefill: bool = True,
                 prefill_padding: float = 0.25, small_gemm_rows: int = 128, cpu_decoder: bool = True):
        _check_int("max_batch_size", max_batch_size, 1)
        _check_int("max_num_batched_tokens", max_num_batched_tokens, 1)
        _check_int("page_size", page_size, 1)
        _check_int("num_pages", num_pages, 1, optional=True)
        _check_int("max_pages", max_pages, 3, optional=True)  # page 0 is null, admission keeps a page spare
        _check_int("max_model_len", max_model_len, 2, optional=True)  # a prompt token and a new one
        _check_int("small_gemm_rows", small_gemm_rows, 0)
        _check_flag("chunked_prefill", chunked_prefill)
        _check_flag("cpu_decoder", cpu_decoder)
        if not isinstance(prefill_padding, (int, float)) or isinstance(prefill_padding, bool) or not (
                math.isfinite(prefill_padding) and prefill_padding >= 0):
            raise ValueError(f"Engine: `prefill_padding` {prefill_padding!r} is invalid; expected a finite "
                             "number >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = self._eos_ids(eos_token_id)       # checked before the model is attached
        store = attached_store(model)
        self.store = store if store is not None else attach(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if num_pages is None:
            num_pages = max(16, max_batch_size)          # grows by doubling when needed
        self.kv = PagedKVCache(self.store.num_layers, self.store.num_kv_heads, self.store.head_dim,
                               page_size=page_size, num_pages=num_pages, max_pages=max_pages,
                               dtype=self.dtype, device=self.device)
        self.scheduler = Scheduler(self.kv, max_batch_size=max_batch_size,
                                   max_num_batched_tokens=max_num_batched_tokens, chunked_prefill=chunked_prefill)
        self.max_model_len = max_model_len if max_model_len is not None else _max_positions(model.config)
        self.prefill_padding = prefill_padding
        self.runner = choose_runner(model, self.store, self.kv, cpu_decoder=cpu_decoder,
                                    small_gemm_rows=small_gemm_rows)
        self.pad_token_id = 0
        self._seqs: Dict[str, Sequence] = {}
        self._results: Dict[str, Result] = {}
        self._arrivals = 0
        self._events: List[StreamEvent] = []
        self._max_stop = 0
        self.reset_stats()

    # ------------------------------------------------------------------ setup helpers
    def _eos_ids(self, override) -> tuple:
        """The EOS ids: ``override`` (checked against the vocabulary), else the model's and the
        tokenizer's that lie in the vocabulary (others can never be generated)."""
        if override is not None:
            ids = list(override) if isinstance(override, (list, tuple, set, frozenset)) else [override]
            if not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"Engine: `eos_token_id` {override!r} is invalid; expected None, a token id or a "
                                 f"list of token ids in [0, {self.vocab_size})")
        else:
            ids = []
            gen = getattr(self.model, "generation_config", None)
            value = getattr(gen, "eos_token_id", None) if gen is not None else None
            if value is None:
                value = getattr(self.model.config, "eos_token_id", None)
            if value is not None:
                ids += [value] if isinstance(value, int) else list(value)
            tok_eos = getattr(self.tokenizer, "eos_token_id", None)
            if isinstance(tok_eos, int):
                ids.append(tok_eos)
            ids = [i for i in ids if 0 <= int(i) < self.vocab_size]
        return tuple(sorted(set(int(i) for i in ids)))

    def reset_stats(self) -> None:
        self._stats = {"steps": 0, "forwards": 0, "prefill_tokens": 0, "padded_prefill_tokens": 0,
                       "generated_tokens": 0, "decode_rows": 0, "decode_steps": 0, "running_sum": 0,
                       "busy_seconds": 0.0, "forward_seconds": 0.0, "sample_seconds": 0.0,
                       "finished": 0, "errors": 0, "preemptions": 0, "max_step_tokens": 0}
        self.kv.reset_peak()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, task: Optional[str] = None,
                    sampling: Union[SamplingParams, dict, None] = None, request_id: Optional[str] = None) -> str:
        """Queue one request; returns its id.

        ``sampling``: a :class:`SamplingParams`, a dict of its fields, or None (the defaults). A bad
        request (prompt, task or sampling values, checked against the model and the engine's
        limits) is not queued: it finishes at once with ``finish_reason == "error"`` and the
        :class:`RequestError` message in its result and final stream event. Only a bad or reused
        ``request_id`` raises (ValueError), since no result could be filed under it.
        """
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError(f"Engine: `request_id` {request_id!r} is invalid; expected None or a str")
        rid = request_id if request_id is not None else new_request_id()
        if rid in self._seqs or rid in self._results:
            raise ValueError(f"Engine: `request_id` {rid!r} is invalid; expected an id not already in use")
        index = self._arrivals
        self._arrivals += 1
        now = time.perf_counter()
        try:
            params = self._sampling_params(sampling)
            prefix_len = self._check_task(task)
            ids = self._tokenize(prompt)
            max_total = self._max_total(len(ids), prefix_len)
            if params.stop and self.tokenizer is None:
                raise RequestError("`stop` strings need a tokenizer; pass one to Engine(model, tokenizer)")
        except (RequestError, ValueError, TypeError) as exc:
            self._results[rid] = Result(request_id=rid, task=task if isinstance(task, str) else None,
                                        prompt_token_ids=[], token_ids=[], text=None, finish_reason="error",
                                        error=f"request {rid!r}: {exc}", arrival_time=now, finish_time=now)
            self._events.append(StreamEvent(rid, index, None, "", True, "error", self._results[rid].error))
            self._stats["errors"] += 1
            return rid
        seq = Sequence(request_id=rid, index=index, task=task, prompt_ids=ids, sampling=params,
                       prefix_len=prefix_len, max_total=max_total, arrival_time=now,
                       generator=S.make_generator(params, self.device))
        self._max_stop = max(self._max_stop, max((len(s) for s in params.stop), default=0))
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def _sampling_params(self, sampling) -> SamplingParams:
        """A validated copy of ``sampling`` (the caller's object is never changed), checked against
        the model: stop ids in the vocabulary, a token left to sample under ``min_new_tokens``."""
        if sampling is None:
            params = SamplingParams()
        elif isinstance(sampling, SamplingParams):
            params = dataclasses.replace(sampling)
        elif isinstance(sampling, dict):
            fields = [f.name for f in dataclasses.fields(SamplingParams)]
            unknown = sorted(str(k) for k in sampling if k not in fields)
            if unknown:
                raise RequestError(f"`sampling` keys {unknown} are invalid; expected SamplingParams fields {fields}")
            params = SamplingParams(**sampling)
        else:
            raise RequestError(f"`sampling` of type {type(sampling).__name__} is invalid; expected "
                               "SamplingParams, a dict of its fields, or None")
        params.validate()
        V = self.vocab_size
        bad = [t for t in params.stop_token_ids if t >= V]
        if bad:
            raise RequestError(f"`stop_token_ids` {bad[:5]} are out of range; expected ids in [0, {V})")
        if params.min_new_tokens > 0 and len(set(self.eos_token_ids) | set(params.stop_token_ids)) >= V:
            raise RequestError(f"`min_new_tokens` {params.min_new_tokens} suppresses the EOS ids and "
                               f"`stop_token_ids`, which cover all {V} tokens of the vocabulary: no token is "
                               "left to sample; expected fewer stop ids or min_new_tokens=0")
        return params

    def _max_total(self, prompt_len: int, prefix_len: int) -> int:
        """Most own tokens (prompt + generated) a request may reach; RequestError if the prompt
        leaves no room for one new token. Bounded by the model's positions, by the KV pool cap
        (the scheduler admits a sequence only with a page spare) and, without chunked prefill, by
        the step's token budget (else the request would wait forever at the head of the queue)."""
        n = prompt_len
        limits = []
        if self.max_model_len:
            limits.append((self.max_model_len - prefix_len,
                           f"with the task's prefix of {prefix_len} it needs {n + prefix_len + 1} positions to "
                           f"generate one token; the model allows {self.max_model_len}"))
        if self.kv.max_pages is not None:
            cap = (self.kv.max_pages - 2) * self.kv.page_size
            limits.append((cap + 1, f"one sequence may hold {cap} tokens in the KV pool of max_pages="
                                    f"{self.kv.max_pages} pages of {self.kv.page_size}"))
        if not self.scheduler.chunked_prefill:
            # the prompt, and a preempted sequence's tokens when it is recomputed, go in one step
            budget = self.scheduler.max_num_batched_tokens
            why = f"without chunked prefill it must fit in one step of max_num_batched_tokens={budget}"
            if self.kv.max_pages is not None:
                limits.append((budget + 1, why))
            elif n > budget:
                raise RequestError(f"prompt of {n} tokens is too long: {why}")
        max_total, why = min(limits, default=(1 << 62, ""))
        if n >= max_total:
            raise RequestError(f"prompt of {n} tokens is too long: {why}")
        return max_total

    def _check_task(self, task) -> int:
        if task is None:
            return 0
        if not isinstance(task, str) or task == NO_PROMPT_TASK:
            raise RequestError(f"`task` {task!r} is invalid; expected None or a task name")
        if task not in self.store:
            raise RequestError(f"unknown task {task!r}; the prefix store holds "
                               f"{[n for n in self.store.names if n != NO_PROMPT_TASK]}")
        return self.store.prefix_len(task)

    def _tokenize(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass one to Engine(model, tokenizer) "
                                   "or give token ids")
            if not prompt:
                raise RequestError("`prompt` '' is invalid; expected a non-empty prompt")
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise RequestError(f"`prompt` tensor with shape {tuple(prompt.shape)} and dtype {prompt.dtype} "
                                   "is invalid; expected a 1D int tensor of token ids")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise RequestError("`prompt` list is invalid; expected token ids (ints)")
            ids = list(prompt)
        else:
            raise RequestError(f"`prompt` of type {type(prompt).__name__} is invalid; expected text or token ids")
        if not ids:
            raise RequestError("`prompt` is empty; expected at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"`prompt` token ids {bad[:5]} are out of range; expected ids in "
                               f"[0, {self.vocab_size})")
        return ids

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running request now: its pages are freed and its result (the tokens made
        so far, ``finish_reason == "aborted"``) waits for :meth:`take_result`. Returns True; False
        if the request had already finished (its result is kept as it was). KeyError for an id the
        engine does not hold (never added, or its result already taken)."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, "aborted")
            return True
        if request_id in self._results:
            return False
        raise KeyError(f"Engine.abort: `request_id` {request_id!r} is not a request of this engine (never added, "
                       "or its result was already taken)")

    def unfinished(self, task: Optional[str] = None) -> int:
        """How many requests are queued or running (only those of ``task`` when it is given); a
        server unloads a task from the store only once none of its requests is left."""
        if task is None:
            return len(self._seqs)
        return sum(1 for s in self._seqs.values() if s.task == task)

    # ------------------------------------------------------------------ stepping
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> List[StreamEvent]:
        """Run one step (prefill of admitted requests, decode of running ones); returns its events.

        Fault isolation: a failure tied to some requests ends only those, with
        ``finish_reason == "error"`` and the exception's message (their pages freed); the batch goes
        on and the engine stays usable. A forward that raises changed no sequence's bookkeeping
        (tokens count as computed only once their forward returned), so it is retried on halves of
        its rows until the rows that fail on their own are found; a row that cannot be sampled
        (non-finite logits, a failing draw) fails alone. Only a failure of the scheduler itself
        (e.g. the KV pool cannot be allocated) propagates.
        """
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        self._stats["steps"] += 1
        self._stats["preemptions"] += len(plan.preempted)
        if plan:
            self._stats["running_sum"] += len(self.scheduler.running)
            self._stats["max_step_tokens"] = max(self._stats["max_step_tokens"], plan.num_tokens)
        with torch.inference_mode():
            if plan.prefill:
                for rows, logits in self._isolated(plan.prefill, prefill=True):
                    self._advance(rows, logits, True)
            if plan.decode:
                self._stats["decode_steps"] += 1
                self._stats["decode_rows"] += len(plan.decode)
                # rows of one task side by side: the attention stacks each task's queries as a view
                decode = sorted(plan.decode, key=lambda s: s.task or "")
                for rows, logits in self._isolated([(s, 1) for s in decode], prefill=False):
                    self._advance(rows, logits, False)
        self._stats["busy_seconds"] += time.perf_counter() - start
        events, self._events = self._events, []
        return events

    def _isolated(self, rows, *, prefill: bool):
        """The forwards of ``rows`` ([(sequence, new tokens)]) as [(rows, logits)]. If the forward
        raises, each half of the rows is run again on its own (recursively), so one bad row costs
        about 2 log2(B) forwards, and a row that fails alone finishes with the error."""
        rows = [(s, n) for s, n in rows if not s.finished]
        if not rows:
            return []
        try:
            return self._forward(rows, prefill)
        except Exception as exc:        # noqa: BLE001 - any failure: find its rows, keep the engine
            if len(rows) == 1:
                self._fail(rows[0][0], "the model forward failed", exc)
                return []
        half = len(rows) // 2
        return self._isolated(rows[:half], prefill=prefill) + self._isolated(rows[half:], prefill=prefill)

    def _forward(self, rows, prefill: bool):
        """The model forwards of one step's prefill or decode rows: [(rows, logits)], one entry per
        forward batch. Changes no sequence's tokens or counts (rows whose task left the store
        finish with an error), so it can be retried; K/V slots it wrote are rewritten then."""
        groups = self._prefill_groups(rows) if prefill else [rows]
        batches = [b for b in map(self._batch, groups) if b is not None]
        if not batches:
            return []
        t0 = time.perf_counter()
        out = self.runner.execute(ForwardPlan(prefill, batches))
        self._stats["forward_seconds"] += time.perf_counter() - t0
        self._stats["forwards"] += out.forwards
        if prefill:
            self._stats["padded_prefill_tokens"] += out.padded_tokens
        return [(batch.rows, logits) for batch, logits in zip(batches, out.logits)]

    def _prefill_groups(self, rows):
        rows = sorted(rows, key=lambda r: -r[1])
        groups, current, real = [], [], 0
        for seq, n in rows:
            if current and current[0][1] * (len(current) + 1) > (1 + self.prefill_padding) * (real + n):
                groups.append(current)
                current, real = [], 0
            current.append((seq, n))
            real += n
        if current:
            groups.append(current)
        return groups

    def _task_ids(self, seqs) -> Optional[torch.Tensor]:
        if all(s.task is None for s in seqs):
            return None
        if any(s.task is None for s in seqs) and NO_PROMPT_TASK not in self.store:
            L, H, D = self.store.num_layers, self.store.num_kv_heads, self.store.head_dim
            empty = torch.zeros(L, H, 0, D, dtype=self.store.dtype, device=self.store.device)
            self.store.add(NO_PROMPT_TASK, empty, empty)
        return self.store.task_ids([s.task if s.task is not None else NO_PROMPT_TASK for s in seqs]).to(self.device)

    def _batch(self, rows) -> Optional[ForwardBatch]:
        """Drop rows whose task left the store; the rest as one forward batch, or None."""
        gone = [s for s, _ in rows if s.task is not None and s.task not in self.store]
        for s in gone:
            self._finish(s, "error", error=f"request {s.request_id!r}: task {s.task!r} was removed from the store")
        rows = [(s, n) for s, n in rows if s not in gone]
        if not rows:
            return None
        seqs = [s for s, _ in rows]
        cache = self.kv.step_cache(seqs, [s.num_computed for s in seqs], [n for _, n in rows])
        Sq = cache.Sq
        ids = torch.full((len(rows), Sq), self.pad_token_id, dtype=torch.long)
        for b, (s, n) in enumerate(rows):
            ids[b, Sq - n:] = torch.tensor(s.tokens[s.num_computed: s.num_computed + n], dtype=torch.long)
        return ForwardBatch(rows, cache, ids, self._task_ids(seqs))

    def _advance(self, rows, logits, prefill: bool) -> None:
        """Count the rows' new tokens as computed; choose the next token of rows that are ready.
        A row whose token cannot be chosen or taken finishes with the error; the others go on."""
        if prefill:
            self._stats["prefill_tokens"] += sum(n for _, n in rows)
        for s, n in rows:
            s.num_computed += n
        seqs = [s for s, _ in rows]
        ready = [b for b, s in enumerate(seqs) if s.num_computed == s.num_tokens]
        if not ready:
            return
        t1 = time.perf_counter()
        picked = [seqs[b] for b in ready]
        suppress = [self._suppressed(s) for s in picked]
        if len(ready) < len(seqs):                  # (indexing copies the logits: skip it when all are ready)
            logits = logits[ready]
        try:
            tokens, errors = S.choose_tokens(logits, [s.sampling for s in picked], [s.generator for s in picked],
                                             suppress)
        except Exception as exc:        # noqa: BLE001 - counted as computed, no token: they cannot go on
            for s in picked:
                self._fail(s, "choosing its next token failed", exc)
            return
        self._stats["sample_seconds"] += time.perf_counter() - t1
        for b, (s, tok) in enumerate(zip(picked, tokens)):
            if b in errors:
                self._fail(s, f"cannot choose its next token: {errors[b]}")
                continue
            try:
                self._append(s, tok)
            except Exception as exc:    # noqa: BLE001 - e.g. the tokenizer cannot decode the token
                self._fail(s, f"taking token {tok} failed", exc)

    def _fail(self, seq: Sequence, what: str, exc: Optional[BaseException] = None) -> None:
        """Finish ``seq`` with the error ``what`` (and ``exc``, logged with its traceback); its pages
        are freed and its result and final event carry the message."""
        if seq.finished:
            return
        message = f"request {seq.request_id!r}: {what}" + (f": {type(exc).__name__}: {exc}" if exc else "")
        logger.warning("%s", message, exc_info=exc)
        self._finish(seq, "error", error=message)

    def _suppressed(self, seq: Sequence):
        if len(seq.output_ids) >= seq.sampling.min_new_tokens:
            return ()
        return tuple(set(self.eos_token_ids) | set(seq.sampling.stop_token_ids))

    def _append(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        self._stats["generated_tokens"] += 1
        p = seq.sampling
        reason = None
        if token in p.stop_token_ids:
            reason = "stop"
        elif not p.ignore_eos and token in self.eos_token_ids:
            reason = "eos"
        cut = None
        if self.tokenizer is not None:
            old_len = len(seq.text)
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            if p.stop and reason is None:
                longest = max(len(s) for s in p.stop)
                at = S.find_stop(seq.text, p.stop, old_len - longest + 1)
                if at >= 0:
                    reason, cut = "stop", at
        if cut is not None:
            seq.text = seq.text[:cut]
        if reason is None and (len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= seq.max_total):
            reason = "length"
        self._events.append(self._event(seq, token, final=reason is not None))
        if reason is not None:
            self._finish(seq, reason, emit=False)

    def _event(self, seq: Sequence, token, final: bool, error=None) -> StreamEvent:
        text = ""
        if self.tokenizer is not None:
            upto = len(seq.text)
            if not final:
                upto -= max(0, self._max_stop_of(seq) - 1)       # hold back a possible stop-string start
                while upto > seq.emitted_text and seq.text[upto - 1] == "\ufffd":
                    upto -= 1                                   # an incomplete multi-byte character
            if upto > seq.emitted_text:
                text = seq.text[seq.emitted_text: upto]
                seq.emitted_text = upto
        return StreamEvent(seq.request_id, seq.index, token, text, final, seq.finish_reason, error)

    @staticmethod
    def _max_stop_of(seq: Sequence) -> int:
        return max((len(s) for s in seq.sampling.stop), default=0)

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None, emit: bool = True) -> None:
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.perf_counter()
        self.scheduler.release(seq)              # pages go back to the free list now
        self._stats["finished"] += 1
        if error is not None:
            self._stats["errors"] += 1
        if emit:
            self._events.append(self._event(seq, None, final=True, error=error))
        elif self._events and self._events[-1].request_id == seq.request_id:
            self._events[-1].finish_reason = reason
        self._seqs.pop(seq.request_id, None)
        self._results[seq.request_id] = Result(
            request_id=seq.request_id, task=seq.task, prompt_token_ids=list(seq.prompt_ids),
            token_ids=list(seq.output_ids), text=seq.text if self.tokenizer is not None else None,
            finish_reason=reason, error=error, arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time, finish_time=seq.finish_time)

    # ------------------------------------------------------------------ batch front ends
    def _requests(self, prompts, tasks, sampling) -> List[str]:
        if isinstance(prompts, (str, torch.Tensor)) or (isinstance(prompts, (list, tuple)) and prompts
                                                         and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        n = len(prompts)
        if tasks is None or isinstance(tasks, str):
            tasks = [tasks] * n
        tasks = list(tasks)
        if len(tasks) != n:
            raise ValueError(f"Engine: `tasks` with {len(tasks)} entries is invalid for {n} prompts; expected one "
                             "task (or None) per prompt, or a single task for all")
        if sampling is None or isinstance(sampling, (SamplingParams, dict)):
            sampling = [sampling] * n
        sampling = list(sampling)
        if len(sampling) != n:
            raise ValueError(f"Engine: `sampling` with {len(sampling)} entries is invalid for {n} prompts; "
                             "expected one SamplingParams (or dict of its fields), or one per prompt")
        return [self.add_request(p, t, s) for p, t, s in zip(prompts, tasks, sampling)]

    def take_result(self, request_id: str) -> Optional[Result]:
        """The result of a finished request (removed from the engine), or None while it runs."""
        return self._results.pop(request_id, None)

    def generate(self, prompts, tasks=None, sampling=None) -> List[Result]:
        """Generate for every prompt (text or ids) with its task (name or None); results in order.

        ``sampling``: one :class:`SamplingParams` (or dict of its fields) for all, or one per prompt.
        A request that fails does not fail the call: its :class:`Result` has ``ok == False``,
        ``finish_reason == "error"`` and the reason in ``error`` (rejected when added: no tokens;
        failed while running: the tokens made before), and every other request is served as if
        it were alone. Check ``result.ok``. Only a malformed call (``tasks`` or ``sampling`` lists
        of the wrong length, a reused request id) raises ValueError.
        """
        ids = self._requests(prompts, tasks, sampling)
        while any(i not in self._results for i in ids):
            self.step()
        return [self._results.pop(i) for i in ids]

    def stream(self, prompts, tasks=None, sampling=None) -> Iterator[StreamEvent]:
        """Yield :class:`StreamEvent` s (request id, token, text delta, finished) as tokens are made.
        ``event.index`` is the prompt's position in this call; final results: :meth:`take_result`."""
        ids = self._requests(prompts, tasks, sampling)
        mine = set(ids)
        index = {rid: i for i, rid in enumerate(ids)}
        pending = set(ids)
        while pending:
            events = self.step() if self.scheduler.has_work() or not self._events else self._drain()
            for e in events:
                if e.request_id in mine:
                    if e.finished:
                        pending.discard(e.request_id)
                    yield dataclasses.replace(e, index=index[e.request_id])
            if not self.scheduler.has_work() and not self._events:
                for rid in list(pending):                       # finished without a final event
                    pending.discard(rid)

    def _drain(self) -> List[StreamEvent]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Tokens/s, batch occupancy and memory since the last :meth:`reset_stats`."""
        st = dict(self._stats)
        busy = st["busy_seconds"] or float("nan")
        st["generated_tokens_per_s"] = st["generated_tokens"] / busy
        st["prefill_tokens_per_s"] = st["prefill_tokens"] / busy
        st["mean_decode_batch"] = st["decode_rows"] / st["decode_steps"] if st["decode_steps"] else 0.0
        st["batch_occupancy"] = st["mean_decode_batch"] / self.scheduler.max_batch_size
        st["running"] = len(self.scheduler.running)
        st["waiting"] = len(self.scheduler.waiting)
        st["kv_cache"] = self.kv.stats()
        st["forward_path"] = self.forward_path()
        st["prefix_store_bytes"] = self.store.memory_stats()["bytes_used"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        st["peak_rss_bytes"] = rss * (1 if sys.platform == "darwin" else 1024)
        if self.device.type == "cuda":
            st["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return st

    def forward_path(self) -> str:
        """Which forward serves the engine's steps now, in words (for reports)."""
        return self.runner.describe()

    @property
    def cpu_decoder(self) -> Optional[CpuDecoder]:
        """The :class:`~softprompt.engine.cpu_decode.CpuDecoder` of the engine's runner, or None
        when the HF forward serves every step."""
        return self.runner.decoder if isinstance(self.runner, CpuDecoderRunner) else None

    def close(self) -> None:
        """Drop the engine's bookkeeping (and the hidden no-prompt task it may have added)."""
        for seq in list(self._seqs.values()):
            self._finish(seq, "aborted")
        if NO_PROMPT_TASK in self.store:
            self.store.remove(NO_PROMPT_TASK)
