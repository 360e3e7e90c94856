"""P1 on a GPU: unique prompt tokens/s of the transformers engine ÷ the prefill roofline.

    P1 = unique prompt tokens/s ÷ (peak bf16 FLOP/s ÷ (2 × parameters))

The model is an 8B-class architecture (Llama-3-8B's shape) built with `from_config`
(random bf16 weights: throughput needs no real weights, and nothing is downloaded); the
tokenizer is the embedded SmolLM2's (its ids fit the larger vocabulary). The workload is
summarize-shaped pairs in both orders: "unique" tokens are those the prefix tree really
computes (shared preambles and contexts counted once). Peak FLOP/s is measured in the same
run with a bf16 8192³ matmul, and the spec sheet's dense figure is printed beside it.
P1 counts every parameter, as its goal is defined; the JSON line also carries the fraction of
peak by the FLOPs a prompt token costs (`flops_fraction`), without the embedding (a lookup)
and the lm_head (applied only where a label is read).

Runs unattended: `python -m bench.bench_gpu` on a CUDA machine (torch + transformers only).
`--tokenizer DIR` names a tokenizer directory where the embedded model is not installed (the
GPU image has no `gguf` to convert it); `--out FILE` also writes the result where
`bench.run` picks it up for docs/BENCHMARKS.md (bench/results/gpu.json).
`--revision REV` names the code measured where the tree is a copy without git (by default
the checkout's own, as every other figure records it).
`--tiny --device cpu` runs the same code path on a small config as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from bench.bench_core import POSTS, SUMMARIES
from bench.common import Result, revision

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = LLAMA3_8B | {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# Dense bf16 peaks from NVIDIA's data sheets, by the device name's words; the first match wins,
# so the PCIe and NVL cards (lower clocks and power) come before the SXM parts' bare names.
SPEC_BF16_DENSE = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
}


def measured_peak_flops(device: str, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small config (smoke test of the code path)")
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128, help="pairs per engine call")
    ap.add_argument("--max-batch-tokens", type=int, default=131072)
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the embedded model's)")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    ap.add_argument(
        "--revision",
        help="the code revision measured, where this tree is a copy without git (default: `git rev-parse "
        "--short HEAD` of this checkout, and whether its code has uncommitted changes)",
    )
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from labeler import Labeler, PairItem
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.models import resolve_model

    cfg = AutoConfig.for_model(**(TINY if args.tiny else LLAMA3_8B))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    params = sum(p.numel() for p in model.parameters())
    # The FLOPs a prompt token costs: the embedding is a lookup, and the engine applies the
    # lm_head only where a label is read (`logits_to_keep`), so neither multiplies per token.
    heads = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    matmul_params = params - sum(p.numel() for p in model.parameters() if id(p) in heads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_model(None))
    engine = TransformersEngine.from_objects(
        model, tokenizer, model_id="llama3-8b-shape-random", max_batch_tokens=args.max_batch_tokens
    )
    lab = Labeler(engine)
    items = [PairItem(POSTS[i % 2] + f" (Post {i}.)", *SUMMARIES[i % 2]) for i in range(args.pairs)]
    lab.preferences(items[: min(8, args.batch)], "summarize")  # warm-up
    start_tokens = engine.stats.computed_tokens
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(items), args.batch):
        lab.preferences(items[i : i + args.batch], "summarize")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = engine.stats.computed_tokens - start_tokens
    tps = tokens / elapsed
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = measured_peak_flops(args.device) if args.device.startswith("cuda") else float("nan")
    spec = next((v for k, v in SPEC_BF16_DENSE.items() if k in name), float("nan"))
    roofline = peak / (2 * params)
    r = Result(
        "P1",
        f"unique prompt tokens/s ÷ prefill roofline (transformers engine, {name})",
        tps / roofline,
        0.6,
        "higher",
        detail=f"{params / 1e9:.2f} B parameters ({'a tiny Llama' if args.tiny else 'Llama-3-8B'} shape, random "
        f"{str(dtype).removeprefix('torch.')}), {tokens} unique tokens in "
        f"{elapsed:.1f} s = {tps:,.0f} tokens/s; measured bf16 peak {peak / 1e12:.0f} TFLOP/s (spec dense "
        f"{spec / 1e12:.0f}) → roofline {roofline:,.0f} tokens/s; {args.pairs} pairs, both orders, "
        f"{args.batch} pairs per call",
    )
    # Beside P1: the share of peak by the FLOPs a prompt token costs (`bench.run` prints it).
    flops = {"flops_fraction": tps * 2 * matmul_params / peak, "flops_params": matmul_params}
    rev, dirty = (args.revision, None) if args.revision else revision(Path(__file__).resolve().parent.parent)
    origin = {"date": dt.date.today().isoformat(), "revision": rev, "dirty": dirty}
    line = json.dumps(r.to_dict() | flops | origin)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
