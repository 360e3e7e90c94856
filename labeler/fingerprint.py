"""Model fingerprints: which weights, tokenizer and config a label was computed with.

A label is only as reusable as its model is the same: a fine-tune swapped into the same
directory, with the same file names and sizes, must not be served the old model's cached
labels. So the fingerprint is a SHA-256 over the *content* of the files that decide the
model's answers — weights (`*.safetensors`, `*.bin`, `*.pt`, `*.gguf`), config, tokenizer and
chat template (`*.json`, `*.jinja`, `*.model`, `*.tiktoken`, `*.txt`), and the model's own code
(`*.py`: with `trust_remote_code` its tokenization, modeling and configuration modules decide
the answers as much as its weights) — with their names. What a trainer writes beside them is
none of these: its state in a checkpoint (optimizer, scheduler, RNG) and its metrics
(`all_results.json`, `train_results.json`, `eval_results.json`, ...).

Hashing reads every weight byte (an 8B model in bf16 is 16 GB), so the digest is remembered
in `<cache dir>/fingerprints.json`, keyed by each file's path, size, mtime, ctime and inode:
a server restart on unchanged files reads nothing. Any write, copy or rename over a file
changes its ctime or inode, so the next start hashes it again. The index is readable by
whoever the umask lets read the cache's other files (users sharing one cache reuse it), and
processes sharing it take turns on a lock file beside it to add their entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelLoadError
from .models import cache_dir, open_lock

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf"})
# `.py`: the code `trust_remote_code` runs (tokenization_*.py, modeling_*.py, ...) is part of
# what the tokenizer and model compute, so an edit to it must change the model id.
CONFIG_SUFFIXES = frozenset({".json", ".jinja", ".model", ".tiktoken", ".txt", ".py"})
# What a trainer writes beside the weights (HF Trainer's optimizer.pt, scheduler.pt,
# rng_state.pth, training_args.bin, trainer_state.json, and save_metrics' all_results.json and
# <split>_results.json): no part of the model, and rewritten by every evaluation, so counting
# it would recompute every label (or refuse a start) for a model that did not change.
TRAINING_STATE = (
    "training_args",
    "optimizer",
    "scheduler",
    "scaler",
    "rng_state",
    "trainer_state",
    "all_results",
    "train_results",
    "eval_results",
    "predict_results",
    "test_results",
)
_lock = threading.Lock()


def model_files(model_dir: Path) -> list[Path]:
    """The files of `model_dir` that decide its answers, in a stable order (what a trainer
    writes beside them aside: an optimizer's state is twice the weights, read for nothing),
    with the named chat templates that transformers keeps in `additional_chat_templates/`
    (one of them is the template where no `chat_template.jinja` stands beside them)."""
    found = [p for p in model_dir.iterdir() if p.is_file() and (is_weight(p) or is_config(p))]
    templates = model_dir / "additional_chat_templates"
    if templates.is_dir():
        found += [p for p in templates.iterdir() if p.is_file() and p.suffix == ".jinja"]
    return sorted(p for p in found if not p.name.startswith(TRAINING_STATE))


def is_weight(path: Path) -> bool:
    """Whether `path` is a file of a model's weights."""
    return path.suffix in WEIGHT_SUFFIXES


def is_config(path: Path) -> bool:
    """Whether `path` is a file of a model's config, tokenizer, chat template or code (Mistral's
    versioned tokenizer, `tokenizer.model.v3`, too)."""
    return path.suffix in CONFIG_SUFFIXES or path.name.startswith("tokenizer.model.")


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _index_path() -> Path:
    return cache_dir() / "fingerprints.json"


def _read_index() -> dict[str, dict]:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_index(index: dict[str, dict]) -> None:
    path = _index_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fingerprints-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            # mkstemp makes it 0600: another user sharing the cache could not read it and
            # would hash every weight again at each start. (A file system without modes keeps it.)
            with contextlib.suppress(OSError):
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            json.dump(index, fh)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a re-hash at the next start
        log.warning("cannot remember model fingerprints in %s: %s", path, exc)


def _umask() -> int:
    """The process's umask, read without setting it (setting it, even back at once, would give
    files other threads create meanwhile the wrong mode) where /proc tells it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)  # without /proc: a file created meanwhile is at worst too private
    os.umask(old)
    return old


def content_digest(files: list[Path], root: Path) -> str:
    """SHA-256 over each file's name (relative to `root`), size and bytes."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


@contextmanager
def _reading(what: str | os.PathLike[str]) -> Iterator[None]:
    """`ModelLoadError` naming the file that could not be read (a model directory taken by a
    user its weights are private to), not a bare traceback."""
    try:
        yield
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read {exc.filename or what} to fingerprint the model: {exc.strerror or exc} "
            "(every file of the model must be readable by the user the labeler runs as)"
        ) from exc


def fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """The content fingerprint of a model directory (64 hex digits), remembered across
    restarts while its files are unchanged (see the module docstring); `ModelLoadError`
    naming a file that cannot be read."""
    with _reading(model_dir):
        root = Path(model_dir).resolve()
        return _remembered(str(root), model_files(root), root)


def tokenizer_fingerprint(directory: str | os.PathLike[str]) -> str:
    """The content fingerprint of a directory's tokenizer, config, chat template and code
    files alone (its weights left out: a tokenizer taken from another model's directory)."""
    with _reading(directory):
        root = Path(directory).resolve()
        return _remembered(f"{root}#tokenizer", [p for p in model_files(root) if is_config(p)], root)


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """The content fingerprint of one file (its name as given, size and bytes), remembered the
    same way: what names a GGUF file's conversion (`models.converted_dir`). The name is the
    path's, not a link's target's: a file reached through a link (the Hugging Face cache's
    snapshot links to content-named blobs) names the conversion a copy of it names."""
    with _reading(path):
        p = Path(path).absolute()
        # Remembered under its folder's real path: one entry however the path is spelled.
        return _remembered(str(p.parent.resolve() / p.name), [p], p.parent)


# What this process hashed, as the index holds it: a cache directory that cannot be written
# (a read-only volume) must not make every look-up read the weights again.
_hashed: dict[str, dict] = {}


def _remembered(key: str, files: list[Path], root: Path) -> str:
    """`content_digest(files, root)`, from the index (else this process's memory of it) while
    every file's stamp is the one it was hashed with."""
    stamps = {p.relative_to(root).as_posix(): _stamp(p) for p in files}
    with _lock:
        for known in (_read_index().get(key), _hashed.get(key)):
            if known is not None and known.get("files") == stamps:
                return str(known["digest"])
        weights = sum(p.stat().st_size for p in files if is_weight(p))  # on the hashing path only
        log.info("fingerprinting %s (%.1f GB of weights; once while the files are unchanged)", key, weights / 1e9)
        digest = content_digest(files, root)
        _hashed[key] = {"files": stamps, "digest": digest}
        with _index_held():
            index = _read_index()
            index[key] = _hashed[key]
            _write_index(index)
    return digest


@contextmanager
def _index_held() -> Iterator[None]:
    """Other processes sharing the cache (a deployment's replicas, users) kept out while the
    index is read, changed and replaced: each would replace it without the entries the others
    added meanwhile, whose weights would be hashed again at the next start. Unlocked where the
    lock file cannot be opened or locked (a cache that cannot be written keeps no index)."""
    try:
        _index_path().parent.mkdir(parents=True, exist_ok=True)
        lock = open_lock(_index_path().with_name(".fingerprints.lock"))
    except OSError:
        yield
        return
    with lock:
        with contextlib.suppress(OSError):  # a file system without locks
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def model_id(model_dir: str | os.PathLike[str]) -> str:
    """`<directory name>@<first 16 hex digits of the fingerprint>`: the model's identity in
    every cache and resume key, and what responses report as `model`."""
    root = Path(model_dir)
    return f"{root.resolve().name}@{fingerprint(root)[:16]}"


def check_unchanged(model_dir: str | os.PathLike[str], before: str) -> None:
    """`ModelLoadError` unless `model_dir` still has the id `before`, taken before its weights
    loaded: a checkpoint written into the directory meanwhile would make the id name weights
    other than those loaded, and every label cached under it another model's. Cheap when
    nothing changed (the fingerprint is remembered by the files' stamps)."""
    try:
        unchanged = model_id(model_dir) == before
    except ModelLoadError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):  # unreadable: say which file
            raise
        unchanged = False  # a file removed meanwhile (a checkpoint rotated out)
    if not unchanged:
        raise ModelLoadError(
            f"the files of {model_dir} changed while its weights loaded; start again once they are written"
        )
