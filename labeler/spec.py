"""What determines a label: `LabelSpec`, and the one key every cache and resume file uses.

A label is a function of the model (its content fingerprint), the task (name and content
version), the kind of question, every parameter that changes a result, and the item. A
`LabelSpec` holds everything but the item, validates itself, and gives each item one key:

    spec = labeler.spec("pairwise", "summarize", order="both")
    spec.key(PairItem("post", "A", "B"))       # 64 hex digits

The service's cache key is `labeler:v<KEY_VERSION>:<key>`; `labeler label` / `eval` / `winrate` store the
same key in each output row to resume. Parameters that cannot change a result are
normalized away, so they do not split the cache: the seed and the sampling temperature count
only when rationales are sampled (`samples > 1`), the rationale length only with
chain-of-thought, the order only for pairwise questions and reference rewards (a group
reads both orders of every pair).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal

from .errors import InvalidInput

Kind = Literal["pairwise", "score", "judgment", "reference", "group"]
OrderArg = Literal["both", "ab", "ba"]
# pairwise: which of two responses; score: 1-10; judgment: yes/no about one response;
# reference: a pairwise reward against a reference response; group: group-relative rewards.
KINDS: tuple[str, ...] = ("pairwise", "score", "judgment", "reference", "group")
# The kinds whose reading order is a parameter (a group always reads both orders).
ORDERED_KINDS: tuple[str, ...] = ("pairwise", "reference")
ORDERS: tuple[str, ...] = ("both", "ab", "ba")

MAX_SAMPLES = 16
# Group-relative rewards compare every ordered pair: N (N - 1) prompts for a group of N.
MAX_GROUP_SIZE = 32
# A request's samples are drawn with engine seed `seed * MAX_SAMPLES` (see `LabelSpec.draw_seed`),
# and vLLM seeds sample i with that + i: neighbouring seeds never share a sample, and the
# last sample's seed still fits the signed 64-bit generator of torch and vLLM (a larger one
# would overflow inside the engine process and kill it).
MAX_SEED = 2**63 // MAX_SAMPLES - 1
# Bumped whenever the same spec and item would be computed differently (rationales included):
# tests/test_prompts.py holds the prompts and rationale cuts of fixed inputs to this version.
KEY_VERSION = 11

# One encoder, built once: json.dumps with options builds a new one per call.
_canonical = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode
# The string encoder `_canonical` uses (ensure_ascii=False).
_encode_str = json.encoder.encode_basestring


def _sha256(text: str) -> str:
    # surrogatepass: a lone surrogate in untrusted text still gets a key (the prompt cleans it).
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@functools.cache
def _field_getter(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    if not is_dataclass(cls):
        raise TypeError(
            f"a label key or digest is taken of an item (PairItem, ScoreItem, ReferenceItem, GroupItem), not of a "
            f"{cls.__name__}: build one from a mapping with e.g. ScoreItem(**mapping)"
        )
    names = [f.name for f in fields(cls)]
    if len(names) == 1:
        return lambda item: (getattr(item, names[0]),)
    return operator.attrgetter(*names)


def item_fields(item: Any) -> tuple[str, ...]:
    """An item's texts in field order (`PairItem`, `ScoreItem`, or any dataclass of strings
    and sequences of strings, such as `GroupItem`)."""
    # Runs for every item of every request, cache hits included: the field list is read once
    # per class.
    return _field_getter(type(item))(item)


def _canonical_fields(texts: tuple[Any, ...]) -> str:
    """`_canonical(texts)`; for a flat tuple of strings (every item kind but groups) built
    from the same string encoder without the generic encoder's per-call set-up."""
    try:
        return "[" + ",".join(map(_encode_str, texts)) + "]"
    except TypeError:  # a field that is not a string (a group's responses)
        return _canonical(texts)


def item_digest(item: Any) -> str:
    """A hash of an item's texts alone, independent of any spec (e.g. to seed a per-item coin)."""
    return _sha256(_canonical([type(item).__name__, item_fields(item)]))


@dataclass(frozen=True)
class LabelSpec:
    """Everything besides the item that a label depends on. Build it with `LabelSpec.build`
    (or `Labeler.spec`), which validates and normalizes the parameters."""

    kind: Kind
    task: str
    task_version: str
    model: str
    labels: tuple[str, ...]
    order: OrderArg | None = None
    cot: bool = False
    samples: int = 1
    seed: int | None = None
    temperature: float | None = None
    max_rationale_tokens: int | None = None
    # The end-of-turn markers stripped from the texts before they are read, where they are
    # not the library's own (`chat.END_MARKERS`): a server's `end_markers` setting labels the
    # same texts differently. None (the library's) adds nothing to a key.
    end_markers: tuple[str, ...] | None = None

    @classmethod
    def build(
        cls,
        kind: str,
        *,
        task: str,
        task_version: str,
        model: str,
        labels: tuple[str, ...],
        order: object = "both",
        cot: object = False,
        samples: object = 1,
        seed: object = 0,
        temperature: object = 0.7,
        max_rationale_tokens: object = 128,
        end_markers: object = None,
    ) -> LabelSpec:
        """A validated spec; raises InvalidInput naming the offending parameter."""
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}", field="kind")
        if kind in ORDERED_KINDS and order not in ORDERS:
            raise InvalidInput(f"order must be 'both', 'ab' or 'ba', got {order!r}", field="order")
        if not isinstance(cot, bool):
            raise InvalidInput("cot must be true or false", field="cot")
        if not _is_int(samples) or not 1 <= samples <= MAX_SAMPLES:
            raise InvalidInput(f"samples must be an integer from 1 to {MAX_SAMPLES}", field="samples")
        if samples > 1 and not cot:
            raise InvalidInput("samples > 1 (self-consistency) needs cot=true: it samples rationales", field="samples")
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise InvalidInput(f"seed must be an integer from 0 to {MAX_SEED}", field="seed")
        sampled = samples > 1
        if sampled and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise InvalidInput(f"temperature must be a positive number, got {temperature!r}", field="temperature")
        if cot and (not _is_int(max_rationale_tokens) or max_rationale_tokens < 1):
            raise InvalidInput("max_rationale_tokens must be a positive integer", field="max_rationale_tokens")
        if end_markers is not None:
            from .chat import END_MARKERS, _markers

            if not isinstance(end_markers, (list, tuple)) or not all(isinstance(m, str) for m in end_markers):
                raise InvalidInput("end_markers must be a list of texts", field="end_markers")
            end_markers = _markers(tuple(end_markers))  # as stripping reads them: an empty one strips nothing
            if end_markers == END_MARKERS:
                end_markers = None
        return cls(
            kind=kind,  # type: ignore[arg-type]
            task=task,
            task_version=task_version,
            model=model,
            labels=tuple(labels),
            order=order if kind in ORDERED_KINDS else None,  # type: ignore[arg-type]
            cot=cot,
            samples=samples,  # type: ignore[arg-type]
            seed=seed if sampled else None,  # type: ignore[arg-type]
            temperature=float(temperature) if sampled else None,  # type: ignore[arg-type]
            max_rationale_tokens=max_rationale_tokens if cot else None,  # type: ignore[arg-type]
            end_markers=end_markers,  # type: ignore[arg-type]
        )

    def key(self, item: Any) -> str:
        """The item's label key under this spec: SHA-256 (hex) over the spec and the item's texts."""
        return _item_key(_spec_hash(self), item)

    def keys(self, items: Any) -> list[str]:
        """`key` of each item, in order."""
        head = _spec_hash(self)
        return [_item_key(head, it) for it in items]

    def describe(self) -> dict[str, Any]:
        """The spec as plain data (what output rows record beside their key)."""
        return asdict(self)

    @property
    def draw_seed(self) -> int:
        """The engine seed of this spec's sampled rationales: `seed * MAX_SAMPLES`. vLLM draws
        sample i of a request with its seed + i, so seeds s and s + 1 passed on as they are
        would share all samples but one; spaced out, no two seeds share any."""
        return (self.seed or 0) * MAX_SAMPLES

    @property
    def params(self) -> dict[str, Any]:
        """The per-request parameters (order, cot, samples, seed) to pass on to a labeler call."""
        out: dict[str, Any] = {"cot": self.cot, "samples": self.samples, "seed": self.seed or 0}
        if self.kind in ORDERED_KINDS:
            out["order"] = self.order
        return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@functools.lru_cache(maxsize=1024)
def _spec_hash(spec: LabelSpec) -> Any:
    """SHA-256 state after the spec's part of every key, for each key to continue a copy of:
    a spec is built per request, and its canonical form is the costliest part of a cached one.
    Equal specs have equal fields (`build` checks their types), so they share one entry."""
    parts = {f.name: getattr(spec, f.name) for f in fields(spec)}
    if parts["end_markers"] is None:  # the library's own markers add nothing to a key
        del parts["end_markers"]
    head = _canonical({"v": KEY_VERSION, **parts})
    return hashlib.sha256(head.encode("utf-8", "surrogatepass"))


def _item_key(head: Any, item: Any) -> str:
    h = head.copy()
    # surrogatepass: a lone surrogate in untrusted text still gets a key (the prompt cleans it).
    h.update(_canonical_fields(item_fields(item)).encode("utf-8", "surrogatepass"))
    return h.hexdigest()
