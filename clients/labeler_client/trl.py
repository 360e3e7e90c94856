"""TRL adapters: a GRPO reward function and a pairwise judge.

    from labeler_client.trl import reward_function
    trainer = GRPOTrainer(model=..., reward_funcs=[reward_function(task="helpful")], ...)

GRPOTrainer calls a reward function with keyword arguments: `prompts`, `completions`,
`completion_ids` and every extra dataset column; prompts and completions are strings or,
for conversational datasets, lists of `{"role", "content"}` messages. It logs rewards under
the function's `__name__`, and treats `None` as "no reward for this sample".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._client import AsyncClient, Client, Text

RewardFn = Callable[..., list[float | None]]


def reward_function(base_url: str | None = None, task: str = "general", *, name: str | None = None,
                    on_error: str = "raise", **client_opts: Any) -> RewardFn:  # fmt: skip
    """A callable for `GRPOTrainer(reward_funcs=[...])`: the labeler's direct-score reward in
    [-1, 1] for each (prompt, completion). `on_error="none"` gives None for samples whose
    request failed after retries (TRL then skips them) instead of raising."""
    client = Client(base_url, **client_opts)

    def reward(prompts: Sequence[Text], completions: Sequence[Text], **_: Any) -> list[float | None]:
        return client.rewards(prompts, completions, task, on_error=on_error)  # type: ignore[arg-type]

    reward.__name__ = name or f"labeler_{task}"
    reward.client = client  # type: ignore[attr-defined]
    return reward


def async_reward_function(base_url: str | None = None, task: str = "general", *, name: str | None = None,
                          on_error: str = "raise", **client_opts: Any) -> Callable[..., Any]:  # fmt: skip
    """The coroutine variant, for trainers that await async reward functions."""
    client = AsyncClient(base_url, **client_opts)

    async def reward(prompts: Sequence[Text], completions: Sequence[Text], **_: Any) -> list[float | None]:
        return await client.rewards(prompts, completions, task, on_error=on_error)  # type: ignore[arg-type]

    reward.__name__ = name or f"labeler_{task}"
    reward.client = client  # type: ignore[attr-defined]
    return reward


class PairwiseJudge:
    """TRL's pairwise-judge interface over the labeler's both-orders preferences.

    `judge(prompts, completions)` with `completions[i] = [first, second]` returns, per
    prompt, the index of the preferred completion (0 or 1), or with `return_scores=True`
    the probability that the first is preferred. The service already reads both orders and
    averages them, so `shuffle_order` is accepted and has nothing left to do.
    """

    def __init__(self, base_url: str | None = None, task: str = "general", **client_opts: Any) -> None:
        self.task = task
        self.client = Client(base_url, **client_opts)

    def judge(self, prompts: Sequence[Text], completions: Sequence[Sequence[Text]], shuffle_order: bool = True,
              return_scores: bool = False) -> list[int] | list[float]:  # fmt: skip
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion pairs")
        from ._client import as_text

        items = []
        for p, pair in zip(prompts, completions, strict=True):
            if len(pair) != 2:
                raise ValueError("each entry of completions must hold exactly two completions")
            items.append({"context": as_text(p), "response_a": as_text(pair[0], role=_role(pair[0])),
                          "response_b": as_text(pair[1], role=_role(pair[1]))})  # fmt: skip
        prefs = self.client.preferences(items, self.task, order="both")
        if return_scores:
            return [p.p_a for p in prefs]  # type: ignore[union-attr]
        return [0 if p.p_a >= 0.5 else 1 for p in prefs]  # type: ignore[union-attr]


def _role(value: Text) -> str | None:
    return "assistant" if isinstance(value, list) else None
