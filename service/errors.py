"""One error shape on the wire for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from labeler.errors import (
    EngineError,
    EngineUnavailable,
    InputTooLong,
    InvalidInput,
    LabelerError,
    ModelOutputError,
    UnknownTask,
)

from .batcher import QueueFull

log = logging.getLogger("service.errors")


def error_response(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(loc: tuple) -> str:
    """`items[3].response_a` from pydantic's ("body", "items", 3, "response_a"), without the
    tags pydantic puts in for the branches of a union ("constrained-str", "list[...]"). Only
    the leading part says where the value came from: /get_reward's body field `query` stays."""
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    parts = [p for p in loc if isinstance(p, int) or p.isidentifier()]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _about(exc: LabelerError, what: str) -> str:
    """`what` happened, and why: led by the item the error names, as a 422's message is led
    by its field, so that a client can drop that name as it drops a 422's."""
    return f"{exc.field}: {what}: {exc.reason}" if exc.field else f"{what}: {exc}"


def _json_content(request: Request) -> bool:
    ctype = request.headers.get("content-type")
    if not ctype:  # none, or empty: read as JSON, as FastAPI reads it
        return True
    mime = ctype.partition(";")[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the error shape."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors() or [{"loc": ("body",), "msg": "invalid request"}]
        # A value that fits no branch of a union gets one error per branch; the branch of the
        # value's own type says what is wrong with it, not the "should be a valid string" of
        # another: one whose error is not about the type, else the one that got furthest into
        # the value (a message's content, not the context that holds the messages).
        first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), None)
        first = first or max(errors, key=lambda e: len(e.get("loc", ())))
        kind = first.get("type", "")
        loc = tuple(first.get("loc", ()))
        param = _loc(tuple(p for p in loc if not (kind == "json_invalid" and isinstance(p, int))))
        message = f"{param}: {first.get('msg', 'invalid')}"
        if kind == "extra_forbidden" and loc[:1] == ("query",):
            param = str(loc[-1])  # as sent, whatever its characters
            message = f"unknown query parameter {param!r} (the route's own are in /openapi.json)"
        elif kind == "extra_forbidden" and loc and isinstance(loc[-1], str) and not loc[-1].isidentifier():
            # A key no name can be written for ("foo-bar"): the object that holds it, and the key.
            message = f"{param}: unknown field {loc[-1]!r} ({first.get('msg', 'not permitted')})"
        if kind == "json_invalid":
            message = f"body: not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
        elif param == "body" and loc[:1] == ("body",) and not _json_content(request):
            message = f"body: content-type must be application/json, not {request.headers.get('content-type')!r}"
        # A count or length over a limit reads the same as the server's other limits.
        over = ("too_long", "string_too_long", "less_than_equal", "less_than")
        type_ = "input_too_long" if kind in over else "invalid_request"
        return error_response(422, message, type_, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's 400 for a body json.loads could not read (bytes that are not UTF-8, -16
            # or -32 text, nesting past the recursion limit): invalid JSON, like any other.
            cause = exc.__cause__
            why = "not UTF-8, -16 or -32 text" if isinstance(cause, UnicodeError) else type(cause).__name__
            if type(cause) is ValueError:  # an integer past Python's digit limit: its own words name the limit
                why = str(cause).partition("; use")[0]
            return error_response(422, f"body: not valid JSON ({why})", "invalid_request", "body")
        type_ = "body_too_large" if exc.status_code == 413 else "http_error"
        return error_response(exc.status_code, str(exc.detail), type_, None, getattr(exc, "headers", None))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        request.app.state.metrics.rejected.inc()
        headers = {"Retry-After": str(int(exc.retry_after))}
        return error_response(429, str(exc), "rate_limited", None, headers)

    @app.exception_handler(UnknownTask)
    async def _unknown_task(_: Request, exc: UnknownTask) -> JSONResponse:
        return error_response(422, str(exc), "unknown_task", "task")

    @app.exception_handler(InputTooLong)
    async def _too_long(_: Request, exc: InputTooLong) -> JSONResponse:
        return error_response(422, str(exc), "input_too_long", exc.field)

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(422, str(exc), "invalid_input", exc.field)

    @app.exception_handler(EngineUnavailable)
    async def _engine_down(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(
            503, f"the engine is unavailable: {exc}", "engine_unavailable", None, {"Retry-After": "5"}
        )

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        message = _about(exc, "the engine failed")
        return error_response(503, message, "engine_error", exc.field, {"Retry-After": "1"})

    @app.exception_handler(ModelOutputError)
    async def _model_output(_: Request, exc: ModelOutputError) -> JSONResponse:
        return error_response(500, _about(exc, "the model's answer gives no label"), "model_output_error", exc.field)

    @app.exception_handler(LabelerError)
    async def _labeler(_: Request, exc: LabelerError) -> JSONResponse:
        return error_response(500, str(exc), "labeler_error", exc.field)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal error", "internal_error")
