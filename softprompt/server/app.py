"""The FastAPI app: OpenAI-compatible routes over an :class:`~softprompt.server.worker.EngineWorker`.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``model`` = a task
name, or the base model id for no soft prompt), ``POST /v1/load_adapter`` /
``POST /v1/unload_adapter`` (with ``--enable-adapter-loading``), ``GET /health``, ``GET /metrics``.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .adapters import AdapterError, resolve_under
from .config import ServerConfig
from .errors import APIError, BodyLimit, check_bearer, install_handlers
from .generation import ClientGone, Generation, unless_disconnected
from .schemas import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest
from .worker import EngineWorker

UNLOAD_WAIT_S = 5.0        # an unload still waiting for requests in flight after this answers 202


def create_app(worker: EngineWorker, config: ServerConfig) -> FastAPI:
    """The app serving ``worker`` (started and stopped by the caller, see ``softprompt.server.cli``)."""

    async def auth(request: Request):
        check_bearer(request, config.api_key)

    app = FastAPI(title="softprompt", dependencies=[Depends(auth)], docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.config = worker, config
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    tokenizer = worker.engine.tokenizer

    def task_of(model: str) -> Optional[str]:
        if model == config.model_id:
            return None
        if model in worker.tasks:
            return model
        raise APIError(404, f"model {model!r} does not exist; served: {[config.model_id, *worker.tasks]}",
                       param="model")

    @app.get("/health")
    async def health():
        if not worker.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        state = await asyncio.wrap_future(worker.call(worker.snapshot))
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        ids = [config.model_id, *worker.tasks]
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": 0, "owned_by": "softprompt",
             "root": config.model_id, "parent": None if i == config.model_id else config.model_id} for i in ids]}

    async def run(request: Request, gen: Generation, stream: bool):
        try:
            await unless_disconnected(request, gen.started())
            if stream:
                return StreamingResponse(gen.stream(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await unless_disconnected(request, gen.response())
        except ClientGone:
            gen.abort("the client disconnected")
            return Response(status_code=499)
        except BaseException:
            gen.abort("the request failed")
            raise

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        gen = Generation(worker, body.model, task_of(body.model), chat=False)
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise APIError(400, f"`prompt`: {exc}", param="prompt") from None
        if any(isinstance(p, str) and len(p) > 16 * config.max_prompt_tokens for p in prompts):
            raise APIError(400, f"`prompt` is too long for --max-prompt-tokens {config.max_prompt_tokens}",
                           param="prompt")
        gen.submit(prompts, [[body.sampling(16, c) for c in range(body.n)] for _ in prompts])
        return await run(request, gen, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        gen = Generation(worker, body.model, task_of(body.model), chat=True)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:     # noqa: BLE001 - a template may raise anything (jinja errors)
            raise APIError(400, f"`messages` do not fit the chat template: {exc}", param="messages") from None
        gen.submit([text], [[body.sampling(config.default_max_tokens, c) for c in range(body.n)]],
                   add_special_tokens=False)
        return await run(request, gen, body.stream)

    def adapters_enabled() -> None:
        if not config.enable_adapter_loading:
            raise APIError(403, "adapter loading is off; start the server with --enable-adapter-loading "
                                "--adapter-root DIR")

    @app.post("/v1/load_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        adapters_enabled()
        try:
            path = resolve_under(config.adapter_root, body.path)
            names = await asyncio.wrap_future(worker.call(
                lambda: worker.load(lambda: worker.adapters.load(path, body.name, body.method))))
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), param=exc.param) from None
        return {"status": "loaded", "loaded": names}

    @app.post("/v1/unload_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        adapters_enabled()
        future = asyncio.wrap_future(worker.unload(body.name))
        try:
            return await asyncio.wait_for(asyncio.shield(future), UNLOAD_WAIT_S)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), param=exc.param) from None
        except asyncio.TimeoutError:
            return JSONResponse({"name": body.name, "status": "unloading"}, status_code=202)

    return app
