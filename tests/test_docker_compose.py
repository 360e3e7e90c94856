"""docker/docker-compose.yml run for real (Redis + the labeler on the CPU image), only image
names swapped for the local stand-ins: health, answers equal to the in-process labeler's,
the Redis cache across restarts and outages, the process user, graceful stop. Everything
goes through the published port with the real client (or httpx), and `docker` itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import httpx
import labeler_client as lc
import pytest

from tests.fixtures.load import metric

pytestmark = pytest.mark.docker

TASK = "general"
PAIRS = [
    {"context": "What is 2 + 2?", "response_a": "4", "response_b": "5"},
    {"context": "Name a primary color.", "response_a": "Blue.", "response_b": "A bicycle."},
]
SCORES = [
    {"context": "What is the capital of France?", "response": "Paris."},
    {"context": "How many legs does a spider have?", "response": "Eight."},
]
ONE_RETRY_FREE = lc.Retry(max_retries=0)


def started_at(stack, cid: str) -> float:
    """A container's State.StartedAt as a Unix time (Docker prints nanoseconds; keep micro)."""
    text = stack.inspect(cid, "{{.State.StartedAt}}")
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


def wait_cache_status(stack, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := stack.wait_ready()["cache_status"]) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz cache_status stayed {status!r}, wanted {want!r}")
        time.sleep(0.5)


def start_labeler(stack, figures, name: str, up: Callable[[], object]) -> str:
    """Run `up`, then time the labeler: start → /readyz 200 → Docker reports it healthy."""
    t0 = time.monotonic()
    up()
    ready = stack.wait_ready()
    t_ready = time.monotonic()
    [cid] = stack.wait_healthy("labeler")
    t_healthy, wall_healthy = time.monotonic(), time.time()
    figures.record(
        name,
        up_to_ready_s=t_ready - t0,
        up_to_healthy_s=t_healthy - t0,
        container_start_to_healthy_s=wall_healthy - started_at(stack, cid),
        cache=ready["cache"],
        up_waited_for_slow_start=stack.up_retries,
    )
    return cid


@pytest.fixture(scope="module")
def box(make_stack, docker_figures):
    """The one-box stack, up and healthy (cold: fresh containers and a fresh Redis volume)."""
    stack = make_stack("docker-compose.yml")
    start_labeler(stack, docker_figures, "compose up (new containers, empty volume) → labeler healthy", stack.up)
    return stack


@pytest.fixture(scope="module")
def client(box):
    with lc.Client(box.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def reference(live_server):
    """The in-process labeler (the session model under uvicorn on the host), cache off."""
    with lc.Client(live_server.url, timeout=300) as ref:
        yield {
            "pairs": ref.preferences(PAIRS, TASK, cache=False),
            "scores": ref.scores(SCORES, TASK, cache=False),
            "reward": httpx.post(
                live_server.url + "/get_reward", json=reward_body(), params={"task": TASK}, timeout=300
            ).json(),
        }


def reward_body() -> dict:
    return {"query": [s["context"] + " " + s["response"] for s in SCORES], "prompts": [s["context"] for s in SCORES]}


def assert_scores_equal(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.distribution == pytest.approx(w.distribution, abs=1e-4)
        assert g.reward == pytest.approx(w.reward, abs=1e-4)


def test_up_reports_both_services_healthy(box):
    for service in ("redis", "labeler"):
        [cid] = box.containers(service)
        assert box.health(cid) == "healthy", service
    ready = httpx.get(box.url + "/readyz", timeout=10).json()
    assert ready["status"] == "ready" and ready["cache"] == "redis" and ready["cache_status"] == "ok"
    # Redis persists through its append-only file alone: no snapshot forks under load.
    [redis] = box.containers("redis")
    config = box.engine.docker("exec", redis, "redis-cli", "CONFIG", "GET", "*").stdout.split("\n")
    settings = dict(zip(config[::2], config[1::2], strict=False))
    assert settings["appendonly"] == "yes" and settings["save"] == "", settings


def test_labels_equal_the_in_process_labeler_and_repeat_from_cache(box, client, reference):
    pairs = client.preferences(PAIRS, TASK)
    for g, w in zip(pairs, reference["pairs"], strict=True):
        assert not g.cached
        for key in ("p_a", "p_a_ab", "p_a_ba"):
            assert getattr(g, key) == pytest.approx(getattr(w, key), abs=1e-4), key
    scores = client.scores(SCORES, TASK)
    assert not any(s.cached for s in scores)
    assert_scores_equal(scores, reference["scores"])
    reward = httpx.post(box.url + "/get_reward", json=reward_body(), params={"task": TASK}, timeout=300).json()
    assert reward["rewards"] == pytest.approx(reference["reward"]["rewards"], abs=1e-4)
    # The same items again: cache hits, same numbers.
    again = client.preferences(PAIRS, TASK)
    assert all(g.cached for g in again)
    assert [g.p_a for g in again] == [g.p_a for g in pairs]
    scores_again = client.scores(SCORES, TASK)
    assert all(s.cached for s in scores_again)
    assert_scores_equal(scores_again, reference["scores"])


def test_api_process_runs_as_non_root(box):
    [cid] = box.containers("labeler")
    status = box.engine.docker("exec", cid, "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == ["10001"] * 4
    cmdline = box.engine.docker("exec", cid, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert any(part.endswith("labeler") for part in cmdline) and "serve" in cmdline


def test_labeler_restart_keeps_the_cache(box, client, reference, docker_figures):
    client.scores(SCORES, TASK)  # cached from here on (computed now if not yet)
    [cid] = box.containers("labeler")
    start_labeler(
        box, docker_figures, "labeler restart → healthy", lambda: box.engine.docker("restart", cid, timeout=120)
    )
    scores = client.scores(SCORES, TASK)
    assert all(s.cached for s in scores)
    assert_scores_equal(scores, reference["scores"])


def test_redis_down_requests_still_answer_and_cache_returns_with_it(box, client, reference):
    client.scores(SCORES, TASK)
    [redis] = box.containers("redis")
    fresh = [{"context": "Is ice cold?", "response": "Yes, ice is frozen water."}]
    box.engine.docker("stop", redis, timeout=60)
    try:
        for _ in range(2):  # bypassed: answered, and nothing stored
            [got] = client.scores(fresh, TASK, on_error="raise")
            assert got is not None and not got.cached
        scores = client.scores(SCORES, TASK)
        assert not any(s.cached for s in scores)
        assert_scores_equal(scores, reference["scores"])
        assert httpx.get(box.url + "/readyz", timeout=10).json()["cache_status"] == "bypassed"
    finally:
        box.engine.docker("start", redis, timeout=60)
    box.wait_healthy("redis")
    wait_cache_status(box, "ok")
    # Redis kept its data (append-only file): earlier items are hits again, new ones get stored.
    assert all(s.cached for s in client.scores(SCORES, TASK))
    [first] = client.scores(fresh, TASK)
    [second] = client.scores(fresh, TASK)
    assert not first.cached and second.cached and second.reward == first.reward


def test_down_then_up_keeps_the_cache(box, client, reference, docker_figures):
    client.scores(SCORES, TASK)
    box.down(volumes=False)
    assert box.containers("labeler", all=True) == [] and box.containers("redis", all=True) == []
    start_labeler(box, docker_figures, "compose up (after down, image and volume kept) → labeler healthy", box.up)
    scores = client.scores(SCORES, TASK)
    assert all(s.cached for s in scores)
    assert_scores_equal(scores, reference["scores"])


def test_docker_stop_lets_an_in_flight_request_finish(box, live_server, docker_figures):
    """SIGTERM while a request computes: uvicorn stops taking connections, finishes the
    request, and exits 0. The signal is sent as `docker stop` sends it (the image's stop
    signal), then the container is waited for, so the test sees that the request was still
    running once the signal had landed. (The last test here: it leaves the labeler stopped.)"""
    items = [{"context": f"Question: what is {k} + {k}?", "response": f"It is {2 * k}."} for k in range(6)]
    with lc.Client(live_server.url, timeout=300) as ref:
        want = ref.scores(items, TASK, cache=False)
    [cid] = box.containers("labeler")
    result: dict = {}

    def request() -> None:
        with lc.Client(box.url, timeout=300, retry=ONE_RETRY_FREE, batch_size=len(items)) as c:
            t0 = time.monotonic()
            try:
                result["scores"] = c.scores(items, TASK, cache=False)
            except lc.LabelerClientError as exc:
                result["error"] = exc
            result["done"] = time.monotonic()
            result["seconds"] = result["done"] - t0

    worker = threading.Thread(target=request)
    worker.start()
    deadline = time.monotonic() + 60
    while metric(box.url, "labeler_inflight_items") < 1:
        assert time.monotonic() < deadline and worker.is_alive(), "the request never showed in flight"
        time.sleep(0.05)
    t_stop = time.monotonic()
    signal = box.inspect(cid, "{{.Config.StopSignal}}") or "SIGTERM"
    box.engine.docker("kill", "--signal", signal, cid)
    running_at_signal = "done" not in result  # the signal landed while the request computed
    box.engine.docker("wait", cid, timeout=120)  # within the compose file's grace period (90 s)
    t_stopped = time.monotonic()
    worker.join(timeout=120)
    assert running_at_signal, result
    assert "error" not in result, result.get("error")
    assert_scores_equal(result["scores"], want)
    exit_code = int(box.inspect(cid, "{{.State.ExitCode}}"))
    assert exit_code == 0
    docker_figures.record(
        "docker stop during a request",
        request_s=result["seconds"],
        stop_s=t_stopped - t_stop,
        exit_code=exit_code,
        items=len(items),
    )
