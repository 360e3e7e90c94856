"""verl adapter: `compute_score` for verl's custom reward function.

verl 0.9 reads it from `reward.custom_reward_function` (the top-level `custom_reward_function`
key of older releases is ignored by its main trainer), either by package or by file path:

    reward:
      custom_reward_function:
        path: pkg://labeler_client.verl      # or the file: <site-packages>/labeler_client/verl.py
        name: compute_score
        reward_kwargs: {task: helpful, base_url: "http://labeler:8000"}
      reward_manager:
        name: naive                           # or dapo, rate_limited, ... (each calls compute_score)

`compute_score` raises when the labeler fails, but verl's `rate_limited` manager catches every
exception from it (and its own `reward.timeout`) and trains on a reward of 0.0 instead (a
step whose first sample failed and a later one did not then ends with verl's KeyError: see
docs/client.md). `rate_limited` scores `reward.max_concurrent` samples at a time, 1 unless set.

The server is `base_url` from `reward_kwargs`, else LABELER_URL (and the key `api_key`, else
LABELER_API_KEY); with `serve_app` (the Serve application's name, `labeler` in the shipped
config), the labeler deployed on verl's own Ray cluster, called through a deployment handle
instead of HTTP; the task is `task` from `reward_kwargs`, else `extra_info["labeler_task"]`,
else LABELER_TASK, else "general". An unknown `reward_kwargs` key is an error. The prompt is
`extra_info["prompt"]` (or `"question"`) where the data puts it there (text, or the chat
messages of the `prompt` column), else `extra_info["raw_prompt"]`, the prompt's chat messages
that verl 0.9's agent loop adds to `extra_info` for the `naive`, `rate_limited` and `remote`
managers (not for `dapo`); without any, the response is judged without a prompt, and a
warning says so once.

`timeout` (seconds to wait for an answer, default 300) and `max_retries` set the client's;
by default a labeler that is down or refusing is retried for up to ten minutes
(`labeler_client.TRAINING_RETRY`: a restart does not end the run). Where the reward manager
has a budget of its own (`rate_limited`'s `reward.timeout`), keep the client's under it, so
that a slow labeler fails a sample instead of outliving its budget.
`overlong: lowest` gives a response over the server's length limits the lowest reward, -1.0,
instead of an error (`raise`, the default, which `naive` and `dapo` let end the run): as
`/get_reward?overlong=lowest` does for OpenRLHF.

`compute_score_async` (name: compute_score_async) is the same reward as a coroutine, which
verl's reward managers await: every sample of a batch in flight at once (the service batches
them), where a plain function runs in the manager's thread pool, a few samples at a time
(`remote`, a Ray actor, takes only the plain one); `compute_reference_score_async` likewise.

`compute_reference_score` (name: compute_reference_score) rewards the response against a
reference response instead, 2 P(response preferred) - 1: the reference is
`extra_info["reference"]` when the data has it (text or chat messages), else verl's `ground_truth` (the
`reward_model.ground_truth` column), which must then be text. verl calls reward functions one
sample at a time, so group-relative rewards have no place in its protocol.

`compute_score_batch` is the batch form, for verl's legacy `BatchRewardManager`
(`verl.workers.reward_manager`, name `batch`), which the reward loop of verl 0.9 no longer has.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

# Absolute imports: verl loads this file by path too, as a module outside the package (and
# Ray then pickles its functions by value: what they share lives in an importable module).
from labeler_client._config import Overlong, check_overlong
from labeler_client._exceptions import APIStatusError, InvalidRequest
from labeler_client._shared import shared_async_client, shared_client
from labeler_client._text import context_value

__all__ = [
    "compute_reference_score",
    "compute_reference_score_async",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
]

# The reward of a response over the server's length limits, with overlong="lowest".
LOWEST = -1.0


def _task(extra: dict, task: str | None) -> str:
    return task or extra.get("labeler_task") or os.environ.get("LABELER_TASK") or "general"


def _prompt(extra: dict) -> Any:
    # A key present but None (a Parquet column other rows fill) counts as absent.
    prompt = next((extra[k] for k in ("prompt", "question", "raw_prompt") if extra.get(k) is not None), None)
    if prompt is None:
        # Shown once a process (one warning location): every sample of such data lacks it.
        warnings.warn(
            "labeler_client.verl: extra_info has no 'prompt' (or 'question', or verl's 'raw_prompt'): responses "
            "are judged without their prompt; put it in extra_info when preparing the data",
            stacklevel=1,
        )
        return ""
    return context_value(prompt)


def _lowest(error: InvalidRequest, overlong: str) -> bool:
    """Whether `error` gives the response LOWEST: with `overlong` "lowest", the response (or
    the item as a whole: its tokens) over a length limit; an over-long prompt or reference is
    the data's."""
    return overlong == "lowest" and error._response_too_long


def _one(call: Callable[[], list[float | None]], overlong: str) -> float:
    """The one reward `call` returns; with `overlong` "lowest", LOWEST for a response the
    server refuses as over a length limit."""
    check_overlong(overlong)
    try:
        reward = call()[0]
    except InvalidRequest as e:
        if _lowest(e, overlong):
            return LOWEST
        raise
    assert reward is not None  # on_error="raise": a failure has raised
    return reward


async def _one_async(call: Callable[[], Awaitable[list[float | None]]], overlong: str) -> float:
    """`_one` for a coroutine `call`."""
    check_overlong(overlong)
    try:
        reward = (await call())[0]
    except InvalidRequest as e:
        if _lowest(e, overlong):
            return LOWEST
        raise
    assert reward is not None
    return reward


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: dict | None = None,
    *,
    task: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    serve_app: str | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    overlong: Overlong = "raise",
    reward_router_address: str | None = None,
    reward_model_tokenizer: Any = None,
) -> float:
    """The labeler's direct-score reward in [-1, 1] for `solution_str` (an empty one is judged
    too). `data_source` and `ground_truth` are accepted as verl passes them (an AI labeler
    needs no reference), and so are `reward_router_address` / `reward_model_tokenizer`, which
    verl adds when it runs a reward model of its own. Raises `LabelerClientError` when the service
    fails after retries (never a made-up score); a response over the server's length limits
    gets -1.0 instead with `overlong="lowest"`."""
    extra = dict(extra_info or {})
    client = shared_client(base_url, api_key, serve_app, timeout=timeout, max_retries=max_retries)
    prompt = _prompt(extra)
    return _one(lambda: client.rewards([prompt], [solution_str], _task(extra, task)), overlong)


def compute_reference_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: dict | None = None,
    *,
    task: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    serve_app: str | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    overlong: Overlong = "raise",
    reward_router_address: str | None = None,
    reward_model_tokenizer: Any = None,
) -> float:
    """The labeler's pairwise reward of `solution_str` against a reference response, in
    [-1, 1] (both orders): the reference is `extra_info["reference"]` (text, or chat messages
    whose assistant turns are the reference), else `ground_truth`, which must be text. Raises
    ValueError without either, TypeError for a reference of another type, `LabelerClientError`
    when the service fails; `overlong` and the client's options as for `compute_score`."""
    extra = dict(extra_info or {})
    reference = _reference(extra, ground_truth)
    client = shared_client(base_url, api_key, serve_app, timeout=timeout, max_retries=max_retries)
    prompt = _prompt(extra)
    return _one(lambda: client.rewards_against([prompt], [solution_str], [reference], _task(extra, task)), overlong)


def _reference(extra: dict, ground_truth: Any) -> Any:
    reference = extra.get("reference")
    if reference is None:
        if not isinstance(ground_truth, str):
            raise ValueError(
                "compute_reference_score needs a reference response: extra_info['reference'] or a text "
                f"ground_truth, got a ground_truth of type {type(ground_truth).__name__}"
            )
        reference = ground_truth
    return reference


async def compute_score_async(
    data_source: str,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: dict | None = None,
    *,
    task: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    serve_app: str | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    overlong: Overlong = "raise",
    reward_router_address: str | None = None,
    reward_model_tokenizer: Any = None,
) -> float:
    """`compute_score` as a coroutine (name: compute_score_async). verl's reward loop awaits
    a coroutine reward function, so every sample of a batch is in flight at once and the
    service batches them; a plain function runs in verl's thread pool, as many at a time as
    it has threads. Options and errors as for `compute_score`."""
    extra = dict(extra_info or {})
    client = shared_async_client(base_url, api_key, serve_app, timeout=timeout, max_retries=max_retries)
    prompt = _prompt(extra)
    return await _one_async(lambda: client.rewards([prompt], [solution_str], _task(extra, task)), overlong)


async def compute_reference_score_async(
    data_source: str,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: dict | None = None,
    *,
    task: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    serve_app: str | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    overlong: Overlong = "raise",
    reward_router_address: str | None = None,
    reward_model_tokenizer: Any = None,
) -> float:
    """`compute_reference_score` as a coroutine (name: compute_reference_score_async), for
    the same reason as `compute_score_async`."""
    extra = dict(extra_info or {})
    reference = _reference(extra, ground_truth)
    client = shared_async_client(base_url, api_key, serve_app, timeout=timeout, max_retries=max_retries)
    prompt = _prompt(extra)
    call = client.rewards_against
    return await _one_async(lambda: call([prompt], [solution_str], [reference], _task(extra, task)), overlong)


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any] | None = None,
    extra_infos: Sequence[dict | None] | None = None,
    *,
    task: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    serve_app: str | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
) -> list[float]:
    """The batch form (verl's legacy `batch` reward manager): one batched, concurrent call
    per task instead of one request per sample; rewards in input order."""
    extras = [dict(e or {}) for e in (extra_infos if extra_infos is not None else [None] * len(solution_strs))]
    if len(extras) != len(solution_strs):
        raise ValueError(f"{len(solution_strs)} solutions but {len(extras)} extra_infos")
    by_task: dict[str, list[int]] = {}
    for i, extra in enumerate(extras):
        by_task.setdefault(_task(extra, task), []).append(i)
    out: list[float] = [0.0] * len(solution_strs)
    client = shared_client(base_url, api_key, serve_app, timeout=timeout, max_retries=max_retries)
    for name, idx in by_task.items():
        try:
            rewards = client.rewards([_prompt(extras[i]) for i in idx], [solution_strs[i] for i in idx], name)
        except APIStatusError as e:
            e._renumber(idx.__getitem__)  # the sample's place in the batch, not in its task's share
            raise
        for i, r in zip(idx, rewards, strict=True):
            assert r is not None
            out[i] = r
    return out
