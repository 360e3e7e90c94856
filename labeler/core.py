"""The labeler: pairwise preferences and direct scores on top of an engine.

    labeler = Labeler(TransformersEngine(resolve_model(None)))
    r = labeler.preference("post ...", "summary A", "summary B", task="summarize")
    r.p_a, r.p_b, r.p_a_ab, r.p_a_ba, r.consistent

Every batch method makes one batched engine call per stage (one `score` call, plus one
`generate` call with chain-of-thought), whatever the number of items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from dataclasses import fields as _fields
from typing import Any, TypeVar

from . import scoring
from .engines.base import Engine, GenerateRequest, ScoreRequest
from .errors import InputTooLong, InvalidInput
from .prompts import PromptBuilder, Rendered, clean_text
from .spec import KINDS, MAX_SAMPLES, MAX_SEED, LabelSpec, OrderArg
from .tasks import Task, TaskRegistry

T = TypeVar("T")
# One prepared question per order read: (ab,) / (ba,) / (ab, ba) for a pair, (q,) for a score.
Prepared = tuple[Rendered, ...]
LABELS = {"pairwise": scoring.PAIRWISE_LABELS, "score": scoring.SCORE_LABELS}

__all__ = ["MAX_SAMPLES", "MAX_SEED", "Labeler", "PairItem", "Prepared", "PreferenceResult", "ScoreItem", "ScoreResult"]


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


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("the blocking Labeler methods cannot run inside an event loop; await the a* methods")


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
        self.prompts = PromptBuilder(engine.tokenizer, max_prompt_tokens=engine.max_model_len)
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labeler-render")

    @property
    def model_id(self) -> str:
        return self.engine.model_id

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
    ) -> LabelSpec:
        """The validated `LabelSpec` of a question of `kind` on `task` with these parameters
        (this labeler's model, task version, sampling temperature and rationale length)."""
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}", field="kind")
        return LabelSpec.build(
            kind,
            task=task,
            task_version=self.task(task).version,
            model=self.model_id,
            labels=LABELS[kind],
            order=order,
            cot=cot,
            samples=samples,
            seed=seed,
            temperature=self.temperature,
            max_rationale_tokens=self.max_rationale_tokens,
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

    # -- the two stages: prepare (render, tokenize, check) and run (engine, math) ------------
    async def in_render_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the labeler's rendering thread."""
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
        if spec.kind == "pairwise":
            items = [_pair(it, f"{name}[{where[i]}]") for i, it in enumerate(items)]
        else:
            items = [_score_item(it, f"{name}[{where[i]}]") for i, it in enumerate(items)]
        if max_item_tokens is not None:
            self._check_item_tokens(items, [f"{name}[{w}]" for w in where], max_item_tokens)
        orders = _orders(spec.order) if spec.kind == "pairwise" else ("",)
        drafts = []
        for i, it in enumerate(items):
            for o in orders:
                if spec.kind == "pairwise":
                    args = (t, it.context, it.response_a, it.response_b)
                    at = f"{name}[{where[i]}]"
                    drafts.append(_at(at, self.prompts.pairwise, *args, order=o, cot=spec.cot, tokenize=False))
                else:
                    args = (t, it.context, it.response)
                    drafts.append(_at(f"{name}[{where[i]}]", self.prompts.score, *args, cot=spec.cot, tokenize=False))
        rendered = self.prompts.tokenize_many(
            drafts, [f"{name}[{where[i]}]" for i in range(len(items)) for _ in orders]
        )
        n = len(orders)
        return [tuple(rendered[k : k + n]) for k in range(0, len(rendered), n)]

    def _check_item_tokens(self, items: Sequence[Any], where: Sequence[str], limit: int) -> None:
        """The per-item token limit, over the item's own texts (one tokenizer call for all)."""
        names = [[f.name for f in _fields(it)] for it in items]
        texts = [
            clean_text(getattr(it, n), n, allow_empty=True) for it, ns in zip(items, names, strict=True) for n in ns
        ]
        ids = iter(self.engine.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        for i, ns in enumerate(names):
            n_tokens = sum(len(next(ids)) for _ in ns)
            if n_tokens > limit:
                raise InputTooLong(
                    f"{where[i]} has {n_tokens} tokens, over the limit of {limit}", field=where[i], limit=limit
                )

    async def arun(self, spec: LabelSpec, prepared: Sequence[Prepared]) -> list[Any]:
        """Results for prepared items, in order: one batched engine call per stage (one
        `score` call, after one `generate` call with chain-of-thought)."""
        flat = [r for p in prepared for r in p]
        dists, masses, rationales = await self._label(flat, spec)
        if spec.kind == "pairwise":
            return self._preferences(spec, len(prepared), dists, masses, rationales)
        return [
            _score_result(d, masses[k], rationales[k] if rationales is not None else None) for k, d in enumerate(dists)
        ]

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

    async def _label(
        self, rendered: list[Rendered], spec: LabelSpec
    ) -> tuple[list[dict[str, float]], list[float], list[list[str]] | None]:
        """Label distributions for rendered questions: one score call, after one
        generate call with chain-of-thought. Returns (distributions, masses, rationales)."""
        if not rendered:
            return [], [], None
        if not spec.cot:
            reads = rendered
            groups = [[k] for k in range(len(rendered))]
            rationales = None
        else:
            samples = spec.samples
            temperature = spec.temperature if samples > 1 else 0.0
            max_tokens = spec.max_rationale_tokens or self.max_rationale_tokens
            gens = await self.engine.generate(
                [
                    GenerateRequest(r.prompt_token_ids, max_tokens, temperature or 0.0, samples, spec.seed or 0)
                    for r in rendered
                ]
            )
            drafts, groups, rationales = [], [], []
            for r, draws in zip(rendered, gens, strict=True):
                texts = [self.prompts.cut_rationale(r, g.text) for g in draws]
                groups.append(list(range(len(drafts), len(drafts) + len(texts))))
                drafts.extend(self.prompts.after_rationale(r, text, tokenize=False) for text in texts)
                rationales.append(texts)
            reads = await self.in_render_thread(self.prompts.tokenize_many, drafts, None)
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


def _at(where: str, fn: Any, *args: Any, **kwargs: Any) -> Rendered:
    """Render one item, naming it in any input error as `where` (`items[3].response_a`)."""
    try:
        return fn(*args, **kwargs)
    except InputTooLong as exc:
        raise InputTooLong(f"{where}: {exc}", field=where, limit=exc.limit) from None
    except InvalidInput as exc:
        field = f"{where}.{exc.field}" if exc.field else where
        raise InvalidInput(f"{where}: {exc}", field=field) from None


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
