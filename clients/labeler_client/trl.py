"""TRL adapters: reward functions for GRPO (and every trainer that takes `reward_funcs`), and a
pairwise judge for the TRL releases that call judges.

    from labeler_client.trl import reward_function
    trainer = GRPOTrainer(model=..., reward_funcs=[reward_function(task="helpful")], ...)

TRL calls a reward function with keyword arguments: `prompts`, `completions`,
`completion_ids` and every other dataset column (1.x adds `trainer_state`, `log_extra`,
`log_metric`, ...); prompts and completions are strings or, for conversational datasets,
lists of `{"role", "content"}` messages. It logs rewards under the function's `__name__`,
turns `None` into NaN ("no reward for this sample"), and awaits `async def` reward
functions (also a callable object whose `__call__` is a coroutine) on a loop of its own.
(TRL up to 1.9 detects coroutine functions with `inspect.iscoroutinefunction`, which sees the
async callable object only on Python 3.12+.) `AsyncGRPOTrainer` computes rewards in a
spawned child process, so reward functions must pickle: these are callable objects, not
closures, and leave their HTTP clients behind when pickled (a copy opens its own on first
use).

Pairwise rewards: `reference_reward_function` rewards each completion against a reference
response from a dataset column (2 P(completion preferred) - 1); `group_reward_function` compares
the completions of each prompt with each other (GRPO's groups: TRL repeats every prompt
`num_generations` times in a row) and gives each its centred mean win probability.

Judges: TRL 0.10 to 1.0 (online DPO, XPO, Nash-MD, `WinRateCallback`) take a `judge=`;
TRL 1.1 removed judges, and its online DPO takes `reward_funcs` like GRPO.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import threading
from collections.abc import Sequence
from typing import Any, get_args

from ._client import AsyncClient, Client, OnError, Order, _BaseClient
from ._config import TRAINING_RETRY, Overlong, check_overlong, resolve_key, resolve_url, shown_url
from ._exceptions import APIStatusError, InvalidRequest, LabelerClientError
from ._shared import client_for_loop
from ._text import Text, pair_items

# The columns TRL's GRPO, RLOO and AsyncGRPO trainers leave out of the keyword call
# (grpo_trainer.py, _calculate_rewards): a reference kept in one of them never arrives.
_TRL_WITHHELD_COLUMNS = ("prompt", "completion", "completion_ids")

# The service's largest group (labeler.spec.MAX_GROUP_SIZE; the client does not import the labeler).
MAX_GROUP_SIZE = 32

__all__ = [
    "AsyncRewardFunction",
    "GroupRewardFunction",
    "PairwiseJudge",
    "ReferenceRewardFunction",
    "RewardFunction",
    "async_reward_function",
    "find_groups",
    "group_reward_function",
    "reference_reward_function",
    "reward_function",
]

log = logging.getLogger("labeler_client.trl")

# A pair's soft score when its request failed and on_error="none": "no preference", the
# value whose term is zero in Nash-MD's REINFORCE update (probability - 0.5).
NO_PREFERENCE = 0.5

# The reward of a completion over the server's length limits, with overlong="lowest".
LOWEST = -1.0


class _Overlong:
    """The rows of a batch still to send, and the rewards so far, where a completion the
    server refuses as over its length limits gets LOWEST (overlong="lowest") and the rest are
    sent again (those answered before are cache hits there). Rows are TRL's batch positions.

    With on_error="none" too, the rows are sent with errors raised, to tell an over-long
    completion from a failure. A failure that names no row (the server unreachable after the
    retries) fails every row of such a call: the rest of the rows are then sent as
    on_error="none" sends them, and where the server answered anything meanwhile, the rows
    that came back None (failed, or refused as over long: "none" does not say which) are sent
    once more with errors raised, where an over-long one still gets LOWEST; a second failure
    that names no row leaves them None. (A server that answered nothing is still down: its
    rows stay None, without waiting out a third round of retries.)"""

    def __init__(self, rows: Sequence[int], n: int, on_error: OnError, overlong: Overlong, client: _BaseClient) -> None:
        self.out: list[float | None] = [None] * n
        self.keep = list(rows)
        self.on_error = on_error
        self.lowest = overlong == "lowest"
        # Errors must be seen to tell an over-long completion from a failure.
        self.mode: OnError = "raise" if self.lowest else on_error
        self._client = client
        self._recheck: int | None = None  # the client's answer count when the call turned to "none"
        self._rechecking = False

    def again(self, error: LabelerClientError) -> bool:
        """Whether to go on with `self.keep` after `error` (else raise it: it then names the
        row's place in TRL's batch); nothing is left to send once `self.keep` is empty."""
        item = getattr(error, "item", None)
        if self.lowest and isinstance(error, InvalidRequest) and error._response_too_long:
            self.out[self.keep.pop(item)] = LOWEST
            return True
        if self.mode != self.on_error:  # on_error="none": failed rows get None, as without overlong
            if item is not None:  # that row alone, so that the others over the limits are still found
                self.out[self.keep.pop(item)] = None
            elif self._rechecking:  # failed again: the rows left stay None
                self.keep = []
            else:  # no row named: the rest as on_error="none" gives them, then its Nones rechecked
                self.mode, self._recheck = self.on_error, self._client._answers
            return True
        if isinstance(error, APIStatusError):
            error._renumber(self.keep.__getitem__)
        return False

    def take(self, column: Sequence[Any]) -> Sequence[Any]:
        """`column`'s rows still to send: the column itself while none is left out (the
        client checks it as given: its length, a single string)."""
        if len(self.keep) == len(self.out):
            return column
        return [column[i] for i in self.keep]

    def fill(self, rewards: Sequence[float | None]) -> None:
        """Take the rewards of the rows sent; what is left to send (`self.keep`) after them."""
        for i, reward in zip(self.keep, rewards, strict=True):
            self.out[i] = reward
        if self._recheck is not None and self._client._answers > self._recheck:
            self.keep = [i for i, reward in zip(self.keep, rewards, strict=True) if reward is None]
            self.mode, self._recheck, self._rechecking = "raise", None, True
        else:
            self.keep = []


def _prompts_for(prompts: Sequence[Text] | None, completions: Sequence[Text] | None) -> Sequence[Text]:
    if completions is None:
        raise TypeError("the reward function needs completions=")
    return [""] * len(completions) if prompts is None else prompts


def _client_options(
    client: Client | AsyncClient | None, base_url: str | None, opts: dict[str, Any], on_error: str
) -> dict:
    """Everything needed to open the same client again (in a copy made by pickling). The URL
    and key are read from the environment here, not in the copy: a Ray worker or another
    process may not have LABELER_URL and LABELER_API_KEY. Options beside a `client` (another
    URL, client settings) would be ignored: a TypeError names them. The options and `on_error`
    are checked here, as the function is built, not at its first call (after a trainer has
    loaded its model and generated)."""
    _BaseClient._check_on_error(on_error)
    if client is None:
        # A training run waits for a labeler that restarts, unless told otherwise.
        out = {"retry": TRAINING_RETRY, **opts, "base_url": resolve_url(base_url)}
        out["api_key"] = resolve_key(opts.get("api_key"))
        _BaseClient(**{k: v for k, v in out.items() if k != "transport"})  # TypeError, ValueError
        return out
    other_url = base_url is not None and resolve_url(base_url) != client.base_url
    if other_url or opts:
        given = ", ".join(["base_url"] * other_url + sorted(opts))
        raise TypeError(f"{given}: set these on the client passed as client=, not beside it")
    return {
        "base_url": client.base_url,
        "api_key": client.api_key,
        "timeout": client.timeout,
        "retry": client.retry,
        "batch_size": client.batch_size,
        "max_concurrency": client.max_concurrency,
        "headers": dict(client._headers),
        "transport": client._transport,
    }


def _pickles(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - whatever refuses pickling (a local function, a lock)
        return False
    return True


class _Picklable:
    """Holds client options; its clients and lock are rebuilt after unpickling."""

    _transient: tuple[str, ...] = ()

    def _reset(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", *self._transient):
            state.pop(name, None)
        # A transport that pickles (labeler_client.ray's) goes along; another one (a test's
        # fake server) stays behind, and a copy talks HTTP.
        opts = state["_client_opts"]
        if not _pickles(opts.get("transport")):
            state["_client_opts"] = {k: v for k, v in opts.items() if k != "transport"}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()


class RewardFunction(_Picklable):
    """A callable for `reward_funcs=[...]`: the labeler's direct-score reward in [-1, 1] for
    each (prompt, completion), named `name` or `labeler_<task>`. Build it with
    `reward_function(...)`."""

    _transient = ("_client",)

    def __init__(
        self,
        base_url: str | None = None,
        task: str = "general",
        *,
        name: str | None = None,
        on_error: OnError = "raise",
        overlong: Overlong = "raise",
        client: Client | None = None,
        **client_opts: Any,
    ) -> None:
        self.task = task
        self.on_error: OnError = on_error
        self.overlong = check_overlong(overlong)
        self.__name__ = name or f"labeler_{task}"
        self._client_opts = _client_options(client, base_url, client_opts, on_error)
        self._reset()
        self._client = client

    def _reset(self) -> None:
        super()._reset()
        self._client = None

    @property
    def client(self) -> Client:
        """The client, opened on first use (a pickled copy opens its own)."""
        with self._lock:
            if self._client is None:
                self._client = Client(**self._client_opts)
            return self._client

    def __call__(
        self, prompts: Sequence[Text] | None = None, completions: Sequence[Text] | None = None, **_columns: Any
    ) -> list[float | None]:
        prompts = _prompts_for(prompts, completions)
        rows = _Overlong(range(len(completions)), len(completions), self.on_error, self.overlong, self.client)  # type: ignore[arg-type]
        while rows.keep:
            try:
                rewards = self.client.rewards(
                    rows.take(prompts),
                    rows.take(completions),  # type: ignore[arg-type]
                    self.task,
                    on_error=rows.mode,  # type: ignore[index]
                )
            except LabelerClientError as error:
                if rows.again(error):
                    continue
                raise
            rows.fill(rewards)
        return rows.out

    def __repr__(self) -> str:
        url = shown_url(self._client_opts.get("base_url"))
        return f"{type(self).__name__}({url!r}, task={self.task!r}, name={self.__name__!r})"


class ReferenceRewardFunction(RewardFunction):
    """A callable for `reward_funcs=[...]`: each completion's pairwise reward against the
    reference response in the dataset column `reference_column` (TRL passes every column to
    reward functions, but `prompt`, `completion` and `completion_ids`), 2 P(completion
    preferred) - 1 in [-1, 1], both orders by default. A row whose reference is None gets
    None. Build it with `reference_reward_function(...)`."""

    def __init__(
        self,
        base_url: str | None = None,
        task: str = "general",
        *,
        reference_column: str = "reference",
        order: Order = "both",
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if order not in get_args(Order):  # checked here, not at the first training step
            raise ValueError(f"order must be one of {', '.join(get_args(Order))}, not {order!r}")
        super().__init__(base_url, task, name=name or f"labeler_{task}_vs_{reference_column}", **kwargs)
        self.reference_column = reference_column
        self.order = order

    def __call__(  # type: ignore[override]
        self, prompts: Sequence[Text] | None = None, completions: Sequence[Text] | None = None, **columns: Any
    ) -> list[float | None]:
        if self.reference_column not in columns:
            if self.reference_column in _TRL_WITHHELD_COLUMNS:
                raise KeyError(
                    f"the reward function reads references from the dataset column {self.reference_column!r}, "
                    "which TRL does not pass to reward functions (GRPO, RLOO and AsyncGRPO leave out "
                    f"{', '.join(_TRL_WITHHELD_COLUMNS)}): rename the column in the dataset (to 'reference', "
                    "the default, or a name passed as reference_column=)"
                )
            given = ", ".join(sorted(k for k in columns if not k.startswith(("trainer_", "log_")))) or "none"
            raise KeyError(
                f"the reward function reads references from the dataset column {self.reference_column!r}, "
                f"which this batch lacks (columns: {given}); pass reference_column= to name another"
            )
        prompts = _prompts_for(prompts, completions)
        references = columns[self.reference_column]
        if not len(prompts) == len(completions) == len(references):  # type: ignore[arg-type]
            raise ValueError(
                f"{len(prompts)} prompts, {len(completions)} completions and {len(references)} references"  # type: ignore[arg-type]
            )
        # A row without a reference (None, as a column that only some rows fill has) gets None:
        # TRL reads it as "no reward for this sample" (NaN, masked), where a reference of None
        # would fail the whole step. The verl adapter reads a None reference as absent too.
        rows = _Overlong(
            [i for i, r in enumerate(references) if r is not None],
            len(references),
            self.on_error,
            self.overlong,
            self.client,
        )
        while rows.keep:
            try:
                rewards = self.client.rewards_against(
                    rows.take(prompts),
                    rows.take(completions),  # type: ignore[arg-type]
                    rows.take(references),
                    self.task,
                    on_error=rows.mode,
                    order=self.order,
                )
            except LabelerClientError as error:
                if rows.again(error):
                    continue
                raise
            rows.fill(rewards)
        return rows.out


def find_groups(prompts: Sequence[Text], num_generations: int) -> list[range]:
    """The groups of a TRL batch: GRPO repeats every prompt `num_generations` times in a row,
    so completions [k n, (k + 1) n) answer one prompt. Raises ValueError, saying where, when the
    batch does not have that layout (a batch that is not a whole number of groups, which TRL gives
    a process when its per-device batch is not a multiple of num_generations, or a group whose
    prompts differ)."""
    n = num_generations
    if len(prompts) % n:
        raise ValueError(
            f"group rewards need whole groups: the batch holds {len(prompts)} completions, not a multiple of "
            f"num_generations={n} (make each process's batch a multiple of num_generations, or pass the "
            "trainer's num_generations)"
        )
    groups = [range(k, k + n) for k in range(0, len(prompts), n)]
    for g in groups:
        for i in g:
            if prompts[i] != prompts[g.start]:
                raise ValueError(
                    f"group rewards need each prompt repeated num_generations={n} times in a row (TRL's GRPO "
                    f"layout), but completion {i} has another prompt than completion {g.start}, the first of its group "
                    "(with environment_factory, TRL adds each generation's reset() observation to its prompt: "
                    "group rewards need a reset that gives every generation of a prompt the same one)"
                )
    return groups


def _check_group_size(prompts: Sequence[Text], groups: list[range]) -> None:
    """Refuse groups smaller than the trainer's, as far as one batch can tell: with every
    prompt repeated a whole multiple (more than 1) of the group size in a row, the trainer's
    `num_generations` is a multiple of the one given, and rewards relative to part of a group
    would be silently wrong. Checked on a function's first batch only: a later batch of that
    shape is a dataset's repeated prompt that happened to land twice in a row."""
    size = len(groups[0]) if groups else 0
    runs, start = [], 0
    for g, h in zip(groups, [*groups[1:], None], strict=True):
        if h is None or prompts[h.start] != prompts[g.start]:
            runs.append(g.stop - start)
            start = g.stop
    if size > 1 and all(run > size for run in runs):
        raise ValueError(
            f"every prompt of the batch is repeated {', '.join(map(str, sorted(set(runs))))} times in a row, a "
            f"multiple of num_generations={size}: pass the trainer's num_generations (GRPOConfig.num_generations)"
        )


class GroupRewardFunction(RewardFunction):
    """A callable for `GRPOTrainer(reward_funcs=[...])`: group-relative pairwise rewards. The
    completions of each prompt (found from TRL's batch layout, `find_groups`) are compared with
    each other in both orders, in one engine call that shares the prompt, and each gets
    2 w - 1, w its mean probability of beating the others (rewards sum to 0 per group; a
    group of one, as an evaluation with `num_generations_eval=1` has, gets 0).
    Build it with `group_reward_function(...)`."""

    def __init__(
        self,
        base_url: str | None = None,
        task: str = "general",
        *,
        num_generations: int,
        num_generations_eval: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(num_generations, int) or not 2 <= num_generations <= MAX_GROUP_SIZE:
            raise ValueError(f"num_generations must be an integer from 2 to {MAX_GROUP_SIZE}, got {num_generations!r}")
        if num_generations_eval is not None and (
            not isinstance(num_generations_eval, int) or not 1 <= num_generations_eval <= MAX_GROUP_SIZE
        ):
            raise ValueError(
                f"num_generations_eval must be an integer from 1 to {MAX_GROUP_SIZE}, got {num_generations_eval!r}"
            )
        if kwargs.get("overlong", "raise") != "raise":  # a group is judged whole: no member left out
            raise ValueError('group rewards take no overlong="lowest": a completion over the limits fails its group')
        super().__init__(base_url, task, name=name or f"labeler_{task}_group", **kwargs)
        self.num_generations = num_generations
        self.num_generations_eval = num_generations_eval

    def _reset(self) -> None:
        super()._reset()
        self._layout_checked = False

    def _groups(self, prompts: Sequence[Text]) -> list[range]:
        """The batch's groups: of `num_generations` in training, of `num_generations_eval` in
        TRL's evaluation (which the call does not tell apart), the larger size when both fit
        (a batch of groups of 8 is also one of groups of 4 of the same prompts). Groups of the
        smaller size whose neighbours share their prompt are a larger group cut short (a
        training batch that is not whole groups): the larger size's error is raised."""
        large, small = self.num_generations, self.num_generations_eval or self.num_generations
        if small > large:
            large, small = small, large
        try:
            return find_groups(prompts, large)
        except ValueError as exc:
            if small == large:
                raise
            error = exc
        groups = find_groups(prompts, small)
        if any(prompts[a.start] == prompts[b.start] for a, b in zip(groups, groups[1:], strict=False)):
            raise error
        return groups

    def __call__(
        self, prompts: Sequence[Text] | None = None, completions: Sequence[Text] | None = None, **_columns: Any
    ) -> list[float | None]:
        prompts = _prompts_for(prompts, completions)
        if len(prompts) != len(completions):  # type: ignore[arg-type]
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")  # type: ignore[arg-type]
        groups = self._groups(prompts)
        if not self._layout_checked:
            self._layout_checked = True
            _check_group_size(prompts, groups)
        if groups and len(groups[0]) == 1:  # no other completion to compare with
            return [0.0] * len(prompts)
        per_group = self.client.group_relative_rewards(
            [prompts[g.start] for g in groups],
            [[completions[i] for i in g] for g in groups],  # type: ignore[index]
            self.task,
            on_error=self.on_error,
        )
        out: list[float | None] = []
        for g, rewards in zip(groups, per_group, strict=True):
            out.extend(rewards if rewards is not None else [None] * len(g))
        return out


def reference_reward_function(
    base_url: str | None = None,
    task: str = "general",
    *,
    reference_column: str = "reference",
    order: Order = "both",
    name: str | None = None,
    on_error: OnError = "raise",
    overlong: Overlong = "raise",
    client: Client | None = None,
    **client_opts: Any,
) -> ReferenceRewardFunction:
    """A reward function rewarding each completion against the reference response in the
    dataset column `reference_column` (e.g. the SFT answer): 2 P(completion preferred) - 1,
    read in both orders. A batch without the column raises KeyError naming it; TRL's GRPO,
    RLOO and AsyncGRPO never pass the columns `prompt`, `completion` and `completion_ids`, so
    a reference must be in a column of another name. A row whose reference is None gets None
    (no reward for that sample; the others are sent). Picklable; options as for
    `reward_function`."""
    return ReferenceRewardFunction(
        base_url,
        task,
        reference_column=reference_column,
        order=order,
        name=name,
        on_error=on_error,
        overlong=overlong,
        client=client,
        **client_opts,
    )


def group_reward_function(
    base_url: str | None = None,
    task: str = "general",
    *,
    num_generations: int,
    num_generations_eval: int | None = None,
    name: str | None = None,
    on_error: OnError = "raise",
    client: Client | None = None,
    **client_opts: Any,
) -> GroupRewardFunction:
    """A reward function for GRPO giving group-relative pairwise rewards; `num_generations` is
    the trainer's (`GRPOConfig.num_generations`), and `num_generations_eval` its evaluation's
    when it sets one (`GRPOConfig.num_generations_eval`). A batch that is not whole groups of
    either size, each of completions sharing one prompt, raises ValueError. With
    `on_error="none"` a failed group's completions get None. Picklable; options as for
    `reward_function`."""
    return GroupRewardFunction(
        base_url,
        task,
        num_generations=num_generations,
        num_generations_eval=num_generations_eval,
        name=name,
        on_error=on_error,
        client=client,
        **client_opts,
    )


class AsyncRewardFunction(_Picklable):
    """The coroutine variant of `RewardFunction` (TRL awaits it, concurrently with the other
    reward functions). One `AsyncClient` per event loop, so it may be awaited from several
    `asyncio.run` calls. Build it with `async_reward_function(...)`."""

    _transient = ("_clients", "_is_coroutine_marker")

    def __init__(
        self,
        base_url: str | None = None,
        task: str = "general",
        *,
        name: str | None = None,
        on_error: OnError = "raise",
        overlong: Overlong = "raise",
        **client_opts: Any,
    ) -> None:
        self.task = task
        self.on_error: OnError = on_error
        self.overlong = check_overlong(overlong)
        self.__name__ = name or f"labeler_{task}"
        self._client_opts = _client_options(None, base_url, client_opts, on_error)
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncClient]] = {}
        # TRL up to 1.9 asks inspect.iscoroutinefunction(reward_func), which sees a coroutine
        # callable object only through this mark (Python 3.12+); later TRL checks __call__.
        if hasattr(inspect, "markcoroutinefunction"):
            inspect.markcoroutinefunction(self)

    def _client_for_loop(self) -> AsyncClient:
        with self._lock:
            return client_for_loop(self._clients, lambda: AsyncClient(**self._client_opts))

    async def __call__(
        self, prompts: Sequence[Text] | None = None, completions: Sequence[Text] | None = None, **_columns: Any
    ) -> list[float | None]:
        client = self._client_for_loop()
        prompts = _prompts_for(prompts, completions)
        rows = _Overlong(range(len(completions)), len(completions), self.on_error, self.overlong, client)  # type: ignore[arg-type]
        while rows.keep:
            try:
                rewards = await client.rewards(
                    rows.take(prompts),
                    rows.take(completions),  # type: ignore[arg-type]
                    self.task,
                    on_error=rows.mode,  # type: ignore[index]
                )
            except LabelerClientError as error:
                if rows.again(error):
                    continue
                raise
            rows.fill(rewards)
        return rows.out

    def __repr__(self) -> str:
        return f"AsyncRewardFunction({shown_url(self._client_opts.get('base_url'))!r}, task={self.task!r})"


def reward_function(
    base_url: str | None = None,
    task: str = "general",
    *,
    name: str | None = None,
    on_error: OnError = "raise",
    overlong: Overlong = "raise",
    client: Client | None = None,
    **client_opts: Any,
) -> RewardFunction:
    """A reward function for `GRPOTrainer(reward_funcs=[...])` (and TRL 1.x's online DPO, RLOO):
    the labeler's direct-score reward in [-1, 1] for each (prompt, completion), named `name`
    or `labeler_<task>`. Picklable.

    `client_opts` go to `Client` (api_key, timeout, retry, batch_size, max_concurrency), or
    pass a `client` and no options (a pickled copy opens a client with the same settings, and the same
    transport when it pickles: labeler_client.ray's does, a test's fake does not). A failed
    request raises after retries; with `on_error="none"` the failed samples get None instead
    (GRPO leaves a sample out only when every reward function gave it None; beside other
    reward functions, and in online DPO, it counts as 0), though a refusal of the options
    themselves (an unknown task) is still raised. An empty completion gets a reward like any
    other. A completion over the server's length limits (`LABELER_MAX_ITEM_TOKENS`, the
    labeler's context, `LABELER_MAX_CHARS`) fails the call, or with `overlong="lowest"` gets
    the lowest reward, -1.0 (each such completion costs one more request of the rest, answered
    from the server's cache); a prompt over them is the data's, and fails the call."""
    return RewardFunction(base_url, task, name=name, on_error=on_error, overlong=overlong, client=client, **client_opts)


def async_reward_function(
    base_url: str | None = None,
    task: str = "general",
    *,
    name: str | None = None,
    on_error: OnError = "raise",
    overlong: Overlong = "raise",
    **client_opts: Any,
) -> AsyncRewardFunction:
    """The `async` variant of `reward_function`, for the TRL trainers that await coroutine
    reward functions (GRPO, RLOO, AsyncGRPO: they run them concurrently with the other reward
    functions). Online DPO calls reward functions without awaiting them: give it
    `reward_function`. Picklable."""
    return AsyncRewardFunction(base_url, task, name=name, on_error=on_error, overlong=overlong, **client_opts)


class PairwiseJudge(_Picklable):
    """TRL's pairwise-judge interface (`BasePairwiseJudge.judge`) over the labeler's
    preferences, for the TRL releases that call judges (0.10 to 1.0: online DPO, XPO,
    Nash-MD, `WinRateCallback`). TRL 1.1 and later take `reward_funcs` instead.

    `judge(prompts, completions)` with `completions[i] = [first, second]` returns, per
    prompt, the index of the preferred completion, or with `return_scores=True` the
    probability that the first is preferred. A tie (exactly 0.5) goes to the second, as
    TRL's own soft-judge rule (`0 if score > 0.5 else 1`) decides. The service reads both
    orders and averages them, which removes position bias more thoroughly than a random
    shuffle, so `shuffle_order` is accepted and has nothing left to do. A completion that
    TRL rendered through its simple chat template (conversational data), such as
    "Assistant: Paris.\\n\\n", is judged as its answer alone (`judged_completion`).

    With `on_error="none"` a pair whose request failed gives -1 (TRL's "the judge failed"
    rank), or as a soft score 0.5 ("no preference": TRL has no failed-score value, and a
    None would break its update); a warning is logged. TRL's online trainers read any rank
    but 0 as "the second won", so there a -1 trains as a preference: keep `on_error="raise"`
    for them.
    """

    _transient = ("_client",)

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
        self._client_opts = _client_options(client, base_url, client_opts, on_error)
        self._reset()
        self._client = client

    def _reset(self) -> None:
        super()._reset()
        self._client = None

    client = RewardFunction.client

    def judge(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Sequence[Text]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float]:
        prefs = self.client.preferences(
            pair_items(prompts, completions),
            self.task,
            order="both",
            on_error=self.on_error,
        )
        failed = sum(p is None for p in prefs)
        if failed:
            given = NO_PREFERENCE if return_scores else -1
            log.warning("%d of %d pairs failed; judged as %s", failed, len(prefs), given)
        if return_scores:
            return [p.p_a if p is not None else NO_PREFERENCE for p in prefs]
        return [-1 if p is None else (0 if p.p_a > 0.5 else 1) for p in prefs]
