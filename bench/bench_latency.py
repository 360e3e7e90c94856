"""L1: how long a cache hit waits while the server prepares a large miss batch.

A 64-item miss batch is rendered and tokenized (128 prompts: pairs in both orders) before the
engine runs it. Wherever that preparation runs, cache hits arriving at the same time must not
queue behind it. L1 sends the miss batch and, from the moment it is sent, cache hits from 8
concurrent connections for `--window` seconds, and reports the hits' latency percentiles.

With `--baseline DIR` (a checkout of another revision), the same measurement runs against a
server started from DIR too, the two alternating round by round, so one run compares them.
Every figure is counted from the requests sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.bench_http import start
from bench.common import Result
from tests.fixtures.redis import free_port

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = (
    "Forum post {tag}-{i}: I moved to a new city for work last spring and I still do not know anyone. "
    "My colleagues are friendly but they all have families and leave right after work. I tried a climbing "
    "gym and a book club, but I am shy and never manage to talk to people there. How do I make friends "
    "as an adult without forcing it? Item {i}."
)


def pairs(n: int, tag: str) -> list[dict[str, str]]:
    return [
        {
            "context": CONTEXT.format(tag=tag, i=i),
            "response_a": f"Go back to the same places every week (item {i}); familiarity does the work.",
            "response_b": f"Stay home, it is easier (item {i}).",
        }
        for i in range(n)
    ]


async def one_round(base: str, tag: str, n_miss: int, window: float, conns: int) -> list[float]:
    """Latencies (s) of the cache hits sent during `window` seconds after a miss batch."""
    hit = {"task": "summarize", "items": pairs(1, "hit")}
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=conns + 2)) as c:
        (await c.post("/v1/preferences", json=hit)).raise_for_status()  # cached from here on
        miss = asyncio.ensure_future(c.post("/v1/preferences", json={"task": "summarize", "items": pairs(n_miss, tag)}))
        t_end = time.perf_counter() + window

        async def hits() -> None:
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                r = await c.post("/v1/preferences", json=hit)
                r.raise_for_status()
                if not r.json()["results"][0]["cached"]:
                    raise RuntimeError("the hit item was not served from the cache")
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(hits() for _ in range(conns)))
        (await miss).raise_for_status()
    return latencies


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1] if len(values) > 1 else values[0]
    )


def serve(source: Path, port: int) -> object:
    env = os.environ | {"LABELER_LOG_LEVEL": "warning", "PYTHONPATH": str(source)}
    return start(
        [sys.executable, "-m", "labeler.cli", "serve", "--port", str(port)], f"http://127.0.0.1:{port}/readyz", env
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=64, help="items of the miss batch")
    ap.add_argument("--window", type=float, default=1.0, help="seconds of cache hits after the miss batch is sent")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="a checkout of another revision to compare with")
    args = ap.parse_args()
    sources = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    lat: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(args.rounds):
        for name, src in sources.items():
            port = free_port()
            proc = serve(src, port)
            try:
                url = f"http://127.0.0.1:{port}"
                lat[name] += asyncio.run(one_round(url, f"{name}{r}", args.items, args.window, args.connections))
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    cur = lat["this"]
    detail = (
        f"{args.items}-pair miss batch (both orders: {2 * args.items} prompts), cache hits from "
        f"{args.connections} connections for {args.window:g} s after it is sent, {args.rounds} rounds: "
        f"{len(cur)} hits, p50 {1e3 * pct(cur, 0.5):.1f} ms, p99 {1e3 * pct(cur, 0.99):.1f} ms, "
        f"max {1e3 * max(cur):.1f} ms"
    )
    results = [
        Result(
            "L1",
            "cache-hit p99 latency while a 64-item miss batch is prepared",
            1e3 * pct(cur, 0.99),
            None,
            "lower",
            unit="ms",
            detail=detail,
        )
    ]
    if "baseline" in lat:
        base = lat["baseline"]
        rev = subprocess.run(
            ["git", "-C", str(args.baseline), "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True
        ).stdout.strip()
        results[0].detail += (
            f"; baseline revision {rev or args.baseline.name}: {len(base)} hits, p50 {1e3 * pct(base, 0.5):.1f} ms, "
            f"p99 {1e3 * pct(base, 0.99):.1f} ms, max {1e3 * max(base):.1f} ms"
        )
    for res in results:
        print(json.dumps(res.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
