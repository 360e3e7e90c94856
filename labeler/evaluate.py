"""Labeler evaluation and win rates: the metrics as pure functions, the jobs that label for
them, and the report writer.

AI labeler alignment (Lee et al. 2023, "RLAIF"): the share of human-labeled pairs on which
the AI labeler prefers the response the human preferred, i.e. its accuracy against human
labels.

Notation: for pair i, p_i is the labeler's P(A preferred) (from one order or the mean of
both), y_i = 1 if the human (or the reference) preferred A, else 0. An item's *outcome* is

    o(p) = 1 if p > 1/2,   0 if p < 1/2,   1/2 if p = 1/2     (a tie counts half)

Human-labeled input names the preferred response ("chosen"); that response is shown as A
or as B by a fair coin fixed per item (`datasets_io.swap_for_position`, seed `--position-seed`),
so the labeler's position bias cannot pass for agreement with humans.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from .batch import Job, _meta, pair_item, pair_key
from .core import PairItem
from .datasets_io import MalformedRecord, Pair, Single, normalize_pair, swap_for_position
from .spec import item_digest

log = logging.getLogger(__name__)

ORDERS = {"ab": "one order (A first)", "ba": "one order (B first)", "both": "both orders (mean)"}


# -- metrics ------------------------------------------------------------------------------------
def outcome(p: float) -> float:
    """o(p): 1 if p > 1/2, 0 if p < 1/2, 1/2 at exactly 1/2."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def agreement(p: Sequence[float], y: Sequence[int]) -> list[float]:
    """Per pair, agreement of the labeler's pick with the human choice: y o(p) + (1 - y)(1 - o(p))."""
    return [o if yi else 1.0 - o for o, yi in zip(map(outcome, p), y, strict=True)]


def alignment(p: Sequence[float], y: Sequence[int]) -> float:
    """AI labeler alignment = accuracy vs human labels: mean_i [ y_i o(p_i) + (1 - y_i)(1 - o(p_i)) ]."""
    return _mean(agreement(p, y))


def resampled_means(
    values: Sequence[float], rng: Any, *, clusters: Sequence[Hashable] | None = None, n_resamples: int = 2000
) -> Any:
    """The means of `n_resamples` bootstrap resamples of `values` (a numpy array), drawn from
    `rng` (a numpy Generator): n values with replacement, or with `clusters` (one per value)
    whole clusters, a resample's mean being its values' mean. Values that share a cluster
    (the pairs of one prompt, the labels of one pair, the samples of one prompt) err
    together, and resampling them one by one would make the CI too narrow. With every value
    its own cluster, in order, the draws are the plain bootstrap's; with fewer than two
    clusters there is no spread to estimate, and every mean is nan."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    of, m = cluster_index(clusters, len(v))
    if m < 2:  # one cluster: every resample is the same, which says nothing of the spread
        return np.full(n_resamples, math.nan)
    sums, counts = np.bincount(of, weights=v), np.bincount(of).astype(float)
    pick = rng.integers(0, m, size=(n_resamples, m))
    return sums[pick].sum(axis=1) / counts[pick].sum(axis=1)


def cluster_index(clusters: Sequence[Hashable] | None, n: int) -> tuple[Any, int]:
    """(each value's cluster number, in order of first appearance; the number of clusters)
    for `n` values, each its own cluster when `clusters` is None."""
    import numpy as np

    if clusters is None:
        return np.arange(n), n
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} values: one per value")
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(c, len(ids)) for c in clusters], dtype=np.int64), len(ids)


def prompt_clusters(contexts: Sequence[str], own: Sequence[Hashable] | None = None) -> list[Hashable]:
    """The bootstrap cluster of each row from its prompt (context): rows of one prompt go
    together, and a row without a prompt (an empty context) goes in `own[i]` (by default a
    cluster of its own, since nothing says which such rows share one; the labels of one
    pair, say, can say more)."""
    return [c if c else (own[i] if own is not None else ("row", i)) for i, c in enumerate(contexts)]


def bootstrap_ci(
    values: Sequence[float],
    *,
    clusters: Sequence[Hashable] | None = None,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: the (1-level)/2 and (1+level)/2 quantiles of the
    `resampled_means` (numpy default_rng(seed)), resampling `clusters` whole when given.
    (nan, nan) for no values, or for values all in one cluster."""
    import numpy as np

    if len(values) == 0:
        return (math.nan, math.nan)
    means = resampled_means(values, np.random.default_rng(seed), clusters=clusters, n_resamples=n_resamples)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def position_consistency(p_ab: Sequence[float], p_ba: Sequence[float]) -> float:
    """Share of pairs whose two orders pick the same winner: both P(A) > 1/2 or both < 1/2
    (a 1/2 in either order picks no winner and counts as inconsistent)."""
    return _mean([float((a > 0.5 and b > 0.5) or (a < 0.5 and b < 0.5)) for a, b in zip(p_ab, p_ba, strict=True)])


def brier(p: Sequence[float], y: Sequence[int]) -> float:
    """Brier score: mean_i (p_i - y_i)^2 (0 is perfect; always answering 1/2 scores 0.25)."""
    return _mean([(pi - yi) ** 2 for pi, yi in zip(p, y, strict=True)])


def calibration_bins(p: Sequence[float], y: Sequence[int], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1]: p falls in bin b = min(floor(p * bins), bins - 1).
    Per bin: its bounds, count n_b, mean prediction conf_b = mean p, observed frequency
    acc_b = mean y (nan for empty bins)."""
    out = []
    for b in range(bins):
        idx = [i for i, pi in enumerate(p) if min(int(pi * bins), bins - 1) == b]
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": len(idx),
                "conf": _mean([p[i] for i in idx]),
                "acc": _mean([y[i] for i in idx]),
            }
        )
    return out


def ece(p: Sequence[float], y: Sequence[int], bins: int = 10) -> float:
    """Expected calibration error of P(A): sum_b (n_b / N) |acc_b - conf_b| over the
    equal-width bins of `calibration_bins` (empty bins add nothing)."""
    n = len(p)
    if n == 0:
        return math.nan
    return sum(b["n"] / n * abs(b["acc"] - b["conf"]) for b in calibration_bins(p, y, bins) if b["n"])


def length_bias(len_a: Sequence[int], len_b: Sequence[int], p: Sequence[float], y: Sequence[int]) -> dict[str, Any]:
    """How often the longer response is preferred, over pairs of unequal length (in characters):
    labeler: mean o_longer where o_longer = o(p) if A is longer else 1 - o(p);
    humans:  mean y_longer where y_longer = y if A is longer else 1 - y.
    Returns {"pairs", "labeler_longer", "human_longer"}: "pairs" counts the rows of unequal
    length (in `labeler eval`, one per human label); shares are nan with no such rows."""
    ai, hu = [], []
    for la, lb, pi, yi in zip(len_a, len_b, p, y, strict=True):
        if la == lb:
            continue
        o = outcome(pi)
        ai.append(o if la > lb else 1.0 - o)
        hu.append(float(yi) if la > lb else 1.0 - yi)
    return {"pairs": len(ai), "labeler_longer": _mean(ai), "human_longer": _mean(hu)}


def win_outcomes(p_ab: Sequence[float | None], p_ba: Sequence[float | None]) -> list[float]:
    """Per prompt, A's result against B: with both orders, 1 if both orders prefer A
    (P(A) > 1/2), 0 if both prefer B, 1/2 otherwise (the orders disagree: a tie); with one
    order, o(p) of that order."""
    out = []
    for a, b in zip(p_ab, p_ba, strict=True):
        if a is not None and b is not None:
            out.append(1.0 if a > 0.5 and b > 0.5 else 0.0 if a < 0.5 and b < 0.5 else 0.5)
        else:
            out.append(outcome(a if a is not None else b))  # type: ignore[arg-type]
    return out


def win_rate(
    p_ab: Sequence[float | None],
    p_ba: Sequence[float | None],
    p: Sequence[float],
    *,
    prompts: Sequence[Hashable] | None = None,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Win rate of A over B = mean of `win_outcomes` (ties count 1/2), with its bootstrap CI
    (resampling `prompts`, one per comparison, whole when given: several samples of one
    prompt err together); also wins/ties/losses and the soft win rate mean_i P(A)_i."""
    w = win_outcomes(p_ab, p_ba)
    lo, hi = bootstrap_ci(w, clusters=prompts, level=level, seed=seed)
    return {
        "n": len(w),
        "prompts": len(set(prompts)) if prompts is not None else len(w),
        "win_rate": _mean(w),
        "ci_low": lo,
        "ci_high": hi,
        "level": level,
        "wins": sum(x == 1.0 for x in w),
        "ties": sum(x == 0.5 for x in w),
        "losses": sum(x == 0.0 for x in w),
        "soft_win_rate": _mean(list(p)),
    }


# Weak Gaussian prior on the GLM's two coefficients: keeps the fit finite when one policy wins
# every prompt (or every long answer wins), and moves it by O(1/n) otherwise.
LC_RIDGE = 0.01


def length_controlled_win_rate(
    outcomes: Sequence[float],
    len_a: Sequence[int],
    len_b: Sequence[int],
    *,
    prompts: Sequence[Hashable] | None = None,
    level: float = 0.95,
    seed: int = 0,
    n_resamples: int = 2000,
) -> dict[str, Any]:
    """Length-controlled win rate of A over B, after AlpacaEval 2 (Dubois et al. 2024).

    A logistic model of the judged outcome y_i (1 win, 1/2 tie, 0 loss; fit as a soft
    target) on the length difference:

        logit P(A beats B on prompt i) = theta + phi * tanh((len_a_i - len_b_i) / sd),

    sd = the sample standard deviation of the length differences (characters). The
    length-controlled win rate is the model's prediction at zero length difference,
    sigmoid(theta): what the judge would say if both answers had the same length. Fit by
    maximum likelihood (Newton's method) with the weak ridge `LC_RIDGE` on (theta, phi).
    AlpacaEval's GLM also has an instruction-difficulty term, estimated from many models'
    outputs on its fixed prompt set, and an L1 penalty chosen by cross-validation; with two
    policies and one judgment per prompt those are not identifiable, so they are left out.

    The CI is a percentile bootstrap that refits the whole model (sd included) on each
    resample: over the comparisons, or over `prompts` (one per comparison) with a prompt's
    comparisons resampled together (a single prompt gives no CI: nan). Returns {"n",
    "win_rate", "ci_low", "ci_high", "level", "intercept" (theta), "length_coef" (phi),
    "sd_length_diff", "mean_length_diff"}; with no variation in length differences the
    length term is dropped (phi = 0)."""
    import numpy as np

    y = np.asarray(outcomes, dtype=float)
    d = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    n = len(y)
    if n == 0:
        return {"n": 0, "win_rate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "level": level}
    theta, phi = _fit_length_glm(y, d, np.ones((1, n)))
    rng = np.random.default_rng(seed)
    of, m = cluster_index(prompts, n)
    lo = hi = math.nan  # one prompt: no spread to resample
    lcs = []
    block = max(1, 2_000_000 // n)  # resamples per vectorized fit, to bound memory
    for start in range(0, n_resamples if m > 1 else 0, block):
        b = min(block, n_resamples - start)
        # How often each prompt is drawn, given to each of its comparisons as its weight.
        counts = rng.multinomial(m, np.full(m, 1.0 / m), size=b).astype(float)[:, of]
        th, _ = _fit_length_glm(y, d, counts)
        lcs.append(_sigmoid(th))
    if lcs:
        lo, hi = np.quantile(np.concatenate(lcs), [(1 - level) / 2, (1 + level) / 2])
    return {
        "n": n,
        "win_rate": float(_sigmoid(theta[0])),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
        "intercept": float(theta[0]),
        "length_coef": float(phi[0]),
        "sd_length_diff": float(d.std(ddof=1)) if n > 1 else 0.0,
        "mean_length_diff": float(d.mean()),
    }


def _sigmoid(x: Any) -> Any:
    import numpy as np

    return np.exp(-np.logaddexp(0.0, -x))


def _fit_length_glm(y: Any, d: Any, w: Any, *, iters: int = 100, tol: float = 1e-10) -> tuple[Any, Any]:
    """Maximum-likelihood (theta, phi), one fit per row of the case weights `w` (B x n: the
    bootstrap counts, or ones), of logit p = theta + phi tanh(d / sd_w) to soft targets y,
    with the ridge LC_RIDGE; sd_w is the weighted sample standard deviation of d."""
    import numpy as np

    total = w.sum(axis=1)
    mean = (w * d).sum(axis=1) / total
    var = (w * (d - mean[:, None]) ** 2).sum(axis=1) / np.maximum(total - 1.0, 1.0)
    sd = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(sd[:, None] > 0, np.tanh(d / sd[:, None]), 0.0)
    theta = np.zeros(len(w))
    phi = np.zeros(len(w))
    for _ in range(iters):
        p = _sigmoid(theta[:, None] + phi[:, None] * x)
        r = w * (y - p)
        g0 = r.sum(axis=1) - LC_RIDGE * theta
        g1 = (r * x).sum(axis=1) - LC_RIDGE * phi
        h = w * p * (1.0 - p)
        h00 = h.sum(axis=1) + LC_RIDGE
        h01 = (h * x).sum(axis=1)
        h11 = (h * x * x).sum(axis=1) + LC_RIDGE
        det = h00 * h11 - h01 * h01
        # Newton step: (theta, phi) += H^-1 g, H the negative Hessian (positive definite).
        step0 = (h11 * g0 - h01 * g1) / det
        step1 = (h00 * g1 - h01 * g0) / det
        theta += step0
        phi += step1
        if max(np.abs(step0).max(), np.abs(step1).max()) < tol:
            break
    return theta, phi


# -- evaluation over labeled rows ---------------------------------------------------------------
def evaluate_rows(
    rows: Sequence[dict[str, Any]], *, level: float = 0.95, seed: int = 0, bins: int = 10
) -> dict[str, Any]:
    """Every metric, per order ("ab", "ba", "both"), from eval rows (see `eval_jobs`): one
    row per human label, `n` of them on `pairs` distinct pairs over `prompts` prompts (a pair
    without a context counts as a prompt of its own)."""
    y = [1 if r["human"] == "a" else 0 for r in rows]
    la = [len(r["response_a"]) for r in rows]
    lb = [len(r["response_b"]) for r in rows]
    prompts = prompt_clusters([r["context"] for r in rows], [_pair_id(r) for r in rows])
    # A pair's rows share one reading of the labeler: the per-pair figures count it once.
    pairs = {_pair_id(r): r for r in rows}
    out: dict[str, Any] = {
        "n": len(rows),
        "pairs": len(pairs),
        "prompts": len(set(prompts)),
        "level": level,
        "bins": bins,
        "orders": {},
    }
    for order, col in (("ab", "p_a_ab"), ("ba", "p_a_ba"), ("both", "p_a")):
        if any(r.get(col) is None for r in rows):
            continue
        p = [r[col] for r in rows]
        lo, hi = bootstrap_ci(agreement(p, y), clusters=prompts, level=level, seed=seed)
        out["orders"][order] = {
            "alignment": alignment(p, y),
            "ci_low": lo,
            "ci_high": hi,
            "brier": brier(p, y),
            "ece": ece(p, y, bins),
            "length": length_bias(la, lb, p, y),
            "bins": calibration_bins(p, y, bins),
        }
    if "ab" in out["orders"] and "ba" in out["orders"]:
        distinct = list(pairs.values())
        out["position_consistency"] = position_consistency(
            [r["p_a_ab"] for r in distinct], [r["p_a_ba"] for r in distinct]
        )
        cons = [(r["p_a"], yi) for r, yi in zip(rows, y, strict=True) if r["consistent"]]
        out["alignment_when_consistent"] = alignment([c[0] for c in cons], [c[1] for c in cons]) if cons else math.nan
        out["consistent_pairs"] = sum(1 for r in distinct if r["consistent"])
        out["consistent_labels"] = len(cons)
    if "both" in out["orders"]:
        out["human_agreement"] = human_agreement(rows, level=level, seed=seed)
    return out


def human_agreement(rows: Sequence[dict[str, Any]], *, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Human-human agreement next to AI-human agreement, on the pairs that more than one
    human labeled (the same context and two responses in several rows, in either order).

    For such a pair g with k_g >= 2 human labels, c of them for one response and k_g - c for
    the other:
        human-human h_g = [C(c, 2) + C(k_g - c, 2)] / C(k_g, 2)   (two of its annotators agree)
        AI-human    a_g = mean over its k_g labels of the labeler's agreement with the label
                          (from P(A), both orders; a pick at exactly 1/2 counts half)
    Each is averaged over the pairs (every multiply-labeled pair weighs the same), with
    percentile bootstrap CIs over the prompts of those pairs (a prompt's pairs resampled
    together). Returns {"pairs", "labels", "prompts", "human_human", "human_human_ci",
    "ai_human", "ai_human_ci"}, prompts counting the prompts the CIs resample; pairs = 0 when no
    pair has two labels."""
    groups: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
    for r in rows:
        preferred = r["response_a"] if r["human"] == "a" else r["response_b"]
        agree = agreement([r["p_a"]], [1 if r["human"] == "a" else 0])[0]
        groups.setdefault(_pair_id(r), []).append((preferred, agree))
    hh, ah, repeated, labels = [], [], [], 0
    for pair, votes in groups.items():
        k = len(votes)
        if k < 2:
            continue
        c = sum(1 for v, _ in votes if v == votes[0][0])
        hh.append((math.comb(c, 2) + math.comb(k - c, 2)) / math.comb(k, 2))
        ah.append(_mean([agree for _, agree in votes]))
        repeated.append(pair)
        labels += k
    prompts = prompt_clusters([context for context, _, _ in repeated], repeated)
    return {
        "pairs": len(hh),
        "labels": labels,
        "prompts": len(set(prompts)),
        "human_human": _mean(hh),
        "human_human_ci": bootstrap_ci(hh, clusters=prompts, level=level, seed=seed),
        "ai_human": _mean(ah),
        "ai_human_ci": bootstrap_ci(ah, clusters=prompts, level=level, seed=seed),
    }


def _pair_id(row: dict[str, Any]) -> tuple[str, str, str]:
    """A labeled row's pair, whichever way round the row gives it: (context, and the two
    responses in sorted order)."""
    a, b = row["response_a"], row["response_b"]
    return (row["context"], min(a, b), max(a, b))


def plot_reliability(metrics: dict[str, Any], path: Path) -> None:
    """Reliability diagram: per bin, mean P(A) against the share of pairs humans gave to A."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    for order, m in metrics["orders"].items():
        pts = [b for b in m["bins"] if b["n"]]
        ax.plot([b["conf"] for b in pts], [b["acc"] for b in pts], "o-", label=f"{ORDERS[order]}, ECE {m['ece']:.3f}")
    ax.set_xlabel("labeler P(A preferred), bin mean")
    ax.set_ylabel("share of human labels preferring A")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability ({metrics['n']} labels on {metrics['pairs']} pairs, {metrics['bins']} bins)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_length_bias(metrics: dict[str, Any], path: Path) -> None:
    """Bars: share of the labels on unequal-length pairs that go to the longer response,
    humans vs labeler."""
    plt = _pyplot()
    names = ["humans"] + [ORDERS[o] for o in metrics["orders"]]
    first = next(iter(metrics["orders"].values()))
    vals = [first["length"]["human_longer"]] + [m["length"]["labeler_longer"] for m in metrics["orders"].values()]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.bar(range(len(vals)), [0 if math.isnan(v) else v for v in vals], color=["grey"] + ["C0"] * (len(vals) - 1))
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(vals)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share preferring the longer response")
    ax.set_title(f"Length bias ({first['length']['pairs']} labels on pairs of unequal length)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percent(level: float) -> str:
    """A confidence level as a percentage for a report: 0.95 as "95", 0.995 as "99.5"."""
    return f"{level * 100:.10g}"


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def write_report(metrics: dict[str, Any], out_dir: Path, info: dict[str, Any]) -> Path:
    """DIR/report.md with the tables, and the plots (reliability.png, length_bias.png) beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        plot_reliability(metrics, out_dir / "reliability.png")
        plot_length_bias(metrics, out_dir / "length_bias.png")
        plots = ["![reliability diagram](reliability.png)", "", "![length bias](length_bias.png)", ""]
    except RuntimeError as exc:  # matplotlib missing: the numbers still matter
        log.warning("no plots: %s", exc)
        plots = [f"(no plots: {exc})", ""]
    pct = percent(metrics["level"])
    lines = [
        f"# Labeler evaluation: task `{info['task']}`",
        "",
        f"- input: `{info['input']}` ({metrics['n']} human labels on {metrics['pairs']} pairs)",
        f"- model: `{info['model']}`, task version `{info['task_version']}`",
        f"- human-preferred response shown as A or B by a fair coin per item (position seed {info['position_seed']})",
        f"- CIs: {pct}% percentile bootstrap over prompts (a prompt's pairs and labels resampled together; "
        f"{metrics['prompts']} prompts in all), {2000} resamples, seed {info['seed']}",
        "",
        "## AI labeler alignment",
        "",
        "**AI labeler alignment** is the share of human-labeled pairs on which the AI labeler prefers the response "
        "the human preferred: its accuracy against human labels. Every labeled row counts (a pair labeled by three "
        "humans counts three times); a pick at exactly P(A) = 0.5 counts half.",
        "",
        f"| labeling | AI labeler alignment | {pct}% CI | Brier | ECE ({metrics['bins']} bins) | prefers longer |",
        "|---|---|---|---|---|---|",
    ]
    for order, m in metrics["orders"].items():
        lines.append(
            f"| {ORDERS[order]} | {_f(m['alignment'])} | [{_f(m['ci_low'])}, {_f(m['ci_high'])}] | "
            f"{_f(m['brier'])} | {_f(m['ece'])} | {_f(m['length']['labeler_longer'])} |"
        )
    first = next(iter(metrics["orders"].values()), None)
    if first is not None:
        lines.append(f"| humans | | | | | {_f(first['length']['human_longer'])} |")
    lines.append("")
    if "position_consistency" in metrics:
        lines += [
            "- position consistency (share of pairs whose two orders pick the same winner): "
            f"**{_f(metrics['position_consistency'])}**",
            f"- alignment on the {metrics['consistent_pairs']} position-consistent pairs "
            f"({metrics['consistent_labels']} labels): {_f(metrics['alignment_when_consistent'])}",
        ]
    if first is not None:
        lines.append(
            f"- length bias over the {first['length']['pairs']} labels on pairs of unequal length (characters); "
            "0.5 = no preference for length"
        )
    lines += ["", "## Human-human agreement", "", *human_agreement_lines(metrics.get("human_agreement"), pct)]
    lines += [
        "",
        "Brier = mean (P(A) - y)^2; ECE = sum over equal-width bins of (n_b/N)|share humans chose A - mean P(A)|.",
        "",
        *plots,
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def human_agreement_lines(h: dict[str, Any] | None, pct: str) -> list[str]:
    """The report's paragraph comparing AI-human with human-human agreement."""
    if not h or not h["pairs"]:
        return [
            "No pair in the input was labeled by more than one human, so human-human agreement cannot be measured "
            "from it. To measure it, give each annotator's choice as its own row (the same context and responses, "
            "repeated, in any order)."
        ]
    hh_lo, hh_hi = h["human_human_ci"]
    ai_lo, ai_hi = h["ai_human_ci"]
    return [
        f"On the {h['pairs']} pairs labeled by more than one human ({h['labels']} labels; "
        f"prompts the CIs resample: {h['prompts']}):",
        "",
        f"- two humans agree: **{_f(h['human_human'])}** [{pct}% CI {_f(hh_lo)}, {_f(hh_hi)}]",
        f"- the AI labeler (both orders) agrees with a human: **{_f(h['ai_human'])}** "
        f"[{pct}% CI {_f(ai_lo)}, {_f(ai_hi)}]",
        "",
        "Human-human agreement is the yardstick for alignment: near it, the labeler agrees with an annotator about "
        "as often as annotators agree with each other; above it, more often (as a labeler that follows the "
        "majority view can). Per pair: the share of its pairs of annotators who agree, and the labeler's mean "
        "agreement with its labels; both averaged over pairs.",
    ]


# -- jobs ---------------------------------------------------------------------------------------------
def normalize_human_labeled(where: str, rec: Any) -> Pair:
    """`normalize_pair` for `labeler eval`: a pair without a human choice is malformed there."""
    p = normalize_pair(where, rec)
    if p.human is None:
        raise MalformedRecord(
            where,
            "no human choice: use TRL prompt/chosen/rejected, HH chosen/rejected, "
            'or context/response_a/response_b with "preferred": "a" | "b"',
        )
    if p.response_a == p.response_b:
        # Nothing to choose between: whichever side the labeler picks, it would count as
        # agreeing (or not) by position alone, as the coin cannot turn two equal responses.
        raise MalformedRecord(where, "the two responses are the same text: no human choice between them")
    return p


def eval_jobs(pairs: Sequence[Pair], params: dict[str, Any], position_seed: int = 0) -> list[Job]:
    """Jobs for `labeler eval`: each pair (`normalize_human_labeled`) with its human choice, the
    human-preferred response shown as A or B by `swap_for_position`; rows record which side the
    human chose. A pair is shown one way whichever way round its rows give it (annotators who
    disagree give it both ways), so it is one item, read once: the coin turns the pair with
    its responses in sorted order. Its one stored row keeps every human label of the pair
    (`humans`, in input order), beside the label of the row it was built for (`human`)."""
    humans: dict[str, list[str]] = {}

    def job(p: Pair) -> Job:
        assert p.human is not None, "read with normalize_human_labeled"
        given = pair_item(p)
        first, second = sorted((given.response_a, given.response_b))
        item = PairItem(given.context, first, second)
        if swap_for_position(item_digest(item), position_seed):
            item = PairItem(given.context, second, first)
        swap = item.response_a != given.response_a
        human = p.human if not swap else ("b" if p.human == "a" else "a")
        key = pair_key(item, params)
        # The file keeps one row per pair: without all its labels, a reader could not recount
        # the alignment from the file.
        humans.setdefault(key, []).append(human)

        def make_row(r: dict[str, Any]) -> dict[str, Any]:
            return {
                "context": item.context,
                "response_a": item.response_a,
                "response_b": item.response_b,
                "human": human,
                "humans": humans[key],
                "swapped": swap,
                "p_a": r["p_a"],
                "p_a_ab": r["p_a_ab"],
                "p_a_ba": r["p_a_ba"],
                "consistent": r["consistent"],
                "label_mass": r["label_mass"],
            } | _meta(params, key)

        return Job(key, p.where, item, make_row)

    return [job(p) for p in pairs]


def match_policies(
    a: Sequence[tuple[Any, Single]],
    b: Sequence[tuple[Any, Single]],
    *,
    differing: str = "each is judged on A's prompt",
) -> tuple[list[tuple[Single, Single]], int, int]:
    """Pair up two policies' outputs on the same prompts: by `id` when every record has one,
    else by prompt text; the k-th occurrence of an id (several samples per prompt) or of a
    prompt in A goes with the k-th in B. Returns (matched pairs in A's order, unmatched in A,
    unmatched in B); warns when records matched by id have different prompts, saying what the
    command does with them (`differing`), and when one file has ids and the other none. A file
    where some records have an id and others none is refused (MalformedRecord naming the
    first without one): matched by prompt text, its ids would be ignored without a word."""
    for rows in (a, b):
        given = sum(i is not None for i, _ in rows)
        if 0 < given < len(rows):
            where = next(s.where for i, s in rows if i is None)
            raise MalformedRecord(
                where,
                f"no 'id', where {given} other records of its file have one: give every record an id "
                "(records match by id) or none (they match by prompt text)",
            )
    with_ids = [all(i is not None for i, _ in rows) for rows in (a, b)]
    use_id = all(with_ids)
    if any(with_ids) and not use_id:
        log.warning(
            "policy %s's records have ids and %s's none: they are matched by prompt text, the ids left aside",
            *("AB" if with_ids[0] else "BA"),
        )

    def keyed(rows: Sequence[tuple[Any, Single]]) -> dict[Any, Single]:
        seen: dict[Any, int] = {}
        out = {}
        for i, s in rows:
            # Ids match by their JSON text: a list or an object by value, 1 and "1" and true apart,
            # 2 and 2.0 alike (one JSON number; a table's id column written as floats).
            if isinstance(i, float) and i.is_integer():
                i = int(i)
            tag = ("id", json.dumps(i, sort_keys=True)) if use_id else ("prompt", s.context)
            n = seen[tag] = seen.get(tag, -1) + 1
            out[(*tag, n)] = s
        return out

    ka, kb = keyed(a), keyed(b)
    matched = [(s, kb[k]) for k, s in ka.items() if k in kb]
    differ = [k[1] for k, s in ka.items() if k in kb and s.context != kb[k].context]
    if differ:  # ids out of step between the files
        log.warning(
            "%d of %d records matched by id have different prompts in A and B (first: id %s); %s",
            len(differ),
            len(matched),
            differ[0],
            differing,
        )
    return matched, len(ka) - len(matched), len(kb) - len(matched)


def same_answers(sa: Single, sb: Single) -> bool:
    """Whether two matched responses are the same text as the labeler would read them."""
    return sa.response == sb.response


def winrate_jobs(
    matched: Sequence[tuple[Single, Single]], params: dict[str, Any], position_seed: int = 0
) -> list[Job | None]:
    """Jobs for `labeler winrate`, one per matched pair: policy A's response as A, policy B's
    as B, same prompt. Read in one order, the labeler would credit its position bias to the
    policy shown first: there, which response is shown first is a fair coin fixed per pair
    (`swap_for_position` on the pair with its responses in sorted order, as `eval_jobs` does:
    the same item and key whichever file is A), and the rows give P(A) and each order's
    reading from policy A's side either way, `a_is` the side of the labeled pair policy A's
    response is on, `shown_first` the policy the labeler read first (None in both orders).

    A pair whose two responses are the same text (`same_answers`) gets None, not a job: the
    coin cannot turn it, so in one order its outcome would be the labeler's position bias
    alone, credited to one policy; it is a tie (`tie_row`), whatever the order."""
    order = params["order"]

    def job(sa: Single, sb: Single) -> Job:
        item = PairItem(sa.context, sa.response, sb.response)
        if order != "both":
            first, second = sorted((sa.response, sb.response))
            item = PairItem(sa.context, first, second)
            if swap_for_position(item_digest(item), position_seed):
                item = PairItem(sa.context, second, first)
        swap = item.response_a != sa.response  # B's response is the labeled pair's first
        # Order "ab" reads the pair's first response first, "ba" its second.
        shown_first = None if order == "both" else "b" if swap == (order == "ab") else "a"
        key = pair_key(item, params)

        def make_row(r: dict[str, Any]) -> dict[str, Any]:
            # `r` reads the item, its first response as A (a result, or a row of `label` or
            # `eval`), or is a row of this command, read from its policy A's side; either
            # way, turned to this job's policy A's side.
            p_a, p_ab, p_ba = r["p_a"], r["p_a_ab"], r["p_a_ba"]
            if (_a_is(r) == "b") != swap:  # the item's order "ab" is the policies' "ba"
                p_a, p_ab, p_ba = 1.0 - p_a, _flip(p_ba), _flip(p_ab)
            return {
                "prompt": sa.prompt,
                "response_a": sa.completion,
                "response_b": sb.completion,
                "p_a": p_a,
                "p_a_ab": p_ab,
                "p_a_ba": p_ba,
                "consistent": r["consistent"],
                "outcome": win_outcomes([p_ab], [p_ba])[0],
                "shown_first": shown_first,
                "a_is": "b" if swap else "a",
            } | _meta(params, key)

        return Job(key, f"A {sa.where} / B {sb.where}", item, make_row)

    return [None if same_answers(sa, sb) else job(sa, sb) for sa, sb in matched]


def _a_is(row: dict[str, Any]) -> str:
    """The side of the labeled pair a stored row's P(A) reads from: "a" for a result or a row of
    `label` or `eval` (the pair as labeled), a `winrate` row's `a_is`. A `winrate` row written
    before rows had `a_is` marked the pair turned with `shown_first` = "b", in every order."""
    if "a_is" in row:
        return row["a_is"]
    return "b" if row.get("shown_first") == "b" else "a"


def tie_row(sa: Single, sb: Single, params: dict[str, Any]) -> dict[str, Any]:
    """A `winrate` row for a pair of the same answers, not judged: a tie, P(A) = 1/2 in the
    orders the run reads, no reading to be consistent or not, nothing shown first."""
    order = params["order"]
    return {
        "prompt": sa.prompt,
        "response_a": sa.completion,
        "response_b": sb.completion,
        "p_a": 0.5,
        "p_a_ab": 0.5 if order in ("both", "ab") else None,
        "p_a_ba": 0.5 if order in ("both", "ba") else None,
        "consistent": None,
        "outcome": 0.5,
        "shown_first": None,
        "same_answers": True,
    }


def winrate_rows(
    matched: Sequence[tuple[Single, Single]],
    jobs: Sequence[Job | None],
    stored: dict[str, dict[str, Any]],
    params: dict[str, Any],
) -> list[tuple[Single, Single, dict[str, Any]]]:
    """(A's record, B's record, the row from A's side) per matched pair that has one, in
    order: a judged pair's row rebuilt from its result in `stored` (by key; one skipped as
    invalid has none and is left out), a pair of the same answers its `tie_row`."""
    out = []
    for (sa, sb), j in zip(matched, jobs, strict=True):
        if j is None:
            out.append((sa, sb, tie_row(sa, sb, params)))
        elif j.key in stored:
            out.append((sa, sb, j.make_row(stored[j.key])))
    return out


def _flip(p: float | None) -> float | None:
    return None if p is None else 1.0 - p
