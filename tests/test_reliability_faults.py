"""Faults, survived for real: Redis stopped and restarted under load, the engine raising
mid-batch (one bad item) or going down (the whole batch), the server killed (SIGKILL) and
restarted during a client batch.

Every figure is counted: results are matched to the items they were for (`Tally`), and a
kill "during a batch" is checked to have landed there (answers before it and after the
restart, on the wire).

Companions elsewhere, counted in docs/RELIABILITY.md: test_service.py's Redis outage
between requests and test_client.py's graceful restart during a client batch.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import Counter

import httpx
import labeler_client as lc
import pytest

from labeler import GroupItem, Labeler, ModelOutputError, PairItem, ScoreItem
from tests.fixtures.faults import FaultyEngine
from tests.fixtures.load import LoadReport, RecordingTransport, drive, error_shape_ok, metric
from tests.fixtures.process import ServeProcess
from tests.fixtures.reliability import Tally, questions, scale, score_tally
from tests.fixtures.server import LiveServer
from tests.fixtures.wait import async_wait_for, wait_for

pytestmark = [pytest.mark.model, pytest.mark.reliability]

POISON = "POISON-7f3a"
UP_S = 2.0  # Redis serves this long between outages (pacing the scenario)
DOWN_S = 2.0  # each Redis outage lasts this long (pacing the scenario)


def score_items(items: list[dict[str, str]]) -> list[ScoreItem]:
    return [ScoreItem(it.get("context", ""), it["response"]) for it in items]


# -- Redis ---------------------------------------------------------------------------------------
async def test_redis_stopped_and_restarted_under_load(make_server, redis_server, labeler, figures):
    outages = scale(ci=2, full=6)
    srv = make_server(redis_url=redis_server.url, redis_cooldown=0.3, batch_wait_ms=2)
    tag = uuid.uuid4().hex[:8]
    repeat = [{"context": "redis under load", "response": f"repeat {k}"} for k in range(16)]

    def body(i: int) -> dict:
        # Mostly items the cache answers while Redis is up (and the engine while it is down),
        # and every 4th request one that only the engine can answer.
        fresh = [{"context": f"fresh {tag}", "response": f"new answer {i}"}] if i % 4 == 0 else []
        return {"task": "tiny", "items": [repeat[i % 16], *fresh]}

    assert httpx.post(srv.url + "/v1/scores", json={"task": "tiny", "items": repeat}, timeout=300).status_code == 200
    stop = asyncio.Event()
    report = LoadReport()
    windows: list[tuple[float, float]] = []  # while Redis was down

    async def bounce_redis() -> None:
        try:
            for _ in range(outages):
                await asyncio.sleep(UP_S)
                await async_wait_for(lambda: report.in_flight > 0, 300, "a request in flight before Redis stops")
                await asyncio.to_thread(redis_server.stop)
                down = time.monotonic()
                await asyncio.sleep(DOWN_S)
                # Up again only once a request sent during the outage was answered: its cache
                # lookup met Redis down (while every request waits on the engine, none looks up).
                await async_wait_for(
                    lambda down=down: any(t0 >= down for t0, _, _ in report.spans),
                    300,
                    "a request sent during the outage answered",
                )
                await asyncio.to_thread(redis_server.start)
                windows.append((down, time.monotonic()))
            back = windows[-1][1]
            await async_wait_for(
                lambda: any(t0 >= back for t0, _, _ in report.spans), 300, "a request sent after the last outage"
            )
        finally:
            stop.set()
            if redis_server.proc is None:  # stopped and not started again: up for the tests after this one
                await asyncio.to_thread(redis_server.start)

    load = asyncio.create_task(
        drive(
            srv.url,
            "/v1/scores",
            body,
            total=scale(2000, 20000),
            concurrency=8,
            timeout=120,
            deadline=scale(300, 900),
            stop=stop,
            report=report,
            keep_answers=True,
        )
    )
    await bounce_redis()
    await load
    assert report.sent > 0 and report.statuses == {200: report.sent}, report  # every label request answered
    assert report.hung == 0 and not report.errors
    # Each result is its own item's: checked against the labeler's results in process.
    tally = await score_tally(labeler, "tiny", report.answers)
    assert tally.exact and tally.expected == report.results_expected, tally
    # Under load: requests were in flight while Redis was down, in every outage.
    during = [sum(1 for t0, t1, _ in report.spans if t0 <= b and t1 >= a) for a, b in windows]
    assert len(during) == outages and min(during) >= 1, during
    errors = metric(srv.url, "labeler_cache_errors_total")
    assert errors > 0  # the outages were noticed (and bypassed), not missed

    # Redis is back and used again: once past the cooldown, a new item is written, then read back.
    wait_for(
        lambda: httpx.get(srv.url + "/readyz", timeout=30).json()["cache_status"] == "ok", 60, "Redis in use again"
    )
    item = {"task": "tiny", "items": [{"response": f"after {tag}"}]}
    assert httpx.post(srv.url + "/v1/scores", json=item, timeout=120).json()["results"][0]["cached"] is False
    assert httpx.post(srv.url + "/v1/scores", json=item, timeout=120).json()["results"][0]["cached"] is True
    figures.record(
        "redis-outages-under-load",
        outages=len(windows),
        requests=report.sent,
        answered_200=report.statuses[200],
        failed=report.sent - report.statuses[200],
        status_5xx=report.status_5xx,
        hung=report.hung,
        in_flight_while_down=sum(during),
        **tally.figures(),
        cache_errors_bypassed=int(errors),
        cache_hits=int(metric(srv.url, "labeler_cache_hits_total")),
    )


# -- the engine raising mid-batch -------------------------------------------------------------------
def bisected(failed: list[int]) -> bool:
    """Failed calls of a batch split in halves down to one item: each at most half (rounded
    up) of the one before, ending at 1, and no more of them than halvings allow."""
    halving = all(b <= (a + 1) // 2 for a, b in zip(failed, failed[1:], strict=False))
    return halving and failed[-1] == 1 and len(failed) <= 1 + math.ceil(math.log2(failed[0]))


@pytest.mark.parametrize(("exc_type", "stage"), [("engine", "score"), ("runtime", "score"), ("runtime", "generate")])
async def test_engine_raising_mid_batch_fails_only_the_affected_items(labeler, test_tasks, figures, exc_type, stage):
    faulty = FaultyEngine(labeler.engine, poison=POISON, stage=stage, exc_type=exc_type)
    # A long batch wait, so that concurrent requests share a batch even on a busy machine.
    srv = LiveServer(Labeler(faulty, test_tasks, max_rationale_tokens=16), batch_wait_ms=1000)
    cot = stage == "generate"
    good = questions(scale(ci=3, full=12), f"fault {stage}")
    ref = [r.distribution for r in await labeler.ascores(score_items(good), "tiny", cot=cot)]
    bodies = [{"task": "tiny", "items": [it], "cot": cot, "cache": False} for it in good]
    bodies.insert(2, {"task": "tiny", "items": [{"context": "fault", "response": POISON}], "cot": cot, "cache": False})
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
            rs = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies))
            poison_faults = list(faulty.failed_batches)
            # A transient fault (the next engine call fails, once) must cost nobody an answer.
            faulty.fail_next = 1
            after = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies[:2] + bodies[3:]))
        transient_faults = faulty.failed_batches[len(poison_faults) :]
        ready = httpx.get(srv.url + "/readyz").status_code
    finally:
        srv.stop()
    bad = rs.pop(2)
    assert bad.status_code == 503 and bad.headers["retry-after"] == "1"
    err = bad.json()
    assert error_shape_ok(err, 503) and err["error"]["type"] == "engine_error"
    assert err["error"]["param"] == "items[0]" and err["error"]["message"].startswith("items[0]: the engine failed: ")
    assert "injected fault" in err["error"]["message"]  # says what failed
    # The poisoned item failed a batch shared with good items, which was split in halves
    # (log2 of the batch in failed calls, not one per item) until it stood alone...
    assert poison_faults[0] > 1 and bisected(poison_faults), poison_faults
    # ...and its batch-mates, and every request after the transient fault, got their own results.
    statuses = Counter(r.status_code for r in rs + after)
    assert statuses == {200: len(rs) + len(after)}, statuses
    tally = Tally()
    for round_ in (rs, after):
        tally.add([d for r in round_ for d in (x["distribution"] for x in r.json()["results"])], ref)
    assert tally.exact, tally
    assert len(transient_faults) == 1 and ready == 200  # one fault, and the server kept serving
    figures.record(
        f"engine-fault-{exc_type}-{stage}",
        faults_injected=faulty.raised,
        failed_calls="/".join(map(str, poison_faults + transient_faults)),
        poisoned_503=int(bad.status_code == 503),
        others_200=statuses[200],
        others_5xx=sum(n for code, n in statuses.items() if code >= 500),
        **tally.figures(),
    )


async def test_an_item_the_model_gives_no_label_is_named_and_set_apart(labeler, test_tasks):
    """NaN log-probs on some items' label reads (a half-precision model that overflowed on
    them) leave no label to read: the error names the first such item by its place among the
    caller's items, whichever reads it took (two orders of a pair, a group's comparisons, a
    rationale's samples), and lists them all. Through the service, the batch it shared is
    split and only its request fails, naming it by that request's index; a request whose
    every item failed names none, but one whose other items came from the cache names it."""
    faulty = FaultyEngine(labeler.engine, poison=POISON, exc_type="nan")
    lab = Labeler(faulty, test_tasks, max_rationale_tokens=4)
    scores = [ScoreItem("Q?", "Apple."), ScoreItem("fault", POISON), ScoreItem("Q?", "Pear.")]
    pairs = [PairItem("Q?", "a", "b"), PairItem("Q?", "c", POISON), PairItem("Q?", "e", POISON)]
    groups = [GroupItem("Q?", ("a", "b")), GroupItem("Q?", ("c", POISON))]
    cases = [
        (lambda: lab.ascores(scores, "tiny"), "items", (1,)),
        (lambda: lab.apreferences(pairs, "tiny", order="both"), "items", (1, 2)),  # reads 2 to 5
        (lambda: lab.agroup_rewards(groups, "tiny"), "groups", (1,)),  # reads 2 and 3
        (lambda: lab.ascores(scores, "tiny", cot=True, samples=2, seed=1), "items", (1,)),  # reads 2 and 3
    ]
    for call, name, bad in cases:
        with pytest.raises(ModelOutputError) as caught:
            await call()
        assert (caught.value.field, caught.value.items) == (f"{name}[{bad[0]}]", bad), caught.value
        assert str(caught.value) == f"{name}[{bad[0]}]: the model put zero probability on every label"

    srv = LiveServer(lab, batch_wait_ms=1000)  # one batch for the requests
    good = [{"context": "Q?", "response": "Apple."}, {"context": "Q?", "response": "Pear."}]
    poisoned = [{"context": "fault", "response": POISON}, {"context": "fault 2", "response": POISON}]
    bodies = [
        {"task": "tiny", "items": good, "cache": False},
        {"task": "tiny", "items": [good[0], poisoned[0]], "cache": False},
        {"task": "tiny", "items": [good[1]], "cache": False},
        {"task": "tiny", "items": poisoned, "cache": False},
    ]
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
            rs = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies))
            # Every computed item fails, but the first item is answered from the cache: the
            # model labeled it, so the others failed apart from it, and the first is named.
            cached = await client.post("/v1/scores", json={"task": "tiny", "items": [good[0]]})
            mixed = await client.post("/v1/scores", json={"task": "tiny", "items": [good[0], *poisoned]})
    finally:
        srv.stop()
    assert cached.status_code == 200 and mixed.status_code == 500
    assert (mixed.json()["error"]["param"], mixed.json()["error"]["type"]) == ("items[1]", "model_output_error")
    assert [r.status_code for r in rs] == [200, 500, 200, 500]
    named, unnamed = rs[1].json(), rs[3].json()
    assert error_shape_ok(named, 500) and error_shape_ok(unnamed, 500)
    assert (named["error"]["type"], named["error"]["param"]) == ("model_output_error", "items[1]")
    label = "the model's answer gives no label: "
    # The request's own index, once; not the batch's.
    assert named["error"]["message"] == "items[1]: " + label + "the model put zero probability on every label"
    assert (unnamed["error"]["type"], unnamed["error"]["param"]) == ("model_output_error", None)
    assert unnamed["error"]["message"] == label + "the model put zero probability on every label"
    ref = await labeler.ascores([ScoreItem("Q?", "Apple."), ScoreItem("Q?", "Pear.")], "tiny")
    got = [r["reward"] for r in rs[0].json()["results"] + rs[2].json()["results"]]
    assert got == pytest.approx([r.reward for r in ref] + [ref[1].reward], abs=1e-5)


def test_the_client_sets_aside_only_the_item_the_engine_fails_on(labeler, test_tasks, figures):
    """Through the real client, with on_error="none": one request holding an item the engine
    fails on gives None for that item alone. The server names the item (`items[k]`); the
    client sends the items around it again (their labels were computed and cached while the
    batch was split) and retries the item alone, instead of retrying the whole batch. An
    engine failing on every item names none: that batch is retried whole, then None."""
    faulty = FaultyEngine(labeler.engine, poison=POISON)
    srv = LiveServer(Labeler(faulty, test_tasks))
    good = questions(scale(ci=7, full=31), "aside")
    k = len(good) // 2
    its = [*good[:k], {"context": "fault", "response": POISON}, *good[k:]]
    ref = [r.distribution for r in labeler.scores(score_items(good), "tiny")]
    wire = RecordingTransport()
    srv.start()
    try:
        retry = lc.Retry(max_retries=1, max_retry_after=0)
        with lc.Client(srv.url, transport=wire, retry=retry, batch_size=len(its)) as client:
            got = client.scores(its, "tiny", on_error="none")
            # An engine that fails whatever it is given names no item: the batch is retried
            # whole and then given up, not peeled item by item.
            faulty.fail_next = 10_000
            sent = len(wire.log)
            down = client.scores(questions(4, "all fail"), "tiny", on_error="none")
            faulty.fail_next = 0
            whole = [status for _, status, _ in wire.log[sent:]]
    finally:
        srv.stop()
    assert down == [None] * 4 and whole == [503, 503], whole
    assert got[k] is None and all(g is not None for i, g in enumerate(got) if i != k)
    tally = Tally()
    tally.add([g.distribution for i, g in enumerate(got) if i != k], ref)
    assert tally.exact, tally
    statuses = [status for _, status, _ in wire.log[:sent]]
    # The whole batch once (503 naming the item), the items before it, the item alone and
    # its one retry, the items after it.
    assert statuses == [503, 200, 503, 503, 200], statuses
    assert all(g.cached for i, g in enumerate(got) if i != k)  # computed once, in the first request
    figures.record(
        "engine-fault-client-set-aside",
        items=len(its),
        requests=len(statuses),
        status_503=statuses.count(503),
        none_items=sum(g is None for g in got),
        all_failing_requests=len(whole),
        faults_injected=faulty.raised,
        **tally.figures(),
    )


def test_metrics_count_what_a_request_failed_by_one_item_computed(labeler, test_tasks):
    """One item the engine fails on fails its request (503), but its batch-mates were computed
    and cached while the batch was split: they count as engine items, each engine call of the
    split is one observed batch, and every lookup counts as a miss. A second request gets
    them from the cache."""
    faulty = FaultyEngine(labeler.engine, poison=POISON)
    srv = LiveServer(Labeler(faulty, test_tasks))
    good = questions(3, "counted")
    names = {
        "engine": 'labeler_items_total{kind="score",source="engine"}',
        "cache": 'labeler_items_total{kind="score",source="cache"}',
        "misses": "labeler_cache_misses_total",
        "hits": "labeler_cache_hits_total",
        "calls": "labeler_engine_batch_items_count",
    }
    srv.start()
    try:
        before = {k: metric(srv.url, n) for k, n in names.items()}
        calls = faulty.calls
        body = {"task": "tiny", "items": [*good, {"context": "fault", "response": POISON}]}
        failed = httpx.post(srv.url + "/v1/scores", json=body, timeout=300)
        moved = {k: metric(srv.url, n) - before[k] for k, n in names.items()}
        calls = faulty.calls - calls
        again = httpx.post(srv.url + "/v1/scores", json={"task": "tiny", "items": good}, timeout=300)
        hits = {k: metric(srv.url, names[k]) - before[k] for k in ("cache", "hits")}
    finally:
        srv.stop()
    assert failed.status_code == 503 and failed.json()["error"]["param"] == "items[3]"
    assert moved == {"engine": 3, "cache": 0, "misses": 4, "hits": 0, "calls": calls} and calls > 1
    assert again.status_code == 200 and all(r["cached"] for r in again.json()["results"])
    assert hits == {"cache": 3, "hits": 3}


def test_requests_that_joined_a_failed_computation_count_no_shared_items(labeler, test_tasks):
    """Two requests for the same items, one of which the engine fails on, in one batch window:
    the second joins the first's computations (each good item computed once), both fail, and
    no item was answered, so none counts as shared."""
    from concurrent.futures import ThreadPoolExecutor

    faulty = FaultyEngine(labeler.engine, poison=POISON)
    srv = LiveServer(Labeler(faulty, test_tasks), batch_wait_ms=1000)
    body = {"task": "tiny", "items": [*questions(2, "joined"), {"context": "fault", "response": POISON}]}
    names = {
        "engine": 'labeler_items_total{kind="score",source="engine"}',
        "shared": 'labeler_items_total{kind="score",source="shared"}',
    }
    srv.start()
    try:
        before = {k: metric(srv.url, n) for k, n in names.items()}
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: httpx.post(srv.url + "/v1/scores", json=body, timeout=300), range(2)))
        moved = {k: metric(srv.url, n) - before[k] for k, n in names.items()}
    finally:
        srv.stop()
    assert [a.status_code for a in answers] == [503, 503]
    assert moved == {"engine": 2, "shared": 0}


async def test_engine_unavailable_fails_the_whole_batch_at_once(labeler, test_tasks, figures):
    """An engine that is down (EngineUnavailable) fails every waiter of the batch with one
    call: no bisection, no retry per item. Once it is back, the same requests are answered."""
    faulty = FaultyEngine(labeler.engine, exc_type="unavailable")
    srv = LiveServer(Labeler(faulty, test_tasks), batch_wait_ms=1000)
    items = questions(scale(ci=6, full=16), "outage")
    ref = [r.distribution for r in await labeler.ascores(score_items(items), "tiny")]
    bodies = [{"task": "tiny", "items": [it], "cache": False} for it in items]
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
            calls_before = faulty.calls
            faulty.fail_next = len(items)  # enough for a call per item, which a per-item retry would make
            down = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies))
            calls = faulty.batches[calls_before:]
            metrics = (await client.get("/metrics")).text.splitlines()
            faulty.fail_next = 0  # the engine is back
            back = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies))
    finally:
        srv.stop()
    for r in down:
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert error_shape_ok(r.json(), 503) and r.json()["error"]["type"] == "engine_unavailable"
    # One engine call per batch, each failed, every item in exactly one of them; and the
    # batcher did put several requests' items in one batch, so per-item calls would show.
    assert faulty.failed_batches == calls and sum(calls) == len(items) and max(calls) > 1, calls
    inflight = [float(line.split()[1]) for line in metrics if line.startswith("labeler_inflight_items ")]
    assert inflight == [0.0]  # the failed batches left the gauge too
    assert [r.status_code for r in back] == [200] * len(back)
    tally = Tally()
    tally.add([r.json()["results"][0]["distribution"] for r in back], ref)
    assert tally.exact, tally
    figures.record(
        "engine-unavailable",
        requests=len(down),
        unavailable_503=sum(r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable" for r in down),
        engine_calls=len(calls),
        items_per_call="/".join(map(str, calls)),
        after_200=sum(r.status_code == 200 for r in back),
        **tally.figures(),
    )


# -- the server killed during a client batch ------------------------------------------------------------
class _SlowEngine:
    """The engine, each label read taking `delay_s` more, and waiting for `gate` when one is
    set; `reading` is set when a read starts, `calls` counts them."""

    def __init__(self, engine, delay_s: float) -> None:
        self.engine, self.delay_s, self.reading = engine, delay_s, threading.Event()
        self.gate: threading.Event | None = None
        self.calls = 0

    def __getattr__(self, name: str):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    async def score(self, requests):
        self.calls += 1
        self.reading.set()
        await asyncio.sleep(self.delay_s)
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 120)
        return await self.engine.score(requests)


def test_a_request_cut_by_the_end_of_a_graceful_shutdown_is_a_503_to_retry(labeler, test_tasks):
    """uvicorn cancels the requests still running when its graceful shutdown ends (here 1 s,
    the engine call taking 4 s): the request gets a 503 engine_unavailable with Retry-After,
    which clients retry (on another replica, or this one restarted), not uvicorn's plain
    500, which they take for final."""
    slow = _SlowEngine(labeler.engine, 4.0)
    srv = LiveServer(Labeler(slow, test_tasks), grace_s=1)
    srv.start()
    answer: list[httpx.Response] = []
    try:
        body = {"task": "tiny", "items": [{"context": "Cut at shutdown?", "response": "Yes."}], "cache": False}
        sender = threading.Thread(
            target=lambda: answer.append(httpx.post(srv.url + "/v1/scores", json=body, timeout=60))
        )
        sender.start()
        assert slow.reading.wait(60), "the request's engine call did not start"
        srv.stop()
        sender.join(60)
    finally:
        srv.stop()
    (resp,) = answer
    assert resp.status_code == 503, resp.text
    assert error_shape_ok(resp.json(), 503) and resp.json()["error"]["type"] == "engine_unavailable"
    assert resp.headers["retry-after"] == "5"


def test_an_item_in_flight_is_joined_without_waiting_for_the_render_thread(labeler, test_tasks):
    """A request for an item another request is computing joins that computation before its
    own items are rendered: with the labeler's render thread busy (a large miss batch being
    prepared), it is answered when the computation ends, as shared, and the item is computed
    once."""
    engine = _SlowEngine(labeler.engine, 0.0)
    gate = threading.Event()
    engine.gate = gate
    lab = Labeler(engine, test_tasks)
    srv = LiveServer(lab)
    srv.start()
    busy = threading.Event()
    answers: dict[str, httpx.Response] = {}
    body = {"task": "tiny", "items": [{"context": "Joined?", "response": "Yes."}]}

    def ask(name: str) -> None:
        answers[name] = httpx.post(srv.url + "/v1/scores", json=body, timeout=120)

    try:
        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert engine.reading.wait(60), "the first request's engine call did not start"
        lab._render.submit(busy.wait, 120)  # the render thread taken, as by a large miss batch
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        # Its cache lookup counted: it has joined (or waits to render), in the same step of the loop.
        wait_for(lambda: metric(srv.url, "labeler_cache_misses_total") == 2, 30, "the second request's lookup")
        gate.set()
        first.join(60)
        second.join(30)
        assert not second.is_alive(), "the second request waited for the render thread"
    finally:
        gate.set()
        busy.set()
        srv.stop()
    assert answers["first"].json()["usage"] == {"items": 1, "cached": 0, "computed": 1, "shared": 0}
    assert answers["second"].json()["usage"] == {"items": 1, "cached": 0, "computed": 0, "shared": 1}
    assert answers["second"].json()["results"] == answers["first"].json()["results"]
    assert engine.calls == 1


def test_an_engine_that_died_for_good_fails_the_health_checks(labeler, test_tasks):
    """An engine whose `failure` is set (vLLM's engine process died: every request would fail
    until a restart) makes /healthz and /readyz answer 503 engine_failed, so a liveness
    probe restarts the server and a readiness probe or a proxy's health check sends traffic
    elsewhere; before that, both answer 200."""
    engine = _SlowEngine(labeler.engine, 0.0)
    srv = LiveServer(Labeler(engine, test_tasks))
    srv.start()
    try:
        assert [httpx.get(srv.url + path).status_code for path in ("/healthz", "/readyz")] == [200, 200]
        engine.failure = "the vLLM engine process died (its log says why)"
        for path in ("/healthz", "/readyz"):
            resp = httpx.get(srv.url + path)
            assert resp.status_code == 503 and error_shape_ok(resp.json(), 503), resp.text
            assert resp.json()["error"]["type"] == "engine_failed"
            assert (
                resp.json()["error"]["message"] == "the vLLM engine process died (its log says why); restart the server"
            )
    finally:
        srv.stop()


def test_a_server_whose_engine_died_for_good_exits_for_its_restart_policy(labeler, test_tasks, caplog):
    """`labeler serve`'s server (`run_server`, real uvicorn on loopback) serves while its
    engine lives, and ends by itself with status ENGINE_FAILED once the engine's `failure`
    is set, the reason logged: Docker's restart policy restarts a container whose process
    exited, not one that is merely unhealthy."""
    from service.app import create_app
    from service.cli import ENGINE_FAILED, run_server
    from service.settings import Settings
    from tests.fixtures.redis import free_port

    class Watched(_SlowEngine):
        """The engine, counting how often its failure is read (the server polls it)."""

        reads, _failure = 0, None

        @property
        def failure(self) -> str | None:
            self.reads += 1
            return self._failure

        @failure.setter
        def failure(self, value: str | None) -> None:
            self._failure = value

    engine = Watched(labeler.engine, 0.0)
    settings = Settings(host="127.0.0.1", port=free_port(), log_level="warning")
    app = create_app(settings, labeler=Labeler(engine, test_tasks))
    status: list[int] = []
    runner = threading.Thread(target=lambda: status.append(run_server(app, settings, grace_s=5, poll_s=0.1)))
    runner.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_for(lambda: _answers(url + "/readyz") == 200, 60, "the server to be ready")
        reads = engine.reads
        wait_for(lambda: engine.reads >= reads + 5, 30, "five polls of a live engine")  # it keeps serving
        assert runner.is_alive()
        body = {"task": "tiny", "items": [{"context": "Alive?", "response": "Yes."}], "cache": False}
        assert httpx.post(url + "/v1/scores", json=body, timeout=60).status_code == 200
        engine.failure = "the vLLM engine process died (its log says why)"
        runner.join(30)
        assert not runner.is_alive(), "the server kept running on a dead engine"
    finally:
        if runner.is_alive():  # only when a step above failed: the failure flag stops the server
            engine.failure = "stopping the test's server"
            runner.join(30)
    assert status == [ENGINE_FAILED]
    assert _answers(url + "/healthz") is None  # nothing listens any more
    assert any(
        "the vLLM engine process died (its log says why): shutting down (exit status 4)" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def _answers(url: str) -> int | None:
    """The status `url` answers with, or None when nothing answers."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_a_200_whose_body_never_arrives_whole_is_no_answer_on_the_wire_log():
    """What "answered" counts in the kill scenarios below: a server that dies after sending
    a 200's headers but before its body leaves the request failed, not answered (the client
    sends it again, and that second answer is the request's one)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one_cut_answer() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:  # read the whole request: a close with unread bytes is a reset
                request += conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"res')

    server = threading.Thread(target=serve_one_cut_answer)
    server.start()
    transport = RecordingTransport()
    try:
        with httpx.Client(transport=transport) as client, pytest.raises(httpx.TransportError):
            client.get(f"http://127.0.0.1:{port}/v1/tasks")
    finally:
        server.join(10)
        listener.close()
    assert (transport.answered(), transport.failed()) == (0, 1), transport.log


def test_server_killed_and_restarted_during_a_client_batch(labeler, tmp_path, figures):
    kills = scale(ci=1, full=3)
    n = scale(ci=24, full=128)
    items = questions(n, "kill")
    ref = [r.distribution for r in labeler.scores(score_items(items), "tiny")]
    srv = ServeProcess(tmp_path / "serve.log", "--log-level", "warning")
    srv.start()
    transport = RecordingTransport()
    client = lc.Client(
        srv.url,
        batch_size=4,
        max_concurrency=2,
        transport=transport,
        # Retries that outlast any restart ServeProcess.start allows (180 s).
        retry=lc.Retry(max_retries=600, backoff=0.2, max_backoff=1.0),
    )
    done = threading.Event()
    cuts: list[tuple[float, float]] = []  # (killed, ready again), monotonic

    def crash_and_restart() -> None:
        for _ in range(kills):
            since = cuts[-1][1] if cuts else 0.0
            # Part of the batch answered since the last start: the kill lands mid-batch.
            wait_for(lambda s=since: transport.answered(s) or done.is_set(), 600, "an answer since the server started")
            if done.is_set():
                return
            killed = time.monotonic()
            srv.kill()
            srv.start()
            cuts.append((killed, time.monotonic()))

    killer = threading.Thread(target=crash_and_restart, daemon=True)
    try:
        killer.start()
        got = client.scores(items, "tiny", cache=False)
    finally:
        # Also when the batch failed: the killer stops before it would start the server again.
        done.set()
        killer.join(timeout=240)
        client.close()
        srv.stop()
    assert not killer.is_alive()
    # Every kill landed mid-batch, as seen on the wire: answers came since the previous start
    # and before the kill, the client met the outage, and answers came after the restart.
    starts = [0.0] + [ready for _, ready in cuts]
    ends = [killed for killed, _ in cuts[1:]] + [math.inf]
    before = [transport.answered(s, k) for s, (k, _) in zip(starts, cuts, strict=False)]
    cut = [transport.failed(k, r) for k, r in cuts]
    after = [transport.answered(r, e) for (_, r), e in zip(cuts, ends, strict=True)]
    assert len(cuts) == kills and min(before) > 0 and min(cut) > 0 and min(after) > 0, (before, cut, after)
    # Exactly once, in order: one result per item, each the item's own; one answer per request.
    tally = Tally()
    tally.add([g.distribution if g is not None else None for g in got], ref)
    assert tally.exact, tally
    assert transport.answered() == math.ceil(n / 4)
    figures.record(
        "server-killed-during-client-batch",
        kills=len(cuts),
        mid_batch_kills=sum(b > 0 and c > 0 and a > 0 for b, c, a in zip(before, cut, after, strict=True)),
        items=n,
        answered_before_kills=sum(before),
        answered_after_restarts=sum(after),
        connection_errors_retried=transport.failed(),
        requests_200=transport.answered(),
        **tally.figures(),
    )
