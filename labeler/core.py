"""The labeler: pairwise preferences, direct scores, yes/no judgments and pairwise rewards
on top of an engine.

    labeler = Labeler(TransformersEngine(resolve_model(None)))
    r = labeler.preference("post ...", "summary A", "summary B", task="summarize")
    r.p_a, r.p_b, r.p_a_ab, r.p_a_ba, r.consistent

Every batch method makes one batched engine call per stage (one `score` call, plus one
`generate` call with chain-of-thought), whatever the number of items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from . import scoring
from .engines.base import Engine, GenerateRequest, ScoreRequest
from .errors import InputTooLong, InvalidInput
from .prompts import PromptBuilder, Rendered
from .tasks import Task, TaskRegistry

T = TypeVar("T")
OrderArg = Literal["both", "ab", "ba"]

MAX_SAMPLES = 16
# Group-relative rewards compare every ordered pair: N (N - 1) prompts for a group of N.
MAX_GROUP_SIZE = 32
# Engines seed a 64-bit generator (torch, vLLM): larger seeds would fail inside the engine.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PairItem:
    """One pairwise question: which of two responses to `context` is better."""

    context: str
    response_a: str
    response_b: str


@dataclass(frozen=True)
class ScoreItem:
    """One direct-score question: how good is `response` to `context` (1..10)."""

    context: str
    response: str


@dataclass(frozen=True)
class PreferenceResult:
    """P(A preferred) and P(B preferred), from the orders that were read.

    `p_a_ab` is P(label "1") with A shown first, `p_a_ba` is P(label "2") with B shown
    first; `p_a` averages those that were read. `label_mass` is, per order, the share of
    the model's probability that fell on the labels before normalization (averaged over
    samples). `rationales`, with chain-of-thought, holds each order's rationales.
    """

    p_a: float
    p_b: float
    p_a_ab: float | None
    p_a_ba: float | None
    consistent: bool | None
    label_mass: dict[str, float]
    rationales: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreResult:
    """The distribution over scores 1..10, its mean and the reward (mean - 5.5) / 4.5."""

    distribution: list[float]
    expected: float
    reward: float
    label_mass: float
    rationales: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JudgmentResult:
    """P(yes) and P(no) for the task's yes/no question about one response (they sum to 1;
    each sums its answer's spellings, "Yes" and "yes"). `label_mass` is the share of the
    model's probability on the labels before normalization (averaged over samples);
    `rationales`, with chain-of-thought."""

    p_yes: float
    p_no: float
    label_mass: float
    rationales: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReferenceItem:
    """One completion to reward against a reference response to the same context (e.g. the
    SFT model's answer from the dataset)."""

    context: str
    response: str
    reference: str


@dataclass(frozen=True)
class ReferenceReward:
    """reward = 2 p_win - 1, where p_win = P(response preferred over the reference).

    `p_win_ab` is read with the response shown first, `p_win_ba` with the reference shown
    first; `p_win` averages those read. `consistent` and `label_mass` as in PreferenceResult."""

    reward: float
    p_win: float
    p_win_ab: float | None
    p_win_ba: float | None
    consistent: bool | None
    label_mass: dict[str, float]
    rationales: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GroupItem:
    """The N completions of one prompt (a GRPO group), to be rewarded relative to each other."""

    context: str
    responses: Sequence[str]


@dataclass(frozen=True)
class GroupRewards:
    """Group-relative rewards for one group (see `scoring.group_rewards` for the formula).

    `rewards[i]` = 2 w_i - 1 in [-1, 1], summing to 0 over the group; `win_rate[i]` = w_i,
    completion i's mean probability of beating the others; `p_win[i][j]` = P(i preferred over
    j) from both orders (None on the diagonal). `label_mass` averages the N (N - 1) reads;
    `consistency` is the share of the N (N - 1) / 2 pairs whose two orders pick the same
    winner. `rationales[i][j]`, with chain-of-thought: those of the read showing i first."""

    rewards: list[float]
    win_rate: list[float]
    p_win: list[list[float | None]]
    label_mass: float
    consistency: float
    rationales: list[list[list[str] | None]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("the blocking Labeler methods cannot run inside an event loop; await the a* methods")


class Labeler:
    """Renders tasks, asks the engine, and turns log-probs into labels."""

    def __init__(
        self,
        engine: Engine,
        tasks: TaskRegistry | None = None,
        *,
        max_rationale_tokens: int = 128,
        temperature: float = 0.7,
    ) -> None:
        self.engine = engine
        self.tasks = tasks if tasks is not None else TaskRegistry.load()
        self.prompts = PromptBuilder(engine.tokenizer, max_prompt_tokens=engine.max_model_len)
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    def task(self, name: str) -> Task:
        """The task called `name` (UnknownTask otherwise)."""
        if not isinstance(name, str):
            raise InvalidInput(f"task must be a string, got {type(name).__name__}", field="task")
        return self.tasks.get(name)

    # -- rendering (also what `labeler render` shows) ------------------------------------
    def render_pairwise(
        self,
        task: str,
        context: str,
        response_a: str,
        response_b: str,
        *,
        order: str = "ab",
        cot: bool = False,
    ) -> Rendered:
        """Exactly what the engine reads for one order of a pair."""
        return self.prompts.pairwise(self.task(task), context, response_a, response_b, order=order, cot=cot)  # type: ignore[arg-type]

    def render_score(self, task: str, context: str, response: str, *, cot: bool = False) -> Rendered:
        """Exactly what the engine reads for a direct score."""
        return self.prompts.score(self.task(task), context, response, cot=cot)

    def render_judgment(self, task: str, context: str, response: str, *, cot: bool = False) -> Rendered:
        """Exactly what the engine reads for a yes/no judgment."""
        return self.prompts.judgment(self.task(task), context, response, cot=cot)

    # -- batch API ---------------------------------------------------------------------------
    async def apreferences(
        self,
        items: Sequence[PairItem],
        task: str,
        *,
        order: OrderArg = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
    ) -> list[PreferenceResult]:
        """Preferences for many pairs, in item order."""
        t = self.task(task)
        orders = _orders(order)
        _check_sampling(cot, samples, seed)
        items = [_pair(it, i) for i, it in enumerate(items)]
        drafts = [
            _at(i, self.prompts.pairwise, t, it.context, it.response_a, it.response_b, order=o, cot=cot, tokenize=False)
            for i, it in enumerate(items)
            for o in orders
        ]
        rendered = self.prompts.tokenize_many(drafts, [i for i in range(len(items)) for _ in orders])
        dists, masses, rationales = await self._label(rendered, cot, samples, seed)
        results = []
        for i in range(len(items)):
            per: dict[str, float] = {}
            mass: dict[str, float] = {}
            rats: dict[str, list[str]] = {}
            for j, o in enumerate(orders):
                k = i * len(orders) + j
                per[o] = dists[k]["1" if o == "ab" else "2"]
                mass[o] = masses[k]
                if rationales is not None:
                    rats[o] = rationales[k]
            pref = scoring.combine_orders(per.get("ab"), per.get("ba"))
            results.append(
                PreferenceResult(
                    p_a=pref.p_a,
                    p_b=pref.p_b,
                    p_a_ab=pref.p_a_ab,
                    p_a_ba=pref.p_a_ba,
                    consistent=pref.consistent,
                    label_mass=mass,
                    rationales=rats if cot else None,
                )
            )
        return results

    async def ascores(
        self, items: Sequence[ScoreItem], task: str, *, cot: bool = False, samples: int = 1, seed: int = 0
    ) -> list[ScoreResult]:
        """Direct scores for many responses, in item order."""
        t = self.task(task)
        _check_sampling(cot, samples, seed)
        items = [_score_item(it, i) for i, it in enumerate(items)]
        drafts = [
            _at(i, self.prompts.score, t, it.context, it.response, cot=cot, tokenize=False)
            for i, it in enumerate(items)
        ]
        rendered = self.prompts.tokenize_many(drafts, range(len(items)))
        dists, masses, rationales = await self._label(rendered, cot, samples, seed)
        results = []
        for k, dist in enumerate(dists):
            s = scoring.expected_score(dist)
            results.append(
                ScoreResult(
                    distribution=[dist[label] for label in scoring.SCORE_LABELS],
                    expected=s,
                    reward=scoring.score_to_reward(s),
                    label_mass=masses[k],
                    rationales=rationales[k] if rationales is not None else None,
                )
            )
        return results

    async def ajudgments(
        self, items: Sequence[ScoreItem], task: str, *, cot: bool = False, samples: int = 1, seed: int = 0
    ) -> list[JudgmentResult]:
        """Yes/no judgments (the task's `judgment_question`) of many responses, in item order."""
        t = self.task(task)
        _check_sampling(cot, samples, seed)
        items = [_score_item(it, i) for i, it in enumerate(items)]
        drafts = [
            _at(i, self.prompts.judgment, t, it.context, it.response, cot=cot, tokenize=False)
            for i, it in enumerate(items)
        ]
        rendered = self.prompts.tokenize_many(drafts, range(len(items)))
        dists, masses, rationales = await self._label(rendered, cot, samples, seed)
        results = []
        for k, dist in enumerate(dists):
            p_yes, p_no = scoring.judgment_probabilities(dist)
            results.append(
                JudgmentResult(
                    p_yes=p_yes,
                    p_no=p_no,
                    label_mass=masses[k],
                    rationales=rationales[k] if rationales is not None else None,
                )
            )
        return results

    async def areference_rewards(
        self,
        items: Sequence[ReferenceItem],
        task: str,
        *,
        order: OrderArg = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
    ) -> list[ReferenceReward]:
        """Pairwise rewards against a reference: 2 P(response preferred over reference) - 1,
        read in both orders by default, in item order (one engine call per stage)."""
        refs = [_reference_item(it, i) for i, it in enumerate(items)]
        try:
            prefs = await self.apreferences(
                [PairItem(r.context, r.response, r.reference) for r in refs],
                task,
                order=order,
                cot=cot,
                samples=samples,
                seed=seed,
            )
        except InvalidInput as exc:
            # Name the caller's fields, not the pair's.
            field = (exc.field or "").replace(".response_a", ".response").replace(".response_b", ".reference")
            message = str(exc).replace("response_a", "response").replace("response_b", "reference")
            raise type(exc)(message, field=field or None, **_limit(exc)) from None
        return [
            ReferenceReward(
                reward=scoring.reference_reward(p.p_a),
                p_win=p.p_a,
                p_win_ab=p.p_a_ab,
                p_win_ba=p.p_a_ba,
                consistent=p.consistent,
                label_mass=p.label_mass,
                rationales=p.rationales,
            )
            for p in prefs
        ]

    async def agroup_rewards(
        self, groups: Sequence[GroupItem], task: str, *, cot: bool = False, samples: int = 1, seed: int = 0
    ) -> list[GroupRewards]:
        """Group-relative rewards: within each group, every completion is compared with every
        other in both orders (N (N - 1) reads), and gets its centred mean win probability
        (`scoring.group_rewards`). All groups go to the engine in one call per stage.

        Layout for prefix sharing: the comparisons of a group share one fence tag (drawn over
        the whole group), so their prompts agree up to the first response, and they are
        listed first-response-major, so each first response heads N - 1 consecutive prompts:
        the engine's prefix tree computes the preamble and context once per group and each
        first response once per group."""
        t = self.task(task)
        _check_sampling(cot, samples, seed)
        groups = [_group_item(g, i) for i, g in enumerate(groups)]
        drafts: list[Rendered] = []
        where: list[int] = []
        for gi, g in enumerate(groups):
            tag = _at_group(gi, 0, 0, self.prompts.group_tag, g.context, g.responses)
            n = len(g.responses)
            for i, j in _ordered_pairs(n):
                r_i, r_j = g.responses[i], g.responses[j]
                drafts.append(
                    _at_group(gi, i, j, self.prompts.pairwise, t, g.context, r_i, r_j, cot=cot, tokenize=False, tag=tag)
                )
                where.append(gi)
        rendered = self.prompts.tokenize_many(drafts, where, name="groups")
        dists, masses, rationales = await self._label(rendered, cot, samples, seed)
        results = []
        k = 0
        for g in groups:
            n = len(g.responses)
            q = [[0.5] * n for _ in range(n)]
            rats: list[list[list[str] | None]] = [[None] * n for _ in range(n)]
            for i, j in _ordered_pairs(n):
                q[i][j] = dists[k]["1"]
                if rationales is not None:
                    rats[i][j] = rationales[k]
                k += 1
            rw = scoring.group_rewards(q)
            m = n * (n - 1)
            agree = [(q[i][j] - 0.5) * (q[j][i] - 0.5) < 0 for i in range(n) for j in range(i + 1, n)]
            results.append(
                GroupRewards(
                    rewards=rw.rewards,
                    win_rate=rw.win_rate,
                    p_win=rw.p_win,
                    label_mass=sum(masses[k - m : k]) / m,
                    consistency=sum(agree) / len(agree),
                    rationales=rats if cot else None,
                )
            )
        return results

    async def _label(
        self, rendered: list[Rendered], cot: bool, samples: int, seed: int
    ) -> tuple[list[dict[str, float]], list[float], list[list[str]] | None]:
        """Label distributions for rendered questions: one score call, after one
        generate call with chain-of-thought. Returns (distributions, masses, rationales)."""
        if not rendered:
            return [], [], None
        if not cot:
            reads = rendered
            groups = [[k] for k in range(len(rendered))]
            rationales = None
        else:
            temperature = self.temperature if samples > 1 else 0.0
            gens = await self.engine.generate(
                [
                    GenerateRequest(r.prompt_token_ids, self.max_rationale_tokens, temperature, samples, seed)
                    for r in rendered
                ]
            )
            drafts, groups, rationales = [], [], []
            for r, draws in zip(rendered, gens, strict=True):
                texts = [self.prompts.cut_rationale(r, g.text) for g in draws]
                groups.append(list(range(len(drafts), len(drafts) + len(texts))))
                drafts.extend(self.prompts.after_rationale(r, text, tokenize=False) for text in texts)
                rationales.append(texts)
            reads = self.prompts.tokenize_many(drafts, None)
        queries = scoring.label_queries(reads[0].labels)
        answers = await self.engine.score([ScoreRequest(r.prompt_token_ids, queries) for r in reads])
        per_read = [scoring.label_distribution(r.labels, a) for r, a in zip(reads, answers, strict=True)]
        dists = [scoring.average([per_read[k].probs for k in g]) for g in groups]
        masses = [sum(per_read[k].mass for k in g) / len(g) for g in groups]
        return dists, masses, rationales

    # -- single-item and blocking conveniences --------------------------------------------
    async def apreference(
        self, context: str, response_a: str, response_b: str, task: str, **kwargs: Any
    ) -> PreferenceResult:
        """One pair; keyword arguments as for `apreferences`."""
        return (await self.apreferences([PairItem(context, response_a, response_b)], task, **kwargs))[0]

    async def ascore(self, context: str, response: str, task: str, **kwargs: Any) -> ScoreResult:
        """One response; keyword arguments as for `ascores`."""
        return (await self.ascores([ScoreItem(context, response)], task, **kwargs))[0]

    def preference(self, context: str, response_a: str, response_b: str, task: str, **kwargs: Any) -> PreferenceResult:
        """Blocking `apreference`."""
        return _run(self.apreference(context, response_a, response_b, task, **kwargs))

    def score(self, context: str, response: str, task: str, **kwargs: Any) -> ScoreResult:
        """Blocking `ascore`."""
        return _run(self.ascore(context, response, task, **kwargs))

    def preferences(self, items: Sequence[PairItem], task: str, **kwargs: Any) -> list[PreferenceResult]:
        """Blocking `apreferences`."""
        return _run(self.apreferences(items, task, **kwargs))

    def scores(self, items: Sequence[ScoreItem], task: str, **kwargs: Any) -> list[ScoreResult]:
        """Blocking `ascores`."""
        return _run(self.ascores(items, task, **kwargs))

    async def ajudgment(self, context: str, response: str, task: str, **kwargs: Any) -> JudgmentResult:
        """One response; keyword arguments as for `ajudgments`."""
        return (await self.ajudgments([ScoreItem(context, response)], task, **kwargs))[0]

    def judgment(self, context: str, response: str, task: str, **kwargs: Any) -> JudgmentResult:
        """Blocking `ajudgment`."""
        return _run(self.ajudgment(context, response, task, **kwargs))

    def judgments(self, items: Sequence[ScoreItem], task: str, **kwargs: Any) -> list[JudgmentResult]:
        """Blocking `ajudgments`."""
        return _run(self.ajudgments(items, task, **kwargs))

    def reference_rewards(self, items: Sequence[ReferenceItem], task: str, **kwargs: Any) -> list[ReferenceReward]:
        """Blocking `areference_rewards`."""
        return _run(self.areference_rewards(items, task, **kwargs))

    def group_rewards(self, groups: Sequence[GroupItem], task: str, **kwargs: Any) -> list[GroupRewards]:
        """Blocking `agroup_rewards`."""
        return _run(self.agroup_rewards(groups, task, **kwargs))


def _at(i: int, fn: Any, *args: Any, **kwargs: Any) -> Rendered:
    """Render item `i`, naming it in any input error (`items[3].response_a`)."""
    try:
        return fn(*args, **kwargs)
    except InputTooLong as exc:
        raise InputTooLong(f"items[{i}]: {exc}", field=f"items[{i}]", limit=exc.limit) from None
    except InvalidInput as exc:
        field = f"items[{i}].{exc.field}" if exc.field else f"items[{i}]"
        raise InvalidInput(f"items[{i}]: {exc}", field=field) from None


def _orders(order: object) -> tuple[str, ...]:
    if order == "both":
        return ("ab", "ba")
    if order in ("ab", "ba"):
        return (order,)  # type: ignore[return-value]
    raise InvalidInput(f"order must be 'both', 'ab' or 'ba', got {order!r}", field="order")


def _check_sampling(cot: object, samples: object, seed: object = 0) -> None:
    if not isinstance(cot, bool):
        raise InvalidInput("cot must be true or false", field="cot")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= MAX_SAMPLES:
        raise InvalidInput(f"samples must be an integer from 1 to {MAX_SAMPLES}", field="samples")
    if samples > 1 and not cot:
        raise InvalidInput("samples > 1 (self-consistency) needs cot=true: it samples rationales", field="samples")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"seed must be an integer from 0 to {MAX_SEED}", field="seed")


def _pair(item: object, i: int) -> PairItem:
    if isinstance(item, PairItem):
        return item
    if isinstance(item, dict):
        try:
            return PairItem(item["context"], item["response_a"], item["response_b"])
        except KeyError as exc:
            raise InvalidInput(f"items[{i}] lacks {exc.args[0]!r}", field=f"items[{i}].{exc.args[0]}") from None
    raise InvalidInput(f"items[{i}] must be a PairItem or a mapping", field=f"items[{i}]")


def _score_item(item: object, i: int) -> ScoreItem:
    if isinstance(item, ScoreItem):
        return item
    if isinstance(item, dict):
        try:
            return ScoreItem(item["context"], item["response"])
        except KeyError as exc:
            raise InvalidInput(f"items[{i}] lacks {exc.args[0]!r}", field=f"items[{i}].{exc.args[0]}") from None
    raise InvalidInput(f"items[{i}] must be a ScoreItem or a mapping", field=f"items[{i}]")


def _ordered_pairs(n: int) -> list[tuple[int, int]]:
    """(i, j) for i != j, first-response-major: the N - 1 comparisons showing i first are
    consecutive, so the engine's prefix tree (and its chunks) share i's tokens."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def _at_group(g: int, i: int, j: int, fn: Any, *args: Any, **kwargs: Any) -> Rendered:
    """Render comparison (i, j) of group `g`, naming the group's fields in any input error
    (`groups[2].responses[1]`)."""
    try:
        return fn(*args, **kwargs)
    except InputTooLong as exc:
        raise InputTooLong(f"groups[{g}]: {exc}", field=f"groups[{g}]", limit=exc.limit) from None
    except InvalidInput as exc:
        names = {"response_a": f"responses[{i}]", "response_b": f"responses[{j}]"}
        sub = names.get(exc.field or "", exc.field)
        field = f"groups[{g}].{sub}" if sub else f"groups[{g}]"
        message = str(exc).replace("response_a", names["response_a"]).replace("response_b", names["response_b"])
        raise InvalidInput(f"groups[{g}]: {message}", field=field) from None


def _limit(exc: InvalidInput) -> dict[str, Any]:
    return {"limit": exc.limit} if isinstance(exc, InputTooLong) else {}


def _reference_item(item: object, i: int) -> ReferenceItem:
    if isinstance(item, ReferenceItem):
        return item
    if isinstance(item, dict):
        try:
            return ReferenceItem(item["context"], item["response"], item["reference"])
        except KeyError as exc:
            raise InvalidInput(f"items[{i}] lacks {exc.args[0]!r}", field=f"items[{i}].{exc.args[0]}") from None
    raise InvalidInput(f"items[{i}] must be a ReferenceItem or a mapping", field=f"items[{i}]")


def _group_item(item: object, g: int) -> GroupItem:
    if isinstance(item, dict):
        try:
            item = GroupItem(item["context"], item["responses"])
        except KeyError as exc:
            raise InvalidInput(f"groups[{g}] lacks {exc.args[0]!r}", field=f"groups[{g}].{exc.args[0]}") from None
    if not isinstance(item, GroupItem):
        raise InvalidInput(f"groups[{g}] must be a GroupItem or a mapping", field=f"groups[{g}]")
    responses = item.responses
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise InvalidInput(f"groups[{g}].responses must be a list of strings", field=f"groups[{g}].responses")
    if not 2 <= len(responses) <= MAX_GROUP_SIZE:
        raise InvalidInput(
            f"groups[{g}] has {len(responses)} responses; a group needs 2 to {MAX_GROUP_SIZE}",
            field=f"groups[{g}].responses",
        )
    return GroupItem(item.context, tuple(responses))
