"""Engines that host the labeler model. `load_engine` picks one by name."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from typing import Any

from ..errors import InvalidInput
from .base import Engine, EngineStats, GenerateRequest, Generation, Logprobs, ScoreRequest

ENGINES = ("transformers", "vllm", "vllm-remote")


def load_engine(name: str = "transformers", model: str | None = None, **options: Any) -> Engine:
    """Create the engine called `name` for `model` (see `labeler.models.resolve_model`).

    - "transformers": a local PyTorch model (options: device, dtype, max_batch_tokens, threads,
      min_shared_tokens, pack_tokens);
    - "vllm": vLLM's AsyncLLM in this process (options: any vLLM engine argument, e.g.
      gpu_memory_utilization, max_model_len, tensor_parallel_size, dtype, load_format, seed);
    - "vllm-remote": `vllm serve` servers (options: urls (list or comma-separated), served_model,
      api_key, timeout, retries, cooldown); `model` is a local copy for the tokenizer.

    Heavy imports (torch, vLLM) happen here, only for the engine chosen.
    """
    from ..models import resolve_model

    check_engine(name, options)
    if name == "transformers":
        from .transformers_engine import TransformersEngine

        return TransformersEngine(resolve_model(model), **options)
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(resolve_model(model), **options)
    from .vllm_remote import VLLMRemoteEngine

    urls = options.pop("urls")
    return VLLMRemoteEngine(urls, resolve_model(model), **options)


def check_engine(name: str, options: dict[str, Any]) -> None:
    """Refuse (InvalidInput) an engine name `load_engine` does not know, an option the engine
    does not take, or vllm-remote without server URLs: before any model loads. vLLM's own
    arguments are checked by vLLM (`VLLMEngine`; `vllm_cpu.check_start` on a CPU)."""
    if name == "transformers":
        from .transformers_engine import TransformersEngine

        _check_options(name, TransformersEngine, options)
    elif name == "vllm-remote":
        from .vllm_remote import VLLMRemoteEngine, checked_urls

        checked_urls(options.get("urls") or [])
        _check_options(name, VLLMRemoteEngine, {k: v for k, v in options.items() if k != "urls"})
    elif name != "vllm":
        raise InvalidInput(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}", field="engine")


def _check_options(name: str, engine: type, options: dict[str, Any]) -> None:
    """Refuse, by name, an option the engine does not take (say, a vLLM argument left in
    LABELER_ENGINE_ARGS after a switch to the transformers engine) or a value of the wrong
    kind (`engine.checked_options`, given the constructor's defaults for the others), before
    any model loads. vLLM's own arguments are checked by vLLM (`VLLMEngine`)."""
    params = [p for p in inspect.signature(engine.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    taken = [p.name for p in params]
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise InvalidInput(
            f"the {name} engine takes no option {unknown[0]!r} (--engine-arg); it takes {', '.join(taken)}",
            field="engine_args",
        )
    engine.checked_options(**{p.name: options.get(p.name, p.default) for p in params})


def engine_options(
    engine: str, *, device: str = "cpu", engine_args: Iterable[str] = (), vllm_urls: str | list[str] | None = None
) -> dict[str, Any]:
    """The options for `load_engine(engine, ...)` from the settings every front end has (the
    `--engine-arg KEY=VALUE` strings, `--device`, `--vllm-urls`); explicit engine arguments win."""
    options = parse_engine_args(engine_args)
    if engine == "transformers":
        options.setdefault("device", device)
    if engine == "vllm-remote" and vllm_urls:
        options.setdefault("urls", vllm_urls)
    return options


def parse_engine_args(pairs: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings to engine options; values are read as JSON when they parse
    (numbers, booleans, lists), else kept as strings: `max_model_len=2048 dtype=float32`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"engine argument {pair!r} is not KEY=VALUE", field="engine_args")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


__all__ = [
    "ENGINES",
    "Engine",
    "EngineStats",
    "GenerateRequest",
    "Generation",
    "Logprobs",
    "ScoreRequest",
    "check_engine",
    "engine_options",
    "load_engine",
    "parse_engine_args",
]
