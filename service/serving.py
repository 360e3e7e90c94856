"""The labeling logic behind the routes: limits → cache → micro-batcher → labeler → cache."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict
from typing import Any

from labeler import EngineError, InputTooLong, InvalidInput, Labeler, LabelerError, PairItem, ScoreItem
from labeler.chat import normalize_item, split_query
from labeler.prompts import clean_text

from .batcher import MicroBatcher
from .cache import Cache, cache_keys
from .metrics import Metrics
from .protocol import (
    GetRewardRequest,
    GetRewardResponse,
    PreferencesRequest,
    ScoresRequest,
)
from .settings import Settings

log = logging.getLogger("service.serving")


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
            on_batch=metrics.batch_size.observe,
        )
        # Children bound once: labels() takes a lock and checks its arguments on every call.
        self._items_metric = {
            (k, src): metrics.items.labels(k, src) for k in ("pairwise", "score") for src in ("cache", "engine")
        }

    # -- endpoints ---------------------------------------------------------------------------
    def _reply(self, task: str, version: str, usage: dict[str, int], results: list[dict[str, Any]]) -> dict:
        """The response body as plain data: on cache hits, building pydantic models costs
        more than the rest of the request (the route's response_model still documents the
        shape, and tests check it)."""
        for r in results:
            r["rationale"] = _first(r.get("rationales"))
        return {
            "model": self.labeler.model_id,
            "task": task,
            "task_version": version,
            "usage": usage,
            "results": results,
        }

    async def preferences(self, req: PreferencesRequest) -> dict:
        items = [it.model_dump() for it in req.items]
        params = {"order": req.order, "cot": req.cot, "samples": req.samples, "seed": req.seed}
        results, usage, version = await self._label("pairwise", req.task, params, items, req.cache)
        return self._reply(req.task, version, usage, results)

    async def scores(self, req: ScoresRequest) -> dict:
        items = [it.model_dump() for it in req.items]
        params = {"cot": req.cot, "samples": req.samples, "seed": req.seed}
        results, usage, version = await self._label("score", req.task, params, items, req.cache)
        return self._reply(req.task, version, usage, results)

    async def get_reward(self, req: GetRewardRequest, task: str | None) -> GetRewardResponse:
        if req.prompts is not None and len(req.prompts) != len(req.query):
            raise InvalidInput(
                f"prompts has {len(req.prompts)} entries but query has {len(req.query)}", field="prompts"
            )
        prompts = req.prompts or [None] * len(req.query)
        items = []
        for q, p in zip(req.query, prompts, strict=True):
            # An empty response (the policy emitted only its end-of-turn token) is judged too.
            context, response = split_query(q, p, self.end_markers)
            items.append({"context": context, "response": response})
        params = {"cot": False, "samples": 1, "seed": 0}
        results, _, _ = await self._label("score", task or self.settings.task, params, items, True)
        rewards = [r["reward"] for r in results]
        return GetRewardResponse(
            rewards=rewards,
            scores=rewards,
            extra_logs={
                "expected_score": [r["expected"] for r in results],
                "cached": [float(r["cached"]) for r in results],
            },
        )

    # -- the shared path ------------------------------------------------------------------------
    async def _label(
        self, kind: str, task: str, params: dict[str, Any], items: list[dict[str, str]], use_cache: bool
    ) -> tuple[list[dict[str, Any]], dict[str, int], str]:
        """(results in item order, each a fresh dict with `cached` set; usage; task version)."""
        t = self.labeler.task(task)
        # One canonical transcript per context, responses without end-of-turn markers: the
        # same dialogue gets the same prompt and cache key whichever framework sent it.
        items = [normalize_item(it, self.end_markers) for it in items]
        self._check_limits(items, params)
        keys = cache_keys(self.labeler.model_id, t.version, kind, params, items)
        found: list[dict[str, Any] | None] = await self.cache.get_many(keys) if use_cache else [None] * len(items)
        results = [{**c, "cached": True} if c is not None else {} for c in found]
        misses = [i for i, c in enumerate(found) if c is None]
        hits = len(items) - len(misses)
        shared = 0
        if misses:
            self._check_tokens(items, misses)
            # cache=false requests neither read nor write: their flights are kept apart.
            group: Hashable = (kind, task, tuple(sorted(params.items())), use_cache)
            suffix = "" if use_cache else ":nostore"
            futures, shared = self.batcher.submit(group, [(keys[i] + suffix, items[i]) for i in misses])
            self.metrics.inflight.set(self.batcher.pending)
            # shield: a client that goes away must not cancel a computation others share.
            values = await asyncio.gather(*(asyncio.shield(f) for f in futures))
            for i, v in zip(misses, values, strict=True):
                results[i] = {**v, "cached": False}
            self._items_metric[kind, "engine"].inc(len(misses))
            if use_cache:
                self.metrics.cache_misses.inc(len(misses))
        if hits:  # counters only when they move: each inc() takes a lock
            self._items_metric[kind, "cache"].inc(hits)
            self.metrics.cache_hits.inc(hits)
        usage = {"items": len(items), "cached": hits, "computed": len(misses) - shared, "shared": shared}
        return results, usage, t.version

    async def _run_group(self, group: Hashable, items: list[dict[str, str]], keys: Sequence[str]) -> list[dict]:
        """One labeler call for a batch of one group; writes the results to the cache."""
        kind, task, params, use_cache = group  # type: ignore[misc]
        p = dict(params)
        stats = self.labeler.engine.stats
        before = (stats.prompt_tokens, stats.computed_tokens)
        t0 = time.monotonic()
        try:
            if kind == "pairwise":
                res = await self.labeler.apreferences([PairItem(**it) for it in items], task, **p)
            else:
                res = await self.labeler.ascores([ScoreItem(**it) for it in items], task, **p)
        except LabelerError:
            raise
        except Exception as exc:  # noqa: BLE001 - an engine bug or crash (e.g. vLLM's), not the caller's input
            # As an EngineError it gets the batcher's item-by-item retry, so one failing item
            # does not fail its batch-mates, and its caller a clear 503 instead of a bare 500.
            log.exception("engine call failed on a batch of %d", len(items))
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        elapsed = max(time.monotonic() - t0, 1e-6)
        prompt_tokens = stats.prompt_tokens - before[0]
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.computed_tokens.inc(stats.computed_tokens - before[1])
        self.metrics.tokens_per_second.set(prompt_tokens / elapsed)
        values = [asdict(r) for r in res]
        if use_cache:
            await self.cache.set_many(dict(zip(keys, values, strict=True)))
        self.metrics.inflight.set(max(0, self.batcher.pending - len(items)))
        return values

    def _check_limits(self, items: list[dict[str, str]], params: dict[str, Any]) -> None:
        s = self.settings
        if len(items) > s.max_items:
            raise InputTooLong(
                f"{len(items)} items, over the limit of {s.max_items} per request", field="items", limit=s.max_items
            )
        if params["samples"] > s.max_samples:
            raise InputTooLong(
                f"samples={params['samples']} is over the limit of {s.max_samples}",
                field="samples",
                limit=s.max_samples,
            )
        for i, it in enumerate(items):
            for name, text in it.items():
                if len(text) > s.max_chars:
                    raise InputTooLong(
                        f"items[{i}].{name} has {len(text)} characters, over the limit of {s.max_chars}",
                        field=f"items[{i}].{name}",
                        limit=s.max_chars,
                    )

    def _check_tokens(self, items: list[dict[str, str]], which: list[int]) -> None:
        """The per-item token limit, for the items the engine will compute (cache hits
        cost no engine work, so they skip the tokenizer)."""
        limit = self.settings.max_item_tokens
        # One tokenizer call for all the texts. Cleaned as the prompt will be: a lone
        # surrogate (JSON "\ud800") crashes the tokenizer.
        texts = [clean_text(t, name, allow_empty=True) for i in which for name, t in items[i].items()]
        ids = iter(self.labeler.engine.tokenizer(texts, add_special_tokens=False)["input_ids"])
        for i in which:
            n_tokens = sum(len(next(ids)) for _ in items[i])
            if n_tokens > limit:
                raise InputTooLong(
                    f"items[{i}] has {n_tokens} tokens, over the limit of {limit}", field=f"items[{i}]", limit=limit
                )


def _first(rationales: Any) -> str | None:
    if isinstance(rationales, dict):
        rationales = next(iter(rationales.values()), None)
    return rationales[0] if rationales else None
