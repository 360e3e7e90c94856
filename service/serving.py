"""The labeling logic behind the routes: limits → cache → micro-batcher → labeler → cache."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from labeler import GroupItem, InputTooLong, InvalidInput, Labeler, LabelSpec, PairItem, ReferenceItem, ScoreItem
from labeler.chat import normalize_item, parse, split_query
from labeler.core import Prepared
from labeler.errors import EngineUnavailable, LabelerError
from labeler.spec import KINDS

from .batcher import BatchFailure, MicroBatcher
from .cache import CACHE_PREFIX, Cache
from .metrics import Metrics
from .protocol import (
    RESULT_MODELS,
    GetRewardParams,
    GetRewardRequest,
    GetRewardResponse,
    GroupRewardsRequest,
    GroupRewardsResponse,
    JudgmentsRequest,
    JudgmentsResponse,
    PreferencesRequest,
    PreferencesResponse,
    ReferenceRewardsRequest,
    ReferenceRewardsResponse,
    ScoresRequest,
    ScoresResponse,
    Usage,
)
from .settings import Settings

T = TypeVar("T")

log = logging.getLogger("service.serving")

# Label specs remembered per option set (kind, task, order, cot, samples, seed).
MAX_SPECS = 4096


class LabelService:
    """Answers the label endpoints for one labeler, cache and batcher."""

    def __init__(self, labeler: Labeler, cache: Cache, settings: Settings, metrics: Metrics) -> None:
        self.labeler = labeler
        self.cache = cache
        self.settings = settings
        self.metrics = metrics
        self.end_markers = tuple(settings.end_markers)
        self.batcher = MicroBatcher(
            self._run_group,
            max_items=settings.batch_max_items,
            wait_s=settings.batch_wait_ms / 1000,
            max_pending=settings.max_queue_items,
            concurrency=settings.effective_batch_concurrency(),
            on_call=self._count_call,
            on_pending=metrics.inflight.set,
        )
        self._specs: dict[tuple, LabelSpec] = {}
        metrics.watch_engine(labeler.engine.stats)
        # Children bound once: labels() takes a lock and checks its arguments on every call.
        sources = ("cache", "engine", "shared")  # shared: computed once for several requests, counted once as engine
        self._items_metric = {(k, src): metrics.items.labels(k, src) for k in KINDS for src in sources}

    # -- endpoints ---------------------------------------------------------------------------
    async def preferences(self, req: PreferencesRequest) -> PreferencesResponse:
        return await self._endpoint("pairwise", req, PairItem, PreferencesResponse, order=req.order)

    async def scores(self, req: ScoresRequest) -> ScoresResponse:
        return await self._endpoint("score", req, ScoreItem, ScoresResponse)

    async def judgments(self, req: JudgmentsRequest) -> JudgmentsResponse:
        return await self._endpoint("judgment", req, ScoreItem, JudgmentsResponse)

    async def reference_rewards(self, req: ReferenceRewardsRequest) -> ReferenceRewardsResponse:
        return await self._endpoint("reference", req, ReferenceItem, ReferenceRewardsResponse, order=req.order)

    async def _endpoint(self, kind: str, req: Any, item_type: type, response: type[BaseModel], **params: Any) -> Any:
        """One label route: the spec from the request's options, the items normalized, labeled
        (cache first), and the results, each with its first rationale, as `response`."""
        spec = self._spec(kind, req.task, cot=req.cot, samples=req.samples, seed=req.seed, **params)
        plain = [_plain(it) for it in req.items]
        items = await self._off_loop_if_large(
            lambda: [item_type(**self._normalize(it)) for it in plain], _text_chars(plain)
        )
        values, usage = await self._label(spec, items, req.cache)
        for v in values:  # fresh dicts, the request's own; rationales are optional in a result
            v["rationale"] = _first(v.get("rationales"))
        return _response(response, spec, usage, values)

    async def group_rewards(self, req: GroupRewardsRequest) -> GroupRewardsResponse:
        spec = self._spec("group", req.task, cot=req.cot, samples=req.samples, seed=req.seed)
        plain = [_plain(it) for it in req.items]

        def normalized() -> list[GroupItem]:
            return [GroupItem(g["context"], tuple(g["responses"])) for g in map(self._normalize, plain)]

        groups = await self._off_loop_if_large(normalized, _text_chars(plain))
        # A group of N is N (N - 1) / 2 comparisons: the queue, batches and a request count
        # those, so that a request of large groups holds no more prompts than one of pairs.
        weights = [len(g.responses) * (len(g.responses) - 1) // 2 for g in groups]
        limit = self.settings.max_queue_items
        if sum(weights) > limit:  # never queued: a 422, which a client answers by sending halves
            raise InputTooLong(
                f"{len(groups)} groups make {sum(weights)} comparisons, over the limit of {limit} per request "
                "(LABELER_MAX_QUEUE_ITEMS)",
                field="items",
                limit=limit,
            )
        values, usage = await self._label(spec, groups, req.cache, weights=weights)
        return _response(GroupRewardsResponse, spec, usage, values)

    async def get_reward(
        self, req: GetRewardRequest, task: str | None, reward: str = "score", overlong: str = "refuse"
    ) -> GetRewardResponse:
        for name in _GET_REWARD_PARAMS:  # OpenRLHF's own extra keys are allowed; these would be ignored
            if name in (req.model_extra or {}):
                raise InvalidInput(
                    f"{name} is a query parameter of /get_reward (/get_reward?{name}=...), not a body field",
                    field=name,
                )
        if req.prompts is not None and len(req.prompts) != len(req.query):
            raise InvalidInput(
                f"prompts has {len(req.prompts)} entries but query has {len(req.query)}", field="prompts"
            )
        references = None
        if reward == "reference":
            labels = req.labels or []
            if len(labels) != len(req.query):
                raise InvalidInput(
                    f"reward=reference needs one reference per query in labels: {len(labels)} labels, "
                    f"{len(req.query)} queries",
                    field="labels",
                )
            for i, label in enumerate(labels):
                if not isinstance(label, str):
                    raise InvalidInput(f"labels[{i}] must be a reference response (text)", field=f"labels[{i}]")
                self._check_length(f"labels[{i}]", len(label))
            references = labels
        self._check_count(len(req.query), "query")  # before any query is set aside as too long
        lowest = overlong == "lowest"
        prompts = req.prompts or [None] * len(req.query)
        items: list[Any] = []
        too_long: set[int] = set()
        from_prompt: set[int] = set()  # the queries whose context is the request's prompt

        def read_queries() -> None:
            for k, (q, p) in enumerate(zip(req.query, prompts, strict=True)):
                # An empty response (the policy emitted only its end-of-turn token) is judged too.
                context, response = split_query(q, p, self.end_markers)
                where = f"query[{k}].context"
                if p is not None and isinstance(context, str) and context:  # the request's prompt
                    where = f"prompts[{k}]"
                    from_prompt.add(k)
                    # Its messages when a chat template laid it out: held to the limit per message,
                    # and read as the same context given as messages is.
                    context = parse(context, self.end_markers) or context
                try:
                    self._check_split(where, k, context, response)
                except InputTooLong:
                    if not lowest:
                        raise
                    too_long.add(k)
                fields = {"context": context, "response": response}
                if references is None:
                    items.append(ScoreItem(**self._normalize(fields)))
                else:
                    items.append(ReferenceItem(**self._normalize({**fields, "reference": references[k]})))

        try:
            await self._off_loop_if_large(read_queries, _nested_chars([req.query, prompts, references]))
            kind = "reference" if references is not None else "score"
            spec = self._spec(kind, self.settings.task if task is None else task)  # "": an unknown task
            if lowest:
                values = await self._label_fitting(spec, items, too_long)
            else:
                values, _ = await self._label(spec, items, True, where="query")
        except InputTooLong as e:
            field, message = e.field or "", str(e)
            # Named as the request names it: a query's reference is the labels[k] it gave, its
            # context the prompts[k] it gave, where it gave one.
            given = {f"query[{k}].context": f"prompts[{k}]" for k in from_prompt}
            if references is not None:
                given |= {f"query[{k}].reference": f"labels[{k}]" for k in range(len(req.query))}
            if field in given:
                field = given[field]
                message = field + message.removeprefix(e.field)
            if not lowest and field.startswith(("query[", "prompts[")):
                message += " (with ?overlong=lowest such a query gets the lowest reward instead)"
            raise InputTooLong(message, field=field or None, limit=e.limit) from None
        extra = {"overlong": [float(k in too_long) for k in range(len(items))]} if lowest else {}
        rewards = [v["reward"] for v in values]
        cached = [float(v["cached"]) for v in values]
        if references is not None:
            logs = {"p_win": [v["p_win"] for v in values], "cached": cached, **extra}
        else:
            logs = {"expected_score": [v["expected"] for v in values], "cached": cached, **extra}
        return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs=logs)

    async def _label_fitting(self, spec: LabelSpec, items: list[Any], too_long: set[int]) -> list[dict[str, Any]]:
        """/get_reward's results with queries over a length limit set aside (added to
        `too_long`) and given the lowest reward instead of failing the request: a rollout
        longer than the labeler reads is the policy's output, and OpenRLHF has no way to
        drop one sample of a refused request. Those over a character limit are in `too_long`
        already; the others are looked up in the cache and, for the misses alone, held to
        the token limits as they are prepared (see `_prepare`)."""
        fits = [k for k in range(len(items)) if k not in too_long]
        aside: set[int] = set()
        values, _ = await self._label(spec, [items[k] for k in fits], True, where="query", at=fits, set_aside=aside)
        too_long.update(fits[j] for j in aside)
        out: list[dict[str, Any]] = [_LOWEST[spec.kind]] * len(items)
        for j, (k, v) in enumerate(zip(fits, values, strict=True)):
            if j not in aside:
                out[k] = v
        return out

    async def _prepare(
        self,
        spec: LabelSpec,
        items: list[Any],
        misses: list[int],
        at: Sequence[int],
        where: str,
        set_aside: set[int] | None,
    ) -> list[Prepared]:
        """The prepared prompts of `items[i]` for i in `misses`, every limit checked. With
        `set_aside`, a miss over the item token limit (counted for all in one pass) or over the
        model's context (rarer: found by preparing the misses one by one, once their batch
        failed on one) is added to it and taken out of `misses` instead of failing."""
        limit = self.settings.max_item_tokens
        if set_aside is not None:
            named = await self.labeler.in_render_thread(self.labeler.text_tokens, [items[i] for i in misses])
            for i, counts in zip(misses, named, strict=True):
                tokens = dict(counts)
                if tokens.get("reference", 0) > limit:  # the data's, as a reference over max_chars is
                    raise InputTooLong(
                        f"{where}[{at[i]}].reference: {tokens['reference']} tokens, over the limit of {limit}",
                        field=f"{where}[{at[i]}].reference",
                        limit=limit,
                    )
                if sum(tokens.values()) > limit:
                    set_aside.add(i)
        while True:
            misses[:] = [i for i in misses if set_aside is None or i not in set_aside]
            try:
                return await self.labeler.aprepare(
                    spec,
                    [items[i] for i in misses],
                    where=[at[i] for i in misses],
                    max_item_tokens=None if set_aside is not None else limit,
                    name=where,
                )
            except InputTooLong:
                if set_aside is None:
                    raise
                over = [i for i in misses if not await self._fits(spec, items[i])]
                if not over:  # a limit that no query alone is over
                    raise
                set_aside.update(over)

    async def _fits(self, spec: LabelSpec, item: Any) -> bool:
        """Whether `item`'s prompts fit the model's context (its own token limit is checked)."""
        try:
            await self.labeler.aprepare(spec, [item])
        except InputTooLong:
            return False
        return True

    # -- the shared path ------------------------------------------------------------------------
    async def _off_loop_if_large(self, read: Callable[[], T], chars: int) -> T:
        """`read()`, the reading of a request's items (their transcripts), inline for a request
        of small texts, where it takes microseconds; on the labeler's rendering thread for
        one over `_INLINE_CHARS` characters, where parsing chat markup (some 16 ms per 32,000
        characters) would hold up every other request and the health probes."""
        if chars <= _INLINE_CHARS:
            return read()
        return await self.labeler.in_render_thread(read)

    def _normalize(self, item: dict[str, Any]) -> dict[str, str]:
        """One canonical transcript per context, responses without end-of-turn markers: the
        same dialogue gets the same prompt and cache key whichever framework sent it."""
        return normalize_item(item, self.end_markers)

    def _spec(self, kind: str, task: str, **params: Any) -> LabelSpec:
        # Requests repeat a handful of option sets: each spec is built and validated once.
        # (The request models have checked the options' types, so equal values are equal options.)
        memo = (kind, task, *params.items())
        spec = self._specs.get(memo)
        if spec is not None:
            return spec
        if params.get("samples", 1) > self.settings.max_samples:  # the request models say so too
            raise InputTooLong(
                f"samples={params['samples']} is over the limit of {self.settings.max_samples}",
                field="samples",
                limit=self.settings.max_samples,
            )
        spec = self.labeler.spec(kind, task, end_markers=self.end_markers, **params)
        if len(self._specs) >= MAX_SPECS:  # seeds are many: keep the memo bounded
            self._specs.clear()
        self._specs[memo] = spec
        return spec

    async def _label(
        self,
        spec: LabelSpec,
        items: list[Any],
        use_cache: bool,
        *,
        where: str = "items",
        at: Sequence[int] | None = None,
        set_aside: set[int] | None = None,
        weights: Sequence[int] | None = None,
    ) -> tuple[list[dict[str, Any]], Usage]:
        """(one result dict per item, in item order, with `cached` set; usage). Every item the
        engine will compute is prepared — rendered, tokenized and checked against every limit —
        before any is queued, so invalid input fails the request and nothing else. Item `i`
        is named `<where>[at[i]]` in errors (`at`: the items' places in the request). With
        `set_aside`, items to compute that are over a token limit are added to it (their
        results left empty) instead of failing the request. `weights`: what each item counts
        for in the batcher (1 each by default)."""
        self._check_count(len(items), where)
        at = range(len(items)) if at is None else at
        if not items:  # /get_reward's empty shard
            return [], Usage(items=0, cached=0, computed=0, shared=0)
        keys = [CACHE_PREFIX + k for k in spec.keys(items)]
        found = await self.cache.get_many(keys) if use_cache else [None] * len(items)
        results: list[dict[str, Any]] = [{**c, "cached": True} if c is not None else {} for c in found]
        if self.cache.shared:
            self._drop_foreign(spec.kind, results)
        misses = [i for i, r in enumerate(results) if not r]
        hits = len(items) - len(misses)
        # The cache's counters count lookups, also those of a request that fails after them;
        # items computed count in `_count_call`, whichever request they were for.
        if hits:  # counters only when they move: each inc() takes a lock
            self.metrics.cache_hits.inc(hits)
        if misses and use_cache:
            self.metrics.cache_misses.inc(len(misses))
        shared = 0
        if misses:
            # cache=false requests neither read nor write: their flights are kept apart.
            suffix = "" if use_cache else ":nostore"
            flight_key = {i: keys[i] + suffix for i in misses}  # each miss's key in the batcher
            # Items another request is computing are joined at once: they need no rendering,
            # and by the time this request's own are rendered their computation may be over.
            flights = self.batcher.in_flight(flight_key.values())
            fresh = [i for i in misses if flight_key[i] not in flights]
            self.batcher.check_room((flight_key[i] for i in fresh), _pick(weights, fresh))
            prepared = await self._prepare(spec, items, fresh, at, where, set_aside) if fresh else []
            entries = [(flight_key[i], p) for i, p in zip(fresh, prepared, strict=True)]  # fresh: less set aside
            if entries:
                futures, shared = self.batcher.submit((spec, use_cache), entries, _pick(weights, fresh))
                for (k, _), f in zip(entries, futures, strict=True):
                    flights.setdefault(k, f)
            misses = [i for i in misses if flight_key[i] in flights]
            shared += len(misses) - len(entries)
            # shield: a client that goes away must not cancel a computation others share.
            futures = [flights[flight_key[i]] for i in misses]
            values = await asyncio.gather(*(asyncio.shield(f) for f in futures), return_exceptions=True)
            failed = [j for j, v in enumerate(values) if isinstance(v, BaseException)]
            if failed:
                raise _request_error(values, failed, f"{where}[{at[misses[failed[0]]]}]", len(items))
            for i, v in zip(misses, values, strict=True):
                results[i] = {**v, "cached": False}
        # Counted once answered, as the request's usage says.
        if hits:
            self._items_metric[spec.kind, "cache"].inc(hits)  # answered from the cache
        if shared:
            self._items_metric[spec.kind, "shared"].inc(shared)  # answered by a computation joined
        return results, Usage(items=len(items), cached=hits, computed=len(misses) - shared, shared=shared)

    def _count_call(self, group: Hashable, items: int, ok: bool) -> None:
        """The batcher's report of one engine call: its size, and its items as computed by the
        engine when it succeeded (each once, however many requests shared it)."""
        self.metrics.batch_size.observe(items)
        if ok:
            self._items_metric[group[0].kind, "engine"].inc(items)  # type: ignore[index]

    def _drop_foreign(self, kind: str, results: list[dict[str, Any]]) -> None:
        """Turn into misses the cached results that are not results of `kind` as this version
        writes them (another version's shape, another writer's data under our prefix): they
        are computed and written anew instead of failing their request."""
        model = RESULT_MODELS[kind]
        for i, r in enumerate(results):
            if r:
                try:
                    model.model_validate(r, strict=True)  # strict: a text "0.5" is no reward
                except ValidationError:
                    results[i] = {}
                    self.metrics.cache_errors.labels("decode").inc()

    def _check_split(self, where: str, k: int, context: Any, response: str) -> None:
        """The per-text character limit on what /get_reward's query `k` split into, as the
        request models hold the label routes' texts to it: a context (named `where`) of chat
        messages per message."""
        if isinstance(context, str):
            self._check_length(where, len(context))
        else:
            for m, message in enumerate(context):
                self._check_length(f"{where}[{m}].content", len(message["content"]))
        self._check_length(f"query[{k}].response", len(response))

    def _check_count(self, n: int, where: str) -> None:
        """The per-request item limit: InputTooLong naming `where` when `n` is over it."""
        limit = self.settings.max_items
        if n > limit:
            raise InputTooLong(f"{n} {where}, over the limit of {limit} per request", field=where, limit=limit)

    def _check_length(self, name: str, n: int) -> None:
        """InputTooLong naming `name` when its `n` characters are over the limit."""
        limit = self.settings.max_chars
        if n > limit:
            raise InputTooLong(f"{name} has {n} characters, over the limit of {limit}", field=name, limit=limit)

    async def _run_group(self, group: Hashable, prepared: list[Prepared], keys: Sequence[str]) -> list[dict]:
        """One labeler call for a batch of one group; writes the results to the cache."""
        spec, use_cache = group  # type: ignore[misc]
        res = await self.labeler.arun(spec, prepared)
        values = [asdict(r) for r in res]
        if use_cache and len(values) == len(keys):  # else which is whose is unknown: the batcher fails the call
            await self.cache.set_many(dict(zip(keys, values, strict=True)))
        return values


# /get_reward's options, given in its URL: the same names in the body are a caller's mistake.
_GET_REWARD_PARAMS = tuple(GetRewardParams.model_fields)

# /get_reward's results for a query over a length limit (with ?overlong=lowest): the lowest
# reward, as the lowest score (1 of 10) or a certain loss against the reference would give.
_LOWEST: dict[str, dict[str, Any]] = {
    "score": {"reward": -1.0, "expected": 1.0, "cached": False},
    "reference": {"reward": -1.0, "p_win": 0.0, "cached": False},
}


def _response(response: type[BaseModel], spec: LabelSpec, usage: Usage, results: list[dict[str, Any]]) -> Any:
    """`response` for `results` (one dict per item): one validation of the whole response, not
    one model per result, so results are typed by `response`'s own schema at a fraction of the
    per-item cost."""
    head = {"model": spec.model, "task": spec.task, "task_version": spec.task_version, "usage": usage}
    return response.model_validate({**head, "results": results})


def _request_error(values: list[Any], failed: list[int], name: str, items: int) -> BaseException:
    """The request's error: that of its first failed item (in item order) of those computed
    (`values`), of `items` in the request. It names the item (`name`) when the item failed
    apart from others of the request, computed now or answered from the cache, so that a
    client can set it aside and send the rest again. An error every item of the request got,
    one the batcher found to be no item's (`BatchFailure`: the engine failing whatever it is
    given) or an engine that is down names none. Always a copy: the same error reaches every
    request that shared the item, and raising one object from each would pile up their frames
    on its one traceback."""
    error = values[failed[0]]
    if not isinstance(error, LabelerError):
        return error
    named = copy.copy(error)
    alone = len(failed) < items or items == 1
    if isinstance(error, (EngineUnavailable, BatchFailure)) or not alone:
        return named
    named.field = name
    named.args = (f"{name}: {error}",)
    return named


def _pick(values: Sequence[int] | None, at: Sequence[int]) -> list[int] | None:
    """`values` at the places `at` (None for None)."""
    return None if values is None else [values[i] for i in at]


# Characters of a request's texts read on the event loop at most (about 1 ms of reading).
_INLINE_CHARS = 65_536


def _text_chars(items: Sequence[dict[str, Any]]) -> int:
    """The characters of the texts in request `items` (dicts of texts, messages, lists of
    them), counted until they pass `_INLINE_CHARS`. Fields of text, nearly all of them, are
    counted without a walk: this runs on every request, cache hits included."""
    total = 0
    for item in items:
        for v in item.values():
            total += len(v) if type(v) is str else _nested_chars(v)
        if total > _INLINE_CHARS:
            break
    return total


def _nested_chars(value: Any) -> int:
    """The characters of the texts in `value`, a text or nested lists and dicts of them."""
    total = 0
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
    return total


def _plain(item: BaseModel) -> dict[str, Any]:
    """A validated request item as the plain data `normalize_item` reads: its fields as they
    are, chat messages (models) as dicts."""
    data = item.__dict__
    return item.model_dump() if any(isinstance(v, list) for v in data.values()) else data


def _first(rationales: Any) -> str | None:
    if isinstance(rationales, dict):
        rationales = next(iter(rationales.values()), None)
    return rationales[0] if rationales else None
