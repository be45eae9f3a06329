"""OpenAI-style errors (``{"error": {"message", "type", "param", "code"}}``), the handlers that turn
validation failures into 400s naming the field, the bearer-token check and the request-size limit."""
from __future__ import annotations

import hmac
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable"}


class APIError(Exception):
    """An error answered as ``status`` with an OpenAI error body; ``headers`` e.g. ``Retry-After``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status, headers=exc.headers)


def _field(loc) -> Optional[str]:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names union members (e.g. "str", "list[int]") in loc; keep the request's field path
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    field = _field(first.get("loc", ()))
    seen = first.get("input")
    seen_text = "" if first.get("type") == "missing" else f" (got {str(seen)[:80]!r})"
    return f"`{field or 'body'}`: {first.get('msg')}{seen_text}", field


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        return JSONResponse(error_body(400, message, field), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


def check_bearer(request: Request, api_key: Optional[str]) -> None:
    """401 unless ``Authorization: Bearer <api_key>`` (constant-time compare); no-op without a key."""
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 (checked on the declared
    Content-Length and on the bytes actually received)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        seen = 0
        too_large = False

        async def limited():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise APIError(413, self._message())
            return message

        try:
            await self.app(scope, limited, send)
        except APIError:
            if not too_large:
                raise
            await self._too_large(send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    async def _too_large(self, send):
        await error_response(APIError(413, self._message()))({"type": "http"}, None, send)
