"""F1: what the model fingerprint costs on an 8B model, first start and restart.

A Llama-3-8B checkpoint in bf16 is four safetensors shards (`SHARDS_GB`). F1 writes a
directory of that shape (random bytes: the fingerprint reads bytes, not tensors) with a real
config and tokenizer, then times `labeler.fingerprint.fingerprint` twice: the first call
reads and hashes every byte; the second, as at a server restart on unchanged files, only
stats the files. Before the first call the shards are evicted from the page cache (fsync,
then POSIX_FADV_DONTNEED), as at a first start, when they come from disk; the detail says
what share of their pages was still cached after that (mincore), or that eviction was not
possible. Each figure is one timing of one call.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Result, add_results_option, emit

SHARDS_GB = (4.98, 5.00, 4.92, 1.17)  # Meta-Llama-3-8B's model-0000N-of-00004.safetensors
CHUNK = 64 << 20


def write_model(root: Path, scale: float, tokenizer_dir: Path) -> int:
    """A model directory of Llama-3-8B's shape (scaled); returns its weight bytes."""
    total = 0
    block = os.urandom(CHUNK)
    for n, gb in enumerate(SHARDS_GB, start=1):
        size = int(gb * 1e9 * scale)
        with (root / f"model-{n:05d}-of-{len(SHARDS_GB):05d}.safetensors").open("wb") as fh:
            left = size
            while left > 0:
                fh.write(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)
        total += size
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32}))
    for f in tokenizer_dir.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "config.json":
            (root / f.name).write_bytes(f.read_bytes())
    return total


def evict(paths: list[Path]) -> str | None:
    """Drop `paths`' pages from the page cache: each file synced, then POSIX_FADV_DONTNEED
    (which drops clean pages only). None where done, else why it could not be."""
    if not hasattr(os, "posix_fadvise"):
        return "os.posix_fadvise is not available here"
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            return f"{path.name}: {exc}"
        finally:
            os.close(fd)
    return None


def cached_share(paths: list[Path]) -> float | None:
    """The share of `paths`' pages in the page cache (mincore over a shared read-only map, which
    reads nothing); None where it cannot be told."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    except (OSError, AttributeError):
        return None
    cached = pages = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        n = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        with path.open("rb") as fh:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            if libc.mincore(addr, size, vec) != 0:
                return None
        finally:
            libc.munmap(addr, size)
        cached += sum(b & 1 for b in vec)
        pages += n
    return cached / pages if pages else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 8B model's size to write")
    ap.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary directory)")
    add_results_option(ap)
    args = ap.parse_args()
    from labeler import fingerprint as fp
    from labeler.models import resolve_model

    tokenizer_dir = resolve_model(None)  # before the cache dir moves to the temporary one
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "llama-3-8b-shape"
        root.mkdir()
        os.environ["LABELER_CACHE_DIR"] = str(Path(tmp) / "cache")  # a fingerprint index of its own
        size = write_model(root, args.scale, tokenizer_dir)
        shards = sorted(root.glob("*.safetensors"))
        why_not = evict(shards)
        share = cached_share(shards)
        t0 = time.perf_counter()
        fp.fingerprint(root)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fp.fingerprint(root)
        again = time.perf_counter() - t0
    result = Result(
        "F1",
        "model fingerprint of an 8B model (bf16), first start: seconds (one timing)",
        first / args.scale,
        None,
        "lower",
        unit="s",
        detail=f"one timing of each call: {size / 1e9:.2f} GB of weights in {len(SHARDS_GB)} shards read and "
        f"hashed in {first:.1f} s ({size / first / 1e9:.2f} GB/s, SHA-256)"
        + (f", scaled to the full {sum(SHARDS_GB):.2f} GB" if args.scale != 1 else "")
        + "; "
        + evicted(why_not, share)
        + f"; a restart on unchanged files: {1e3 * again:.2f} ms",
    )
    emit(result, args.results)
    return 0


def evicted(why_not: str | None, share: float | None) -> str:
    """What the detail says of the eviction before the first call."""
    if why_not is not None:
        return f"the shards could not be evicted from the page cache ({why_not}): a hashing speed, not a disk read"
    said = "the shards evicted from this machine's page cache before the first call (fsync, POSIX_FADV_DONTNEED)"
    if share is None:
        return said + "; how much stayed cached could not be told (mincore)"
    return said + f", {100 * share:.1f}% of their pages still cached after it (mincore)"


if __name__ == "__main__":
    sys.exit(main())
