"""Property tests of the scoring math (hypothesis): invariants that must hold for any input."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from labeler import scoring

probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
logp = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
SCORE_TOKENS = {str(i): (32 + i,) for i in range(1, 10)} | {"10": (33, 32)}


@st.composite
def score_logprobs(draw):
    """Engine answers for labels 1..10 that form a valid next-token distribution."""
    first = draw(st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=10, max_size=10))
    total = sum(first)  # the 10th weight is the mass outside the labels
    lp = {(): {32 + i: math.log(first[i - 1] / total) for i in range(1, 10)}}
    lp[(33,)] = {32: math.log(draw(st.floats(min_value=1e-9, max_value=1.0 - 1e-9)))}
    return lp


@settings(max_examples=300, deadline=None)
@given(score_logprobs())
def test_label_distribution_sums_to_one_and_mass_is_a_probability(lp):
    d = scoring.label_distribution(SCORE_TOKENS, lp)
    assert sum(d.probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= p <= 1.0 for p in d.probs.values())
    assert 0.0 < d.mass <= 1.0
    # "1" and "10" split p("1") between them, in the ratio (1 - p0) : p0.
    p1 = math.exp(lp[()][33])
    p0 = math.exp(lp[(33,)][32])
    assert d.probs["1"] * d.mass == pytest.approx(p1 * (1 - p0), rel=1e-6, abs=1e-12)
    assert d.probs["10"] * d.mass == pytest.approx(p1 * p0, rel=1e-6, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(probs, probs)
def test_swap_symmetry(p_ab, p_ba):
    """Swapping A and B maps P_ab(1) -> 1 - P_ba(2)... i.e. (p_ab, p_ba) -> (1 - p_ba, 1 - p_ab)."""
    ab = scoring.combine_orders(p_ab, p_ba)
    ba = scoring.combine_orders(1 - p_ba, 1 - p_ab)
    assert ab.p_a == pytest.approx(ba.p_b, abs=1e-12)
    assert ab.consistent == ba.consistent
    assert ab.p_a + ab.p_b == pytest.approx(1.0, abs=1e-12)
    assert min(p_ab, p_ba) - 1e-12 <= ab.p_a <= max(p_ab, p_ba) + 1e-12


@st.composite
def score_dists(draw):
    w = draw(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=10, max_size=10))
    assume(sum(w) > 1e-6)
    return {str(i + 1): x / sum(w) for i, x in enumerate(w)}


@settings(max_examples=300, deadline=None)
@given(score_dists())
def test_rewards_stay_in_range(dist):
    s = scoring.expected_score(dist)
    assert 1.0 - 1e-9 <= s <= 10.0 + 1e-9
    r = scoring.score_to_reward(s)
    assert -1.0 <= r <= 1.0


@settings(max_examples=300, deadline=None)
@given(score_dists(), st.integers(min_value=1, max_value=9), st.floats(min_value=0.0, max_value=1.0))
def test_reward_is_monotone_in_the_score_distribution(dist, k, share):
    """Moving probability mass from score k to any higher score never lowers the reward."""
    moved = dist[str(k)] * share
    higher = dict(dist)
    higher[str(k)] -= moved
    higher[str(k + 1)] += moved
    assert (
        scoring.score_to_reward(scoring.expected_score(higher))
        >= scoring.score_to_reward(scoring.expected_score(dist)) - 1e-12
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(score_dists(), min_size=1, max_size=6))
def test_self_consistency_mean_is_a_distribution_and_between_extremes(dists):
    avg = scoring.average(dists)
    assert sum(avg.values()) == pytest.approx(1.0, abs=1e-9)
    for k in avg:
        assert min(d[k] for d in dists) - 1e-12 <= avg[k] <= max(d[k] for d in dists) + 1e-12
