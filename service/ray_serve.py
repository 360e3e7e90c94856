"""The labeler as a Ray Serve application: the same FastAPI app, one per replica.

    serve run docker/ray-serve.yaml       # on a running cluster (RAY_ADDRESS); blocks, Ctrl-C shuts it down
    serve deploy docker/ray-serve.yaml    # through the dashboard, as KubeRay's RayService does

Each replica builds `create_app(Settings())` from its own `LABELER_*` environment (the
node's, plus the application's `runtime_env.env_vars`): routes, OpenAPI, errors, auth and
limits are the HTTP service's own, and the app's lifespan loads the engine inside the
replica. Replicas share the Redis cache of `LABELER_REDIS_URL`. Replica count, resources
(`ray_actor_options`) and autoscaling bounds are Serve's own deployment options, set in the
config file (docs/deploy.md, "Ray cluster").

Logs: each replica applies `LABELER_LOG_LEVEL` to the app's loggers (`service`,
`labeler`) and writes their records as `labeler serve` does, one JSON object a line, to
its stderr. With Ray's defaults that is the replica's worker log on its node
(`logs/worker-*.err` in Ray's session directory, also in the dashboard's Logs view); with
`RAY_SERVE_LOG_TO_STDERR=0` Serve sends a replica's stderr into the replica's own log file
(`logs/serve/replica_<application>_Labeler_<replica>.log`), where Serve's request log for
that replica always is.

Two more pieces:
- `forward` answers a whole HTTP exchange through a deployment handle, with no HTTP hop:
  `labeler_client.ray.ServeTransport` sends the client's requests that way, so a Ray
  trainer gets the client's results and errors.
- `proxy_middlewares`, for Serve's HTTP proxies (every node's environment:
  `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve:proxy_middlewares`), makes
  a replica lost mid-request a retryable 502 instead of a bare 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from fastapi import FastAPI
from ray import serve
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import create_app, engine_failure
from .cli import APP_LOGGERS, JsonFormatter, auth_warnings
from .settings import Settings, misspelled_variables

# The names that the config files and `labeler_client.ray` use.
APP_NAME = "labeler"
DEPLOYMENT_NAME = "Labeler"

Headers = list[tuple[bytes, bytes]]
log = logging.getLogger("service.ray_serve")


# max_ongoing_requests: the app batches concurrent requests itself (micro-batcher) and
# answers 429 past LABELER_MAX_QUEUE_ITEMS, so a replica takes many at once; Serve's
# default of 5 would starve the batcher. max_queued_requests: Serve's default queues
# without bound in front of busy replicas; past it, Serve refuses (a 503, retried). The
# config file can set both too. graceful_shutdown_timeout_s: one budget for the requests in
# flight and then the app's own shutdown (queued items labeled for 10 s, the engine closed),
# after which Serve kills the replica: the 90 s a compose stop gives `labeler serve`.
@serve.deployment(
    name=DEPLOYMENT_NAME, max_ongoing_requests=64, max_queued_requests=256, graceful_shutdown_timeout_s=90
)
@serve.ingress()
class LabelerDeployment:
    """One replica: the service's FastAPI app for the replica's `LABELER_*` settings."""

    def __init__(self) -> None:
        self.settings = Settings()
        self._app: FastAPI | None = None
        self._transport: httpx.AsyncBaseTransport | None = None
        _configure_logging(self.settings.log_level)
        # A node started without the keys in its environment serves its share of the
        # traffic unauthenticated, beside replicas that refuse it: said in its log.
        reached = "this application through Serve (its HTTP proxies, deployment handles)"
        for warning in [*misspelled_variables(), *auth_warnings(self.settings, reached_by=reached)]:
            log.warning(warning)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve runs the app's lifespan (engine load, cache, batcher) once this returns.
        app = self._app = create_app(self.settings)
        # An unhandled error is answered by the app's 500 in the one error shape; the
        # transport must not raise it again past that answer.
        self._transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        return app

    def check_health(self) -> None:
        """Serve's periodic health check: raising marks the replica unhealthy, and Serve
        replaces it. An engine that died for good (vLLM's engine process) would fail every
        request until then."""
        failure = engine_failure(self._app.state) if self._app is not None else None
        if failure is not None:
            raise RuntimeError(failure)

    async def forward(self, method: str, url: str, headers: Headers, body: bytes) -> tuple[int, Headers, bytes]:
        """One HTTP exchange, answered in-process by the same app (its middleware, routes
        and error handlers): (status, headers, body). Called through a deployment handle."""
        assert self._transport is not None, "the app is built before the replica takes requests"
        request = httpx.Request(method, url, headers=headers, content=body)
        response = await self._transport.handle_async_request(request)
        content = await response.aread()
        return response.status_code, list(response.headers.raw), content


def _configure_logging(level: str) -> None:
    """The app's loggers in a replica, where `labeler serve`'s logging config is not applied.
    Serve configures only its own logger (`ray.serve`), and a Ray worker's root logger has no
    handler: Python's last resort would print warnings and above, whatever the level."""
    for name in APP_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        if not logger.handlers:  # a handler set up otherwise is kept
            handler = logging.StreamHandler()  # the replica's stderr at this point: see above
            handler.setFormatter(JsonFormatter())
            logger.addHandler(handler)
            logger.propagate = False


app: Any = LabelerDeployment.bind()
"""The application that `serve run` and `serve deploy` import (`service.ray_serve:app`)."""


class ReplicaLost:
    """ASGI middleware for Serve's HTTP proxy. When the replica answering a request dies
    mid-request, the proxy gives up on it without answering, and the HTTP server then sends
    a bare 500; for a gateway whose upstream went away that is a 502, which clients retry
    (labeling is idempotent, and the retry goes to a live replica). Every answer that the
    app or Serve gives passes unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def relay(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, relay)
        except Exception:
            if started:
                raise
            log.exception("request failed in the proxy before an answer")
        if not started:
            await _send_lost(send)


async def _send_lost(send: Send) -> None:
    message = "the replica answering this request was lost; retry it"
    body = json.dumps({"error": {"message": message, "type": "replica_lost", "param": None, "code": 502}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 502, "headers": [*headers, (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    return [Middleware(ReplicaLost)]
