"""TRL adapters: GRPO reward functions and a pairwise judge.

    from labeler_client.trl import reward_function
    trainer = GRPOTrainer(model=..., reward_funcs=[reward_function(task="helpful")], ...)

GRPOTrainer calls a reward function with keyword arguments: `prompts`, `completions`,
`completion_ids` and every other dataset column (newer versions add more, such as
`trainer_state`); prompts and completions are strings or, for conversational datasets,
lists of `{"role", "content"}` messages. It logs rewards under the function's `__name__`,
treats `None` as "no reward for this sample", and awaits `async def` reward functions on
an event loop of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ._client import AsyncClient, Client, OnError
from ._text import Text, pair_items

__all__ = ["PairwiseJudge", "async_reward_function", "reward_function"]

RewardFn = Callable[..., list[float | None]]


def _prompts_for(prompts: Sequence[Text] | None, completions: Sequence[Text]) -> Sequence[Text]:
    if completions is None:
        raise TypeError("the reward function needs completions=")
    return [""] * len(completions) if prompts is None else prompts


def reward_function(
    base_url: str | None = None,
    task: str = "general",
    *,
    name: str | None = None,
    on_error: OnError = "raise",
    client: Client | None = None,
    **client_opts: Any,
) -> RewardFn:
    """A callable for `GRPOTrainer(reward_funcs=[...])`: the labeler's direct-score reward in
    [-1, 1] for each (prompt, completion), named `name` or `labeler_<task>`.

    `client_opts` go to `Client` (api_key, timeout, retry, batch_size, max_concurrency), or
    pass a `client`. A failed request raises after retries; with `on_error="none"` the
    samples it covered get None (TRL then leaves them out) instead.
    """
    client = client or Client(base_url, **client_opts)

    def reward(
        prompts: Sequence[Text] | None = None, completions: Sequence[Text] | None = None, **_columns: Any
    ) -> list[float | None]:
        return client.rewards(_prompts_for(prompts, completions), completions, task, on_error=on_error)

    reward.__name__ = reward.__qualname__ = name or f"labeler_{task}"
    reward.client = client  # type: ignore[attr-defined]
    return reward


def async_reward_function(
    base_url: str | None = None,
    task: str = "general",
    *,
    name: str | None = None,
    on_error: OnError = "raise",
    **client_opts: Any,
) -> Callable[..., Any]:
    """The `async def` variant, for TRL versions that await coroutine reward functions (they
    run them concurrently with the other reward functions). One `AsyncClient` per event loop,
    so calling it from `asyncio.run` more than once is fine too."""
    clients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncClient]] = {}

    def client_for_loop() -> AsyncClient:
        loop = asyncio.get_running_loop()
        for key, (known, _) in list(clients.items()):
            if known.is_closed():
                del clients[key]
        if id(loop) not in clients:
            clients[id(loop)] = (loop, AsyncClient(base_url, **client_opts))
        return clients[id(loop)][1]

    async def reward(
        prompts: Sequence[Text] | None = None, completions: Sequence[Text] | None = None, **_columns: Any
    ) -> list[float | None]:
        client = client_for_loop()
        return await client.rewards(_prompts_for(prompts, completions), completions, task, on_error=on_error)

    reward.__name__ = reward.__qualname__ = name or f"labeler_{task}"
    return reward


class PairwiseJudge:
    """TRL's pairwise-judge interface (`BasePairwiseJudge.judge`) over the labeler's
    preferences, for trainers that take a `judge=` (online DPO, XPO, Nash-MD).

    `judge(prompts, completions)` with `completions[i] = [first, second]` returns, per
    prompt, the index of the preferred completion (0 or 1), or with `return_scores=True`
    the probability that the first is preferred. The service reads both orders and
    averages them, which removes position bias more thoroughly than a random shuffle, so
    `shuffle_order` is accepted and has nothing left to do. With `on_error="none"` a pair
    whose request failed gives -1 (TRL's "the judge failed" value), or None as a score.
    """

    def __init__(
        self,
        base_url: str | None = None,
        task: str = "general",
        *,
        on_error: OnError = "raise",
        client: Client | None = None,
        **client_opts: Any,
    ) -> None:
        self.task = task
        self.on_error: OnError = on_error
        self.client = client or Client(base_url, **client_opts)

    def judge(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Sequence[Text]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float | None]:
        prefs = self.client.preferences(
            pair_items(prompts, completions), self.task, order="both", on_error=self.on_error
        )
        if return_scores:
            return [p.p_a if p is not None else None for p in prefs]
        return [-1 if p is None else (0 if p.p_a >= 0.5 else 1) for p in prefs]
