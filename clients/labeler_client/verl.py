"""verl adapter: `compute_score` functions for `custom_reward_function` in verl's config.

    custom_reward_function:
      path: <site-packages>/labeler_client/verl.py
      name: compute_score            # or compute_score_batch with reward_manager: batch
      reward_kwargs: {task: helpful}

The server comes from LABELER_URL (and LABELER_API_KEY); the task from `task` in
reward_kwargs, else `extra_info["labeler_task"]`, else LABELER_TASK, else "general". The
prompt is `extra_info["prompt"]` (or `"question"`): text or chat messages; add it to
`extra_info` when preparing the data, since verl passes only the response.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from ._client import Client

__all__ = ["compute_score", "compute_score_batch"]

_client: Client | None = None
_lock = threading.Lock()


def _shared_client() -> Client:
    global _client
    with _lock:
        if _client is None:
            _client = Client()
        return _client


def _task(extra: dict, kwargs: dict) -> str:
    return kwargs.get("task") or extra.get("labeler_task") or os.environ.get("LABELER_TASK") or "general"


def _prompt(extra: dict) -> Any:
    return extra.get("prompt", extra.get("question", ""))


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any = None, extra_info: dict | None = None, **kwargs: Any
) -> float:
    """The labeler's direct-score reward in [-1, 1] for `solution_str`. `data_source` and
    `ground_truth` are accepted as verl passes them; an AI labeler needs no reference.
    Raises `LabelerClientError` when the service fails after retries (never a made-up score)."""
    extra = dict(extra_info or {})
    reward = _shared_client().rewards([_prompt(extra)], [solution_str], _task(extra, kwargs))[0]
    assert reward is not None  # on_error="raise": a failure has raised
    return reward


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict | None],
    **kwargs: Any,
) -> list[float]:
    """The batch form, for verl's `reward_manager: batch`: one batched, concurrent call per
    task instead of one request per sample; rewards in input order."""
    extras = [dict(e or {}) for e in (extra_infos if extra_infos is not None else [None] * len(solution_strs))]
    if len(extras) != len(solution_strs):
        raise ValueError(f"{len(solution_strs)} solutions but {len(extras)} extra_infos")
    by_task: dict[str, list[int]] = {}
    for i, extra in enumerate(extras):
        by_task.setdefault(_task(extra, kwargs), []).append(i)
    out: list[float] = [0.0] * len(solution_strs)
    client = _shared_client()
    for task, idx in by_task.items():
        rewards = client.rewards([_prompt(extras[i]) for i in idx], [solution_strs[i] for i in idx], task)
        for i, r in zip(idx, rewards, strict=True):
            assert r is not None
            out[i] = r
    return out
