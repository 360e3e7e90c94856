"""Tasks ("constitutions"): versioned, data-file templates for the labeler.

A task is a TOML file: the preamble (the principles the labeler applies), optional
few-shot examples, and the wording of the pairwise, score and yes/no questions. Keys missing
from a task file come from `_defaults.toml` beside this module. Built-in tasks live in
this folder; users add their own from a directory of `*.toml` files (a user task with a
built-in's name replaces it).

Every task has a `version`: a hash of its merged content and of the prompt layout
revision, so any change to wording, examples or layout changes cache keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TaskFileError, UnknownTask

log = logging.getLogger("labeler.tasks")

BUILTIN_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = BUILTIN_DIR / "_defaults.toml"

# Bump when labeler/prompts.py changes how a task is laid out into a prompt: it is
# part of every task version, so stale cache entries stop matching.
LAYOUT_REVISION = 2

_STR_FIELDS = (
    "description",
    "preamble",
    "context_name",
    "response_name",
    "fence_notice",
    "pairwise_question",
    "pairwise_cot_question",
    "pairwise_answer_prefix",
    "score_question",
    "score_cot_question",
    "score_answer_prefix",
    "judgment_question",
    "judgment_format",
    "judgment_cot_format",
    "judgment_answer_prefix",
)


@dataclass(frozen=True)
class PairExample:
    """A few-shot pairwise example: the answer is `preferred` (1 or 2)."""

    context: str
    response_a: str
    response_b: str
    preferred: int
    rationale: str = ""


@dataclass(frozen=True)
class ScoreExample:
    """A few-shot score example: the answer is `score` (1..10)."""

    context: str
    response: str
    score: int
    rationale: str = ""


@dataclass(frozen=True)
class JudgmentExample:
    """A few-shot yes/no example: the answer is `answer` ("yes" or "no")."""

    context: str
    response: str
    answer: str
    rationale: str = ""


@dataclass(frozen=True)
class Task:
    """One labeling task. Build with `Task.from_mapping` or `load_task_file`."""

    name: str
    description: str
    preamble: str
    context_name: str
    response_name: str
    fence_notice: str
    pairwise_question: str
    pairwise_cot_question: str
    pairwise_answer_prefix: str
    score_question: str
    score_cot_question: str
    score_answer_prefix: str
    judgment_question: str  # empty: the task asks no yes/no question
    judgment_format: str
    judgment_cot_format: str
    judgment_answer_prefix: str
    examples: tuple[PairExample, ...] = ()
    score_examples: tuple[ScoreExample, ...] = ()
    judgment_examples: tuple[JudgmentExample, ...] = ()
    source: str = field(default="", compare=False)

    @functools.cached_property
    def version(self) -> str:
        """Stable content hash: 16 hex digits of SHA-256 over the task and layout revision."""
        content = {k: v for k, v in asdict(self).items() if k != "source"}
        blob = json.dumps({"layout": LAYOUT_REVISION, "task": content}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any], *, source: str = "") -> Task:
        """Validate a parsed task file (already merged with the defaults)."""
        where = source or name
        unknown = set(data) - set(_STR_FIELDS) - {"name", "examples", "score_examples", "judgment_examples"}
        if unknown:
            raise TaskFileError(f"{where}: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {}
        for key in _STR_FIELDS:
            value = data.get(key)
            if not isinstance(value, str):
                raise TaskFileError(f"{where}: {key!r} must be a string")
            values[key] = value
        if not values["preamble"].strip():
            raise TaskFileError(f"{where}: 'preamble' is empty")
        for key in ("pairwise_answer_prefix", "score_answer_prefix", "judgment_answer_prefix"):
            if not values[key].strip():
                raise TaskFileError(f"{where}: {key!r} is empty")
        for key in ("pairwise_answer_prefix", "score_answer_prefix"):
            # The number is read as the tokens right after the prefix; a model writes a space first.
            if not values[key][-1].isspace():
                raise TaskFileError(f"{where}: {key!r} must end with a space, as in {values[key] + ' '!r}")
        # The words are read with their space (" Yes"): a prefix that ends with one reads them
        # where the model writes none.
        if values["judgment_answer_prefix"][-1].isspace():
            raise TaskFileError(
                f"{where}: 'judgment_answer_prefix' must end without a space, as in "
                f"{values['judgment_answer_prefix'].rstrip()!r}"
            )
        for key in ("context_name", "response_name"):
            # A fence line is <<<NAME #tag>>>: a name must be one line of text to be one.
            if not values[key].strip() or "\n" in values[key] or "\r" in values[key]:
                raise TaskFileError(f"{where}: {key!r} must be one line of text, got {values[key]!r}")
        for cot_key, prefix_key in _COT_VERDICTS:
            # A rationale's verdict line is found (and cut) by the task's own answer prefix:
            # the question must ask for that line. The defaults name it as {answer_prefix}.
            prefix = values[prefix_key]
            values[cot_key] = values[cot_key].replace("{answer_prefix}", prefix)
            if prefix.strip() not in values[cot_key]:
                raise TaskFileError(
                    f"{where}: {cot_key!r} must ask for a final line that starts with the {prefix_key} "
                    f"{prefix.strip()!r} (write {{answer_prefix}} where it goes)"
                )
        for kind in ("examples", "score_examples", "judgment_examples"):
            given = data.get(kind, [])
            if not isinstance(given, list) or not all(isinstance(ex, dict) for ex in given):
                raise TaskFileError(f"{where}: {kind!r} must be a list of tables ([[{kind}]] blocks)")
        try:
            examples = tuple(PairExample(**ex) for ex in data.get("examples", ()))
            score_examples = tuple(ScoreExample(**ex) for ex in data.get("score_examples", ()))
            judgment_examples = tuple(JudgmentExample(**ex) for ex in data.get("judgment_examples", ()))
        except TypeError as exc:
            raise TaskFileError(f"{where}: malformed example: {exc}") from exc
        for kind, exs in (
            ("examples", examples),
            ("score_examples", score_examples),
            ("judgment_examples", judgment_examples),
        ):
            for n, ex in enumerate(exs):
                for key, value in asdict(ex).items():
                    if key not in ("preferred", "score", "answer") and not isinstance(value, str):
                        raise TaskFileError(f"{where}: {kind}[{n}].{key} must be text, got {value!r}")
        # A TOML boolean is a Python int (True == 1), and 1.0 == 1: refused by type, not only by value.
        for ex in examples:
            if type(ex.preferred) is not int or ex.preferred not in (1, 2):
                raise TaskFileError(f"{where}: example 'preferred' must be 1 or 2, got {ex.preferred!r}")
        for sx in score_examples:
            if isinstance(sx.score, bool) or not (isinstance(sx.score, int) and 1 <= sx.score <= 10):
                raise TaskFileError(f"{where}: score example 'score' must be an integer 1..10, got {sx.score!r}")
        for jx in judgment_examples:
            if jx.answer not in ("yes", "no"):
                raise TaskFileError(f'{where}: judgment example \'answer\' must be "yes" or "no", got {jx.answer!r}')
        if judgment_examples and not values["judgment_question"].strip():
            raise TaskFileError(f"{where}: judgment_examples need a 'judgment_question'")
        return cls(
            name=name,
            examples=examples,
            score_examples=score_examples,
            judgment_examples=judgment_examples,
            source=source,
            **values,
        )

    def summary(self) -> dict[str, Any]:
        """Name, version, description and example counts, for listings."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "examples": len(self.examples),
            "score_examples": len(self.score_examples),
            "judgment": bool(self.judgment_question.strip()),
            "judgment_question": self.judgment_question.strip(),
            "judgment_examples": len(self.judgment_examples),
            "source": self.source,
        }


# (chain-of-thought question, the answer prefix of its verdict line)
_COT_VERDICTS = (
    ("pairwise_cot_question", "pairwise_answer_prefix"),
    ("score_cot_question", "score_answer_prefix"),
    ("judgment_cot_format", "judgment_answer_prefix"),
)


def split_dirs(value: str) -> list[str]:
    """The directories of a `LABELER_TASKS_DIR` value: separated like PATH, blanks dropped."""
    return [d for d in value.split(os.pathsep) if d.strip()]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TaskFileError(f"{path}: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8; an editor's Latin-1 "café" is not
        raise TaskFileError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at {exc.start})") from exc


def load_task_file(path: str | Path) -> Task:
    """Load one task file, merged over the shipped defaults. Its name is the file stem
    unless the file sets `name`."""
    path = Path(path)
    data = {**_read_toml(DEFAULTS_FILE), **_read_toml(path)}
    name = data.pop("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TaskFileError(
            f"{path}: task name {name!r} must be letters, digits, '_', '-' or '.', from a letter or digit"
        )
    return Task.from_mapping(name, data, source=str(path))


_NAME = re.compile(r"[^\W_][\w.-]*")  # letters and digits of any script, "_", "-", "."


def _task_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.toml") if not p.name.startswith("_"))


class TaskRegistry:
    """Built-in tasks plus the tasks found in user directories: a task named like one before
    it (a built-in, or one of an earlier directory) replaces it; two files of one directory
    that name the same task are refused."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            self._tasks[task.name] = task

    @classmethod
    def load(cls, user_dirs: Iterable[str | Path] = (), *, builtin: bool = True) -> TaskRegistry:
        """Read the built-in tasks and every `*.toml` in `user_dirs`."""
        tasks: list[Task] = [load_task_file(f) for f in _task_files(BUILTIN_DIR)] if builtin else []
        for d in user_dirs:
            d = Path(d)
            if not d.is_dir():
                what = "is a file, not a directory of task files" if d.exists() else "does not exist"
                raise TaskFileError(f"task directory {d} {what}")
            for skipped in sorted(d.glob("_*.toml")):  # names kept for the shipped defaults file
                log.warning("%s: not read (a task file's name must not start with '_')", skipped)
            here: dict[str, Task] = {}
            for f in _task_files(d):
                task = load_task_file(f)
                if task.name in here:  # which one wins would be an accident of file names
                    raise TaskFileError(f"{f}: task name {task.name!r} is also the name of {here[task.name].source}")
                here[task.name] = task
            tasks.extend(here.values())
        return cls(tasks)

    def get(self, name: str) -> Task:
        """The task called `name`; raises UnknownTask listing the known names."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __iter__(self):
        return iter(self._tasks[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks
