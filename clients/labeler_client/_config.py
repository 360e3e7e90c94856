"""Client configuration: explicit objects, with defaults from the environment:
`LABELER_URL` (base URL, default http://127.0.0.1:8000) and `LABELER_API_KEY` (bearer key).
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Literal, get_args
from urllib.parse import urlsplit

ENV_URL = "LABELER_URL"
ENV_API_KEY = "LABELER_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"

# 429: queue full; 503: not ready / engine failed; 408/502/504: a proxy in front of us gave up.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# Every batch of a call would get these: a refused key, a URL that is not the labeler's (a
# redirect included: the client follows none), a body encoding the server does not read (a
# Content-Encoding header on the user's own httpx client).
CALL_WIDE_STATUSES = frozenset({401, 403, 404, 405, 415, *range(300, 400)})


@dataclass(frozen=True)
class Timeout:
    """Seconds to wait for a connection and for an answer (labeling a batch takes a while:
    the read timeout covers queueing and the engine, so it is generous). Like `httpx.Timeout`,
    this is the configuration; running out of it raises `TimeoutException`."""

    read: float = 300.0
    connect: float = 10.0

    def __post_init__(self) -> None:
        if not (0 < self.read < math.inf and 0 < self.connect < math.inf):
            raise ValueError(f"timeouts must be positive and finite, got read={self.read}, connect={self.connect}")


@dataclass(frozen=True)
class Retry:
    """Retries on connection errors, timeouts, 408, 429 and 502/503/504.

    The wait before retry `n` (0-based) is the server's `Retry-After` when it sent one above
    0 (at most `max_retry_after`) plus up to a quarter of it at random (so at most 1.25 times
    `max_retry_after`), so that the workers of a trainer refused together do not come back
    together; else a full-jitter exponential backoff: uniform in [0, min(max_backoff,
    backoff * 2**n)], also where `max_retry_after` is 0 (the server's word ignored). Labeling
    is idempotent and cached server-side, so a retried request is safe.
    `Retry(max_retries=0)` turns retries off. With `max_elapsed`, no retry starts later than
    that many seconds after the request's first try (the last wait is cut short to it).
    Once a request has used up its retries on an outage (no answer, or 408, 502, 503, 504
    about no item; not a busy server's 429), the other requests of the same call get one try
    at such an error (a 429 keeps its retries) until one is answered: with on_error="none",
    a call waits out an outage about as long as one request, not once per batch.
    """

    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0
    max_retry_after: float = 60.0
    max_elapsed: float | None = None

    def __post_init__(self) -> None:
        bounds = (self.max_retries, self.backoff, self.max_backoff, self.max_retry_after, self.max_elapsed or 0)
        if min(bounds) < 0:
            raise ValueError("retry settings must not be negative")

    def cap(self, attempt: int) -> float:
        """The upper bound of the jittered wait before retry `attempt`."""
        return min(self.max_backoff, self.backoff * 2 ** min(attempt, 62))

    def delay(self, attempt: int, retry_after: float | None = None, *, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number `attempt` (0-based). A `retry_after` of 0 (a
        proxy's "Retry-After: 0", or a date already past) falls back to the backoff, so that
        the workers it refused do not all come back at once."""
        if retry_after and self.max_retry_after:
            wait = min(retry_after, self.max_retry_after)
            return wait + (rng or random).uniform(0, wait / 4)  # Retry-After is the least to wait
        return (rng or random).uniform(0, self.cap(attempt))


# What the training adapters do with a response over the server's length limits: fail the
# call, or give it the lowest reward.
Overlong = Literal["raise", "lowest"]


def check_overlong(overlong: str) -> Overlong:
    """`overlong` when it is one of the choices (checked as a reward function is built)."""
    if overlong not in get_args(Overlong):
        raise ValueError(f'overlong must be "raise" or "lowest", not {overlong!r}')
    return overlong  # type: ignore[return-value]


# The policy of the clients the training adapters build (TRL, verl): a labeler that restarts
# (a new image, a lost node: a minute or more for a large model) is waited for, up to ten
# minutes, rather than ending a run of hours at its first seconds of outage.
TRAINING_RETRY = Retry(max_retries=1000, backoff=1.0, max_backoff=15.0, max_elapsed=600.0)


def resolve_url(base_url: str | None) -> str:
    """The service's base URL: `base_url`, else $LABELER_URL, else the default (blank ones
    skipped); "http://" where it names no scheme. ValueError where it names no host."""
    given = (base_url or "").strip() or os.environ.get(ENV_URL, "").strip()
    url = given or DEFAULT_URL
    if "://" not in url:
        if re.match(r"(?i)https?:", url):  # "https:/host": not a host named "https"
            raise ValueError(f"labeler URL {shown_url(url)!r} is malformed: write it as scheme://host[:port]")
        url = "http://" + url
    if not urlsplit(url).hostname:
        raise ValueError(f"labeler URL {shown_url(url)!r} names no host")
    return url.rstrip("/")


# The credentials in a URL ("user:password@"), also in one malformed otherwise.
_USERINFO = re.compile(r"([^/:@]*):[^/@]*@")


def shown_url(url: str | None) -> str | None:
    """`url` as messages and reprs show it: a password in it (an API key given in the URL's
    credentials) masked, so that a traceback or a log of the client does not carry the key."""
    return _USERINFO.sub(r"\1:***@", url, count=1) if url else url


def resolve_key(api_key: str | None) -> str | None:
    """The API key: `api_key`, else $LABELER_API_KEY, stripped (a key read from a file or a
    secret keeps its newline); None where neither gives one. ValueError for a key that no
    header may hold (a line break or another control character inside it, or a character
    other than ASCII)."""
    key = (api_key or os.environ.get(ENV_API_KEY) or "").strip() or None
    if key is not None and re.search(r"[\x00-\x1f\x7f]", key):
        raise ValueError("the API key holds a line break or another control character (two keys in one file?)")
    if key is not None and not key.isascii():
        raise ValueError("the API key holds characters other than ASCII, which no HTTP header carries")
    return key


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # asctime's form, or "-0000": HTTP dates are in GMT all the same
            when = when.replace(tzinfo=timezone.utc)  # noqa: UP017 - datetime.UTC is 3.11's; this package runs on 3.10
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
