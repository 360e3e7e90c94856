"""Batch labeling: backends, the resumable labeling loop, and JSONL output.

    backend = LocalBackend(labeler)                    # or await HTTPBackend.connect(url)
    jobs = pair_jobs(records, backend, "helpful", params)
    summary = await run_jobs(jobs, backend, JsonlSink("out.jsonl"), "helpful", params)

Each job has the key of its label (`LabelSpec.key`, the key the service caches it under).
The sink reads the keys already in its file, so a re-run labels only what is missing. Rows
are appended as whole lines, one write + flush + fsync per chunk: an interrupted run leaves
complete rows, plus at worst one torn last line, which the next run cuts off before appending.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import PairItem, ScoreItem
from .datasets_io import MalformedRecord, Pair, Single, read_records
from .errors import InvalidInput, LabelerError, ModelOutputError
from .spec import LabelSpec

log = logging.getLogger(__name__)


class ServiceError(LabelerError):
    """The labeler service (--url) failed or refused a request."""


# -- backends ---------------------------------------------------------------------------------
class Backend(ABC):
    """Where labels come from: the in-process Labeler or the HTTP service. Results are dicts
    with the fields of `PreferenceResult` / `ScoreResult` plus `cached`."""

    model_id: str

    @abstractmethod
    def task_version(self, task: str) -> str: ...

    @abstractmethod
    def spec(self, kind: str, task: str, **params: Any) -> LabelSpec:
        """The `LabelSpec` this backend labels `kind` questions on `task` with."""

    @abstractmethod
    async def preferences(self, items: Sequence[PairItem], task: str, **opts: Any) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def scores(self, items: Sequence[ScoreItem], task: str, **opts: Any) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def judgments(self, items: Sequence[ScoreItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        """Yes/no judgments (the fields of `JudgmentResult`)."""

    @abstractmethod
    def judgment_question(self, task: str) -> str:
        """The task's yes/no question ("" when it asks none)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalBackend(Backend):
    """The in-process `labeler.Labeler`."""

    def __init__(self, labeler: Any) -> None:
        self.labeler = labeler
        self.model_id = labeler.model_id

    def task_version(self, task: str) -> str:
        return self.labeler.task(task).version

    def spec(self, kind: str, task: str, **params: Any) -> LabelSpec:
        return self.labeler.spec(kind, task, **params)

    async def preferences(self, items: Sequence[PairItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        return [r.to_dict() | {"cached": False} for r in await self.labeler.apreferences(items, task, **opts)]

    async def scores(self, items: Sequence[ScoreItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        return [r.to_dict() | {"cached": False} for r in await self.labeler.ascores(items, task, **opts)]

    async def judgments(self, items: Sequence[ScoreItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        return [r.to_dict() | {"cached": False} for r in await self.labeler.ajudgments(items, task, **opts)]

    def judgment_question(self, task: str) -> str:
        return self.labeler.task(task).judgment_question.strip()

    async def aclose(self) -> None:
        """Release the labeler's engine (vLLM's processes, the model's memory): the backend
        owns the labeler it was opened with."""
        await self.labeler.engine.aclose()


class HTTPBackend(Backend):
    """The labeler service through `labeler_client.AsyncClient` (imported only here)."""

    def __init__(
        self,
        client: Any,
        model_id: str,
        versions: dict[str, str],
        defaults: dict[str, Any],
        questions: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.model_id = model_id
        self.versions = versions
        self.questions = questions or {}  # each task's yes/no question
        self.defaults = defaults  # the server's temperature and rationale length

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, *, batch_size: int = 64) -> HTTPBackend:
        try:
            import labeler_client
        except ImportError:
            raise LabelerError("--url needs the client package: pip install ./clients (labeler-client)") from None
        client = labeler_client.AsyncClient(url, api_key=api_key, batch_size=batch_size)
        try:
            health = await client.health()
            tasks = await client.tasks()
            versions = {t.name: t.version for t in tasks}
            questions = {t.name: t.judgment_question for t in tasks}
        except labeler_client.LabelerClientError as exc:
            await client.aclose()
            raise ServiceError(f"labeler service at {url}: {exc}") from exc
        defaults = dict(getattr(health, "labeler", None) or {})
        if not {"temperature", "max_rationale_tokens"} <= set(defaults):
            await client.aclose()
            raise ServiceError(f"labeler service at {url} does not report its label parameters (/readyz 'labeler')")
        return cls(client, health.model, versions, defaults, questions)

    def task_version(self, task: str) -> str:
        if task not in self.versions:
            from .errors import UnknownTask

            raise UnknownTask(task, sorted(self.versions))
        return self.versions[task]

    def spec(self, kind: str, task: str, **params: Any) -> LabelSpec:
        from .core import LABELS

        return LabelSpec.build(
            kind,
            task=task,
            task_version=self.task_version(task),
            model=self.model_id,
            labels=LABELS[kind],
            temperature=self.defaults["temperature"],
            max_rationale_tokens=self.defaults["max_rationale_tokens"],
            end_markers=self.defaults.get("end_markers"),  # a server that does not say strips the library's
            **params,
        )

    async def _call(self, method: str, items: list[dict[str, str]], task: str, opts: dict[str, Any]) -> list[dict]:
        import labeler_client

        try:
            results = await getattr(self.client, method)(items, task, **opts)
        except labeler_client.APIStatusError as exc:
            # The server's own message, as in process: `reason` then strips its `items[i]: `.
            if exc.status in (400, 413, 422) and exc.param:
                raise InvalidInput(exc.message or str(exc), field=exc.param) from exc
            if exc.type == "model_output_error":  # naming no item when the model labeled none
                raise ModelOutputError(exc.message or str(exc), field=exc.param) from exc
            raise ServiceError(f"labeler service: {exc}") from exc
        except labeler_client.LabelerClientError as exc:
            raise ServiceError(f"labeler service: {exc}") from exc
        return [r.model_dump() for r in results]

    async def preferences(self, items: Sequence[PairItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        body = [{"context": it.context, "response_a": it.response_a, "response_b": it.response_b} for it in items]
        return await self._call("preferences", body, task, opts)

    async def scores(self, items: Sequence[ScoreItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        body = [{"context": it.context, "response": it.response} for it in items]
        return await self._call("scores", body, task, opts)

    async def judgments(self, items: Sequence[ScoreItem], task: str, **opts: Any) -> list[dict[str, Any]]:
        body = [{"context": it.context, "response": it.response} for it in items]
        return await self._call("judgments", body, task, opts)

    def judgment_question(self, task: str) -> str:
        self.task_version(task)  # UnknownTask for a task the server lacks
        return self.questions.get(task, "")

    async def aclose(self) -> None:
        await self.client.aclose()


# -- sinks --------------------------------------------------------------------------------------
class MemorySink:
    """Rows kept in memory (for win rates without --out)."""

    read_only: str | None = None

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:
            self.rows[r["key"]] = r

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to hold: the rows are this process's own."""
        return contextlib.nullcontext()


class JsonlSink:
    """An append-only JSONL file of rows with a `key`. Opening it reads the keys already there.
    A file that holds anything but this tool's rows is refused untouched; a last line without
    its newline is completed when it is a whole row, and cut off when it is a row torn by a
    killed run. `rows` holds each row by its key without the input texts it repeats (what a
    resumed command reads back are its figures). A run holds the file (`writing`): a second
    run into it, which would label the same items again and write them twice, is refused. A
    finished file the system does not let this process write (a read-only mount or permission)
    is read as it is, and `read_only` says why; a run that would have to append to it is
    refused."""

    def __init__(self, path: str | Path) -> None:
        if str(path) == "-":  # the usual name of standard output, which a later run cannot resume from
            raise InvalidInput(
                "the output is a JSONL file that a re-run resumes from, not standard output: give its path",
                field="output",
            )
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        self.repaired = False
        self.read_only: str | None = None
        if self.path.is_dir():
            raise InvalidInput(f"{self.path} is a directory; the output is a JSONL file", field="output")
        self._loaded: tuple[int, int, int] | None = None  # (inode, size, mtime) of the file read
        try:
            if self.path.exists():
                # Refused before a model loads (`writing` checks again when the run starts); a
                # torn last line is cut under the lock, where no other run is appending.
                fd, _ = self._open_held()
                try:
                    self._load()
                finally:
                    os.close(fd)
            else:
                # Created when the run starts (`writing`); a folder where no file can be
                # created (read-only, full) is refused now, before a model loads.
                probe_folder(self.path.parent)
        except OSError as exc:  # no permission, a file where a folder should be, ...
            raise InvalidInput(f"cannot open {self.path}: {exc.strerror or exc}", field="output") from exc

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Holds the file for a run, creating it if need be (and removing it again when the run
        writes nothing into the file it created); rows another run appended since the file was
        read are read first. Another run holding it is refused (InvalidInput)."""
        fd, created = self._open_held()
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self._loaded:
                self.rows.clear()
                if st.st_size:
                    self._load()
            yield
        finally:
            try:
                if created is not None and os.fstat(fd).st_size == 0:
                    created.unlink(missing_ok=True)
            finally:
                os.close(fd)  # lets the lock go

    def _open_held(self) -> tuple[int, Path | None]:
        """(a descriptor of the file holding its lock, opened to append as an exclusive lock on
        NFS needs, or to read where this process may not write it, for a shared lock; the file
        this call created, if it did)."""
        for _ in range(100):  # each turn is a race lost to another run: a few at most
            # The file a link names (created where it does not exist yet, as appending would).
            target = Path(os.path.realpath(self.path))
            created = None
            try:
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
                    self.read_only = None
                except FileNotFoundError:
                    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
                    created, self.read_only = target, None
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                        raise
                    fd = os.open(target, os.O_RDONLY)  # a finished file to read; refused if unreadable
                    self.read_only = exc.strerror or str(exc)
            except FileExistsError:
                continue  # another run created it meanwhile
            except OSError as exc:
                raise InvalidInput(f"cannot open {self.path}: {exc.strerror or exc}", field="output") from exc
            try:
                self._hold(fd)
                # A run that ended between our open and our lock may have removed the file it
                # had created: the lock must be on the file the path names now.
                with contextlib.suppress(FileNotFoundError):
                    if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                        return fd, created
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise InvalidInput(f"cannot hold {self.path}: other runs keep creating and removing it", field="output")

    def _hold(self, fd: int) -> None:
        """A lock on `fd`'s file, refused at once when another run holds it: exclusive, or shared
        for a file only read (which runs may read together, but not while one writes it). The
        lock lasts as long as `fd` stays open."""
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                _warn_no_lock(self.path, exc.strerror or str(exc))
                return
            raise InvalidInput(
                f"{self.path} is being {_holder(fd)} by another run; wait for it to end, or give another output",
                field="output",
            ) from None

    def _load(self) -> None:
        """Read the rows of the file, line by line (an output may be gigabytes: never whole)."""
        keep = bom = n = 0  # the complete lines' bytes; a killed write can cut a character too
        tail = b""
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            # Rows end at "\n" alone (as iterating a binary file splits): splitlines() would also
            # break at U+2028, U+0085 and the like, which json.dumps(ensure_ascii=False) leaves
            # unescaped inside a row's texts.
            for raw in f:
                if n == 0 and raw.startswith(b"\xef\xbb\xbf"):  # an editor's byte-order mark:
                    bom, raw = 3, raw[3:]  # no part of line 1 (and kept in the file)
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                n += 1
                keep += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:  # not written by this tool (which writes UTF-8)
                    raise self._foreign_line(n) from None
                if line.strip():
                    row = _output_row(_parsed(line))
                    if row is None:
                        raise self._foreign_line(n)
                    self.rows[row["key"]] = _held(row)
        self._loaded = (st.st_ino, st.st_size, st.st_mtime_ns)
        if not tail.strip():
            return
        last = _parsed(tail)  # None: cut inside a character or a value
        row = _output_row(last)
        if row is None and not (last is None and _torn_row(tail)):
            raise self._foreign_line(n + 1)
        if row is not None:  # a whole row that lacks its newline (a hand edit, a concatenation)
            self.rows[row["key"]] = _held(row)
        if self.read_only:  # read as it is; a run that appends to it is refused
            self._loaded = None  # and read again by a run that may write it (made writable since)
            return
        if row is not None:
            with self.path.open("ab") as f:
                f.write(b"\n")
        else:  # a row torn by a killed write
            log.warning("%s: cutting off an incomplete last line (an interrupted run)", self.path)
            with self.path.open("r+b") as f:
                f.truncate(bom + keep)
        self.repaired = True
        st = self.path.stat()
        self._loaded = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _foreign_line(self, n: int) -> InvalidInput:
        return InvalidInput(f"{self.path}: line {n} is not a row of this tool; not appending to it", field="output")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        data = b"".join(_jsonl_line(r) for r in rows)
        try:
            with self.path.open("ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk, a file-size limit, a device: the rows before are whole
            then = "free space and run" if exc.errno in _NO_ROOM else "run"
            raise LabelerError(
                f"cannot write {self.path}: {exc.strerror or exc}; the rows written before are kept "
                f"(a row this write cut off is dropped on resuming): {then} the same command again"
            ) from exc
        for r in rows:
            self.rows[r["key"]] = _held(r)


# Write errors that more room would mend: a full disk, a quota, a file-size limit.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Values many rows share, held once.
_SHARED = frozenset({"task", "task_version", "model", "chosen_is", "a_is", "shown_first", "human"})
# The input's texts, which rows repeat for their readers: a command reads back the figures of the
# rows (a resumed run), never these, and they are most of a row's size.
_ECHOED = frozenset({"prompt", "chosen", "rejected", "completion", "context", "response_a", "response_b", "rationales"})


def _held(row: dict[str, Any]) -> dict[str, Any]:
    """`row` as a sink holds it: without the input texts it repeats, and its field names and
    the values every row repeats (task, version, model) held once for all rows."""
    return {
        sys.intern(k): sys.intern(v) if k in _SHARED and isinstance(v, str) else v
        for k, v in row.items()
        if k not in _ECHOED
    }


def probe_folder(folder: Path) -> None:
    """Creates `folder` if need be and a file in it, removed again: OSError where no file can be
    created there (read-only, full, a file in the way). The file is one of its own: another run
    may be creating and locking a file of the folder meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".labeler-probe-")
    os.close(fd)
    os.unlink(probe)


def _holder(fd: int) -> str:
    """What the run holding `fd`'s file does with it: "read" where its lock is shared (a run
    reading a finished output), "written" where it is exclusive."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return "written"
    fcntl.flock(fd, fcntl.LOCK_UN)
    return "read"


@functools.cache
def _warn_no_lock(path: Path, why: str) -> None:
    """Once per file: the runs into it are not kept apart."""
    log.warning("%s: the file system refuses locks (%s): a second run into this file is not refused", path, why)


def _parsed(line: str | bytes) -> Any:
    """A line's JSON value, or None when it is not JSON (or, as bytes, not UTF-8)."""
    try:
        return json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None


def _torn_row(tail: bytes) -> bool:
    """Whether `tail` can be the start of a row `_jsonl_line` wrote: JSON of an object with a
    key first (as little as its `{`), in UTF-8 that may end inside a character, and then NUL
    bytes, where a power loss left a write's blocks allocated but not written (also with
    nothing before them). Anything else is not ours to cut."""
    tail = tail.rstrip(b"\x00")
    if not tail:
        return True
    if not b'{"'.startswith(tail[:2]):
        return False
    try:
        tail.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.reason == "unexpected end of data"
    return True


def _output_row(value: Any) -> dict[str, Any] | None:
    """`value` (a line's JSON) when it is an output row (with the text fields `_meta` gives
    every row: a dataset's own `key` column is not enough), else None."""
    if isinstance(value, dict) and all(isinstance(value.get(f), str) for f in _META):
        return value
    return None


def _jsonl_line(row: dict[str, Any]) -> bytes:
    """`row` as one line of UTF-8 JSON. Input text cut inside a character (a lone surrogate,
    which JSON data can hold) has no UTF-8 form: such a row is written with JSON escapes, which
    read back to the same text, and so to the same key on resume. Values JSON has no type for,
    which rows echo from a Parquet input (a message's timestamp), are written as their text."""
    try:
        return (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row, default=str) + "\n").encode("ascii")


# -- jobs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One question for the backend and how to turn its answer into an output row."""

    key: str
    where: str
    item: PairItem | ScoreItem
    make_row: Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Summary:
    items: int = 0  # valid input items
    labeled: int = 0  # labeled by this run
    skipped: int = 0  # already in the output (resumed)
    duplicates: int = 0  # repeated in the input (same key)
    duplicates_are: str = "duplicates"  # what the summary calls them (eval: more humans' labels of a pair)
    other_rows: int = 0  # rows already in the output of other items or options (kept as they are)
    invalid: list[str] = field(default_factory=list)  # where: message, for skipped malformed records
    unlabeled: list[str] = field(default_factory=list)  # where: message, for skipped items the model gave no label
    cached: int = 0  # answered from the service's cache (--url)
    inconsistent: int = 0  # rows whose two orders disagree (over rows read in both orders)
    both_orders: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)  # the rows for this input, in input order

    @property
    def inconsistent_share(self) -> float | None:
        return self.inconsistent / self.both_orders if self.both_orders else None

    def count_orders(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Position consistency over `rows`: how many were read in both orders, and of those
        how many have orders that disagree."""
        both = [row["consistent"] for row in rows if row.get("consistent") is not None]
        self.both_orders, self.inconsistent = len(both), sum(not c for c in both)

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "labeled": self.labeled,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "other_rows": self.other_rows,
            "invalid": len(self.invalid),
            "unlabeled": len(self.unlabeled),
            "cached": self.cached,
            "position_inconsistent_share": self.inconsistent_share,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.labeled / self.seconds, 3) if self.seconds > 0 else None,
        }

    def text(self) -> str:
        share = self.inconsistent_share
        parts = [
            f"{self.items} items",
            f"{self.labeled} labeled",
            f"{self.skipped} already done (skipped)",
            f"{self.cached} cached",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} {self.duplicates_are}")
        if self.invalid:
            parts.append(f"{len(self.invalid)} invalid (skipped)")
        if self.unlabeled:
            parts.append(f"{len(self.unlabeled)} without a label from the model (skipped)")
        if self.other_rows:
            parts.append(f"{self.other_rows} other rows in the output (kept)")
        if share is not None:
            parts.append(f"position-inconsistent {share:.1%} ({self.inconsistent}/{self.both_orders})")
        rate = f", {self.labeled / self.seconds:.2f} items/s" if self.seconds > 0 and self.labeled else ""
        return ", ".join(parts) + f" in {self.seconds:.1f}s{rate}"


def collect(
    path: str | Path,
    normalize: Callable[[str, Any], Any],
    *,
    split: str | None = None,
    skip_invalid: bool = False,
    summary: Summary | None = None,
) -> list[Any]:
    """Read and normalize every record before any labeling, so a malformed one stops the run
    before anything is written (or, with `skip_invalid`, is reported and left out)."""
    summary = summary if summary is not None else Summary()

    def bad(exc: MalformedRecord) -> None:
        if not skip_invalid:
            raise exc
        summary.invalid.append(str(exc))
        print(f"skipped invalid input: {exc}", file=sys.stderr)

    out = []
    for where, rec in read_records(path, split=split, on_bad_line=bad):
        try:
            out.append(normalize(where, rec))
        except MalformedRecord as exc:
            bad(exc)
    return out


def pair_item(p: Pair) -> PairItem:
    """The labeler's item for a pair. An empty response (a policy that said nothing) is
    judged like any other, as the service judges it."""
    return PairItem(p.context, p.response_a, p.response_b)


def pair_key(item: PairItem, params: dict[str, Any]) -> str:
    return params["spec"].key(item)


def label_pair_jobs(pairs: Sequence[Pair], params: dict[str, Any]) -> list[Job]:
    """Jobs for `labeler label`: TRL rows (prompt, chosen, rejected) in the input's own form,
    where chosen is the response the labeler prefers (p >= 0.5 for the input's first one)."""

    def job(p: Pair) -> Job:
        item = pair_item(p)
        key = pair_key(item, params)

        def make_row(r: dict[str, Any]) -> dict[str, Any]:
            a_wins = r["p_a"] >= 0.5
            row = {
                "prompt": p.prompt,
                "chosen": p.orig_a if a_wins else p.orig_b,
                "rejected": p.orig_b if a_wins else p.orig_a,
                "p_chosen": r["p_a"] if a_wins else r["p_b"],
                "chosen_is": "a" if a_wins else "b",
                "p_a": r["p_a"],
                "p_a_ab": r["p_a_ab"],
                "p_a_ba": r["p_a_ba"],
                "consistent": r["consistent"],
                "label_mass": r["label_mass"],
            }
            return _row(row, r, params, key)

        return Job(key, p.where, item, make_row)

    return [job(p) for p in pairs]


def score_jobs(singles: Sequence[Single], params: dict[str, Any]) -> list[Job]:
    """Jobs for `labeler label --scores`: one row per response with its reward."""

    def job(s: Single) -> Job:
        item = ScoreItem(s.context, s.response)
        key = params["spec"].key(item)

        def make_row(r: dict[str, Any]) -> dict[str, Any]:
            row = {
                "prompt": s.prompt,
                "completion": s.completion,
                "reward": r["reward"],
                "expected": r["expected"],
                "distribution": r["distribution"],
                "label_mass": r["label_mass"],
            }
            return _row(row, r, params, key)

        return Job(key, s.where, item, make_row)

    return [job(s) for s in singles]


def _row(fields: dict[str, Any], result: dict[str, Any], params: dict[str, Any], key: str) -> dict[str, Any]:
    """An output row: `fields`, the result's rationales when it has them, then the metadata."""
    if result.get("rationales") is not None:
        fields["rationales"] = result["rationales"]
    return fields | _meta(params, key)


_META = ("task", "task_version", "model", "key")


def _meta(params: dict[str, Any], key: str) -> dict[str, Any]:
    return dict(zip(_META, (params["task"], params["task_version"], params["model"], key), strict=True))


def make_params(
    backend: Backend,
    task: str,
    *,
    kind: str = "pairwise",
    order: str = "both",
    cot: bool = False,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """The labeling parameters of a run, with the `LabelSpec` (under "spec") whose keys
    identify its rows."""
    params: dict[str, Any] = {"cot": cot, "samples": samples, "seed": seed}
    if kind == "pairwise":
        params["order"] = order
    spec = backend.spec(kind, task, **params)
    return {
        "task": task,
        "task_version": spec.task_version,
        "model": spec.model,
        "order": order,
        **params,
        "spec": spec,
    }


# -- the loop -------------------------------------------------------------------------------------
async def run_jobs(
    jobs: Sequence[Job],
    backend: Backend,
    sink: JsonlSink | MemorySink,
    kind: str,
    params: dict[str, Any],
    *,
    summary: Summary | None = None,
    chunk_size: int = 16,
    skip_invalid: bool = False,
    progress: bool = True,
) -> Summary:
    """Label the jobs whose keys are not in `sink` yet, `chunk_size` per backend call, appending
    each chunk's rows as it completes. `kind` is "pairs", "scores" or "judgments". An invalid item raises
    MalformedRecord naming its line (earlier chunks stay written), an item the model gives no
    label for a ModelOutputError naming its line; with `skip_invalid` either is reported and
    left out. The sink is held for the run: another run into the same file is refused."""
    from tqdm.auto import tqdm

    with sink.writing():  # the keys already written are read under the hold
        summary = summary or Summary()
        summary.items = len(jobs)
        seen: set[str] = set()
        todo: list[Job] = []
        for j in jobs:
            if j.key in seen:
                summary.duplicates += 1
                continue
            seen.add(j.key)
            if j.key in sink.rows:
                summary.skipped += 1
            else:
                todo.append(j)
        if todo and sink.read_only:
            raise InvalidInput(
                f"{sink.path} cannot be written ({sink.read_only}): {len(todo)} of these items are not in it "
                "yet; give an output that can be written",
                field="output",
            )
        summary.other_rows = sum(1 for k in sink.rows if k not in seen)
        if summary.other_rows and isinstance(sink, JsonlSink):
            # A row's key holds the model, task and options: these rows were written by a run with
            # another input, task, model or options, and this run's rows go beside them.
            log.warning(
                "%s holds %d rows that are not of these items with these options; they stay, and this run's "
                "rows are appended beside them",
                sink.path,
                summary.other_rows,
            )
        opts = {"cot": params["cot"], "samples": params["samples"], "seed": params["seed"]}
        if kind == "pairs":
            opts["order"] = params["order"]
        start = time.monotonic()
        bar = tqdm(
            total=len(todo),
            unit="item",
            desc="labeling",
            file=sys.stderr,
            disable=not progress or not todo,
            dynamic_ncols=True,
        )
        try:
            for i in range(0, len(todo), chunk_size):
                chunk = todo[i : i + chunk_size]
                results, chunk = await _label_chunk(backend, kind, chunk, params["task"], opts, skip_invalid, summary)
                sink.append([j.make_row(r) for j, r in zip(chunk, results, strict=True)])
                summary.labeled += len(chunk)
                summary.cached += sum(1 for r in results if r.get("cached"))
                bar.update(len(todo[i : i + chunk_size]))
        finally:
            bar.close()
            summary.seconds = time.monotonic() - start
        summary.rows = [sink.rows[k] for k in dict.fromkeys(j.key for j in jobs) if k in sink.rows]
        summary.count_orders(summary.rows)
        return summary


async def _label_chunk(
    backend: Backend, kind: str, chunk: list[Job], task: str, opts: dict[str, Any], skip_invalid: bool, summary: Summary
) -> tuple[list[dict[str, Any]], list[Job]]:
    from tqdm.auto import tqdm

    while True:
        if not chunk:
            return [], []
        try:
            items = [j.item for j in chunk]
            if kind == "pairs":
                return await backend.preferences(items, task, **opts), chunk  # type: ignore[arg-type]
            if kind == "judgments":
                return await backend.judgments(items, task, **opts), chunk  # type: ignore[arg-type]
            return await backend.scores(items, task, **opts), chunk  # type: ignore[arg-type]
        except (InvalidInput, ModelOutputError) as exc:
            unlabeled = isinstance(exc, ModelOutputError)  # the record is fine; the model's answer is not
            named = _item_of(exc.field)
            if unlabeled and named is None and len(chunk) == 1:  # one item: the one the model did not label
                named = (0, "")
            if unlabeled and exc.field is None and len(chunk) > 1:  # the service names none then
                if skip_invalid:
                    return await _one_by_one(backend, kind, chunk, task, opts, summary, exc.reason)
                raise _labeled_none(chunk, exc.reason) from None
            if named is None or named[0] >= len(chunk):
                raise
            k, part = named
            msg = exc.reason
            if part and not msg.startswith(part):  # the line names the item; its field, only the message
                msg = f"{part}: {msg}"
            if not skip_invalid:
                if unlabeled:
                    raise ModelOutputError(f"{chunk[k].where}: {msg}", field=chunk[k].where) from None
                raise MalformedRecord(chunk[k].where, msg) from None
            # Every item the model gave no label (in-process it says which), else the one named.
            bad = set(getattr(exc, "items", ()) or (k,))
            if unlabeled and len(chunk) > 1 and len(bad) == len(chunk):
                return await _one_by_one(backend, kind, chunk, task, opts, summary, msg)
            what = "unlabeled item" if unlabeled else "invalid input"
            for i in sorted(bad):
                (summary.unlabeled if unlabeled else summary.invalid).append(f"{chunk[i].where}: {msg}")
                # Through tqdm: the progress bar is cleared first and drawn again below the line.
                tqdm.write(f"skipped {what}: {chunk[i].where}: {msg}", file=sys.stderr)
            chunk = [j for i, j in enumerate(chunk) if i not in bad]


async def _one_by_one(
    backend: Backend, kind: str, chunk: list[Job], task: str, opts: dict[str, Any], summary: Summary, why: str
) -> tuple[list[dict[str, Any]], list[Job]]:
    """(results, their jobs) of a chunk of several items the model labeled none of, with
    `skip_invalid`. Before the model has labeled any item (in this run or an earlier one with
    these options), that is the model failing, not the records: the run ends, naming them.
    After, each item is labeled alone, and one the model labels none of alone is skipped: the
    items a run skipped come back together when it is resumed, and would otherwise end every
    resumed run at its first chunk."""
    if not summary.labeled and not summary.skipped:
        raise _labeled_none(chunk, why)
    results: list[dict[str, Any]] = []
    done: list[Job] = []
    for job in chunk:
        r, kept = await _label_chunk(backend, kind, [job], task, opts, True, summary)
        results += r
        done += kept
    return results, done


def _labeled_none(chunk: list[Job], why: str) -> ModelOutputError:
    """The error of a chunk of several records the model gave no label for, naming each of
    their lines (a chunk need not be a run of lines: resumed and repeated items are not in it)."""
    places = [j.where.rpartition(", ") for j in chunk]  # ("in.jsonl", ", ", "line 7")
    files = {file for file, _, _ in places}
    if len(files) == 1 and all(" " in place for _, _, place in places):  # "in.jsonl, lines 3, 5, 9"
        unit = places[0][2].split(" ")[0]
        named = f"{files.pop()}, {unit}s " + ", ".join(place.rsplit(" ", 1)[1] for _, _, place in places)
    else:
        named = "; ".join(j.where for j in chunk)
    return ModelOutputError(f"{named}: the model labeled none of them ({why})")


def _item_of(field_: str | None) -> tuple[int, str] | None:
    """(i, the item's field named after it) for `items[i]` or `items[i].field`, else None."""
    match = re.fullmatch(r"items\[(\d+)\](?:\.(.+))?", field_ or "")
    return None if match is None else (int(match.group(1)), match.group(2) or "")
