"""P2 and P3: what the HTTP layer costs.

P2 = labels/s through HTTP (`labeler serve`, cache off) ÷ labels/s calling the Labeler in
     process, same engine and model, same batches (16 score items a call). Goal ≥ 0.95.
     `--rounds` rounds, each side once a round, HTTP first in even rounds and in-process
     first in odd ones; P2 is the median of the rounds' ratios.
P3 = cache-hit requests/s (1 cached item per POST /v1/scores) ÷ requests/s of a bare FastAPI
     endpoint (a POST route that reads the body and returns a raw Response with a constant JSON
     body: no response model, no validation or encoding of its return), both under uvicorn with
     the same settings (access log on, level warning) and the same load tool (wrk, 32
     connections, 1 thread, loopback). Goal ≥ 0.6: the label routes go through FastAPI's typed
     bodies and response models.
     `--rounds` rounds of one wrk run against each of the three servers below, the order
     rotating from round to round (a machine's speed can drift by tens of percent over a
     minute); P3 is the median of the rounds' ratios. Before the rounds, a request checks
     that the item is answered from the cache.
P3 floor = requests/s of FastAPI's typed path alone ÷ the bare endpoint's, in the same rounds: a
     route with the service's own request model as its body and its response model as its return
     type, returning a constant response (the cache hit's own), no middleware and no labeling.
     No goal: it is the ceiling of P3 on this framework, and hits ÷ floor is the share that
     the service's own work (gate, options, keys, cache, response) leaves.
P3b = cached items/s with 256-item batches (what a training loop sees), the median of `--rounds`
      wrk runs, after a request that checks the batch is answered from the cache. Goal ≥ 50,000:
      an absolute speed, which holds for the machine class it is measured on.

Servers run as separate processes so the load tool and the server don't share a GIL. They
start from an environment without the user's `LABELER_*` variables, with the settings they
need given explicitly; the labeling server's /readyz names the model (checked to be the
in-process labeler's for P2) and the cache it uses. A wrk run that reports socket errors,
non-2xx responses or exits non-zero fails the module. Medians are `statistics.median`; the
details list each round's values in the order they ran. Needs `wrk` (Debian package) for P3
and P3b, checked after P2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import Result, add_results_option, emit, round_order, server_env
from labeler import Labeler, ScoreItem
from labeler.engines.transformers_engine import TransformersEngine
from labeler.models import cache_dir, resolve_model
from tests.fixtures.redis import free_port

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("P2", "P3", "P3b")  # P3 floor is measured in P3's rounds
# Bare: a raw Response, so that FastAPI neither validates nor encodes the return.
BARE_APP = """
from fastapi import FastAPI, Request, Response
app = FastAPI()
BODY = b'{"ok":1}'

@app.post("/const", response_model=None)
async def const(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")
"""
TYPED_APP = """
from pathlib import Path
from fastapi import FastAPI
from labeler import TaskRegistry
from service.protocol import ScoresResponse, request_models
from service.settings import Settings

settings = Settings()
bodies = request_models(settings, TaskRegistry.load(settings.tasks_dir).names())
RESPONSE = ScoresResponse.model_validate_json(Path(__file__).with_name("response.json").read_bytes())
app = FastAPI()

@app.post("/v1/scores")
async def scores(body: bodies.scores) -> ScoresResponse:
    return RESPONSE
"""
WRK_POST = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""


def start(
    cmd: list[str], url: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 300
) -> subprocess.Popen:
    """A server process started with `cmd` in `cwd`, once `url` answers below 500. A process
    that exits first, or does not answer within `timeout` seconds, raises with its stderr's tail."""
    with tempfile.TemporaryFile() as log:  # the child keeps its own descriptor of it
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code < 500:
                    return proc
            time.sleep(0.2)
        why = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not answer in {timeout:g} s"
        stop(proc)
        log.seek(0)
        tail = log.read()[-4000:].decode(errors="replace")
    raise RuntimeError(f"{' '.join(cmd)} {why}:\n{tail}")


def stop(proc: subprocess.Popen | None) -> None:
    """Terminate `proc` and wait for it, killing it if it has not exited within a minute."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def uvicorn(app_dir: Path, app: str, port: int) -> list[str]:
    """The command serving `app` (module:attribute in `app_dir`) as P3 serves its reference apps."""
    options = ["--app-dir", str(app_dir), "--port", str(port), "--log-level", "warning"]
    return [sys.executable, "-m", "uvicorn", app, *options]


def wrk(url: str, body: str, seconds: int, connections: int = 32) -> float:
    """Requests/s that wrk reaches POSTing `body` to `url`; RuntimeError where wrk exits
    non-zero, reports socket errors (connect, read, write, timeout) or non-2xx responses, or
    prints no rate."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_POST.replace("{body}", body))
    try:
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", f.name, url]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    out = proc.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = wrk_errors(out)
    if proc.returncode != 0 or "Non-2xx" in out or errors or found is None:
        why = f"exit status {proc.returncode}" + (f", socket errors {errors}" if errors else "")
        raise RuntimeError(f"wrk saw errors against {url} ({why}):\n{out}{proc.stderr[-2000:]}")
    return float(found.group(1))


def wrk_errors(out: str) -> dict[str, int]:
    """The non-zero counts of wrk's "Socket errors: connect N, read N, write N, timeout N" line
    (wrk prints it only where one is non-zero)."""
    line = re.search(r"Socket errors:(.*)", out)
    if line is None:
        return {}
    counts = {kind: int(n) for kind, n in re.findall(r"(\w+) (\d+)", line.group(1))}
    if not counts:
        return {"unparsed": 1}
    return {kind: n for kind, n in counts.items() if n}


def items(n: int, tag: str) -> list[dict[str, str]]:
    return [{"context": f"Question {tag}-{i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]


async def p2(base: str, model_dir: Path, served: str, n: int, batch: int, rounds: int) -> list[tuple[float, float]]:
    """(HTTP items/s, in-process items/s) per round: HTTP first in even rounds, in-process
    first in odd ones. The in-process labeler runs `model_dir`; the server must report its
    model id (`served`)."""
    lab = Labeler(TransformersEngine(model_dir))
    if lab.model_id != served:
        raise RuntimeError(f"the server labels with {served}, the in-process labeler with {lab.model_id}")
    data = items(n, "inproc")
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def over_http() -> int:
            got = 0
            for i in range(0, n, batch):
                body = {"task": "general", "items": data[i : i + batch], "cache": False}
                got += len((await client.post("/v1/scores", json=body)).raise_for_status().json()["results"])
            return got

        async def in_process() -> int:
            got = 0
            for i in range(0, n, batch):
                got += len(await lab.ascores([ScoreItem(**it) for it in data[i : i + batch]], "general"))
            return got

        await lab.ascores([ScoreItem(**it) for it in data[:batch]], "general")  # warm-up, both sides
        warm = {"task": "general", "items": data[:batch], "cache": False}
        (await client.post("/v1/scores", json=warm)).raise_for_status()
        sides = (over_http, in_process)
        for r in range(rounds):
            speeds = [0.0, 0.0]
            for i in round_order(r, 2):
                t0 = time.perf_counter()
                labeled = await sides[i]()
                speeds[i] = labeled / (time.perf_counter() - t0)
                if labeled != n:
                    raise RuntimeError(f"{sides[i].__name__} returned {labeled} results for {n} items")
            out.append((speeds[0], speeds[1]))
    return out


def cache_hit(base: str, body: str, n: int) -> bytes:
    """POST `body` (`n` items) to /v1/scores twice, the first to fill the cache; the second
    response, checked to answer all `n` items from the cache."""
    responses = []
    for _ in range(2):
        r = httpx.post(base + "/v1/scores", content=body, headers={"content-type": "application/json"}, timeout=600)
        responses.append(r.raise_for_status())
    results = responses[-1].json()["results"]
    if len(results) != n or not all(res["cached"] for res in results):
        raise RuntimeError(f"a repeated request of {n} items was not answered from the cache")
    return responses[-1].content


def ready(base: str) -> dict:
    """The labeling server's /readyz: its model, engine and cache."""
    return httpx.get(base + "/readyz", timeout=30).raise_for_status().json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=5, help="per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds for P2 and P3, runs for P3b")
    ap.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES), help="figures to measure")
    add_results_option(ap)
    args = ap.parse_args()
    model_dir = resolve_model(None)
    port, bare_port, typed_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    # The labeling server's settings, all of them given here: the in-process side's model and
    # model cache directory, the transformers engine on the CPU, one engine call at a time, an
    # in-process label cache (no LABELER_REDIS_URL), no API keys.
    env = server_env(
        LABELER_MODEL=str(model_dir),
        LABELER_CACHE_DIR=str(cache_dir()),
        LABELER_ENGINE="transformers",
        LABELER_DEVICE="cpu",
        LABELER_BATCH_CONCURRENCY="1",
        LABELER_LOG_LEVEL="warning",
    )
    servers: list[subprocess.Popen] = []
    apps_dir = Path(tempfile.mkdtemp(prefix="labeler-bench-"))
    try:
        servers.append(
            start([sys.executable, "-m", "labeler.cli", "serve", "--port", str(port)], base + "/readyz", env)
        )
        info = ready(base)
        served = (
            f"`labeler serve` from an environment without the user's LABELER_* settings: model {info['model']}, "
            f"{info['engine']} engine, {info['cache']} label cache"
        )
        if "P2" in args.only:
            p2_rounds = asyncio.run(p2(base, model_dir, info["model"], args.items, args.batch, args.rounds))
            emit(
                Result(
                    "P2",
                    "labels/s through HTTP ÷ labels/s in process (same engine)",
                    statistics.median(http / inproc for http, inproc in p2_rounds),
                    0.95,
                    "higher",
                    detail=f"{args.items} score items in calls of {args.batch}, cache off, median of {args.rounds} "
                    "rounds' ratios, which side first alternating by round (per round, in the order run: HTTP / "
                    "in-process items/s "
                    + ", ".join(f"{h:.2f} / {i:.2f}" for h, i in p2_rounds)
                    + "; ratios "
                    + ", ".join(f"{h / i:.3f}" for h, i in p2_rounds)
                    + f"); {served}, its model checked to be the in-process labeler's",
                ),
                args.results,
            )
        if "P3" in args.only or "P3b" in args.only:
            if shutil.which("wrk") is None:
                raise SystemExit("P3 and P3b need wrk: apt-get install wrk")
            one = json.dumps({"task": "general", "items": items(1, "hit")})
            hit_response = cache_hit(base, one, 1)
        if "P3" in args.only:
            (apps_dir / "bare_app.py").write_text(BARE_APP)
            (apps_dir / "typed_app.py").write_text(TYPED_APP)
            (apps_dir / "response.json").write_bytes(hit_response)
            for app, app_port in (("bare_app:app", bare_port), ("typed_app:app", typed_port)):
                servers.append(start(uvicorn(apps_dir, app, app_port), f"http://127.0.0.1:{app_port}/docs", env))
            targets = [
                base + "/v1/scores",
                f"http://127.0.0.1:{bare_port}/const",
                f"http://127.0.0.1:{typed_port}/v1/scores",
            ]
            rounds = []
            for r in range(args.rounds):
                rps = [0.0] * len(targets)
                for i in round_order(r, len(targets)):
                    rps[i] = wrk(targets[i], one, args.seconds)
                rounds.append(tuple(rps))
            p3_results(args, rounds, served, args.results)
        if "P3b" in args.only:
            big = json.dumps({"task": "general", "items": items(256, "big")})
            cache_hit(base, big, 256)
            big_rps = [wrk(base + "/v1/scores", big, args.seconds, connections=8) for _ in range(args.rounds)]
            emit(
                Result(
                    "P3b",
                    "cached items/s in 256-item batches (median of wrk runs)",
                    256 * statistics.median(big_rps),
                    50000,
                    "higher",
                    unit="items/s",
                    detail=f"wrk -t1 -c8, {args.seconds} s a run, median of {args.rounds} runs (req/s, in the order "
                    "run: " + ", ".join(f"{r:,.1f}" for r in big_rps) + f") × 256 items; {served}",
                ),
                args.results,
            )
    finally:
        for proc in servers:
            stop(proc)
        shutil.rmtree(apps_dir, ignore_errors=True)
    return 0


def p3_results(args: argparse.Namespace, rounds: list[tuple[float, ...]], served: str, out: Path | None) -> None:
    """P3 and P3 floor from P3's rounds ((cache hits, bare, typed) req/s each, in the order run)."""
    emit(
        Result(
            "P3",
            "cache-hit requests/s ÷ bare FastAPI constant endpoint requests/s",
            statistics.median(hit / bare for hit, bare, _ in rounds),
            0.6,
            "higher",
            detail=f"wrk -t1 -c32, {args.seconds} s a run, median of {args.rounds} rounds' ratios, one run "
            "against each server a round, the order rotating by round (per round, in the order run: cache hits / "
            "bare req/s "
            + ", ".join(f"{h:,.0f} / {b:,.0f}" for h, b, _ in rounds)
            + "; ratios "
            + ", ".join(f"{h / b:.3f}" for h, b, _ in rounds)
            + "; one uvicorn worker each, loopback); bare: a POST route returning a raw Response with a constant "
            f"body, no response model; cache hits: {served}",
        ),
        out,
    )
    emit(
        Result(
            "P3 floor",
            "FastAPI typed route returning a constant response requests/s ÷ bare endpoint requests/s",
            statistics.median(floor / bare for _, bare, floor in rounds),
            None,
            "higher",
            detail="the ceiling of P3 on this framework: the service's request model as the body, its response "
            "model as the return type, the cache hit's response as a constant; measured in P3's rounds (per round, "
            "in the order run: typed / bare req/s "
            + ", ".join(f"{f:,.0f} / {b:,.0f}" for _, b, f in rounds)
            + "; ratios "
            + ", ".join(f"{f / b:.3f}" for _, b, f in rounds)
            + "); cache hits ÷ typed route, per round: "
            + ", ".join(f"{h / f:.3f}" for h, _, f in rounds),
        ),
        out,
    )


if __name__ == "__main__":
    sys.exit(main())
