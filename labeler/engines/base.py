"""The engine protocol: what the labeler needs from a model host.

Two operations, both async and batched so they fit vLLM's AsyncLLM as well as a local
transformers model:

- `score(requests)`: for each prompt (token ids), the log-probabilities of given next
  tokens after given short prefixes (see `labeler.scoring.label_queries`);
- `generate(requests)`: bounded continuations (rationales for chain-of-thought).

Beside them, `failure`: why the engine can serve nothing any more until its process
restarts (vLLM's engine process died), else None; the service's health checks read it.
Engines work on token ids; the labeler renders and tokenizes with `engine.tokenizer`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import InputTooLong, InvalidInput
from ..scoring import LabelQuery, TokenIds

# For one prompt: prefix (label tokens after the prompt) -> {token id: log-prob}.
Logprobs = dict[TokenIds, dict[int, float]]


@dataclass(frozen=True)
class ScoreRequest:
    """Read the log-probs that `queries` ask for, after `prompt_ids`. `site`: the `site` of
    the generation this prompt continues (a chain-of-thought rationale), if any."""

    prompt_ids: TokenIds
    queries: tuple[LabelQuery, ...]
    site: Any = field(default=None, compare=False)


# What every engine samples a rationale with: plain temperature sampling (greedy at
# temperature 0). The penalties and truncations are set to their neutral values, since a
# vLLM server fills any field a request leaves unset from the model's generation_config.json
# (Qwen2.5 ships repetition_penalty 1.05, top_p 0.8, top_k 20), and transformers from its
# own defaults (top_k 50; the model's config is replaced at load): the same request gives the
# same rationale on every engine.
PLAIN_SAMPLING: dict[str, float | int] = {"repetition_penalty": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


@dataclass(frozen=True)
class GenerateRequest:
    """Generate up to `max_tokens` after `prompt_ids`, `n` times.

    temperature 0 is greedy (then n must be 1); with temperature > 0 the draws are
    seeded by `seed` so the same request gives the same continuations.
    """

    prompt_ids: TokenIds
    max_tokens: int
    temperature: float = 0.0
    n: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """A continuation. `site`: where an engine with several servers ran it, so that the
    label read after it goes there too, where its prompt and its tokens are in the prefix
    cache (None for an engine with one place)."""

    token_ids: TokenIds
    text: str
    site: Any = field(default=None, compare=False)


@dataclass
class EngineStats:
    """Counters an engine keeps for metrics and benchmarks."""

    score_calls: int = 0
    generate_calls: int = 0
    prompts_scored: int = 0
    prompt_tokens: int = 0  # tokens in the prompts as given
    computed_tokens: int = 0  # tokens actually run through the model (after prefix reuse)
    generated_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """A model host the labeler can use."""

    model_id: str
    tokenizer: Any
    max_model_len: int
    stats: EngineStats

    @property
    def failure(self) -> str | None:
        """Why the engine can serve nothing any more until the process restarts (its vLLM
        engine process died), else None; an engine whose servers may come back has none."""
        ...

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Logprobs]:
        """Answer every request's queries, in request order."""
        ...

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        """`n` generations per request, in request order."""
        ...

    async def aclose(self) -> None:
        """Release the model."""
        ...


def check_score_requests(requests: Sequence[ScoreRequest], max_model_len: int) -> None:
    """Refuse reads that do not fit the model's context (an InputTooLong, not an engine crash).
    It names no field: the engine does not know which item a prompt is, and "items" would
    read as the request's item count."""
    for req in requests:
        longest = len(req.prompt_ids) + max((len(q.prefix) + 1 for q in req.queries), default=0)
        if longest > max_model_len:
            raise InputTooLong(
                f"prompt of {len(req.prompt_ids)} tokens exceeds the model's context of {max_model_len}",
                limit=max_model_len,
            )


def check_generate_requests(requests: Sequence[GenerateRequest], max_model_len: int) -> None:
    """Refuse generations that cannot be honoured as asked."""
    for req in requests:
        if req.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1", field="max_tokens")
        if req.n < 1:
            raise InvalidInput(f"n must be at least 1, got {req.n}", field="n")
        if not math.isfinite(req.temperature):  # NaN would be neither greedy nor sampled
            raise InvalidInput(f"temperature must be a finite number, got {req.temperature}", field="temperature")
        if req.temperature <= 0 and req.n != 1:
            raise InvalidInput("greedy generation gives one continuation; use temperature > 0 for n > 1")
        if len(req.prompt_ids) + req.max_tokens > max_model_len:
            raise InputTooLong(
                f"prompt of {len(req.prompt_ids)} tokens plus {req.max_tokens} new ones exceeds the "
                f"model's context of {max_model_len}",
                limit=max_model_len,
            )


async def chained_reads(
    requests: Sequence[ScoreRequest],
    read: Callable[[int, TokenIds, TokenIds], Awaitable[dict[int, float]]],
    stats: EngineStats,
) -> list[Logprobs]:
    """Answer every query with `read(r, prompt ids + prefix, next tokens)` (`r`: the index of
    its request), all reads of one prefix length at once, deeper prefixes after the reads
    they extend (so an engine with a prefix cache finds the prompt's KV there: one with
    several servers sends request `r`'s deeper reads where its first one went). For engines
    that take one read per request."""
    stats.score_calls += 1
    stats.prompts_scored += len(requests)
    stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
    out: list[Logprobs] = [{} for _ in requests]
    reads = [(r, q) for r, req in enumerate(requests) for q in req.queries]

    async def one(r: int, prefix: TokenIds, tokens: TokenIds) -> None:
        out[r][prefix] = await read(r, tuple(requests[r].prompt_ids) + tuple(prefix), tokens)

    for depth in sorted({len(q.prefix) for _, q in reads}):
        await gather_or_cancel([one(r, q.prefix, q.next_tokens) for r, q in reads if len(q.prefix) == depth])
    return out


T = TypeVar("T")


async def gather_or_cancel(calls: Sequence[Awaitable[T]]) -> list[T]:
    """`asyncio.gather` of one batch's engine calls that cancels the others when one fails:
    the batch fails as a whole, and the halves it is split into must not compete with
    leftovers of it for the engine."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")


def read_size(text: str) -> int:
    """A size as vLLM's command line reads it (`human_readable_int`): "8K" = 8192, "1G" = 2**30,
    "1g" = 10**9, "25.6k" = 25600, else a plain integer. ValueError for anything else, a decimal
    with a binary suffix ("1.5K") included. Written out here so that the engines that never
    import vLLM read sizes as it does."""
    text = text.strip()
    match = _SIZE.fullmatch(text)
    if match:
        number, suffix = match.groups()
        if suffix.islower():
            return int(float(number) * 1000 ** ("kmgt".index(suffix) + 1))
        if "." in number:
            raise ValueError(f"no decimals with a binary suffix: {text!r} (did you mean {number}{suffix.lower()}?)")
        return int(number) * 1024 ** ("KMGT".index(suffix) + 1)
    return int(text)


def int_option(engine: str, name: str, value: Any, *, least: int = 1, size: bool = False) -> int:
    """The engine option `name` as a whole number of at least `least`; text reads as a size
    (`read_size`) when `size`, else as a plain integer. InvalidInput naming the option otherwise:
    a value of the wrong type would otherwise fail every call of a server that started."""
    number = value
    if isinstance(value, str):
        try:
            number = read_size(value) if size else int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int):
        sizes = " (or a size such as 8K)" if size else ""
        raise InvalidInput(f"the {engine} engine's {name} must be a whole number{sizes}, got {value!r}", field=name)
    if number < least:
        raise InvalidInput(f"the {engine} engine's {name} must be at least {least}, got {value!r}", field=name)
    return number


def number_option(engine: str, name: str, value: Any, *, least: float = 0.0, strict: bool = False) -> float:
    """The engine option `name` as a number of at least `least` (above it with `strict`), as
    `int_option` does for whole numbers."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or number != number:  # NaN
        raise InvalidInput(f"the {engine} engine's {name} must be a number, got {value!r}", field=name)
    if number < least or (strict and number == least):
        bound = f"more than {least:g}" if strict else f"at least {least:g}"
        raise InvalidInput(f"the {engine} engine's {name} must be {bound}, got {value!r}", field=name)
    return float(number)


def finish_generation(token_ids: Iterable[int], eos: set[int], tokenizer: Any, stats: EngineStats) -> Generation:
    """A generation cut at its first end-of-sequence token and decoded the same way by
    every engine (so engines agree on rationale text)."""
    toks = tuple(itertools.takewhile(lambda t: t not in eos, token_ids))
    stats.generated_tokens += len(toks)
    return Generation(toks, tokenizer.decode(list(toks), skip_special_tokens=True))
