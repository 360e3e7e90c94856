"""Prometheus metrics, in a registry per app (several apps in one process don't clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.inflight = Gauge("labeler_inflight_items", "Items queued or computing", registry=r)
        self.batch_size = Histogram(
            "labeler_engine_batch_items",
            "Items per engine call",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.prompt_tokens = Counter(
            "labeler_engine_prompt_tokens_total", "Prompt tokens given to the engine (rate() = tokens/s)", registry=r
        )
        self.computed_tokens = Counter(
            "labeler_engine_computed_tokens_total",
            "Tokens the engine actually computed (after prefix reuse)",
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "labeler_engine_tokens_per_second", "Prompt tokens/s of the last engine call", registry=r
        )
        self.rejected = Counter("labeler_rejected_total", "Requests refused with 429 (queue full)", registry=r)
