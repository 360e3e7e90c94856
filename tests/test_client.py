"""The client package against the real server (uvicorn on loopback, real model, real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import labeler_client as lc
import psutil
import pytest
from labeler_client.trl import PairwiseJudge, async_reward_function, reward_function

from labeler import ScoreItem
from tests.fixtures.load import AsyncRecordingTransport, RecordingTransport, metric
from tests.fixtures.reliability import Tally, questions
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.model
FAST = lc.Retry(max_retries=8, backoff=0.05, max_backoff=1.0)
OUTAGE_S = 1.0  # how long the restart test keeps the server down (pacing the scenario)


def score_items(n: int, tag: str) -> list[dict[str, str]]:
    return [{"context": f"{tag} question {i}", "response": f"answer {i}"} for i in range(n)]


def test_every_call_and_order_across_batches(live_server, labeler):
    with lc.Client(live_server.url, batch_size=2, max_concurrency=3) as client:
        health = client.health()
        assert isinstance(health, lc.Health) and health.status == "ready" and health.model == labeler.model_id
        assert "tiny" in {t.name for t in client.tasks()}
        items = score_items(5, "order")
        batched = client.scores(items, "tiny")
        single = [client.scores([it], "tiny")[0] for it in items]
        for b, s in zip(batched, single, strict=True):  # in input order
            assert b.distribution == pytest.approx(s.distribution, abs=1e-9)
        assert all(isinstance(s, lc.Score) and -1 <= s.reward <= 1 for s in batched)
        pairs = [{"context": "2+2?", "response_a": "4", "response_b": "5"}, {"response_a": "x", "response_b": "y"}]
        prefs = client.preferences(pairs, "tiny")
        assert all(isinstance(p, lc.Preference) and p.p_a + p.p_b == pytest.approx(1) for p in prefs)
        swapped = client.preferences(
            [{**p, "response_a": p["response_b"], "response_b": p["response_a"]} for p in pairs], "tiny"
        )
        for p, q in zip(prefs, swapped, strict=True):  # each answer belongs to its own item
            assert p.p_a == pytest.approx(q.p_b, abs=1e-4) and p.p_a_ab == pytest.approx(1 - q.p_a_ba, abs=1e-4)
        rewards = client.rewards(["2+2?"], ["4"], task="tiny")
        assert rewards == [pytest.approx(labeler.score("2+2?", "4", "tiny").reward, abs=1e-4)]


async def test_async_client_same_surface(live_server):
    async with lc.AsyncClient(live_server.url, batch_size=2) as client:
        items = score_items(3, "async")
        got = await client.scores(items, "tiny")
        assert len(got) == 3 and all(s is not None for s in got)
        assert (await client.health()).status == "ready"
        assert len(await client.rewards(["a", "b"], ["c", "d"], task="tiny")) == 2


def open_connections(url: str) -> int:
    """This process's open TCP connections to the server at `url`."""
    port = int(url.rsplit(":", 1)[1])
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port)


def test_async_client_awaited_from_one_event_loop_after_another(live_server):
    """An `asyncio.run` per training step: each run's loop gets its own connections (those of
    an ended loop fail with "Event loop is closed"), closed as the run ends, and each call
    succeeds."""
    client = lc.AsyncClient(live_server.url)
    items = score_items(2, "loops")
    before = open_connections(live_server.url)  # other tests' clients may keep theirs
    for _ in range(3):
        assert asyncio.run(client.health()).status == "ready"
        assert all(s is not None for s in asyncio.run(client.scores(items, "tiny")))
        assert open_connections(live_server.url) <= before
    asyncio.run(client.aclose())
    with pytest.raises(lc.RequestError, match="the client is closed"):  # closed stays closed, in any loop
        asyncio.run(client.health())


def test_server_restart_mid_batch_loses_and_duplicates_nothing(make_server, labeler):
    srv = make_server()
    items = questions(8, "restart")
    ref = [r.distribution for r in labeler.scores([ScoreItem(**it) for it in items], "tiny")]
    transport = RecordingTransport()
    # Retries enough to outlast a restart on a busy machine.
    client = lc.Client(
        srv.url,
        batch_size=1,
        max_concurrency=1,
        transport=transport,
        retry=lc.Retry(max_retries=60, backoff=0.05, max_backoff=1.0),
    )
    cut: list[float] = []  # stopped, ready again (monotonic)

    def bounce():
        wait_for(lambda: transport.answered(), 120, "the batch's first answer")
        cut.append(time.monotonic())
        srv.stop()  # graceful: the request in flight is answered first
        time.sleep(OUTAGE_S)
        srv.start()
        cut.append(time.monotonic())

    t = threading.Thread(target=bounce)
    t.start()
    got = client.scores(items, "tiny", cache=False)
    t.join()
    client.close()
    # The restart landed mid-batch: answers before it, refused requests while down, answers after.
    stopped, ready = cut
    assert transport.answered(until=stopped) and transport.failed(stopped, ready) and transport.answered(ready)
    # Exactly once each, in order: every result is its own item's, and one answer per item.
    tally = Tally()
    tally.add([g.distribution if g is not None else None for g in got], ref)
    assert tally.exact, tally
    assert transport.answered() == len(items)


class PerRequest(AsyncRecordingTransport):
    """Also notes each exchange: (request body, sent, answered, status, Retry-After), times
    monotonic, `answered` when the answer's headers came (the client reads the body after)."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[bytes, float, float, int, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        resp = await super().handle_async_request(request)
        self.exchanges.append(
            (request.content, sent, time.monotonic(), resp.status_code, resp.headers.get("retry-after"))
        )
        return resp


async def test_429_is_retried_after_retry_after(make_server):
    """Six one-item requests at once to a server that queues one item: the others are refused
    429, and the client sends each again no sooner than its Retry-After (at least 1 s; its
    own backoff, FAST, would come back within 1 s), until every item is labeled."""
    srv = make_server(max_queue_items=1, max_items=1, max_group_size=2, batch_wait_ms=200)
    transport = PerRequest()
    async with lc.AsyncClient(srv.url, batch_size=1, max_concurrency=6, retry=FAST, transport=transport) as client:
        got = await client.scores(score_items(6, "busy"), "tiny")
    assert all(s is not None for s in got)
    # One request body per item: its tries in the order sent, each but the last refused.
    tries: dict[bytes, list[tuple[float, float, int, str | None]]] = {}
    for body, sent, answered, status, retry_after in transport.exchanges:
        tries.setdefault(body, []).append((sent, answered, status, retry_after))
    assert len(tries) == 6
    waits = []  # (from a 429 to the next try of its item, its Retry-After)
    for item_tries in tries.values():
        item_tries.sort()
        assert [s for _, _, s, _ in item_tries] == [429] * (len(item_tries) - 1) + [200], item_tries
        for (_, answered, _, retry_after), (nxt, _, _, _) in zip(item_tries, item_tries[1:], strict=False):
            waits.append((nxt - answered, float(retry_after)))
    assert waits, "the server refused nothing"  # the server did refuse, and the client came back
    assert all(told >= 1 and wait >= told - 0.05 for wait, told in waits), waits
    assert metric(srv.url, "labeler_rejected_total") == len(waits)  # every 429 it sent, retried


def test_no_retry_on_4xx_and_typed_errors(make_server):
    srv = make_server(max_chars=10, api_keys=["key"])
    with lc.Client(srv.url, api_key="key", retry=FAST) as client:
        with pytest.raises(lc.InvalidRequest) as err:
            client.scores([{"response": "far too long for the limit"}], "tiny")
        assert err.value.status == 422 and err.value.param == "items[0].response"
        got = client.scores([{"response": "x" * 11}, {"response": "ok"}], "tiny", on_error="none")
        assert got[0] is None and isinstance(got[1], lc.Score)  # only the refused item is None
    with lc.Client(srv.url, api_key="wrong", retry=FAST) as client:
        with pytest.raises(lc.AuthenticationError):
            client.tasks()
        # A refused key fails every batch: raised even when failed items may be None.
        with pytest.raises(lc.AuthenticationError):
            client.scores([{"response": "ok"}] * 3, "tiny", on_error="none")
    n_401 = [ln for ln in _metrics(srv).splitlines() if "labeler_request_seconds_count" in ln and '"401"' in ln]
    # Not retried, and counted under the routes they were for, though refused before routing.
    assert sorted((ln.split('route="')[1].split('"')[0], float(ln.split()[-1])) for ln in n_401) == [
        ("/v1/scores", 1.0),
        ("/v1/tasks", 1.0),
    ]


def test_a_lone_surrogate_in_a_completion_is_judged(live_server, labeler):
    """A completion cut inside a character (a lone surrogate, as JSON data can hold) reaches
    the server, which judges it with U+FFFD in the character's place."""
    with lc.Client(live_server.url) as client:
        (got,) = client.rewards(["2+2?"], ["4 \ud83d"], task="tiny")
    assert got == pytest.approx(labeler.score("2+2?", "4 \ufffd", "tiny").reward, abs=1e-4)


def test_timeouts_and_unreachable_servers():
    client = lc.Client("http://127.0.0.1:9", retry=lc.Retry(max_retries=1, backoff=0.01))
    with pytest.raises(lc.RequestError):
        client.tasks()


def test_read_timeout_raises_timeout(live_server):
    client = lc.Client(live_server.url, timeout=lc.Timeout(read=0.001, connect=1), retry=lc.Retry(max_retries=0))
    with pytest.raises(lc.TimeoutException):
        client.scores([{"response": "slow enough"}], "tiny", cot=True, cache=False)


def test_an_interrupt_ends_the_process_with_requests_still_in_flight():
    """Ctrl-C during a batched `Client` call: the process exits while its requests still wait
    for a server that never answers, instead of holding on until they are answered."""
    import signal
    import socket
    import subprocess
    import sys

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []  # connections whose request arrived, never answered

    def hold() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                conn, _ = listener.accept()
                conn.recv(65536)
                held.append(conn)

    threading.Thread(target=hold, daemon=True).start()
    # Ctrl-C as in a terminal, whatever this process inherited (a background job ignores SIGINT).
    script = (
        "import signal, sys, labeler_client as lc\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "client = lc.Client(sys.argv[1], batch_size=1, max_concurrency=2, retry=0, timeout=600)\n"
        "client.scores([{'context': 'q', 'response': str(i)} for i in range(4)], 'tiny')\n"
    )
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    proc = subprocess.Popen([sys.executable, "-c", script, url], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(held) >= 2, 60, "both batches' requests to reach the server")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
        assert len(held) == 2  # the two requests still in flight, no further batch sent
    finally:
        proc.kill()
        listener.close()
        for conn in held:
            conn.close()


def test_env_configuration(live_server, monkeypatch):
    monkeypatch.setenv("LABELER_URL", live_server.url)
    monkeypatch.setenv("LABELER_API_KEY", "from-env")
    client = lc.Client()
    assert client.base_url == live_server.url and client._http.headers["authorization"] == "Bearer from-env"


# -- adapters ----------------------------------------------------------------------------------------
def test_trl_reward_function_called_like_grpo_trainer(live_server, labeler):
    fn = reward_function(live_server.url, task="tiny")
    assert fn.__name__ == "labeler_tiny"
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]] * 2
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    # GRPOTrainer passes keywords, completion ids and the dataset's other columns.
    rewards = fn(prompts=prompts, completions=completions, completion_ids=[[33], [34]], answer=["4", "4"])
    context = "System: Be brief.\n\nUser: 2+2?"  # the service's canonical transcript
    want = [labeler.score(context, r, "tiny").reward for r in ("4", "5")]
    assert rewards == pytest.approx(want, abs=1e-4)
    plain = fn(prompts=["2+2?"], completions=["4"])
    assert plain == [pytest.approx(labeler.score("2+2?", "4", "tiny").reward, abs=1e-4)]
    afn = async_reward_function(live_server.url, task="tiny", name="judge")
    assert afn.__name__ == "judge"
    before = open_connections(live_server.url)
    for _ in range(2):  # one loop after another, as TRL's trainer may run it
        assert asyncio.run(afn(prompts=["2+2?"], completions=["4"])) == pytest.approx(plain, abs=1e-9)
        assert open_connections(live_server.url) <= before


def test_trl_reward_function_none_on_failure(make_server):
    srv = make_server(max_chars=5)
    fn = reward_function(srv.url, task="tiny", on_error="none", batch_size=1, retry=FAST)
    assert fn(prompts=["p", "p"], completions=["short", "much too long"])[1] is None


def test_pairwise_judge(live_server, labeler):
    judge = PairwiseJudge(live_server.url, task="tiny")
    prompts = ["Name a fruit.", "2+2?"]
    completions = [["An apple.", "A chair."], ["5", "4"]]
    scores = judge.judge(prompts, completions, return_scores=True)
    want = [labeler.preference(p, a, b, "tiny").p_a for p, (a, b) in zip(prompts, completions, strict=True)]
    assert scores == pytest.approx(want, abs=1e-4)
    assert judge.judge(prompts, completions) == [0 if s > 0.5 else 1 for s in scores]  # TRL's tie rule


def test_verl_compute_score(live_server, labeler, monkeypatch):
    from labeler_client import _shared, verl

    monkeypatch.setenv("LABELER_URL", live_server.url)
    monkeypatch.setenv("LABELER_TASK", "tiny")
    monkeypatch.setattr(_shared, "_clients", {})
    r = verl.compute_score("gsm8k", "It is 4.", "4", extra_info={"prompt": "2+2?"})
    assert r == pytest.approx(labeler.score("2+2?", "It is 4.", "tiny").reward, abs=1e-4)
    batch = verl.compute_score_batch(["gsm8k"] * 2, ["It is 4.", "4"], ["4", "4"], [{"prompt": "2+2?"}, None])
    assert batch[0] == pytest.approx(r, abs=1e-9)
    assert batch[1] == pytest.approx(labeler.score("", "4", "tiny").reward, abs=1e-4)


def _metrics(srv) -> str:
    import httpx

    return httpx.get(srv.url + "/metrics").text


def test_the_fake_server_refuses_what_the_real_one_refuses(make_server):
    """labeler_client.testing.FakeLabeler answers invalid requests as the server does: the
    same status, error type and param, with the same limits."""
    import httpx
    from labeler_client.testing import FakeLabeler

    srv = make_server(max_items=4, max_chars=50, max_queue_items=1000)
    tasks = tuple(t["name"] for t in httpx.get(srv.url + "/v1/tasks").json()["tasks"])
    fake = FakeLabeler(tasks=tasks, max_items=4, max_chars=50, max_queue_items=1000)
    largest = {"responses": [f"r{k}" for k in range(32)]}  # 496 comparisons
    ok = {"context": "c", "response": "r"}
    chat = [{"role": "user", "content": "hi"}] * 3  # short turns: each one's text is within the limit
    turn, tool_result = {"role": "assistant", "content": None}, {"role": "tool", "name": "add", "content": "4"}
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    cases = [
        ("/v1/scores", {"task": "tiny", "items": [ok]}),
        ("/v1/scores", {"task": "tiny", "items": [{"context": chat, "response": "r"}]}),
        ("/v1/scores", {"task": "tiny", "items": [{"context": "x"}]}),
        ("/v1/scores", {"task": "tiny", "items": []}),
        ("/v1/scores", {"task": "tiny", "items": [ok] * 5}),
        ("/v1/scores", {"task": "tiny", "items": [{**ok, "extra": 1}]}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "bogus": 1}),
        ("/v1/scores", {"task": "tiny", "items": [{"response": 3}]}),
        ("/v1/scores", {"task": "tiny", "items": [{"response": "y" * 51}]}),
        (
            "/v1/scores",
            {"task": "tiny", "items": [{"context": [{"role": "user", "content": "y" * 51}], "response": "r"}]},
        ),
        ("/v1/scores", {"task": "nope", "items": [ok]}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "samples": 2}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "samples": 99, "cot": True}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "seed": -1}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "seed": 2**59}),
        # values of another JSON type than the schema gives (text, a number for a boolean, a
        # boolean or a fraction for an integer): refused, as the schema says
        ("/v1/scores", {"task": "tiny", "items": [ok], "cot": "true", "cache": 0, "samples": 1.0, "seed": "5"}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "cot": 1, "seed": True, "samples": "1"}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "cot": "maybe"}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "samples": 1.5}),
        ("/v1/scores", {"task": "tiny", "items": [ok], "seed": "5.0", "cot": "off"}),
        ("/v1/preferences", {"task": "tiny", "items": [{"response_a": "a", "response_b": "b"}], "order": "xx"}),
        ("/v1/preferences", {"task": "tiny", "items": [{"response_a": "a"}]}),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": ["a"]}]}),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": ["a", "b"]}], "order": "ab"}),
        ("/v1/rewards/reference", {"task": "tiny", "items": [{"response": "a"}]}),
        # groups count their comparisons against the queue: 3 of the largest make 1,488
        ("/v1/rewards/group", {"task": "tiny", "items": [largest] * 3}),
        # OpenAI-style messages: a tool-calling turn's null content, content parts (one over the limit)
        (
            "/v1/scores",
            {"task": "tiny", "items": [{"context": [{"role": "assistant", "content": None}], "response": "r"}]},
        ),
        (
            "/v1/scores",
            {
                "task": "tiny",
                "items": [
                    {"context": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "response": "r"}
                ],
            },
        ),
        (
            "/v1/scores",
            {
                "task": "tiny",
                "items": [
                    {"context": [{"role": "user", "content": [{"type": "text", "text": "y" * 51}]}], "response": "r"}
                ],
            },
        ),
        ("/v1/scores", {"task": "tiny", "items": [{"context": [{"role": "user", "content": 5}], "response": "r"}]}),
        # a role is a name, held to its own limit; keys no field name can be written for
        (
            "/v1/scores",
            {"task": "tiny", "items": [{"context": [{"role": "r" * 65, "content": "hi"}], "response": "r"}]},
        ),
        ("/v1/scores", {"task": "tiny", "items": [ok], "foo-bar": 1}),
        ("/v1/scores", {"task": "tiny", "items": [{**ok, "bad key": 1}]}),
        # responses as messages (a tool-calling completion): each text held to the limit; tool calls a list of objects
        ("/v1/scores", {"task": "tiny", "items": [{"response": [{**turn, "tool_calls": [call]}, tool_result]}]}),
        ("/v1/scores", {"task": "tiny", "items": [{"response": [{"role": "assistant", "content": "y" * 51}]}]}),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": ["a", [{**turn, "tool_calls": "call"}]]}]}),
        ("/v1/scores", {"task": "tiny", "items": [{"response": [{**turn, "tool_calls": [call, 5]}]}]}),
        # a message with neither content nor tool calls (a misspelt key): refused, not read as empty
        ("/v1/scores", {"task": "tiny", "items": [{"context": [{"role": "user", "contents": "hi"}], "response": "r"}]}),
        ("/v1/scores", {"task": "tiny", "items": [{"response": [{"role": "assistant", "text": "hi"}]}]}),
        # /get_reward's options are query parameters: in the body they would be ignored
        ("/get_reward?task=tiny", {"query": ["a"], "task": "tiny"}),
        ("/get_reward?task=tiny", {"query": ["a"], "reward": "reference", "labels": ["b"]}),
        ("/get_reward?task=tiny", {"prompts": ["a"]}),
        ("/get_reward?task=tiny", {"query": ["a", 1]}),
        ("/get_reward?task=tiny", {"query": ["a"] * 5}),
        ("/get_reward?task=tiny", {"query": ["ab"], "prompts": ["a", "b"]}),
        ("/get_reward?task=nope", {"query": ["a"]}),
        # The limit holds each text a query splits into, not the query whole.
        ("/get_reward?task=tiny", {"query": ["y" * 51]}),
        ("/get_reward?task=tiny", {"query": ["p" * 30 + "r" * 30], "prompts": ["p" * 30]}),
        ("/get_reward?task=tiny", {"query": ["p" * 60 + "r"], "prompts": ["p" * 60]}),
        ("/get_reward?task=tiny&overlong=lowest", {"query": ["a", "y" * 51]}),
        ("/get_reward?task=tiny&overlong=maybe", {"query": ["a"]}),
        # a misspelt option, which would otherwise be ignored (the request judged by the defaults)
        ("/get_reward?task=tiny&overlng=lowest", {"query": ["a", "y" * 51]}),
        ("/get_reward?task=tiny&overlng=lowest", {"query": "a"}),
        ("/get_reward?task=tiny&over-long=lowest", {"query": ["a"]}),  # a name no identifier spells
        ("/get_reward?task=nope", {"query": ["y" * 51]}),
        ("/get_reward?task=nope&overlong=lowest", {"query": ["y" * 51]}),
    ]
    fake_http = httpx.Client(base_url="http://fake.test", transport=fake.transport())

    def seen(resp: httpx.Response) -> tuple:
        err = resp.json().get("error") or {}
        return resp.status_code, err.get("type"), err.get("param")

    statuses = []
    for path, body in cases:
        real = seen(httpx.post(srv.url + path, json=body, timeout=120))
        assert seen(fake_http.post(path, json=body)) == real, (path, body)
        statuses.append(real[0])
    assert statuses.count(422) == len(cases) - 7
    # overlong=lowest: the query over the limit gets the lowest reward, marked, on both.
    body, path = {"query": ["a", "y" * 51]}, "/get_reward?task=tiny&overlong=lowest"
    for answer in (httpx.post(srv.url + path, json=body, timeout=120).json(), fake_http.post(path, json=body).json()):
        assert answer["rewards"][1] == -1.0 and answer["extra_logs"]["overlong"] == [0.0, 1.0], answer
        assert answer["extra_logs"]["expected_score"][1] == 1.0 and -1 < answer["rewards"][0] < 1
