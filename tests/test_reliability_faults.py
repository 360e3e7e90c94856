"""Faults, survived for real: Redis stopped and restarted under load, the engine raising
mid-batch, the server killed (SIGKILL) and restarted during a client batch.

Companions elsewhere, counted in docs/RELIABILITY.md: test_service.py's Redis outage
between requests and test_client.py's graceful restart during a client batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import labeler_client as lc
import pytest

from labeler import Labeler, ScoreItem
from tests.fixtures.faults import FaultyEngine
from tests.fixtures.load import RecordingTransport, drive, error_shape_ok, metric
from tests.fixtures.process import ServeProcess
from tests.fixtures.reliability import scale
from tests.fixtures.server import LiveServer

pytestmark = [pytest.mark.model, pytest.mark.reliability]

POISON = "POISON-7f3a"


# -- Redis ---------------------------------------------------------------------------------------
async def test_redis_stopped_and_restarted_under_load(make_server, redis_server, figures):
    outages = scale(ci=2, full=6)
    srv = make_server(redis_url=redis_server.url, redis_cooldown=0.3, batch_wait_ms=2)
    tag = uuid.uuid4().hex[:8]

    def body(i: int) -> dict:
        # Mostly items the cache answers while Redis is up (and the engine while it is down),
        # and every 4th request one that only the engine can answer.
        items = [{"context": "redis under load", "response": f"repeat {i % 16}"}]
        return {"task": "tiny", "items": items + ([{"response": f"fresh {tag} {i}"}] if i % 4 == 0 else [])}

    warm = {"task": "tiny", "items": [{"context": "redis under load", "response": f"repeat {i}"} for i in range(16)]}
    assert httpx.post(srv.url + "/v1/scores", json=warm, timeout=120).status_code == 200
    stop = asyncio.Event()
    windows: list[tuple[float, float]] = []  # while Redis was down

    async def bounce_redis() -> None:
        try:
            for _ in range(outages):
                await asyncio.sleep(2.0)
                await asyncio.to_thread(redis_server.stop)
                down = time.monotonic()
                await asyncio.sleep(2.0)
                await asyncio.to_thread(redis_server.start)
                windows.append((down, time.monotonic()))
            await asyncio.sleep(1.0)
        finally:
            stop.set()

    load = asyncio.create_task(
        drive(
            srv.url,
            "/v1/scores",
            body,
            total=scale(2000, 20000),
            concurrency=8,
            timeout=60,
            deadline=scale(120, 600),
            stop=stop,
        )
    )
    await bounce_redis()
    report = await load
    assert report.sent > 0 and report.statuses == {200: report.sent}, report  # 0 failed label requests
    assert report.results_missing == 0 and report.hung == 0 and not report.errors
    # Under load: requests were in flight while Redis was down, in every outage.
    during = [sum(1 for t0, t1, _ in report.spans if t0 <= b and t1 >= a) for a, b in windows]
    assert len(during) == outages and min(during) >= 1, during
    errors = metric(srv.url, "labeler_cache_errors_total")
    assert errors > 0  # the outages were noticed (and bypassed), not missed

    # Redis is back and used again: a new item is written, then read back from it.
    time.sleep(0.5)  # past the cooldown
    item = {"task": "tiny", "items": [{"response": f"after {tag}"}]}
    assert httpx.post(srv.url + "/v1/scores", json=item, timeout=60).json()["results"][0]["cached"] is False
    assert httpx.post(srv.url + "/v1/scores", json=item, timeout=60).json()["results"][0]["cached"] is True
    assert httpx.get(srv.url + "/readyz").json()["cache_status"] == "ok"
    figures.record(
        "redis-outages-under-load",
        outages=outages,
        requests=report.sent,
        in_flight_while_down=sum(during),
        failed=0,
        items_lost=report.results_missing,
        cache_errors_bypassed=int(errors),
        cache_hits=int(metric(srv.url, "labeler_cache_hits_total")),
    )


# -- the engine raising mid-batch -------------------------------------------------------------------
@pytest.mark.parametrize(("exc_type", "stage"), [("engine", "score"), ("runtime", "score"), ("runtime", "generate")])
async def test_engine_raising_mid_batch_fails_only_the_affected_items(labeler, test_tasks, figures, exc_type, stage):
    faulty = FaultyEngine(labeler.engine, poison=POISON, stage=stage, exc_type=exc_type)
    srv = LiveServer(Labeler(faulty, test_tasks, max_rationale_tokens=16), batch_wait_ms=300)
    srv.start()
    try:
        cot = stage == "generate"
        good = [{"context": f"fault {i}", "response": f"answer {i}"} for i in range(scale(ci=3, full=12))]
        bodies = [{"task": "tiny", "items": [it], "cot": cot, "cache": False} for it in good]
        poisoned = {"context": "fault", "response": POISON}
        bodies.insert(2, {"task": "tiny", "items": [poisoned], "cot": cot, "cache": False})
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            rs = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies))
        bad = rs.pop(2)
        assert bad.status_code == 503 and bad.headers["retry-after"] == "1"
        err = bad.json()
        assert error_shape_ok(err, 503) and err["error"]["type"] == "engine_error"
        assert "injected fault" in err["error"]["message"]  # says what failed
        assert faulty.failed_batches[0] > 1  # it failed a batch shared with good items...
        ref = await labeler.ascores([ScoreItem(**it) for it in good], "tiny", cot=cot)
        for r, want in zip(rs, ref, strict=True):  # ...and those still answered, correctly
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["distribution"] == pytest.approx(want.distribution, abs=1e-4)
        # The server keeps serving, and a transient fault (one failed call) costs nobody an answer.
        faulty.fail_next = 1
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            after = await asyncio.gather(*(client.post("/v1/scores", json=b) for b in bodies[:2] + bodies[3:]))
        assert [r.status_code for r in after] == [200] * len(after)
        assert httpx.get(srv.url + "/readyz").status_code == 200
    finally:
        srv.stop()
    figures.record(
        f"engine-fault-{exc_type}-{stage}",
        faults_injected=faulty.raised,
        failed_batch=faulty.failed_batches[0],
        poisoned_503=1,
        others_200=len(rs) + len(after),
        items_lost=0,
    )


# -- the server killed during a client batch ------------------------------------------------------------
def test_server_killed_and_restarted_during_a_client_batch(labeler, tmp_path, figures):
    kills = scale(ci=1, full=3)
    n = scale(ci=24, full=128)
    items = [
        {"context": f"Question {i}: what is {i} times 3?", "response": f"It is {3 * i + i % 2}."} for i in range(n)
    ]
    ref = labeler.scores([ScoreItem(**it) for it in items], "tiny")
    # Items whose answers differ, so that a result given to the wrong item would show.
    assert len({tuple(round(p, 4) for p in r.distribution) for r in ref}) == n
    srv = ServeProcess(tmp_path / "serve.log", "--log-level", "warning")
    srv.start()
    transport = RecordingTransport()
    client = lc.Client(
        srv.url,
        batch_size=4,
        max_concurrency=2,
        transport=transport,
        retry=lc.Retry(max_retries=200, backoff=0.2, max_backoff=1.0),
    )
    done = threading.Event()
    killed_mid_batch: list[bool] = []

    def crash_and_restart() -> None:
        for _ in range(kills):
            time.sleep(1.0)
            killed_mid_batch.append(not done.is_set())
            srv.kill()
            srv.start()

    killer = threading.Thread(target=crash_and_restart)
    try:
        killer.start()
        got = client.scores(items, "tiny", cache=False)
        done.set()
        killer.join()
    finally:
        client.close()
        srv.stop()
    assert killed_mid_batch == [True] * kills  # every kill landed while the batch was running
    errors = [s for _, s, _ in transport.log if isinstance(s, str)]
    assert errors  # the client did see the crash, and went on
    # Exactly once, in order: one result per item, each the item's own.
    assert len(got) == n and all(g is not None for g in got)
    for g, want in zip(got, ref, strict=True):
        assert g.distribution == pytest.approx(want.distribution, abs=1e-4)
    figures.record(
        "server-killed-during-client-batch",
        kills=kills,
        items=n,
        connection_errors_retried=len(errors),
        results=len(got),
        items_lost=0,
        duplicates=0,
    )
