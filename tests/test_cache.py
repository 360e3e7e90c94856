"""The in-process cache's bounds: entries, bytes of results, time to live. No model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from service.cache import MemoryCache


def value(i: int, text: str = "") -> dict:
    return {"reward": i / 10, "rationales": [text]}


def size(v: dict) -> int:
    return len(json.dumps(v))


def test_the_least_recently_used_results_leave_when_their_bytes_are_over_the_budget():
    small, big = value(1), value(2, "x" * 500)
    cache = MemoryCache(size=100, ttl=0, max_bytes=2 * size(big))

    async def run() -> None:
        await cache.set_many({"a": big, "b": small})
        assert await cache.get_many(["b", "a"]) == [small, big]  # "a" read last: "b" is now the oldest
        await cache.set_many({"c": big})
        assert await cache.get_many(["a", "b", "c"]) == [big, None, big]
        assert cache.bytes == 2 * size(big) == sum(e[2] for e in cache._data.values())
        # A key written again counts once, with its new size.
        await cache.set_many({"c": small})
        assert cache.bytes == size(big) + size(small)
        # A result over the whole budget is not kept, and evicts nothing.
        await cache.set_many({"huge": value(3, "y" * 2000)})
        assert await cache.get_many(["huge", "a", "c"]) == [None, big, small]
        await cache.aclose()
        assert cache.bytes == 0 and await cache.get_many(["a"]) == [None]

    asyncio.run(run())


def test_the_entry_bound_and_expiry_keep_the_byte_count(monkeypatch):
    """The oldest entry leaves past `size`; an entry is served until its time to live ends
    and then is a miss, its bytes no longer counted. Time is the cache module's clock, set
    by the test (no waiting on the real one)."""
    now = [1000.0]
    monkeypatch.setattr("service.cache.time", SimpleNamespace(monotonic=lambda: now[0]))

    async def run() -> None:
        cache = MemoryCache(size=2, ttl=0, max_bytes=10**6)
        await cache.set_many({k: value(i) for i, k in enumerate("abc")})
        assert await cache.get_many(list("abc")) == [None, value(1), value(2)]
        assert cache.bytes == size(value(1)) + size(value(2))
        expiring = MemoryCache(size=10, ttl=60, max_bytes=10**6)
        await expiring.set_many({"a": value(1)})
        now[0] += 59.9
        assert await expiring.get_many(["a"]) == [value(1)] and expiring.bytes == size(value(1))
        now[0] += 0.2  # past its 60 s
        assert await expiring.get_many(["a"]) == [None] and expiring.bytes == 0 and not expiring._data
        off = MemoryCache(size=0, ttl=0, max_bytes=10**6)
        await off.set_many({"a": value(1)})
        assert await off.get_many(["a"]) == [None] and off.bytes == 0

    asyncio.run(run())


def test_redis_that_refuses_writes_keeps_serving_reads_and_a_foreign_value_is_a_miss(redis_server):
    """A full Redis under `noeviction` refuses writes (OOM) while it still answers: the write
    is skipped and counted, the cache is not bypassed, and what is stored is still read. A
    value under a result's key that is not a result (not JSON, JSON nested past the parser's
    depth, NaN) is a miss, not a failed request."""
    import redis

    from service.cache import RedisCache

    errors: list[str] = []
    admin = redis.Redis.from_url(redis_server.url)
    cache = RedisCache(redis_server.url, ttl=60, cooldown=30, on_error=errors.append)
    kept = value(1)
    foreign = {"foreign": b"\xff not json", "deep": b"[" * 100_000, "nan": b'{"reward": NaN}'}
    for name, raw in foreign.items():
        admin.set(f"labeler:test:{name}", raw)

    async def run() -> None:
        await cache.set_many({"labeler:test:kept": kept})
        got = await cache.get_many(["labeler:test:kept", *(f"labeler:test:{name}" for name in foreign)])
        assert got == [kept, None, None, None]
        assert errors == ["decode"] * 3
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", str(used + 1024))
        try:
            await cache.set_many({f"labeler:test:big{i}": value(i, "x" * 100_000) for i in range(4)})
            assert "set" in errors and not cache.bypassed
            assert await cache.get_many(["labeler:test:kept"]) == [kept]
            assert await cache.status() == "ok"
        finally:
            admin.config_set("maxmemory", "0")
            await cache.aclose()

    asyncio.run(run())
    admin.delete("labeler:test:kept", *(f"labeler:test:{name}" for name in foreign))


def test_after_a_cooldown_one_call_alone_finds_out_whether_a_hung_redis_is_back(redis_server, caplog):
    """Redis frozen (SIGSTOP: connections accepted, nothing answered): the first call waits
    its socket timeout and the cache is bypassed for the cooldown; once it ends, one call
    tries Redis again while the others bypass it (a hung Redis costs one call its timeout per
    cooldown, not every call made meanwhile); with Redis answering again, that call's answer
    ends the bypass. The log says when an outage begins and when it ends, once each, not at
    every failed probe."""
    import os
    import signal

    import redis

    from service.cache import RedisCache

    errors: list[str] = []
    cache = RedisCache(redis_server.url, ttl=60, cooldown=0.2, on_error=errors.append)
    admin = redis.Redis.from_url(redis_server.url)

    async def run() -> None:
        await cache.set_many({"labeler:test:probe": value(1)})
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            assert await cache.get_many(["labeler:test:probe"]) == [None]
            assert errors == ["get"] and cache.bypassed
            await asyncio.sleep(0.3)  # the cooldown passes
            got = await asyncio.gather(*(cache.get_many(["labeler:test:probe"]) for _ in range(10)))
            assert got == [[None]] * 10
            assert sorted(errors) == ["bypass"] * 9 + ["get"] * 2  # one call tried, and waited
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.3)
        errors.clear()
        got = await asyncio.gather(*(cache.get_many(["labeler:test:probe"]) for _ in range(4)))
        assert got[0] == [value(1)] and errors.count("get") == 0
        assert await cache.get_many(["labeler:test:probe"]) == [value(1)] and not cache.bypassed
        assert await cache.status() == "ok"
        # A probe that Redis answers with a refusal found it reachable: calls use it again.
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            await cache.get_many(["labeler:test:probe"])
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        admin.execute_command("ACL", "SETUSER", "default", "-mget")
        try:
            await asyncio.sleep(0.3)
            errors.clear()
            await asyncio.gather(*(cache.get_many(["labeler:test:probe"]) for _ in range(3)))
            assert sorted(errors) == ["bypass", "bypass", "get"]  # the probe, refused
            errors.clear()
            await asyncio.gather(*(cache.get_many(["labeler:test:probe"]) for _ in range(3)))
            assert errors == ["get"] * 3  # each tried, none bypassed
        finally:
            admin.execute_command("ACL", "SETUSER", "default", "+@all")
        assert await cache.get_many(["labeler:test:probe"]) == [value(1)]
        await cache.aclose()

    with caplog.at_level("WARNING", logger="service.cache"):
        asyncio.run(run())
    failed = "redis get failed (TimeoutError); bypassing the cache, trying it again every 0.2 s"
    assert [r.getMessage() for r in caplog.records if "refused a get" not in r.getMessage()] == [
        failed,  # the first outage, whose probe after the cooldown failed too
        "redis answers again: the cache is used",
        failed,  # the second
        "redis answers again (with a refusal): the cache is used",
    ]


def test_a_reply_that_is_not_redis_s_answer_to_mget_is_misses_not_an_error(caplog):
    """A reply of another length than the keys asked for, or with values that are not
    strings (a faulty proxy in front of Redis): which value is whose is unknown, so every
    key is a miss, counted and logged, and the request is answered."""
    from service.cache import RedisCache

    class Client:
        def __init__(self, reply: object) -> None:
            self.reply = reply

        async def mget(self, keys: list[str]) -> object:
            return self.reply

    errors: list[str] = []
    cache = RedisCache("redis://127.0.0.1:1", ttl=60, cooldown=5, on_error=errors.append)
    stored = json.dumps(value(1)).encode()

    async def run() -> None:
        for reply, counted in (
            ([stored], ["get"]),  # one value for two keys
            ([stored, stored, stored], ["get"]),
            (b"OK", ["get"]),
            ([stored, 7], ["decode"]),  # the second not a string: that key a miss
        ):
            errors.clear()
            cache._client = Client(reply)
            got = await cache.get_many(["a", "b"])
            assert got == ([value(1), None] if counted == ["decode"] else [None, None]), reply
            assert errors == counted, reply
        assert not cache.bypassed

    with caplog.at_level("WARNING", logger="service.cache"):
        asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == [
        "redis answered MGET of 2 keys with 1 values: read as misses",
        "redis answered MGET of 2 keys with 3 values: read as misses",
        "redis answered MGET of 2 keys with a bytes: read as misses",
    ]


def test_a_redis_that_refuses_the_credentials_is_refused_not_bypassed(redis_server, caplog):
    """Wrong credentials in the Redis URL (redis-py raises AuthenticationError, a kind of
    ConnectionError): Redis answered, so the cache says `refused` and names the refusal in
    the log, instead of calling Redis unreachable and bypassing it for the cooldown."""
    from service.cache import RedisCache

    errors: list[str] = []
    url = redis_server.url.replace("redis://", "redis://nobody:wrong@")
    cache = RedisCache(url, ttl=60, cooldown=60, on_error=errors.append)

    async def run() -> None:
        assert await cache.get_many(["labeler:test:auth"]) == [None]
        assert not cache.bypassed
        assert await cache.status() == "refused"
        assert await cache.get_many(["labeler:test:auth"]) == [None]
        await cache.aclose()

    with caplog.at_level("WARNING", logger="service.cache"):
        asyncio.run(run())
    assert errors == ["get", "ping", "get"]  # each tried, none bypassed
    assert [r.getMessage() for r in caplog.records] == [
        "redis refused a get (AuthenticationError: invalid username-password pair or user is disabled.)"
    ]
