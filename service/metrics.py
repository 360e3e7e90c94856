"""Prometheus metrics, in a registry per app (several apps in one process don't clash)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "labeler_request_seconds",
            "Request latency by route",
            ["route", "status"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.items = Counter("labeler_items_total", "Items labeled, by kind and source", ["kind", "source"], registry=r)
        self.cache_hits = Counter("labeler_cache_hits_total", "Cache hits", registry=r)
        self.cache_misses = Counter("labeler_cache_misses_total", "Cache misses", registry=r)
        self.cache_errors = Counter(
            "labeler_cache_errors_total", "Cache failures and bypasses (requests still succeed)", ["op"], registry=r
        )
        self.inflight = Gauge(
            "labeler_inflight_items", "Items queued or computing (a group counts its comparisons)", registry=r
        )
        self.batch_size = Histogram(
            "labeler_engine_batch_items",
            "Items per engine call",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.rejected = Counter("labeler_rejected_total", "Requests refused with 429 (queue full)", registry=r)
        self._engine_tokens = _EngineTokens()
        r.register(self._engine_tokens)

    def watch_engine(self, stats: Any) -> None:
        """Export the engine's token counters (`EngineStats`) as they stand at each scrape:
        engine calls run at once, so no call can tell its own share of them."""
        self._engine_tokens.stats = stats


class _EngineTokens(Collector):
    """The engine's token counters, read at each scrape (none before an engine is watched)."""

    def __init__(self) -> None:
        self.stats: Any = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.stats is None:
            return
        yield CounterMetricFamily(
            "labeler_engine_prompt_tokens",
            "Prompt tokens given to the engine (rate() = tokens/s)",
            value=self.stats.prompt_tokens,
        )
        yield CounterMetricFamily(
            "labeler_engine_computed_tokens",
            "Tokens the engine actually computed (after prefix reuse)",
            value=self.stats.computed_tokens,
        )
