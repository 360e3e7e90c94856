"""Run the benchmarks, store each module's figures, and write docs/BENCHMARKS.md from them.

Each benchmark module prints one JSON object per figure (see bench/common.py:Result). Each
entry of MODULES runs in its own process; as soon as it finishes, its figures, with the date
and a line describing the machine, replace its file in bench/results/ (`<entry>.json`, e.g.
`bench_engines-e2.json`). The document is then rendered from every stored file, so running
some entries (`--only`) replaces their rows and keeps the others'; where the stored files
differ in date (or machine), each row's detail says when (and where) it was measured. An
entry that fails keeps its previous file, the others still run, and the exit status is 1.

Figures are ratios measured within one run of their module, so they compare like with like
on whatever machine runs them; absolute speeds are given only as context. How each figure
is computed is in its detail.
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
RESULTS = ROOT / "bench" / "results"
# (entry, module, its arguments): E1 and E2 each in a fresh process, so that neither is measured
# in a process whose engines the other has started and closed. An entry's figures are stored in
# RESULTS / f"{entry}.json".
MODULES = [
    ("bench_core", "bench.bench_core", []),
    ("bench_engines-e1", "bench.bench_engines", ["--only", "e1"]),
    ("bench_engines-e2", "bench.bench_engines", ["--only", "e2"]),
    ("bench_http", "bench.bench_http", []),
    ("bench_latency", "bench.bench_latency", []),
    ("bench_fingerprint", "bench.bench_fingerprint", []),
]
GPU_RESULT = ROOT / "bench" / "results" / "gpu.json"
GPU_HOW = (
    "P1 = unique prompt tokens/s ÷ (peak bf16 FLOP/s ÷ (2 × parameters)), goal ≥ 0.6, on a CUDA machine: "
    "`python -m bench.bench_gpu --out bench/results/gpu.json` (Llama-3-8B shape, random bf16 weights via "
    "`from_config`, transformers engine; the bf16 peak is measured in the same run with an 8192³ matmul). "
    "P1 counts every parameter, as its goal is defined; beside it, the same run's tokens/s and peak by the "
    "FLOPs a prompt token costs: 2 × the parameters without the embedding (a lookup) and the lm_head "
    "(applied only where a label is read)."
)


class ModuleFailed(RuntimeError):
    pass


def run_module(module: str, extra: list[str]) -> list[dict]:
    """The figures `python -m module *extra` prints; ModuleFailed if it exits non-zero or
    prints none."""
    command = " ".join([module, *extra])
    print(f"running {command} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", module, *extra], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModuleFailed(f"{command} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not results:
        raise ModuleFailed(f"{command} printed no figures:\n{proc.stderr[-4000:]}")
    return results


def machine() -> str:
    """The platform, the CPU model where /proc/cpuinfo names it, and the CPUs."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else ""
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    line = f"{platform.system()} {platform.machine()}" + (f", {model}" if model else "") + f", {cpus} CPUs"
    return line + (f" ({usable} usable by the benchmarks)" if usable != cpus else "")


def store(entry: str, module: str, args: list[str], results: list[dict]) -> None:
    """Replace `entry`'s stored figures (written whole, then renamed into place)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "module": module,
        "args": args,
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "results": results,
    }
    tmp = RESULTS / f".{entry}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, RESULTS / f"{entry}.json")


def stored() -> list[dict]:
    """The stored record of every MODULES entry that has one, in MODULES' order."""
    return [json.loads(f.read_text()) for entry, _, _ in MODULES if (f := RESULTS / f"{entry}.json").is_file()]


def render(records: list[dict]) -> str:
    """BENCHMARKS.md from stored records ({"date", "machine", "results": [Result dicts]}) and
    the GPU result file."""
    dates = sorted({rec["date"] for rec in records})
    machines = sorted({rec["machine"] for rec in records})
    lines = ["# Benchmarks", ""]
    if records:
        when = dates[0] if len(dates) == 1 else f"between {dates[0]} and {dates[-1]}"
        lines += [
            "Figures of the modules `make bench` runs (`python -m bench.run`), each module in its own process, "
            f"measured on {'; '.join(machines)}, {when}. Each ratio is measured within one run of its module; "
            "how each figure is computed is in its detail. `python -m bench.run --only ENTRY` reruns some "
            "entries and keeps the others' rows.",
            "",
        ]
    else:
        lines += ["Nothing measured yet: run `make bench`.", ""]
    lines += ["| id | what | value | goal | met |", "| --- | --- | --- | --- | --- |"]
    details = []
    for rec in records:
        where = [f"measured {rec['date']}"] if len(dates) > 1 else []
        where += [f"on {rec['machine']}"] if len(machines) > 1 else []
        for r in rec["results"]:
            op = "≤" if r["better"] == "lower" else "≥"
            unit = "" if r["unit"] == "ratio" else f" {r['unit']}"
            goal = "—" if r["goal"] is None else f"{op} {r['goal']}{unit}"
            met = {None: "—", True: "yes", False: "**no**"}[r["met"]]
            lines.append(f"| {r['name']} | {r['title']} | {r['value']:.3f}{unit} | {goal} | {met} |")
            detail = "; ".join(x for x in (" ".join(where), r.get("detail", "")) if x)
            if detail:
                details.append(f"- **{r['name']}**: {detail}")
    lines += ["", "## Details", "", *details]
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    entries = [entry for entry, _, _ in MODULES]
    modules = list(dict.fromkeys(module for _, module, _ in MODULES))
    ap.add_argument(
        "--only",
        nargs="+",
        choices=entries + modules,
        metavar="ENTRY",
        help=f"entries to run (default: all): {', '.join(entries)}; a module name runs all its entries",
    )
    ap.add_argument("--render-only", action="store_true", help="run nothing: write the document from the stored files")
    ap.add_argument("--baseline", type=Path, help="L1: compare with a checkout of another revision too")
    args = ap.parse_args()
    failed = []
    for entry, module, own in [] if args.render_only else MODULES:
        if args.only and entry not in args.only and module not in args.only:
            continue
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            continue
        extra = (
            ["--baseline", str(args.baseline.resolve())] if args.baseline and module == "bench.bench_latency" else []
        )
        try:
            results = run_module(module, own + extra)
        except ModuleFailed as e:
            print(f"{entry} failed, its stored figures are kept: {e}", file=sys.stderr, flush=True)
            failed.append(entry)
            continue
        store(entry, module, own + extra, results)
    Path(args.out).write_text(render(stored()))
    print(Path(args.out).read_text())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
