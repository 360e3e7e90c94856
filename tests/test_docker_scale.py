"""docker/docker-compose.scale.yml run for real on the CPU: nginx → 3 API replicas
(transformers engine, one torch thread each) → one shared Redis, only image names swapped
for the local stand-ins. A replica killed mid-load costs no client call, no result and no
retry (nginx moves its requests on to another replica); a
replica added with `--scale` gets traffic without an nginx restart."""

from __future__ import annotations

import threading
import time

import labeler_client as lc
import pytest

from tests.fixtures.load import RecordingTransport

pytestmark = pytest.mark.docker

TASK = "general"
REPLICAS = 3
N_ITEMS = 18
ITEMS = [
    {"context": f"Question {i}: what is {i} times 3?", "response": f"It is {3 * i + i % 2}."} for i in range(N_ITEMS)
]


def replica_metrics(stack, cid: str) -> tuple[int, int]:
    """(label requests answered, items in flight) of one replica: its own /metrics, read
    inside the container."""
    answered = inflight = 0.0
    routes = ('route="/v1/scores"', 'route="/v1/preferences"', 'route="/get_reward"')
    for line in stack.exec_http(cid, "/metrics").splitlines():
        if line.startswith("labeler_request_seconds_count{") and any(r in line for r in routes):
            answered += float(line.rsplit(" ", 1)[1])
        elif line.startswith("labeler_inflight_items "):
            inflight = float(line.rsplit(" ", 1)[1])
    return int(answered), int(inflight)


def memory_mib(stack, cid: str) -> float:
    usage = stack.engine.docker("stats", "--no-stream", "--format", "{{.MemUsage}}", cid).stdout.split("/")[0].strip()
    value, unit = float(usage.rstrip("KMGiB")), usage.lstrip("0123456789.")
    return value * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "B": 1 / 2**20}[unit]


@pytest.fixture(scope="module")
def scaled(make_stack, docker_figures):
    stack = make_stack("docker-compose.scale.yml", LABELER_API_REPLICAS=str(REPLICAS), LABELER_API_THREADS="1")
    t0 = time.monotonic()
    stack.up()
    stack.wait_healthy("api", REPLICAS)
    stack.wait_healthy("nginx")
    stack.wait_ready()
    replicas = stack.containers("api")
    docker_figures.record(
        "scale-out up → 3 replicas and nginx healthy",
        seconds=time.monotonic() - t0,
        replicas=len(replicas),
        replica_mib=max(memory_mib(stack, c) for c in replicas),
        up_waited_for_slow_start=stack.up_retries,
    )
    return stack


@pytest.fixture(scope="module")
def reference(live_server):
    with lc.Client(live_server.url, timeout=300) as ref:
        want = ref.scores(ITEMS, TASK, cache=False)
    # Every item's numbers differ, so a result handed to the wrong item would show.
    assert len({tuple(round(p, 4) for p in w.distribution) for w in want}) == N_ITEMS
    return want


def test_replica_killed_mid_load_no_failed_call_no_lost_result(scaled, reference, docker_figures):
    replicas = scaled.containers("api")
    assert len(replicas) == REPLICAS
    transport = RecordingTransport()
    client = lc.Client(
        scaled.url,
        timeout=300,
        batch_size=2,
        max_concurrency=3,
        transport=transport,
        retry=lc.Retry(max_retries=10, backoff=0.2, max_backoff=2.0),
    )
    done = threading.Event()
    kill: dict = {}

    def kill_when_busy() -> None:
        # Kill the first replica seen computing: it dies with a request in flight, while the
        # load is on. nginx starts each request at a random replica, so any given one may get
        # none of the 9 requests; one of the three is always busy while the load runs. Each
        # poll is a `docker exec`, so a narrower condition (answered one and computing
        # another) can fall between two polls.
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            for cid in replicas:
                _, inflight = replica_metrics(scaled, cid)
                if inflight >= 1:
                    kill["at"] = time.monotonic()
                    kill["inflight"] = inflight
                    kill["victim"] = cid
                    scaled.engine.docker("kill", cid)
                    kill["mid_load"] = not done.is_set()  # the load still ran once the kill had landed
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_busy)
    t0 = time.monotonic()
    try:
        killer.start()
        got = client.scores(ITEMS, TASK)
        seconds = time.monotonic() - t0
        done.set()
        killer.join(timeout=60)
        survivors = [c for c in scaled.containers("api") if c != kill.get("victim")]
        served = [replica_metrics(scaled, c)[0] for c in survivors]
        # The same items again: every one was stored once and comes back from the cache.
        again = client.scores(ITEMS, TASK)
    finally:
        done.set()
        client.close()
    assert kill.get("mid_load"), "the replica was not killed while the load ran"
    missing = sum(g is None for g in got)
    # A result that matches another item's numbers, not its own: lost or handed twice.
    misplaced = sum(
        g is not None and g.distribution != pytest.approx(w.distribution, abs=1e-4)
        for g, w in zip(got, reference, strict=True)
    )
    assert len(got) == N_ITEMS and missing == 0 and misplaced == 0
    assert all(a.cached for a in again)
    assert [a.distribution for a in again] == [g.distribution for g in got]
    statuses = [status for t, status, _ in transport.log if t <= t0 + seconds]  # the first pass
    # nginx moves a request whose replica died (cut mid-request, or refusing connections) on
    # to another replica: the client sees every request answered, none to retry.
    assert statuses.count(200) == len(statuses), statuses
    # nginx's error log names each request it moved on: cut while the victim computed it
    # ("... while reading response header from upstream"), or refused at connect.
    nginx_log = scaled.logs("nginx")
    cut = nginx_log.count("while reading response header from upstream")
    refused = nginx_log.count("while connecting to upstream")
    docker_figures.record(
        "scale-out: replica killed mid-load",
        replicas=REPLICAS,
        items=N_ITEMS,
        requests_sent=len(statuses),
        answered_200=statuses.count(200),
        moved_on_by_nginx_cut=cut,
        moved_on_by_nginx_refused=refused,
        results_missing=missing,
        results_misplaced=misplaced,
        kill_after_s=kill["at"] - t0,
        victim_items_in_flight=kill["inflight"],
        load_s=seconds,
        items_per_s=N_ITEMS / seconds,
        label_requests_per_survivor="/".join(map(str, served)),
    )


def test_scale_adds_a_replica_that_gets_traffic_without_nginx_restart(scaled, reference, docker_figures):
    [nginx] = scaled.containers("nginx")
    nginx_started = scaled.inspect(nginx, "{{.State.StartedAt}}")
    # `--scale` counts stopped containers too (it starts them again): one more than all.
    before = set(scaled.containers("api", all=True))
    target = len(before) + 1
    t0 = time.monotonic()
    scaled.up("--scale", f"api={target}")
    healthy = scaled.wait_healthy("api", target)
    t_healthy = time.monotonic()
    [new] = [c for c in healthy if c not in before]
    # Cached items through nginx (cheap) until the new replica has answered some.
    sent = 0
    with lc.Client(scaled.url, timeout=60, batch_size=1) as client:
        while replica_metrics(scaled, new)[0] < 1:
            assert time.monotonic() - t_healthy < 90, f"no traffic reached the new replica after {sent} requests"
            client.scores(ITEMS[sent % N_ITEMS : sent % N_ITEMS + 1], TASK)
            sent += 1
    assert scaled.inspect(nginx, "{{.State.StartedAt}}") == nginx_started
    assert scaled.inspect(nginx, "{{.RestartCount}}") == "0"
    docker_figures.record(
        "scale-out: --scale adds a replica",
        replicas=target,
        up_to_healthy_s=t_healthy - t0,
        healthy_to_first_request_s=time.monotonic() - t_healthy,
        requests_until_it_got_one=sent,
        nginx_restarts=int(scaled.inspect(nginx, "{{.RestartCount}}")),
    )
