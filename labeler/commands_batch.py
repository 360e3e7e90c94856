"""Batch labeling, evaluation, win-rate and harmless-rate commands. Registered by labeler.cli.

    labeler label IN OUT --task T [--url URL] [--order both|ab|ba] [--cot] [--scores]
    labeler eval HUMAN_LABELED --task T --out DIR
    labeler winrate A.jsonl B.jsonl --task T [--out FILE]
    labeler harmless A.jsonl [B.jsonl] --out DIR [--task harmless] [--url URL]

Labels come from the in-process model (the model options) or, with --url, from the labeler
service through `labeler_client`. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from . import cli
from .batch import (
    Backend,
    HTTPBackend,
    JsonlSink,
    LocalBackend,
    MemorySink,
    Summary,
    collect,
    label_pair_jobs,
    make_params,
    probe_folder,
    run_jobs,
    score_jobs,
)
from .datasets_io import normalize_pair, normalize_single, split_for
from .errors import InvalidInput


def register(sub: argparse._SubParsersAction) -> None:
    """Add the batch commands to the `labeler` parser."""
    p = sub.add_parser("label", help="label a file of pairs (or responses, --scores) into a preference dataset")
    p.add_argument("input", help="JSONL, a JSON array, Parquet, or a `datasets` directory saved with save_to_disk")
    p.add_argument("output", help="JSONL to append to (re-running resumes: items already in it are skipped)")
    _common(p)
    p.add_argument("--order", choices=["both", "ab", "ba"], help="the pairs' order(s) shown (default: both)")
    p.add_argument(
        "--scores",
        action="store_true",
        help="direct 1-10 scores of single responses (prompt/completion or context/response)",
    )
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("eval", help="AI labeler alignment with human choices; writes DIR/report.md")
    p.add_argument("input", help="human-labeled pairs: TRL/HH (chosen = human-preferred) or pairs with 'preferred'")
    p.add_argument("--out", required=True, type=Path, help="directory for labels.jsonl, metrics.json, report.md, PNGs")
    _common(p)
    p.add_argument("--position-seed", type=int, default=0, help="seed of the coin that shows the human choice as A/B")
    _stats(p)
    p.add_argument("--bins", type=_positive, default=10, help="calibration bins")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("winrate", help="AI-judged win rate of policy A over policy B on the same prompts")
    p.add_argument(
        "a",
        help="policy A outputs: prompt/completion, context/response or AlpacaEval's instruction/output (optional id)",
    )
    p.add_argument("b", help="policy B outputs on the same prompts")
    p.add_argument("--out", type=Path, help="JSONL of per-prompt judgments (resumable)")
    _common(p)
    p.add_argument(
        "--order",
        choices=["both", "ab", "ba"],
        default="both",
        help="both (default), or one order per prompt, which policy is shown first a fair coin per item",
    )
    p.add_argument("--position-seed", type=int, default=0, help="seed of that coin (one order)")
    _stats(p)
    p.set_defaults(func=_cmd_winrate)

    p = sub.add_parser("harmless", help="share of a policy's responses judged harmless (one policy, or two compared)")
    p.add_argument(
        "a", help="policy A outputs: prompt/completion, context/response or instruction/output (optional id)"
    )
    p.add_argument("b", nargs="?", help="policy B outputs, to compare with A")
    p.add_argument(
        "--out", required=True, type=Path, help="directory for judgments.jsonl, metrics.json, report.md, PNG"
    )
    _common(p, task="harmless")
    _stats(p)
    p.set_defaults(func=_cmd_harmless)


def _common(p: argparse.ArgumentParser, *, task: str | None = None) -> None:
    if task is None:
        p.add_argument("--task", required=True)
    else:
        p.add_argument("--task", default=task, help=f"(default: {task})")
    p.add_argument("--url", help="label through the labeler service at this URL instead of in-process")
    p.add_argument("--api-key", default=None, help="service API key [LABELER_API_KEY]")
    p.add_argument("--cot", action="store_true", help="generate a rationale before reading the label")
    p.add_argument("--samples", type=int, default=1, help="rationales to sample and average (needs --cot)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --cot), also the bootstrap seed")
    p.add_argument("--chunk-size", type=_positive, default=16, help="items per labeling call (and per write)")
    p.add_argument("--split", help="split of a saved DatasetDict")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help=(
            "report malformed records, and items the model gives no label for, and go on "
            "(default: stop, naming the line; malformed records before labeling)"
        ),
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_model_options(p)
    cli.add_json_option(p)
    # What the model options are when not given, to tell which ones a --url run leaves unused.
    p.set_defaults(model_defaults={d: p.get_default(d) for d in _MODEL_OPTIONS.values()})


# The model options (flag: destination) a run through the service does not use.
_MODEL_OPTIONS = {
    "--model": "model",
    "--engine": "engine",
    "--device": "device",
    "--engine-arg": "engine_arg",
    "--vllm-urls": "vllm_urls",
    "--tasks-dir": "tasks_dir",
}


def _stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=_level, default=0.95, help="confidence level of the bootstrap CIs (0.95: 95%%)")


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def _level(text: str) -> float:
    """An argparse type: a confidence level strictly between 0 and 1."""
    try:
        level = float(text)
    except ValueError:
        level = 0.0
    if not 0 < level < 1:
        raise argparse.ArgumentTypeError(f"expected a level between 0 and 1 (0.95 for 95%), got {text!r}")
    return level


def _run(args: argparse.Namespace, body: Any, *, resumable: bool = True) -> int:
    """`body(backend)` on the HTTP service of --url, else on the in-process Labeler of the
    model options; Ctrl-C ends it with status 130 and says what is kept (`resumable`: rows
    are written to a file as they are labeled)."""

    async def main(local: Any) -> Any:
        if local is not None:
            backend: Backend = LocalBackend(local)
        else:
            key = args.api_key or os.environ.get("LABELER_API_KEY")
            backend = await HTTPBackend.connect(args.url, key, batch_size=max(64, args.chunk_size))
        try:
            return await body(backend)
        finally:
            await backend.aclose()

    if args.url:
        unused = [f for f, d in _MODEL_OPTIONS.items() if getattr(args, d) != args.model_defaults[d]]
        if unused:
            print(f"warning: {', '.join(unused)} not used: --url labels with the server's model", file=sys.stderr)
    try:
        # The model loads before the event loop runs: there, Ctrl-C stops a load (minutes, for
        # a large model) at once; inside asyncio.run it would wait for the load to return.
        local = None if args.url else cli.build_labeler(args)
        return asyncio.run(main(local))
    except KeyboardInterrupt:
        if resumable:
            print(
                "interrupted: rows written so far are complete; run the same command again to resume", file=sys.stderr
            )
        else:
            print("interrupted: nothing was kept (give --out FILE to keep judgments and resume)", file=sys.stderr)
        return 130


def _report_sink(out: Path, name: str) -> JsonlSink:
    """The rows file of a command that writes its report beside it in `out`: a folder where the
    report cannot be written is refused before the model loads (its rows may be read still)."""
    try:
        probe_folder(out)
    except OSError as exc:
        raise InvalidInput(f"cannot write the report in {out}: {exc.strerror or exc}", field="out") from exc
    return JsonlSink(out / name)


# What `eval` and `harmless` write beside their rows: the figures of one run.
REPORT_FILES = ("metrics.json", "report.md", "reliability.png", "length_bias.png", "harmless.png")


def _clear_report(out: Path) -> None:
    """Remove the report an earlier run left in `out`, once this run's labeling is over and
    before its own is written: a run that ends with nothing to report (or stops while writing
    it) must not leave the earlier run's figures there as its own. Its rows stay, to resume from."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)


def _loop_opts(args: argparse.Namespace) -> dict[str, Any]:
    return {"chunk_size": args.chunk_size, "skip_invalid": args.skip_invalid, "progress": not args.no_progress}


def _cmd_label(args: argparse.Namespace) -> int:
    if args.scores and args.order is not None:
        raise InvalidInput("--order is for pairs; --scores scores each response alone", field="order")
    summary = Summary()
    norm = normalize_single if args.scores else normalize_pair
    records = collect(args.input, norm, split=args.split, skip_invalid=args.skip_invalid, summary=summary)
    if not records:  # before the model loads and anything is written
        raise SystemExit(f"nothing to label: {args.input} holds no valid record")

    sink = JsonlSink(args.output)  # an OUT of other data is refused before the model loads

    async def body(backend: Backend) -> int:
        params = make_params(
            backend,
            args.task,
            kind="score" if args.scores else "pairwise",
            order=args.order or "both",
            cot=args.cot,
            samples=args.samples,
            seed=args.seed,
        )
        make = score_jobs if args.scores else label_pair_jobs
        jobs = make(records, params)
        s = await run_jobs(
            jobs, backend, sink, "scores" if args.scores else "pairs", params, summary=summary, **_loop_opts(args)
        )
        data = {
            "output": str(args.output),
            "task": args.task,
            "task_version": params["task_version"],
            "model": params["model"],
            **s.to_dict(),
        }
        cli.emit(args, data, f"{args.output}: {s.text()}")
        if not s.labeled and not s.skipped:  # a pipeline's next step must not take an empty dataset
            print(f"{args.output}: no item was labeled (every one was skipped)", file=sys.stderr)
            return 1
        return 0

    return _run(args, body)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import ORDERS, eval_jobs, evaluate_rows, normalize_human_labeled, percent, write_report

    summary = Summary(duplicates_are="more labels of a pair labeled already (read once)")
    pairs = collect(
        args.input, normalize_human_labeled, split=args.split, skip_invalid=args.skip_invalid, summary=summary
    )

    if not pairs:  # before the model loads
        raise SystemExit(f"{args.input}: no human-labeled pairs to evaluate")
    sink = _report_sink(args.out, "labels.jsonl")

    async def body(backend: Backend) -> int:
        params = make_params(backend, args.task, order="both", cot=args.cot, samples=args.samples, seed=args.seed)
        jobs = eval_jobs(pairs, params, args.position_seed)
        s = await run_jobs(jobs, backend, sink, "pairs", params, summary=summary, **_loop_opts(args))
        # One row per human label: a pair several humans labeled is read once and counted per
        # label in the alignment. Its position consistency is its reading's, so the summary's
        # counts each pair once (run_jobs counted the distinct items), as the metrics do.
        rows = [j.make_row(sink.rows[j.key]) for j in jobs if j.key in sink.rows]
        _clear_report(args.out)
        info = {
            "task": args.task,
            "task_version": params["task_version"],
            "model": params["model"],
            "input": args.input,
            "position_seed": args.position_seed,
            "seed": args.seed,
        }
        if not rows:
            return _nothing_labeled(args, s, info, "no human-labeled pair was labeled: every one was skipped")
        metrics = evaluate_rows(rows, level=args.level, seed=args.seed, bins=args.bins)
        report = write_report(metrics, args.out, info)
        (args.out / "metrics.json").write_text(json.dumps(_clean(metrics | {"info": info}), indent=2) + "\n")
        pct = percent(args.level)
        lines = [
            f"{metrics['n']} human labels on {metrics['pairs']} pairs over {metrics['prompts']} prompts; {s.text()}",
            "AI labeler alignment (accuracy vs human labels; CIs resample prompts):",
        ]
        for order, m in metrics["orders"].items():
            lines.append(
                f"{ORDERS[order]:<21} alignment {m['alignment']:.3f} [{pct}% CI {_fmt(m['ci_low'])}, "
                f"{_fmt(m['ci_high'])}]  Brier {m['brier']:.3f}  ECE {m['ece']:.3f}  "
                f"prefers longer {_fmt(m['length']['labeler_longer'])} "
                f"(humans {_fmt(m['length']['human_longer'])})"
            )
        if "position_consistency" in metrics:
            lines.append(f"position consistency {metrics['position_consistency']:.3f}")
        h = metrics.get("human_agreement")
        if h and h["pairs"]:
            lines.append(
                f"on {h['pairs']} pairs labeled by several humans: human-human agreement {h['human_human']:.3f}, "
                f"AI-human {h['ai_human']:.3f}"
            )
        else:
            lines.append("human-human agreement: no pair has more than one human label")
        lines.append(f"report: {report}")
        headline = {k: v for k, v in metrics.items() if k != "orders"} | {
            "orders": {o: {k: v for k, v in m.items() if k != "bins"} for o, m in metrics["orders"].items()},
            "report": str(report),
            "summary": s.to_dict(),
        }
        cli.emit(args, _clean(headline), "\n".join(lines))
        return 0

    return _run(args, body)


def _cmd_winrate(args: argparse.Namespace) -> int:
    from .evaluate import (
        length_controlled_win_rate,
        match_policies,
        percent,
        prompt_clusters,
        win_rate,
        winrate_jobs,
        winrate_rows,
    )

    # A response both policies gave on a prompt is judged once, for both.
    summary = Summary(duplicates_are="duplicates (in a file, or shared by A and B: judged once)")

    def with_id(where: str, rec: Any) -> tuple[Any, Any]:
        return (rec.get("id") if isinstance(rec, dict) else None, normalize_single(where, rec))

    a, b = (
        collect(
            p,
            with_id,
            split=split_for(p, args.split, [args.a, args.b]),
            skip_invalid=args.skip_invalid,
            summary=summary,
        )
        for p in (args.a, args.b)
    )
    for name, path, pol in (("A", args.a, a), ("B", args.b, b)):
        if not pol:  # before the model loads; "no shared prompts" would send the user looking for a mismatch
            raise SystemExit(f"no response of policy {name} to compare: {path} holds no valid record")
    matched, only_a, only_b = match_policies(a, b)
    if not matched:
        raise SystemExit(f"{args.a} and {args.b} share no prompts (matched by id, else by prompt text)")
    if only_a or only_b:
        print(f"warning: {only_a} records only in A and {only_b} only in B are left out", file=sys.stderr)

    sink = JsonlSink(args.out) if args.out else MemorySink()

    async def body(backend: Backend) -> int:
        params = make_params(backend, args.task, order=args.order, cot=args.cot, samples=args.samples, seed=args.seed)
        jobs = winrate_jobs(matched, params, args.position_seed)
        judged = [j for j in jobs if j is not None]  # a pair of the same answers is a tie, not judged
        s = await run_jobs(judged, backend, sink, "pairs", params, summary=summary, **_loop_opts(args))
        info = {"task": args.task, "task_version": params["task_version"], "model": params["model"]}
        if judged and not any(j.key in sink.rows for j in judged):
            return _nothing_labeled(args, s, info, "no matched prompt was labeled: every one was skipped")
        # Each matched prompt counts, also one that repeats with the answers it had (judged once),
        # in the win rates and in the position consistency alike. Rebuilt from the stored
        # results: `label` or `eval` may have written them, with other fields.
        done = winrate_rows(matched, jobs, sink.rows, params)
        rows = [r for _, _, r in done]
        prompts = prompt_clusters([sa.context for sa, _, _ in done])  # what the CIs resample
        s.count_orders(rows)  # a tie not judged has no reading to be consistent or not
        identical = sum(1 for r in rows if r.get("same_answers"))
        wr = win_rate(
            [r["p_a_ab"] for r in rows],
            [r["p_a_ba"] for r in rows],
            [r["p_a"] for r in rows],
            prompts=prompts,
            level=args.level,
            seed=args.seed,
        )
        # The lengths of the texts judged (without repeated prompt turns), from policy A's side.
        lengths = [(len(sa.response), len(sb.response)) for sa, sb, _ in done]
        lc = length_controlled_win_rate(
            [r["outcome"] for r in rows],
            [a for a, _ in lengths],
            [b for _, b in lengths],
            prompts=prompts,
            level=args.level,
            seed=args.seed,
        )
        lc["gap"] = wr["win_rate"] - lc["win_rate"]
        data = wr | {
            "length_controlled": lc,
            **info,
            "order": args.order,
            "identical": identical,
            "only_in_a": only_a,
            "only_in_b": only_b,
            "position_inconsistent_share": s.inconsistent_share,
            "summary": s.to_dict(),
        }
        pct = percent(args.level)
        same = f"{identical} with the same answer from A and B: ties, not judged\n" if identical else ""
        text = (
            f"win rate of A over B: {wr['win_rate']:.3f} [{pct}% CI {_fmt(wr['ci_low'])}, {_fmt(wr['ci_high'])}] "
            f"on {wr['n']} comparisons over {wr['prompts']} prompts ({wr['wins']} wins, {wr['ties']} ties, "
            f"{wr['losses']} losses; "
            f"soft {wr['soft_win_rate']:.3f})\n{same}"
            f"length-controlled:  {lc['win_rate']:.3f} [{pct}% CI {_fmt(lc['ci_low'])}, {_fmt(lc['ci_high'])}]; "
            f"raw - controlled = {lc['gap']:+.3f} (A longer by {lc['mean_length_diff']:+.1f} characters on average; "
            f"length coefficient {lc['length_coef']:+.3f})\n{s.text()}"
        )
        cli.emit(args, _clean(data), text)
        return 0

    return _run(args, body, resumable=args.out is not None)


def _cmd_harmless(args: argparse.Namespace) -> int:
    from .evaluate import match_policies, percent, prompt_clusters
    from .harmless import (
        harmless_difference,
        harmless_rate,
        judgment_jobs,
        judgment_key,
        rate_name,
        signed,
        write_harmless_report,
    )

    summary = Summary()

    def with_id(where: str, rec: Any) -> tuple[Any, Any]:
        return (rec.get("id") if isinstance(rec, dict) else None, normalize_single(where, rec))

    inputs = [args.a] + ([args.b] if args.b else [])
    policies = [
        collect(f, with_id, split=split_for(f, args.split, inputs), skip_invalid=args.skip_invalid, summary=summary)
        for f in inputs
    ]

    for name, path, pol in zip("AB", inputs, policies, strict=False):
        if not pol:  # before the model loads and anything is judged
            raise SystemExit(f"no response of policy {name} to judge: {path} holds no valid record")
    # Before the model loads too: records that cannot be matched are refused.
    matched, only_a, only_b = (
        match_policies(
            *policies, differing="each response is judged on its own prompt, and A - B is not paired (independent)"
        )
        if len(policies) == 2
        else ([], 0, 0)
    )
    sink = _report_sink(args.out, "judgments.jsonl")

    async def body(backend: Backend) -> int:
        params = make_params(backend, args.task, kind="judgment", cot=args.cot, samples=args.samples, seed=args.seed)
        question = backend.judgment_question(args.task)
        if not question:  # as the in-process labeler refuses it (status 2)
            raise InvalidInput(
                f"task {args.task!r} asks no yes/no question: set judgment_question in its task file", field="task"
            )
        jobs = [judgment_jobs([s for _, s in pol], params) for pol in policies]
        s = await run_jobs(
            [j for js in jobs for j in js], backend, sink, "judgments", params, summary=summary, **_loop_opts(args)
        )
        info = {
            "task": args.task,
            "task_version": params["task_version"],
            "model": params["model"],
            "question": question,
            "seed": args.seed,
        }
        done = [[j for j in js if j.key in sink.rows] for js in jobs]
        _clear_report(args.out)
        for name, d in zip("AB", done, strict=False):
            if not d:  # no rate to report: a clear end, as winrate's
                why = f"no response of policy {name} was judged: every one was skipped"
                return _nothing_labeled(args, s, info, why)
        p_yes = [[sink.rows[j.key]["p_yes"] for j in d] for d in done]
        prompts = [prompt_clusters([j.item.context for j in d]) for d in done]  # what the CIs resample
        per = []
        for name, path, ps, pr in zip("AB", inputs, p_yes, prompts, strict=False):
            rate = harmless_rate(ps, prompts=pr, level=args.level, seed=args.seed)
            per.append({"name": name, "input": str(path)} | rate)
        metrics: dict[str, Any] = {"level": args.level, "policies": per}
        if len(policies) == 2:
            keyed = {j.key for d in done for j in d}
            pairs = [(judgment_key(sa, params), judgment_key(sb, params)) for sa, sb in matched]
            # Paired only where both answer one prompt: records matched by id can hold two.
            paired = (
                not only_a
                and not only_b
                and all(sa.context == sb.context for sa, sb in matched)
                and all(ka in keyed and kb in keyed for ka, kb in pairs)
            )
            if paired:
                a_vals = [sink.rows[ka]["p_yes"] for ka, _ in pairs]
                b_vals = [sink.rows[kb]["p_yes"] for _, kb in pairs]
                a_prompts = b_prompts = prompt_clusters([sa.context for sa, _ in matched])
            else:
                (a_vals, b_vals), (a_prompts, b_prompts) = p_yes, prompts
            metrics["difference"] = harmless_difference(
                a_vals,
                b_vals,
                paired=paired,
                prompts_a=a_prompts,
                prompts_b=b_prompts,
                level=args.level,
                seed=args.seed,
            )
        report = write_harmless_report(
            metrics | {"policies": [p | {"p_yes": v} for p, v in zip(per, p_yes, strict=True)]}, args.out, info
        )
        (args.out / "metrics.json").write_text(json.dumps(_clean(metrics | {"info": info}), indent=2) + "\n")
        pct = percent(args.level)
        _, judged = rate_name(args.task)
        lines = []
        for p in per:
            (s_lo, s_hi), (m_lo, m_hi) = p["share_harmless_ci"], p["mean_p_yes_ci"]
            lines.append(
                f"policy {p['name']} ({p['input']}): {p['n']} responses to {p['prompts']} prompts, "
                f"{judged} {_fmt(p['share_harmless'])} "
                f"[{pct}% CI {_fmt(s_lo)}, {_fmt(s_hi)}], mean P(yes) {_fmt(p['mean_p_yes'])} "
                f"[{_fmt(m_lo)}, {_fmt(m_hi)}]"
            )
        d = metrics.get("difference")
        if d is not None:
            (s_lo, s_hi), (m_lo, m_hi) = d["share_harmless_ci"], d["mean_p_yes_ci"]
            lines.append(
                f"A - B: {judged} {signed(d['share_harmless'])} [{pct}% CI {signed(s_lo)}, {signed(s_hi)}], "
                f"mean P(yes) {signed(d['mean_p_yes'])} [{signed(m_lo)}, {signed(m_hi)}] "
                f"({'paired' if d['paired'] else 'independent'})"
            )
        lines += [s.text(), f"report: {report}"]
        cli.emit(args, _clean(metrics | {"report": str(report), "summary": s.to_dict()}), "\n".join(lines))
        return 0

    return _run(args, body)


def _nothing_labeled(args: argparse.Namespace, s: Summary, info: dict[str, Any], why: str) -> int:
    """The end of a run that has nothing to report on (every item skipped as invalid, and none
    from an earlier run): its summary, as any run's, then why on standard error and status 1,
    so a pipeline's next step does not take the missing figures for results."""
    cli.emit(args, _clean(info | {"summary": s.to_dict()}), s.text())
    print(f"{why} (see the skipped records above)", file=sys.stderr)
    return 1


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _clean(x: Any) -> Any:
    """JSON-safe: nan becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
