"""The FastAPI app: `create_app(settings, labeler=None)`.

The lifespan loads the engine (unless a Labeler is injected, as the tests do), opens the
cache and starts the micro-batcher; on shutdown, in-flight work finishes first. State
lives on `app.state`, never in module globals.
"""

# No `from __future__ import annotations` here: the label routes are annotated with the
# request models that `create_app` builds from its settings, which FastAPI must see as objects.

import asyncio
import base64
import binascii
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from labeler import EngineUnavailable, InvalidInput, Labeler, TaskRegistry

from . import errors
from .cache import Cache, MemoryCache, RedisCache
from .metrics import Metrics
from .protocol import (
    ErrorResponse,
    GetRewardResponse,
    GroupRewardsResponse,
    HealthResponse,
    JudgmentsResponse,
    LabelDefaults,
    PreferencesResponse,
    ReadyResponse,
    ReferenceRewardsResponse,
    ScoresResponse,
    TaskInfo,
    TasksResponse,
    request_models,
)
from .serving import LabelService
from .settings import Settings

log = logging.getLogger("service")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 415, 422, 429, 500, 503)
}
# The headers these answers carry, published with them (a client generated from the document
# can read them): when to try again, and how to authenticate.
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
ERRORS[401]["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
ERRORS[429]["headers"] = ERRORS[503]["headers"] = _RETRY_AFTER


def build_labeler(settings: Settings, tasks: TaskRegistry | None = None) -> Labeler:
    """Load the engine and tasks the settings name (blocking: run it in a thread)."""
    from labeler.engines import load_engine
    from labeler.models import hide_load_progress

    hide_load_progress()  # the logs are JSON lines
    options = settings.engine_options()
    return Labeler(
        load_engine(settings.engine, settings.model, **options),
        tasks if tasks is not None else TaskRegistry.load(settings.tasks_dir),
        max_rationale_tokens=settings.max_rationale_tokens,
        temperature=settings.temperature,
    )


def make_cache(settings: Settings, metrics: Metrics) -> Cache:
    if settings.redis_url:
        on_error = lambda op: metrics.cache_errors.labels(op).inc()  # noqa: E731
        return RedisCache(settings.redis_url, settings.cache_ttl, settings.redis_cooldown, on_error)
    return MemoryCache(settings.cache_size, settings.cache_ttl, settings.cache_bytes)


class Gate:
    """ASGI middleware, the one layer in front of every route (each layer cost a cache hit
    about 5 µs, so these share one):

    - request latency by route template and status (`labeler_request_seconds`), its 401s
      and 413s under the route they were for;
    - 413 for bodies over `limit` bytes, declared or streamed; 415 for a compressed body (a
      POST's, once its key is accepted);
    - API keys (bearer, or a Basic password) on the label and task routes, when keys are
      configured. Each given key is compared with every accepted key in constant time, so
      timing tells nothing; probes (/healthz, /readyz) and /metrics stay open;
    - a 503 `engine_unavailable` with Retry-After for a request cancelled before its answer
      started (uvicorn's graceful shutdown running out), instead of uvicorn's plain 500.
    """

    PROTECTED = ("/v1/", "/get_reward")

    def __init__(self, app, metrics: Metrics, limit: int, keys: list[str], routes: Sequence[BaseRoute] = ()) -> None:
        self.app, self.metrics, self.limit = app, metrics, limit
        self.routes = routes  # the app's, to name the route of a request refused before routing
        self.keys = [k.encode() for k in keys]
        self._children: dict[tuple[str, int], Any] = {}  # labels() takes a lock on every call

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        started = False

        async def capture(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, capture)
            else:
                try:
                    await self.app(scope, limited, capture)
                except _TooLarge:  # raised past the app's handlers (body read outside a route)
                    await self._too_large()(scope, receive, capture)
                except asyncio.CancelledError:
                    # uvicorn cancels the requests still running when its graceful shutdown
                    # ends, and answers them a plain 500, which clients take for a final
                    # error: a 503 that they retry (on another replica, or this one restarted).
                    if started:
                        raise
                    asyncio.current_task().uncancel()  # answered: the cancellation is handled
                    message = "the server shut down before the answer was ready"
                    refusal = errors.error_response(503, message, "engine_unavailable", None, {"Retry-After": "5"})
                    await refusal(scope, receive, capture)
        finally:
            path = getattr(scope.get("route") or self._route(scope), "path", "unmatched")
            child = self._children.get((path, status))
            if child is None:
                child = self._children[path, status] = self.metrics.latency.labels(path, str(status))
            child.observe(time.perf_counter() - t0)

    def _refusal(self, scope) -> Response | None:
        """The 413, 401 or 415 that the request's headers alone call for, if any."""
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            # Leading zeros are valid HTTP: stripped, the digits are few enough for int().
            digits = declared.lstrip(b"0")
            if len(digits) > len(str(self.limit)) or int(digits or b"0") > self.limit:
                return self._too_large()
        # The path under the app's mount point: behind a route prefix (Ray Serve's, or a
        # proxy's root_path) the ASGI path still starts with the prefix.
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):  # as the router reads it
            path = path[len(root) :]
        if self.keys and path.startswith(self.PROTECTED):
            given = _given_key(headers.get(b"authorization", b""))
            ok = False
            if given:
                for k in self.keys:
                    ok |= hmac.compare_digest(k, given)
            if not ok:
                return errors.error_response(
                    401, "missing or invalid API key", "unauthorized", headers={"WWW-Authenticate": "Bearer"}
                )
        coding = headers.get(b"content-encoding")
        if coding is not None and scope["method"] == "POST" and coding.strip().lower() not in (b"", b"identity"):
            # Read as it came, a compressed body would be reported as text that is not UTF-8.
            message = f"Content-Encoding {coding.decode('latin-1')!r} is not supported: send the body uncompressed"
            return errors.error_response(415, message, "unsupported_content_encoding", None)
        return None

    def _route(self, scope) -> BaseRoute | None:
        """The route of a request the router did not name (refused here before routing, or
        served by one of Starlette's own routes, such as /docs); None for a path no route
        has, which stays "unmatched" (any path, one label)."""
        return next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)

    def _too_large(self) -> Response:
        return errors.error_response(413, _TooLarge(self.limit).detail, "body_too_large")


def _given_key(authorization: bytes) -> bytes:
    """The API key an Authorization header carries: a bearer token, or the password of HTTP
    Basic credentials (any user name). Basic is what a URL's credentials become
    (`http://labeler:KEY@host/get_reward`), the one way to give a key to a caller that sends
    no headers of its own, such as OpenRLHF's remote reward requests."""
    scheme, _, given = authorization.partition(b" ")
    given = given.strip()
    if scheme.lower() == b"basic":
        try:
            given = base64.b64decode(given, validate=True).partition(b":")[2]
        except binascii.Error:
            return b""
    elif scheme.lower() != b"bearer":
        return b""
    return given


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so that FastAPI's handlers pass it on instead of making it a 400.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes")


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, with its refusal of a preflight (a plain-text 400) given
    the one error shape, like every other failure."""

    def preflight_response(self, request_headers: Headers) -> Response:
        resp = super().preflight_response(request_headers)
        if resp.status_code != 400:
            return resp
        keep = {k: v for k, v in resp.headers.items() if k not in ("content-length", "content-type")}
        return errors.error_response(400, bytes(resp.body).decode(), "cors_refused", None, keep)


class _Loading:
    """The app's label service while its model loads (a host that serves the app before its
    lifespan has run, or without running it): every label route answers a 503 that clients
    retry, not the 500 of a service that is not there."""

    def __getattr__(self, route: str) -> Any:
        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise EngineUnavailable("the model is not loaded yet")

        return refuse


def engine_failure(state: Any) -> str | None:
    """Why the app's engine can serve nothing any more (`Engine.failure`), or None: also while
    the model loads, and for an engine written before engines reported it."""
    labeler = getattr(state, "labeler", None)
    return getattr(getattr(labeler, "engine", None), "failure", None)


def create_app(settings: Settings | None = None, labeler: Labeler | None = None) -> FastAPI:
    """The app for `settings`; pass `labeler` to reuse an already-loaded model."""
    settings = settings or Settings()
    tasks = labeler.tasks if labeler is not None else TaskRegistry.load(settings.tasks_dir)
    if settings.task not in tasks.names():  # /get_reward's default: a client could not fix it
        raise InvalidInput(
            f"the default task {settings.task!r} (LABELER_TASK, --task) is not a known task; "
            f"known: {', '.join(tasks.names())}",
            field="task",
        )
    bodies = request_models(settings, tasks.names(), [t.name for t in tasks if t.judgment_question.strip()])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lab = labeler or await asyncio.to_thread(build_labeler, settings, tasks)
        app.state.labeler = lab
        app.state.cache = make_cache(settings, app.state.metrics)
        app.state.service = LabelService(lab, app.state.cache, settings, app.state.metrics)
        app.state.service.batcher.start()
        # The model's many long-lived objects need no collecting: keep the GC off them.
        gc.collect()
        gc.freeze()
        log.info("ready", extra={"model": lab.model_id, "engine": settings.engine, "cache": app.state.cache.name})
        try:
            yield
        finally:
            await app.state.service.batcher.stop()
            await app.state.cache.aclose()
            if labeler is None:
                await lab.engine.aclose()

    app = FastAPI(
        title="RLAIF labeler",
        version="0.1.0",
        description=(
            "Pairwise preferences, direct scores, yes/no judgments and pairwise rewards from an AI labeler, "
            "for RLAIF training loops."
        ),
        lifespan=lifespan,
        # A body without a content type is read as JSON (curl -d sends form encoding's type,
        # a bare client none at all); any other declared type is refused with a 422.
        strict_content_type=False,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.service = _Loading()  # until the lifespan has built the real one
    errors.install(app)
    # `routes`: the router's own list, filled below, before the first request builds the gate.
    app.add_middleware(
        Gate,
        metrics=app.state.metrics,
        limit=settings.max_body_bytes,
        keys=settings.api_keys,
        routes=app.router.routes,
    )
    if settings.cors_origins:
        # Added last, so it runs first: it answers a browser's preflight (which never carries
        # the API key) and puts its headers on the gate's 401 and 413 too.
        app.add_middleware(
            Cors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    labels = APIRouter(responses=ERRORS)
    # The routes read the service the lifespan built from `app.state` rather than through a
    # dependency: solving one is a pass per request, a tenth of a cached request's time.

    @labels.post("/v1/preferences", tags=["labels"])
    async def preferences(body: bodies.preferences) -> PreferencesResponse:
        """Pairwise preferences as distributions (both orders by default), in item order."""
        return await app.state.service.preferences(body)

    @labels.post("/v1/scores", tags=["labels"])
    async def scores(body: bodies.scores) -> ScoresResponse:
        """Direct 1-10 scores: distribution, expected score and reward in [-1, 1]."""
        return await app.state.service.scores(body)

    @labels.post("/v1/judgments", tags=["labels"])
    async def judgments(body: bodies.judgments) -> JudgmentsResponse:
        """Yes/no judgments: P(yes) to the task's yes/no question about each response."""
        return await app.state.service.judgments(body)

    @labels.post("/v1/rewards/reference", tags=["rewards"])
    async def reference_rewards(body: bodies.reference_rewards) -> ReferenceRewardsResponse:
        """Pairwise rewards against a reference response: 2 P(response preferred) - 1, both orders."""
        return await app.state.service.reference_rewards(body)

    @labels.post("/v1/rewards/group", tags=["rewards"])
    async def group_rewards(body: bodies.group_rewards) -> GroupRewardsResponse:
        """Group-relative rewards: each group's completions compared with each other in both
        orders; per completion, its centred mean win probability (summing to 0 per group)."""
        return await app.state.service.group_rewards(body)

    @labels.post("/get_reward", tags=["openrlhf"])
    async def get_reward(
        body: bodies.get_reward, params: Annotated[bodies.get_reward_params, Query()]
    ) -> GetRewardResponse:
        """OpenRLHF's remote reward model (`--reward.remote_url`, `--remote_rm_url` up to 0.10.1)."""
        return await app.state.service.get_reward(body, params.task, params.reward, params.overlong)

    @labels.get("/v1/tasks", tags=["meta"])
    async def list_tasks() -> TasksResponse:
        """The tasks this server knows, with their content versions."""
        infos = [TaskInfo(**{k: v for k, v in t.summary().items() if k != "source"}) for t in tasks]
        return TasksResponse(default_task=settings.task, tasks=infos)

    app.include_router(labels)

    def engine_failed(state: Any) -> JSONResponse | None:
        """The 503 of a server whose engine died for good (every label request would fail):
        health checks and readiness probes see it, so the process is restarted and traffic
        goes elsewhere meanwhile."""
        failure = engine_failure(state)
        return (
            None if failure is None else errors.error_response(503, f"{failure}; restart the server", "engine_failed")
        )

    @app.get("/healthz", tags=["meta"], responses={503: {"model": ErrorResponse}})
    async def healthz(request: Request) -> HealthResponse:
        """The process is up, and its engine has not died."""
        return engine_failed(request.app.state) or HealthResponse(status="ok")

    @app.get("/readyz", tags=["meta"], responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> ReadyResponse:
        """Model loaded and its engine alive; Redis reachable, or bypassed while it is not
        (labels still work)."""
        state = request.app.state
        lab = getattr(state, "labeler", None)
        if lab is None:
            return errors.error_response(503, "model not loaded", "not_ready")
        failed = engine_failed(state)
        if failed is not None:
            return failed
        return ReadyResponse(
            status="ready",
            model=lab.model_id,
            engine=settings.engine,
            cache=state.cache.name,
            cache_status=await state.cache.status(),
            labeler=LabelDefaults(
                temperature=lab.temperature,
                max_rationale_tokens=lab.max_rationale_tokens,
                end_markers=settings.end_markers,
            ),
        )

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
