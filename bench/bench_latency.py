"""L1: how long a cache hit waits while the server prepares a large miss batch.

A miss batch of `--items` pairs (64 by default: 128 prompts, pairs in both orders) is
rendered and tokenized before the engine runs it. Wherever that preparation runs, cache hits
arriving at the same time must not queue behind it. L1 sends the miss batch and, from the
moment it is sent, cache hits from 8 concurrent connections for `--window` seconds, in each
of `--rounds` rounds (a fresh server each), and reports the latency percentiles of the hits
of all rounds pooled, with each round's p99 beside them.

With `--baseline DIR` (a checkout of another revision), the same measurement runs against a
server started in DIR too (DIR as its working directory and PYTHONPATH, checked by importing
`labeler` there as the server does), both sides once a round, which goes first alternating
from round to round, so one run compares them. Each side's revision is its checkout's
`git rev-parse --short HEAD`. Every figure is counted from the requests sent.
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

from bench.bench_http import start, stop
from bench.common import Result, round_order
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


def server_env(source: Path) -> dict[str, str]:
    return os.environ | {"LABELER_LOG_LEVEL": "warning", "PYTHONPATH": str(source)}


def serve(source: Path, port: int) -> subprocess.Popen:
    """`labeler serve` run from the checkout `source`: `-m` puts the working directory first
    on sys.path, so the working directory decides which tree runs."""
    cmd = [sys.executable, "-m", "labeler.cli", "serve", "--port", str(port)]
    return start(cmd, f"http://127.0.0.1:{port}/readyz", server_env(source), cwd=source)


def revision(source: Path) -> str:
    """`source`'s HEAD, after checking that a Python started there as `serve` starts the
    server imports `labeler` from `source`."""
    probe = [sys.executable, "-c", "import labeler; print(labeler.__file__)"]
    found = subprocess.run(probe, cwd=source, env=server_env(source), capture_output=True, text=True, check=True)
    package = Path(found.stdout.strip()).resolve()
    if not package.is_relative_to(source):
        raise RuntimeError(f"a server started in {source} would import labeler from {package}")
    head = ["git", "-C", str(source), "rev-parse", "--short", "HEAD"]
    rev = subprocess.run(head, capture_output=True, text=True).stdout.strip()
    return rev or "unknown"


def summary(values: list[float], per_round: list[list[float]]) -> str:
    return (
        f"{len(values)} hits, p50 {1e3 * pct(values, 0.5):.1f} ms, p99 {1e3 * pct(values, 0.99):.1f} ms, "
        f"max {1e3 * max(values):.1f} ms; each round's p99: "
        + ", ".join(f"{1e3 * pct(r, 0.99):.1f}" for r in per_round)
        + " ms"
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
    revisions = {name: revision(src) for name, src in sources.items()}
    names = list(sources)
    lat: dict[str, list[list[float]]] = {k: [] for k in sources}
    for r in range(args.rounds):
        for i in round_order(r, len(names)):
            name = names[i]
            port = free_port()
            proc = serve(sources[name], port)
            try:
                url = f"http://127.0.0.1:{port}"
                lat[name].append(asyncio.run(one_round(url, f"{name}{r}", args.items, args.window, args.connections)))
            finally:
                stop(proc)
    cur = [x for rnd in lat["this"] for x in rnd]
    order = ", which side first alternating by round" if len(names) > 1 else ""
    detail = (
        f"{args.items}-pair miss batch (both orders: {2 * args.items} prompts), cache hits from "
        f"{args.connections} connections for {args.window:g} s after it is sent, {args.rounds} rounds{order}, "
        f"a fresh server each, percentiles of all rounds' hits pooled; this checkout (HEAD {revisions['this']}): "
        + summary(cur, lat["this"])
    )
    if "baseline" in lat:
        base = [x for rnd in lat["baseline"] for x in rnd]
        detail += f"; baseline checkout (HEAD {revisions['baseline']}): " + summary(base, lat["baseline"])
    result = Result(
        "L1",
        f"cache-hit p99 latency (all rounds' hits pooled) while a {args.items}-pair miss batch is prepared",
        1e3 * pct(cur, 0.99),
        None,
        "lower",
        unit="ms",
        detail=detail,
    )
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
