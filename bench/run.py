"""Run the benchmarks, store each module's figures, and write docs/BENCHMARKS.md from them.

Each entry of MODULES runs in its own process, which appends one JSON object per figure (see
bench/common.py:Result) to a file this runner names with `--results`; lines that are not a
figure are skipped with a warning. As soon as an entry finishes, its figures, with the date,
a line describing the machine and the code revision (`git rev-parse --short HEAD`, and
whether `git status` lists changes in labeler/, service/, bench/ but its results, or
tests/fixtures/), replace its file in the results directory (`<entry>.json`, e.g.
`bench_engines-e2.json`; `--results-dir`, by default bench/results). The document is then
rendered from every stored file, so running some entries (`--only`) replaces their rows and
keeps the others'; each row's detail names the revision it was measured at, and where the
stored rows differ in date (or machine), when (and where).

An entry that fails keeps the figures it measured before failing and, for the others, its
previous ones, which the document marks as not re-measured in the last run; the other entries
still run, and the exit status is 1. `--module-args` passes arguments to one entry's module
(`--only bench_http --module-args="--only P3"`): the figures it measures replace theirs, and
the entry's other stored figures are kept with their own date and revision.

Figures are ratios measured within one run of their module, so they compare like with like
on whatever machine runs them; absolute speeds are given as context, and where one has a goal
the document says that it holds for the machine class it was measured on. How each figure is
computed is in its detail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import describe_revision, revision

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
GPU_FILE = "gpu.json"  # in the results directory
GPU_HOW = (
    "P1 = unique prompt tokens/s ÷ (peak bf16 FLOP/s ÷ (2 × parameters)), goal ≥ 0.6, on a CUDA machine: "
    "`python -m bench.bench_gpu --out bench/results/gpu.json` (Llama-3-8B shape, random bf16 weights via "
    "`from_config`, transformers engine; the bf16 peak is measured in the same run with an 8192³ matmul). "
    "P1 counts every parameter, as its goal is defined; beside it, the same run's tokens/s and peak by the "
    "FLOPs a prompt token costs: 2 × the parameters without the embedding (a lookup) and the lm_head "
    "(applied only where a label is read)."
)
# Where, when and at which revision a figure was measured: the record's, or a kept row's own.
ORIGIN = ("date", "machine", "revision", "dirty", "args")
RESULT_KEYS = {"name", "title", "value", "goal", "better", "unit", "met"}
# Titles stored by earlier runs that said more than was measured, as the modules title them now.
RETITLED = {
    "cache-hit p99 latency (all rounds' hits pooled) while a 64-pair miss batch is prepared": (
        "cache-hit p99 latency (all rounds' hits pooled) in the 1 s after a 64-pair miss batch is sent"
    ),
}


class ModuleFailed(RuntimeError):
    pass


def read_results(path: Path, command: str) -> list[dict]:
    """The figures in `path` (one JSON object a line); other lines are skipped with a warning."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for n, line in enumerate(lines, start=1):
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict) or not r.keys() >= RESULT_KEYS or not isinstance(r["value"], int | float):
            print(f"{command}: line {n} of its results is not a figure, skipped: {line[:200]!r}", file=sys.stderr)
            continue
        out.append(r)
    return out


def run_module(module: str, extra: list[str]) -> tuple[list[dict], str | None]:
    """(the figures `python -m module *extra` wrote, None), or, where it exits non-zero or writes
    none, (the figures it wrote, why it failed)."""
    command = " ".join([module, *extra])
    print(f"running {command} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="labeler-bench-") as tmp:
        out = Path(tmp) / "results.jsonl"
        cmd = [sys.executable, "-m", module, *extra, "--results", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        results = read_results(out, command)
    if proc.returncode != 0:
        return results, f"{command} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    if not results:
        return results, f"{command} wrote no figures:\n{proc.stderr[-4000:]}"
    return results, None


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


def origin(args: list[str]) -> dict:
    """This run's date, machine, revision (and whether it was dirty) and the module's arguments."""
    rev, dirty = revision(ROOT)
    return {"date": dt.date.today().isoformat(), "machine": machine(), "revision": rev, "dirty": dirty, "args": args}


def row_origin(rec: dict, r: dict) -> dict:
    """Where, when and at which revision row `r` of record `rec` was measured."""
    return r.get("kept") or {k: rec.get(k) for k in ORIGIN}


def store(
    results_dir: Path, entry: str, module: str, new: dict, results: list[dict], failed: bool, partial: bool
) -> None:
    """Replace `entry`'s stored figures with `results`, measured at `new` (`origin`), written whole,
    then renamed into place. Where the run `failed`, or measured only part of the module's
    figures on purpose (`partial`), the previous record's figures it did not measure are kept,
    each with its own origin; after a failure they are marked as not re-measured ("failed": the
    date of that run)."""
    path = results_dir / f"{entry}.json"
    rows = results
    if (failed or partial) and path.is_file():
        old = json.loads(path.read_text())
        fresh = {r["name"]: r for r in results}
        # The date of the failed run that did not re-measure a kept figure, or of an earlier one.
        rows = [
            fresh.pop(r["name"], None)
            or r | {"kept": row_origin(old, r), "failed": new["date"] if failed else r.get("failed")}
            for r in old["results"]
        ] + list(fresh.values())  # in the previous record's order
    if not rows:
        return
    record = {"module": module, **new, "failed": failed, "results": rows}
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = results_dir / f".{entry}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def stored(results_dir: Path) -> list[dict]:
    """The stored record of every MODULES entry that has one, in MODULES' order."""
    return [json.loads(f.read_text()) for entry, _, _ in MODULES if (f := results_dir / f"{entry}.json").is_file()]


def render(records: list[dict], gpu_file: Path | None = None) -> str:
    """BENCHMARKS.md from stored records ({"date", "machine", "revision", "dirty", "results":
    [Result dicts]}) and the GPU result file."""
    rows = [(rec, r, row_origin(rec, r)) for rec in records for r in rec["results"]]
    dates = sorted({o["date"] for _, _, o in rows})
    machines = sorted({o["machine"] for _, _, o in rows})
    lines = ["# Benchmarks", ""]
    if rows:
        when = dates[0] if len(dates) == 1 else f"between {dates[0]} and {dates[-1]}"
        lines += [
            "Figures of the modules `make bench` runs (`python -m bench.run`), each module in its own process, "
            f"measured on {'; '.join(machines)}, {when}. Each ratio is measured within one run of its module; "
            "how each figure is computed is in its detail, which also names the code revision it was measured at "
            "(`git rev-parse --short HEAD`). `python -m bench.run --only ENTRY` reruns some entries and keeps the "
            "others' rows.",
            "",
        ]
    else:
        lines += ["Nothing measured yet: run `make bench`.", ""]
    lines += ["| id | what | value | goal | met |", "| --- | --- | --- | --- | --- |"]
    details, absolute = [], []
    for rec, r, o in rows:
        op = "≤" if r["better"] == "lower" else "≥"
        unit = "" if r["unit"] == "ratio" else f" {r['unit']}"
        goal = "—" if r["goal"] is None else f"{op} {r['goal']}{unit}"
        met = {None: "—", True: "yes", False: "**no**"}[r["met"]]
        title = RETITLED.get(r["title"], r["title"])
        lines.append(f"| {r['name']} | {title} | {r['value']:.3f}{unit} | {goal} | {met} |")
        if r["goal"] is not None and r["unit"] != "ratio":
            absolute.append((r, o["machine"]))
        when = [f"measured {o['date']}"] if len(dates) > 1 else []
        when += [f"on {o['machine']}"] if len(machines) > 1 else []
        when = ", ".join(x for x in (" ".join(when), describe_revision(o.get("revision"), o.get("dirty"))) if x)
        notes = []
        if r.get("failed"):
            if rec.get("failed"):
                notes.append(f"not re-measured in the last run (its entry failed on {r['failed']})")
            else:
                notes.append(f"not re-measured since its entry failed on {r['failed']}")
        detail = "; ".join(x for x in (*notes, when, r.get("detail", "")) if x)
        details.append(f"- **{r['name']}**: {detail}")
    for r, where in absolute:
        lines += [
            "",
            f"{r['name']}'s goal is an absolute speed ({r['unit']}), not a ratio: it holds for the machine class it "
            f"was measured on ({where}), not for another.",
        ]
    lines += ["", "## Details", "", *details]
    lines += ["", "## GPU (P1)", "", GPU_HOW, ""]
    gpu = [json.loads(line) for line in gpu_file.read_text().splitlines()] if gpu_file and gpu_file.is_file() else []
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
            f"measured {r.get('date', '?')}, {describe_revision(r.get('revision'), r.get('dirty'))}: "
            f"{r['detail']}{flops}"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="the document to write")
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the figures are stored and read from (default: bench/results; another keeps a trial run apart)",
    )
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
    ap.add_argument(
        "--module-args",
        type=shlex.split,
        default=[],
        metavar="ARGS",
        help='more arguments for the module of the one entry --only names (e.g. "--only P3"); its other '
        "stored figures are kept",
    )
    args = ap.parse_args()
    chosen = [
        (entry, module, own)
        for entry, module, own in MODULES
        if not args.only or entry in args.only or module in args.only
    ]
    if args.module_args and (args.render_only or len(chosen) != 1):
        ap.error("--module-args needs --only with exactly one entry")
    failed = []
    for entry, module, own in [] if args.render_only else chosen:
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            continue
        extra = (
            ["--baseline", str(args.baseline.resolve())] if args.baseline and module == "bench.bench_latency" else []
        )
        run_args = own + extra + args.module_args
        new = origin(run_args)  # before the run: the code it measures
        results, why = run_module(module, run_args)
        if why is not None:
            kept = f"the {len(results)} figures it measured are stored, " if results else ""
            print(f"{entry} failed, {kept}its other stored figures are kept: {why}", file=sys.stderr, flush=True)
            failed.append(entry)
        store(args.results_dir, entry, module, new, results, why is not None, bool(args.module_args))
    Path(args.out).write_text(render(stored(args.results_dir), args.results_dir / GPU_FILE))
    print(Path(args.out).read_text())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
