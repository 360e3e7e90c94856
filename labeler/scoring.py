"""The labeling math, as pure functions.

Labels are strings ("1", "2", ..., "10") that the labeler model may answer with. A label
is a sequence of tokens, and one label may be a prefix of another: SmolLM2 and Qwen
tokenize "10" as "1", "0". The probability of a label is therefore defined as

    P(label) = p(label's tokens | prompt) * (1 - sum_t p(t | prompt + label))

where t runs over the distinct next tokens that lead from this label into a longer
label. So P("1") = p("1") * (1 - p("0" | "1")) when "10" is also a label. The labels'
probabilities are then normalized to sum to 1 (the mass the model puts outside the
label set is reported, not kept).

Everything the engine must read is a *query*: a prefix of label tokens (after the
prompt) and the set of next tokens whose log-probabilities are wanted there. The empty
prefix is read from the prompt's own last position; every other prefix costs one short
extra step that reuses the prompt's KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import EngineError, InvalidInput, ModelOutputError

TokenIds = tuple[int, ...]

PAIRWISE_LABELS: tuple[str, ...] = ("1", "2")
SCORE_LABELS: tuple[str, ...] = tuple(str(i) for i in range(1, 11))
# Yes/no judgments: each answer in both capitalizations, read as the model writes it right
# after the answer prefix "Answer:" (with the space: " Yes" is one token in SmolLM2, Llama 3
# and Qwen vocabularies; see `judgment_label_text`). P(yes) = P("Yes") + P("yes").
JUDGMENT_YES: tuple[str, ...] = ("Yes", "yes")
JUDGMENT_NO: tuple[str, ...] = ("No", "no")
JUDGMENT_LABELS: tuple[str, ...] = JUDGMENT_YES + JUDGMENT_NO
SCORE_MIN, SCORE_MAX = 1, 10


@dataclass(frozen=True)
class LabelQuery:
    """Read log p(t | prompt + prefix) for every t in `next_tokens`."""

    prefix: TokenIds
    next_tokens: TokenIds


@dataclass(frozen=True)
class LabelDistribution:
    """A normalized distribution over labels, with the raw mass it was normalized from."""

    probs: dict[str, float]
    mass: float  # sum of unnormalized label probabilities, in [0, 1]


def label_queries(labels: Mapping[str, Sequence[int]]) -> tuple[LabelQuery, ...]:
    """The queries needed to compute every label's exact probability.

    For each label of tokens (t1..tk): p(t_i | t1..t_{i-1}) for i = 1..k, and, when a
    longer label extends it, p(t | t1..tk) for each token t that continues into one.
    Queries sharing a prefix are merged, so labels "1".."9","10" need two queries: the
    empty prefix (tokens "1".."9") and the prefix "1" (token "0").
    """
    seqs = _validate_labels(labels)
    wanted: dict[TokenIds, set[int]] = {}
    for seq in seqs.values():
        for i, tok in enumerate(seq):
            wanted.setdefault(seq[:i], set()).add(tok)
    ordered = sorted(wanted.items(), key=lambda kv: (len(kv[0]), kv[0]))
    return tuple(LabelQuery(prefix, tuple(sorted(toks))) for prefix, toks in ordered)


def label_distribution(
    labels: Mapping[str, Sequence[int]],
    logprobs: Mapping[TokenIds, Mapping[int, float]],
) -> LabelDistribution:
    """Exact label probabilities from the engine's answers to `label_queries(labels)`.

    `logprobs[prefix][t]` is log p(t | prompt + prefix). Returns the normalized
    distribution and the unnormalized mass. Normalizes in log space, so labels of tiny
    probability (log-probs of -800) still give their distribution; the mass then reads 0.
    Raises ModelOutputError if no label has any probability (every label's log-prob -inf)
    or a log-prob is NaN, and EngineError if the answer lacks a log-prob that the queries
    asked for.
    """
    seqs = _validate_labels(labels)
    logs: dict[str, float] = {}
    for label, seq in seqs.items():
        lp = 0.0
        for i, tok in enumerate(seq):
            lp += _lookup(logprobs, seq[:i], tok)
        # Probability of going on from this label into a longer one.
        onward = {other[len(seq)] for other in seqs.values() if len(other) > len(seq) and other[: len(seq)] == seq}
        cont = sum(math.exp(_lookup(logprobs, seq, t)) for t in onward)
        if math.isnan(lp) or math.isnan(cont):
            raise ModelOutputError("the model put zero probability on every label")
        logs[label] = lp + math.log1p(-cont) if cont < 1.0 else -math.inf
    top = max(logs.values())
    if top == -math.inf:
        raise ModelOutputError("the model put zero probability on every label")
    scaled = {k: math.exp(v - top) for k, v in logs.items()}
    total = sum(scaled.values())
    return LabelDistribution({k: v / total for k, v in scaled.items()}, min(math.exp(top) * total, 1.0))


def _lookup(logprobs: Mapping[TokenIds, Mapping[int, float]], prefix: TokenIds, tok: int) -> float:
    try:
        return float(logprobs[prefix][tok])
    except (KeyError, TypeError) as exc:
        raise EngineError(f"the engine's answer lacks log p({tok} | prefix {prefix})") from exc


def _validate_labels(labels: Mapping[str, Sequence[int]]) -> dict[str, TokenIds]:
    if len(labels) < 2:
        raise InvalidInput("a label set needs at least two labels")
    seqs = {label: tuple(int(t) for t in seq) for label, seq in labels.items()}
    seen: dict[TokenIds, str] = {}
    for label, seq in seqs.items():
        if not seq:
            raise InvalidInput(f"label {label!r} tokenizes to no tokens")
        if seq in seen:
            raise InvalidInput(f"labels {seen[seq]!r} and {label!r} tokenize identically")
        seen[seq] = label
    return seqs


def average(dists: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Element-wise mean of distributions over the same labels (self-consistency)."""
    if not dists:
        raise InvalidInput("nothing to average")
    keys = list(dists[0])
    if any(set(d) != set(keys) for d in dists):
        raise InvalidInput("distributions over different labels cannot be averaged")
    return {k: sum(d[k] for d in dists) / len(dists) for k in keys}


@dataclass(frozen=True)
class Preference:
    """P(response A is preferred), combined over the orders that were read."""

    p_a: float
    p_b: float
    p_a_ab: float | None  # read from order (A, B): P(label "1")
    p_a_ba: float | None  # read from order (B, A): P(label "2")
    consistent: bool | None  # both orders pick the same winner; None with one order


def combine_orders(p_a_ab: float | None, p_a_ba: float | None) -> Preference:
    """Combine per-order probabilities that A is preferred.

    With both orders, p_a = (p_a_ab + p_a_ba) / 2, which cancels a constant position
    bias. The orders are `consistent` when both put A on the same side of 1/2 (a tie at
    exactly 1/2 in either order is not consistent: it picks no winner).
    """
    if p_a_ab is None and p_a_ba is None:
        raise InvalidInput("at least one order is needed")
    for name, p in (("p_a_ab", p_a_ab), ("p_a_ba", p_a_ba)):
        if p is not None and not 0.0 <= p <= 1.0:
            raise InvalidInput(f"{name}={p} is not a probability")
    if p_a_ab is not None and p_a_ba is not None:
        p_a = (p_a_ab + p_a_ba) / 2.0
        consistent = (p_a_ab > 0.5 and p_a_ba > 0.5) or (p_a_ab < 0.5 and p_a_ba < 0.5)
    else:
        p_a = p_a_ab if p_a_ab is not None else p_a_ba
        consistent = None
    return Preference(p_a=p_a, p_b=1.0 - p_a, p_a_ab=p_a_ab, p_a_ba=p_a_ba, consistent=consistent)


def expected_score(dist: Mapping[str, float]) -> float:
    """Expected score s = sum_k k * P(k) over the labels "1".."10" (in [1, 10])."""
    if set(dist) != set(SCORE_LABELS):
        raise InvalidInput(f"a score distribution needs exactly the labels {', '.join(SCORE_LABELS)}")
    total = sum(dist.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise InvalidInput(f"score distribution sums to {total}, not 1")
    return sum(int(k) * p for k, p in dist.items())


def score_to_reward(s: float) -> float:
    """Map an expected score s in [1, 10] linearly to a reward in [-1, 1]: (s - 5.5) / 4.5."""
    if not SCORE_MIN - 1e-9 <= s <= SCORE_MAX + 1e-9:
        raise InvalidInput(f"expected score {s} is outside [{SCORE_MIN}, {SCORE_MAX}]")
    return max(-1.0, min(1.0, (s - 5.5) / 4.5))


def judgment_label_text(answer_prefix: str, label: str) -> str:
    """The text of a yes/no label as it follows `answer_prefix`: " Yes" after "Answer:",
    "Yes" after a prefix that already ends in whitespace.

    BPE vocabularies attach the space to the word (SmolLM2: "Answer: Yes" is "Answer", ":",
    " Yes"), so a prompt ending in "Answer:" is read at the token the model would write
    next. After "Answer: " the model would have to produce "Yes" without its space, a
    tokenization it rarely saw, and such labels get a small, erratic share of its
    probability (tests/test_judgments.py checks this on the embedded model)."""
    return label if answer_prefix[-1:].isspace() else " " + label


def judgment_probabilities(dist: Mapping[str, float]) -> tuple[float, float]:
    """(P(yes), P(no)) from a distribution over `JUDGMENT_LABELS`: each answer's spellings
    summed (labels a tokenizer cannot tell apart appear once)."""
    p_yes = sum(dist.get(label, 0.0) for label in JUDGMENT_YES)
    p_no = sum(dist.get(label, 0.0) for label in JUDGMENT_NO)
    return p_yes, p_no


def reference_reward(p_win: float) -> float:
    """Pairwise reward against a reference response: 2 P(response > reference) - 1, in [-1, 1]
    (0 when the labeler cannot tell them apart)."""
    if not 0.0 <= p_win <= 1.0:
        raise InvalidInput(f"p_win={p_win} is not a probability")
    return 2.0 * p_win - 1.0


@dataclass(frozen=True)
class GroupRewardMath:
    """Per-completion rewards of one group, from its ordered comparisons (see `group_rewards`)."""

    p_win: list[list[float | None]]  # P(i > j) from both orders; None on the diagonal
    win_rate: list[float]  # w_i = mean over j != i of P(i > j)
    rewards: list[float]  # r_i = 2 w_i - 1; they sum to 0


def group_rewards(first_wins: Sequence[Sequence[float]]) -> GroupRewardMath:
    """Group-relative rewards from every ordered comparison of N completions of one prompt.

    `first_wins[i][j]` (i != j) is q_ij = P(label "1") when completion i is shown first and j
    second; the diagonal is ignored. Both orders of a pair are combined as for a single pair:

        P(i > j) = (q_ij + (1 - q_ji)) / 2,   so  P(i > j) + P(j > i) = 1,

    and each completion gets its centred mean win probability:

        w_i = 1/(N-1) * sum_{j != i} P(i > j),     r_i = 2 w_i - 1 = mean_{j != i} (2 P(i > j) - 1).

    r_i is the mean of the reference rewards of i against each other completion taken as the
    reference, lies in [-1, 1], and the r_i sum to exactly 0 (the w_i average 1/2). When the
    preferences follow a Bradley-Terry model, P(i > j) = sigmoid(s_i - s_j), w_i increases
    with s_i, so the ranking is Bradley-Terry's; unlike fitted strengths it is bounded, needs
    no iterative fit and stays finite when one completion wins every comparison.
    """
    n = len(first_wins)
    if n < 2:
        raise InvalidInput("a group needs at least two completions")
    if any(len(row) != n for row in first_wins):
        raise InvalidInput("first_wins must be an N x N matrix")
    for i in range(n):
        for j in range(n):
            if i != j and not 0.0 <= first_wins[i][j] <= 1.0:
                raise InvalidInput(f"first_wins[{i}][{j}]={first_wins[i][j]} is not a probability")
    p: list[list[float | None]] = [[None] * n for _ in range(n)]
    win = []
    for i in range(n):
        for j in range(n):
            if i != j:
                p[i][j] = (first_wins[i][j] + 1.0 - first_wins[j][i]) / 2.0
        win.append(sum((first_wins[i][j] + 1.0 - first_wins[j][i]) / 2.0 for j in range(n) if j != i) / (n - 1))
    return GroupRewardMath(p_win=p, win_rate=win, rewards=[2.0 * w - 1.0 for w in win])
