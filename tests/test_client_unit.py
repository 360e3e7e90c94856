"""Pure logic of the client on the fake transport (labeler_client.testing): backoff, Retry-After,
batching and order, exception mapping, on_error, adapters' input handling. No model, no network."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.server
import inspect
import json
import math
import os
import pickle
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import labeler_client as lc
import pytest
from labeler_client import _batching, _shared, verl
from labeler_client._config import parse_retry_after
from labeler_client._text import completion_value, context_value
from labeler_client.testing import FakeLabeler, fake_reward
from labeler_client.trl import PairwiseJudge, async_reward_function, reward_function

from service.protocol import (
    PreferenceOut,
    PreferencesResponse,
    ReadyResponse,
    ScoreOut,
    ScoresResponse,
    TaskInfo,
    TasksResponse,
)

URL = "http://labeler.test"
NO_WAIT = lc.Retry(max_retries=3, backoff=0.0)


def client_for(fake: FakeLabeler, **kw) -> lc.Client:
    client = lc.Client(URL, transport=fake.transport(), **{"retry": NO_WAIT, **kw})
    client.sleeps = []  # type: ignore[attr-defined]
    client._sleep = client.sleeps.append  # type: ignore[attr-defined]
    return client


def items(n: int, tag: str = "q") -> list[dict[str, str]]:
    return [{"context": f"{tag} {i}", "response": f"answer {i}"} for i in range(n)]


def expected(its: list[dict[str, str]]) -> list[float]:
    return [fake_reward(it["context"], it["response"]) for it in its]


class _FakeOverHTTP(http.server.BaseHTTPRequestHandler):
    """The fake's answers over a real socket, kept alive between requests as uvicorn keeps
    them; each request's client port and body are recorded, and a label request takes
    `server.latency` seconds."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.seen.append((self.client_address[1], body))  # type: ignore[attr-defined]
        if self.command == "POST":
            time.sleep(self.server.latency)  # type: ignore[attr-defined]
        request = httpx.Request(self.command, URL + self.path, headers=dict(self.headers), content=body)
        answer = self.server.fake.handle(request)  # type: ignore[attr-defined]
        self.send_response(answer.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = _answer


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # a burst of connections is accepted, as uvicorn's backlog of 2048 does


@contextlib.contextmanager
def serve_fake(fake: FakeLabeler, latency: float = 0.0, port: int = 0) -> Iterator[http.server.ThreadingHTTPServer]:
    """`fake` on a local HTTP server (its URL: `server.url`) for the duration of the block."""
    server = _Server(("127.0.0.1", port), _FakeOverHTTP)
    server.fake, server.latency, server.seen = fake, latency, []  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# -- config: backoff schedule and Retry-After ------------------------------------------------------------
def test_backoff_is_exponential_capped_and_jittered():
    retry = lc.Retry(backoff=0.5, max_backoff=4.0)
    assert [retry.cap(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    rng = random.Random(0)
    delays = [retry.delay(3, rng=rng) for _ in range(500)]
    assert all(0 <= d <= 4.0 for d in delays) and max(delays) > 3.5 and min(delays) < 0.5  # full jitter
    assert retry.cap(10_000) == 4.0  # no overflow
    # The server's word wins over the schedule; clients refused together spread out after it.
    waits = [retry.delay(0, retry_after=8, rng=rng) for _ in range(500)]
    assert all(8 <= w <= 10 for w in waits) and max(waits) > 9.5 and min(waits) < 8.5
    capped = [lc.Retry(max_retry_after=5).delay(0, retry_after=3600, rng=rng) for _ in range(100)]
    assert all(5 <= w <= 6.25 for w in capped)
    # "Retry-After: 0" (or a date past, as proxies send): the backoff's jitter, not every
    # worker again at once.
    spread = [retry.delay(1, retry_after=0, rng=rng) for _ in range(200)]
    assert all(0 <= w <= retry.cap(1) for w in spread) and max(spread) > 0.5
    # max_retry_after=0 ignores the server's word: the backoff, not every retry at once.
    ignored = [lc.Retry(max_retry_after=0).delay(2, retry_after=30, rng=rng) for _ in range(200)]
    assert all(0 <= w <= retry.cap(2) for w in ignored) and max(ignored) > 1.0
    with pytest.raises(ValueError):
        lc.Retry(max_retries=-1)


def test_max_elapsed_bounds_how_long_a_request_is_retried():
    """No retry starts later than `max_elapsed` seconds after the first try, whatever
    `max_retries` allows: the last wait is cut short to the budget, then the error is raised."""
    fake = FakeLabeler()
    fake.fail_next(503, times=10_000)
    client = client_for(fake, retry=lc.Retry(max_retries=1000, backoff=1.0, max_backoff=15.0, max_elapsed=600.0))
    now = [0.0]
    client._clock = lambda: now[0]

    def sleep(seconds: float) -> None:
        client.sleeps.append(seconds)
        now[0] += seconds

    client._sleep = sleep
    with pytest.raises(lc.ServerError):
        client.scores(items(1), "tiny")
    assert sum(client.sleeps) == pytest.approx(600.0)
    assert len(fake.requests) == len(client.sleeps) + 1 < 1000
    assert all(0 <= w <= 15.0 for w in client.sleeps)
    with pytest.raises(ValueError):
        lc.Retry(max_elapsed=-1)


def _down(client: lc.Client | lc.AsyncClient, now: list[float]) -> list[httpx.Request]:
    """`client`'s requests, each refused as by a server that is down, on a clock its waits move."""
    sent: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    async def refuse_async(request: httpx.Request) -> httpx.Response:
        return refuse(request)

    is_async = isinstance(client, lc.AsyncClient)
    client._http = (
        httpx.AsyncClient(transport=httpx.MockTransport(refuse_async))
        if is_async
        else httpx.Client(transport=httpx.MockTransport(refuse))
    )
    client._clock = lambda: now[0]

    def wait(seconds: float) -> None:
        now[0] += seconds

    async def wait_async(seconds: float) -> None:
        wait(seconds)

    client._sleep = wait_async if is_async else wait  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize(("cls", "concurrency"), [(lc.Client, 1), (lc.AsyncClient, 1), (lc.AsyncClient, 4)])
async def test_a_call_waits_out_an_outage_once_not_once_per_batch(cls, concurrency):
    """A server down for good, a call of 8 batches with on_error="none" and the training
    retry budget (10 minutes): once a batch has used up its retries, the call's other
    batches are tried once each, so the call ends after one budget, where each batch used to
    wait out its own (80 minutes one at a time). (The blocking client's batches in threads
    wait on an event, not on the clock this test moves.)"""
    now = [0.0]
    client = cls(URL, retry=lc.TRAINING_RETRY, batch_size=64, max_concurrency=concurrency)
    sent = _down(client, now)
    call = client.rewards(["p"] * 512, ["r"] * 512, task="tiny", on_error="none")
    assert (await call if inspect.isawaitable(call) else call) == [None] * 512
    assert 600 <= now[0] < 600 + 15 * concurrency, now[0]
    assert len(sent) - (8 - concurrency) > 8 * concurrency  # the first batches' retries, then a try each


def test_requests_get_their_retries_again_once_the_server_answers():
    """After a request used up its retries on an outage, the next is tried once; once one is
    answered, the server is back, and the requests after it are retried again."""
    fake = FakeLabeler()
    down = {"error": {"message": "down", "type": "engine_unavailable", "param": None, "code": 503}}
    script = iter([503, 503, 503, 200, 503, 200])  # a: two tries; b: one; c answered; d: refused, then answered

    def handle(request: httpx.Request) -> httpx.Response:
        return fake.handle(request) if next(script) == 200 else httpx.Response(503, json=down)

    client = lc.Client(URL, transport=httpx.MockTransport(handle), retry=lc.Retry(max_retries=1, backoff=0))
    client.batch_size, client.max_concurrency = 1, 1
    got = client.rewards(["a", "b", "c", "d"], ["w", "x", "y", "z"], task="tiny", on_error="none")
    assert got == [None, None, fake_reward("c", "y"), fake_reward("d", "z")]


def test_a_busy_server_keeps_every_requests_retries():
    """429 is a server at work asking each request to come back later: unlike an outage, it
    leaves the call's other requests their retries (here the first request's tries are all
    refused, the second's first)."""
    fake = FakeLabeler()
    fake.fail_next(429, times=3, retry_after=1)
    client = client_for(fake, retry=lc.Retry(max_retries=1), batch_size=1, max_concurrency=1)
    got = client.rewards(["a", "b"], ["x", "y"], task="tiny", on_error="none")
    # The first request's two tries are refused (None); the second is refused once more, then answered.
    assert got[0] is None and got[1] == fake_reward("b", "y") and len(fake.requests) == 4


@pytest.mark.parametrize("cls", [lc.Client, lc.AsyncClient])
async def test_a_busy_server_after_an_outage_keeps_every_requests_retries(cls):
    """A restart: the server is down (the first request uses up its retries, the second
    gets its one try), then back with a full queue (429). The 429 is retried as any other,
    not given the one try of an outage."""
    fake = FakeLabeler()
    down = {"error": {"message": "down", "type": "engine_unavailable", "param": None, "code": 503}}
    script = iter([503, 503, 503, 429, 200, 200])  # a: two tries; b: one; c: busy, then answered; d
    busy = {"error": {"message": "queue full", "type": "rate_limited", "param": None, "code": 429}}

    def handle(request: httpx.Request) -> httpx.Response:
        status = next(script)
        if status == 200:
            return fake.handle(request)
        return httpx.Response(status, json=busy if status == 429 else down, headers={"Retry-After": "0"})

    async def handle_async(request: httpx.Request) -> httpx.Response:
        return handle(request)

    transport = httpx.MockTransport(handle_async if cls is lc.AsyncClient else handle)
    client = cls(URL, transport=transport, retry=lc.Retry(max_retries=1, backoff=0), batch_size=1, max_concurrency=1)
    call = client.rewards(["a", "b", "c", "d"], ["w", "x", "y", "z"], task="tiny", on_error="none")
    got = await call if inspect.isawaitable(call) else call
    assert got == [None, None, fake_reward("c", "y"), fake_reward("d", "z")]


def test_a_trl_reward_function_waits_out_an_outage_once_a_call():
    """TRL's reward function finding over-long completions ("lowest") sends in raise mode
    first, then the rest in on_error="none" mode: each call waits out the budget once (the
    second may find rows answered meanwhile), not once per batch."""
    reward = reward_function(URL, task="tiny", on_error="none", overlong="lowest", max_concurrency=1)
    now = [0.0]
    _down(reward.client, now)
    assert reward(["p"] * 256, ["r"] * 256) == [None] * 256
    assert 1200 <= now[0] < 1230


def test_the_training_adapters_wait_for_a_labeler_that_restarts():
    """A labeler down for two minutes (a restart: a new image, a large model loading) is
    waited for by the clients TRL's reward function and verl's `compute_score` build, over
    real sockets: the call returns its reward once the server is back, where the plain
    client's five retries (about 8 s of backoff) would have ended a training run. Time runs
    on the clients' clocks, moved by their waits; `max_retries` given to verl bounds it."""
    fake = FakeLabeler()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    reward = reward_function(url, task="tiny")
    clients = [reward.client, _shared.shared_client(url, None)]
    assert all(c.retry == lc.TRAINING_RETRY for c in clients)
    now = [0.0]
    servers: list[contextlib.ExitStack] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] >= 120 and not servers:  # the labeler is back
            stack = contextlib.ExitStack()
            stack.enter_context(serve_fake(fake, port=port))
            servers.append(stack)

    for c in clients:
        c._clock, c._sleep = (lambda: now[0]), sleep
    try:
        got = reward(prompts=["2+2?"], completions=["4"])
        assert got == [fake_reward("2+2?", "4")] and now[0] >= 120
        assert verl.compute_score("src", "5", None, {"prompt": "2+2?"}, base_url=url) == fake_reward("2+2?", "5")
    finally:
        for stack in servers:
            stack.close()
    counted = _shared.shared_client(url, None, max_retries=2)
    assert counted.retry.max_retries == 2 and counted.retry.max_elapsed == lc.TRAINING_RETRY.max_elapsed
    waits: list[float] = []
    counted._sleep = waits.append
    with pytest.raises(lc.RequestError):
        verl.compute_score("src", "5", None, {"prompt": "2+2?"}, base_url=url, max_retries=2)
    assert len(waits) == 2


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("3", 3.0),
        ("1.5", 1.5),
        (" 2 ", 2.0),
        ("-4", 0.0),
        ("0", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
    ],
)
def test_retry_after_seconds(header, want):
    assert parse_retry_after(header) == want


def test_retry_after_http_date():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(header, now=now.timestamp()) == pytest.approx(30)
    # The obsolete forms HTTP recipients must read too (RFC 9110, 5.6.7), all in GMT.
    for form in ("%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"):
        header = (now + timedelta(seconds=30)).strftime(form)
        assert parse_retry_after(header, now=now.timestamp()) == pytest.approx(30), header
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now.timestamp()) == 0


@pytest.mark.parametrize("retry", [2.0, True, "3"])
def test_a_retry_that_is_neither_a_policy_nor_a_number_of_retries_is_refused(retry):
    """At construction, not as an AttributeError at the first error worth retrying."""
    for cls in (lc.Client, lc.AsyncClient):
        with pytest.raises(TypeError, match="retry must be a Retry or a number of retries"):
            cls(URL, retry=retry)
    with pytest.raises(TypeError, match="retry must be"):
        client_for(FakeLabeler()).health(retry=retry)


def test_url_and_key_from_arguments_or_environment(monkeypatch):
    monkeypatch.delenv(lc.ENV_URL, raising=False)
    monkeypatch.delenv(lc.ENV_API_KEY, raising=False)
    assert lc.Client().base_url == "http://127.0.0.1:8000" and lc.Client().api_key is None
    monkeypatch.setenv(lc.ENV_URL, "labeler:9000/")
    monkeypatch.setenv(lc.ENV_API_KEY, "env-key\n")  # as read from a secret's file
    assert lc.Client().base_url == "http://labeler:9000" and lc.Client().api_key == "env-key"
    fake = FakeLabeler(api_key="env-key")
    assert lc.Client(transport=fake.transport()).scores(items(1), "tiny")[0] is not None
    with pytest.raises(lc.AuthenticationError):
        lc.Client(URL, api_key="other", transport=fake.transport(), retry=NO_WAIT).tasks()
    assert len(fake.requests) == 2  # 401 is not retried
    # As the server: the key as an HTTP Basic password (URL credentials) too, not as the user name
    raw = httpx.Client(base_url=URL, transport=fake.transport())
    body = {"task": "tiny", "items": items(1)}
    assert raw.post("/v1/scores", json=body, auth=("labeler", "env-key")).status_code == 200
    assert raw.post("/v1/scores", json=body, auth=("env-key", "")).status_code == 401


def test_a_url_or_key_that_cannot_work_is_refused_when_the_client_is_made(monkeypatch):
    """Not retried as a connection error at every call: a blank $LABELER_URL is no URL (the
    default applies), a URL without a host or with a torn scheme is refused, and so is a key
    with a line break inside (two keys in one secret's file) or a character other than ASCII,
    which no header may hold."""
    monkeypatch.delenv(lc.ENV_API_KEY, raising=False)
    monkeypatch.setenv(lc.ENV_URL, "   ")
    assert lc.Client().base_url == "http://127.0.0.1:8000"
    for url, says in (("http://", "names no host"), ("https:/labeler:8000", "is malformed")):
        with pytest.raises(ValueError, match=says):
            lc.Client(url)
    with pytest.raises(ValueError, match="API key holds a line break"):
        lc.AsyncClient(URL, api_key="sk-abc\nsk-def")
    # Nor one of characters other than ASCII, which httpx cannot write into a header: refused as
    # a reward function is built, not at its first call in a training step.
    with pytest.raises(ValueError, match="other than ASCII"):
        reward_function(URL, task="tiny", api_key="clé")
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="positive and finite"):
            lc.Timeout(read=bad)


# -- batching ------------------------------------------------------------------------------------------------
def test_split_and_parts():
    assert _batching.split(0, 4) == []
    assert [list(r) for r in _batching.split(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [list(h) for h in _batching.parts(range(4, 9))] == [[4, 5], [6, 7, 8]]  # no item named: halves
    assert [list(p) for p in _batching.parts(range(4, 9), 6)] == [[4, 5], [6], [7, 8]]
    assert [list(p) for p in _batching.parts(range(4, 9), 4)] == [[4], [5, 6, 7, 8]]
    assert [list(p) for p in _batching.parts(range(4, 9), 8)] == [[4, 5, 6, 7], [8]]
    assert [list(p) for p in _batching.parts(range(4, 9), 2)] == [[4, 5], [6, 7, 8]]  # not in the batch
    with pytest.raises(ValueError):
        _batching.split(3, 0)


def test_place_refuses_a_wrong_result_count():
    out: list = [None] * 3
    request = httpx.Request("POST", URL + "/v1/scores")
    with pytest.raises(lc.ResponseError, match="expected 2 results, got 1") as err:
        _batching.place(out, range(1, 3), {"results": [{}]}, dict, request)
    assert err.value.request is request
    with pytest.raises(lc.ResponseError):
        _batching.place(out, range(0, 1), {"results": [{"reward": "x"}]}, lc.Score.model_validate, request)
    assert out == [None] * 3


def test_order_kept_across_concurrent_batches():
    fake = FakeLabeler(latency=0.02)
    its = items(23)
    with client_for(fake, batch_size=4, max_concurrency=3) as client:
        got = client.scores(its, "tiny")
    assert [s.reward for s in got] == expected(its)
    assert len(fake.requests) == 6 and 2 <= fake.max_in_flight <= 3


async def test_a_burst_of_calls_waits_for_connections_without_timing_out():
    """300 calls at once on one async client (verl's reward per sample), each answered in
    0.4 s, with a read timeout of 1.5 s: those beyond the client's connections wait their turn
    without that wait counting against the timeout (httpx's default counted it: the last
    third timed out in the client's own queue, never sent), on connections kept alive."""
    its = items(300)
    with serve_fake(FakeLabeler(), latency=0.4) as server:
        timeout = lc.Timeout(read=1.5)
        async with lc.AsyncClient(server.url, timeout=timeout, retry=lc.Retry(max_retries=0)) as client:
            got = await asyncio.gather(*(client.rewards([it["context"]], [it["response"]], task="tiny") for it in its))
    assert [g[0] for g in got] == expected(its)
    ports = {port for port, _ in server.seen}
    assert len(server.seen) == 300 and len(ports) <= 256


@pytest.mark.parametrize("cls", [lc.Client, lc.AsyncClient])
async def test_texts_given_as_items_are_refused_before_any_request(cls):
    """Texts given where items belong (they failed as a `dict()` ValueError about "update
    sequence elements", naming no item): a TypeError naming the item, nothing sent. What
    `dict()` reads is taken, as before: a pandas row, (key, value) pairs."""
    fake = FakeLabeler()
    client = cls(URL, transport=fake.transport(), batch_size=2)
    for items, named in ((["ab", "cd"], "items[0] is a text"), ([{"response": "r"}, b"x"], "items[1] is a text")):
        with pytest.raises(TypeError, match=re.escape(named)):
            call = client.scores(items, "tiny")
            await call if inspect.isawaitable(call) else call
    with pytest.raises(TypeError, match="not one text"):
        call = client.scores("hello", "tiny")
        await call if inspect.isawaitable(call) else call
    assert fake.requests == []
    call = client.scores([[("context", "c"), ("response", "r")]], "tiny")
    got = await call if inspect.isawaitable(call) else call
    assert got[0].reward == fake_reward("c", "r")


async def test_async_order_kept_and_concurrency_bounded():
    fake = FakeLabeler(latency=0.02)
    its = items(23)
    async with lc.AsyncClient(URL, transport=fake.async_transport(), batch_size=2, max_concurrency=4) as client:
        got = await client.rewards([it["context"] for it in its], [it["response"] for it in its], task="tiny")
    assert got == expected(its)
    assert len(fake.requests) == 12 and fake.max_in_flight == 4


def test_a_wrong_result_count_from_the_server_raises():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"results": []})

    with pytest.raises(lc.ResponseError):
        lc.Client(URL, transport=httpx.MockTransport(handler)).scores(items(2), "tiny")


# -- retries and errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried(status):
    fake = FakeLabeler()
    fake.fail_next(status, times=2)
    client = client_for(fake)
    assert [s.reward for s in client.scores(items(2), "tiny")] == expected(items(2))
    assert len(fake.requests) == 3 and len(client.sleeps) == 2


def test_429_honours_retry_after_and_raises_rate_limited_when_retries_run_out():
    fake = FakeLabeler()
    fake.fail_next(429, times=2, retry_after=7)
    client = client_for(fake, retry=lc.Retry(max_retries=1, backoff=0.0))
    with pytest.raises(lc.RateLimited) as err:
        client.tasks()
    (slept,) = client.sleeps
    assert 7 <= slept <= 8.75 and err.value.retry_after == 7 and err.value.status == 429
    assert len(fake.requests) == 2


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError])
def test_connection_errors_are_retried(error):
    fake = FakeLabeler()
    fake.fail_next(error, times=3)
    assert client_for(fake).scores(items(1), "tiny")[0] is not None
    assert len(fake.requests) == 4


def test_a_url_scheme_that_cannot_be_sent_is_raised_at_once():
    """A mistyped URL scheme: every try and every batch would fail alike, so it is neither
    retried nor turned into None items with on_error="none"."""
    client = lc.Client("htps://labeler.test", retry=lc.Retry(max_retries=3), batch_size=1, max_concurrency=1)
    sleeps: list[float] = []
    client._sleep = sleeps.append  # type: ignore[method-assign]
    with pytest.raises(lc.RequestError, match="UnsupportedProtocol") as err:
        client.rewards(["p"] * 3, ["r"] * 3, task="tiny", on_error="none")
    assert err.value.misconfigured and pickle.loads(pickle.dumps(err.value)).misconfigured and sleeps == []
    # An https URL to a port that speaks plain HTTP: the TLS handshake fails alike every time.
    with serve_fake(FakeLabeler()) as server:
        plain = lc.Client(server.url.replace("http:", "https:"), retry=lc.Retry(max_retries=3), batch_size=1)
        plain._sleep = sleeps.append  # type: ignore[method-assign]
        with pytest.raises(lc.RequestError, match="WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE") as err:
            plain.rewards(["p"] * 3, ["r"] * 3, task="tiny", on_error="none")
        assert err.value.misconfigured and sleeps == [] and server.seen == []
    fake = FakeLabeler()
    fake.fail_next(httpx.LocalProtocolError, times=1)  # a connection's state, not the configuration
    assert client_for(fake).scores(items(1), "tiny")[0] is not None and len(fake.requests) == 2


def test_a_closed_client_raises_its_own_error_at_once():
    """A call on a client already closed (sync or async) raises the client's RequestError,
    with the request, marked misconfigured: neither retried nor turned into None items."""
    fake = FakeLabeler()
    client = client_for(fake)
    assert client.scores(items(1), "tiny")[0] is not None
    client.close()
    with pytest.raises(lc.RequestError, match="the client is closed") as err:
        client.scores(items(3), "tiny", on_error="none")
    assert err.value.misconfigured and err.value.request.url.path == "/v1/scores" and client.sleeps == []

    async def closed_async() -> lc.RequestError:
        async with lc.AsyncClient(URL, transport=fake.async_transport(), retry=NO_WAIT) as aclient:
            assert (await aclient.scores(items(1), "tiny"))[0] is not None
        with pytest.raises(lc.RequestError, match="the client is closed") as err:
            await aclient.scores(items(3), "tiny", on_error="none")
        return err.value

    assert asyncio.run(closed_async()).misconfigured and len(fake.requests) == 2


def test_timeouts_are_retried_then_raised_as_timeout():
    fake = FakeLabeler()
    fake.fail_next(httpx.ReadTimeout, times=10)
    client = client_for(fake, retry=lc.Retry(max_retries=2, backoff=1.0, max_backoff=1.5))
    with pytest.raises(lc.TimeoutException) as err:
        client.scores(items(1), "tiny")
    assert isinstance(err.value, lc.RequestError) and err.value.request.url.path == "/v1/scores"
    assert len(fake.requests) == 3 and all(0 <= s <= 1.5 for s in client.sleeps) and len(client.sleeps) == 2


def test_a_batch_that_fails_stops_the_others_of_its_call():
    """Batch 1 is refused (422) while batch 0 waits out a 503's Retry-After of 30 s: the
    call raises the refusal at once, and batch 0 is not sent again."""
    fake = FakeLabeler(max_chars=50)
    its = items(2)
    its[1]["response"] = "y" * 51
    fake.fail_item(its[0]["response"], 503, retry_after=30)
    client = client_for(fake, batch_size=1, max_concurrency=2)
    t0 = time.monotonic()
    with pytest.raises(lc.InvalidRequest, match=r"items\[1\]\.response"):
        client.scores(its, "tiny")
    assert time.monotonic() - t0 < 20  # not the 30 s of the Retry-After: the wait ended with the call
    assert sum(its[0]["response"].encode() in r.content for r in fake.requests) <= 1  # never sent again


@pytest.mark.parametrize("on_error", ["raise", "none"])
def test_a_batch_refused_for_its_size_is_sent_again_in_halves(on_error):
    """The client's batch size over the server's limits is not the caller's error: 25 items
    where the server takes 10 a request (a 422 about `items`) go as 25, then halves of
    halves, 12 (6 + 6) and 13 (6 + 7); a body over the size limit (413) is halved too. In
    either mode."""
    fake = FakeLabeler(max_items=10)
    its = items(25)
    got = client_for(fake, batch_size=25).scores(its, "tiny", on_error=on_error)
    assert [s.reward for s in got] == expected(its)
    assert [len(json.loads(r.content)["items"]) for r in fake.requests] == [25, 12, 6, 6, 13, 6, 7]
    fake = FakeLabeler()
    fake.fail_next(413)
    got = client_for(fake, batch_size=4).scores(its[:4], "tiny", on_error=on_error)
    assert [s.reward for s in got] == expected(its[:4])
    assert [len(json.loads(r.content)["items"]) for r in fake.requests] == [4, 2, 2]


def test_one_item_over_the_body_limit_is_named_in_the_callers_list():
    """Halved down to one item still over the server's body limit (whose 413 names no item),
    the error names that item by its position in the caller's list."""
    fake = FakeLabeler()
    limit = {"error": {"message": "request body over the limit of 1000 bytes", "type": "body_too_large"}}

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413, json=limit) if len(request.content) > 1000 else fake.handle(request)

    client = lc.Client(URL, transport=httpx.MockTransport(handle), batch_size=8, max_concurrency=1, retry=NO_WAIT)
    its = items(8)
    its[5]["response"] = "x" * 2000
    with pytest.raises(lc.PayloadTooLarge) as err:
        client.scores(its, "tiny")
    assert (err.value.item, err.value.param) == (5, "items[5]")
    assert err.value.message.startswith("items[5]: ") and str(err.value).count("items[5]") == 1
    back = pickle.loads(pickle.dumps(err.value))
    assert (back.item, back.param, str(back)) == (5, "items[5]", str(err.value))


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, lc.BadRequestError),
        (401, lc.AuthenticationError),
        (404, lc.BadRequestError),
        (413, lc.PayloadTooLarge),
        (422, lc.InvalidRequest),
        (500, lc.ServerError),
    ],
)
def test_other_errors_are_not_retried_and_map_to_types(status, cls):
    fake = FakeLabeler()
    fake.fail_next(status, times=5)
    with pytest.raises(cls) as err:
        client_for(fake).scores(items(1), "tiny")
    e = err.value
    assert isinstance(e, lc.APIStatusError) and isinstance(e, lc.LabelerClientError)
    assert e.status == status and e.response.status_code == status and e.request.method == "POST"
    types = {
        400: "http_error",
        401: "unauthorized",
        404: "http_error",
        413: "body_too_large",
        422: "invalid_request",
        500: "internal_error",
    }
    assert e.type == types[status] and f"HTTP {status}" in str(e)  # the server's own error types
    assert len(fake.requests) == 1


def test_an_error_param_that_is_not_text_names_nothing():
    """A proxy's error body in another shape (`param` a list): an error naming no item, not a
    TypeError from reading it."""
    body = {"error": {"type": "invalid_request", "param": ["body", "items", 3], "message": "bad"}}
    transport = httpx.MockTransport(lambda r: httpx.Response(422, json=body))
    with pytest.raises(lc.InvalidRequest) as err:
        lc.Client(URL, transport=transport, retry=NO_WAIT, batch_size=2).scores(items(3), "tiny")
    assert err.value.param is None and err.value.item is None and err.value.message == "bad"


def test_invalid_request_names_the_field():
    fake = FakeLabeler(max_chars=5)
    with pytest.raises(lc.InvalidRequest) as err:
        client_for(fake).scores([{"response": "ok"}, {"response": "much too long"}], "tiny")
    assert err.value.param == "items[1].response" and "limit of 5" in str(err.value)
    assert err.value.item == 1 and err.value.type == "input_too_long"


async def test_an_item_error_names_the_item_in_the_callers_list():
    """Sent as 2-item requests, the 6th item (index 5) is the 2nd of the 3rd request; the error
    names it by the caller's index, in .param, .item and the messages, sync and async."""
    fake = FakeLabeler(max_chars=5)
    its = [{"response": "ok"}] * 5 + [{"response": "much too long"}, {"response": "ok"}]
    with pytest.raises(lc.InvalidRequest) as err:
        client_for(fake, batch_size=2, max_concurrency=1).scores(its, "tiny")
    assert err.value.param == "items[5].response" and err.value.item == 5 and "items[5].response" in str(err.value)
    assert err.value.message.startswith("items[5].response: ") and "HTTP 422" in str(err.value)
    assert json.loads(err.value.request.content)["items"][1] == its[5]  # the request that carried it
    async with lc.AsyncClient("http://labeler.test", transport=fake.async_transport(), batch_size=2) as client:
        with pytest.raises(lc.InvalidRequest) as aerr:
            await client.scores(its, "tiny")
    assert aerr.value.param == "items[5].response" and aerr.value.item == 5


def test_every_error_carries_its_request():
    """ResponseError (a 2xx the client cannot use) as well as the status and transport errors."""
    fake = FakeLabeler()
    client = lc.Client("http://labeler.test", transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})))
    with pytest.raises(lc.ResponseError) as err:
        client.scores(items(2), "tiny")
    assert err.value.request.url.path == "/v1/scores"
    for call, path in ((client.tasks, "/v1/tasks"), (client.health, "/readyz")):
        with pytest.raises(lc.ResponseError, match="malformed answer") as err:
            call()
        assert err.value.request.url.path == path
    fake.fail_next(httpx.ConnectError, times=9)
    with pytest.raises(lc.RequestError) as rerr:
        client_for(fake, retry=lc.Retry(max_retries=0)).scores(items(1), "tiny")
    assert rerr.value.request.method == "POST"


def test_the_fake_answers_get_reward_like_the_server():
    fake = FakeLabeler()
    with httpx.Client(transport=fake.transport(), base_url="http://labeler.test") as http:
        ok = http.post("/get_reward", params={"task": "tiny"}, json={"query": ["p r"], "prompts": ["p "]}).json()
        bad = http.post("/get_reward", params={"task": "nope"}, json={"query": ["x"]}).json()
        empty = http.post("/get_reward", params={"task": "tiny"}, json={"query": [], "prompts": []}).json()
    assert empty["rewards"] == empty["scores"] == [] and empty["extra_logs"] == {"expected_score": [], "cached": []}
    assert ok["rewards"] == ok["scores"] == [fake_reward("p ", "r")] and set(ok["extra_logs"]) == {
        "expected_score",
        "cached",
    }
    assert bad["error"]["type"] == "unknown_task" and bad["error"]["param"] == "task"


def test_exhausted_5xx_is_a_server_error_with_the_error_shape():
    fake = FakeLabeler()
    fake.fail_next(503, times=4, retry_after=0)
    with pytest.raises(lc.ServerError) as err:
        client_for(fake).health()
    assert err.value.body["error"]["code"] == 503 and err.value.code == 503


# -- on_error: never a silent placeholder ---------------------------------------------------------------
def test_failed_items_raise_unless_none_is_asked_for():
    fake = FakeLabeler(max_chars=6)
    its = [{"response": "ok"}, {"response": "far too long"}, {"response": "fine"}, {"response": "good"}]
    client = client_for(fake)
    with pytest.raises(lc.InvalidRequest):
        client.scores(its, "tiny")
    got = client.scores(its, "tiny", on_error="none")
    assert got[1] is None and [g.reward for g in (got[0], got[2], got[3])] == [
        fake_reward("", r) for r in ("ok", "fine", "good")
    ]
    with pytest.raises(ValueError):
        client.scores(its, "tiny", on_error="zero")  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [500, 503])
def test_an_item_the_engine_fails_on_is_set_aside_alone(status):
    """The server names the item it could not label; with on_error="none" the client sends
    the items around it again (not the whole batch retried, not halves down to it) and only
    that item is None. With on_error="raise" the error names it in the caller's list."""
    fake = FakeLabeler()
    its = items(40)
    fake.fail_item(its[29]["response"], status, retry_after=0)
    client = client_for(fake, batch_size=16, max_concurrency=1)
    got = client.scores(its, "tiny", on_error="none")
    assert [g is None for g in got] == [i == 29 for i in range(40)]
    assert [g.reward for g in got if g is not None] == [r for i, r in enumerate(expected(its)) if i != 29]
    sent = [len(json.loads(r.content)["items"]) for r in fake.requests]
    # batches of 16, 16 and 8; the second fails once, then 13 before, the item alone (retried
    # when the engine's failure may pass: 503), and 2 after.
    assert sent == [16, 16, 13, 1, *([1] * NO_WAIT.max_retries * (status == 503)), 2, 8], sent
    with pytest.raises(lc.ServerError) as err:
        client_for(fake, batch_size=16).scores(its, "tiny")
    assert err.value.status == status and err.value.param == "items[29]" and err.value.item == 29
    assert str(err.value).count("items[29]") == 1


def test_many_failed_items_in_one_batch_are_set_aside_without_deep_recursion():
    """Each cut leaves the items after a failed one to send again: a batch with many failed
    items is worked through as a list, not by recursion, so it cannot overflow the stack."""
    import sys

    fake = FakeLabeler(max_items=600)
    its = items(600)
    for it in its[1::2]:
        fake.fail_item(it["response"], 500)
    client = client_for(fake, batch_size=600)
    limit = sys.getrecursionlimit()
    # Room for a request's own call stack, far below a level per failed item (300).
    sys.setrecursionlimit(len(inspect.stack()) + 150)
    try:
        got = client.scores(its, "tiny", on_error="none")
    finally:
        sys.setrecursionlimit(limit)
    assert [g is None for g in got] == [i % 2 == 1 for i in range(600)]


async def test_async_client_sets_an_item_the_engine_fails_on_aside_alone():
    fake = FakeLabeler()
    its = items(12)
    fake.fail_item(its[0]["response"], 503, retry_after=0)
    async with lc.AsyncClient(URL, transport=fake.async_transport(), retry=NO_WAIT) as client:
        got = await client.scores(its, "tiny", on_error="none")
    assert got[0] is None and [g.reward for g in got[1:]] == expected(its)[1:]
    assert [len(json.loads(r.content)["items"]) for r in fake.requests] == [12, 1, 1, 1, 1, 11]


def test_a_down_server_gives_none_for_every_item_only_when_asked():
    fake = FakeLabeler()
    fake.fail_next(httpx.ConnectError, times=100)
    client = client_for(fake, batch_size=2, retry=lc.Retry(max_retries=1, backoff=0))
    assert client.rewards(["a", "b", "c"], ["x", "y", "z"], task="tiny", on_error="none") == [None, None, None]
    with pytest.raises(lc.RequestError):
        client.rewards(["a"], ["x"], task="tiny")


async def test_async_failure_cancels_the_other_batches():
    fake = FakeLabeler(latency=0.05)
    fake.fail_next(422)
    async with lc.AsyncClient(URL, transport=fake.async_transport(), batch_size=1, max_concurrency=2) as client:
        with pytest.raises(lc.InvalidRequest):
            await client.scores(items(20), "tiny")
    assert len(fake.requests) < 20


async def test_async_failure_sends_no_batch_that_waited_for_a_slot():
    """One request at a time: the batch waiting for the failed one's slot is not sent (the
    slot's release must not let it start a request that the call's end then cancels)."""

    class Started(httpx.AsyncBaseTransport):  # counts requests begun, answered or not
        def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
            self.inner, self.begun = inner, 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.begun += 1
            return await self.inner.handle_async_request(request)

    fake = FakeLabeler(latency=0.02)
    fake.fail_next(422)
    wire = Started(fake.async_transport())
    async with lc.AsyncClient(URL, transport=wire, batch_size=2, max_concurrency=1) as client:
        with pytest.raises(lc.InvalidRequest):
            await client.scores(items(6), "tiny")
    assert wire.begun == 1 and len(fake.requests) == 1


def test_sync_failure_stops_sending_batches():
    fake = FakeLabeler(latency=0.02)
    fake.fail_next(422)
    with client_for(fake, batch_size=1, max_concurrency=2) as client, pytest.raises(lc.InvalidRequest):
        client.scores(items(20), "tiny")
    assert len(fake.requests) < 20


# -- typed results and the fake's honesty -----------------------------------------------------------------------
def test_typed_results_for_every_call():
    fake = FakeLabeler()
    client = client_for(fake)
    pairs = [{"context": "c", "response_a": "a", "response_b": "b"}]
    (pref,) = client.preferences(pairs, "tiny", order="ab")
    assert isinstance(pref, lc.Preference) and pref.p_a_ba is None and pref.p_a + pref.p_b == pytest.approx(1)
    assert isinstance(client.scores(items(1), "tiny")[0], lc.Score)
    assert {t.name for t in client.tasks()} == {"general", "tiny"}
    assert isinstance(client.health(), lc.Health) and client.health().model == "fake-labeler"
    with pytest.raises(ValueError):
        client.scores(items(1), "")


def test_wire_types_match_the_server():
    for client_model, server_model in ((lc.Preference, PreferenceOut), (lc.Score, ScoreOut), (lc.TaskInfo, TaskInfo)):
        assert set(client_model.model_fields) == set(server_model.model_fields), client_model.__name__


def test_fake_answers_in_the_servers_wire_shapes():
    fake = FakeLabeler()
    scores = fake.handle(httpx.Request("POST", URL + "/v1/scores", json={"task": "tiny", "items": items(2)}))
    assert scores.status_code == 200 and len(ScoresResponse.model_validate(scores.json()).results) == 2
    body = {"task": "tiny", "items": [{"response_a": "a", "response_b": "b"}]}
    prefs = fake.handle(httpx.Request("POST", URL + "/v1/preferences", json=body))
    assert prefs.status_code == 200 and len(PreferencesResponse.model_validate(prefs.json()).results) == 1
    tasks = fake.handle(httpx.Request("GET", URL + "/v1/tasks"))
    assert tasks.status_code == 200 and TasksResponse.model_validate(tasks.json()).tasks
    ready = fake.handle(httpx.Request("GET", URL + "/readyz"))
    assert ready.status_code == 200 and ReadyResponse.model_validate(ready.json()).labeler.end_markers == []


# -- adapters: input normalization -------------------------------------------------------------------------
def test_messages_read_from_parquet_by_pandas_go_on_the_wire(tmp_path):
    """pandas gives a Parquet file's lists as numpy arrays (a message's `tool_calls` too),
    which have no truth value and which JSON does not take: sent as lists, rewarded alike."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    call = {"type": "function", "function": {"name": "calc", "arguments": "{}"}}
    rows = [
        {
            "prompt": [{"role": "user", "content": "2+2?", "tool_calls": []}],
            "completion": [
                {"role": "assistant", "content": "", "tool_calls": [call, call]},
                {"role": "tool", "content": "4", "tool_calls": []},
                {"role": "assistant", "content": "4", "tool_calls": []},
            ],
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    row = pd.read_parquet(tmp_path / "d.parquet").iloc[0]
    assert context_value(row["prompt"]) == [{"role": "user", "content": "2+2?"}]
    wire = completion_value(row["completion"])
    assert wire[0]["tool_calls"] == [call, call] and [m.get("tool_calls") for m in wire[1:]] == [None, None]
    fake = FakeLabeler()
    assert client_for(fake).rewards([row["prompt"]], [row["completion"]], task="tiny") == client_for(fake).rewards(
        [rows[0]["prompt"]], [rows[0]["completion"]], task="tiny"
    )


def test_contexts_go_on_the_wire_as_text_or_messages():
    """The client renders no transcript: the service does, in one place (labeler.chat)."""
    assert context_value("hi") == "hi"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?", "name": "x"}]
    assert context_value(msgs) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert context_value(parts) == [{"role": "user", "content": "What is it?"}]
    assert context_value(tuple(msgs[:1])) == msgs[:1]  # any iterable of messages (a numpy object array too)
    # Completions as messages too, which the service reads as one text; tool calls kept.
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    completion = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": "4"},
        {"role": "assistant", "content": "4"},
    ]
    assert completion_value(completion) == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4"},
    ]
    assert context_value(completion[:2])[0]["tool_calls"] == [call]  # a context's calls too
    assert completion_value([{"content": "no role"}]) == [{"role": "assistant", "content": "no role"}]
    assert completion_value({"role": "assistant", "content": None}) == [{"role": "assistant", "content": ""}]
    one_part = {"role": "assistant", "content": {"type": "text", "text": "4"}}
    assert completion_value(one_part) == [{"role": "assistant", "content": "4"}]
    assert completion_value("") == ""  # an empty completion goes out as it is
    with pytest.raises(TypeError):
        context_value(42)  # type: ignore[arg-type]


def test_trl_reward_function_takes_grpo_trainers_keyword_call():
    fake = FakeLabeler()
    fn = reward_function(URL, task="tiny", transport=fake.transport())
    assert fn.__name__ == "labeler_tiny" and not inspect.iscoroutinefunction(fn.__call__)
    dialogue = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": ""}]]
    columns = {"completion_ids": [[1], [2]], "answer": ["4", "4"], "trainer_state": None}
    got = fn(prompts=[dialogue] * 2, completions=completions, **columns)
    assert got == [fake_reward(json.dumps(dialogue, sort_keys=True), r) for r in ("4", "")]
    sent = json.loads(fake.requests[-1].content)["items"][0]
    assert sent["context"] == dialogue and sent["response"] == completions[0]  # messages on the wire
    assert fn(prompts=["2+2?"], completions=["4"]) == [fake_reward("2+2?", "4")]
    assert fn(completions=["4"]) == [fake_reward("", "4")]
    with pytest.raises(ValueError):
        fn(prompts=["a", "b"], completions=["c"])


def test_trl_reward_function_none_on_failure_only_when_asked():
    fake = FakeLabeler(max_chars=5)
    fn = reward_function(URL, task="tiny", transport=fake.transport(), name="judge", on_error="none")
    assert fn.__name__ == "judge"
    assert fn(prompts=["p", "p"], completions=["short", "much too long"]) == [fake_reward("p", "short"), None]
    strict = reward_function(URL, task="tiny", transport=fake.transport())
    with pytest.raises(lc.InvalidRequest):
        strict(prompts=["p"], completions=["much too long"])


def test_trl_async_reward_function_across_event_loops():
    fake = FakeLabeler()
    fn = async_reward_function(URL, task="tiny", transport=fake.async_transport())
    assert inspect.iscoroutinefunction(fn.__call__) and fn.__name__ == "labeler_tiny"
    for _ in range(2):  # a fresh loop each time, as asyncio.run makes
        assert asyncio.run(fn(prompts=["2+2?"], completions=[[{"role": "assistant", "content": "4"}]])) == [
            fake_reward("2+2?", "4")
        ]


def test_client_options_beside_a_given_client_are_refused():
    """A reward function or judge built on a `client` takes that client's settings: options
    given beside it (another URL, a batch size) would be ignored, so they are refused."""
    client = lc.Client("http://labeler.test:9", batch_size=7)
    assert reward_function("http://labeler.test:9", task="tiny", client=client)._client_opts["batch_size"] == 7
    for build in (reward_function, PairwiseJudge):
        with pytest.raises(TypeError, match="batch_size: set these on the client"):
            build(task="tiny", client=client, batch_size=3)
        with pytest.raises(TypeError, match="base_url"):
            build("http://elsewhere.test", task="tiny", client=client)


def test_bad_client_options_are_refused_as_the_function_is_built():
    """Not at the first reward call, after the trainer has loaded its model and generated
    (or inside the process AsyncGRPOTrainer spawns)."""
    from labeler_client.trl import group_reward_function, reference_reward_function

    builds = (
        reward_function,
        async_reward_function,
        reference_reward_function,
        PairwiseJudge,
        lambda *a, **kw: group_reward_function(*a, num_generations=2, **kw),
    )
    for build in builds:
        with pytest.raises(TypeError, match="batchsize"):
            build(URL, task="tiny", batchsize=8)
        with pytest.raises(ValueError, match="batch_size and max_concurrency must be at least 1"):
            build(URL, task="tiny", batch_size=0)
        with pytest.raises(ValueError, match='on_error must be "raise" or "none"'):
            build(URL, task="tiny", on_error="skip")
    with pytest.raises(ValueError, match="order must be one of both, ab, ba, not 'BA'"):
        reference_reward_function(URL, task="tiny", order="BA")


def test_reward_functions_and_judges_pickle():
    """TRL's AsyncGRPOTrainer sends reward functions to a spawned process."""
    fake = FakeLabeler()
    client = lc.Client("http://labeler.test:9", api_key="k", batch_size=7, transport=fake.transport())
    for made in (
        reward_function(URL, task="tiny", name="mine", api_key="k2", batch_size=3),
        reward_function(task="tiny", client=client),
        async_reward_function(URL, task="tiny", max_concurrency=2),
        PairwiseJudge(task="tiny", client=client),
    ):
        if hasattr(made, "client"):
            made.client  # noqa: B018 - open the client: it must stay behind
        copy = pickle.loads(pickle.dumps(made))
        assert (
            type(copy) is type(made)
            and copy.task == "tiny"
            and copy._client_opts == {k: v for k, v in made._client_opts.items() if k != "transport"}
        )
        assert getattr(copy, "__name__", None) == getattr(made, "__name__", None)
    copy = pickle.loads(pickle.dumps(reward_function(task="tiny", client=client)))
    assert (copy.client.base_url, copy.client.api_key, copy.client.batch_size) == ("http://labeler.test:9", "k", 7)
    fn = reward_function(URL, task="tiny", transport=fake.transport())
    fn(prompts=["p"], completions=["c"])
    assert pickle.loads(pickle.dumps(fn))._client is None  # reopened lazily in the copy
    # A Ray Serve transport goes along (by name: the copy looks its deployment handle up).
    from labeler_client.ray import ServeTransport

    served = reward_function(task="tiny", client=lc.Client("http://labeler", transport=ServeTransport("app", "Dep")))
    moved = pickle.loads(pickle.dumps(served))._client_opts["transport"]
    assert type(moved) is ServeTransport and (moved.app_name, moved.deployment, moved._handle) == ("app", "Dep", None)


class _Handle:
    """A Ray Serve DeploymentHandle's surface: `.forward.remote(...)` gives `make(...)`."""

    def __init__(self, make: Any) -> None:
        self.forward = type("Method", (), {"remote": staticmethod(make)})()


def test_a_ray_failure_the_transport_does_not_know_is_a_failed_request():
    """Through a ServeTransport, a failure of Ray's or Serve's other than a lost replica or
    back-pressure (no application by that name, an error around the replica's call) is a
    `RequestError`: retried, then raised, or None with on_error="none"; never Ray's own type."""
    from labeler_client.ray import ServeTransport
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import RayServeException

    class Call:
        def __init__(self, error: Exception) -> None:
            self.error, self.cancelled = error, False

        def result(self, timeout_s: float | None = None) -> Any:
            raise self.error

        def cancel(self) -> None:
            self.cancelled = True

    calls: list[Call] = []

    def failing_call(*_: Any) -> Call:
        calls.append(Call(RayTaskError("forward", "traceback", ValueError("unpicklable answer"))))
        return calls[-1]

    def no_application(*_: Any) -> Call:
        raise RayServeException("Application 'labeler' does not exist")

    for make, message in ((failing_call, "RayTaskError"), (no_application, "does not exist")):
        client = lc.Client("http://labeler", transport=ServeTransport(handle=_Handle(make)), retry=NO_WAIT)
        client._sleep = lambda _: None
        with pytest.raises(lc.RequestError, match=message):
            client.scores(items(1), "tiny")
        assert client.scores(items(2), "tiny", on_error="none") == [None, None]
    assert calls and all(c.cancelled for c in calls)


async def test_the_async_transport_looks_its_handle_up_off_the_event_loop(monkeypatch):
    """Serve's handle look-up waits for its controller (a blocking call): the async transport
    makes it once, in a worker thread, so the caller's event loop goes on meanwhile; the
    first requests of a batch, sent at once, wait for that one look-up."""
    from labeler_client.ray import AsyncServeTransport
    from ray import serve

    lookups: list[int] = []

    async def answer() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [(b"content-type", b"application/json")], b'{"status": "ok"}'

    def get_deployment_handle(deployment: str, app_name: str) -> _Handle:
        lookups.append(threading.get_ident())
        time.sleep(0.2)  # the controller's answer takes a while: the other first requests arrive meanwhile
        return _Handle(lambda *_: answer())

    monkeypatch.setattr(serve, "get_deployment_handle", get_deployment_handle)
    transport = AsyncServeTransport("app", "Dep")

    async def get() -> None:
        response = await transport.handle_async_request(httpx.Request("GET", "http://labeler/healthz"))
        assert response.status_code == 200 and json.loads(await response.aread()) == {"status": "ok"}

    await asyncio.gather(*(get() for _ in range(8)))
    await get()
    assert len(lookups) == 1 and lookups[0] != threading.get_ident()  # once, not on the loop's thread


def test_an_interrupted_sync_call_in_a_loop_cancels_the_replicas_call_unwaited(monkeypatch):
    """A sync call made where an event loop runs waits for the replica in a helper thread;
    an interrupt of that wait (Ctrl-C, here raised by the wait itself) reaches the caller at
    once, the replica's call cancelled, not after the call's own answer or timeout."""
    import concurrent.futures

    from labeler_client.ray import ServeTransport

    events: list[str] = []

    class Call:  # a DeploymentResponse's surface: result(timeout_s=), cancel()
        def __init__(self) -> None:
            self.stop = threading.Event()

        def result(self, timeout_s: float | None = None) -> Any:
            self.stop.wait(10)
            events.append("answered")
            raise TimeoutError("no answer")

        def cancel(self) -> None:
            events.append("cancelled")
            self.stop.set()

    call = Call()

    def interrupted(self: Any, timeout: float | None = None) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures.Future, "result", interrupted)
    client = lc.Client("http://labeler", transport=ServeTransport(handle=_Handle(lambda *_: call)), retry=NO_WAIT)

    async def in_a_loop() -> None:
        client.scores(items(1), "tiny")

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(in_a_loop())
    assert call.stop.wait(10)
    assert events[0] == "cancelled"


async def test_a_cancelled_async_call_cancels_the_replicas_call():
    """An AsyncClient call cancelled while its request is at a replica (the caller gave up,
    or another batch failed the call): the transport cancels the deployment call, so the
    replica stops labeling for nobody."""
    from labeler_client.ray import AsyncServeTransport

    class Call:  # a DeploymentResponse's surface: awaitable, cancel()
        def __init__(self) -> None:
            self.cancelled, self.started = False, asyncio.Event()

        def __await__(self):
            self.started.set()
            return asyncio.get_running_loop().create_future().__await__()  # never answers

        def cancel(self) -> None:
            self.cancelled = True

    call = Call()
    async with lc.AsyncClient(
        "http://labeler", transport=AsyncServeTransport(handle=_Handle(lambda *_: call))
    ) as client:
        task = asyncio.create_task(client.scores(items(1), "tiny"))
        await asyncio.wait_for(call.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert call.cancelled


def _ray_failure(kind: str) -> BaseException:
    """A Ray or Serve failure as Ray's own code builds it (ray/exceptions.py, ray/_private/
    serialization.py, ray/serve/_private/router.py and replica_result.py)."""
    from ray._raylet import ActorID
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        GetTimeoutError,
        RayActorError,
        RayError,
        RaySystemError,
        RayTaskError,
        WorkerCrashedError,
    )
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    actor_id = ActorID.from_random().binary()
    died = ActorDiedErrorContext(
        error_message="The actor is dead because its worker process has died.",
        actor_id=actor_id,
        class_name="ServeReplica:labeler:Labeler",
        pid=4242,
        node_ip_address="10.0.0.2",
    )
    failures: dict[str, Any] = {
        "RayActorError": lambda: RayActorError(),
        "ActorDiedError": lambda: ActorDiedError(),  # a dead actor's error without details
        "ActorDiedError(context)": lambda: ActorDiedError(cause=died),
        "ActorUnavailableError": lambda: ActorUnavailableError("Actor is unavailable.", actor_id),
        "WorkerCrashedError": lambda: WorkerCrashedError(),
        "RayTaskError(ActorDiedError)": lambda: RayTaskError("forward", "Traceback ...", ActorDiedError(cause=died)),
        # What ray.get raises for that task error: an instance of both classes.
        "RayTaskError(ActorDiedError) as raised": lambda: RayTaskError(
            "forward", "Traceback ...", ActorDiedError(cause=died)
        ).as_instanceof_cause(),
        "ReplicaUnavailableError": lambda: ReplicaUnavailableError("Replica abc123 is no longer available"),
        "BackPressureError": lambda: BackPressureError(
            num_queued_requests=256, max_queued_requests=256, status_code=503, retry_after_s=None
        ),
        "DeploymentUnavailableError": lambda: DeploymentUnavailableError(DeploymentID("Labeler", "labeler")),
        "GetTimeoutError": lambda: GetTimeoutError("Get timed out: some object(s) not ready."),
        "TimeoutError": lambda: TimeoutError("Timed out waiting for result."),
        "RayError": lambda: RayError("something failed in Ray"),
        "RaySystemError": lambda: RaySystemError("Unrecognized error type 99"),
    }
    return failures[kind]()


LOST, BUSY = ("RemoteProtocolError", lc.RequestError), ("503", lc.ServerError)
RAY_FAILURES = {  # the module docstring of labeler_client.ray: what each failure reads as
    "RayActorError": LOST,
    "ActorDiedError": LOST,
    "ActorDiedError(context)": LOST,
    "ActorUnavailableError": LOST,
    "WorkerCrashedError": LOST,
    "RayTaskError(ActorDiedError)": LOST,
    "RayTaskError(ActorDiedError) as raised": LOST,
    "ReplicaUnavailableError": LOST,
    "BackPressureError": BUSY,
    "DeploymentUnavailableError": BUSY,
    "GetTimeoutError": ("ReadTimeout", lc.TimeoutException),
    "TimeoutError": ("ReadTimeout", lc.TimeoutException),
    "RayError": ("TransportError", lc.RequestError),
    "RaySystemError": ("TransportError", lc.RequestError),
}


class _FailingCall:
    """A DeploymentResponse's surface (result(timeout_s=), awaitable, cancel()) that fails."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.cancelled = error, False

    def result(self, timeout_s: float | None = None) -> Any:
        raise self.error

    def __await__(self):
        raise self.error
        yield  # a generator, as __await__ must return an iterator

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize("kind", list(RAY_FAILURES))
async def test_a_ray_failure_reads_as_its_transport_failure(kind):
    """Each of Ray's and Serve's failures of a handle call, as the transports (sync and async)
    give it to httpx: a lost replica is a dropped connection, back-pressure or a deployment
    that failed to deploy a 503 with Retry-After, a timeout a read timeout, any other failure
    a failed transport. The call is cancelled first."""
    from labeler_client.ray import AsyncServeTransport, ServeTransport

    reading, _ = RAY_FAILURES[kind]
    calls: list[_FailingCall] = []

    def failing(*_: Any) -> _FailingCall:
        calls.append(_FailingCall(_ray_failure(kind)))
        return calls[-1]

    request = httpx.Request("POST", "http://labeler/v1/scores", json={"items": items(1), "task": "tiny"})
    sync, async_ = ServeTransport(handle=_Handle(failing)), AsyncServeTransport(handle=_Handle(failing))
    if reading == "503":
        for response in (sync.handle_request(request), await async_.handle_async_request(request)):
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "unavailable" and response.request is request
    else:
        expected = getattr(httpx, reading)
        with pytest.raises(httpx.TransportError) as raised:
            sync.handle_request(request)
        assert raised.type is expected and raised.value.request is request
        with pytest.raises(httpx.TransportError) as raised:
            await async_.handle_async_request(request)
        assert raised.type is expected and raised.value.request is request
    assert len(calls) == 2 and all(c.cancelled for c in calls)


@pytest.mark.parametrize("kind", list(RAY_FAILURES))
async def test_a_ray_failure_reaches_the_caller_as_the_clients_error_after_retries(kind):
    """The client's side of the same failures: retried like their HTTP twins, then raised as
    the client's own class (never Ray's), or None with on_error="none"."""
    from labeler_client.ray import AsyncServeTransport, ServeTransport

    reading, error_class = RAY_FAILURES[kind]
    sent: list[_FailingCall] = []

    def failing(*_: Any) -> _FailingCall:
        sent.append(_FailingCall(_ray_failure(kind)))
        return sent[-1]

    client = lc.Client("http://labeler", transport=ServeTransport(handle=_Handle(failing)), retry=NO_WAIT)
    client._sleep = lambda _: None
    with pytest.raises(lc.LabelerClientError) as raised:
        client.scores(items(1), "tiny")
    assert raised.type is error_class and len(sent) == 1 + NO_WAIT.max_retries
    if error_class is lc.ServerError:
        assert (raised.value.status, raised.value.type, raised.value.retry_after) == (503, "unavailable", 1.0)
    else:  # the transport's reading of the failure, in the client's message
        assert reading in str(raised.value)
    assert client.scores(items(2), "tiny", on_error="none") == [None, None]
    sent.clear()
    async with lc.AsyncClient(
        "http://labeler", transport=AsyncServeTransport(handle=_Handle(failing)), retry=NO_WAIT
    ) as aclient:
        aclient._sleep = _no_sleep
        with pytest.raises(lc.LabelerClientError) as raised:
            await aclient.scores(items(1), "tiny")
    assert raised.type is error_class and len(sent) == 1 + NO_WAIT.max_retries


async def _no_sleep(_: float) -> None:
    return None


def test_pairwise_judge():
    fake = FakeLabeler()
    judge = PairwiseJudge(URL, task="tiny", transport=fake.transport())
    prompts = ["Name a fruit.", "2+2?", "Hi"]
    pairs = [("An apple.", "A chair."), ["5", "4"], ["Hello!", "Hello!"]]  # OnlineDPO passes tuples
    scores = judge.judge(prompts, pairs, return_scores=True)
    assert all(0 <= s <= 1 for s in scores) and scores[2] == pytest.approx(0.5)
    # TRL's soft-judge rule: 0 if score > 0.5 else 1 (a tie goes to the second)
    assert judge.judge(prompts, pairs, shuffle_order=False) == [0 if s > 0.5 else 1 for s in scores]
    assert judge.judge(["Hi"], [["Hello!", "Hello!"]]) == [1]
    assert judge.judge(["Q"], [["", "An answer."]], return_scores=True)[0] != 0.5  # an empty one is judged
    with pytest.raises(ValueError):
        judge.judge(["p"], [["only one"]])
    failing = FakeLabeler(max_chars=3)
    soft = PairwiseJudge(URL, task="tiny", on_error="none", transport=failing.transport(), retry=NO_WAIT)
    assert soft.judge(["p", "p"], [["a", "b"], ["a", "too long"]])[1] == -1
    assert soft.judge(["p"], [["a", "too long"]], return_scores=True) == [0.5]  # never None


def test_pairwise_judge_gives_the_labeler_the_answer_of_a_trl_template_turn():
    """TRL's online DPO, XPO and Nash-MD (0.12 to 1.0) render conversational completions
    through their simple chat template ("Assistant: " + content + a blank line) before judging:
    the labeler gets the answer alone, an empty one as empty. Other strings go as they are,
    prose that starts with "Assistant" included."""
    fake = FakeLabeler()
    judge = PairwiseJudge(URL, task="tiny", transport=fake.transport())
    prompts = ["User: Capital of France?\n\n"] * 3  # as the template renders a prompt
    pairs = [
        ("Assistant: Paris.\n\n", "Assistant: Lyon.\n\nNo, Paris.\n\n"),
        ("Assistant: \n\n", "Assistant: Paris.\n\n"),  # an empty completion
        ("Assistant managers know it is Paris.", "Assistant: Paris."),  # not the template's turn
    ]
    judge.judge(prompts, pairs)
    (request,) = fake.requests
    sent = json.loads(request.content)["items"]
    assert [(it["response_a"], it["response_b"]) for it in sent] == [
        ("Paris.", "Lyon.\n\nNo, Paris."),
        ("", "Paris."),
        ("Assistant managers know it is Paris.", "Assistant: Paris."),
    ]
    assert [it["context"] for it in sent] == prompts  # the service reads the rendered prompt


def test_an_injected_item_failure_finds_pairs_references_and_groups():
    """`fail_item` fails an item whatever field holds the response: a pair's second, a
    reference, one of a group's; its batch-mates answer (on_error="none")."""
    fake = FakeLabeler()
    fake.fail_item("bad", 500)
    client = client_for(fake, retry=NO_WAIT)
    pairs = [{"context": "c", "response_a": "a", "response_b": b} for b in ("b", "bad")]
    assert [p is None for p in client.preferences(pairs, "tiny", on_error="none")] == [False, True]
    assert (
        PairwiseJudge(URL, task="tiny", on_error="none", client=client).judge(["p", "p"], [["a", "b"], ["a", "bad"]])[1]
        == -1
    )
    refs = [{"context": "c", "response": "a", "reference": r} for r in ("bad", "r")]
    assert [r is None for r in client.reference_rewards(refs, "tiny", on_error="none")] == [True, False]
    groups = [{"context": "c", "responses": ["x", "y"]}, {"context": "c", "responses": ["x", "bad"]}]
    assert [g is None for g in client.group_rewards(groups, "tiny", on_error="none")] == [False, True]


def test_the_fake_reads_reasoning_kept_apart_as_the_server_does():
    """A lone assistant message is its content, as the server reads it, unless it carries
    reasoning (then the reasoning is judged too): blank reasoning is none."""
    fake = FakeLabeler()

    def reward(response: Any) -> float:
        body = {"task": "tiny", "items": [{"context": "2+2?", "response": response}]}
        return fake.handle(httpx.Request("POST", URL + "/v1/scores", json=body)).json()["results"][0]["reward"]

    plain = reward("4")
    assert reward([{"role": "assistant", "content": "4", "reasoning_content": "  "}]) == plain
    assert reward([{"role": "assistant", "content": "4", "reasoning_content": "Adding."}]) != plain


def test_the_fake_names_a_failed_item_only_beside_items_that_did_not_fail():
    """As the server: an error every item of a request got names none of them (a request of
    one item names it), so a client does not set items aside one by one."""
    fake = FakeLabeler()
    fake.fail_item("bad", 500)
    client = client_for(fake, retry=lc.Retry(max_retries=0))
    for responses, param in [(["bad", "bad"], None), (["bad"], "items[0]"), (["ok", "bad", "bad"], "items[1]")]:
        with pytest.raises(lc.ServerError) as err:
            client.scores([{"response": r} for r in responses], "tiny")
        assert (err.value.param, err.value.item) == (param, None if param is None else int(param[6]))
        assert ("items[" in str(err.value)) == (param is not None)
    fake.requests.clear()
    assert client.scores([{"response": "bad"}] * 4, "tiny", on_error="none") == [None] * 4
    assert len(fake.requests) == 1


def test_verl_compute_score_and_batch(monkeypatch):
    fake = FakeLabeler()
    monkeypatch.setitem(_shared._clients, (None, None, None, None, None), lc.Client(URL, transport=fake.transport()))
    monkeypatch.setenv("LABELER_TASK", "tiny")
    assert verl.compute_score("gsm8k", "It is 4.", "4", extra_info={"question": "2+2?"}) == fake_reward(
        "2+2?", "It is 4."
    )
    with pytest.warns(UserWarning, match="extra_info has no 'prompt'"):
        assert verl.compute_score(data_source="x", solution_str="s", ground_truth=None) == fake_reward("", "s")
    # A key present but None (a Parquet column other rows fill) is absent: the question is the prompt.
    sparse = {"prompt": None, "question": "2+2?"}
    assert verl.compute_score("gsm8k", "It is 4.", "4", extra_info=sparse) == fake_reward("2+2?", "It is 4.")
    assert verl.compute_score(data_source="x", solution_str="", ground_truth=None) == fake_reward("", "")
    messages = [{"role": "user", "content": "2+2?"}]
    assert verl.compute_score("x", "4", extra_info={"prompt": messages}) == fake_reward(
        json.dumps(messages, sort_keys=True), "4"
    )
    # verl 0.9's agent loop adds the prompt's messages as raw_prompt; the data's own prompt first.
    assert verl.compute_score("x", "4", extra_info={"raw_prompt": messages}) == fake_reward(
        json.dumps(messages, sort_keys=True), "4"
    )
    assert verl.compute_score("x", "4", extra_info={"question": "q", "raw_prompt": messages}) == fake_reward("q", "4")
    # verl merges reward_kwargs into the call: known keys work, an unknown one is an error
    assert verl.compute_score("x", "4", task="general", reward_router_address=None) == fake_reward("", "4")
    assert json.loads(fake.requests[-1].content)["task"] == "general"
    with pytest.raises(TypeError, match="tsak"):
        verl.compute_score("x", "4", tsak="helpful")
    extras = [{"prompt": "a"}, {"prompt": "b", "labeler_task": "general"}, None]
    before = len(fake.requests)
    got = verl.compute_score_batch(["d"] * 3, ["x", "y", "z"], [None] * 3, extras)
    assert got == [fake_reward("a", "x"), fake_reward("b", "y"), fake_reward("", "z")]
    bodies = [r.content for r in fake.requests[before:]]
    assert len(bodies) == 2 and sum(b'"task":"general"' in b for b in bodies) == 1  # grouped by task
    # An error names the sample by its place in verl's batch, not in its task's share of it.
    fake.fail_item("w", status=500)
    general = {"labeler_task": "general"}
    mixed = [{"prompt": "a"}, {"prompt": "b", **general}, None, {"prompt": "d", **general}]
    with pytest.raises(lc.ServerError) as err:
        verl.compute_score_batch(["d"] * 4, ["x", "y", "z", "w"], [None] * 4, mixed)
    assert (err.value.item, err.value.param) == (3, "items[3]") and str(err.value).count("items[3]") == 1


def test_verl_takes_the_server_from_reward_kwargs():
    fake = FakeLabeler()
    _shared._clients[("http://from-kwargs.test", "k", None, None, None)] = lc.Client(
        "http://from-kwargs.test", "k", transport=fake.transport()
    )
    try:
        assert verl.compute_score("x", "4", base_url="http://from-kwargs.test", api_key="k", task="tiny") == (
            fake_reward("", "4")
        )
        assert fake.requests[-1].url.host == "from-kwargs.test"
    finally:
        del _shared._clients[("http://from-kwargs.test", "k", None, None, None)]


def test_verl_client_options_and_overlong_responses(monkeypatch):
    """`timeout` and `max_retries` from reward_kwargs make a client of their own; with
    overlong="lowest" a response over the server's length limit gets -1.0, any other refusal
    is raised as before."""
    monkeypatch.setattr(_shared, "_clients", {})
    built = _shared.shared_client(URL, None, timeout=20, max_retries=1)
    assert (built.timeout.read, built.retry.max_retries) == (20.0, 1)
    assert _shared.shared_client(URL, None) is not built and _shared.shared_client(URL, None).timeout.read == 300.0
    fake = FakeLabeler(max_chars=10)
    _shared._clients[(URL, None, None, 20, 1)] = lc.Client(URL, transport=fake.transport(), retry=0)
    opts = {"base_url": URL, "timeout": 20, "max_retries": 1, "task": "tiny", "extra_info": {"prompt": "q"}}
    with pytest.raises(lc.InvalidRequest, match="at most 10 characters"):
        verl.compute_score("x", "far too long an answer", **opts)
    assert verl.compute_score("x", "far too long an answer", overlong="lowest", **opts) == -1.0
    assert verl.compute_reference_score("x", "far too long", "ref", overlong="lowest", **opts) == -1.0
    assert verl.compute_score("x", "short", overlong="lowest", **opts) == fake_reward("q", "short")
    with pytest.raises(lc.InvalidRequest, match="reference"):  # the data's reference, not the response: raised
        verl.compute_reference_score("x", "short", "a reference too long", overlong="lowest", **opts)
    with pytest.raises(lc.InvalidRequest, match="unknown task"):  # not a length: raised
        verl.compute_score("x", "far too long an answer", overlong="lowest", **(opts | {"task": "nope"}))
    with pytest.raises(ValueError, match="overlong"):
        verl.compute_score("x", "short", overlong="skip", **opts)


def test_verl_coroutines_give_what_the_functions_give_one_client_per_loop():
    """compute_score_async and compute_reference_score_async, over real sockets: the same
    rewards as the plain functions, overlong="lowest" alike, and one shared AsyncClient per
    event loop (a new loop gets its own: an AsyncClient's connections are its loop's)."""
    with serve_fake(FakeLabeler(max_chars=10)) as server:
        opts = {"base_url": server.url, "task": "tiny", "extra_info": {"prompt": "q"}, "max_retries": 0}

        async def both() -> tuple[list[float], lc.AsyncClient]:
            got = await asyncio.gather(
                verl.compute_score_async("x", "short", **opts),
                verl.compute_reference_score_async("x", "short", "ref", **opts),
                verl.compute_score_async("x", "far too long an answer", overlong="lowest", **opts),
            )
            return list(got), _shared.shared_async_client(server.url, None, max_retries=0)

        got, first = asyncio.run(both())
        assert got == [
            verl.compute_score("x", "short", **opts),
            verl.compute_reference_score("x", "short", "ref", **opts),
            -1.0,
        ]
        again, second = asyncio.run(both())
        assert again == got and second is not first
        with pytest.raises(lc.InvalidRequest, match="at most 10 characters"):
            asyncio.run(verl.compute_score_async("x", "far too long an answer", **opts))


def test_sync_client_works_inside_a_running_event_loop():
    fake = FakeLabeler()

    async def main() -> list:
        return lc.Client(URL, transport=fake.transport()).scores(items(3), "tiny", cache=False)

    assert [s.reward for s in asyncio.run(main())] == expected(items(3))


def test_a_forked_child_does_not_share_the_parents_connections():
    """After a fork (a process pool, `datasets.map(num_proc=...)`), parent and child each get
    their own answers from a client the parent had used: the child opens its own connections
    instead of writing on the parent's pooled socket, and the shared client of the child is
    its own."""
    with serve_fake(FakeLabeler(), latency=0.05) as server:
        key = (server.url, None, None, 5.0, 0)
        client = _shared.shared_client(server.url, None, timeout=5.0, max_retries=0)
        try:
            assert client.health().status == "ready"  # a pooled keep-alive connection
            parents_port = server.seen[-1][0]
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report, then leave without running pytest's exit
                outcome = "ok"
                try:
                    os.close(read)
                    if _shared.shared_client(server.url, None, timeout=5.0, max_retries=0) is client:
                        outcome = "the child was given the parent's shared client"
                    for k in range(4):
                        its = items(2, tag=f"child {k}")
                        got = client.scores(its, "tiny")
                        if [s.reward for s in got] != expected(its):
                            outcome = f"the child got another request's answers in round {k}"
                except BaseException as e:
                    outcome = repr(e)
                finally:
                    os.write(write, outcome.encode())
                    os._exit(0)
            os.close(write)
            outcome = "ok"
            try:
                for k in range(4):
                    its = items(2, tag=f"parent {k}")
                    got = client.scores(its, "tiny")
                    if [s.reward for s in got] != expected(its):
                        outcome = f"the parent got another request's answers in round {k}"
            except lc.LabelerClientError as e:  # the child is still waited for
                outcome = repr(e)
            with os.fdopen(read, "rb") as pipe:
                childs = pipe.read().decode()
            os.waitpid(pid, 0)
        finally:
            _shared._clients.pop(key, None)
            client.close()
        assert (outcome, childs) == ("ok", "ok")
        ports = {port for port, body in server.seen if b"child" in body}
        assert ports and parents_port not in ports


def test_an_async_client_in_a_forked_child_leaves_the_parents_connections_alone():
    """A child that goes on with the loop its parent used the client in (as
    `asyncio.get_event_loop()` hands it over on Python 3.11) sends on connections of its own,
    and its loop's shutdown does not close the parent's: the parent's next request goes on
    its pooled connection."""
    with serve_fake(FakeLabeler()) as server:
        client = lc.AsyncClient(server.url, retry=0)
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(client.health()).status == "ready"
            parents_port = server.seen[-1][0]
            pid = os.fork()
            if pid == 0:  # the child: leave without running pytest's exit
                code = 1
                try:
                    got = loop.run_until_complete(client.scores(items(2, "child"), "tiny"))
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    code = 0 if [s.reward for s in got] == expected(items(2, "child")) else 2
                finally:
                    os._exit(code)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            got = loop.run_until_complete(client.scores(items(2, "parent"), "tiny"))
            assert [s.reward for s in got] == expected(items(2, "parent"))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        childs = {port for port, body in server.seen if b"child" in body}
        assert childs and parents_port not in childs
        assert [port for port, body in server.seen if b"parent" in body] == [parents_port]


def test_an_async_client_keeps_no_connection_of_a_loop_closed_by_hand():
    """Loops run by hand and closed without `shutdown_asyncgens()` cannot close their
    connections; the client lets go of them as it moves to the next loop, so open sockets
    do not grow with the number of loops."""

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def step(client: lc.AsyncClient) -> None:
        loop = asyncio.new_event_loop()
        try:
            assert [s.reward for s in loop.run_until_complete(client.scores(items(2), "tiny"))] == expected(items(2))
        finally:
            loop.close()

    with serve_fake(FakeLabeler()) as server:
        client = lc.AsyncClient(server.url)
        for _ in range(2):
            step(client)
        gc.collect()
        base = fds()
        for _ in range(20):
            step(client)
        deadline = time.monotonic() + 5  # the server's side of a socket closes once it reads the end
        while True:
            gc.collect()
            if fds() <= base + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert fds() <= base + 2, fds() - base
        assert len(client._closers) == 1  # the last loop's, open as that loop is


def test_an_async_client_awaited_from_two_live_loops_in_turn_keeps_one_pool_each():
    """Two loops that both still run, taking turns in one thread (`run_until_complete` on
    each): each keeps its own connections when it comes back, rather than a new pool at
    every switch (which would stay open until that loop shut down, without bound)."""

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with serve_fake(FakeLabeler()) as server:
        client = lc.AsyncClient(server.url)
        loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
        try:
            for loop in loops:
                assert [s.reward for s in loop.run_until_complete(client.scores(items(2), "tiny"))] == expected(
                    items(2)
                )
            base = fds()
            for i in range(40):
                loops[i % 2].run_until_complete(client.scores(items(2), "tiny"))
            assert fds() <= base + 2, fds() - base
            assert len(client._closers) == 2
        finally:
            for loop in loops:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()


def test_the_fake_tells_when_to_retry_as_the_server_does():
    fake = FakeLabeler()
    for status in (429, 503, 500):
        fake.fail_next(status)
    fake.fail_next(503, retry_after=4)
    http = httpx.Client(base_url=URL, transport=fake.transport())
    answers = [http.get("/v1/tasks") for _ in range(5)]
    assert [a.headers.get("retry-after") for a in answers] == ["1", "1", None, "4", None]
    assert [a.status_code for a in answers] == [429, 503, 500, 503, 200]


def test_the_fake_scores_the_top_of_the_scale():
    # fake_reward("", "r3201574") is 1.0: an expected score of 10, all of the mass on "10"
    assert fake_reward("", "r3201574") == 1.0
    (score,) = client_for(FakeLabeler()).scores([{"context": "", "response": "r3201574"}], "tiny")
    assert score.expected == 10.0 and score.distribution == [0.0] * 9 + [1.0] and score.reward == 1.0


def test_the_fake_limits_each_chat_message_not_the_number_of_messages():
    client = client_for(FakeLabeler(max_chars=5))
    chat = [{"role": "user", "content": "hi"}] * 6
    assert client.scores([{"context": chat, "response": "ok"}], "tiny")[0] is not None
    with pytest.raises(lc.InvalidRequest) as err:
        client.scores([{"context": [{"role": "user", "content": "x" * 6}], "response": "ok"}], "tiny")
    assert err.value.param == "items[0].context[0].content" and err.value.type == "input_too_long"


@pytest.mark.parametrize("options", [{"task": "nope"}, {"task": "tiny", "samples": 2}, {"task": "tiny", "seed": -1}])
def test_a_refusal_of_the_requests_options_is_raised_even_with_on_error_none(options):
    """Every batch would get it: no bisection down to single items, no list of Nones."""
    fake = FakeLabeler()
    client = client_for(fake, batch_size=2, max_concurrency=1)
    with pytest.raises(lc.InvalidRequest) as err:
        client.scores(items(6), on_error="none", **options)
    assert err.value.param == next(k for k in ("seed", "samples", "task") if k in options) and len(fake.requests) == 1
    bad = items(6)
    bad[3] = {"context": "c"}  # an item's own refusal still gives None for it alone
    got = client.scores(bad, "tiny", on_error="none")
    assert [g is None for g in got] == [False, False, False, True, False, False]


@pytest.mark.parametrize("status", [401, 403, 404, 405, 415])
def test_a_refused_key_or_a_wrong_url_is_raised_even_with_on_error_none(status):
    """Every batch would get it (a compressed body's 415 too: a header on the user's own
    httpx client): a reward function that answers None for every sample would
    train on nothing, silently, next to any other reward."""
    fake = FakeLabeler()
    fake.fail_next(status, times=10)
    client = client_for(fake, batch_size=2, max_concurrency=1)
    with pytest.raises(lc.BadRequestError) as err:
        client.scores(items(6), "tiny", on_error="none")
    assert err.value.status == status and len(fake.requests) == 1
    fn = reward_function(URL, task="tiny", api_key="stale", on_error="none", transport=fake.transport())
    with pytest.raises(lc.BadRequestError):
        fn(prompts=["p"], completions=["c"])


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(308, headers={"location": "https://labeler.test/v1/scores"}),
        httpx.Response(200, text="<html>a login page</html>"),
        httpx.Response(200, json={"status": "ok"}),
    ],
    ids=["redirect", "html", "other-json"],
)
def test_a_url_that_answers_as_no_labeler_is_raised_even_with_on_error_none(answer):
    """A URL that is not the labeler's without a 404: an http:// URL an ingress redirects to
    https:// (the client follows no redirect), a proxy's page, another service's JSON. Every
    batch would get the same, so it is raised, not turned into None for every item."""
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer

    client = lc.Client(URL, transport=httpx.MockTransport(handler), batch_size=2, max_concurrency=1)
    with pytest.raises(lc.LabelerClientError) as err:
        client.scores(items(6), "tiny", on_error="none")
    assert len(sent) == 1
    if answer.is_redirect:
        assert "https://labeler.test/v1/scores" in str(err.value) and "base_url" in str(err.value)


def test_every_error_crosses_a_process_boundary_whole():
    """Process pools and Ray pickle a worker's exception to hand it to the caller."""
    fake = FakeLabeler(max_chars=5)
    client = client_for(fake, retry=lc.Retry(max_retries=0))
    errors = []
    for fault, cls in [(429, lc.RateLimited), (503, lc.ServerError), (401, lc.AuthenticationError)]:
        fake.fail_next(fault, retry_after=2)
        with pytest.raises(cls) as err:
            client.scores(items(1), "tiny")
        errors.append(err.value)
    with pytest.raises(lc.InvalidRequest) as err:
        client_for(fake, batch_size=1).scores([{"response": "ok"}, {"response": "much too long"}], "tiny")
    errors.append(err.value)
    fake.fail_next(httpx.ConnectError)
    with pytest.raises(lc.RequestError) as err:
        client.scores(items(1), "tiny")
    errors.append(err.value)
    for e in errors:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.request.url == e.request.url
        if isinstance(e, lc.APIStatusError):
            fields = ("status", "type", "param", "code", "retry_after", "item", "body")
            assert [getattr(back, f) for f in fields] == [getattr(e, f) for f in fields]
            assert back.response.status_code == e.status
    assert errors[0].retry_after == 2 and errors[3].param == "items[1].response" and errors[3].item == 1


def test_a_lone_surrogate_goes_on_the_wire_as_a_json_escape():
    """Text cut inside a character (a lone surrogate) has no UTF-8 form; the body carries it as
    an escape, which the server cleans like any other text. Other text stays UTF-8."""
    fake = FakeLabeler()
    client = client_for(fake)
    assert client.scores([{"context": "caf\u00e9", "response": "ok"}], "tiny")[0] is not None
    assert "caf\u00e9".encode() in fake.requests[-1].content
    got = client.scores([{"context": "cut \ud83d", "response": "ok"}], "tiny", on_error="none")
    assert got[0] is not None and b"cut \\ud83d" in fake.requests[-1].content
    assert json.loads(fake.requests[-1].content)["items"][0]["context"] == "cut \ud83d"


def test_health_takes_a_number_of_retries_for_the_call():
    fake = FakeLabeler()
    fake.fail_next(503, times=3, retry_after=0)
    with pytest.raises(lc.ServerError):
        client_for(fake).health(retry=0)
    assert len(fake.requests) == 1
    assert client_for(fake).health(retry=2).status == "ready" and len(fake.requests) == 4


def test_an_api_key_in_the_url_is_masked_in_reprs_and_error_messages():
    """The URL's credentials carry the key where a framework sends no headers (OpenRLHF's
    docs put it there, and LABELER_URL may hold it): a client's repr, a reward function's,
    and the message of an error without an answer (refused connection, closed client) mask
    it, so that a traceback in a training log does not carry it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    url = f"http://trainer:s3cret@127.0.0.1:{port}"
    client = lc.Client(url, retry=0)
    shown = [repr(client), repr(reward_function(url, task="tiny")), repr(async_reward_function(url, task="tiny"))]
    with pytest.raises(lc.RequestError) as refused:
        client.scores([{"context": "q", "response": "a"}], "tiny")
    client.close()
    with pytest.raises(lc.RequestError) as closed:
        client.scores([{"context": "q", "response": "a"}], "tiny")
    shown += [str(refused.value), str(closed.value)]
    assert all("s3cret" not in s and f"trainer:***@127.0.0.1:{port}" in s for s in shown), shown
    assert repr(lc.Client(f"http://127.0.0.1:{port}")) == f"Client('http://127.0.0.1:{port}')"
    # A URL refused as malformed is named with its key masked too.
    for bad in ("http://trainer:s3cret@:8000", "https:/trainer:s3cret@labeler"):
        with pytest.raises(ValueError, match=r"trainer:\*\*\*@") as refused:
            lc.Client(bad)
        assert "s3cret" not in str(refused.value)
