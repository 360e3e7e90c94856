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
import math
import threading
import weakref
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from dataclasses import fields as _fields
from typing import Any, TypeVar

from . import scoring
from .engines.base import Engine, GenerateRequest, ScoreRequest
from .errors import EngineUnavailable, InputTooLong, InvalidInput, ModelOutputError
from .prompts import PromptBuilder, Rendered, clean_text, judgment_question
from .spec import KINDS, MAX_GROUP_SIZE, MAX_SAMPLES, MAX_SEED, LabelSpec, OrderArg
from .tasks import Task, TaskRegistry

T = TypeVar("T")
# One prepared question per read: (ab,) / (ba,) / (ab, ba) for a pair or a reference reward,
# (q,) for a score or a judgment, the N (N - 1) ordered comparisons of a group.
Prepared = tuple[Rendered, ...]
LABELS = {
    "pairwise": scoring.PAIRWISE_LABELS,
    "score": scoring.SCORE_LABELS,
    "judgment": scoring.JUDGMENT_LABELS,
    "reference": scoring.PAIRWISE_LABELS,
    "group": scoring.PAIRWISE_LABELS,
}

__all__ = [
    "MAX_GROUP_SIZE",
    "MAX_SAMPLES",
    "MAX_SEED",
    "GroupItem",
    "GroupRewards",
    "JudgmentResult",
    "Labeler",
    "PairItem",
    "Prepared",
    "PreferenceResult",
    "ReferenceItem",
    "ReferenceReward",
    "ScoreItem",
    "ScoreResult",
]


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
    responses: tuple[str, ...]


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


class Labeler:
    """Renders tasks, asks the engine, and turns log-probs into labels.

    Rendering and tokenizing run on one thread of the labeler's own (`prepare`), never on
    the caller's event loop: a server's cache hits must not wait behind the rendering of a
    large miss batch. One long-lived thread, not a pool: every extra thread that tokenizes
    gets its own malloc arena, and a server's memory grew by ~100 MiB per busy wave with a
    pool (tests/test_reliability_overload.py watches this).
    """

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
        self._prompts = PromptBuilder(engine.tokenizer, max_prompt_tokens=engine.max_model_len)
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labeler-render")
        self._closed = False
        # The blocking methods' event loop, one for every call: an engine's loop-bound parts
        # (vLLM's output handler, the remote engine's connections and semaphore) stay usable.
        self._runner: asyncio.Runner | None = None
        self._runner_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    def close(self) -> None:
        """Close the engine (a vLLM engine's processes, a remote engine's connections) and the
        blocking methods' event loop. For a labeler used with the blocking methods; one used
        from async code awaits `engine.aclose()` on its own loop."""
        self._run(self.engine.aclose())
        with self._runner_lock:
            if self._runner is not None:
                self._runner.close()
                self._runner = None
        self._closed = True
        self._render.shutdown(wait=False)

    def __enter__(self) -> Labeler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """`coro` run to its end on the blocking methods' own event loop (one call at a time)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError("the blocking Labeler methods cannot run inside an event loop; await the a* methods")
        with self._runner_lock:
            if self._runner is None:
                self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)  # not the thread's current loop
                weakref.finalize(self, self._runner.close)
            return self._runner.run(coro)

    @property
    def prompts(self) -> PromptBuilder:
        """The prompt builder, held to the model's context as the engine knows it now: an
        engine may learn it late (a vLLM server's own max_model_len, read on its first answer)."""
        self._prompts.max_prompt_tokens = self.engine.max_model_len
        return self._prompts

    def task(self, name: str) -> Task:
        """The task called `name` (UnknownTask otherwise)."""
        if not isinstance(name, str):
            raise InvalidInput(f"task must be a string, got {type(name).__name__}", field="task")
        return self.tasks.get(name)

    def spec(
        self,
        kind: str,
        task: str,
        *,
        order: OrderArg = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        end_markers: Sequence[str] | None = None,
    ) -> LabelSpec:
        """The validated `LabelSpec` of a question of `kind` on `task` with these parameters
        (this labeler's model, task version, sampling temperature and rationale length);
        `end_markers`: those its caller strips from the items, where not the library's."""
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}", field="kind")
        t = self.task(task)
        if kind == "judgment":
            judgment_question(t)  # refused here, before any item is read
        return LabelSpec.build(
            kind,
            task=task,
            task_version=t.version,
            model=self.model_id,
            labels=LABELS[kind],
            order=order,
            cot=cot,
            samples=samples,
            seed=seed,
            temperature=self.temperature,
            max_rationale_tokens=self.max_rationale_tokens,
            end_markers=end_markers,
        )

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

    # -- the two stages: prepare (render, tokenize, check) and run (engine, math) ------------
    async def in_render_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the labeler's rendering thread; a closed labeler's is gone, and
        like its engine it is EngineUnavailable."""
        if self._closed:
            raise EngineUnavailable("the labeler is closed")
        return await asyncio.get_running_loop().run_in_executor(self._render, fn, *args)

    async def aprepare(
        self,
        spec: LabelSpec,
        items: Sequence[Any],
        *,
        where: Sequence[int] | None = None,
        max_item_tokens: int | None = None,
        name: str = "items",
    ) -> list[Prepared]:
        """Render and tokenize every item's prompts on the rendering thread, checking every
        limit: after this, an item can only fail in the engine. Errors name item `i` as
        `<name>[where[i]]` (`items[7].response_a`); `max_item_tokens` caps the tokens of an
        item's own texts."""
        return await self.in_render_thread(self.prepare, spec, items, where, max_item_tokens, name)

    def prepare(
        self,
        spec: LabelSpec,
        items: Sequence[Any],
        where: Sequence[int] | None = None,
        max_item_tokens: int | None = None,
        name: str = "items",
    ) -> list[Prepared]:
        """Blocking `aprepare` (on the caller's thread)."""
        t = self.task(spec.task)
        if t.version != spec.task_version or spec.model != self.model_id:
            raise InvalidInput(f"the spec was built for {spec.model} / task version {spec.task_version}", field="task")
        where = list(range(len(items))) if where is None else list(where)
        at = [f"{name}[{w}]" for w in where]
        coerce = _COERCE[spec.kind]
        items = [coerce(it, at[i]) for i, it in enumerate(items)]
        if max_item_tokens is not None:
            self._check_item_tokens(items, at, max_item_tokens)
        drafts: list[Rendered] = []
        owners: list[str] = []
        sizes: list[int] = []
        for i, it in enumerate(items):
            mine = self._drafts(spec, t, it, at[i])
            drafts += mine
            owners += [at[i]] * len(mine)
            sizes.append(len(mine))
        rationale = (spec.max_rationale_tokens or self.max_rationale_tokens) if spec.cot else 0
        try:
            rendered = iter(self.prompts.tokenize_many(drafts, owners, rationale_tokens=rationale))
        except InputTooLong as exc:
            if exc.tokens is None or exc.field not in at:
                raise
            i = at.index(exc.field)
            # Over the model's context also without its responses' tokens (a comparison of a
            # group shows two): the data's (its context or reference), not the responses',
            # which a reward adapter may answer with its lowest reward.
            data, responses = _data_and_responses(self.text_tokens([items[i]])[0])
            shown = sorted(n for _, n in responses)
            if exc.tokens - sum(shown[-2:] if spec.kind == "group" else shown) <= exc.limit:
                raise
            field = max(data, key=lambda x: x[1])[0]
            raise InputTooLong(
                f"{at[i]}.{field}: {exc.reason}, also without its responses' tokens",
                field=f"{at[i]}.{field}",
                limit=exc.limit,
            ) from None
        return [tuple(next(rendered) for _ in range(n)) for n in sizes]

    def _drafts(self, spec: LabelSpec, t: Task, it: Any, at: str) -> list[Rendered]:
        """The untokenized prompts of one item under `spec`, in the order `arun` reads them."""
        cot = spec.cot
        if spec.kind == "pairwise":
            args = (t, it.context, it.response_a, it.response_b)
            orders = _orders(spec.order)
            return [_at(at, self.prompts.pairwise, *args, order=o, cot=cot, tokenize=False) for o in orders]
        if spec.kind == "reference":
            # The response is shown as A, the reference as B: errors name the caller's fields.
            args = (t, it.context, it.response, it.reference)
            names = {"response_a": "response", "response_b": "reference"}
            return [
                _at(at, self.prompts.pairwise, *args, order=o, cot=cot, tokenize=False, names=names)
                for o in _orders(spec.order)
            ]
        if spec.kind == "group":
            # All comparisons of a group share one fence tag (drawn over the whole group), so their
            # prompts agree up to the first response, and they are listed first-response-major,
            # so each first response heads N - 1 consecutive prompts: the engine's prefix tree
            # computes the preamble and context once per group, each first response once.
            tag = _at(at, self.prompts.group_tag, it.context, it.responses)
            out = []
            for i, j in _ordered_pairs(len(it.responses)):
                names = {"response_a": f"responses[{i}]", "response_b": f"responses[{j}]"}
                args = (t, it.context, it.responses[i], it.responses[j])
                out.append(_at(at, self.prompts.pairwise, *args, cot=cot, tokenize=False, tag=tag, names=names))
            return out
        if spec.kind == "judgment":
            return [_at(at, self.prompts.judgment, t, it.context, it.response, cot=cot, tokenize=False)]
        return [_at(at, self.prompts.score, t, it.context, it.response, cot=cot, tokenize=False)]

    def text_tokens(self, items: Sequence[Any]) -> list[list[tuple[str, int]]]:
        """(field name, tokens) of each item's own texts, from one tokenizer call."""
        per_item = [_texts(it) for it in items]
        texts = [clean_text(text, n, allow_empty=True) for named in per_item for n, text in named]
        ids = iter(self.engine.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        return [[(n, len(next(ids))) for n, _ in named] for named in per_item]

    def _check_item_tokens(self, items: Sequence[Any], where: Sequence[str], limit: int) -> None:
        """The per-item token limit, over the item's own texts. An item over it without its
        responses is refused naming its largest other text (`items[3].context`): the data's,
        not the responses', which a reward adapter may answer with its lowest reward."""
        for i, named in enumerate(self.text_tokens(items)):
            n_tokens = sum(n for _, n in named)
            if n_tokens <= limit:
                continue
            data, _ = _data_and_responses(named)
            if (n_data := sum(n for _, n in data)) > limit:
                field, n = max(data, key=lambda x: x[1])
                raise InputTooLong(
                    f"{where[i]}.{field}: the item's texts are {n_data} tokens without its responses "
                    f"(its {field} {n}), over the limit of {limit}",
                    field=f"{where[i]}.{field}",
                    limit=limit,
                )
            raise InputTooLong(
                f"{where[i]}: {n_tokens} tokens in its texts, over the limit of {limit}",
                field=where[i],
                limit=limit,
            )

    async def arun(self, spec: LabelSpec, prepared: Sequence[Prepared], name: str = "items") -> list[Any]:
        """Results for prepared items, in order: one batched engine call per stage (one
        `score` call, after one `generate` call with chain-of-thought). Items the model gives
        no label for raise a ModelOutputError naming the first as `<name>[i]` (by its place
        in `prepared`), with every one's place in `.items`."""
        flat = [r for p in prepared for r in p]
        item_of = [i for i, p in enumerate(prepared) for _ in p]
        dists, masses, rationales = await self._label(flat, spec, item_of, name)
        if spec.kind == "pairwise":
            return self._preferences(spec, len(prepared), dists, masses, rationales)
        if spec.kind == "reference":
            return [_reference_reward(p) for p in self._preferences(spec, len(prepared), dists, masses, rationales)]
        if spec.kind == "group":
            return _group_results(spec, prepared, dists, masses, rationales)
        result = _judgment_result if spec.kind == "judgment" else _score_result
        return [result(d, masses[k], rationales[k] if rationales is not None else None) for k, d in enumerate(dists)]

    async def alabel(self, spec: LabelSpec, items: Sequence[Any]) -> list[Any]:
        """Results for `items` under `spec`, in order (`aprepare`, then `arun`)."""
        return await self.arun(spec, await self.aprepare(spec, items))

    def _preferences(
        self,
        spec: LabelSpec,
        n: int,
        dists: list[dict[str, float]],
        masses: list[float],
        rationales: list[list[str]] | None,
    ) -> list[PreferenceResult]:
        orders = _orders(spec.order)
        results = []
        for i in range(n):
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
                    rationales=rats if spec.cot else None,
                )
            )
        return results

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
        return await self.alabel(self.spec("pairwise", task, order=order, cot=cot, samples=samples, seed=seed), items)

    async def ascores(
        self, items: Sequence[ScoreItem], task: str, *, cot: bool = False, samples: int = 1, seed: int = 0
    ) -> list[ScoreResult]:
        """Direct scores for many responses, in item order."""
        return await self.alabel(self.spec("score", task, cot=cot, samples=samples, seed=seed), items)

    async def ajudgments(
        self, items: Sequence[ScoreItem], task: str, *, cot: bool = False, samples: int = 1, seed: int = 0
    ) -> list[JudgmentResult]:
        """Yes/no judgments (the task's `judgment_question`) of many responses, in item order."""
        return await self.alabel(self.spec("judgment", task, cot=cot, samples=samples, seed=seed), items)

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
        spec = self.spec("reference", task, order=order, cot=cot, samples=samples, seed=seed)
        return await self.alabel(spec, items)

    async def agroup_rewards(
        self, groups: Sequence[GroupItem], task: str, *, cot: bool = False, samples: int = 1, seed: int = 0
    ) -> list[GroupRewards]:
        """Group-relative rewards: within each group, every completion is compared with every
        other in both orders (N (N - 1) reads), and gets its centred mean win probability
        (`scoring.group_rewards`). All groups go to the engine in one call per stage, laid out
        so that the engine shares each group's prompt prefix. Errors name `groups[i]`."""
        spec = self.spec("group", task, cot=cot, samples=samples, seed=seed)
        return await self.arun(spec, await self.aprepare(spec, groups, name="groups"), name="groups")

    async def _label(
        self, rendered: list[Rendered], spec: LabelSpec, item_of: list[int], name: str
    ) -> tuple[list[dict[str, float]], list[float], list[list[str]] | None]:
        """Label distributions for rendered questions: one score call, after one
        generate call with chain-of-thought. Returns (distributions, masses, rationales).
        `item_of[k]`: the item that question `k` is of, as a ModelOutputError names it."""
        if not rendered:
            return [], [], None
        if not spec.cot:
            reads = rendered
            groups = [[k] for k in range(len(rendered))]
            rationales = None
            sites = [None] * len(reads)
        else:
            samples = spec.samples
            temperature = spec.temperature if samples > 1 else 0.0
            max_tokens = spec.max_rationale_tokens or self.max_rationale_tokens
            gens = await self.engine.generate(
                [
                    GenerateRequest(r.prompt_token_ids, max_tokens, temperature or 0.0, samples, spec.draw_seed)
                    for r in rendered
                ]
            )
            owners, read_texts, groups, rationales, sites = [], [], [], [], []
            for r, draws in zip(rendered, gens, strict=True):
                texts = [self.prompts.cut_rationale(r, g.text) for g in draws]
                groups.append(list(range(len(read_texts), len(read_texts) + len(texts))))
                owners.extend([r] * len(texts))
                read_texts.extend(texts)
                rationales.append(texts)
                sites.extend(g.site for g in draws)
            reads = await self.in_render_thread(self.prompts.after_rationales, owners, read_texts)
        queries = scoring.label_queries(reads[0].labels)
        answers = await self.engine.score(
            [ScoreRequest(r.prompt_token_ids, queries, site) for r, site in zip(reads, sites, strict=True)]
        )
        per_read = []
        unlabeled: dict[int, ModelOutputError] = {}  # item -> its first read without a label
        for r, a, k in zip(reads, answers, (k for k, g in enumerate(groups) for _ in g), strict=True):
            try:
                per_read.append(scoring.label_distribution(r.labels, a))
            except ModelOutputError as exc:  # some items' answers, not the batch's: say which
                unlabeled.setdefault(item_of[k], exc)
        if unlabeled:
            first = min(unlabeled)
            at = f"{name}[{first}]"
            raise ModelOutputError(f"{at}: {unlabeled[first]}", field=at, items=tuple(sorted(unlabeled)))
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
        return self._run(self.apreference(context, response_a, response_b, task, **kwargs))

    def score(self, context: str, response: str, task: str, **kwargs: Any) -> ScoreResult:
        """Blocking `ascore`."""
        return self._run(self.ascore(context, response, task, **kwargs))

    def preferences(self, items: Sequence[PairItem], task: str, **kwargs: Any) -> list[PreferenceResult]:
        """Blocking `apreferences`."""
        return self._run(self.apreferences(items, task, **kwargs))

    def scores(self, items: Sequence[ScoreItem], task: str, **kwargs: Any) -> list[ScoreResult]:
        """Blocking `ascores`."""
        return self._run(self.ascores(items, task, **kwargs))

    async def ajudgment(self, context: str, response: str, task: str, **kwargs: Any) -> JudgmentResult:
        """One response; keyword arguments as for `ajudgments`."""
        return (await self.ajudgments([ScoreItem(context, response)], task, **kwargs))[0]

    def judgment(self, context: str, response: str, task: str, **kwargs: Any) -> JudgmentResult:
        """Blocking `ajudgment`."""
        return self._run(self.ajudgment(context, response, task, **kwargs))

    def judgments(self, items: Sequence[ScoreItem], task: str, **kwargs: Any) -> list[JudgmentResult]:
        """Blocking `ajudgments`."""
        return self._run(self.ajudgments(items, task, **kwargs))

    def reference_rewards(self, items: Sequence[ReferenceItem], task: str, **kwargs: Any) -> list[ReferenceReward]:
        """Blocking `areference_rewards`."""
        return self._run(self.areference_rewards(items, task, **kwargs))

    def group_rewards(self, groups: Sequence[GroupItem], task: str, **kwargs: Any) -> list[GroupRewards]:
        """Blocking `agroup_rewards`."""
        return self._run(self.agroup_rewards(groups, task, **kwargs))


def _at(where: str, fn: Any, *args: Any, names: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Render one item, naming it in any input error as `where` (`items[3].response_a`);
    `names` renames the renderer's fields to the item's (`response_b` -> `reference`)."""
    try:
        return fn(*args, **kwargs)
    except InputTooLong as exc:
        raise InputTooLong(f"{where}: {exc}", field=where, limit=exc.limit) from None
    except InvalidInput as exc:
        message, sub = str(exc), exc.field
        for old, new in (names or {}).items():
            message = message.replace(old, new)
            sub = new if sub == old else sub
        field = f"{where}.{sub}" if sub else where
        raise InvalidInput(f"{where}: {message}", field=field) from None


def _orders(order: object) -> tuple[str, ...]:
    if order == "both":
        return ("ab", "ba")
    if order in ("ab", "ba"):
        return (order,)  # type: ignore[return-value]
    raise InvalidInput(f"order must be 'both', 'ab' or 'ba', got {order!r}", field="order")


def _score_result(dist: dict[str, float], mass: float, rationales: list[str] | None) -> ScoreResult:
    s = scoring.expected_score(dist)
    return ScoreResult(
        distribution=[dist[label] for label in scoring.SCORE_LABELS],
        expected=s,
        reward=scoring.score_to_reward(s),
        label_mass=mass,
        rationales=rationales,
    )


def _judgment_result(dist: dict[str, float], mass: float, rationales: list[str] | None) -> JudgmentResult:
    p_yes, p_no = scoring.judgment_probabilities(dist)
    return JudgmentResult(p_yes=p_yes, p_no=p_no, label_mass=mass, rationales=rationales)


def _reference_reward(p: PreferenceResult) -> ReferenceReward:
    """The response was shown as A and the reference as B: P(A preferred) is its win probability."""
    return ReferenceReward(
        reward=scoring.reference_reward(p.p_a),
        p_win=p.p_a,
        p_win_ab=p.p_a_ab,
        p_win_ba=p.p_a_ba,
        consistent=p.consistent,
        label_mass=p.label_mass,
        rationales=p.rationales,
    )


def _group_results(
    spec: LabelSpec,
    prepared: Sequence[Prepared],
    dists: list[dict[str, float]],
    masses: list[float],
    rationales: list[list[str]] | None,
) -> list[GroupRewards]:
    results = []
    k = 0
    for p in prepared:
        n = (1 + math.isqrt(1 + 4 * len(p))) // 2  # a group of N has N (N - 1) comparisons
        q = [[0.5] * n for _ in range(n)]
        rats: list[list[list[str] | None]] = [[None] * n for _ in range(n)]
        for i, j in _ordered_pairs(n):
            q[i][j] = dists[k]["1"]
            if rationales is not None:
                rats[i][j] = rationales[k]
            k += 1
        rw = scoring.group_rewards(q)
        m = len(p)
        agree = [(q[i][j] - 0.5) * (q[j][i] - 0.5) < 0 for i in range(n) for j in range(i + 1, n)]
        results.append(
            GroupRewards(
                rewards=rw.rewards,
                win_rate=rw.win_rate,
                p_win=rw.p_win,
                label_mass=sum(masses[k - m : k]) / m,
                consistency=sum(agree) / len(agree),
                rationales=rats if spec.cot else None,
            )
        )
    return results


def _ordered_pairs(n: int) -> list[tuple[int, int]]:
    """(i, j) for i != j, first-response-major: the N - 1 comparisons showing i first are
    consecutive, so the engine's prefix tree (and its chunks) share i's tokens."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def _texts(item: Any) -> list[tuple[str, object]]:
    """(field name, text) of an item's texts, a group's responses one by one."""
    out: list[tuple[str, object]] = []
    for f in _fields(item):
        value = getattr(item, f.name)
        if isinstance(value, tuple):
            out += [(f"{f.name}[{k}]", v) for k, v in enumerate(value)]
        else:
            out.append((f.name, value))
    return out


def _data_and_responses(named: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """An item's (field name, tokens) split into the data's texts (its context, a reference)
    and the responses judged: an item over a limit also without its responses is the data's
    fault, refused naming its largest data text, never answered with a response's lowest reward."""
    data = [x for x in named if not x[0].startswith("response")]
    return data, [x for x in named if x[0].startswith("response")]


def _pair(item: object, where: str) -> PairItem:
    if isinstance(item, PairItem):
        return item
    if isinstance(item, dict):
        try:
            return PairItem(item["context"], item["response_a"], item["response_b"])
        except KeyError as exc:
            raise InvalidInput(f"{where} lacks {exc.args[0]!r}", field=f"{where}.{exc.args[0]}") from None
    raise InvalidInput(f"{where} must be a PairItem or a mapping", field=where)


def _score_item(item: object, where: str) -> ScoreItem:
    if isinstance(item, ScoreItem):
        return item
    if isinstance(item, dict):
        try:
            return ScoreItem(item["context"], item["response"])
        except KeyError as exc:
            raise InvalidInput(f"{where} lacks {exc.args[0]!r}", field=f"{where}.{exc.args[0]}") from None
    raise InvalidInput(f"{where} must be a ScoreItem or a mapping", field=where)


def _reference_item(item: object, where: str) -> ReferenceItem:
    if isinstance(item, ReferenceItem):
        return item
    if isinstance(item, dict):
        try:
            return ReferenceItem(item["context"], item["response"], item["reference"])
        except KeyError as exc:
            raise InvalidInput(f"{where} lacks {exc.args[0]!r}", field=f"{where}.{exc.args[0]}") from None
    raise InvalidInput(f"{where} must be a ReferenceItem or a mapping", field=where)


def _group_item(item: object, where: str) -> GroupItem:
    if isinstance(item, dict):
        try:
            item = GroupItem(item["context"], item["responses"])
        except KeyError as exc:
            raise InvalidInput(f"{where} lacks {exc.args[0]!r}", field=f"{where}.{exc.args[0]}") from None
    if not isinstance(item, GroupItem):
        raise InvalidInput(f"{where} must be a GroupItem or a mapping", field=where)
    responses = item.responses
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise InvalidInput(f"{where}.responses must be a list of strings", field=f"{where}.responses")
    if not 2 <= len(responses) <= MAX_GROUP_SIZE:
        raise InvalidInput(
            f"{where} has {len(responses)} responses; a group needs 2 to {MAX_GROUP_SIZE}",
            field=f"{where}.responses",
        )
    # A tuple: the group's key and its prompts do not depend on the sequence type it came in.
    return item if type(responses) is tuple else GroupItem(item.context, tuple(responses))


_COERCE: dict[str, Callable[[object, str], Any]] = {
    "pairwise": _pair,
    "score": _score_item,
    "judgment": _score_item,
    "reference": _reference_item,
    "group": _group_item,
}
