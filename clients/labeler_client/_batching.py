"""Splitting large inputs into server-sized batches and putting the answers back in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx

from . import _exceptions as exc

T = TypeVar("T")


def split(n: int, size: int) -> list[range]:
    """Index ranges of at most `size` items covering 0..n-1 in order."""
    if size < 1:
        raise ValueError("batch size must be at least 1")
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def parts(idx: range, item: int | None = None) -> list[range]:
    """A failed batch cut to isolate the item the error is about: the items before `item`
    (the caller's index the server named), `item` alone, the items after it; two halves when
    the server named none."""
    if item is None or item not in idx:
        mid = len(idx) // 2
        return [idx[:mid], idx[mid:]]
    k = item - idx.start
    return [part for part in (idx[:k], idx[k : k + 1], idx[k + 1 :]) if part]


def place(out: list[Any], idx: range, payload: Any, parse: Callable[[Any], T], request: httpx.Request) -> None:
    """Write the parsed results of one batch into `out` at the batch's positions. A reply
    that is not one result per item raises: a missing result is never papered over."""
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list) or len(results) != len(idx):
        got = len(results) if isinstance(results, list) else "no"
        raise exc.ResponseError(f"expected {len(idx)} results, got {got}", request=request)
    try:
        parsed = [parse(r) for r in results]
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise exc.ResponseError(f"malformed result: {e}", request=request) from e
    for i, value in zip(idx, parsed, strict=True):
        out[i] = value


def select(items: Sequence[Any], idx: range) -> list[dict[str, Any]]:
    """The items of one batch, as plain dicts for the JSON body."""
    return [dict(items[i]) for i in idx]
