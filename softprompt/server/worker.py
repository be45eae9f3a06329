"""The engine worker: one background thread owns the :class:`~softprompt.engine.Engine` and runs its
continuous-batching loop; HTTP handlers (on the event loop) hand it requests, aborts and store
changes through a thread-safe inbox, and receive each request's tokens on an asyncio queue.

Between two engine steps the worker takes everything in its inbox (new requests join the next
step's batch, aborts free their pages at once, adapter loads/unloads change the store), then runs
one step and dispatches its events. A task unloaded while it has requests in flight stops taking
new requests at once and leaves the store when its last request finishes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional, Union

from ..engine import Engine, Result, StreamEvent
from .adapters import Adapters
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)
STATE_INTERVAL_S = 0.25          # how often gauges are refreshed while busy


class Rejected(Exception):
    """A request the worker will not queue: 429 (queue full, with Retry-After) or 503 (draining)."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclasses.dataclass
class Item:
    """What a request's handler receives: one engine event; on the last one, the result and, for an
    aborted or refused request, why (``status`` is an HTTP status for requests refused up front)."""

    event: StreamEvent
    result: Optional[Result] = None
    reason: Optional[str] = None
    status: Optional[int] = None


class RequestHandle:
    """One engine request seen from its HTTP handler: created on the event loop, fed by the worker."""

    def __init__(self, request_id: str, prompt: Union[str, List[int]], task: Optional[str], sampling: dict,
                 add_special_tokens: bool = True, queue: Optional[asyncio.Queue] = None):
        """``queue``: where its items go (several requests may share one); a new one by default."""
        self.request_id, self.prompt, self.task, self.sampling = request_id, prompt, task, sampling
        self.add_special_tokens = add_special_tokens
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.arrival = time.monotonic()
        self.last_token: Optional[float] = None

    def push(self, item: Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:            # the event loop is closed: nobody is listening any more
            pass

    async def next(self) -> Item:
        return await self.queue.get()


class EngineWorker:
    def __init__(self, engine: Engine, adapters: Adapters, metrics: ServerMetrics, *, max_waiting: int,
                 max_prompt_tokens: int):
        self.engine, self.adapters, self.metrics = engine, adapters, metrics
        self.max_waiting, self.max_prompt_tokens = max_waiting, max_prompt_tokens
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0                     # submitted, not yet handed to the engine
        self._engine_waiting = 0             # in the engine's queue after the last step
        self._accepting = True
        self._deadline: Optional[float] = None
        self._drain_reason = ""
        self._stop = False
        self._handles: Dict[str, RequestHandle] = {}
        self._reasons: Dict[str, str] = {}
        self._unloading: Dict[str, List[concurrent.futures.Future]] = {}
        self._served = list(adapters.names)  # the tasks new requests may use (read by handlers)
        self._last_state = 0.0
        self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)

    # ------------------------------------------------------------------ called from handlers
    def start(self) -> None:
        self._thread.start()

    @property
    def tasks(self) -> List[str]:
        with self._lock:
            return list(self._served)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, handle: RequestHandle) -> None:
        with self._lock:
            if not self._accepting:
                self.metrics.rejected.labels("503").inc()
                raise Rejected(503, "the server is shutting down and takes no new requests")
            waiting = self._queued + self._engine_waiting
            if waiting >= self.max_waiting:
                self.metrics.rejected.labels("429").inc()
                raise Rejected(429, f"too many queued requests ({waiting} >= --max-waiting {self.max_waiting}); "
                               "retry later", retry_after=1)
            self._queued += 1
        self._inbox.put(("add", handle))

    def abort(self, request_id: str, reason: str) -> None:
        self._inbox.put(("abort", request_id, reason))

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread between steps; its result (or exception) in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, future))
        return future

    def unload(self, name: str) -> concurrent.futures.Future:
        """Unload task ``name``: at once if it has no request in flight, else once the last one
        finishes (new requests for it are refused from now on). The future gives
        ``{"name", "status": "unloaded"}`` when it is gone."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("unload", name, future))
        return future

    def drain(self, grace_s: float, reason: str = "the server is shutting down") -> None:
        """Stop taking requests; those in flight may finish for ``grace_s`` seconds, then are aborted."""
        with self._lock:
            self._accepting = False
            self._deadline = time.monotonic() + grace_s
            self._drain_reason = f"{reason}: request aborted after the {grace_s:g} s grace period"
        self._inbox.put(("wake",))

    def in_flight(self) -> int:
        with self._lock:
            return self._queued + len(self._handles)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker thread (requests still in flight are aborted); then close the engine and
        detach the model from its prefix store."""
        self._stop = True
        self._inbox.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()
            self.adapters.close()

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while not self._stop:
            busy = self.engine.has_unfinished()
            got = self._take_inbox(block=not busy)
            if self._deadline is not None and time.monotonic() >= self._deadline:
                for rid in list(self._handles):
                    self._abort(rid, self._drain_reason)
            if not (busy or got):
                self._publish_state(force=True)
                continue
            try:
                events = self.engine.step()
            except Exception as exc:     # noqa: BLE001 - the scheduler failed: end every request, keep serving
                logger.exception("engine step failed")
                for rid in list(self._handles):
                    self._abort(rid, f"the engine step failed: {type(exc).__name__}: {exc}")
                events = self.engine.step()
            self._dispatch(events)
            with self._lock:
                self._engine_waiting = len(self.engine.scheduler.waiting)
            self._publish_state()
        for rid in list(self._handles):          # stopped: nobody will step these any more
            self._abort(rid, "the server stopped")
        self._dispatch(self.engine.step())

    def _take_inbox(self, block: bool) -> bool:
        got = False
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                got = True
                self._handle_command(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return got

    def _handle_command(self, item) -> None:
        kind = item[0]
        if kind == "add":
            self._add(item[1])
        elif kind == "abort":
            self._abort(item[1], item[2])
        elif kind == "call":
            _, fn, future = item
            try:
                future.set_result(fn())
            except Exception as exc:     # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
        elif kind == "unload":
            self._unload(item[1], item[2])

    def _add(self, handle: RequestHandle) -> None:
        with self._lock:
            self._queued -= 1
        prompt = handle.prompt
        try:
            if isinstance(prompt, str):
                tok = self.engine.tokenizer
                if tok is None:
                    raise ValueError("a text prompt needs a tokenizer; send token ids")
                prompt = list(tok(prompt, add_special_tokens=handle.add_special_tokens)["input_ids"])
            if len(prompt) > self.max_prompt_tokens:
                raise ValueError(f"`prompt` has {len(prompt)} tokens; this server allows at most "
                                 f"--max-prompt-tokens {self.max_prompt_tokens}")
        except ValueError as exc:
            handle.push(Item(StreamEvent(handle.request_id, 0, None, "", True, "error", str(exc)), status=400))
            return
        self._handles[handle.request_id] = handle
        self.engine.add_request(prompt, handle.task, handle.sampling, request_id=handle.request_id)

    def _abort(self, request_id: str, reason: str) -> None:
        if request_id in self._handles:
            self._reasons[request_id] = reason
            self.engine.abort(request_id)         # pages freed now; the final event comes with the next step

    def _unload(self, name: str, future: concurrent.futures.Future) -> None:
        try:
            if name not in self.adapters:
                self.adapters.unload(name)        # raises the "not loaded" error
            with self._lock:
                if name in self._served:
                    self._served.remove(name)
            self._unloading.setdefault(name, []).append(future)
            self._finish_unloads()
        except Exception as exc:     # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _finish_unloads(self) -> None:
        for name in [n for n in self._unloading if self.engine.unfinished(n) == 0]:
            futures = self._unloading.pop(name)
            try:
                self.adapters.unload(name)
                result, error = {"name": name, "status": "unloaded"}, None
            except Exception as exc:     # noqa: BLE001 - handed to the callers
                result, error = None, exc
            for f in futures:
                f.set_exception(error) if error is not None else f.set_result(result)

    def _dispatch(self, events: List[StreamEvent]) -> None:
        now = time.monotonic()
        tokens = 0
        finished = False
        for ev in events:
            handle = self._handles.get(ev.request_id)
            if handle is None:
                continue
            if ev.token_id is not None:
                tokens += 1
                if handle.last_token is None:
                    self.metrics.ttft.observe(now - handle.arrival)
                else:
                    self.metrics.itl.observe(now - handle.last_token)
                handle.last_token = now
            if not ev.finished:
                handle.push(Item(ev))
                continue
            finished = True
            del self._handles[ev.request_id]
            result = self.engine.take_result(ev.request_id)
            if result is not None:
                self.metrics.prompt_tokens.inc(len(result.prompt_token_ids))
            self.metrics.finished.labels(ev.finish_reason or "unknown").inc()
            self.metrics.e2e.observe(now - handle.arrival)
            handle.push(Item(ev, result, self._reasons.pop(ev.request_id, None)))
        self.metrics.step(tokens)
        if finished and self._unloading:
            self._finish_unloads()

    def _publish_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_state < (STATE_INTERVAL_S / 5 if force else STATE_INTERVAL_S):
            return
        self._last_state = now
        self.metrics.engine_state(self.engine.stats(), len(self.adapters.names))

    # ------------------------------------------------------------------ on the worker thread, via call()
    def snapshot(self) -> dict:
        """Running / waiting requests and KV pages now (call through :meth:`call`)."""
        st = self.engine.stats()
        return {"running": st["running"], "waiting": st["waiting"] + self._queued,
                "kv_pages_used": st["kv_cache"]["pages_used"], "tasks": list(self.adapters.names)}

    def load(self, fn: Callable[[], List[str]]) -> List[str]:
        """Run an adapter load (on the worker thread, via :meth:`call`); new tasks become servable."""
        names = fn()
        with self._lock:
            self._served += [n for n in names if n not in self._served]
        return names
