"""P4-P7: what the exact labels and the shared prefixes cost, on the CPU engine.

P4 = time(one pair, both orders) / time(the same pair, one order), on a workload shaped
     like the summarization task: the summarize preamble and a post make ~80% of one
     order's tokens, the two summaries the rest. Naive (two independent forwards): 2.0.
P5 = time(exact 1-10 distribution) / time(one plain forward of the same prompt).
     Naive (one forward per label): 10.
P6 = time(group-relative rewards of one group of 8 completions: 56 ordered comparisons in
     one labeler call) / time(the same 56 prompts as plain padded batches, no prefix
     sharing, logits at the last position only), with a ~300-token context and ~100-token
     completions. P6b: the group's time / time(8 direct scores of the same completions,
     one labeler call), same rounds.
P7 = time(yes/no judgment, exact P(yes)) / time(one plain forward of the same prompt).

A plain forward (P5, P7) computes the logits of the last position only
(`logits_to_keep=1`), as the labeler computes them only at the positions it reads: both
sides pay for the same layers, and the lm_head over one position.

How each figure is computed: P4, P5 and P7 run `--repeats` rounds; a round times both
sides on each of the two summarize prompts, which side goes first alternating from round
to round; a round's ratio is the sum of its times of one side over the other's, and the
figure is the median of the rounds' ratios. P6 and P6b run `--rounds` rounds (a plain
pass takes minutes on a CPU), one call of each of the three a round, the order rotating
from round to round; each figure is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable

import torch

from bench.common import Result, add_results_option, emit, median, run_round
from labeler import GroupItem, Labeler, PairItem, ScoreItem
from labeler.engines.transformers_engine import TransformersEngine
from labeler.models import resolve_model

POSTS = [
    (
        "My roommate and I split rent evenly, but she has her boyfriend over five nights a week. He showers here, "
        "eats our groceries and uses the laundry. I asked her twice to chip in more for utilities and she says it "
        "is not a big deal because he does not live here. Our lease ends in four months. I do not want to fight, "
        "but I am paying for a third person. Last month the electricity bill was forty dollars higher than usual "
        "and the water bill doubled. Should I bring it up again, ask him directly, or just wait it out until the "
        "lease ends and find a new place? What would be a fair amount to ask for?"
    ),
    (
        "I have worked at a small software company for three years. A recruiter offered me a job at a large firm "
        "with a thirty percent raise, but the team there has a reputation for long hours. My current manager is "
        "great and has promised a promotion next spring, though nothing is in writing. I am also planning to start "
        "a part-time master's degree next year, which my current employer would partly pay for. I like my "
        "colleagues and the work is interesting, but the money matters because I have student loans. How should I "
        "weigh the raise against the promised promotion and the flexibility I have now?"
    ),
]
SUMMARIES = [
    (
        "Roommate's boyfriend is over most nights and raises bills; she won't pay more. Ask again, ask him, or wait?",
        "Roommate has a boyfriend.",
    ),
    (
        "Offered a 30% raise at a firm with long hours vs. an unwritten promotion and tuition help at my job. Which?",
        "I have a job and got an offer.",
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7, help="rounds for P4, P5 and P7")
    ap.add_argument("--rounds", type=int, default=3, help="rounds for P6 and P6b")
    figures = ["P4", "P5", "P6", "P7"]  # P6 measures P6b too
    ap.add_argument("--only", nargs="*", choices=figures, default=figures, help="figures to measure")
    ap.add_argument("--model", default=None)
    add_results_option(ap)
    args = ap.parse_args()
    engine = TransformersEngine(resolve_model(args.model))
    lab = Labeler(engine)
    if "P4" in args.only:
        emit(bench_orders(lab, args.repeats), args.results)
    if "P5" in args.only:
        emit(bench_scores(lab, engine, args.repeats), args.results)
    if "P6" in args.only:
        for r in bench_group(lab, engine, args.rounds):
            emit(r, args.results)
    if "P7" in args.only:
        emit(bench_judgment(lab, engine, args.repeats), args.results)
    return 0


Sides = list[tuple[Callable[[], object], Callable[[], object]]]


def paired_rounds(sides: Sides, rounds: int) -> list[list[list[float]]]:
    """times[round][prompt] = [reference side's time, measured side's time]: each round runs
    both sides once on every prompt, the reference first in even rounds, the measured side
    in odd ones; one unmeasured call of each side and prompt before."""
    for reference, measured in sides:
        reference()
        measured()
    return [[run_round(pair, r) for pair in sides] for r in range(rounds)]


def summarize_rounds(times: list[list[list[float]]]) -> tuple[float, list[float], list[float]]:
    """(median of the rounds' ratios, the rounds' ratios, each prompt's median ratio), a
    round's ratio being its measured side's summed time over its reference side's."""
    per_round = [sum(t[1] for t in rnd) / sum(t[0] for t in rnd) for rnd in times]
    per_prompt = [median(rnd[p][1] / rnd[p][0] for rnd in times) for p in range(len(times[0]))]
    return median(per_round), per_round, per_prompt


def how_computed(per_round: list[float], per_prompt: list[float], sides: str) -> str:
    return (
        f"median of {len(per_round)} rounds' ratios ({sides}, both prompts of a round, which side first "
        f"alternating by round): {', '.join(f'{r:.3f}' for r in per_round)}; per prompt, the median of its "
        f"rounds: {', '.join(f'{r:.3f}' for r in per_prompt)}"
    )


def bench_orders(lab: Labeler, repeats: int) -> Result:
    """P4: both orders against one order of the same pair."""
    shares = []
    sides: Sides = []
    for post, (good, bad) in zip(POSTS, SUMMARIES, strict=True):
        item = PairItem(post, good, bad)
        ab = lab.render_pairwise("summarize", post, good, bad, order="ab").prompt_token_ids
        ba = lab.render_pairwise("summarize", post, good, bad, order="ba").prompt_token_ids
        common = next(i for i, (x, y) in enumerate(zip(ab, ba, strict=False)) if x != y)
        shares.append(common / len(ab))
        sides.append(
            (
                lambda item=item: lab.preferences([item], "summarize", order="ab"),
                lambda item=item: lab.preferences([item], "summarize", order="both"),
            )
        )
    value, per_round, per_prompt = summarize_rounds(paired_rounds(sides, repeats))
    return Result(
        "P4",
        "both-orders pair cost / one-order cost (CPU, transformers engine)",
        value,
        1.3,
        "lower",
        detail=f"shared prefix = {100 * sum(shares) / len(shares):.0f}% of one order's tokens; "
        + how_computed(per_round, per_prompt, "time of both orders ÷ one order")
        + "; naive: 2.0",
    )


def exact_vs_plain(
    lab: Labeler, engine: TransformersEngine, repeats: int, render: Callable, label: Callable
) -> tuple[tuple[float, list[float], list[float]], str]:
    """For the summarize posts: `summarize_rounds` of `label([item], "summarize")` against one
    plain forward of the prompt `render("summarize", post, summary)` builds, and how the plain
    forward computes its logits."""
    keep = "logits_to_keep" in inspect.signature(engine.model.forward).parameters
    extra = {"logits_to_keep": 1} if keep else {}
    sides: Sides = []
    for post, (good, _) in zip(POSTS, SUMMARIES, strict=True):
        item = ScoreItem(post, good)
        ids = torch.tensor([list(render("summarize", post, good).prompt_token_ids)])

        def plain_forward(ids=ids):
            with torch.inference_mode():
                engine.model(input_ids=ids, **extra)

        sides.append((plain_forward, lambda item=item: label([item], "summarize")))
    logits = "the last position's logits only (logits_to_keep=1)" if keep else "every position's logits"
    return summarize_rounds(paired_rounds(sides, repeats)), f"the plain forward computes {logits}"


def bench_scores(lab: Labeler, engine: TransformersEngine, repeats: int) -> Result:
    """P5: the exact 1-10 distribution against one plain forward of the same prompt."""
    (value, per_round, per_prompt), plain = exact_vs_plain(lab, engine, repeats, lab.render_score, lab.scores)
    return Result(
        "P5",
        "exact 1-10 distribution cost / one plain forward of the same prompt",
        value,
        1.2,
        "lower",
        detail=how_computed(per_round, per_prompt, "time of the labels ÷ the plain forwards") + f"; {plain}; naive: 10",
    )


# Openings that differ from the first token, so the completions of a group share nothing
# beyond the prompt (the realistic worst case for sharing among completions).
OPENINGS = [
    "Honestly, I would",
    "My advice is to",
    "You should probably",
    "I think the fair thing is to",
    "Before anything else,",
    "In your position I would",
    "The simplest option is to",
    "It depends, but I would",
]
FILLER = " ".join(POSTS) + " " + " ".join(s for pair in SUMMARIES for s in pair)


def truncate(tokenizer, text: str, n: int) -> str:
    """`text` cut to its first `n` tokens."""
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n])


def group_workload(tokenizer, context_tokens: int = 300, completion_tokens: int = 100) -> GroupItem:
    """One prompt of ~`context_tokens` and 8 completions of ~`completion_tokens` each."""
    words = FILLER.split()
    context = truncate(tokenizer, " ".join(words * 3), context_tokens)
    completions = []
    for k, opening in enumerate(OPENINGS):
        rotated = words[k * 17 :] + words[: k * 17]
        completions.append(truncate(tokenizer, opening + " " + " ".join(rotated), completion_tokens))
    return GroupItem(context, completions)


def bench_group(lab: Labeler, engine: TransformersEngine, rounds: int) -> list[Result]:
    """P6 and P6b, as medians of per-round ratios over rounds whose order rotates."""
    tok = engine.tokenizer
    group = group_workload(tok)
    n = len(group.responses)
    task = lab.task("helpful")
    tag = lab.prompts.group_tag(group.context, group.responses)
    prompts = [
        lab.prompts.pairwise(task, group.context, group.responses[i], group.responses[j], tag=tag).prompt_token_ids
        for i in range(n)
        for j in range(n)
        if i != j
    ]
    before = engine.stats.computed_tokens
    lab.group_rewards([group], "helpful")  # also the warm-up
    computed = engine.stats.computed_tokens - before
    given = sum(len(p) for p in prompts)
    batch = max(1, engine.max_batch_tokens // max(len(p) for p in prompts))
    pad = tok.pad_token_id

    def plain_batches(upto: int = len(prompts)) -> None:
        with torch.inference_mode():
            for k in range(0, upto, batch):
                chunk = prompts[k : k + batch]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, p in enumerate(chunk):  # left padding: every prompt ends at the last column
                    ids[row, width - len(p) :] = torch.tensor(p)
                    mask[row, width - len(p) :] = 1
                engine.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    items = [ScoreItem(group.context, r) for r in group.responses]
    # The other sides' warm-ups (the group call above was the group's): a first call pays
    # one-time costs that would weigh on round 0 alone.
    plain_batches(batch)
    lab.scores(items[:1], "helpful")
    sides = [lambda: lab.group_rewards([group], "helpful"), plain_batches, lambda: lab.scores(items, "helpful")]
    times = [run_round(sides, r) for r in range(rounds)]
    p6 = median(g / p for g, p, _ in times)
    p6b = median(g / s for g, _, s in times)
    per_round = "; ".join(f"{g:.1f} / {p:.1f} / {s:.1f} s" for g, p, s in times)
    mean_ctx = len(tok.encode(group.context, add_special_tokens=False))
    mean_resp = sum(len(tok.encode(r, add_special_tokens=False)) for r in group.responses) / n
    return [
        Result(
            "P6",
            f"group-relative rewards, {n} completions ({n * (n - 1)} ordered comparisons) / the same prompts as "
            "plain padded batches",
            p6,
            0.4,
            "lower",
            detail=f"context {mean_ctx} tokens, completions {mean_resp:.0f} tokens on average, task helpful; "
            f"{len(prompts)} prompts of {given / len(prompts):.0f} tokens on average; tokens computed by the prefix "
            f"tree {computed:,} of {given:,} ({computed / given:.3f}); plain batches of {batch} prompts "
            f"(max_batch_tokens {engine.max_batch_tokens}); median of {rounds} rounds' ratios, one call of each "
            f"side a round, the order rotating by round (group / plain / {n} direct scores: {per_round})",
        ),
        Result(
            "P6b",
            f"group-relative rewards of {n} completions / {n} direct 1-10 scores of the same completions",
            p6b,
            None,
            "lower",
            detail=f"median of P6's rounds' ratios (group ÷ {n} direct scores in one call: "
            + ", ".join(f"{g / s:.3f}" for g, _, s in times)
            + "); information, no goal",
        ),
    ]


def bench_judgment(lab: Labeler, engine: TransformersEngine, repeats: int) -> Result:
    """P7: the exact yes/no probability against one plain forward of the same prompt."""
    (value, per_round, per_prompt), plain = exact_vs_plain(lab, engine, repeats, lab.render_judgment, lab.judgments)
    return Result(
        "P7",
        "exact yes/no judgment cost / one plain forward of the same prompt",
        value,
        1.1,
        "lower",
        detail=how_computed(per_round, per_prompt, "time of the labels ÷ the plain forwards")
        + f"; {plain}; labels Yes/yes/No/no, one token each",
    )


if __name__ == "__main__":
    sys.exit(main())
