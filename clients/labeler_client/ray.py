"""Calls from inside a Ray cluster through a Serve deployment handle: no HTTP hop.

    from labeler_client import Client
    from labeler_client.ray import ServeTransport

    client = Client("http://labeler", transport=ServeTransport())   # any host, no path (see below)
    client.rewards(prompts, completions, task="helpful")

A transport for the usual `Client` (`AsyncServeTransport` for `AsyncClient`): each request
goes to a replica of the labeler's Serve application through a deployment handle (Ray's
own routing and autoscaling), and the replica answers it with the same app that serves
HTTP. Results, errors, retries and batching are the client's own. Works in any process
connected to the cluster: a driver, a task, an actor (verl and OpenRLHF reward workers).
Needs `ray[serve]` in the caller's environment, at the cluster's version. The URL's host
is not used, and it takes no path: a `route_prefix` is the HTTP proxy's, and a handle call
reaches the app below it (`http://HEAD_IP:8000/labeler` with this transport answers 404).

Ray's failures read as the transport failures they are: a replica that died mid-request
(or a timeout) as a dropped connection (`RequestError`, retried), a deployment with no
capacity (Serve's back-pressure) as a 503 (`ServerError`, retried), and any other failure
of Ray's or Serve's (no Serve application by that name, a system error) as a failed
transport (`RequestError`, retried, and so subject to `on_error` like any other).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from typing import Any

import httpx

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "AsyncServeTransport", "ServeTransport"]

# The names in the shipped Serve config (docker/ray-serve.yaml).
APP_NAME = "labeler"
DEPLOYMENT_NAME = "Labeler"


class _HandleTransport:
    def __init__(self, app_name: str = APP_NAME, deployment: str = DEPLOYMENT_NAME, *, handle: Any = None) -> None:
        # A given handle's own names, so that a copy (pickled by name) finds the same deployment.
        self.app_name = getattr(handle, "app_name", None) or app_name
        self.deployment = getattr(handle, "deployment_name", None) or deployment
        self._handle = handle
        self._lookup = threading.Lock()  # concurrent first requests wait for one look-up

    def __reduce__(self) -> tuple[Any, ...]:
        # By name: a copy (a pickled reward function in a trainer's worker) looks its handle up.
        return (type(self), (self.app_name, self.deployment))

    def _method(self) -> Any:
        with self._lookup:
            if self._handle is None:  # looked up at first use: a transport can be built before ray.init
                from ray import serve
                from ray.serve.exceptions import RayServeException

                try:
                    self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
                except KeyError as error:  # Ray's word for an application not deployed (yet, or by that name)
                    raise RayServeException(
                        f"no deployment {self.deployment!r} in Serve application {self.app_name!r}: {error}"
                    ) from error
        return self._handle.forward

    @staticmethod
    def _args(request: httpx.Request, body: bytes) -> tuple[str, str, list[tuple[bytes, bytes]], bytes]:
        return request.method, str(request.url), list(request.headers.raw), body

    @staticmethod
    def _response(request: httpx.Request, answer: tuple[int, list[tuple[bytes, bytes]], bytes]) -> httpx.Response:
        status, headers, content = answer
        return httpx.Response(status, headers=headers, content=content, request=request)

    @staticmethod
    def _failure(request: httpx.Request, error: BaseException, call: Any) -> httpx.Response:
        """The HTTP-side reading of a Ray failure: a response, or an httpx exception raised.
        The call (None when the handle could not even be called) is cancelled first; a call
        that failed before a replica took it raises that failure again when cancelled
        (Serve's back-pressure), which must not hide the error sorted below."""
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()
        from ray.exceptions import RayActorError, RayError, RayTaskError, WorkerCrashedError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            RayServeException,
            ReplicaUnavailableError,
            RequestCancelledError,
        )

        if isinstance(error, RayTaskError) and isinstance(error.cause, RayActorError):
            error = error.cause
        if isinstance(error, (TimeoutError, asyncio.TimeoutError)):  # two classes before Python 3.11
            raise httpx.ReadTimeout(f"no answer from the deployment: {error}", request=request) from error
        if isinstance(error, (RayActorError, WorkerCrashedError, ReplicaUnavailableError, RequestCancelledError)):
            # What a dropped connection is over HTTP: the replica went away mid-request.
            raise httpx.RemoteProtocolError(f"replica lost: {type(error).__name__}", request=request) from error
        if isinstance(error, (BackPressureError, DeploymentUnavailableError)):
            body = {"error": {"message": str(error), "type": "unavailable", "param": None, "code": 503}}
            return httpx.Response(503, headers={"Retry-After": "1"}, content=json.dumps(body), request=request)
        if isinstance(error, (RayError, RayServeException)):
            raise httpx.TransportError(f"{type(error).__name__}: {error}", request=request) from error
        raise error


class ServeTransport(_HandleTransport, httpx.BaseTransport):
    """`Client(..., transport=ServeTransport())`: requests through a deployment handle.

    `app_name` and `deployment` name the Serve application and its ingress deployment;
    `handle` takes an existing `DeploymentHandle` instead."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        call = None
        try:  # the handle's look-up too: it fails while the application is not deployed
            call = self._method().remote(*self._args(request, request.read()))
            return self._response(request, _result(call, _read_timeout(request)))
        except BaseException as error:  # an interrupt too: sorted by _failure, the call cancelled first
            return self._failure(request, error, call)


class AsyncServeTransport(_HandleTransport, httpx.AsyncBaseTransport):
    """`AsyncClient(..., transport=AsyncServeTransport())`: see `ServeTransport`."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = None
        try:
            # The first look-up asks Serve's controller and waits for it (a blocking ray.get):
            # off the event loop, which the caller's other coroutines share.
            method = self._method() if self._handle is not None else await asyncio.to_thread(self._method)
            call = method.remote(*self._args(request, await request.aread()))
            return self._response(request, await asyncio.wait_for(call, _read_timeout(request)))
        except BaseException as error:  # cancelled too (the client failing fast): see ServeTransport
            return self._failure(request, error, call)


def _result(call: Any, timeout: float | None) -> Any:
    """`call.result()`; from a helper thread when this one runs an event loop (a notebook
    cell, an async actor), where Ray refuses to block."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call.result(timeout_s=timeout)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labeler-serve")
    try:
        return pool.submit(call.result, timeout_s=timeout).result()
    finally:  # unwaited: an interrupt reaches the caller (who cancels the call) at once
        pool.shutdown(wait=False)


def _read_timeout(request: httpx.Request) -> float | None:
    return request.extensions.get("timeout", {}).get("read")
