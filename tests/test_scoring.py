"""Exact unit tests of the labeling math (no model)."""

from __future__ import annotations

import math

import pytest

from labeler import scoring
from labeler.errors import EngineError, InvalidInput, ModelOutputError
from labeler.scoring import LabelQuery

# Token ids as SmolLM2 has them: "0" is 32, "1" is 33, ..., "9" is 41; "10" is "1","0".
SCORE_TOKENS = {str(i): (32 + i,) for i in range(1, 10)} | {"10": (33, 32)}


def test_queries_for_score_labels_are_one_read_plus_one_extension():
    qs = scoring.label_queries(SCORE_TOKENS)
    assert qs == (LabelQuery((), tuple(range(33, 42))), LabelQuery((33,), (32,)))


def test_prefix_label_probability_excludes_continuation():
    lp = {(): {t: math.log(0.05) for t in range(33, 42)}, (33,): {32: math.log(0.3)}}
    lp[()][33] = math.log(0.4)  # "1" (or the start of "10")
    d = scoring.label_distribution(SCORE_TOKENS, lp)
    raw = {"1": 0.4 * 0.7, "10": 0.4 * 0.3} | {str(i): 0.05 for i in range(2, 10)}
    total = sum(raw.values())
    assert d.mass == pytest.approx(total)
    for k, v in raw.items():
        assert d.probs[k] == pytest.approx(v / total, abs=1e-12)
    assert sum(d.probs.values()) == pytest.approx(1.0)


def test_multi_token_labels_and_shared_prefix():
    labels = {"a": (1,), "ab": (1, 2), "ac": (1, 3), "xyz": (7, 8, 9)}
    qs = scoring.label_queries(labels)
    assert qs == (
        LabelQuery((), (1, 7)),
        LabelQuery((1,), (2, 3)),
        LabelQuery((7,), (8,)),
        LabelQuery((7, 8), (9,)),
    )
    lp = {
        (): {1: math.log(0.5), 7: math.log(0.2)},
        (1,): {2: math.log(0.1), 3: math.log(0.3)},
        (7,): {8: math.log(0.5)},
        (7, 8): {9: math.log(0.5)},
    }
    d = scoring.label_distribution(labels, lp)
    raw = {"a": 0.5 * (1 - 0.4), "ab": 0.05, "ac": 0.15, "xyz": 0.05}
    total = sum(raw.values())
    assert d.probs == pytest.approx({k: v / total for k, v in raw.items()}, abs=1e-12)


@pytest.mark.parametrize(
    "labels",
    [{"a": (1,)}, {"a": (1,), "b": ()}, {"a": (1, 2), "b": (1, 2)}],
    ids=["one-label", "empty-label", "same-tokens"],
)
def test_bad_label_sets_are_refused(labels):
    with pytest.raises(InvalidInput):
        scoring.label_queries(labels)


def test_zero_mass_is_an_error_not_a_nan():
    with pytest.raises(ModelOutputError, match="zero probability"):
        scoring.label_distribution({"1": (1,), "2": (2,)}, {(): {1: -math.inf, 2: -math.inf}})


def test_labels_of_tiny_probability_still_give_their_distribution():
    """Log-probs far below exp()'s range (a model sure of a token that is no label): the
    distribution among the labels is still exact, and only the mass reads 0."""
    d = scoring.label_distribution({"1": (1,), "2": (2,)}, {(): {1: -800.0, 2: -801.0}})
    assert d.probs["1"] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12) and d.mass == 0.0
    d = scoring.label_distribution(SCORE_TOKENS, {(): {t: -900.0 for t in range(33, 42)}, (33,): {32: math.log(0.5)}})
    assert d.probs["1"] == pytest.approx(d.probs["10"]) == pytest.approx(d.probs["2"] / 2, abs=1e-12)
    with pytest.raises(ModelOutputError, match="zero probability"):
        scoring.label_distribution({"1": (1,), "2": (2,)}, {(): {1: math.nan, 2: -1.0}})


def test_missing_engine_answer_is_named():
    with pytest.raises(EngineError, match=r"lacks log p\(2 \| prefix \(\)\)"):
        scoring.label_distribution({"1": (1,), "2": (2,)}, {(): {1: -1.0}})


def test_both_orders_average_and_consistency():
    p = scoring.combine_orders(0.8, 0.6)
    assert (p.p_a, p.p_b, p.consistent) == (pytest.approx(0.7), pytest.approx(0.3), True)
    # A weak labeler that always says "1": the orders disagree and cancel out.
    p = scoring.combine_orders(0.9, 0.1)
    assert p.p_a == pytest.approx(0.5) and p.consistent is False
    assert scoring.combine_orders(0.5, 0.9).consistent is False  # a tie picks no winner
    one = scoring.combine_orders(None, 0.25)
    assert (one.p_a, one.p_b, one.p_a_ab, one.consistent) == (0.25, 0.75, None, None)
    with pytest.raises(InvalidInput):
        scoring.combine_orders(None, None)
    with pytest.raises(InvalidInput):
        scoring.combine_orders(1.2, 0.5)


def test_reward_mapping_endpoints_and_midpoint():
    assert scoring.score_to_reward(1.0) == -1.0
    assert scoring.score_to_reward(10.0) == 1.0
    assert scoring.score_to_reward(5.5) == 0.0
    assert scoring.score_to_reward(7.75) == pytest.approx(0.5)
    with pytest.raises(InvalidInput):
        scoring.score_to_reward(11.0)


def test_expected_score():
    dist = {k: 0.0 for k in scoring.SCORE_LABELS}
    dist["3"], dist["10"] = 0.5, 0.5
    assert scoring.expected_score(dist) == pytest.approx(6.5)
    with pytest.raises(InvalidInput):
        scoring.expected_score({"1": 1.0})


def test_self_consistency_is_the_elementwise_mean():
    avg = scoring.average([{"1": 0.9, "2": 0.1}, {"1": 0.3, "2": 0.7}, {"1": 0.6, "2": 0.4}])
    assert avg == pytest.approx({"1": 0.6, "2": 0.4})
    with pytest.raises(InvalidInput):
        scoring.average([{"1": 1.0}, {"2": 1.0}])
    with pytest.raises(InvalidInput):
        scoring.average([])
