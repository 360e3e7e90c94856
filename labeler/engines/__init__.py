"""Engines that host the labeler model. `load_engine` picks one by name."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput
from .base import Engine, EngineStats, GenerateRequest, Generation, Logprobs, ScoreRequest

ENGINES = ("transformers",)


def load_engine(name: str = "transformers", model: str | None = None, **options: Any) -> Engine:
    """Create the engine called `name` for `model` (see `labeler.models.resolve_model`).

    Heavy imports (torch, vLLM) happen here, only for the engine chosen.
    """
    if name == "transformers":
        from ..models import resolve_model
        from .transformers_engine import TransformersEngine

        return TransformersEngine(resolve_model(model), **options)
    raise InvalidInput(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}", field="engine")


__all__ = [
    "ENGINES",
    "Engine",
    "EngineStats",
    "GenerateRequest",
    "Generation",
    "Logprobs",
    "ScoreRequest",
    "load_engine",
]
