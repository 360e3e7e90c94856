"""The HTTP service, run for real: uvicorn on loopback, the real model, a real redis-server."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import redis

from labeler import PairItem, ScoreItem
from service.cache import CACHE_PREFIX
from service.protocol import PreferencesResponse, ScoresResponse
from tests.fixtures.load import error_shape_ok, metric
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.model

PAIR = {"context": "Name a fruit.", "response_a": "An apple.", "response_b": "A chair."}


def post(srv, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120, **kw)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert error_shape_ok(resp.json(), status), resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param
    return err


# -- endpoints ----------------------------------------------------------------------------------------
def test_an_app_served_before_its_model_is_loaded_answers_503_that_clients_retry():
    """A host that serves the app before its lifespan has loaded the model (or without running
    it): the label routes answer 503 with Retry-After, as /readyz does, not a 500 that clients
    take for a final error; /v1/tasks already knows its tasks."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from tests.fixtures.redis import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(Settings()), port=port, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: _answers(url + "/healthz"), timeout=30, what="the server to answer")
        item = {"context": "2+2?", "response": "4"}
        bodies = {
            "/v1/preferences": {"task": "general", "items": [PAIR]},
            "/v1/scores": {"task": "general", "items": [item]},
            "/v1/judgments": {"task": "general", "items": [item]},
            "/v1/rewards/reference": {"task": "general", "items": [{**item, "reference": "4."}]},
            "/v1/rewards/group": {"task": "general", "items": [{"context": "2+2?", "responses": ["4", "5"]}]},
            "/get_reward": {"query": ["2+2? 4"]},
        }
        for path, body in bodies.items():
            resp = httpx.post(url + path, json=body, timeout=30)
            err = assert_error(resp, 503)
            assert err["type"] == "engine_unavailable" and resp.headers["retry-after"] == "5", (path, resp.text)
        assert assert_error(httpx.get(url + "/readyz", timeout=30), 503)["type"] == "not_ready"
        tasks = httpx.get(url + "/v1/tasks", timeout=30)
        assert tasks.status_code == 200 and "general" in [t["name"] for t in tasks.json()["tasks"]]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_meta_endpoints(live_server, labeler):
    assert httpx.get(live_server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(live_server.url + "/readyz").json()
    assert ready["model"] == labeler.model_id and ready["cache"] == "memory" and ready["cache_status"] == "ok"
    tasks = httpx.get(live_server.url + "/v1/tasks").json()
    assert {t["name"]: t["version"] for t in tasks["tasks"]}["tiny"] == labeler.task("tiny").version
    spec = httpx.get(live_server.url + "/openapi.json").json()
    assert {"/v1/preferences", "/v1/scores", "/get_reward", "/v1/tasks"} <= set(spec["paths"])
    assert httpx.get(live_server.url + "/docs").status_code == 200


def test_preferences_equal_the_labeler_in_process(live_server, labeler):
    items = [PAIR, {"context": "2+2?", "response_a": "4", "response_b": "5"}]
    r = post(live_server, "/v1/preferences", {"task": "tiny", "items": items, "cache": False}).json()
    ref = labeler.preferences([PairItem(**it) for it in items], "tiny")
    PreferencesResponse.model_validate(r)  # the documented response schema holds
    assert r["model"] == labeler.model_id and r["task_version"] == labeler.task("tiny").version
    for got, want in zip(r["results"], ref, strict=True):
        # 1e-5: a result moves with its engine batch-mates by up to ~3e-6 (fp32 padding)
        assert got["p_a"] == pytest.approx(want.p_a, abs=1e-5) and got["p_a_ba"] == pytest.approx(want.p_a_ba, abs=1e-5)
        assert got["consistent"] == want.consistent and got["cached"] is False
    one = post(live_server, "/v1/preferences", {"task": "tiny", "items": [PAIR], "order": "ab", "cache": False})
    assert one.json()["results"][0]["p_a_ba"] is None and one.json()["results"][0]["consistent"] is None


def test_scores_and_cot(live_server, labeler):
    r = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": "4"}]}).json()
    ScoresResponse.model_validate(r)
    res = r["results"][0]
    ref = labeler.score("2+2?", "4", "tiny")
    assert res["distribution"] == pytest.approx(ref.distribution, abs=1e-5) and len(res["distribution"]) == 10
    assert -1 <= res["reward"] <= 1 and 1 <= res["expected"] <= 10
    cot = post(
        live_server, "/v1/scores", {"task": "tiny", "cot": True, "items": [{"context": "2+2?", "response": "4"}]}
    )
    body = cot.json()["results"][0]
    assert body["rationale"] == body["rationales"][0] and isinstance(body["rationale"], str)


# -- cache ------------------------------------------------------------------------------------------------
def test_cache_hit_is_identical_and_partial_batches_compute_only_misses(live_server):
    items = [{"context": "c1", "response": "r1"}, {"context": "c2", "response": "r2"}]
    first = post(live_server, "/v1/scores", {"task": "tiny", "items": items}).json()
    again = post(live_server, "/v1/scores", {"task": "tiny", "items": items}).json()
    for a, b in zip(first["results"], again["results"], strict=True):
        assert b["cached"] is True and {**a, "cached": True} == b
    mixed = post(live_server, "/v1/scores", {"task": "tiny", "items": [*items, {"context": "c3", "response": "r3"}]})
    body = mixed.json()
    assert [r["cached"] for r in body["results"]] == [True, True, False]
    assert body["usage"] == {"items": 3, "cached": 2, "computed": 1, "shared": 0}


def test_the_cache_byte_budget_holds_on_a_live_server(make_server):
    # A budget under one result's size: nothing is kept, every repeat is computed.
    srv = make_server(cache_bytes=16)
    item = {"context": "budget", "response": "x"}
    for _ in range(2):
        assert post(srv, "/v1/scores", {"task": "tiny", "items": [item]}).json()["results"][0]["cached"] is False


def test_cache_false_neither_reads_nor_writes(live_server):
    item = {"context": "nocache", "response": "x"}
    r1 = post(live_server, "/v1/scores", {"task": "tiny", "items": [item], "cache": False}).json()
    r2 = post(live_server, "/v1/scores", {"task": "tiny", "items": [item]}).json()
    assert r1["results"][0]["cached"] is False and r2["results"][0]["cached"] is False
    assert r2["results"][0]["distribution"] == pytest.approx(r1["results"][0]["distribution"], abs=1e-4)


async def test_single_flight_and_cross_request_batching(live_server, engine):
    batcher = live_server.app.state.service.batcher
    item = {"context": "single flight", "response_a": "yes", "response_b": "no"}
    computed, prompts = batcher.computed, engine.stats.prompts_scored
    async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as client:
        rs = await asyncio.gather(
            *(client.post("/v1/preferences", json={"task": "tiny", "items": [item]}) for _ in range(6))
        )
    bodies = [r.json() for r in rs]
    assert len({b["results"][0]["p_a"] for b in bodies}) == 1
    assert batcher.computed - computed == 1  # one computation for six identical requests
    assert engine.stats.prompts_scored - prompts == 2  # its two orders, once
    assert sum(b["usage"]["computed"] for b in bodies) == 1
    # Different small requests arriving together become one engine batch.
    calls = engine.stats.score_calls
    async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as client:
        rs = await asyncio.gather(
            *(client.post("/v1/scores", json={"task": "tiny", "items": [{"response": f"batch {i}"}]}) for i in range(6))
        )
    assert all(r.status_code == 200 for r in rs)
    assert engine.stats.score_calls - calls < 6


async def test_metrics_count_concurrent_engine_calls_and_shared_items_once(make_server, engine):
    """Engine calls four at a time: the token counters move by what the engine counted, not
    by each call's view of the others' tokens; six identical requests count one item computed
    by the engine, the others shared (or cached)."""
    from tests.fixtures.load import metric

    srv = make_server(batch_concurrency=4, batch_max_items=1, batch_wait_ms=0)
    names = ("labeler_engine_prompt_tokens_total", "labeler_engine_computed_tokens_total")
    before = [metric(srv.url, n) for n in names], (engine.stats.prompt_tokens, engine.stats.computed_tokens)
    item = {"context": "counted once", "response": "yes"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        distinct = [{"task": "tiny", "items": [{"response": f"concurrent {i}"}], "cache": False} for i in range(8)]
        same = [{"task": "tiny", "items": [item]}] * 6
        rs = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in distinct + same))
    assert all(r.status_code == 200 for r in rs)
    moved = [metric(srv.url, n) - b for n, b in zip(names, before[0], strict=True)]
    assert moved == [engine.stats.prompt_tokens - before[1][0], engine.stats.computed_tokens - before[1][1]]
    assert moved[0] > 0
    text = httpx.get(srv.url + "/metrics").text
    sources = {s: metric_line(text, f'labeler_items_total{{kind="score",source="{s}"}}') for s in ("engine", "shared")}
    usage = {k: sum(r.json()["usage"][k] for r in rs) for k in ("computed", "shared", "cached")}
    assert (sources["engine"], sources["shared"]) == (usage["computed"], usage["shared"])
    # The identical item: computed once, joined while in flight or found cached after (or, for
    # a request that missed the cache just before it was written, computed once more).
    assert usage["computed"] >= 9 and sum(usage.values()) == 14


def metric_line(text: str, sample: str) -> float:
    """The value of one sample (`name{labels}`) in Prometheus text."""
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " "))


def test_redis_cache_survives_redis_outages(make_server, redis_server):
    srv = make_server(redis_url=redis_server.url, redis_cooldown=0.3)
    client = redis.Redis.from_url(redis_server.url)
    item = {"context": "redis", "response": "kept"}
    first = post(srv, "/v1/scores", {"task": "tiny", "items": [item]}).json()["results"][0]
    assert first["cached"] is False and len(client.keys(CACHE_PREFIX + "*")) >= 1
    assert post(srv, "/v1/scores", {"task": "tiny", "items": [item]}).json()["results"][0]["cached"] is True
    redis_server.stop()
    try:
        down = post(srv, "/v1/scores", {"task": "tiny", "items": [item, {"context": "redis", "response": "new"}]})
        assert down.status_code == 200 and [r["cached"] for r in down.json()["results"]] == [False, False]
        # Recomputed in another batch: equal up to float rounding (cache hits are exact).
        assert down.json()["results"][0]["distribution"] == pytest.approx(first["distribution"], abs=1e-4)
        assert httpx.get(srv.url + "/readyz").json()["cache_status"] == "bypassed"
        metrics = httpx.get(srv.url + "/metrics").text
        assert "labeler_cache_errors_total" in metrics and 'op="get"' in metrics
    finally:
        redis_server.start()
    # The cache is tried again once its cooldown ends: /readyz pings Redis then.
    ready = srv.url + "/readyz"
    wait_for(lambda: httpx.get(ready).json()["cache_status"] == "ok", 30, "the cache to be back after its cooldown")
    post(srv, "/v1/scores", {"task": "tiny", "items": [item]})  # written again now that Redis is back
    back = post(srv, "/v1/scores", {"task": "tiny", "items": [item]}).json()["results"][0]
    assert back["cached"] is True and back["distribution"] == pytest.approx(first["distribution"], abs=1e-4)
    assert httpx.get(srv.url + "/readyz").json()["cache_status"] == "ok"


def test_a_shared_cache_value_that_is_not_a_result_of_its_kind_is_computed_anew(make_server, redis_server):
    """Under a result's key in the shared Redis, a value of another shape (a result another
    version wrote, another writer's data) is a miss: the item is computed, its result written
    over it, and the request answers 200 — on the label routes and /get_reward alike. A result
    without its optional fields is still a result."""
    srv = make_server(redis_url=redis_server.url)
    client = redis.Redis.from_url(redis_server.url)

    def new_key(path: str, body: dict) -> tuple[bytes, dict]:
        """The one key a first request for `body` writes, and its result."""
        before = set(client.keys(CACHE_PREFIX + "*"))
        first = post(srv, path, body).json()["results"][0]
        (key,) = set(client.keys(CACHE_PREFIX + "*")) - before
        return key, first

    def decode_errors() -> float:
        text = httpx.get(srv.url + "/metrics").text
        return metric_line(text, 'labeler_cache_errors_total{op="decode"}') if 'op="decode"' in text else 0.0

    item = {"context": "shared cache", "response": "another shape"}
    body = {"task": "tiny", "items": [item]}
    key, first = new_key("/v1/scores", body)
    stored = json.loads(client.get(key))
    foreign = [
        {k: v for k, v in stored.items() if k != "distribution"},  # a field short
        {**stored, "reward": "0.5"},  # a field of another type
        {"unrelated": True},
    ]
    for n, value in enumerate(foreign, start=1):
        client.set(key, json.dumps(value))
        again = post(srv, "/v1/scores", body)
        assert again.status_code == 200, again.text
        res = again.json()["results"][0]
        assert res["cached"] is False and res["distribution"] == pytest.approx(first["distribution"], abs=1e-4)
        assert json.loads(client.get(key)).keys() == stored.keys()  # the result written over it
        assert decode_errors() == n
    client.set(key, json.dumps({k: v for k, v in stored.items() if k != "rationales"}))
    short = post(srv, "/v1/scores", body)
    assert short.status_code == 200, short.text
    assert short.json()["results"][0]["cached"] is True and short.json()["results"][0]["rationale"] is None
    client.set(key, json.dumps(foreign[1]))
    reward = httpx.post(
        srv.url + "/get_reward",
        json={"query": ["shared cache" + "another shape"], "prompts": ["shared cache"]},
        params={"task": "tiny"},
    )
    assert reward.status_code == 200, reward.text
    assert reward.json()["rewards"][0] == pytest.approx(first["reward"], abs=1e-4)
    assert reward.json()["extra_logs"]["cached"] == [0.0] and decode_errors() == len(foreign) + 1
    assert post(srv, "/v1/scores", body).json()["results"][0]["cached"] is True

    group = {"task": "tiny", "items": [{"context": "shared cache", "responses": ["one", "two"]}]}
    key, first = new_key("/v1/rewards/group", group)
    client.set(key, json.dumps({**json.loads(client.get(key)), "p_win": "high"}))
    again = post(srv, "/v1/rewards/group", group)
    assert again.status_code == 200, again.text
    assert again.json()["results"][0]["cached"] is False and decode_errors() == len(foreign) + 2
    assert again.json()["results"][0]["rewards"] == pytest.approx(first["rewards"], abs=1e-4)


# -- auth and limits ------------------------------------------------------------------------------------
def test_api_keys(make_server):
    """Only an accepted key as a Bearer token, or as the HTTP Basic password, passes; probes
    need none. (That keys never reach the log is checked on `labeler serve`'s real log, in
    test_reliability_security.py and test_serve_cli.py: this in-process server logs nothing
    per request.)"""
    secret = "sk-test-very-secret-1234"
    srv = make_server(api_keys=[secret, "other"])
    body = {"task": "tiny", "items": [{"response": "auth"}]}
    assert_error(post(srv, "/v1/scores", body), 401)
    assert_error(post(srv, "/v1/scores", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(srv, "/v1/scores", body, headers={"Authorization": f"Basic {secret}"}), 401)
    # HTTP Basic: the key is the password (the user name is anything), as URL credentials send it
    assert post(srv, "/v1/scores", body, auth=("labeler", secret)).status_code == 200
    assert_error(post(srv, "/v1/scores", body, auth=(secret, "")), 401)
    assert post(srv, "/v1/scores", body, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert httpx.get(srv.url + "/healthz").status_code == 200  # probes need no key


def test_limits_give_clear_4xx(make_server):
    srv = make_server(max_items=2, max_chars=50, max_body_bytes=2048, max_item_tokens=30)
    ok = {"context": "c", "response": "r"}
    assert_error(post(srv, "/v1/scores", {"task": "tiny", "items": [ok] * 3}), 422, "items")
    err = assert_error(post(srv, "/v1/scores", {"task": "tiny", "items": [{"response": "x" * 51}]}), 422)
    assert err["param"] == "items[0].response" and "50" in err["message"]
    err = assert_error(post(srv, "/v1/scores", {"task": "tiny", "items": [{"response": "1 " * 20}]}), 422)
    assert err["param"] == "items[0]" and "30" in err["message"]
    assert_error(post(srv, "/v1/scores", {"task": "tiny", "items": [ok], "samples": 2}), 422, "samples")
    assert_error(post(srv, "/v1/scores", {"task": "tiny", "items": [{"respons": "typo"}]}), 422)
    assert_error(post(srv, "/v1/scores", {"task": "nope", "items": [ok]}), 422, "task")
    assert_error(post(srv, "/v1/preferences", {"task": "tiny", "items": [PAIR], "order": "ac"}), 422, "order")
    big = {"task": "tiny", "items": [{"response": "y" * 4000}]}
    declared = assert_error(post(srv, "/v1/scores", big), 413)
    assert declared["type"] == "body_too_large" and "2048" in declared["message"]

    def chunks():  # no Content-Length: the limit holds for streamed bodies too
        yield b'{"task": "tiny", "items": [{"response": "'
        for _ in range(10):
            yield b"z" * 500
        yield b'"}]}'

    resp = httpx.post(srv.url + "/v1/scores", content=chunks(), headers={"content-type": "application/json"})
    assert assert_error(resp, 413) == declared  # the same answer, declared or streamed
    # /get_reward's body field `query` is named like any other field
    assert_error(post(srv, "/get_reward?task=tiny", {"prompts": ["a"]}), 422, "query")
    assert_error(post(srv, "/get_reward?task=tiny", {"query": ["a", 1]}), 422, "query[1]")
    assert_error(post(srv, "/get_reward?task=tiny", {"query": ["a"] * 3}), 422, "query")
    assert_error(post(srv, "/get_reward?task=nope", {"query": ["a"]}), 422, "task")
    assert_error(httpx.post(srv.url + "/v1/scores", content=b"{not json", timeout=30), 422)
    assert_error(httpx.get(srv.url + "/nope"), 404)


def test_a_chat_context_is_limited_per_message_not_as_its_transcript(make_server):
    srv = make_server(max_chars=50)
    chat = [{"role": "user", "content": "u" * 40}, {"role": "assistant", "content": "a" * 40}]
    chat.append({"role": "user", "content": "q"})
    assert post(srv, "/v1/scores", {"task": "tiny", "items": [{"context": chat, "response": "r"}]}).status_code == 200
    too_long = {"context": [{"role": "user", "content": "u" * 51}], "response": "r"}
    err = assert_error(post(srv, "/v1/scores", {"task": "tiny", "items": [too_long]}), 422)
    assert err["param"] == "items[0].context[0].content"
    # The same rule for the chat turns a /get_reward query is split into.
    turn = "<|im_start|>{}\n{}<|im_end|>\n"
    query = turn.format("user", "u" * 40) + turn.format("assistant", "a" * 40) + turn.format("user", "q")
    query += "<|im_start|>assistant\nr"
    assert post(srv, "/get_reward?task=tiny", {"query": [query]}).status_code == 200
    long_turn = turn.format("user", "u" * 51) + "<|im_start|>assistant\nr"
    err = assert_error(post(srv, "/get_reward?task=tiny", {"query": [long_turn]}), 422)
    assert err["param"] == "query[0].context[0].content"


def test_a_request_of_large_texts_is_read_off_the_event_loop(make_server, monkeypatch):
    """Reading a request's transcripts takes microseconds for small texts, done inline, and
    some 16 ms per 32,000 characters of chat markup: over 64 KiB of text, it runs on the
    labeler's rendering thread, so the event loop keeps answering other requests and the
    health probes meanwhile (labels, groups and /get_reward alike)."""
    srv = make_server()
    service = srv.app.state.service
    threads: list[str] = []
    read = service._normalize

    def recording(item):
        threads.append(threading.current_thread().name)
        return read(item)

    monkeypatch.setattr(service, "_normalize", recording)
    big = "Human: hi\nAssistant: yo\n" * 1200  # 30,000 characters of a transcript
    requests = [
        ("/v1/scores", {"task": "tiny", "items": [{"context": "q", "response": "r"}]}, False),
        ("/v1/scores", {"task": "tiny", "items": [{"context": big, "response": "r"}] * 3}, True),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"context": big, "responses": ["a", "b"]}] * 3}, True),
        ("/get_reward?task=tiny", {"query": ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nr"]}, False),
        ("/get_reward?task=tiny", {"query": [big] * 3}, True),
    ]
    for path, body, large in requests:
        threads.clear()
        resp = post(srv, path, body)
        assert resp.status_code in (200, 422) and threads, (path, resp.text)  # 422: over the model's tokens
        assert {t.startswith("labeler-render") for t in threads} == {large}, (path, threads)


def test_an_unknown_default_task_stops_the_server_from_starting(labeler):
    from labeler import InvalidInput
    from service.app import create_app
    from service.settings import Settings

    with pytest.raises(InvalidInput, match="default task 'nope'") as err:
        create_app(Settings(task="nope"), labeler=labeler)
    assert err.value.field == "task" and "tiny" in str(err.value)


def test_request_bodies(live_server):
    """JSON with or without a charset or a content type, and UTF-16 JSON, are read alike;
    another content type or broken JSON is a 422 naming the body; the OpenAPI document
    describes the body."""
    body = {"task": "tiny", "items": [{"context": "Say hi.", "response": "Hi."}]}
    raw = json.dumps(body)
    answers = [
        httpx.post(live_server.url + "/v1/scores", content=content, headers=headers, timeout=120)
        for content, headers in [
            (raw.encode(), {"content-type": "application/json"}),
            (raw.encode(), {"content-type": "application/json; charset=utf-8"}),
            (raw.encode(), {}),
            (raw.encode("utf-16"), {"content-type": "application/json"}),
        ]
    ]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert len({r.json()["results"][0]["expected"] for r in answers}) == 1
    err = assert_error(
        httpx.post(live_server.url + "/v1/scores", content=raw, headers={"content-type": "text/plain"}), 422, "body"
    )
    assert "content-type" in err["message"]
    # An empty content type is read as none: a body that is not a request is named as such.
    err = assert_error(
        httpx.post(live_server.url + "/v1/scores", content=b"[]", headers={"content-type": ""}, timeout=30), 422, "body"
    )
    assert "content-type" not in err["message"], err
    err = assert_error(httpx.post(live_server.url + "/get_reward", content=b'{"query": [', timeout=30), 422, "body")
    assert "not valid JSON" in err["message"]
    # Bytes that are no Unicode text, and nesting past the parser's recursion limit: the same 422.
    for content in (b"\xff\xfe\x00\xd8\xff\x0f[", b"[" * 100_000 + b"]" * 100_000):
        err = assert_error(httpx.post(live_server.url + "/v1/scores", content=content, timeout=30), 422, "body")
        assert err["message"].startswith("body: not valid JSON"), err
    # A number longer than Python reads (4,300 digits): valid JSON, refused naming the limit.
    long_seed = b'{"task": "tiny", "items": [{"response": "r"}], "seed": ' + b"9" * 5000 + b"}"
    err = assert_error(httpx.post(live_server.url + "/v1/scores", content=long_seed, timeout=30), 422, "body")
    assert "4300 digits" in err["message"] and "ValueError" not in err["message"], err
    spec = httpx.get(live_server.url + "/openapi.json").json()
    ref = spec["paths"]["/v1/scores"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    scores = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(scores["required"]) == {"task", "items"} and scores["additionalProperties"] is False
    params = {p["name"]: p for p in spec["paths"]["/get_reward"]["post"]["parameters"]}
    assert list(params) == ["task", "reward", "overlong"] and all(p["description"] for p in params.values())
    assert "tiny" in params["task"]["schema"]["enum"] and params["overlong"]["schema"]["enum"] == ["refuse", "lowest"]


async def test_full_queue_answers_429_with_retry_after(make_server):
    srv = make_server(max_queue_items=2, max_items=2, max_group_size=2, batch_wait_ms=300)
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        rs = await asyncio.gather(
            *(client.post("/v1/scores", json={"task": "tiny", "items": [{"response": f"q{i}"}]}) for i in range(6))
        )
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 2 and 429 in codes and all(c in (200, 429) for c in codes)
    refused = next(r for r in rs if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert_error(refused, 429)
    assert metric(srv.url, "labeler_rejected_total") == codes.count(429)  # each refusal counted once


async def test_a_full_queue_refuses_requests_before_rendering_them(make_server, monkeypatch):
    """While the queue is full, a request is refused before its items are rendered and
    tokenized: an overloaded server spends no work on the requests it turns away."""
    srv = make_server(max_queue_items=2, max_items=2, max_group_size=2, batch_wait_ms=2000)
    prepared: list[str] = []
    aprepare = srv.labeler.aprepare

    async def counting(spec, items, **kw):
        prepared.extend(it.response for it in items)
        return await aprepare(spec, items, **kw)

    monkeypatch.setattr(srv.labeler, "aprepare", counting)
    batcher = srv.app.state.service.batcher
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        body = {"task": "tiny", "items": [{"response": "full-0"}, {"response": "full-1"}]}
        first = asyncio.create_task(client.post("/v1/scores", json=body))
        deadline = time.monotonic() + 30
        while batcher.pending < 2 and time.monotonic() < deadline:  # queued, the batch still filling
            await asyncio.sleep(0.01)
        assert batcher.pending == 2
        rs = [
            await client.post("/v1/scores", json={"task": "tiny", "items": [{"response": f"q{i}"}]}) for i in range(4)
        ]
        assert (await first).status_code == 200
    assert [r.status_code for r in rs] == [429] * 4
    assert prepared == ["full-0", "full-1"]


# -- OpenRLHF -----------------------------------------------------------------------------------------
def test_get_reward_openrlhf_contract(live_server, labeler):
    prompts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Say hi."]
    queries = [prompts[0] + "4<|im_end|>", prompts[1] + " Hello!"]
    # The shape OpenRLHF's remote reward client posts, with a plain HTTP client.
    resp = httpx.post(
        live_server.url + "/get_reward?task=tiny",
        json={"query": queries, "prompts": prompts, "labels": ["4", None]},
        timeout=120,
    )
    body = resp.json()
    assert resp.status_code == 200 and set(body) == {"rewards", "scores", "extra_logs"}
    # The ChatML prompt is read as its canonical transcript (labeler.chat): one user turn.
    ref = labeler.scores([ScoreItem("What is 2+2?", "4"), ScoreItem("Say hi.", "Hello!")], "tiny")
    assert body["rewards"] == pytest.approx([r.reward for r in ref], abs=1e-5)
    # Without prompts, the split is at the last assistant marker.
    alone = httpx.post(live_server.url + "/get_reward?task=tiny", json={"query": queries[:1]}, timeout=120).json()
    assert alone["rewards"] == pytest.approx(body["rewards"][:1], abs=1e-9)
    assert_error(httpx.post(live_server.url + "/get_reward", json={"query": ["a"], "prompts": ["a", "b"]}), 422)
