"""Clients shared by the adapters' module-level reward functions: one per (URL, key) per
process, opened on first use.

A module of its own, always imported by name: verl may load an adapter's file by path, as a
module that Ray's pickler then copies by value with its globals, and a lock or an open
client among them cannot be copied. From here they are referred to by name."""

from __future__ import annotations

import threading

from ._client import Client

_clients: dict[tuple[str | None, str | None], Client] = {}
_lock = threading.Lock()


def shared_client(base_url: str | None, api_key: str | None) -> Client:
    """The process's client for `base_url` and `api_key` (None: LABELER_URL, LABELER_API_KEY)."""
    with _lock:
        key = (base_url, api_key)
        if key not in _clients:
            _clients[key] = Client(base_url, api_key)
        return _clients[key]
