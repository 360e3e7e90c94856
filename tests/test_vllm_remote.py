"""The vllm-remote engine's handling of its servers, on scripted ones (httpx.MockTransport):
the context length learnt from `/v1/models`, refusals that concern every request, and a
transient failure outlived. The label reads against real `vllm serve` processes are in
tests/test_vllm.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from labeler import Labeler, PairItem, TaskRegistry
from labeler.engines.base import GenerateRequest, LabelQuery, ScoreRequest
from labeler.engines.transformers_engine import default_model_id
from labeler.engines.vllm_remote import VLLMRemoteEngine
from labeler.errors import EngineError, EngineUnavailable, InputTooLong, InvalidInput, ModelOutputError
from tests.fixtures.wait import async_wait_for

URL = "http://127.0.0.1:9"  # a closed port: nothing answers the engine's look-up at start
TASKS = Path(__file__).parent / "data" / "tasks"


class Scripted:
    """A `vllm serve` stand-in: `/v1/models` lists one model with `max_model_len`; label
    reads answer from `statuses` in turn (200 once they run out)."""

    def __init__(
        self, max_model_len: int = 64, statuses: tuple[int, ...] = (), body: str = "", healthy: bool = True
    ) -> None:
        self.max_model_len, self.statuses, self.body, self.healthy = max_model_len, list(statuses), body, healthy
        self.reads: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served", "max_model_len": self.max_model_len}]})
        if request.url.path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        self.reads.append(time.monotonic())
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return httpx.Response(status, text=self.body or "refused")
        wanted = request.read().decode()
        assert '"model": "served"' in wanted or '"model":"served"' in wanted
        if json.loads(wanted).get("return_token_ids"):  # a generation
            return httpx.Response(200, json={"choices": [{"index": 0, "token_ids": [30, 31]}]})
        top = {f"token_id:{t}": -1.0 for t in (16, 17)}
        return httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [top]}}]})


def engine(model_dir, server: Scripted, **options) -> VLLMRemoteEngine:
    remote = VLLMRemoteEngine([URL], model_dir, **options)  # nothing answers at URL: learnt later
    remote._http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    return remote


def read(n_tokens: int) -> list[ScoreRequest]:
    return [ScoreRequest(tuple(range(1, n_tokens + 1)), (LabelQuery((), (16, 17)),))]


@pytest.mark.parametrize("served_model", [None, "served"])
async def test_the_servers_context_length_limits_prompts_before_anything_is_sent(model_dir, served_model):
    """A server started with a shorter --max-model-len than the model's config: a prompt over
    it is refused as too long, not sent for a 400 that would read as an engine failure."""
    server = Scripted(max_model_len=64)
    remote = engine(model_dir, server, served_model=served_model)
    assert remote.max_model_len > 64  # the config's, until a server is asked
    with pytest.raises(InputTooLong, match="context of 64") as too_long:
        await remote.score(read(80))
    assert too_long.value.limit == 64
    assert remote.max_model_len == 64 and remote.served_model == "served" and server.reads == []
    got = await remote.score(read(10))
    assert got[0][()] == {16: -1.0, 17: -1.0} and len(server.reads) == 1


async def test_a_server_with_a_longer_context_than_the_config_says_raises_the_limit(model_dir):
    """The config's context length is a guess until a server says its own: a longer one (a
    config whose length the engine could not read, a server started with rope scaling) is
    the limit, unless the engine was given a lower one."""
    server = Scripted(max_model_len=50_000)
    remote = engine(model_dir, server)
    guess = remote.max_model_len
    assert guess < 50_000
    await remote.score(read(10))
    assert remote.max_model_len == 50_000
    capped = engine(model_dir, Scripted(max_model_len=50_000), max_model_len=guess)
    await capped.score(read(10))
    assert capped.max_model_len == guess


def test_servers_up_at_start_limit_prompts_to_the_least_context_of_theirs(model_dir, monkeypatch):
    """Servers started with different --max-model-len values: a prompt must fit whichever
    one it goes to, so the least limit of those that answer at start holds."""
    limits = {"127.0.0.1": 64, "127.0.0.2": 48, "127.0.0.3": None}  # the third is down

    def get(url: str, **_: Any) -> httpx.Response:
        host = httpx.URL(url).host
        if limits[host] is None:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"data": [{"id": "served", "max_model_len": limits[host]}]})

    monkeypatch.setattr(httpx, "get", get)
    remote = VLLMRemoteEngine([f"http://{host}:9" for host in limits], model_dir)
    assert remote.max_model_len == 48 and remote.served_model == "served"


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_refused_key_or_model_is_the_engine_unavailable_at_once(model_dir, status):
    server = Scripted(statuses=(status,) * 10)
    remote = engine(model_dir, server, served_model="served")
    with pytest.raises(EngineUnavailable, match="API key"):
        await remote.score(read(10))
    assert len(server.reads) == 1  # not retried on every server, not split item by item


def two_servers(model_dir, a: Scripted, b: Scripted, **options) -> VLLMRemoteEngine:
    """An engine over two servers (nothing answers at start), `a` at 127.0.0.1, `b` at 127.0.0.2."""
    remote = VLLMRemoteEngine(["http://127.0.0.1:9", "http://127.0.0.2:9"], model_dir, **options)
    by_host = {"127.0.0.1": a, "127.0.0.2": b}
    remote._http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: by_host[r.url.host](r)))
    return remote


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_one_server_that_refuses_the_key_or_model_is_set_aside_not_every_request(model_dir, status):
    """Of several servers, one started with another served model name or key (a rolling
    upgrade half done): its refusal is its own, so the request goes on to the others and it
    waits out a cooldown, rather than failing every batch that reaches it. Every server
    refusing is the engine unavailable, saying what to check."""
    good, bad = Scripted(), Scripted(statuses=(status,) * 100)
    remote = two_servers(model_dir, good, bad, served_model="served", cooldown=60)
    for _ in range(4):
        got = await remote.score(read(10))
        assert got[0][()] == {16: -1.0, 17: -1.0}
    assert (len(good.reads), len(bad.reads)) == (4, 1)
    await remote.aclose()
    both = [Scripted(statuses=(status,) * 100), Scripted(statuses=(status,) * 100)]
    remote = two_servers(model_dir, *both)
    with pytest.raises(EngineUnavailable, match="API key"):
        await remote.score(read(10))
    assert [len(s.reads) for s in both] == [1, 1]  # at once: no retries, no cooldown waited out
    await remote.aclose()


async def test_a_server_that_comes_up_later_is_learnt_from_before_its_first_request(model_dir):
    """The context limit is the least of the servers': one that was down at start and has a
    shorter one lowers it as it gets its first request, so later prompts are checked against
    it before anything is sent, whichever server they would go to."""
    long, short = Scripted(max_model_len=4096), Scripted(max_model_len=32)
    remote = two_servers(model_dir, long, short)  # neither answered at start
    await remote.score(read(10))  # the limit learnt from the first server picked; sent to the next
    assert remote.max_model_len == 32 and (len(long.reads), len(short.reads)) == (0, 1)
    with pytest.raises(InputTooLong, match="context of 32"):
        await remote.score(read(40))
    assert (len(long.reads), len(short.reads)) == (0, 1)
    await remote.aclose()


async def test_a_context_length_refusal_is_an_input_too_long(model_dir):
    for body in (
        '{"error": {"message": "This model\'s maximum context length is 64 tokens."}}',
        # vLLM's engine, for a prompt as long as the limit: no room for the label
        '{"error": {"message": "The decoder prompt (length 64) plus the number of requested output tokens '
        '(at least 1) is longer than the maximum model length of 64."}}',
    ):
        remote = engine(model_dir, Scripted(max_model_len=4096, statuses=(400,), body=body))
        with pytest.raises(InputTooLong):
            await remote.score(read(10))
    with pytest.raises(EngineError):  # any other 400: the engine's failure, told as it came
        await engine(model_dir, Scripted(statuses=(400,))).score(read(10))


async def test_a_closed_engine_is_unavailable(model_dir):
    """After `aclose` a read or a generation is `EngineUnavailable`, as on the other engines,
    not httpx's error about a closed client."""
    for discovered in (False, True):
        server = Scripted()
        remote = engine(model_dir, server)
        if discovered:
            await remote.score(read(10))
        await remote.aclose()
        with pytest.raises(EngineUnavailable, match="closed"):
            await remote.score(read(10))
        with pytest.raises(EngineUnavailable, match="closed"):
            await remote.generate([GenerateRequest(tuple(range(1, 11)), 4, 0.0, 1, 0)])
        assert len(server.reads) == int(discovered)


async def test_a_server_that_returns_no_token_ids_is_an_engine_error(model_dir):
    """A server that ignores `return_token_ids` answers a generation with text alone: that is
    the engine's failure, said as such, not an empty rationale judged as if the model wrote it."""

    class TextOnly(Scripted):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/completions" and json.loads(request.read()).get("return_token_ids"):
                return httpx.Response(200, json={"choices": [{"index": 0, "text": "Because."}]})
            return super().__call__(request)

    remote = engine(model_dir, TextOnly())
    with pytest.raises(EngineError, match="without token ids"):
        await remote.generate([GenerateRequest(tuple(range(1, 11)), 4, 0.0, 1, 0)])
    (got,) = await engine(model_dir, Scripted()).generate([GenerateRequest(tuple(range(1, 11)), 4, 0.0, 1, 0)])
    assert len(got) == 1 and got[0].token_ids


async def test_a_transient_failure_is_retried_once_the_cooldown_ends(model_dir):
    """One server, one 502: the server is down for its cooldown, then tried again; the read
    succeeds instead of failing the batch while every server cools down."""
    server = Scripted(statuses=(502,))
    remote = engine(model_dir, server, cooldown=0.3, retries=3)
    got = await remote.score(read(10))
    assert got[0][()] == {16: -1.0, 17: -1.0}
    assert len(server.reads) == 2 and server.reads[1] - server.reads[0] >= 0.25
    down = Scripted(statuses=(503,) * 10)
    remote = engine(model_dir, down, cooldown=0.05, retries=3)
    with pytest.raises(EngineUnavailable, match="every vLLM server failed"):
        await remote.score(read(10))
    assert len(down.reads) == 3  # `retries` tries per server, then the batch fails


async def test_requests_after_a_cooldown_share_one_health_probe(model_dir):
    """Twenty reads at once as a server's cooldown ends: one GET /health, whose answer they
    share (each its own would queue for the pool's connections, time out, and put a server
    that is back down again), then all twenty reads."""

    class Counted(Scripted):
        probes = 0

        def __call__(self, request: httpx.Request) -> Any:
            if request.url.path != "/health":
                return super().__call__(request)
            Counted.probes += 1

            async def answer() -> httpx.Response:  # a probe takes a while: the others ask meanwhile
                await asyncio.sleep(0.05)
                return httpx.Response(200)

            return answer()

    server = Counted()
    remote = engine(model_dir, server, cooldown=0.05, retries=3)
    await remote.score(read(10))
    remote._mark_down(remote.servers[0], "a test")
    down = remote.servers[0]
    await async_wait_for(lambda: time.monotonic() >= down.down_until, 5, "the server's cooldown to end")
    assert down.needs_probe  # back from its cooldown, not yet probed
    got = await asyncio.gather(*(remote.score(read(10)) for _ in range(20)))
    assert all(g[0][()] == {16: -1.0, 17: -1.0} for g in got)
    assert Counted.probes == 1 and len(server.reads) == 21 and not remote.servers[0].needs_probe


async def test_answers_that_are_not_vllms_and_settings_that_cannot_work_are_named(model_dir):
    """A proxy's page where vLLM's JSON should be (a 200 without JSON, a model list of another
    shape) is an engine error that says so, not a bare ValueError or KeyError; retries under 1
    (no try at all) and a negative cooldown are refused as the engine is built."""

    class Page(Scripted):
        def __init__(self, models: Any = None) -> None:
            super().__init__()
            self.models = models

        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/models" and self.models is not None:
                return httpx.Response(200, json=self.models)
            if request.url.path == "/v1/completions":
                return httpx.Response(200, text="<html>login</html>")
            return super().__call__(request)

    with pytest.raises(EngineError, match="answered HTTP 200 without JSON"):
        await engine(model_dir, Page()).score(read(10))
    with pytest.raises(EngineError, match="answered no model list"):
        await engine(model_dir, Page(models=["a", "list", "of", "names"])).score(read(10))
    for option in ({"retries": 0}, {"cooldown": -1}):
        with pytest.raises(InvalidInput, match=f"{next(iter(option))} must be at least"):
            engine(model_dir, Scripted(), **option)


async def test_a_generation_answer_that_is_not_a_whole_completion_is_an_engine_error(model_dir):
    """A 200 whose JSON is not a completion (a gateway's error), choices without their index,
    or fewer choices than the `n` asked (which would be averaged as if they were all): an
    engine error naming the server, not a bare KeyError or a silent short average."""

    class Answers(Scripted):
        def __init__(self, answer: Any) -> None:
            super().__init__()
            self.answer = answer

        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/completions" and json.loads(request.read()).get("return_token_ids"):
                return httpx.Response(200, json=self.answer)
            return super().__call__(request)

    sampled = GenerateRequest(tuple(range(1, 11)), 4, 0.7, 3, 0)
    for answer, request, message in [
        ({"error": {"message": "upstream busy"}}, GenerateRequest(tuple(range(1, 11)), 4), "unexpected completion"),
        ({"choices": [{"token_ids": [30, 31]}]}, GenerateRequest(tuple(range(1, 11)), 4), "unexpected completion"),
        ({"choices": [{"index": 0, "token_ids": ["a"]}]}, GenerateRequest(tuple(range(1, 11)), 4), "unexpected"),
        ({"choices": [{"index": i, "token_ids": [30 + i]} for i in range(2)]}, sampled, r"\[0, 1\] for n=3"),
        ({"choices": [{"index": 0, "token_ids": [30]}] * 3}, sampled, r"\[0, 0, 0\] for n=3"),
    ]:
        with pytest.raises(EngineError, match=message) as failed:
            await engine(model_dir, Answers(answer)).generate([request])
        assert URL in str(failed.value)
    whole = {"choices": [{"index": i, "token_ids": [30 + i]} for i in (2, 0, 1)]}
    (got,) = await engine(model_dir, Answers(whole)).generate([sampled])
    assert [g.token_ids for g in got] == [(30,), (31,), (32,)]


async def test_a_log_prob_at_the_servers_floor_is_a_zero_probability(model_dir):
    """vLLM's completions API gives a zero probability as -9999.0, its floor: read as zero
    (-inf, as the in-process engines give it), so labels all at zero are the model's error
    rather than a uniform distribution, and one label at zero takes no share."""

    class Floor(Scripted):
        """Answers the tokens asked for with `logprobs`, in turn."""

        def __init__(self, *logprobs: float) -> None:
            super().__init__(max_model_len=4096)
            self.logprobs = logprobs

        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/completions":
                tokens = json.loads(request.read())["logprob_token_ids"]
                top = {f"token_id:{t}": v for t, v in zip(tokens, self.logprobs, strict=True)}
                return httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [top]}}]})
            return super().__call__(request)

    (got,) = await engine(model_dir, Floor(-9999.0, -0.5)).score(read(10))
    assert got == {(): {16: float("-inf"), 17: -0.5}}
    lab = Labeler(engine(model_dir, Floor(-9999.0, -9999.0)), TaskRegistry.load([TASKS]))
    with pytest.raises(ModelOutputError, match="zero probability on every label"):
        await lab.apreferences([PairItem("2+2?", "4", "5")], "tiny", order="ab")


async def test_a_copy_without_weights_needs_a_model_id_naming_the_served_weights(model_dir, tmp_path):
    """The local copy is read for its tokenizer: a copy of the tokenizer and config alone
    would make the id of any weights the servers serve (a fine-tune swapped in behind them),
    whose labels would then share cache entries. It is refused unless `model_id=` names the
    served weights; a copy with the weights is named by their content."""
    import shutil

    from labeler.fingerprint import WEIGHT_SUFFIXES

    bare = tmp_path / "tokenizer-only"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(f, bare / f.name)
    with pytest.raises(InvalidInput, match="holds no weights") as refused:
        VLLMRemoteEngine([URL], bare)
    assert refused.value.field == "model_id"
    named = VLLMRemoteEngine([URL], bare, model_id="policy-rm-2026-12")
    assert named.model_id == "policy-rm-2026-12"
    await named.aclose()
    full = VLLMRemoteEngine([URL], model_dir)
    assert full.model_id == default_model_id(model_dir)
    await full.aclose()


async def test_options_are_read_as_vllm_reads_them_or_refused_by_name(model_dir):
    """`max_model_len` as vLLM's command line takes it: a size ("2K"), or "auto" / -1 for
    the servers' own length (what the engine asks them anyway). A value of the wrong type
    for any option is refused by name before anything is read (the model directory here does
    not exist), not as a traceback or a failure of every request."""
    capped = engine(model_dir, Scripted(max_model_len=50_000), max_model_len="2K")
    assert capped.max_model_len == 2048
    for auto in ("auto", "AUTO", -1):
        remote = engine(model_dir, Scripted(max_model_len=50_000), max_model_len=auto)
        await remote.score(read(10))
        assert remote.max_model_len == 50_000
    for option, value in [
        ("max_model_len", "8KB"),
        ("max_model_len", 0),
        ("max_model_len", 1.5),
        ("timeout", "soon"),
        ("timeout", 0),
        ("connect_timeout", -1),
        ("retries", 2.5),
        ("retries", "three"),
        ("max_concurrency", "many"),
        ("cooldown", None),
    ]:
        with pytest.raises(InvalidInput, match=option) as refused:
            VLLMRemoteEngine([URL], "/nonexistent/model", **{option: value})
        assert refused.value.field == option
    # What could never be sent: a URL without its scheme or host, a key that no header carries
    # (a newline read with it from a file). Else every call would count the servers as down.
    for urls in ("localhost:8000", "http://", f"{URL},127.0.0.1:8001", ["ftp://127.0.0.1:21"], " , "):
        with pytest.raises(InvalidInput, match="vLLM server URL|needs server URLs") as refused:
            VLLMRemoteEngine(urls, "/nonexistent/model")
        assert refused.value.field == "vllm_urls", urls
    for key in ("sécret", "a\tb", "a\nb"):
        with pytest.raises(InvalidInput, match="api_key must be printable ASCII") as refused:
            VLLMRemoteEngine([URL], "/nonexistent/model", api_key=key)
        assert refused.value.field == "api_key"
    # A key read from a file with its newline, or given as --engine-arg api_key=20240517 (a number).
    for key, sent in (("secret\n", "Bearer secret"), (20240517, "Bearer 20240517")):
        remote = VLLMRemoteEngine([URL], model_dir, api_key=key)
        assert remote._http.headers["Authorization"] == sent
        await remote.aclose()
    assert [s.url for s in engine(model_dir, Scripted()).servers] == [URL]
    remote = VLLMRemoteEngine([URL], model_dir, timeout="30", retries="2", cooldown="0.5")
    assert (remote.retries, remote.cooldown, remote._http.timeout.read) == (2, 0.5, 30.0)
    await remote.aclose()


def test_blocking_labeler_calls_one_after_another_on_a_remote_engine(model_dir):
    """The blocking Labeler methods run every call on one event loop of the labeler's own:
    the engine's semaphore, bound to the loop of its first wait, serves the next call too."""

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served", "max_model_len": 4096}]})
        await asyncio.sleep(0.01)  # a server takes its time: the other reads wait on the semaphore
        tokens = json.loads(request.content)["logprob_token_ids"]  # every label equally likely
        return httpx.Response(
            200, json={"choices": [{"logprobs": {"top_logprobs": [{f"token_id:{t}": -1.0 for t in tokens}]}}]}
        )

    remote = VLLMRemoteEngine([URL], model_dir, max_concurrency=1)  # the reads of a call wait on each other
    remote._http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    lab = Labeler(remote, TaskRegistry.load([TASKS]))
    pairs = [PairItem("2+2?", "4", "5"), PairItem("3+3?", "6", "7")]
    for _ in range(3):
        assert [r.p_a for r in lab.preferences(pairs, "tiny")] == pytest.approx([0.5, 0.5])
        assert sum(lab.score("2+2?", "4", "tiny").distribution) == pytest.approx(1.0)


def servers(model_dir, *scripts: Scripted) -> tuple[VLLMRemoteEngine, list[tuple[str, tuple]]]:
    """An engine on scripted servers (127.0.0.1, 127.0.0.2, ...), and the (host, prompt) of
    every completion request (label read or generation) in the order they were sent."""
    by_host = {f"127.0.0.{i + 1}": script for i, script in enumerate(scripts)}
    sent: list[tuple[str, tuple]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            sent.append((request.url.host, tuple(json.loads(request.content)["prompt"])))
        return by_host[request.url.host](request)

    remote = VLLMRemoteEngine([f"http://{host}:9" for host in by_host], model_dir, cooldown=30)
    remote._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return remote, sent


async def test_a_500_from_a_healthy_server_fails_that_request_alone(model_dir):
    """A 500 while the server's /health answers is the request's own failure (an input that
    crashes the server's handler): an engine error at once, not sent on to fail on the other
    server and take both out for a cooldown. A 500 while /health fails too is the server's:
    it is marked down and the request goes to the other one."""

    class Poisoned(Scripted):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/completions" and len(json.loads(request.content)["prompt"]) == 13:
                return httpx.Response(500, text="Internal Server Error")
            return super().__call__(request)

    poisoned = Poisoned()
    remote, sent = servers(model_dir, poisoned, poisoned)
    with pytest.raises(EngineError, match="HTTP 500") as failed:
        await remote.score(read(13))
    assert not isinstance(failed.value, EngineUnavailable)
    assert len(sent) == 1 and all(s.down_until == 0.0 for s in remote.servers)
    await remote.score(read(10))  # the next request is served at once
    assert len(sent) == 2

    flaky = Scripted(statuses=(500,), healthy=False)  # both servers' script: the first read fails
    remote, sent = servers(model_dir, flaky, flaky)
    got = await remote.score(read(10))
    assert got[0][()] == {16: -1.0, 17: -1.0}
    hosts = [host for host, _ in sent]
    assert len(hosts) == 2 and hosts[0] != hosts[1]
    down = {s.url.split("//")[1].split(":")[0] for s in remote.servers if s.down_until > 0}
    assert down == {hosts[0]}


def two_deep(starts: range) -> list[ScoreRequest]:
    """Prompts whose label is two tokens (like "10"): a first read, then one after its first token."""
    return [
        ScoreRequest(tuple(range(k, k + 10)), (LabelQuery((), (16, 17)), LabelQuery((16,), (16, 17)))) for k in starts
    ]


async def test_a_requests_chained_reads_go_where_its_first_read_went(model_dir):
    """Three prompts on two servers: first reads are spread round robin, and each prompt's
    deeper read goes to the server that read the prompt (its KV is in that server's prefix
    cache), not to the next one in turn."""
    remote, sent = servers(model_dir, Scripted(), Scripted())
    got = await remote.score(two_deep(range(1, 4)))
    assert [sorted(g) for g in got] == [[(), (16,)]] * 3
    first = {prompt: host for host, prompt in sent if len(prompt) == 10}
    deeper = [(host, prompt) for host, prompt in sent if len(prompt) == 11]
    assert len(first) == 3 and set(first.values()) == {"127.0.0.1", "127.0.0.2"}
    assert len(deeper) == 3 and all(host == first[prompt[:-1]] for host, prompt in deeper), sent


async def test_the_label_read_after_a_rationale_goes_where_the_rationale_was_generated(model_dir):
    """Three chain-of-thought prompts on two servers: each read after a rationale (the prompt
    and the rationale's tokens) goes to the server that generated the rationale, where both
    are in the prefix cache; round robin would send all three elsewhere (A B A, then B A B)."""
    remote, sent = servers(model_dir, Scripted(), Scripted())
    prompts = [tuple(range(k, k + 10)) for k in range(1, 4)]
    gens = await remote.generate([GenerateRequest(p, 4) for p in prompts])
    query = (LabelQuery((), (16, 17)),)
    reads = [ScoreRequest(p + g.token_ids, query, g.site) for p, (g,) in zip(prompts, gens, strict=True)]
    await remote.score(reads)
    host = {prompt: h for h, prompt in sent}
    assert len(sent) == 6 and {host[p] for p in prompts} == {"127.0.0.1", "127.0.0.2"}
    assert [host[r.prompt_ids] for r in reads] == [host[p] for p in prompts], sent


async def test_reads_after_a_rationale_whose_server_failed_stay_together(model_dir):
    """The rationale's server fails the read after it: that read goes to another server, and
    the deeper read follows it there (where the prompt now is), not on round robin."""
    # Round robin: the first server answers the look-up of the model, the second generates.
    remote, sent = servers(model_dir, Scripted(), Scripted(statuses=(200, 502)), Scripted())
    prompt = tuple(range(1, 11))
    ((g,),) = await remote.generate([GenerateRequest(prompt, 4)])
    query = (LabelQuery((), (16, 17)), LabelQuery((16,), (16, 17)))
    await remote.score([ScoreRequest(prompt + g.token_ids, query, g.site)])
    # generation, its read (502), the read elsewhere, the deeper read after it
    assert [host for host, _ in sent] == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"], sent


async def test_a_chained_read_whose_server_failed_goes_to_another(model_dir):
    remote, sent = servers(model_dir, Scripted(statuses=(200, 502)), Scripted(statuses=(200, 502)))
    got = await remote.score(two_deep(range(1, 2)))
    assert got[0][(16,)] == {16: -1.0, 17: -1.0}
    (home, _), (again, _), (other, _) = sent  # first read, deeper read failed there, retried elsewhere
    assert home == again != other
    assert [s.needs_probe for s in remote.servers].count(True) == 1


async def test_a_failed_call_cancels_the_rest_of_its_batch():
    """One engine call of a batch fails: the batch's other calls are cancelled (they would
    only compete with the halves the batch is split into), and the failure is raised."""
    import asyncio

    from labeler.engines.base import gather_or_cancel

    cancelled = []

    async def slow(i: int) -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def fails() -> int:
        await asyncio.sleep(0.01)
        raise EngineError("one read failed")

    with pytest.raises(EngineError, match="one read failed"):
        await gather_or_cancel([slow(0), fails(), slow(2)])
    assert sorted(cancelled) == [0, 2]
    assert await gather_or_cancel([asyncio.sleep(0, result=i) for i in range(3)]) == [0, 1, 2]
