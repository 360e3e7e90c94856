"""The evaluation metrics against hand-computed values (no model)."""

from __future__ import annotations

import math

import pytest

from labeler import evaluate as ev

# Four pairs: labeler P(A), human y (1 = human chose A), lengths of A and B in characters.
P = [0.9, 0.2, 0.5, 0.6]
Y = [1, 1, 0, 0]
LEN_A = [10, 3, 5, 5]
LEN_B = [2, 8, 5, 1]


def test_accuracy_counts_a_half_for_an_exact_tie():
    # outcomes o(p) = 1, 0, 1/2, 1; agreement with y = 1, 0, 1/2, 0
    assert ev.alignment(P, Y) == pytest.approx(1.5 / 4)
    assert ev.outcome(0.5) == 0.5 and ev.outcome(0.51) == 1.0 and ev.outcome(0.49) == 0.0


def test_brier():
    # (0.1^2 + 0.8^2 + 0.5^2 + 0.6^2) / 4
    assert ev.brier(P, Y) == pytest.approx((0.01 + 0.64 + 0.25 + 0.36) / 4)
    assert ev.brier([0.5, 0.5], [0, 1]) == pytest.approx(0.25)


def test_ece_and_bins():
    # 2 bins: [0, .5) holds p=.2 (y=1): |1 - .2| * 1/4 = .2
    #         [.5, 1] holds .9, .5, .6 (y=1,0,0): |1/3 - 2/3| * 3/4 = .25
    bins = ev.calibration_bins(P, Y, bins=2)
    assert [b["n"] for b in bins] == [1, 3]
    assert bins[1]["conf"] == pytest.approx(2.0 / 3) and bins[1]["acc"] == pytest.approx(1.0 / 3)
    assert ev.ece(P, Y, bins=2) == pytest.approx(0.45)
    # p = 1.0 falls in the last bin, not past it; empty bins add nothing
    assert ev.calibration_bins([1.0], [1], bins=10)[-1]["n"] == 1
    assert ev.ece([1.0, 0.0], [1, 0], bins=10) == pytest.approx(0.0)
    assert math.isnan(ev.calibration_bins([1.0], [1], bins=10)[0]["conf"])


def test_position_consistency():
    # agree, disagree, agree (both < .5), a 1/2 picks no winner -> 2/4
    assert ev.position_consistency([0.7, 0.6, 0.4, 0.5], [0.8, 0.3, 0.2, 0.9]) == pytest.approx(0.5)


def test_length_bias():
    # unequal pairs: 0 (A longer), 1 (B longer), 3 (A longer); pair 2 has equal lengths
    # labeler: o=1 (A, longer), o=0 (B, longer), o=1 (A, longer) -> 3/3
    # humans:  y=1 (longer),    y=1 (A, shorter), y=0 (B, shorter) -> 1/3
    got = ev.length_bias(LEN_A, LEN_B, P, Y)
    assert got["pairs"] == 3
    assert got["labeler_longer"] == pytest.approx(1.0)
    assert got["human_longer"] == pytest.approx(1 / 3)


def test_win_rate_ties_count_half():
    p_ab = [0.7, 0.6, 0.4, 0.5, None]
    p_ba = [0.8, 0.3, 0.2, 0.9, 0.3]
    # win, orders disagree (tie), loss, 1/2 in one order (tie), one order only: loss
    assert ev.win_outcomes(p_ab, p_ba) == [1.0, 0.5, 0.0, 0.5, 0.0]
    wr = ev.win_rate(p_ab, p_ba, [0.75, 0.45, 0.3, 0.7, 0.3])
    assert wr["win_rate"] == pytest.approx(2.0 / 5)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (1, 2, 2, 5)
    assert wr["soft_win_rate"] == pytest.approx((0.75 + 0.45 + 0.3 + 0.7 + 0.3) / 5)
    assert wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"]


def test_bootstrap_ci_is_seeded_and_matches_the_normal_approximation():
    values = [0.0, 1.0] * 100  # mean 1/2, standard error sqrt(.25 / 200) = .0354
    lo, hi = ev.bootstrap_ci(values, seed=0)
    assert (lo, hi) == ev.bootstrap_ci(values, seed=0)
    assert lo == pytest.approx(0.5 - 1.96 * 0.0354, abs=0.015) and hi == pytest.approx(0.5 + 1.96 * 0.0354, abs=0.015)
    assert ev.bootstrap_ci([0.7] * 5) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(x) for x in ev.bootstrap_ci([]))
    lo90, hi90 = ev.bootstrap_ci(values, level=0.9, seed=0)
    assert lo < lo90 < hi90 < hi


def test_evaluate_rows_per_order():
    # Human choice on A for rows 0-1, on B for rows 2-3.
    cols = ("human", "p_a_ab", "p_a_ba", "p_a", "consistent", "response_a", "response_b")
    rows = [
        dict(zip(cols, r, strict=True)) | {"context": f"prompt {k}"}
        for k, r in enumerate(
            [
                ("a", 0.8, 0.6, 0.7, True, "xx", "x"),
                ("a", 0.7, 0.3, 0.5, False, "x", "xx"),
                ("b", 0.6, 0.2, 0.4, False, "x", "x"),
                ("b", 0.9, 0.7, 0.8, True, "xx", "x"),
            ]
        )
    ]
    m = ev.evaluate_rows(rows, bins=10)
    # A first: picks A always -> right on rows 0, 1 -> 2/4. B first: A, B, B, A -> right on 0, 2 -> 2/4.
    # Both: .7 (right), .5 (half), .4 (right), .8 (wrong) -> 2.5/4
    assert m["orders"]["ab"]["alignment"] == pytest.approx(0.5)
    assert m["orders"]["ba"]["alignment"] == pytest.approx(0.5)
    assert m["orders"]["both"]["alignment"] == pytest.approx(0.625)
    assert m["orders"]["both"]["brier"] == pytest.approx((0.09 + 0.25 + 0.16 + 0.64) / 4)
    assert m["position_consistency"] == pytest.approx(0.5)
    assert m["consistent_pairs"] == 2 and m["alignment_when_consistent"] == pytest.approx(0.5)
    # longer: rows 0 (A), 1 (B), 3 (A). Humans chose the longer only in row 0 -> 1/3.
    assert m["orders"]["ab"]["length"]["human_longer"] == pytest.approx(1 / 3)
    # A first picks A in all: longer wins in rows 0, 3 -> 2/3
    assert m["orders"]["ab"]["length"]["labeler_longer"] == pytest.approx(2 / 3)
