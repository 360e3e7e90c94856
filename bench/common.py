"""Shared helpers for the benchmarks: timing, the result record and where it goes, the
servers' environment and the code revision."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The trees whose uncommitted changes make a revision "dirty": the code the figures measure
# (tests/fixtures: the benchmarks start their servers with it, E2's `vllm serve` among them),
# less the figures themselves (a run stores each entry's before the next entry starts).
MEASURED_TREES = ("labeler", "service", "bench", "tests/fixtures")
_NOT_MEASURED = (":(exclude)bench/results",)


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


def add_results_option(ap: argparse.ArgumentParser) -> None:
    """`--results FILE`: where a module appends its figures (bench.run reads them from there)."""
    ap.add_argument(
        "--results", type=Path, help="append each figure to this file as well, one JSON object a line (bench.run)"
    )


def emit(result: Result, path: Path | None) -> None:
    """Print `result` as one JSON line and append it to `path` (as soon as it is measured, so
    that the figures a module measured before failing are not lost)."""
    line = json.dumps(result.to_dict(), ensure_ascii=False)
    print(line, flush=True)
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def server_env(**settings: str) -> dict[str, str]:
    """The environment a benchmark starts a server in: this process's, without any `LABELER_*`
    variable (whatever the case of its name, as the settings read them), plus `settings`. A
    user's own settings (a Redis URL, API keys, another model) must not change what is measured."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LABELER_")}
    return env | settings


def revision(source: Path) -> tuple[str | None, bool | None]:
    """(`git rev-parse --short HEAD` of the checkout `source`, whether `git status --porcelain`
    lists changes under MEASURED_TREES); (None, None) where git cannot tell. Read without
    taking git's index lock, so a commit under way elsewhere is not disturbed."""
    git = ["git", "--no-optional-locks", "-C", str(source)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=60)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", *MEASURED_TREES, *_NOT_MEASURED],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head.returncode != 0 or status.returncode != 0 or not head.stdout.strip():
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def describe_revision(rev: str | None, dirty: bool | None) -> str:
    """`rev` as the documents name it."""
    if rev is None:
        return "revision not recorded"
    trees = ", ".join(f"{t}/" for t in MEASURED_TREES)
    return f"revision {rev}" + (f" with uncommitted changes in {trees}" if dirty else "")
