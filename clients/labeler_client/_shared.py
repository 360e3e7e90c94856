"""Clients shared by the adapters' module-level reward functions: one per (URL, key) per
process, opened on first use (a forked child, such as a worker of `datasets.map(num_proc=...)`,
opens its own).

A module of its own, always imported by name: verl may load an adapter's file by path, as a
module that Ray's pickler then copies by value with its globals, and a lock or an open
client among them cannot be copied. From here they are referred to by name."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from ._client import AsyncClient, Client
from ._config import TRAINING_RETRY

_Key = tuple[str | None, str | None, str | None, float | None, int | None]
_clients: dict[_Key, Client] = {}
# Per event loop: an AsyncClient's connections belong to the loop they were opened on.
LoopClients = dict[int, tuple[asyncio.AbstractEventLoop, AsyncClient]]
_async_clients: dict[_Key, LoopClients] = {}
_lock = threading.Lock()


def _forget_after_fork() -> None:
    """In a forked child: the parent's clients are the parent's (left as they are: closing a
    connection may end it for the parent too), and the lock may have been held by a thread
    that the child does not have."""
    global _lock
    _clients.clear()
    _async_clients.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


C = TypeVar("C", Client, AsyncClient)


def _new(
    cls: type[C],
    base_url: str | None,
    api_key: str | None,
    serve_app: str | None,
    timeout: float | None,
    max_retries: int | None,
) -> C:
    """A client of `cls` for these options: over HTTP, or through the Serve application's
    deployment handle (a transport of the client's kind)."""
    retry = TRAINING_RETRY if max_retries is None else replace(TRAINING_RETRY, max_retries=max_retries)
    if serve_app is None:
        return cls(base_url, api_key, timeout=timeout, retry=retry)
    from . import ray  # needs ray[serve]: imported only when asked for

    transport = (ray.ServeTransport if cls is Client else ray.AsyncServeTransport)(serve_app)
    return cls("http://labeler", api_key, transport=transport, timeout=timeout, retry=retry)


def shared_client(
    base_url: str | None,
    api_key: str | None,
    serve_app: str | None = None,
    *,
    timeout: float | None = None,
    max_retries: int | None = None,
) -> Client:
    """The process's client for `base_url` and `api_key` (None: LABELER_URL, LABELER_API_KEY),
    or, with `serve_app`, for that Ray Serve application through a deployment handle (the
    caller runs in its Ray cluster; `base_url` is then not used); `timeout` (seconds to wait
    for an answer; None: the client's default) and `max_retries` (None: `TRAINING_RETRY`'s:
    retried for up to ten minutes)."""
    with _lock:
        key = (base_url, api_key, serve_app, timeout, max_retries)
        if key not in _clients:
            _clients[key] = _new(Client, *key)
        return _clients[key]


def shared_async_client(
    base_url: str | None,
    api_key: str | None,
    serve_app: str | None = None,
    *,
    timeout: float | None = None,
    max_retries: int | None = None,
) -> AsyncClient:
    """`shared_client` for coroutines: the process's AsyncClient for these options and the
    running event loop."""
    key = (base_url, api_key, serve_app, timeout, max_retries)
    with _lock:
        return client_for_loop(_async_clients.setdefault(key, {}), lambda: _new(AsyncClient, *key))


def client_for_loop(clients: LoopClients, make: Callable[[], AsyncClient]) -> AsyncClient:
    """The client in `clients` for the running event loop, made by `make()` on a loop's first
    call; those of loops closed since are let go. The caller holds the lock `clients` is under."""
    loop = asyncio.get_running_loop()
    for key, (known, _) in list(clients.items()):
        if known.is_closed():
            del clients[key]
    if id(loop) not in clients:
        clients[id(loop)] = (loop, make())
    return clients[id(loop)][1]
