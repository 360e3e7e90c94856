"""F1: what the model fingerprint costs on an 8B model, first start and restart.

A Llama-3-8B checkpoint in bf16 is four safetensors shards (`SHARDS_GB`). F1 writes a
directory of that shape (random bytes: the fingerprint reads bytes, not tensors) with a real
config and tokenizer, then times `labeler.fingerprint.fingerprint` twice: the first call
reads and hashes every byte; the second, as at a server restart on unchanged files, only
stats the files. The files' pages may still be in the page cache from writing them, so the
first figure is a hashing speed, a lower bound on a cold disk's time. Each figure is one
timing of one call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Result

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 8B model's size to write")
    ap.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary directory)")
    args = ap.parse_args()
    from labeler import fingerprint as fp
    from labeler.models import resolve_model

    tokenizer_dir = resolve_model(None)  # before the cache dir moves to the temporary one
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "llama-3-8b-shape"
        root.mkdir()
        os.environ["LABELER_CACHE_DIR"] = str(Path(tmp) / "cache")  # a fingerprint index of its own
        size = write_model(root, args.scale, tokenizer_dir)
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
        detail=f"one timing of each call: {size / 1e9:.2f} GB of weights in {len(SHARDS_GB)} shards hashed in "
        f"{first:.1f} s ({size / first / 1e9:.2f} GB/s, SHA-256)"
        + (f", scaled to the full {sum(SHARDS_GB):.2f} GB" if args.scale != 1 else "")
        + f"; a restart on unchanged files: {1e3 * again:.2f} ms",
    )
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
