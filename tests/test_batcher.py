"""The micro-batcher's logic and the gate's header checks, on scripted engines and ASGI
scopes (no model, no server): single-flight ends when a job is settled, the in-flight gauge
follows the queue, and settings that could never queue a full request are refused."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from labeler.errors import EngineError, EngineUnavailable, LabelerError, ModelOutputError
from service.app import Gate
from service.batcher import BatchFailure, MicroBatcher, QueueFull
from service.metrics import Metrics
from service.settings import Settings
from tests.fixtures.wait import async_wait_for


def test_a_settled_item_is_not_joined_while_the_rest_of_its_batch_runs():
    """[X, Z] fails, is split; X fails alone while Z is still computing. A request for X
    then computes it anew instead of receiving X's old error."""
    calls: list[list[str]] = []
    z_running, z_go = asyncio.Event(), asyncio.Event()
    failures = {"X": 2}  # X fails in the pair and alone, then works

    async def run_group(group, items, keys):
        calls.append(list(items))
        if "X" in items and failures["X"] > 0:
            failures["X"] -= 1
            raise RuntimeError("transient")
        if items == ["Z"]:
            z_running.set()
            await z_go.wait()
        return [f"label of {it}" for it in items]

    async def run() -> None:
        pending: list[int] = []
        batcher = MicroBatcher(run_group, max_items=8, wait_s=0.0, max_pending=100, on_pending=pending.append)
        batcher.start()
        (fx, fz), _ = batcher.submit("g", [("X", "X"), ("Z", "Z")])
        await asyncio.wait_for(z_running.wait(), 5)
        assert isinstance(fx.exception(), EngineError) and not fz.done()
        (again,), shared = batcher.submit("g", [("X", "X")])
        assert shared == 0 and again is not fx
        z_go.set()
        assert await asyncio.wait_for(again, 5) == "label of X" and await fz == "label of Z"
        await batcher.stop()
        assert calls == [["X", "Z"], ["X"], ["Z"], ["X"]] and batcher.splits == 1
        # The gauge's last word is an empty queue, split batch or not.
        assert batcher.pending == 0 and pending == [2, 3, 1, 0]

    asyncio.run(run())


async def one_batch(run_group, items: list[str]) -> list:
    """`items` submitted at once to a batcher of up to 16 items over `run_group`: each
    item's result or error."""
    batcher = MicroBatcher(run_group, max_items=16, wait_s=0.0, max_pending=100)
    batcher.start()
    futures, _ = batcher.submit("g", [(it, it) for it in items])
    done = await asyncio.gather(*futures, return_exceptions=True)
    await batcher.stop()
    return done


def test_an_engine_error_every_part_of_a_batch_repeats_is_not_bisected_down_to_items():
    """A failure that does not depend on the items (a device error): the batch of 16, both
    its halves and the first and last item of each fail alike, and every item gets the error
    after 7 calls, not 31 (as a BatchFailure, which names no item, where not tried alone).
    A failure of one item still splits the batch down to that item; so do two bad items
    whose errors read alike, one in each half, also where they stand first in their halves."""
    calls: list[int] = []

    async def broken(group, items, keys):
        calls.append(len(items))
        raise RuntimeError("CUDA error: device-side assert triggered")

    async def bad(group, items, keys):
        calls.append(len(items))
        if any(it.startswith("bad") for it in items):
            raise RuntimeError("input contains NaN")
        return [f"label of {it}" for it in items]

    got = asyncio.run(one_batch(broken, [f"x{i}" for i in range(16)]))
    assert calls == [16, 8, 8, 1, 1, 1, 1] and all(isinstance(g, EngineError) and "device-side" in str(g) for g in got)
    # The four items tried alone failed alone, and keep their own error; the others name none.
    assert [type(g) is BatchFailure for g in got] == [i not in (0, 7, 8, 15) for i in range(16)]
    calls.clear()
    got = asyncio.run(one_batch(bad, [f"x{i}" for i in range(15)] + ["bad"]))
    assert calls == [16, 8, 8, 4, 4, 2, 2, 1, 1]
    assert [isinstance(g, EngineError) for g in got] == [False] * 15 + [True]
    for first, second in ((5, 12), (0, 8)):
        two = [f"x{i}" for i in range(16)]
        two[first], two[second] = "bad1", "bad2"
        calls.clear()
        got = asyncio.run(one_batch(bad, two))
        assert [isinstance(g, EngineError) for g in got] == [it.startswith("bad") for it in two], (first, got)
        assert not any(isinstance(g, BatchFailure) for g in got)
        # The halves fail alike; an item tried alone does not (x0 at once, else x7 after bad1).
        assert calls[:4] == [16, 8, 8, 1] if first else calls[:5] == [16, 8, 8, 1, 1]


def test_items_the_labeler_names_as_unlabeled_fail_and_the_rest_runs_once_more():
    """A ModelOutputError that lists its items (the labeler found no label for them): those
    items get it, naming no batch index, and the rest of the batch runs again in one call,
    not split in halves down to each bad item."""
    calls: list[int] = []

    async def nan(group, items, keys):
        calls.append(len(items))
        bad = tuple(i for i, it in enumerate(items) if it.startswith("nan"))
        if bad:
            at = f"items[{bad[0]}]"
            raise ModelOutputError(f"{at}: the model put zero probability on every label", field=at, items=bad)
        return [f"label of {it}" for it in items]

    items = [f"x{i}" for i in range(16)]
    items[3], items[11] = "nan1", "nan2"
    got = asyncio.run(one_batch(nan, items))
    assert calls == [16, 14]
    assert [g for g, it in zip(got, items, strict=True) if not it.startswith("nan")] == [
        f"label of {it}" for it in items if not it.startswith("nan")
    ]
    for g in (got[3], got[11]):
        assert isinstance(g, ModelOutputError) and g.field is None
        assert str(g) == "the model put zero probability on every label"


def test_an_item_the_probes_left_in_a_failed_half_runs_again_before_it_gets_an_error():
    """Both halves of [bad1, x1, bad2 | x2, bad3, x3] fail alike, so the batcher tries the
    ends of each half alone: bad1 and bad2 fail, x2 works. x1 was never tried without a bad
    item beside it: it runs again and gets its label, not its half's error."""
    calls: list[list[str]] = []

    async def bad(group, items, keys):
        calls.append(list(items))
        if any(it.startswith("bad") for it in items):
            raise RuntimeError("input contains NaN")
        return [f"label of {it}" for it in items]

    items = ["bad1", "x1", "bad2", "x2", "bad3", "x3"]
    got = asyncio.run(one_batch(bad, items))
    for it, g in zip(items, got, strict=True):
        if it.startswith("bad"):
            assert isinstance(g, EngineError) and "input contains NaN" in str(g), (it, g)
        else:
            assert g == f"label of {it}", (it, g, calls)
    # x1 runs again because its half's probes failed; the other half's probe worked, so its
    # rest holds the bad item and is split at once.
    assert calls == [items, items[:3], items[3:], ["bad1"], ["bad2"], ["x2"], ["x1"], ["bad3"], ["x3"]]


def test_an_item_a_working_probe_left_alone_in_its_half_runs_before_it_gets_an_error():
    """An engine that fails every call of two or more items alike (an error of the batch, no
    item's): [A, B] and [C, D] fail the same way, the probe A works, and B, never run without
    A, runs alone and gets its label instead of its half's error."""
    calls: list[list[str]] = []

    async def batched_only_fails(group, items, keys):
        calls.append(list(items))
        if len(items) > 1:
            raise RuntimeError("forward failed: batched kernel error")
        return [f"label of {it}" for it in items]

    got = asyncio.run(one_batch(batched_only_fails, list("ABCD")))
    assert got == [f"label of {it}" for it in "ABCD"], (got, calls)
    assert calls == [list("ABCD"), ["A", "B"], ["C", "D"], ["A"], ["B"], ["C"], ["D"]]


def test_an_unlabeled_item_alone_in_a_half_names_no_batch_index():
    """[crash, nan] fails on crash and is split: nan alone has no label, and the labeler's
    error names it as the batch's items[0]. Its waiters get the error without that index:
    the request it came in names its own place."""

    async def run_group(group, items, keys):
        if "crash" in items:
            raise RuntimeError("device error")
        at = "items[0]"
        raise ModelOutputError(f"{at}: the model put zero probability on every label", field=at, items=(0,))

    crash, nan = asyncio.run(one_batch(run_group, ["crash", "nan"]))
    assert isinstance(crash, EngineError) and "device error" in str(crash)
    assert isinstance(nan, ModelOutputError) and nan.field is None
    assert str(nan) == "the model put zero probability on every label"


@pytest.mark.parametrize(
    "error", [EngineUnavailable("the engine process died"), EngineError("RuntimeError: device error")]
)
def test_each_request_raises_its_own_copy_of_a_shared_error(error):
    """One error reaches every request that shared the failed items; each request raises a
    copy, so the error's traceback does not gather every request's frames (and their bodies)."""
    from service.serving import _request_error

    for items in (1, 2):
        raised = []
        for _ in range(3):
            try:
                raise _request_error([error] * items, list(range(items)), "items[0]", items)
            except EngineError as exc:
                raised.append(exc)
        assert len({id(e) for e in raised}) == 3 and error not in raised
        assert all(type(e) is type(error) and str(e).endswith(str(error)) for e in raised)
        assert error.__traceback__ is None


def test_a_labeler_that_returns_another_number_of_results_gives_no_item_another_items_result():
    """A labeler bug that drops one item's result from its list: which result is whose is
    then unknown, so that call settles nothing. It is an engine error like any other: the
    batch is split, every other item gets its own result, and the item whose result goes
    missing gets an EngineError. A labeler that is always off by one (too many results here)
    fails every part of a batch alike, so the batch fails as one after the usual probes. The
    batcher goes on serving."""
    calls: list[int] = []

    async def drops_x3(group, items, keys):
        calls.append(len(items))
        return [f"label of {it}" for it in items if it != "x3"]

    async def one_too_many(group, items, keys):
        calls.append(len(items))
        return [f"label of {it}" for it in items] + ["label of nothing"]

    async def run() -> list:
        got = await one_batch(drops_x3, [f"x{i}" for i in range(8)])
        assert await one_batch(drops_x3, ["y"]) == ["label of y"]
        return got

    got = asyncio.run(run())
    assert got[:3] + got[4:] == [f"label of x{i}" for i in range(8) if i != 3]
    assert isinstance(got[3], EngineError) and "another number of results" in str(got[3])
    assert calls == [8, 4, 4, 2, 2, 1, 1, 1]
    calls.clear()
    got = asyncio.run(one_batch(one_too_many, [f"x{i}" for i in range(16)]))
    assert calls == [16, 8, 8, 1, 1, 1, 1]
    assert all(isinstance(g, EngineError) and "another number of results" in str(g) for g in got)
    assert [type(g) is BatchFailure for g in got] == [i not in (0, 7, 8, 15) for i in range(16)]


def test_stopping_fails_what_is_left_after_its_deadline():
    """An engine call that never ends (or a queue nobody waits for any more): stop() gives up
    after its timeout, failing the computing and the queued items, instead of hanging."""

    taken: list[list[str]] = []
    computing = asyncio.Event()

    async def stuck(group, items, keys):
        taken.append(list(items))
        computing.set()
        await asyncio.Event().wait()

    async def run() -> None:
        batcher = MicroBatcher(stuck, max_items=2, wait_s=0.0, max_pending=100)
        batcher.start()
        futures, _ = batcher.submit("g", [(f"x{i}", f"x{i}") for i in range(5)])
        await asyncio.wait_for(computing.wait(), 5)  # the worker has taken its first batch
        # One batch computing (concurrency 1), three items still queued.
        assert taken == [["x0", "x1"]] and batcher.pending == 5
        await asyncio.wait_for(batcher.stop(timeout=0.2), 5)
        got = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(g, EngineUnavailable) for g in got), got
        assert batcher.pending == 0 and not batcher._inflight
        # A request that reaches the batcher after it stopped is refused, not left waiting.
        with pytest.raises(EngineUnavailable, match="shutting down"):
            batcher.submit("g", [("x0", "x0")])
        assert batcher.pending == 0 and not batcher._inflight and not batcher._queue

    asyncio.run(run())


def test_an_items_wait_for_its_batch_counts_from_when_it_was_queued():
    """One item in each of four groups, submitted together, with an engine slot for each:
    every group's batch starts once its item has waited `wait_s`, not `wait_s` after the batch
    before it (the fourth 4 `wait_s` after submission); a group with a whole batch queued goes
    at once, also behind an item still waiting for its batch to fill."""
    started: dict[str, float] = {}

    async def run_group(group, items, keys):
        started[group] = time.monotonic()
        return list(items)

    async def run() -> None:
        wait = 0.5
        batcher = MicroBatcher(run_group, max_items=4, wait_s=wait, max_pending=100, concurrency=4)
        batcher.start()
        t0 = time.monotonic()
        groups = ("a", "b", "c", None)  # any hashable names a group, None too
        futures = [f for g in groups for f in batcher.submit(g, [(str(g), g)])[0]]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        waited = {g: started[g] - t0 for g in groups}
        assert all(wait <= w < 2 * wait for w in waited.values()), waited
        t1 = time.monotonic()
        (lone,), _ = batcher.submit("e", [("e", "e")])
        whole, _ = batcher.submit("f", [(f"f{i}", f"f{i}") for i in range(4)])
        await asyncio.wait_for(asyncio.gather(*whole), 10)
        assert started["f"] - t1 < wait and not lone.done()
        await asyncio.wait_for(lone, 10)
        assert started["e"] - t1 >= wait
        await batcher.stop()

    asyncio.run(run())


def warm_then_gated(gate: asyncio.Event, spans: list[float] | None = None):
    """A run_group whose "warm" items take 0.2 s a batch and whose others wait for `gate`;
    the time each warm call took is appended to `spans` (when given)."""

    async def run_group(group, items, keys):
        if items[0].startswith("warm"):
            t0 = time.monotonic()
            await asyncio.sleep(0.2)  # the scripted engine's work (pacing, not synchronization)
            if spans is not None:
                spans.append(time.monotonic() - t0)
        else:
            await gate.wait()
        return list(items)

    return run_group


def test_retry_after_drains_the_queue_at_the_servers_rate_not_one_batchs():
    """Batches of 4 items run 16 at a time: two spells of work (4 batches at once, then 16
    at once), idle between them. In its busy time the server labeled 80 items, 20 times one
    batch's 4, in 2 batch-times: ten times one batch's rate. A full queue of 400 is told to
    come back when the server will have drained it at that rate: within the measured busy
    time's worth (idle time between the spells does not count as labeling time), and well
    before one batch's rate would drain it. Both bounds are measured on the run itself, so
    a slow machine (longer batches, longer spells) moves both sides alike."""
    gate, spans = asyncio.Event(), []
    run_group = warm_then_gated(gate, spans)

    async def run() -> None:
        batcher = MicroBatcher(run_group, max_items=4, wait_s=0.0, max_pending=400, concurrency=16)
        batcher.start()
        assert batcher.retry_after() == 1.0  # nothing measured yet
        loop, busy = asyncio.get_running_loop(), 0.0
        for n in (16, 64):  # two spells of work, idle between them
            t0 = loop.time()
            await asyncio.gather(*batcher.submit("g", [(f"warm{n}.{i}", f"warm{n}.{i}") for i in range(n)])[0])
            busy += loop.time() - t0
            await asyncio.sleep(1.0)  # idle on purpose: 5 s more if it counted as labeling time
        assert len(spans) == 20 and batcher.computed == 80
        batcher.submit("g", [(f"q{i}", f"q{i}") for i in range(400)])
        told = batcher.retry_after()
        # The server's rate: 80 items in at most `busy` seconds (each batch ran within its spell).
        assert told <= math.ceil(400 * busy / 80) + 1, (told, busy)
        # One batch's rate (4 items in one batch's time) would say 100 batch-times; the
        # server's says 10 (the two spells) plus rounding. Asked: at least 3 times sooner.
        assert 3 * told <= 400 * min(spans) / 4, (told, min(spans))
        gate.set()
        await batcher.stop()

    asyncio.run(run())


def test_retry_after_keeps_the_last_rate_past_the_window(monkeypatch):
    """A burst after an idle spell longer than the rate's window (or batches slower than it):
    the full queue is told the time it takes at the last rate measured, not 1 s, which would
    have every client come back at once, every second."""
    monkeypatch.setattr("service.batcher.RATE_WINDOW_S", 0.1)
    gate = asyncio.Event()
    run_group = warm_then_gated(gate)

    async def run() -> None:
        batcher = MicroBatcher(run_group, max_items=4, wait_s=0.0, max_pending=404, concurrency=1)
        batcher.start()
        await asyncio.gather(*batcher.submit("g", [(f"warm{i}", f"warm{i}") for i in range(4)])[0])
        await asyncio.sleep(0.3)  # idle, past the window
        batcher.submit("g", [(f"q{i}", f"q{i}") for i in range(400)])
        # 4 items in at least 0.2 s: 400 take 20 s or more.
        ((t0, t1, n),) = batcher._done
        assert batcher.retry_after() == min(60, math.ceil(400 * (t1 - t0) / n)) >= 20
        gate.set()
        await batcher.stop()

    asyncio.run(run())


def test_a_flight_in_progress_is_still_shared():
    """X is being computed (the engine call has begun, not merely queued): a second request
    for X joins that computation instead of starting another."""
    computing, go = asyncio.Event(), asyncio.Event()

    async def run_group(group, items, keys):
        computing.set()
        await go.wait()
        return [f"label of {it}" for it in items]

    async def run() -> None:
        batcher = MicroBatcher(run_group, max_items=8, wait_s=0.0, max_pending=100)
        batcher.start()
        (first,), _ = batcher.submit("g", [("X", "X")])
        await asyncio.wait_for(computing.wait(), 5)  # the engine call for X has begun
        (second,), shared = batcher.submit("g", [("X", "X")])
        assert shared == 1 and second is first
        go.set()
        assert await second == "label of X"
        await batcher.stop()
        assert batcher.computed == 1

    asyncio.run(run())


def test_items_count_by_weight_in_the_queue_and_in_batches():
    """A heavy item (a large group's comparisons) fills a batch alone and counts its weight
    against the queue; light ones share batches up to `max_items`; the queue refuses what its
    weight would overfill."""
    calls: list[list[str]] = []
    go = asyncio.Event()

    async def run_group(group, items, keys):
        calls.append(list(items))
        await go.wait()
        return [f"label of {it}" for it in items]

    async def run() -> None:
        pending: list[int] = []
        batcher = MicroBatcher(run_group, max_items=4, wait_s=0.0, max_pending=12, on_pending=pending.append)
        entries = [(k, k) for k in ("heavy", "a", "b", "c")]
        futures, _ = batcher.submit("g", entries, [6, 2, 2, 1])
        assert batcher.pending == 11
        with pytest.raises(QueueFull):
            batcher.check_room(["d"], [2])
        batcher.check_room(["d", "heavy"], [1, 6])  # one in flight already: shared, not counted
        batcher.start()
        await async_wait_for(lambda: len(calls) == 1, 5, "the first batch")
        go.set()
        assert await asyncio.gather(*futures) == [f"label of {k}" for k, _ in entries]
        await batcher.stop()
        assert calls == [["heavy"], ["a", "b"], ["c"]]
        assert batcher.pending == 0 and pending == [11, 5, 1, 0]

    asyncio.run(run())


def test_a_queue_smaller_than_a_request_is_refused():
    with pytest.raises(ValueError, match=r"max_queue_items \(100\) must be at least max_items \(256\)"):
        Settings(max_queue_items=100)
    assert Settings(max_queue_items=496).max_queue_items == 496
    # A group of max_group_size (32) is 496 comparisons against the queue.
    with pytest.raises(ValueError, match=r"max_queue_items \(400\) must be at least the 496 comparisons of a group"):
        Settings(max_queue_items=400)
    assert Settings(max_queue_items=256, max_group_size=23).max_group_size == 23


@pytest.mark.parametrize(
    ("root", "path", "protected"),
    [
        ("", "/v1/scores", True),
        ("/api", "/api/v1/scores", True),
        ("/v", "/v1/scores", True),  # not under the prefix "/v": the router reads /v1/scores
        ("/api", "/api/healthz", False),
        ("", "/healthz", False),
    ],
)
def test_the_gate_reads_the_path_under_a_prefix_as_the_router_does(root, path, protected):
    gate = Gate(None, Metrics(), limit=1024, keys=["key"])
    scope = {"type": "http", "path": path, "root_path": root, "headers": []}
    refusal = gate._refusal(scope)
    assert (refusal is not None and refusal.status_code == 401) is protected
    scope["headers"] = [(b"authorization", b"Bearer key")]
    assert gate._refusal(scope) is None


def test_a_fault_in_the_batching_itself_is_a_final_error_not_an_outage():
    """A fault of the batcher's own (here its call counter raising) is no engine outage: the
    batch's items get a LabelerError (a final 500), not EngineUnavailable (a 503 that clients
    would retry for ever), and the batcher serves the next batch."""
    seen: list[int] = []

    def count(group, n, ok):
        seen.append(n)
        if len(seen) == 1:
            raise RuntimeError("counter broke")

    async def labels(group, items, keys):
        return [f"label of {it}" for it in items]

    async def run() -> tuple[list, list]:
        batcher = MicroBatcher(labels, max_items=16, wait_s=0.0, max_pending=100, on_call=count)
        batcher.start()
        first, _ = batcher.submit("g", [("a", "a"), ("b", "b")])
        got = await asyncio.gather(*first, return_exceptions=True)
        second, _ = batcher.submit("g", [("c", "c")])
        again = await asyncio.gather(*second, return_exceptions=True)
        assert batcher.pending == 0 and not batcher._inflight
        await batcher.stop()
        return got, again

    got, again = asyncio.run(run())
    assert [type(g) for g in got] == [LabelerError, LabelerError], got
    assert "internal error: RuntimeError" in str(got[0])
    assert again == ["label of c"] and seen == [2, 1]
