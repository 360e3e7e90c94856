"""The `labeler` command line.

    labeler tasks                      list tasks with versions
    labeler prefer --task T --context C --response-a A --response-b B [--order both|ab|ba] [--cot]
    labeler score  --task T --context C --response R [--cot]
    labeler judge  --task T --context C --response R [--cot]   (the task's yes/no question)
    labeler render --task T --kind pairwise|score|judgment ... [--order ab|ba] [--cot] [--input items.jsonl]

More commands are registered by other modules (see COMMAND_MODULES): each exposes
`register(subparsers)` and sets `func` on its parsers. Every command but `serve`
(service.cli) and `vllm-server` takes `--json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .chat import normalize_item  # the service's reading of an item, for the one-item commands
from .errors import InvalidInput, LabelerError
from .tasks import split_dirs

# Modules that add subcommands; imported when the parser is built. `service.cli` is
# imported by name so that the core package itself never imports the HTTP stack.
COMMAND_MODULES = ("labeler.commands_batch", "labeler.commands_vllm", "service.cli")


class _Repeatable(argparse.Action):
    """A repeatable option whose values on the command line replace its default (the
    environment variable's) instead of adding to it, as every other flag overrides its variable."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*([] if given is self.default else given), values])


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options that choose the model, engine and tasks (shared by every command that labels)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=os.environ.get("LABELER_MODEL"),
        help="'embedded' (default), a local HF model directory, or a .gguf file [LABELER_MODEL]",
    )
    # Unset unless given: `labeler serve` leaves them to its settings, which read the variables
    # in any case (`labeler_engine` too), and supply the same defaults.
    g.add_argument(
        "--engine",
        default=os.environ.get("LABELER_ENGINE"),
        help="transformers | vllm | vllm-remote [LABELER_ENGINE, default transformers]",
    )
    g.add_argument(
        "--device", default=os.environ.get("LABELER_DEVICE"), help="torch device [LABELER_DEVICE, default cpu]"
    )
    g.add_argument(
        "--engine-arg",
        action=_Repeatable,
        default=[a for a in os.environ.get("LABELER_ENGINE_ARGS", "").split() if a],
        metavar="KEY=VALUE",
        help="an engine option, repeatable (replaces LABELER_ENGINE_ARGS): gpu_memory_utilization=0.5, "
        "max_model_len=4096, dtype=float32 ... [LABELER_ENGINE_ARGS, space-separated]",
    )
    g.add_argument(
        "--vllm-urls",
        default=os.environ.get("LABELER_VLLM_URLS"),
        help="comma-separated `vllm serve` base URLs, for --engine vllm-remote [LABELER_VLLM_URLS]",
    )
    add_tasks_option(g)


def add_tasks_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--tasks-dir, defaulting to LABELER_TASKS_DIR (as the server reads it)."""
    p.add_argument(
        "--tasks-dir",
        action=_Repeatable,
        default=split_dirs(os.environ.get("LABELER_TASKS_DIR", "")),
        help="a directory of extra task files (repeatable; replaces LABELER_TASKS_DIR) [LABELER_TASKS_DIR, "
        "':'-separated]",
    )


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def load_tasks(args: argparse.Namespace):
    from .tasks import TaskRegistry

    return TaskRegistry.load(args.tasks_dir)


def build_labeler(args: argparse.Namespace):
    """A Labeler for the model options in `args` (see `add_model_options`). A `--task` the
    tasks lack, or labeling options a label spec refuses (`--samples` without `--cot`, a
    `--seed` out of range), are refused before the model loads (minutes, for a large one)."""
    from .core import Labeler
    from .engines import engine_options, load_engine
    from .models import hide_load_progress
    from .spec import LabelSpec

    tasks = load_tasks(args)
    if getattr(args, "task", None) is not None:
        tasks.get(args.task)  # UnknownTask, naming the known ones
    if getattr(args, "samples", None) is not None:
        options = {"cot": args.cot, "samples": args.samples, "seed": getattr(args, "seed", 0)}
        LabelSpec.build("pairwise", task="", task_version="", model="", labels=(), **options)  # InvalidInput
    if getattr(args, "no_progress", False):
        hide_load_progress()
    engine = args.engine or "transformers"
    options = engine_options(engine, device=args.device or "cpu", engine_args=args.engine_arg, vllm_urls=args.vllm_urls)
    return Labeler(load_engine(engine, args.model, **options), tasks)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print `data` as JSON with --json, else the human-readable `text`."""
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)


def _cmd_tasks(args: argparse.Namespace) -> int:
    tasks = load_tasks(args)
    rows = [t.summary() for t in tasks]
    width = max(len(r["name"]) for r in rows)
    text = "\n".join(f"{r['name']:<{width}}  {r['version']}  {r['description']}" for r in rows)
    emit(args, rows, text)
    return 0


def _cmd_prefer(args: argparse.Namespace) -> int:
    with build_labeler(args) as lab:  # closed on the way out: a vLLM engine's processes too
        it = normalize_item({"context": args.context, "response_a": args.response_a, "response_b": args.response_b})
        r = lab.preference(
            it["context"],
            it["response_a"],
            it["response_b"],
            args.task,
            order=args.order,
            cot=args.cot,
            samples=args.samples,
        )
        data = {
            "model": lab.model_id,
            "task": args.task,
            "task_version": lab.task(args.task).version,
            **r.to_dict(),
        }
        lines = [f"p_a={r.p_a:.4f}  p_b={r.p_b:.4f}"]
        if r.p_a_ab is not None:
            lines.append(f"p_a (A shown first)  = {r.p_a_ab:.4f}")
        if r.p_a_ba is not None:
            lines.append(f"p_a (B shown first)  = {r.p_a_ba:.4f}")
        if r.consistent is not None:
            lines.append(f"orders agree: {'yes' if r.consistent else 'no'}")
        emit(args, data, "\n".join(lines))
        return 0


def _cmd_score(args: argparse.Namespace) -> int:
    with build_labeler(args) as lab:  # closed on the way out: a vLLM engine's processes too
        it = normalize_item({"context": args.context, "response": args.response})
        r = lab.score(it["context"], it["response"], args.task, cot=args.cot, samples=args.samples)
        data = {
            "model": lab.model_id,
            "task": args.task,
            "task_version": lab.task(args.task).version,
            **r.to_dict(),
        }
        bars = "\n".join(f"{k:>3} {p:6.4f} {'#' * round(p * 40)}" for k, p in enumerate(r.distribution, start=1))
        emit(args, data, f"{bars}\nexpected={r.expected:.4f}  reward={r.reward:+.4f}")
        return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    with build_labeler(args) as lab:  # closed on the way out: a vLLM engine's processes too
        it = normalize_item({"context": args.context, "response": args.response})
        r = lab.judgment(it["context"], it["response"], args.task, cot=args.cot, samples=args.samples)
        task = lab.task(args.task)
        data = {"model": lab.model_id, "task": args.task, "task_version": task.version, **r.to_dict()}
        text = (
            f"{task.judgment_question.strip()}\np_yes={r.p_yes:.4f}  p_no={r.p_no:.4f}  (label mass {r.label_mass:.4f})"
        )
        emit(args, data, text)
        return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from .models import resolve_model
    from .prompts import prompt_builder

    model_dir = resolve_model(args.model)
    if args.engine == "vllm":  # vLLM reads the tokenizer and context limit its arguments name
        from .engines import parse_engine_args
        from .engines.vllm_cpu import parse_sizes
        from .engines.vllm_engine import engine_tokenizer

        vllm_args = parse_sizes(parse_engine_args(args.engine_arg))
        builder = prompt_builder(model_dir, engine_tokenizer(model_dir, vllm_args), vllm_args.get("max_model_len"))
    else:
        builder = prompt_builder(model_dir)  # the tokenizer and config only, no weights
    task = load_tasks(args).get(args.task)
    if args.input:  # read as `label` reads its input: any of its formats, normalized
        from .datasets_io import normalize_pair, normalize_single, read_records

        items = []
        for where, rec in read_records(args.input):
            if args.kind == "pairwise":
                pair = normalize_pair(where, rec)
                items.append({"context": pair.context, "response_a": pair.response_a, "response_b": pair.response_b})
            else:
                single = normalize_single(where, rec)
                items.append({"context": single.context, "response": single.response})
    else:
        fields = {"context": args.context, "response_a": args.response_a, "response_b": args.response_b}
        if args.kind != "pairwise":
            fields = {"context": args.context, "response": args.response}
        missing = [f"--{k.replace('_', '-')}" for k, v in fields.items() if v is None]
        if missing:
            raise InvalidInput(f"render --kind {args.kind} needs {' and '.join(missing)} (or --input FILE.jsonl)")
        items = [normalize_item(fields)]
    for it in items:
        if args.kind == "pairwise":
            r = builder.pairwise(
                task, it["context"], it["response_a"], it["response_b"], order=args.order, cot=args.cot
            )
        else:
            render = builder.score if args.kind == "score" else builder.judgment
            r = render(task, it["context"], it["response"], cot=args.cot)
        data = r.to_dict()
        if args.json:
            # One JSON object per line, so a file of items renders to a JSONL file.
            print(json.dumps(data, ensure_ascii=False))
        else:
            cands = ", ".join(f"{c['label']!r}={c['token_ids']}" for c in data["candidates"])
            print(f"{r.prompt}\n\n[{len(r.prompt_token_ids)} prompt tokens; candidates: {cands}]\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labeler", description="AI preference labeling for RLAIF.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tasks", help="list tasks with their versions")
    add_tasks_option(p)
    add_json_option(p)
    p.set_defaults(func=_cmd_tasks)

    def labeled(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--task", required=True)
        p.add_argument("--context", default="", help="the prompt/context the response(s) answer")
        add_model_options(p)
        add_json_option(p)
        return p

    p = labeled("prefer", "pairwise preference between two responses (both orders by default)")
    p.add_argument("--response-a", required=True)
    p.add_argument("--response-b", required=True)
    p.add_argument("--order", choices=["both", "ab", "ba"], default="both")
    p.add_argument("--cot", action="store_true", help="generate a rationale before reading the label")
    p.add_argument("--samples", type=int, default=1, help="rationales to sample and average (needs --cot)")
    p.set_defaults(func=_cmd_prefer)

    p = labeled("score", "direct 1-10 score of one response (d-RLAIF reward)")
    p.add_argument("--response", required=True)
    p.add_argument("--cot", action="store_true")
    p.add_argument("--samples", type=int, default=1)
    p.set_defaults(func=_cmd_score)

    p = labeled("judge", "the task's yes/no question about one response (e.g. harmless), as P(yes)")
    p.add_argument("--response", required=True)
    p.add_argument("--cot", action="store_true")
    p.add_argument("--samples", type=int, default=1)
    p.set_defaults(func=_cmd_judge)

    p = labeled("render", "show exactly what the engine is given (prompt, token ids, candidates); reads no weights")
    p.add_argument("--kind", choices=["pairwise", "score", "judgment"], required=True)
    p.add_argument("--response-a")
    p.add_argument("--response-b")
    p.add_argument("--response")
    p.add_argument("--input", help="a JSONL file of items to render, one JSON object per line (--json: JSONL out)")
    p.add_argument("--order", choices=["ab", "ba"], default="ab")
    p.add_argument("--cot", action="store_true")
    p.set_defaults(func=_cmd_render)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # vLLM logs to stdout by default, in its engine processes too: there it would mix with
    # the JSON and tables the commands print. Set before vLLM is imported (and inherited).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except LabelerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where a command has no message of its own (reading its input)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _reader_gone():
            print(f"error: {exc}", file=sys.stderr)
            return 1
        # The reader of the output went away (`labeler render --json ... | head`): done,
        # quietly. Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the status a shell gives a command a pipe's end killed (128 + SIGPIPE)


def entry() -> int:
    """The `labeler` command: `main`, and once Ctrl-C has ended it (130), a second Ctrl-C exits
    at once. The process still waits for the engine's forward under way (its worker thread)
    before it can exit; the rows written are complete and on disk, so a second Ctrl-C need not
    end in the abort of a thread stopped inside torch."""
    code = main()
    if code == 130:
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    return code


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # no file descriptor (a captured stream)
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
