"""The lean request path of the label routes.

A cache hit is a few microseconds of labeling work inside a framework path of a hundred;
FastAPI's per-request machinery around a typed body (content-type parsing through the
email package, a dependency solve, the model built from the parsed JSON) was a third of it.
So the label routes are `DirectRoute`s: the endpoint takes the `Request`, reads its body
with `read_body` and returns a `Response` itself. Their OpenAPI description is unchanged:
`body_schema` and `document_bodies` put the request schemas back into /openapi.json, and
the response models stay on the routes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

Body = TypeVar("Body", bound=BaseModel)
_REF = "#/components/schemas/{model}"


class FastJSON(JSONResponse):
    """JSON rendered by pydantic-core: a result's floats cost a seventh of what `json.dumps`
    takes (it was a tenth of a cache hit's time)."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content)


class DirectRoute(APIRoute):
    """A route whose endpoint is called with the bare `Request` and returns the `Response`:
    FastAPI solves no parameters for it (the endpoint reads them itself)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request)

        return handler


async def read_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as `model`. A body that is not JSON (or says it is not), or
    does not fit the model, raises the RequestValidationError FastAPI would (a 422 in the one
    error shape)."""
    # The raw scope and receive, not request.headers and request.body(): building the
    # Headers object and draining an async generator cost 5 µs of a cache hit's ~85.
    ctype = next((v.decode("latin-1") for k, v in request.scope["headers"] if k == b"content-type"), None)
    if ctype is not None:
        mime = ctype.partition(";")[0].strip().lower()
        if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
            raise _invalid(f"content-type must be application/json, not {ctype[:100]!r}", "content_type")
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        pass  # the authority is json.loads, below: pydantic's parser refuses a lone surrogate
        # ("\ud800") that the prompt builder cleans, and UTF-16 or UTF-32 JSON.
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, not UTF-8, nested too deeply, a huge integer
        detail = f"{exc.msg} at position {exc.pos}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise _invalid(f"not valid JSON ({detail})", "json_invalid") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([e | {"loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _invalid(msg: str, type_: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body",), "msg": msg, "type": type_}])


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON body is a `model` (see `document_bodies`)."""
    ref = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_bodies(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Add the schemas of `models` (and of the models they use) to the app's OpenAPI
    components, where the `body_schema` references point."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=_REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
