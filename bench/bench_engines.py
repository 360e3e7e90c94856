"""E1 and E2: the vLLM engines against the transformers engine and against each other (CPU).

E1 = pairs/s of the in-process vLLM engine ÷ pairs/s of the transformers engine, both
     orders, on short prompts (a one-line question under the general task, ~300 prompt
     tokens) and on long ones (HH-style dialogues, ~700 prompt tokens under the helpful
     task), each with vLLM's CPU threads bound as the engine binds them by default
     ("bound": one CPU per physical core the process may use on its first NUMA node, as
     many as a CPU quota keeps busy) and as vLLM binds them itself
     ("auto": VLLM_CPU_OMP_THREADS_BIND=auto, one core kept back for its scheduler).
E2 = pairs/s of the in-process vLLM engine ÷ pairs/s of the vllm-remote engine against a
     `labeler vllm-server` of the same model, same engine arguments and thread binding:
     same pairs, both orders, on HH-style dialogues of ~500 prompt tokens (`--e2-tokens`):
     the long workload's dialogue with fewer filler sentences, as many as bring one
     order's prompt nearest that count with the engine's tokenizer. Goal ≥ 0.97.

Every figure is the median of per-round ratios (speeds on a small CPU drift between
rounds): each round runs both sides once, which side goes first alternating from round to
round (with an odd `--rounds`, the first side goes first once more; the details say how
often each did). Each round labels fresh pairs, so no engine finds a previous round's
prompts in its prefix cache; within a round both sides label the same pairs. The details
give the measured prompt tokens per order. Speeds count the labels each call returned, each
checked to be a probability; E2 checks that both sides give every pair the same P(A
preferred) within 1e-4.

Needs vLLM (`make vllm-cpu` on a CPU machine): without it the module says so and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import Result, add_results_option, emit, round_order
from labeler import Labeler, PairItem, PreferenceResult
from labeler.models import resolve_model

# Two engines that label the same pairs agree on P(A preferred) to within this (E2).
P_WIN_TOLERANCE = 1e-4

# Engine arguments both vLLM sides get: a KV cache that fits beside the other engines of
# a run (the CPU default would take a quarter of the free memory).
KV_CACHE = "1G"
TOPICS = [
    ("my sourdough starter", "it smells like nail polish remover and barely rises"),
    ("a used road bike", "the seller wants cash and will not let me test ride it"),
    ("my landlord's repair policy", "the heater has been broken for two weeks in winter"),
    ("learning Spanish at forty", "I forget every word a day after I study it"),
    ("a job offer abroad", "my partner does not want to move and my parents are getting older"),
    ("my teenager's phone use", "she is on it until two in the morning on school nights"),
    ("a leaking kitchen tap", "the handle spins freely and the water never fully stops"),
    ("training for a half marathon", "my knee hurts after every run longer than eight kilometres"),
]
FILLER = [
    "I have read a few articles about it, but they contradict each other and I do not know whom to trust.",
    "Money is a bit tight this month, so I would rather not pay a professional unless I really have to.",
    "I tried the obvious thing last weekend and it made no difference at all, which surprised me.",
    "A friend told me it is normal and I should just wait, but another friend said that is a bad idea.",
    "I would like to understand why it happens, not only what to do about it, so I can avoid it later.",
    "I can spend an hour or two on it this week, and I have basic tools and a little patience.",
]


def short_pairs(n: int, salt: str) -> list[PairItem]:
    """Short prompts: a one-line question and two one-line answers under the general task,
    whose preamble is most of the prompt."""
    items = []
    for i in range(n):
        topic, problem = TOPICS[i % len(TOPICS)]
        question = f"In one sentence: what should I do about {topic} (case {salt}-{i})?"
        good = f"Look at why {problem.split(' and ')[0]} first, then try the cheapest fix for a week."
        items.append(PairItem(question, good, "I do not know."))
    return items


FILLERS = 8  # the filler sentences of a long dialogue


def dialogue_pairs(n: int, salt: str, fillers: int = FILLERS) -> list[PairItem]:
    """HH-style multi-turn dialogues (`Human:` / `Assistant:` turns) under the helpful task,
    and two candidate final replies. `fillers` (0 to FILLERS) filler sentences of the user's: up to
    four in the turn that restates the problem, the rest in an earlier exchange that is
    left out without them. With all eight, ~700 prompt tokens with the task's preamble."""
    items = []
    for i in range(n):
        topic, problem = TOPICS[i % len(TOPICS)]
        late, early = min(fillers, 4), max(fillers - 4, 0)
        turns = [
            f"Human: I need advice about {topic} (case {salt}-{i}). The problem is that {problem}.",
            f"Assistant: I am sorry to hear that. Can you tell me a bit more about {topic} and what you have tried?",
        ]
        if early:
            turns += [
                "Human: " + " ".join(FILLER[(i + k) % len(FILLER)] for k in range(early)),
                f"Assistant: That helps. Before I suggest anything: how long has {problem.split(' and ')[0]}, "
                "and has anything changed recently?",
            ]
        turns += [
            "Human: " + "".join(FILLER[(i + k + 2) % len(FILLER)] + " " for k in range(late)) + f"Also, {problem}.",
            "Assistant: Thanks. One more question: what outcome would you be happy with in a month?",
            f"Human: Honestly I just want {topic} to stop being a daily worry. What would you do in my place?",
        ]
        good = (
            f"Here is a plan for {topic}. First, write down exactly when the problem shows up for three days, "
            "so you can see the pattern. Second, try the cheapest fix that matches that pattern and give it a "
            "week. Third, if nothing changes, ask someone with hands-on experience; a short visit usually costs "
            "less than repeated guessing."
        )
        bad = f"I cannot help with {topic}. You should ask someone else."
        items.append(PairItem("\n\n".join(turns), good, bad))
    return items


# A workload: a maker of n fresh pairs (salted) and the task they are labeled under.
Workload = tuple[Callable[[int, str], list[PairItem]], str]
WORKLOADS: dict[str, Workload] = {"short": (short_pairs, "general"), "long": (dialogue_pairs, "helpful")}


def fitted_dialogues(lab: Labeler, target: int) -> tuple[Workload, int, int]:
    """(workload, filler sentences, prompt tokens per order): the dialogues whose count of
    filler sentences brings one order's prompt nearest `target` tokens."""
    best = min(
        range(FILLERS + 1),
        key=lambda f: abs(prompt_tokens(lab, (functools.partial(dialogue_pairs, fillers=f), "helpful")) - target),
    )
    workload = (functools.partial(dialogue_pairs, fillers=best), "helpful")
    return workload, best, prompt_tokens(lab, workload)


@dataclass
class Side:
    """One side of a comparison: a labeler and, for the CPU account, the processes that do
    its frontend work (render, send, receive) and its engine work (vLLM's engine core and
    workers; none for the transformers engine, which computes in this process)."""

    lab: Labeler
    frontend: list[psutil.Process] = field(default_factory=lambda: [psutil.Process()])
    engine: list[psutil.Process] = field(default_factory=list)


@dataclass
class Run:
    pairs_per_s: float
    frontend_cpu: float  # CPU seconds per pair
    engine_cpu: float
    results: list[PreferenceResult] = field(default_factory=list, repr=False)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def measure(side: Side, items: list[PairItem], task: str, batch: int) -> Run:
    """`side` labeling `items` in calls of `batch`: pairs/s and CPU seconds per pair, counted
    from the labels returned, each checked to be a probability, one per pair."""
    cpu0 = cpu_seconds(side.frontend), cpu_seconds(side.engine)
    results: list[PreferenceResult] = []
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        results += await side.lab.apreferences(items[i : i + batch], task)
    wall = time.perf_counter() - t0
    n = len(results)
    if n != len(items) or not all(0.0 <= r.p_a <= 1.0 for r in results):
        raise RuntimeError(f"{len(items)} pairs gave {n} labels, or some label is not a probability")
    return Run(n / wall, (cpu_seconds(side.frontend) - cpu0[0]) / n, (cpu_seconds(side.engine) - cpu0[1]) / n, results)


async def alternate(
    a: Side, b: Side, workload: Workload, rounds: int, n: int, batch: int, tag: str
) -> list[tuple[Run, Run]]:
    """(a's run, b's run) per round on the same fresh pairs, in `round_order` (a first in
    even rounds, b in odd ones)."""
    make, task = workload
    await a.lab.apreferences(make(2, f"{tag}-warm"), task)
    await b.lab.apreferences(make(2, f"{tag}-warm"), task)
    out = []
    for r in range(rounds):
        items = make(n, f"{tag}-{r}")
        runs: list[Run | None] = [None, None]
        for i in round_order(r, 2):
            runs[i] = await measure((a, b)[i], items, task, batch)
        out.append((runs[0], runs[1]))
    return out


def prompt_tokens(lab: Labeler, workload: Workload) -> int:
    make, task = workload
    item = make(1, "count")[0]
    return len(lab.render_pairwise(task, item.context, item.response_a, item.response_b).prompt_token_ids)


def max_p_win_gap(rounds: list[tuple[Run, Run]]) -> float:
    """The largest difference in P(A preferred) between the two sides on the same pair."""
    return max(abs(x.p_a - y.p_a) for a, b in rounds for x, y in zip(a.results, b.results, strict=True))


def median_ratio(rounds: list[tuple[Run, Run]]) -> float:
    return statistics.median(a.pairs_per_s / b.pairs_per_s for a, b in rounds)


def describe(rounds: list[tuple[Run, Run]], a: str, b: str) -> str:
    per = ", ".join(f"{x.pairs_per_s:.2f} / {y.pairs_per_s:.2f}" for x, y in rounds)
    first_a = (len(rounds) + 1) // 2
    return (
        f"median of {len(rounds)} rounds' ratios, which side first alternating by round ({a} first in {first_a}, "
        f"{b} in {len(rounds) - first_a}; {a} / {b} pairs/s: {per})"
    )


def cpu_account(rounds: list[tuple[Run, Run]], a: str, b: str) -> str:
    def med(f: Callable[[Run], float], i: int) -> float:
        return statistics.median(f(r[i]) for r in rounds)

    return (
        f"CPU seconds per pair, medians ({a} / {b}): frontend {med(lambda r: r.frontend_cpu, 0):.3f} / "
        f"{med(lambda r: r.frontend_cpu, 1):.3f}, vLLM engine core and worker {med(lambda r: r.engine_cpu, 0):.2f} / "
        f"{med(lambda r: r.engine_cpu, 1):.2f}"
    )


@contextlib.contextmanager
def without_environ(name: str) -> Iterator[None]:
    """`name` removed from os.environ inside the block, then as it was."""
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


async def run_e1(args: argparse.Namespace, out: Path | None) -> None:
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.engines.vllm_cpu import THREADS_BIND_ENV, scoped_environ
    from labeler.engines.vllm_engine import VLLMEngine

    model = resolve_model(args.model)
    tf = Side(Labeler(TransformersEngine(model)))
    tokens = {w: prompt_tokens(tf.lab, WORKLOADS[w]) for w in WORKLOADS}
    for binding, how in (("auto", "bound by vLLM itself"), ("bound", "bound by the engine")):
        scope = scoped_environ({THREADS_BIND_ENV: "auto"}) if binding == "auto" else without_environ(THREADS_BIND_ENV)
        with scope:
            engine = VLLMEngine(model, kv_cache_memory_bytes=KV_CACHE, max_num_seqs=args.max_num_seqs)
            # What vLLM's processes were started with: the engine's own choice, else the environment's.
            bind = engine.env.get(THREADS_BIND_ENV, os.environ.get(THREADS_BIND_ENV))
        bind = f"{THREADS_BIND_ENV}={bind}" if bind is not None else f"{THREADS_BIND_ENV} unset (vLLM's default)"
        vllm = Side(Labeler(engine), engine=psutil.Process().children(recursive=True))
        try:
            for workload in ("short", "long"):
                n = args.pairs if workload == "short" else args.long_pairs
                rounds = await alternate(vllm, tf, WORKLOADS[workload], args.rounds, n, args.batch, f"e1{binding}")
                emit(
                    Result(
                        f"E1 {workload} {binding}",
                        f"vLLM engine pairs/s ÷ transformers engine pairs/s (CPU, both orders, {workload} prompts, "
                        f"vLLM threads {how})",
                        median_ratio(rounds),
                        None,
                        "higher",
                        detail=f"{n} pairs a round in calls of {args.batch}, ~{tokens[workload]} prompt tokens per "
                        f"order; {bind}; {describe(rounds, 'vLLM', 'transformers')}",
                    ),
                    out,
                )
        finally:
            await engine.aclose()


async def run_e2(args: argparse.Namespace, out: Path | None) -> None:
    from labeler.engines.vllm_engine import VLLMEngine
    from labeler.engines.vllm_remote import VLLMRemoteEngine
    from tests.fixtures.vllm import VLLMServer

    model = resolve_model(args.model)
    server = VLLMServer(
        model, Path(args.server_log), "--kv-cache-memory-bytes", KV_CACHE, "--max-num-seqs", str(args.max_num_seqs)
    )
    server.start()
    try:
        # Both engines start at once: the server's start overlaps this one's.
        local = VLLMEngine(model, kv_cache_memory_bytes=KV_CACHE, max_num_seqs=args.max_num_seqs)
        try:
            server.wait_ready(timeout=900)
            remote = VLLMRemoteEngine([server.url], model, timeout=3600)  # a starved CPU is slow, not down
            try:
                assert server.proc is not None
                api = psutil.Process(server.proc.pid)
                theirs = {api.pid} | {p.pid for p in api.children(recursive=True)}
                ours = [p for p in psutil.Process().children(recursive=True) if p.pid not in theirs]
                in_process = Side(Labeler(local), engine=ours)
                over_http = Side(Labeler(remote), frontend=[psutil.Process(), api], engine=api.children(recursive=True))
                workload, fillers, tokens = fitted_dialogues(in_process.lab, args.e2_tokens)
                rounds = await alternate(
                    in_process, over_http, workload, args.rounds, args.long_pairs, args.batch, "e2"
                )
            finally:
                await remote.aclose()
        finally:
            await local.aclose()
    finally:
        server.stop()
    gap = max_p_win_gap(rounds)
    if gap > P_WIN_TOLERANCE:
        raise RuntimeError(f"in-process and remote P(A preferred) differ by {gap:.2e} on a pair (> {P_WIN_TOLERANCE})")
    emit(
        Result(
            "E2",
            "in-process vLLM engine pairs/s ÷ vllm-remote engine pairs/s (CPU, both orders, HH-style prompts of "
            f"~{tokens} tokens)",
            median_ratio(rounds),
            0.97,
            "higher",
            detail=f"{args.long_pairs} HH-style pairs a round in calls of {args.batch}, ~{tokens} prompt tokens per "
            f"order ({fillers} of the long dialogue's {FILLERS} filler sentences: the count nearest "
            f"{args.e2_tokens} tokens), "
            f"against `labeler vllm-server` with the same engine arguments; "
            f"{describe(rounds, 'in-process', 'remote')}; {cpu_account(rounds, 'in-process', 'remote')} (frontend: "
            f"this process, plus the API server for remote); both sides' P(A preferred) on every pair within "
            f"{P_WIN_TOLERANCE:g} (largest difference {gap:.1e})",
        ),
        out,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["e1", "e2"], help="run one of the two (default: both)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=16, help="short pairs a round")
    ap.add_argument("--long-pairs", type=int, default=16, help="dialogue pairs a round (E1 long, E2)")
    ap.add_argument("--e2-tokens", type=int, default=500, help="prompt tokens per order E2's dialogues aim at")
    ap.add_argument("--batch", type=int, default=16, help="pairs per labeling call")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--server-log", default="/tmp/labeler-bench-vllm-server.log")
    add_results_option(ap)
    args = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken build raises more than ImportError
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SystemExit(f"E1 and E2 need vLLM, which does not import ({why}): run `make vllm-cpu`") from None
    if args.only in (None, "e1"):
        asyncio.run(run_e1(args, args.results))
    if args.only in (None, "e2"):
        asyncio.run(run_e2(args, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
