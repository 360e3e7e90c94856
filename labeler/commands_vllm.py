"""`labeler vllm-server MODEL [ARGS...]`: vLLM's OpenAI-compatible server for the
`vllm-remote` engine, with the CPU defaults of the in-process engine.

It runs `python -m vllm.entrypoints.openai.api_server --model MODEL ARGS...` in place of
this process (same PID, so signals reach vLLM directly). ARGS are vLLM's own server flags
and win over the defaults. On a CPU it adds what the in-process engine gets by default
(`labeler.engines.vllm_cpu`): `--dtype float32`, `--enforce-eager`, a
`--kv-cache-memory-bytes` that fits, and `VLLM_CPU_OMP_THREADS_BIND` set to this
process's CPUs, each where neither ARGS nor a `--config` file among them sets it. On a GPU
it adds nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InvalidInput

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM's short aliases of the flags the CPU defaults look at.
_ALIASES = {"tp": "tensor-parallel-size", "pp": "pipeline-parallel-size", "dp": "data-parallel-size"}


def given_args(argv: Sequence[str]) -> dict[str, Any]:
    """The engine arguments that vLLM server flags `argv` set, by their engine-argument
    name (`--max-model-len 2048` → {"max_model_len": "2048"}, `--enforce-eager` → True,
    `--no-enforce-eager` → False). Values stay strings."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("-") or tok == "--":
            continue
        name, eq, value = tok.lstrip("-").partition("=")
        name = _ALIASES.get(name, name).replace("_", "-")
        if eq:
            out[name.replace("-", "_")] = value
        elif i < len(argv) and (not argv[i].startswith("-") or _number(argv[i])):
            out[name.replace("-", "_")] = argv[i]
            i += 1
        elif name.startswith("no-"):
            out[name[3:].replace("-", "_")] = False
        else:
            out[name.replace("-", "_")] = True
    return out


def config_args(path: str) -> dict[str, Any]:
    """The engine arguments a vLLM `--config` YAML file sets, named as `given_args` names
    them (its flags' values as text, a `false` flag as False). InvalidInput naming `config`
    for a file vLLM could not read either."""
    import json

    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read the vLLM config file {path}: {exc}", field="config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(f"the vLLM config file {path} is not a mapping of flags to values", field="config")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _ALIASES.get(str(key), str(key)).replace("-", "_")
        if isinstance(value, bool):
            out[name] = value
        elif isinstance(value, (dict, list)):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def _number(text: str) -> bool:
    """A flag's value that starts with "-" (`--seed -1`), not the next flag."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def server_command(model: str, argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that start vLLM's server on `model` with
    flags `argv` and, on a CPU, the CPU defaults."""
    from .engines.vllm_cpu import cpu_defaults, on_cpu, parse_size
    from .models import resolve_model

    model_dir = resolve_model(model)
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", str(model_dir)]
    env: dict[str, str] = {}
    if on_cpu():
        given = given_args(argv)
        if isinstance(given.get("config"), str):  # vLLM reads its flags under the command line's
            given = {**config_args(given["config"]), **given}
        given = {k: parse_size(v) for k, v in given.items()}
        defaults = cpu_defaults(model_dir, given)
        for key, value in defaults.args.items():
            flag = "--" + key.replace("_", "-")
            cmd += [flag] if value is True else [flag, str(value)]
        env = defaults.env
    return cmd + list(argv), env


def register(sub: argparse._SubParsersAction) -> None:
    """Add `vllm-server` to the `labeler` parser."""
    p = sub.add_parser(
        "vllm-server",
        help="start vLLM's OpenAI server for --engine vllm-remote (with the CPU defaults on a CPU)",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
    )
    p.add_argument("model", metavar="MODEL", help="'embedded', a local HF model directory, or a .gguf file")
    p.add_argument(
        "vllm_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="vLLM server flags, e.g. --port 8001 --max-model-len 4096 (they win over the defaults)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, start nothing")
    p.set_defaults(func=_cmd_vllm_server)


def _cmd_vllm_server(args: argparse.Namespace) -> int:
    # After MODEL every argument is vLLM's: these two would be taken for vLLM's and act unseen
    # (a --dry-run starting the server; a --model serving another model than the defaults are for).
    for own in ("--dry-run", "--model"):
        if any(a == own or a.startswith(own + "=") for a in args.vllm_args):
            raise InvalidInput(f"{own} goes before MODEL (after it, every argument is passed to vLLM)", field=own)
    cmd, env = server_command(args.model, args.vllm_args)
    if args.dry_run:
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, cmd)]))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, {**os.environ, **env})
    return 0  # pragma: no cover - execve does not return
