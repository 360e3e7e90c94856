"""Shared helpers for the benchmarks: timing and the result record."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Result:
    """One benchmark figure: `value` compared with `goal` in direction `better`."""

    name: str
    title: str
    value: float
    goal: float | None  # None: reported for information, no goal
    better: str  # "lower" or "higher"
    unit: str = "ratio"
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.value <= self.goal if self.better == "lower" else self.value >= self.goal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"met": self.met}


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_order(r: int, n: int) -> list[int]:
    """The order in which round `r` runs `n` sides: side `r % n` first, the others after it
    in turn. Over rounds every side goes first equally often (with two sides: the first in
    even rounds, the second in odd ones), so none is always measured on a machine the other
    has just warmed up or slowed down."""
    return [(r + k) % n for k in range(n)]


def run_round(sides: Sequence[Callable[[], Any]], r: int) -> list[float]:
    """Round `r`: each side's wall time, each side run once, in `round_order`."""
    times = [0.0] * len(sides)
    for i in round_order(r, len(sides)):
        times[i] = timed(sides[i])
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))
