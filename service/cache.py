"""Result cache: Redis when a URL is configured, an in-process LRU otherwise.

A Redis failure never fails a label request: on a connection error or timeout the cache
is bypassed (logged and counted) for `cooldown` seconds, then tried again. A Redis that
answers but refuses a command (out of memory under `noeviction`, a read-only replica
after a failover) is not bypassed: the refused operation is skipped (logged and counted),
and reads go on. A value that is not a result (not JSON) is a miss; so is, in a cache that
other processes write (`shared`), a value that is not a result of its key's kind (the service
checks that).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from labeler.spec import KEY_VERSION

T = TypeVar("T")

log = logging.getLogger("service.cache")

Value = dict[str, Any]


# Cache key of an item: this prefix and its `LabelSpec.key` (model fingerprint, task version,
# kind, every result-changing parameter, the item's content).
CACHE_PREFIX = f"labeler:v{KEY_VERSION}:"


class Cache(Protocol):
    name: str
    # True when other processes write it too (other replicas, other versions of the service):
    # what it holds need not be a result this version would write.
    shared: bool

    async def get_many(self, keys: Sequence[str]) -> list[Value | None]: ...
    async def set_many(self, values: Mapping[str, Value]) -> None: ...
    async def status(self) -> str: ...
    async def aclose(self) -> None: ...


class MemoryCache:
    """An LRU of at most `size` entries and `max_bytes` bytes of results (their JSON size,
    what Redis would hold), each living `ttl` seconds (0: forever). Chain-of-thought results
    carry their rationales, so their size, not their count, is what fills memory; a result
    over `max_bytes` on its own is not kept."""

    name = "memory"
    shared = False

    def __init__(self, size: int, ttl: float, max_bytes: int) -> None:
        self.size = size
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, Value, int]] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> list[Value | None]:
        now = time.monotonic()
        out: list[Value | None] = []
        for k in keys:
            hit = self._data.get(k)
            if hit is None:
                out.append(None)
            elif self.ttl and hit[0] < now:
                self._drop(k)
                out.append(None)
            else:
                self._data.move_to_end(k)
                out.append(hit[1])
        return out

    async def set_many(self, values: Mapping[str, Value]) -> None:
        if not self.size:
            return
        expiry = time.monotonic() + self.ttl
        for k, v in values.items():
            n = len(json.dumps(v))
            self._drop(k)
            if n > self.max_bytes:
                continue
            self._data[k] = (expiry, v, n)
            self.bytes += n
        while len(self._data) > self.size or self.bytes > self.max_bytes:
            self.bytes -= self._data.popitem(last=False)[1][2]

    def _drop(self, key: str) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]

    async def status(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        self._data.clear()
        self.bytes = 0


class RedisCache:
    """Redis with bypass on failure. `on_error(op)` is called for every failure or bypass."""

    name = "redis"
    shared = True

    def __init__(self, url: str, ttl: int, cooldown: float, on_error: Callable[[str], None] | None = None) -> None:
        import redis.asyncio as aioredis

        self.ttl = ttl
        self.cooldown = cooldown
        self.on_error = on_error or (lambda op: None)
        self._down_until = 0.0  # set by a failure; 0 once Redis answered again
        self._probing = False  # a call is finding out whether Redis is back
        self._warned_until = 0.0
        self._client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    @property
    def bypassed(self) -> bool:
        return time.monotonic() < self._down_until

    async def _use(self, op: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()`'s result, or None when Redis is bypassed or the call failed (counted).
        After a failure's cooldown one call alone tries Redis again: a Redis that hangs
        (accepting connections, never answering) costs that one call its socket timeout, not
        every call made meanwhile; the others bypass it until that call has an answer."""
        probe = self._down_until > 0
        if self.bypassed or (probe and self._probing):
            self.on_error("bypass")
            return None
        self._probing = probe
        try:
            result = await call()
        except Exception as exc:  # noqa: BLE001 - any Redis/socket failure means "no cache"
            if self._fail(op, exc) and probe:  # it answered: reachable again
                self._down_until = 0.0
                log.warning("redis answers again (with a refusal): the cache is used")
            return None
        finally:
            if probe:
                self._probing = False
        if probe:
            self._down_until = 0.0
            log.warning("redis answers again: the cache is used")
        return result

    def _fail(self, op: str, exc: Exception) -> bool:
        """Count and log a failed call; bypass Redis for a cooldown where it could not be
        reached. Returns whether it answered (with a refusal)."""
        from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

        self.on_error(op)
        # Credentials refused (redis-py's AuthenticationError is a ConnectionError) are an
        # answer too: a configuration error to name, not an outage to wait out.
        unreachable = isinstance(exc, ConnectionError | TimeoutError | OSError)
        if not unreachable or isinstance(exc, AuthenticationError):  # Redis answered: it refused
            if time.monotonic() >= self._warned_until:  # once a cooldown, not once a request
                log.warning("redis refused a %s (%s: %s)", op, type(exc).__name__, exc)
                self._warned_until = time.monotonic() + self.cooldown
            return True
        if not self._down_until:  # once an outage: the probes that fail after each cooldown are not news
            log.warning(
                "redis %s failed (%s); bypassing the cache, trying it again every %g s",
                op,
                type(exc).__name__,
                self.cooldown,
            )
        self._down_until = time.monotonic() + self.cooldown
        return False

    async def get_many(self, keys: Sequence[str]) -> list[Value | None]:
        raw = await self._use("get", lambda: self._client.mget(list(keys)))
        if raw is not None and (not isinstance(raw, list) or len(raw) != len(keys)):
            # Not Redis's answer to MGET (a proxy's fault): which value is whose is unknown.
            self.on_error("get")
            log.warning("redis answered MGET of %d keys with %s: read as misses", len(keys), _shape(raw))
            raw = None
        return [None] * len(keys) if raw is None else [self._decode(v) for v in raw]

    def _decode(self, raw: bytes | None) -> Value | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, TypeError, RecursionError):  # not JSON (or not text); nesting too deep
            value = None
        if not isinstance(value, dict):  # not written by this service
            self.on_error("decode")
            return None
        return value

    async def set_many(self, values: Mapping[str, Value]) -> None:
        if not values:
            return

        async def write() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for k, v in values.items():
                    pipe.set(k, json.dumps(v), ex=self.ttl or None)
                await pipe.execute()

        await self._use("set", write)

    async def status(self) -> str:
        """'ok' when Redis answers, 'bypassed' while it cannot be reached, 'refused' when it
        answers with a refusal (requests still succeed either way)."""
        if self.bypassed or (self._down_until > 0 and self._probing):
            return "bypassed"
        if await self._use("ping", self._client.ping) is not None:
            return "ok"
        return "bypassed" if self.bypassed else "refused"

    async def aclose(self) -> None:
        await self._client.aclose()


def _shape(raw: object) -> str:
    return f"{len(raw)} values" if isinstance(raw, list) else f"a {type(raw).__name__}"


def _no_constant(name: str) -> Any:
    # NaN and Infinity, which json.loads takes by default: no result holds them.
    raise ValueError(f"{name} in a cached value")
