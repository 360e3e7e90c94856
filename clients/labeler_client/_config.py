"""Client configuration: explicit objects, with defaults from the environment."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

ENV_URL = "LABELER_URL"
ENV_API_KEY = "LABELER_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection and for an answer (labeling a batch takes a while)."""

    read: float = 300.0
    connect: float = 10.0


@dataclass(frozen=True)
class Retry:
    """Retries on connection errors, timeouts, 408, 429 (after Retry-After) and 502/503/504,
    with exponential backoff (base × 2^attempt, capped) and full jitter. Labeling is
    idempotent and cached server-side, so a retried request is safe."""

    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff * 3)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


def resolve_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/")


def resolve_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get(ENV_API_KEY) or None


def parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
