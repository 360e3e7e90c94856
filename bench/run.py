"""Run every benchmark and write docs/BENCHMARKS.md.

Each benchmark module prints one JSON object per figure (see bench/common.py:Result).
Figures are ratios measured within one run, so they compare like with like on whatever
machine runs them; absolute speeds are given only as context.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (module, its arguments): E1 and E2 each in a fresh process, so that neither is measured in a
# process whose engines the other has started and closed.
MODULES = [
    ("bench.bench_core", []),
    ("bench.bench_engines", ["--only", "e1"]),
    ("bench.bench_engines", ["--only", "e2"]),
    ("bench.bench_http", []),
    ("bench.bench_latency", []),
    ("bench.bench_fingerprint", []),
]
# P1 needs a CUDA machine, which `make bench` does not run on: `bench.bench_gpu --out` writes
# its JSON line here, and every render of BENCHMARKS.md carries it along.
GPU_RESULT = ROOT / "bench" / "results" / "gpu.json"
GPU_HOW = (
    "P1 = unique prompt tokens/s ÷ (peak bf16 FLOP/s ÷ (2 × parameters)), goal ≥ 0.6, on a CUDA machine: "
    "`python -m bench.bench_gpu --out bench/results/gpu.json` (Llama-3-8B shape, random bf16 weights via "
    "`from_config`, transformers engine; the bf16 peak is measured in the same run with an 8192³ matmul). "
    "P1 counts every parameter, as its goal is defined; beside it, the same run's tokens/s and peak by the "
    "FLOPs a prompt token costs: 2 × the parameters without the embedding (a lookup) and the lm_head "
    "(applied only where a label is read)."
)


def run_module(module: str, extra: list[str]) -> list[dict]:
    if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
        return []
    command = " ".join([module, *extra])  # the engines module runs twice, with other arguments
    print(f"running {command} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", module, *extra], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def render(results: list[dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Ratios measured in one run of `make bench` (`python -m bench.run`), on "
        f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores, "
        f"{dt.date.today().isoformat()}. Goals come from the issues; speeds are never asserted in tests.",
        "",
        "| id | what | value | goal | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        op = "≤" if r["better"] == "lower" else "≥"
        unit = "" if r["unit"] == "ratio" else f" {r['unit']}"
        goal = "—" if r["goal"] is None else f"{op} {r['goal']}{unit}"
        met = {None: "—", True: "yes", False: "**no**"}[r["met"]]
        lines.append(f"| {r['name']} | {r['title']} | {r['value']:.3f}{unit} | {goal} | {met} |")
    lines += ["", "## Details", ""]
    lines += [f"- **{r['name']}**: {r['detail']}" for r in results if r.get("detail")]
    lines += ["", "## GPU (P1)", "", GPU_HOW, ""]
    gpu = [json.loads(line) for line in GPU_RESULT.read_text().splitlines()] if GPU_RESULT.is_file() else []
    if not gpu:
        lines.append("Not measured yet: run the command above on a CUDA machine.")
    for r in gpu:
        met = {None: "—", True: "yes", False: "**no**"}[r["met"]]
        flops = ""
        if r.get("flops_fraction") is not None:
            flops = f"; by the FLOPs a token costs (2 × {r['flops_params'] / 1e9:.2f} B parameters): "
            flops += f"{r['flops_fraction']:.3f} of peak"
        lines.append(
            f"- **{r['name']}** = {r['value']:.3f} (goal ≥ {r['goal']}, met: {met}), {r['title']}, "
            f"measured {r.get('date', '?')}: {r['detail']}{flops}"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    names = list(dict.fromkeys(module for module, _ in MODULES))
    ap.add_argument(
        "--only", nargs="*", choices=names, metavar="MODULE", help=f"modules to run (default: all): {', '.join(names)}"
    )
    ap.add_argument("--baseline", type=Path, help="L1: compare with a checkout of another revision too")
    args = ap.parse_args()
    results: list[dict] = []
    for module, own in MODULES:
        if args.only and module not in args.only:
            continue
        extra = ["--baseline", str(args.baseline)] if args.baseline and module == "bench.bench_latency" else []
        results += run_module(module, own + extra)
    Path(args.out).write_text(render(results))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
