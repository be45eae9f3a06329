"""One HTTP generation request as engine requests: fan-out (prompts x ``n`` choices, each its own
engine request on one shared queue), fan-in into OpenAI bodies or server-sent-event chunks.

A request whose engine requests are refused up front (bad prompt, sampling values the engine
rejects) is answered 400 before any byte is streamed: the handler waits for every choice's first
event first. A client that disconnects aborts all its engine requests (their pages are freed at once).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Dict, List, Optional, Union

from starlette.requests import Request

from .errors import APIError, error_body
from .worker import EngineWorker, Item, Rejected, RequestHandle

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort", "error": "error"}


class ClientGone(Exception):
    """The HTTP client disconnected."""


class Generation:
    """The engine requests of one HTTP request. ``chat`` selects the chat-completion formats."""

    def __init__(self, worker: EngineWorker, model: str, task: Optional[str], chat: bool):
        self.worker, self.model, self.task, self.chat = worker, model, task, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choice: Dict[str, int] = {}          # engine request id -> choice index
        self.done: Dict[int, Item] = {}
        self.buffered: List[Item] = []

    # ------------------------------------------------------------------ fan-out
    def submit(self, prompts: List[Union[str, List[int]]], samplings: List[List[dict]],
               add_special_tokens: bool = True) -> None:
        """One engine request per (prompt, choice); 429/503 (nothing left queued) if the worker refuses."""
        index = 0
        try:
            for prompt, choices in zip(prompts, samplings):
                for sampling in choices:
                    rid = f"{self.id}-{index}"
                    handle = RequestHandle(rid, prompt, self.task, sampling, add_special_tokens, self.queue)
                    self.worker.submit(handle)
                    self.choice[rid] = index
                    index += 1
        except Rejected as exc:
            self.abort("the request was refused")
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise APIError(exc.status, exc.message, headers=headers) from None

    def abort(self, reason: str) -> None:
        for rid, i in self.choice.items():
            if i not in self.done:
                self.worker.abort(rid, reason)

    async def _next(self) -> Item:
        item = await self.queue.get()
        if item.event.finished:
            self.done[self.choice[item.event.request_id]] = item
        return item

    async def started(self) -> None:
        """Wait until every choice produced its first event; 400/404 if the engine refused one."""
        seen = set()
        while len(seen) < len(self.choice):
            item = await self._next()
            self.buffered.append(item)
            seen.add(item.event.request_id)
            ev = item.event
            refused = item.result is not None and not item.result.prompt_token_ids     # rejected when added
            if item.status is not None or ev.finish_reason == "error" and refused:
                self.abort("another choice of the request was refused")
                message = ev.error or "the request was refused"
                status = 404 if "unknown task" in message else (item.status or 400)
                raise APIError(status, message, param="model" if status == 404 else None)

    async def items(self) -> AsyncIterator[Item]:
        """Every event after :meth:`started`, buffered ones first, until each choice finished."""
        for item in self.buffered:
            yield item
        self.buffered = []
        while len(self.done) < len(self.choice):
            yield await self._next()

    # ------------------------------------------------------------------ fan-in: whole responses
    def usage(self) -> dict:
        prompt = sum(len(i.result.prompt_token_ids) for i in self.done.values() if i.result is not None)
        completion = sum(len(i.result.token_ids) for i in self.done.values() if i.result is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def response(self) -> dict:
        async for _ in self.items():
            pass
        failed = [i for i in self.done.values() if i.event.finish_reason in ("error", "aborted")]
        if failed:
            item = failed[0]
            if item.event.finish_reason == "error":
                raise APIError(500, item.event.error or "generation failed")
            raise APIError(503, item.reason or "the request was aborted")
        choices = []
        for index in sorted(self.done):
            result = self.done[index].result
            text = result.text or ""
            body = {"index": index, "finish_reason": FINISH[result.finish_reason], "token_ids": result.token_ids}
            if self.chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body.update(text=text, logprobs=None)
            choices.append(body)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------------ fan-in: server-sent events
    def _chunk(self, choices: list, usage: Optional[dict] = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _choice(self, index: int, text: str, token: Optional[int], finish: Optional[str], first: bool) -> dict:
        choice = {"index": index, "finish_reason": finish, "token_ids": [] if token is None else [token]}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice["delta"] = delta
        else:
            choice.update(text=text, logprobs=None)
        return choice

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: a chunk per token, an ``error`` event for a choice that failed or was aborted
        with a reason, a last chunk with ``usage`` and no choices, then ``[DONE]``. If the client
        goes away, the choices still running are aborted."""
        started = set()
        try:
            async for item in self.items():
                ev = item.event
                index = self.choice[ev.request_id]
                finish = FINISH.get(ev.finish_reason) if ev.finished else None
                if ev.finished and (ev.finish_reason == "error" or item.reason):
                    message = ev.error or item.reason
                    yield f"data: {json.dumps(error_body(503 if item.reason else 500, message))}\n\n"
                yield self._chunk([self._choice(index, ev.text, ev.token_id, finish, index not in started)])
                started.add(index)
            yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            if len(self.done) < len(self.choice):
                self.abort("the client disconnected")


async def until_disconnected(request: Request, poll_s: float = 0.1) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)


async def unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``; ClientGone (and the awaitable cancelled) if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ClientGone()
