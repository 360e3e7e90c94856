"""Micro-batching with single-flight, in front of the labeler.

Items from concurrent requests are queued; a worker takes up to `max_items` queued items
of one group (same task, kind and parameters) and runs them as one labeler call, once the
group has `max_items` queued or the oldest queued item has waited `wait_s` for its batch to
fill (counted from when it was queued, so batches of other groups before it add no wait of
their own). Items count by weight, 1 unless `submit` is told otherwise (a group of N
responses: N (N - 1) / 2 comparisons, each as much engine work as a pair); a batch holds at
least one item, however heavy. Identical items in flight (same cache key) are computed once:
later submitters share the first one's future, until it is settled (a later request then
computes the item anew, or finds it in the cache). The queue is bounded:
`submit` refuses a request whose new items would exceed `max_pending` (QueueFull → 429).

Failure policy, all of it here. Items are validated before they are queued, so a batch
can only fail in the engine. Any exception is turned into a `LabelerError` in one place
(`as_labeler_error`): an `EngineUnavailable` (the engine is down) fails the whole batch at
once; items the labeler names as giving no label (a `ModelOutputError` listing them) get
that error and the rest of the batch runs again, once; any other failure splits the batch
in halves, recursively, so the items that fail it get the error and their batch-mates their
results (2 log2(n) extra calls for one bad item, not n). An engine error that both halves
repeat as the whole batch did (same message), and then the first and the last item of each
half alone, is no item's doing: every item of the batch gets it, after six extra calls, not
2n - 1; those not tried alone as a `BatchFailure`, which names no item (an item tried alone
did fail alone). Bad items whose errors read alike fool that only when they stand at all
four places tried alone. A fault of the batching itself (no engine call's) fails its batch
with a `LabelerError`, final, rather than as an outage that clients would retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from labeler.errors import EngineError, EngineUnavailable, LabelerError, ModelOutputError

log = logging.getLogger("service.batcher")

RunGroup = Callable[[Hashable, list[Any], list[str]], Awaitable[list[Any]]]

RATE_WINDOW_S = 30.0  # how far back the drain rate behind Retry-After looks
_NOT_READY = object()  # no group's batch is ready (any hashable, None too, may name a group)


class BatchFailure(EngineError):
    """An engine error that every part of a batch tried repeated: no item's doing."""


class QueueFull(Exception):
    """The engine queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the labeling queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass
class _Job:
    group: Hashable
    key: str
    item: Any
    future: asyncio.Future[Any]
    queued: float  # time.monotonic() when it was queued
    weight: int = 1  # what it counts for in the queue and in a batch


class MicroBatcher:
    """Collects items into engine batches; see the module docstring."""

    def __init__(
        self,
        run_group: RunGroup,
        *,
        max_items: int,
        wait_s: float,
        max_pending: int,
        concurrency: int = 1,
        on_call: Callable[[Hashable, int, bool], None] | None = None,
        on_pending: Callable[[int], None] | None = None,
    ) -> None:
        self.run_group = run_group
        self.max_items = max_items
        self.wait_s = wait_s
        self.max_pending = max_pending
        # Told (group, items, succeeded) of each engine call, the calls of a split batch too.
        self.on_call = on_call or (lambda group, n, ok: None)
        self.on_pending = on_pending or (lambda n: None)  # told `pending` each time it moves
        self.pending = 0  # weight of the items queued or computing
        self.computed = 0  # items computed since start (single-flight counts one)
        self.splits = 0  # failed batches split in halves
        self._queue: deque[_Job] = deque()
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._done: deque[tuple[float, float, int]] = deque()  # (start, end, weight) of recent batches
        self._stopping = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued and computing, for at most `timeout` seconds (by then the
        server has stopped waiting for its requests: what is left would only fill the cache,
        past the time a container is given to stop); then fail what is left and stop. Items
        submitted from now on are refused (EngineUnavailable)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while (self._queue or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:  # first: it would start a batch of what is failed below
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue or self._tasks:
            log.warning("stopping with %d items not labeled", self.pending)
            self._fail(list(self._queue), EngineUnavailable("the server is shutting down"))
            self.pending -= sum(job.weight for job in self._queue)
            self._queue.clear()
            self.on_pending(self.pending)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(
        self, group: Hashable, entries: Sequence[tuple[str, Any]], weights: Sequence[int] | None = None
    ) -> tuple[list[asyncio.Future[Any]], int]:
        """Queue `(key, item)` entries of one group, of `weights` (1 each by default). Returns
        one future per entry and how many joined a computation already in flight. All or
        nothing: raises QueueFull, or EngineUnavailable once the batcher is stopping, before
        queueing anything."""
        weights = [1] * len(entries) if weights is None else weights
        self.check_room((k for k, _ in entries), weights)
        loop = asyncio.get_running_loop()
        futures, shared = [], 0
        now = time.monotonic()
        for (key, item), weight in zip(entries, weights, strict=True):
            fut = self._inflight.get(key)
            if fut is not None:
                shared += 1
            else:
                fut = loop.create_future()
                self._inflight[key] = fut
                self._queue.append(_Job(group, key, item, fut, now, weight))
                self.pending += weight
            futures.append(fut)
        self.on_pending(self.pending)
        self._wake.set()
        return futures, shared

    def in_flight(self, keys: Iterable[str]) -> dict[str, asyncio.Future[Any]]:
        """The computations in flight for those of `keys` that have one: a request joins them
        before it prepares its other items, rather than after (by then they may have ended)."""
        return {k: f for k in keys if (f := self._inflight.get(k)) is not None}

    def check_room(self, keys: Iterable[str], weights: Iterable[int] | None = None) -> None:
        """Raise what `submit` would raise for entries with these keys (and weights, 1 each
        by default) now (QueueFull, or EngineUnavailable once stopping): a request checks
        before its items are rendered and tokenized, so that an overloaded server refuses it
        without that work."""
        if self._stopping:
            raise EngineUnavailable("the server is shutting down")
        if weights is None:
            fresh = {k: 1 for k in keys if k not in self._inflight}
        else:
            fresh = {k: w for k, w in zip(keys, weights, strict=True) if k not in self._inflight}
        if self.pending + sum(fresh.values()) > self.max_pending:
            raise QueueFull(self.retry_after())

    def retry_after(self) -> float:
        """Seconds until the queue has drained at the recent rate (1 s to 60 s; 1 s before any
        batch is done). The rate is the server's, not one batch's: the items of the batches
        done in the last `RATE_WINDOW_S` seconds over the time any of them was running
        (overlapping batches count once, idle time not at all); the last batch done when none
        ended within it (a burst after an idle spell, batches slower than the window)."""
        self._trim_done()
        if not self._done:
            return 1.0
        busy, reach = 0.0, -math.inf
        for t0, t1, _ in sorted(self._done):
            busy += max(0.0, t1 - max(t0, reach))
            reach = max(reach, t1)
        rate = sum(n for _, _, n in self._done) / max(busy, 1e-3)
        return float(max(1, min(60, math.ceil(self.pending / rate))))

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group = self._ready()
                if group is _NOT_READY:  # until the oldest item has waited, or new items fill a batch
                    left = self._queue[0].queued + self.wait_s - time.monotonic()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
                    continue
                await self._slots.acquire()
                jobs, rest, weight = [], deque(), 0
                while self._queue and weight < self.max_items:
                    job = self._queue.popleft()
                    if job.group != group:
                        rest.append(job)
                    elif jobs and weight + job.weight > self.max_items:  # for the next batch
                        rest.append(job)
                        break
                    else:
                        jobs.append(job)
                        weight += job.weight
                self._queue.extendleft(reversed(rest))
                task = asyncio.get_running_loop().create_task(self._run(group, jobs))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _ready(self) -> Hashable:
        """The group whose batch goes next: the oldest queued item's once it has waited
        `wait_s`, else the first to have a whole batch (`max_items`) queued; `_NOT_READY` if
        neither."""
        if self._queue[0].queued + self.wait_s <= time.monotonic():
            return self._queue[0].group
        counts: dict[Hashable, int] = {}
        for job in self._queue:
            counts[job.group] = n = counts.get(job.group, 0) + job.weight
            if n >= self.max_items:
                return job.group
        return _NOT_READY

    async def _run(self, group: Hashable, jobs: list[_Job]) -> None:
        t0 = time.monotonic()
        try:
            await self._attempt(group, jobs)
        except Exception as exc:  # noqa: BLE001 - a bug in the batching, not the engine: a final 500, not a 503 to retry
            log.error("labeling a batch of %d items failed", len(jobs), exc_info=exc)
            for job in jobs:
                _fail(job.future, LabelerError(f"labeling the batch failed (internal error: {type(exc).__name__})"))
        except BaseException as exc:  # cancelled (shutdown): no waiter is left hanging
            for job in jobs:
                _fail(job.future, EngineUnavailable(f"the labeling batch was stopped ({type(exc).__name__})"))
            raise
        finally:
            for job in jobs:
                self._release(job)
            weight = sum(job.weight for job in jobs)
            self.pending -= weight
            self.on_pending(self.pending)
            self.computed += len(jobs)
            self._done.append((t0, time.monotonic(), weight))
            self._trim_done()
            self._slots.release()

    def _trim_done(self) -> None:
        """Forget the batches that ended before the rate's window, but the last one."""
        since = time.monotonic() - RATE_WINDOW_S
        while len(self._done) > 1 and self._done[0][1] < since:
            self._done.popleft()

    async def _attempt(self, group: Hashable, jobs: list[_Job]) -> None:
        """Run `jobs` as one call; on failure fail them all or bisect (module docstring)."""
        error = await self._call(group, jobs)
        if error is not None:
            await self._bisect(group, jobs, error)

    async def _call(self, group: Hashable, jobs: list[_Job]) -> LabelerError | None:
        """One engine call: its jobs settled with their results, or the error it failed with
        (nothing settled)."""
        try:
            results = await self.run_group(group, [j.item for j in jobs], [j.key for j in jobs])
        except BaseException as exc:  # noqa: BLE001 - every failure is delivered to its waiters
            self.on_call(group, len(jobs), False)
            if not isinstance(exc, Exception):  # cancelled (shutdown): `_run` fails the waiters
                raise
            return as_labeler_error(exc)
        counted = len(results) == len(jobs)
        self.on_call(group, len(jobs), counted)
        if not counted:  # a bug below: which result is whose is unknown, so none is given
            log.error("the labeler returned %d results for a call of %d items", len(results), len(jobs))
            # The same words whatever the counts, so that a labeler always off fails its batch alike.
            return EngineError("the labeler returned another number of results than it was given items")
        for job, result in zip(jobs, results, strict=True):
            _resolve(job.future, result)
            self._release(job)
        return None

    async def _bisect(self, group: Hashable, jobs: list[_Job], error: LabelerError) -> None:
        """Settle the jobs of a call that failed with `error`."""
        if isinstance(error, ModelOutputError) and error.items:  # a lone item too: its error then names no index
            await self._set_aside(group, jobs, error)
            return
        if len(jobs) == 1 or isinstance(error, EngineUnavailable):
            self._fail(jobs, error)
            return
        log.warning("batch of %d failed (%s); splitting it to find the failing items", len(jobs), error)
        self.splits += 1
        halves = (jobs[: len(jobs) // 2], jobs[len(jobs) // 2 :])
        errors = []
        for half in halves:
            errors.append(await self._call(group, half))
            if errors[-1] is not None and len(half) == 1:  # settled at once: a request may ask for it again
                self._fail(half, errors[-1])
        if (
            type(error) is EngineError
            and all(_same(e, error) for e in errors)
            and await self._alone(group, halves, error)
        ):
            self._fail(jobs, BatchFailure(str(error)))  # the items not tried alone
            return
        for half, half_error in zip(halves, errors, strict=True):
            rest = [j for j in half if not j.future.done()]
            if half_error is None or not rest:
                continue
            probes_failed = any(j.future.done() and not j.future.cancelled() and j.future.exception() for j in half)
            if probes_failed or len(rest) == 1 < len(half):
                # Probes failed here (the half's error may have been theirs alone), or worked and
                # left one item that never ran without them: the rest runs again.
                await self._attempt(group, rest)
            else:
                await self._bisect(group, rest, half_error)

    async def _set_aside(self, group: Hashable, jobs: list[_Job], error: ModelOutputError) -> None:
        """Fail the items the labeler found no label for (each with the error, naming no
        item: the labeler's index is of this batch, and the request it came in names it) and
        run the others again."""
        bad = set(error.items)
        log.warning(
            "batch of %d: %d items without a label (%s); running the rest again", len(jobs), len(bad), error.reason
        )
        self._fail([jobs[i] for i in bad], error)
        rest = [j for i, j in enumerate(jobs) if i not in bad]
        again = await self._call(group, rest) if rest else None
        if again is not None:
            await self._bisect(group, rest, again)

    async def _alone(self, group: Hashable, halves: tuple[list[_Job], ...], error: LabelerError) -> bool:
        """Whether the first and the last item of each half (a half of one item was tried
        alone already) fail alone with `error` too: then no item of the batch is its cause
        (two bad items whose errors read alike, one in each half, fail the halves the same
        way). Stops at the first that does not. Each item tried is settled, with its own
        result or error."""
        for half in halves:
            for probe in [half[0], half[-1]] if len(half) > 1 else []:
                probe_error = await self._call(group, [probe])
                if probe_error is not None:
                    self._fail([probe], probe_error)
                if not _same(probe_error, error):
                    return False
        return True

    def _fail(self, jobs: list[_Job], error: LabelerError) -> None:
        if isinstance(error, ModelOutputError) and error.items:
            # The labeler's index is of this call's batch: the request each job came in names it.
            error = ModelOutputError(error.reason)
        for job in jobs:
            _fail(job.future, error)
            self._release(job)

    def _release(self, job: _Job) -> None:
        """Take a settled job's key out of the in-flight map (if a newer flight has not taken
        it), so that no later request joins a computation that is over: the other half of a
        split batch can run on for a while after this one's error."""
        if self._inflight.get(job.key) is job.future:
            del self._inflight[job.key]


def as_labeler_error(exc: BaseException) -> LabelerError:
    """The one translation of a failure into the labeler's errors: its own errors stay as they
    are (the engines raise `EngineUnavailable` when their process or servers are gone);
    anything else (a bug or crash in the engine) is an `EngineError`, logged with its
    traceback."""
    if isinstance(exc, LabelerError):
        return exc
    log.error("engine failure", exc_info=exc)
    return EngineError(f"{type(exc).__name__}: {exc}")


def _same(error: LabelerError | None, other: LabelerError) -> bool:
    """Whether `error` is `other` again: the same class and message."""
    return type(error) is type(other) and str(error) == str(other)


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # marks it retrieved: a waiter that went away must not log "never retrieved"
