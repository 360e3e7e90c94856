"""Property tests of the scoring math (hypothesis): invariants that must hold for any input.

`EXAMPLES` per property: 300 in the default run, 5,000 under LABELER_RELIABILITY=full.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from labeler import scoring
from tests.fixtures.reliability import scale

pytestmark = pytest.mark.reliability

probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
logp = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
EXAMPLES = scale(ci=300, full=5000)
SCORE_TOKENS = {str(i): (32 + i,) for i in range(1, 10)} | {"10": (33, 32)}


@st.composite
def score_logprobs(draw):
    """Engine answers for labels 1..10 that form a valid next-token distribution."""
    first = draw(st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=10, max_size=10))
    total = sum(first)  # the 10th weight is the mass outside the labels
    lp = {(): {32 + i: math.log(first[i - 1] / total) for i in range(1, 10)}}
    lp[(33,)] = {32: math.log(draw(st.floats(min_value=1e-9, max_value=1.0 - 1e-9)))}
    return lp


@settings(max_examples=EXAMPLES, deadline=None)
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


@settings(max_examples=EXAMPLES, deadline=None)
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


@settings(max_examples=EXAMPLES, deadline=None)
@given(score_dists())
def test_rewards_stay_in_range(dist):
    s = scoring.expected_score(dist)
    assert 1.0 - 1e-9 <= s <= 10.0 + 1e-9
    r = scoring.score_to_reward(s)
    assert -1.0 <= r <= 1.0


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    score_dists(),
    st.integers(min_value=1, max_value=9),
    st.integers(min_value=1, max_value=9),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_reward_is_monotone_in_the_score_distribution(dist, k, step, share):
    """Moving probability mass from score k to any higher score never lowers the reward."""
    moved = dist[str(k)] * share
    higher = dict(dist)
    higher[str(k)] -= moved
    higher[str(min(10, k + step))] += moved
    assert (
        scoring.score_to_reward(scoring.expected_score(higher))
        >= scoring.score_to_reward(scoring.expected_score(dist)) - 1e-12
    )


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(score_dists(), min_size=1, max_size=6))
def test_self_consistency_mean_is_a_distribution_and_between_extremes(dists):
    avg = scoring.average(dists)
    assert sum(avg.values()) == pytest.approx(1.0, abs=1e-9)
    for k in avg:
        assert min(d[k] for d in dists) - 1e-12 <= avg[k] <= max(d[k] for d in dists) + 1e-12


PAIR_TOKENS = {"1": (33,), "2": (34,)}


@st.composite
def pair_logprobs(draw):
    """One order's engine answer for the labels "1"/"2": any log-probs whose mass is <= 1."""
    p1, p2 = draw(st.floats(min_value=1e-12, max_value=1.0)), draw(st.floats(min_value=1e-12, max_value=1.0))
    scale_ = max(1.0, p1 + p2)
    return {(): {33: math.log(p1 / scale_), 34: math.log(p2 / scale_)}}


@settings(max_examples=EXAMPLES, deadline=None)
@given(pair_logprobs(), pair_logprobs())
def test_swap_symmetry_through_the_whole_pairwise_pipeline(ab, ba):
    """From the engine's log-probs to p_a: showing B first where A was (the two reads trade
    places) gives p_a' = 1 - p_a, and each order's distribution sums to 1."""
    d_ab, d_ba = scoring.label_distribution(PAIR_TOKENS, ab), scoring.label_distribution(PAIR_TOKENS, ba)
    assert sum(d_ab.probs.values()) == pytest.approx(1.0, abs=1e-12)
    pref = scoring.combine_orders(d_ab.probs["1"], d_ba.probs["2"])
    swapped = scoring.combine_orders(d_ba.probs["1"], d_ab.probs["2"])  # A and B exchanged
    assert swapped.p_a == pytest.approx(1 - pref.p_a, abs=1e-12)
    if min(abs(d_ab.probs["1"] - 0.5), abs(d_ba.probs["2"] - 0.5)) > 1e-9:  # a tie at 1/2 is rounding's call
        assert swapped.consistent == pref.consistent


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.floats(min_value=-1e4, max_value=0.0), min_size=10, max_size=10))
def test_extreme_log_probs_give_a_distribution(lps):
    """Log-probs down to -1e4 (exp underflows to 0 below about -745): normalized in log
    space, they still give a distribution summing to 1 with no NaN; only the mass may read 0.
    Finite log-probs always leave some label its probability (no ModelOutputError)."""
    lp = {(): {32 + i: lps[i - 1] for i in range(1, 10)}, (33,): {32: lps[9]}}
    d = scoring.label_distribution(SCORE_TOKENS, lp)
    assert not any(math.isnan(p) for p in d.probs.values()) and 0.0 <= d.mass <= 1.0
    assert sum(d.probs.values()) == pytest.approx(1.0, abs=1e-9)
    r = scoring.score_to_reward(scoring.expected_score(d.probs))
    assert -1.0 <= r <= 1.0


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.floats(min_value=1.0, max_value=10.0), st.floats(min_value=1.0, max_value=10.0))
def test_reward_is_increasing_in_the_expected_score(s1, s2):
    assume(s1 < s2)
    r1, r2 = scoring.score_to_reward(s1), scoring.score_to_reward(s2)
    assert r1 <= r2 and (r1 < r2 or s2 - s1 < 1e-12)  # strictly, up to float rounding
