"""L1: how long a cache hit waits in the second after a large miss batch is sent.

A miss batch of `--items` pairs (64 by default: 128 prompts, pairs in both orders) is
rendered and tokenized before the engine runs it; cache hits arriving meanwhile must not
queue behind either. L1 sends the miss batch and, from the moment it is sent, cache hits from
8 concurrent connections for `--window` seconds, in each of `--rounds` rounds (a fresh server
each), and reports the latency percentiles of the hits of all rounds pooled, with each round's
p99 beside them. The window covers the batch's preparation and, for the rest of it, the
engine's forward pass over the batch: L1 is the hits' latency over that whole window, not
during the preparation alone.

The server starts from an environment without the user's `LABELER_*` variables, with the
settings it needs given explicitly; the detail names the model and the label cache its
/readyz reports.

With `--baseline DIR` (a checkout of another revision), the same measurement runs against a
server started in DIR too (DIR as its working directory and PYTHONPATH, checked by importing
`labeler` there as the server does), both sides once a round, which goes first alternating
from round to round, so one run compares them. Each side's revision is its checkout's
`git rev-parse --short HEAD`. Every figure is counted from the requests sent.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.bench_http import ready, start, stop
from bench.common import Result, add_results_option, describe_revision, emit, revision, round_order, server_env
from labeler.models import cache_dir
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


def env_for(source: Path) -> dict[str, str]:
    """The server's environment: no user `LABELER_*` variable; the embedded model on the
    transformers engine on the CPU, this process's model cache directory, an in-process label
    cache (no LABELER_REDIS_URL), no API keys; `source` first on the import path."""
    return server_env(
        LABELER_MODEL="embedded",
        LABELER_CACHE_DIR=str(cache_dir()),
        LABELER_ENGINE="transformers",
        LABELER_DEVICE="cpu",
        LABELER_LOG_LEVEL="warning",
        PYTHONPATH=str(source),
    )


def serve(source: Path, port: int) -> subprocess.Popen:
    """`labeler serve` run from the checkout `source`: `-m` puts the working directory first
    on sys.path, so the working directory decides which tree runs."""
    cmd = [sys.executable, "-m", "labeler.cli", "serve", "--port", str(port)]
    return start(cmd, f"http://127.0.0.1:{port}/readyz", env_for(source), cwd=source)


def checkout(source: Path) -> str:
    """`source`'s revision as the detail names it, after checking that a Python started there
    as `serve` starts the server imports `labeler` from `source`."""
    probe = [sys.executable, "-c", "import labeler; print(labeler.__file__)"]
    found = subprocess.run(probe, cwd=source, env=env_for(source), capture_output=True, text=True, check=True)
    package = Path(found.stdout.strip()).resolve()
    if not package.is_relative_to(source):
        raise RuntimeError(f"a server started in {source} would import labeler from {package}")
    rev, dirty = revision(source)
    return describe_revision(rev, dirty) if rev else "revision unknown: git could not tell"


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
    add_results_option(ap)
    args = ap.parse_args()
    sources = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    revisions = {name: checkout(src) for name, src in sources.items()}
    names = list(sources)
    lat: dict[str, list[list[float]]] = {k: [] for k in sources}
    served: dict[str, set[str]] = {k: set() for k in sources}  # each server's model and label cache
    for r in range(args.rounds):
        for i in round_order(r, len(names)):
            name = names[i]
            port = free_port()
            proc = serve(sources[name], port)
            try:
                url = f"http://127.0.0.1:{port}"
                info = ready(url)
                served[name].add(f"model {info['model']}, {info['cache']} label cache")
                lat[name].append(asyncio.run(one_round(url, f"{name}{r}", args.items, args.window, args.connections)))
            finally:
                stop(proc)
    cur = [x for rnd in lat["this"] for x in rnd]
    order = ", which side first alternating by round" if len(names) > 1 else ""
    detail = (
        f"{args.items}-pair miss batch (both orders: {2 * args.items} prompts), cache hits from "
        f"{args.connections} connections for {args.window:g} s after it is sent, {args.rounds} rounds{order}, "
        f"a fresh server each (`labeler serve` without the user's LABELER_* settings), percentiles of all rounds' "
        f"hits pooled; this checkout ({revisions['this']}; {' / '.join(sorted(served['this']))}): "
        + summary(cur, lat["this"])
    )
    if "baseline" in lat:
        base = [x for rnd in lat["baseline"] for x in rnd]
        detail += (
            f"; baseline checkout ({revisions['baseline']}; {' / '.join(sorted(served['baseline']))}): "
            + summary(base, lat["baseline"])
        )
    result = Result(
        "L1",
        f"cache-hit p99 latency (all rounds' hits pooled) in the {args.window:g} s after a {args.items}-pair miss "
        "batch is sent",
        1e3 * pct(cur, 0.99),
        None,
        "lower",
        unit="ms",
        detail=detail,
    )
    emit(result, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
