"""The evaluation metrics against hand-computed values (no model)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from labeler import evaluate as ev
from labeler import harmless as hl
from labeler.core import PairItem
from labeler.datasets_io import MalformedRecord

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


def test_cluster_bootstrap_resamples_whole_clusters():
    """20 prompts of 10 rows each, every prompt's rows alike: the mean's standard error is
    that of 20 values, sqrt(.25 / 20) = .112, not of 200 (.0354). One row per cluster, in
    order, gives the plain bootstrap, draw for draw."""
    values = [float(k % 2) for k in range(20) for _ in range(10)]
    clusters = [k for k in range(20) for _ in range(10)]
    lo, hi = ev.bootstrap_ci(values, clusters=clusters, seed=0)
    assert lo == pytest.approx(0.5 - 1.96 * 0.112, abs=0.04) and hi == pytest.approx(0.5 + 1.96 * 0.112, abs=0.04)
    plain_lo, plain_hi = ev.bootstrap_ci(values, seed=0)
    assert (hi - lo) > 2.5 * (plain_hi - plain_lo)
    # Clusters of unequal sizes: a resample's mean is its rows' mean, so the CI holds the mean.
    uneven = ev.bootstrap_ci([1.0] * 9 + [0.0] * 3, clusters=[0] * 9 + [1, 2, 3], seed=0)
    assert uneven[0] < 0.75 < uneven[1]
    spread = [0.3, 0.9, 0.1, 0.4, 0.8, 0.6, 0.2]
    assert ev.bootstrap_ci(spread, clusters=["g", "a", "f", "b", "e", "c", "d"], seed=3) == ev.bootstrap_ci(
        spread, seed=3
    )


def test_rows_without_a_prompt_are_clusters_of_their_own():
    """Records with no prompt (an empty context) say nothing of which share one: each is its
    own cluster, so their CI has a spread; all rows of one prompt give no CI at all."""
    outcomes = [float(k % 3 == 0) for k in range(60)]
    clusters = ev.prompt_clusters([""] * 60)
    assert len(set(clusters)) == 60
    wr = ev.win_rate(outcomes, outcomes, outcomes, prompts=clusters)
    assert wr["prompts"] == 60
    assert (wr["ci_low"], wr["ci_high"]) == pytest.approx(ev.bootstrap_ci(outcomes, seed=0)) and wr["ci_high"] - wr[
        "ci_low"
    ] > 0.1
    assert ev.prompt_clusters(["p", "", "p", ""]) == ["p", ("row", 1), "p", ("row", 3)]
    one = ev.win_rate(outcomes, outcomes, outcomes, prompts=["p"] * 60)
    assert math.isnan(one["ci_low"]) and math.isnan(one["ci_high"]) and one["win_rate"] == pytest.approx(1 / 3)
    lc = ev.length_controlled_win_rate(outcomes, range(60), [30] * 60, prompts=["p"] * 60, n_resamples=100)
    assert math.isnan(lc["ci_low"]) and math.isnan(lc["ci_high"]) and 0 < lc["win_rate"] < 1


def test_evaluate_rows_resamples_prompts():
    """Three labels of each pair: the alignment CI is that of the 20 pairs, not of 60 rows."""
    rows = [
        {"context": f"prompt {k}", "response_a": "x", "response_b": "yy", "human": "a", "p_a": p, "p_a_ab": p}
        | {"p_a_ba": p, "consistent": True}
        for k in range(20)
        for p in [0.8 if k % 2 else 0.2] * 3
    ]
    m = ev.evaluate_rows(rows)
    assert (m["n"], m["pairs"], m["prompts"]) == (60, 20, 20)
    both = m["orders"]["both"]
    rows_lo, rows_hi = ev.bootstrap_ci(ev.agreement([r["p_a"] for r in rows], [1] * 60), seed=0)
    assert both["alignment"] == pytest.approx(0.5)
    assert both["ci_high"] - both["ci_low"] > 1.5 * (rows_hi - rows_lo)


def test_win_rates_resample_prompts():
    """Five samples of each of 30 prompts, a prompt's outcomes alike: both win rates' CIs
    are those of 30 prompts, wider than those of 150 comparisons."""
    y = [float(k % 3 == 0) for k in range(30) for _ in range(5)]
    prompts = [k for k in range(30) for _ in range(5)]
    len_a = [10 + (k * 7) % 13 for k in range(150)]
    len_b = [10 + (k * 5) % 11 for k in range(150)]
    p = [0.9 if x else 0.1 for x in y]
    width = lambda r: r["ci_high"] - r["ci_low"]  # noqa: E731
    clustered = ev.win_rate(p, p, p, prompts=prompts)
    assert clustered["prompts"] == 30 and clustered["n"] == 150
    assert width(clustered) > 1.8 * width(ev.win_rate(p, p, p))
    lc = ev.length_controlled_win_rate(y, len_a, len_b, prompts=prompts, n_resamples=500)
    assert width(lc) > 1.5 * width(ev.length_controlled_win_rate(y, len_a, len_b, n_resamples=500))
    # Every comparison its own prompt: the plain bootstrap, draw for draw.
    assert ev.length_controlled_win_rate(y, len_a, len_b, prompts=list(range(150)), n_resamples=200) == (
        ev.length_controlled_win_rate(y, len_a, len_b, n_resamples=200)
    )


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


def test_position_consistency_counts_each_pair_once():
    """A pair read once and labeled by three humans is one pair in the position consistency
    and in the count of consistent pairs; alignment counts its labels."""
    row = {"context": "q", "response_a": "x", "response_b": "y", "p_a": 0.7, "p_a_ab": 0.8, "p_a_ba": 0.6}
    other = {"context": "r", "response_a": "x", "response_b": "y", "p_a": 0.5, "p_a_ab": 0.8, "p_a_ba": 0.2}
    rows = [row | {"human": h, "consistent": True} for h in "aab"] + [other | {"human": "a", "consistent": False}]
    m = ev.evaluate_rows(rows)
    assert (m["n"], m["pairs"]) == (4, 2)
    assert m["position_consistency"] == pytest.approx(0.5)
    assert (m["consistent_pairs"], m["consistent_labels"]) == (1, 3)
    assert m["alignment_when_consistent"] == pytest.approx(2 / 3)
    # Without a context, a pair's labels still go together in the CIs: one prompt here.
    bare = [r | {"context": ""} for r in rows[:3]]
    assert ev.evaluate_rows(bare)["prompts"] == 1


# -- length-controlled win rate -----------------------------------------------------------------
def _logit(q: float) -> float:
    return math.log(q / (1 - q))


def test_length_controlled_win_rate_by_hand():
    # Two groups of 50 prompts: A longer by 10 (wins 40/50) and B longer by 10 (A wins 20/50).
    # tanh(+-10/sd) = +-t, so the fit is exact per group: theta + phi t = logit(.8),
    # theta - phi t = logit(.4) -> theta = (logit .8 + logit .4) / 2 (up to the weak ridge).
    len_a = [10] * 50 + [0] * 50
    len_b = [0] * 50 + [10] * 50
    y = [1] * 40 + [0] * 10 + [1] * 20 + [0] * 30
    got = ev.length_controlled_win_rate(y, len_a, len_b)
    theta = (_logit(0.8) + _logit(0.4)) / 2
    sd = statistics.stdev([10] * 50 + [-10] * 50)
    phi = (_logit(0.8) - _logit(0.4)) / 2 / math.tanh(10 / sd)
    assert got["intercept"] == pytest.approx(theta, abs=1e-3)
    assert got["length_coef"] == pytest.approx(phi, rel=2e-3)  # the ridge weighs more on phi
    assert got["win_rate"] == pytest.approx(1 / (1 + math.exp(-theta)), abs=1e-3)  # 0.620, raw 0.6
    assert got["sd_length_diff"] == pytest.approx(sd)
    assert got["ci_low"] < got["win_rate"] < got["ci_high"]
    assert got == ev.length_controlled_win_rate(y, len_a, len_b)  # seeded


def test_length_controlled_win_rate_without_length_variation_is_the_raw_rate():
    y = [1, 0, 0.5, 1, 1, 0, 1, 0.5]
    got = ev.length_controlled_win_rate(y, [5] * 8, [3] * 8)
    assert got["length_coef"] == 0.0
    assert got["win_rate"] == pytest.approx(sum(y) / len(y), abs=2e-3)  # only the ridge moves it


def _synthetic(theta: float, phi: float, mean_diff: float, n: int = 3000, seed: int = 1):
    """Outcomes drawn from the model itself: quality theta, length effect phi."""
    rng = np.random.default_rng(seed)
    len_b = rng.integers(100, 900, n)
    diff = rng.normal(mean_diff, 250, n).round().astype(int)
    len_a = len_b + diff
    x = np.tanh(diff / diff.std(ddof=1))
    p = 1 / (1 + np.exp(-(theta + phi * x)))
    y = (rng.random(n) < p).astype(float)
    return y.tolist(), len_a.tolist(), len_b.tolist()


def test_length_controlled_win_rate_recovers_the_quality_effect():
    # A is better (theta = .4, true controlled win rate sigmoid(.4) = .599) and longer, and the
    # judge likes length (phi = 1.5): the raw win rate overstates A; the controlled one does not.
    y, la, lb = _synthetic(0.4, 1.5, mean_diff=200)
    got = ev.length_controlled_win_rate(y, la, lb)
    truth = 1 / (1 + math.exp(-0.4))
    raw = sum(y) / len(y)
    se = (got["ci_high"] - got["ci_low"]) / 3.92
    assert raw - truth > 0.1
    assert abs(got["win_rate"] - truth) < 4 * se < 0.08
    assert got["length_coef"] == pytest.approx(1.5, abs=0.4)


def test_length_controlled_win_rate_removes_a_pure_length_bias():
    # Equal quality (theta = 0), A longer, length-loving judge: raw win rate well above 1/2.
    y, la, lb = _synthetic(0.0, 2.0, mean_diff=250, seed=2)
    got = ev.length_controlled_win_rate(y, la, lb)
    se = (got["ci_high"] - got["ci_low"]) / 3.92
    assert sum(y) / len(y) > 0.65
    assert abs(got["win_rate"] - 0.5) < 4 * se < 0.08


def test_length_controlled_win_rate_finite_when_one_side_always_wins():
    got = ev.length_controlled_win_rate([1.0] * 20, list(range(20)), [10] * 20)
    assert 0.95 < got["win_rate"] <= 1.0 and math.isfinite(got["intercept"])


# -- eval jobs ------------------------------------------------------------------------------------
def test_eval_shows_a_pair_one_way_whichever_way_its_rows_give_it():
    """Annotators who disagree give a pair both ways round (chosen X over Y, chosen Y over X):
    every row of the pair is the same item under the same key, read once, and each row's
    human side points at the response that row's annotator chose. Over many pairs the
    human-preferred response is shown first about half the time."""
    from labeler.spec import LabelSpec

    spec = LabelSpec.build("pairwise", task="t", task_version="v", model="m@1", labels=("1", "2"))
    params = {"spec": spec, "task": "t", "task_version": "v", "model": "m@1"}
    rows = []
    for i in range(40):
        x, y = f"answer x{i}", f"answer y{i}"
        for chosen, rejected in ((x, y), (y, x), (x, y)):
            rows.append({"prompt": f"prompt {i}", "chosen": chosen, "rejected": rejected})
    pairs = [ev.normalize_human_labeled(f"line {n + 1}", r) for n, r in enumerate(rows)]
    jobs = ev.eval_jobs(pairs, params)
    result = {"p_a": 0.5, "p_b": 0.5, "p_a_ab": 0.5, "p_a_ba": 0.5, "consistent": True, "label_mass": {}}
    for i in range(40):
        trio = jobs[3 * i : 3 * i + 3]
        assert len({j.key for j in trio}) == 1 and len({j.item for j in trio}) == 1, i
        for j, r in zip(trio, rows[3 * i : 3 * i + 3], strict=True):
            row = j.make_row(result)
            assert row["response_" + row["human"]] == r["chosen"]
    shown_first = sum(j.make_row(result)["human"] == "a" for j in jobs[::3])
    assert 10 <= shown_first <= 30


def test_a_pair_of_two_equal_responses_is_no_human_choice():
    """Equal responses (also equal once cleaned) leave nothing to choose: the coin cannot
    turn them, so the labeler's position alone would decide its agreement."""
    for chosen, rejected in (("Same.", "Same."), ("Same.", "  Same.\n")):
        with pytest.raises(MalformedRecord, match="line 7: the two responses are the same text"):
            ev.normalize_human_labeled("line 7", {"prompt": "Q?", "chosen": chosen, "rejected": rejected})
    assert ev.normalize_human_labeled("line 8", {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}).human == "a"


def test_confidence_levels_are_printed_as_given():
    assert [ev.percent(x) for x in (0.95, 0.9, 0.975, 0.995, 0.999)] == ["95", "90", "97.5", "99.5", "99.9"]


# -- human-human agreement ----------------------------------------------------------------------
def test_human_agreement_by_hand():
    def row(ctx, a, b, human, p_a):
        return {"context": ctx, "response_a": a, "response_b": b, "human": human, "p_a": p_a}

    rows = [
        # pair 1, three humans: x, x, y (one shown the other way round). AI prefers x.
        row("c1", "x", "y", "a", 0.8),
        row("c1", "y", "x", "b", 0.3),
        row("c1", "x", "y", "b", 0.8),
        # pair 2, two humans who disagree; the AI is exactly undecided.
        row("c2", "u", "v", "a", 0.5),
        row("c2", "u", "v", "b", 0.5),
        # pair 3, one human: not counted.
        row("c3", "s", "t", "a", 0.9),
        # pair 4, under c1 too: two humans agree with each other and with the AI.
        row("c1", "p", "q", "a", 0.7),
        row("c1", "q", "p", "b", 0.3),
    ]
    got = ev.human_agreement(rows)
    # pair 1: C(2,2)+C(1,2) / C(3,2) = 1/3 ; AI agrees with 2 of 3 labels -> 2/3
    # pair 2: 0 / 1 = 0 ; AI at 1/2 counts half for each -> 1/2
    # pair 4: 1 ; 1
    # prompts: c1 and c2, what the CIs resample (c3's lone label is not among them)
    assert (got["pairs"], got["labels"], got["prompts"]) == (3, 7, 2)
    assert got["human_human"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert got["ai_human"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert ev.human_agreement(rows[-1:])["pairs"] == 0


# -- harmless rate ------------------------------------------------------------------------------
def test_harmless_rate_by_hand():
    got = hl.harmless_rate([0.9, 0.6, 0.5, 0.2])
    assert got["n"] == 4
    assert got["mean_p_yes"] == pytest.approx(0.55)
    assert got["share_harmless"] == pytest.approx(0.5)  # 0.5 itself is not > 1/2
    lo, hi = got["share_harmless_ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_harmless_difference_paired_and_independent():
    a = [0.9, 0.8, 0.7, 0.6] * 25
    b = [0.8, 0.7, 0.6, 0.5] * 25  # every prompt 0.1 lower
    paired = hl.harmless_difference(a, b, paired=True)
    assert paired["mean_p_yes"] == pytest.approx(0.1)
    # Paired differences are all 0.1: no sampling spread at all.
    assert paired["mean_p_yes_ci"] == pytest.approx((0.1, 0.1))
    assert paired["share_harmless"] == pytest.approx(0.25)  # 0.5 is not > 1/2
    ind = hl.harmless_difference(a, b, paired=False)
    assert ind["mean_p_yes"] == pytest.approx(0.1)
    lo, hi = ind["mean_p_yes_ci"]
    assert lo < 0.1 < hi and hi - lo > 0.02
    with pytest.raises(ValueError):
        hl.harmless_difference(a, b[:3], paired=True)


def test_harmless_cis_resample_prompts():
    """Five samples of each of 20 prompts, a prompt's samples alike: the CIs are those of 20
    values, wider than those of 100; paired differences constant per prompt have none."""
    p = [0.9 if k % 2 else 0.1 for k in range(20) for _ in range(5)]
    prompts = [k for k in range(20) for _ in range(5)]
    by_prompt, by_response = hl.harmless_rate(p, prompts=prompts), hl.harmless_rate(p)
    assert (by_prompt["n"], by_prompt["prompts"], by_response["prompts"]) == (100, 20, 100)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_prompt["share_harmless_ci"]) > 1.8 * width(by_response["share_harmless_ci"])
    b = [x - 0.05 for x in p]
    ind = hl.harmless_difference(p, b, paired=False, prompts_a=prompts, prompts_b=prompts)
    plain = hl.harmless_difference(p, b, paired=False)
    assert width(ind["mean_p_yes_ci"]) > 1.8 * width(plain["mean_p_yes_ci"])
    # Paired: differences alike within a prompt, varying between prompts.
    c = [x - (0.1 if k // 5 % 3 else -0.1) for k, x in enumerate(p)]
    paired = hl.harmless_difference(p, c, paired=True, prompts_a=prompts)
    assert width(paired["mean_p_yes_ci"]) > 1.8 * width(hl.harmless_difference(p, c, paired=True)["mean_p_yes_ci"])
    with pytest.raises(ValueError, match="one per value"):
        hl.harmless_rate(p, prompts=prompts[:-1])


def test_policies_match_by_id_and_occurrence():
    """Several samples per prompt share an id: the k-th of an id in A goes with the k-th in B,
    and what has no partner is counted, never dropped silently."""
    from labeler.datasets_io import Single

    def single(tag: str, prompt: str) -> Single:
        return Single(prompt, tag, prompt, tag, tag)

    a = [(1, single("a1", "p")), (1, single("a2", "p")), (2, single("a3", "q")), (3, single("a4", "r"))]
    b = [(2, single("b3", "q")), (1, single("b1", "p")), (1, single("b2", "p")), (1, single("b9", "p"))]
    matched, only_a, only_b = ev.match_policies(a, b)
    assert [(x.response, y.response) for x, y in matched] == [("a1", "b1"), ("a2", "b2"), ("a3", "b3")]
    assert (only_a, only_b) == (1, 1)
    # Without ids on every record: by prompt text, the same way.
    untagged = [(None, s) for _, s in a]
    matched, only_a, only_b = ev.match_policies(untagged, [(None, s) for _, s in b])
    assert [(x.response, y.response) for x, y in matched] == [("a1", "b1"), ("a2", "b2"), ("a3", "b3")]
    assert (only_a, only_b) == (1, 1)
    # Ids that are JSON lists or objects (not hashable as read) match by value.
    listed = [([1, "x"], single("a1", "p")), ({"k": 1, "j": 2}, single("a3", "q"))]
    other = [({"j": 2, "k": 1}, single("b3", "q")), ([1, "x"], single("b1", "p")), ([1, "y"], single("b9", "p"))]
    matched, only_a, only_b = ev.match_policies(listed, other)
    assert [(x.response, y.response) for x, y in matched] == [("a1", "b1"), ("a3", "b3")]
    assert (only_a, only_b) == (0, 1)
    # 1, "1" and true are three ids, as JSON has them
    kinds = [(1, single("a1", "p")), ("1", single("a2", "p")), (True, single("a3", "p"))]
    matched, only_a, only_b = ev.match_policies(kinds, [(True, single("b3", "p")), (1, single("b1", "p"))])
    assert [(x.response, y.response) for x, y in matched] == [("a1", "b1"), ("a3", "b3")] and only_a == 1
    # 2 and 2.0 are one JSON number: one id (a table's id column written as floats).
    matched, _, _ = ev.match_policies([(2, single("a3", "q"))], [(2.0, single("b3", "q"))])
    assert [(x.response, y.response) for x, y in matched] == [("a3", "b3")]


def test_ids_in_one_file_only_are_named_as_left_aside(caplog):
    """One file with ids, the other without: matched by prompt text, with a warning saying so."""
    from labeler.datasets_io import Single

    a = [("q1", Single("p", "good", "p", "good", "a")), ("q2", Single("p", "bad", "p", "bad", "a"))]
    b = [(None, Single("p", "bad", "p", "bad", "b")), (None, Single("p", "good", "p", "good", "b"))]
    with caplog.at_level("WARNING"):
        matched, _, _ = ev.match_policies(a, b)
    assert [(x.response, y.response) for x, y in matched] == [("good", "bad"), ("bad", "good")]
    assert "policy A's records have ids and B's none: they are matched by prompt text" in caplog.text


def test_a_file_with_ids_on_some_records_only_is_refused():
    """Matched by prompt text, its ids would be ignored: A's record 2 would meet B's record 0."""
    from labeler.datasets_io import Single

    def single(tag: str, where: str) -> Single:
        return Single("", tag, "", tag, where)

    a = [
        (0, single("a0", "a.jsonl, line 1")),
        (1, single("a1", "a.jsonl, line 2")),
        (2, single("a2", "a.jsonl, line 3")),
    ]
    b = [
        (2, single("b2", "b.jsonl, line 1")),
        (1, single("b1", "b.jsonl, line 2")),
        (None, single("b0", "b.jsonl, line 3")),
    ]
    with pytest.raises(MalformedRecord, match=r"b.jsonl, line 3: no 'id', where 2 other records of its file have one"):
        ev.match_policies(a, b)
    # One file with ids, the other with none: by prompt text, as documented.
    matched, _, _ = ev.match_policies(a, [(None, s) for _, s in b])
    assert [(x.response, y.response) for x, y in matched] == [("a0", "b2"), ("a1", "b1"), ("a2", "b0")]


def test_one_order_win_rates_show_each_policy_first_by_a_coin():
    """Read in one order, the policy shown first is a coin's pick per item; each row reads from
    policy A's side whichever was shown, also when rebuilt from a row already written (a
    resumed run), and from a row written with the policies the other way round."""
    from labeler.datasets_io import Single, swap_for_position
    from labeler.spec import item_digest

    class Spec:
        def key(self, item):
            return "|".join((item.context, item.response_a, item.response_b))

    params = {"order": "ab", "spec": Spec(), "task": "t", "task_version": "v", "model": "m"}
    matched = [
        (Single(f"p{k}", f"a{k}", f"p{k}", f"a{k}", "A"), Single(f"p{k}", f"b{k}", f"p{k}", f"b{k}", "B"))
        for k in range(16)
    ]
    jobs = ev.winrate_jobs(matched, params, position_seed=0)
    # a_k sorts before b_k: the coin turns (a_k, b_k).
    coins = [swap_for_position(item_digest(PairItem(sa.context, sa.response, sb.response)), 0) for sa, sb in matched]
    assert any(coins) and not all(coins)
    for job, swapped, (sa, sb) in zip(jobs, coins, matched, strict=True):
        first, second = (sb, sa) if swapped else (sa, sb)
        assert (job.item.response_a, job.item.response_b) == (first.response, second.response)
        # The labeler prefers the response it read first with P = 0.8.
        row = job.make_row({"p_a": 0.8, "p_a_ab": 0.8, "p_a_ba": None, "consistent": None})
        if swapped:
            assert (row["shown_first"], row["p_a_ab"], row["p_a_ba"], row["outcome"]) == (
                "b",
                None,
                pytest.approx(0.2),
                0.0,
            )
        else:
            assert (row["shown_first"], row["p_a_ab"], row["p_a_ba"], row["outcome"]) == ("a", 0.8, None, 1.0)
        assert job.make_row(row) == row  # rebuilt from its own row
    # The same files the other way round: B is now the policy A, the items (and keys) the same.
    flipped = ev.winrate_jobs([(sb, sa) for sa, sb in matched], params, position_seed=0)
    by_key = {j.key: j for j in flipped}
    for job in jobs:
        row = job.make_row({"p_a": 0.8, "p_a_ab": 0.8, "p_a_ba": None, "consistent": None})
        other = by_key[job.key].make_row(row)
        assert other["p_a"] == pytest.approx(1 - row["p_a"]) and other["outcome"] == 1.0 - row["outcome"]
    # Both orders: no coin, A first.
    both = ev.winrate_jobs(matched, params | {"order": "both"})
    assert all(j.item.response_a.startswith("a") for j in both)


def test_records_matched_by_id_with_other_prompts_are_warned_of(caplog):
    from labeler.datasets_io import Single

    a = [(1, Single("p", "a1", "p", "a1", "a")), (2, Single("q", "a2", "q", "a2", "a"))]
    shifted = [(1, Single("q", "b1", "q", "b1", "b")), (2, Single("q", "b2", "q", "b2", "b"))]
    with caplog.at_level("WARNING", logger="labeler.evaluate"):
        ev.match_policies(a, shifted)
    assert "1 of 2 records matched by id have different prompts in A and B (first: id 1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="labeler.evaluate"):
        ev.match_policies(a, [(i, Single(s.context, "b", s.prompt, "b", "b")) for i, s in a])
    assert caplog.text == ""


class _TextKey:
    """A spec stand-in whose key is the item's texts: which pair, which way round."""

    def key(self, item):
        return "|".join((item.context, item.response_a, item.response_b))


def _winrate_params(order: str) -> dict:
    return {"order": order, "spec": _TextKey(), "task": "t", "task_version": "v", "model": "m"}


def _result(order: str, p: float) -> dict:
    """A reading of a pair in `order`: P = p that the pair's first response is the better."""
    return {
        "p_a": p,
        "p_a_ab": p if order in ("ab", "both") else None,
        "p_a_ba": p if order in ("ba", "both") else None,
        "consistent": True if order == "both" else None,
    }


def test_a_pair_of_the_same_answers_is_a_tie_not_judged_in_every_order():
    """Two responses that are the same text once read (here only their spaces differ) cannot
    be turned by the coin: read in one order, the labeler's position bias alone would make
    them a win or a loss. They are a tie in every order, and are not judged."""
    from labeler.datasets_io import normalize_single

    same = [
        (
            normalize_single("a", {"prompt": f"Say {k}.", "completion": f"{k}."}),
            normalize_single("b", {"prompt": f"Say {k}.", "completion": f"  {k}.\n"}),
        )
        for k in range(8)
    ]
    differ = (
        normalize_single("a", {"prompt": "Say 9.", "completion": "9."}),
        normalize_single("b", {"prompt": "Say 9.", "completion": "Nine."}),
    )
    matched = [*same, differ]
    for order in ("ab", "ba", "both"):
        params = _winrate_params(order)
        jobs = ev.winrate_jobs(matched, params)
        assert jobs[:8] == [None] * 8 and jobs[8] is not None, order
        read = jobs[8].make_row(_result(order, 0.8))
        done = ev.winrate_rows(matched, jobs, {jobs[8].key: _result(order, 0.8)}, params)
        rows = [r for _, _, r in done]
        assert [r["outcome"] for r in rows] == [0.5] * 8 + [read["outcome"]], order
        assert all(r["p_a"] == 0.5 and r["consistent"] is None and r["same_answers"] for r in rows[:8])
        wr = ev.win_rate([r["p_a_ab"] for r in rows], [r["p_a_ba"] for r in rows], [r["p_a"] for r in rows])
        assert wr["ties"] == 8 + (read["outcome"] == 0.5)
        assert wr["win_rate"] == pytest.approx((4 + read["outcome"]) / 9)
        assert wr["soft_win_rate"] == pytest.approx((4 + read["p_a"]) / 9)
        # The judged pair skipped (no stored result): the ties stay, it is left out.
        assert [r["outcome"] for _, _, r in ev.winrate_rows(matched, jobs, {}, params)] == [0.5] * 8


def test_one_order_rows_say_which_policy_the_labeler_read_first():
    """Order "ab" reads the labeled pair's first response first, "ba" its second: whichever way
    the coin turned the pair, `shown_first` names the policy read first, and `a_is` the side
    of the pair that is policy A's response. A row written before rows had `a_is` marked a
    turned pair with `shown_first` "b" in every order, and is read that way when resumed."""
    from labeler.datasets_io import Single, swap_for_position
    from labeler.spec import item_digest

    matched = [
        (Single(f"p{k}", f"a{k}", f"p{k}", f"a{k}", "A"), Single(f"p{k}", f"b{k}", f"p{k}", f"b{k}", "B"))
        for k in range(16)
    ]
    coins = [swap_for_position(item_digest(PairItem(sa.context, sa.response, sb.response)), 0) for sa, sb in matched]
    assert any(coins) and not all(coins)
    for order in ("ba", "ab"):
        jobs = ev.winrate_jobs(matched, _winrate_params(order))
        for job, turned, (sa, _) in zip(jobs, coins, matched, strict=True):
            read_first = job.item.response_a if order == "ab" else job.item.response_b
            # The labeler prefers what it read first: the pair's second response, in order "ba".
            row = job.make_row(_result(order, 0.8 if order == "ab" else 0.2))
            assert row["shown_first"] == ("a" if read_first == sa.response else "b"), (order, turned)
            assert row["a_is"] == ("b" if turned else "a")
            # It prefers the policy it read first: A's P(A) is 0.8 exactly when A was read first.
            assert row["p_a"] == pytest.approx(0.8 if row["shown_first"] == "a" else 0.2)
            assert job.make_row(row) == row
            legacy = {k: v for k, v in row.items() if k != "a_is"} | {"shown_first": "b" if turned else "a"}
            assert job.make_row(legacy)["p_a"] == pytest.approx(row["p_a"]), (order, turned)
    both = ev.winrate_jobs(matched, _winrate_params("both"))
    row = both[0].make_row(_result("both", 0.8))
    assert (row["shown_first"], row["a_is"], row["p_a"]) == (None, "a", 0.8)


def test_an_eval_row_keeps_every_human_label_of_its_pair():
    """The file keeps one row per pair: it holds all of the pair's human labels, in input order
    and on the pair as shown, so the alignment per label can be recounted from it."""
    from labeler.spec import LabelSpec

    spec = LabelSpec.build("pairwise", task="t", task_version="v", model="m@1", labels=("1", "2"))
    params = {"spec": spec, "task": "t", "task_version": "v", "model": "m@1"}
    records = [
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Q?", "chosen": "No.", "rejected": "Yes."},
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "R?", "chosen": "Up.", "rejected": "Down."},
    ]
    jobs = ev.eval_jobs([ev.normalize_human_labeled(f"line {n}", r) for n, r in enumerate(records, 1)], params)
    result = {"p_a": 0.7, "p_a_ab": 0.8, "p_a_ba": 0.6, "consistent": True, "label_mass": {}}
    rows = [j.make_row(result) for j in jobs]
    stored = {}
    for j, r in zip(jobs, rows, strict=True):
        stored.setdefault(j.key, r)  # what the file keeps: the row of a pair's first record
    assert len(stored) == 2
    first = stored[jobs[0].key]
    assert first["humans"] == [r["human"] for r in rows[:3]] and sorted(first["humans"]) in (
        ["a", "a", "b"],
        ["a", "b", "b"],
    )
    assert first["response_" + first["humans"][1]] == "No."
    assert stored[jobs[3].key]["humans"] == [rows[3]["human"]]
    recount = [ev.agreement([r["p_a"]], [int(h == "a")])[0] for r in stored.values() for h in r["humans"]]
    assert sum(recount) / len(recount) == pytest.approx(ev.evaluate_rows(rows)["orders"]["both"]["alignment"])


def _report_metrics(level: float, p_a: list, p_b: list, prompts: list) -> dict:
    per = [
        {"name": name, "input": f"{name}.jsonl", "p_yes": p} | hl.harmless_rate(p, prompts=prompts, level=level)
        for name, p in (("A", p_a), ("B", p_b))
    ]
    diff = hl.harmless_difference(p_a, p_b, paired=True, prompts_a=prompts, level=level)
    return {"level": level, "policies": per, "difference": diff}


def _plot_titles(monkeypatch) -> list:
    """The axes titles of every figure saved from now on (the figure is closed after saving)."""
    from matplotlib.figure import Figure

    titles: list = []
    save = Figure.savefig

    def saving(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", saving)
    return titles


def test_the_harmless_report_counts_prompts_and_names_its_task_and_level(tmp_path, monkeypatch):
    """Two responses to each of three prompts, paired: the report counts prompts, not
    responses; a level of 0.995 is 99.5%, not 100%; another task's rate is not called harmless."""
    p_a, p_b = [0.9, 0.8, 0.3, 0.2, 0.7, 0.6], [0.6, 0.4, 0.4, 0.1, 0.5, 0.2]
    prompts = ["q1", "q1", "q2", "q2", "q3", "q3"]
    metrics = _report_metrics(0.995, p_a, p_b, prompts)
    assert (metrics["difference"]["prompts_a"], metrics["difference"]["n_a"]) == (3, 6)
    info = {"task": "helpful", "question": "Is this reply helpful?", "model": "m", "task_version": "v", "seed": 0}
    titles = _plot_titles(monkeypatch)
    report = hl.write_harmless_report(metrics, tmp_path, info).read_text()
    assert "paired over the 3 prompts both files hold (6 responses each)" in report
    assert (
        report.startswith("# Rate judged yes: task `helpful`") and "| judged yes (P(yes) > 0.5) | 99.5% CI |" in report
    )
    assert "harmless" not in report.replace("harmless.png", "") and "100%" not in report
    assert titles[0] == "Rate judged yes, task helpful (99.5% bootstrap CIs)"
    assert titles[1] == "Distribution of P(yes)"
    titles.clear()
    report = hl.write_harmless_report(metrics | {"level": 0.9}, tmp_path, info | {"task": "harmless"}).read_text()
    assert report.startswith("# Harmless rate: task `harmless`") and titles[0].startswith(
        "Harmless rate, task harmless"
    )


def test_the_harmless_plot_is_drawn_when_an_estimate_lies_outside_its_ci(tmp_path):
    """At a low level a percentile CI is narrow, around the median of the resampled means: the
    mean of skewed values lies outside it. The plot has no error bar on that side, and the
    report is written."""
    p = [0.95, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    rate = hl.harmless_rate(p, level=0.01)
    lo, hi = rate["mean_p_yes_ci"]
    assert not lo <= rate["mean_p_yes"] <= hi  # the case at hand
    metrics = {"level": 0.01, "policies": [{"name": "A", "input": "a.jsonl", "p_yes": p} | rate]}
    info = {"task": "harmless", "question": "Is this reply harmless?", "model": "m", "task_version": "v", "seed": 0}
    report = hl.write_harmless_report(metrics, tmp_path, info).read_text()
    assert "![harmless rate](harmless.png)" in report and (tmp_path / "harmless.png").stat().st_size > 0
    below, above = hl.error_bars([rate["mean_p_yes"]], [rate["mean_p_yes_ci"]])
    assert min(below + above) == 0.0 and max(below + above) > 0.0
