"""verl adapter: a `compute_score` for `custom_reward_function` in verl's config.

    custom_reward_function:
      path: /path/to/site-packages/labeler_client/verl.py
      name: compute_score

The server comes from LABELER_URL (and LABELER_API_KEY), the task from LABELER_TASK
(default "general") or `extra_info["labeler_task"]`. The prompt is read from
`extra_info["prompt"]` (or "question") when the data provides it.
"""

from __future__ import annotations

import os
from typing import Any

from ._client import Client, as_text

_client: Client | None = None


def _shared_client() -> Client:
    global _client
    if _client is None:
        _client = Client()
    return _client


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  **kwargs: Any) -> float:  # fmt: skip
    """The labeler's direct-score reward in [-1, 1] for `solution_str` (`data_source` and
    `ground_truth` are accepted as verl passes them; an AI labeler needs no reference)."""
    extra = extra_info or {}
    task = kwargs.get("task") or extra.get("labeler_task") or os.environ.get("LABELER_TASK", "general")
    prompt = extra.get("prompt", extra.get("question", ""))
    reward = _shared_client().rewards([as_text(prompt)], [solution_str], task)[0]
    assert reward is not None
    return reward
