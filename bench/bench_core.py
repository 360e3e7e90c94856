"""P4-P7: what the exact labels and the shared prefixes cost, on the CPU engine.

P4 = time(one pair, both orders) / time(the same pair, one order), on a workload shaped
     like the summarization task: the summarize preamble and a post make ~80% of one
     order's tokens, the two summaries the rest. Naive (two independent forwards): 2.0.
P5 = time(exact 1-10 distribution) / time(one plain forward of the same prompt).
     Naive (one forward per label): 10.
P6 = time(group-relative rewards of one group of 8 completions: 56 ordered comparisons in
     one labeler call) / time(the same 56 prompts as plain padded batches, no prefix
     sharing, logits at the last position only), with a ~300-token context and ~100-token
     completions; the median of per-round ratios over alternating rounds (one call of each
     a round: a plain pass takes minutes on a CPU). P6b: the group's time / time(8 direct
     scores of the same completions, one labeler call), same rounds.
P7 = time(yes/no judgment, exact P(yes)) / time(one plain forward of the same prompt).

Each figure is a ratio of medians measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

from bench.common import Result, median_time
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
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds for P6")
    ap.add_argument("--only", nargs="*", default=["P4", "P5", "P6", "P7"], help="figures to measure")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    engine = TransformersEngine(resolve_model(args.model))
    lab = Labeler(engine)
    results: list[Result] = []

    if "P4" in args.only:
        results.append(bench_orders(lab, args.repeats))
    if "P5" in args.only:
        results.append(bench_scores(lab, engine, args.repeats))
    if "P6" in args.only:
        results += bench_group(lab, engine, args.rounds)
    if "P7" in args.only:
        results.append(bench_judgment(lab, engine, args.repeats))
    for r in results:
        print(json.dumps(r.to_dict()))
    return 0


def bench_orders(lab: Labeler, repeats: int) -> Result:
    """P4: both orders against one order of the same pair."""
    ratios, shares = [], []
    for post, (good, bad) in zip(POSTS, SUMMARIES, strict=True):
        item = PairItem(post, good, bad)
        ab = lab.render_pairwise("summarize", post, good, bad, order="ab").prompt_token_ids
        ba = lab.render_pairwise("summarize", post, good, bad, order="ba").prompt_token_ids
        common = next(i for i, (x, y) in enumerate(zip(ab, ba, strict=False)) if x != y)
        shares.append(common / len(ab))
        t_one = median_time(lambda item=item: lab.preferences([item], "summarize", order="ab"), repeats)
        t_both = median_time(lambda item=item: lab.preferences([item], "summarize", order="both"), repeats)
        ratios.append(t_both / t_one)
    return Result(
        "P4",
        "both-orders pair cost / one-order cost (CPU, transformers engine)",
        sum(ratios) / len(ratios),
        1.3,
        "lower",
        detail=f"shared prefix = {100 * sum(shares) / len(shares):.0f}% of one order's tokens; "
        f"per pair: {', '.join(f'{r:.3f}' for r in ratios)}; naive: 2.0",
    )


def exact_vs_plain(
    lab: Labeler, engine: TransformersEngine, repeats: int, render: Callable, label: Callable
) -> list[float]:
    """Per summarize post: the time of `label([item], "summarize")` over one plain forward of the
    prompt `render("summarize", post, summary)` builds."""
    ratios = []
    for post, (good, _) in zip(POSTS, SUMMARIES, strict=True):
        item = ScoreItem(post, good)
        ids = torch.tensor([list(render("summarize", post, good).prompt_token_ids)])

        def plain_forward(ids=ids):
            with torch.inference_mode():
                engine.model(input_ids=ids)

        t_plain = median_time(plain_forward, repeats)
        t_label = median_time(lambda item=item: label([item], "summarize"), repeats)
        ratios.append(t_label / t_plain)
    return ratios


def bench_scores(lab: Labeler, engine: TransformersEngine, repeats: int) -> Result:
    """P5: the exact 1-10 distribution against one plain forward of the same prompt."""
    ratios = exact_vs_plain(lab, engine, repeats, lab.render_score, lab.scores)
    return Result(
        "P5",
        "exact 1-10 distribution cost / one plain forward of the same prompt",
        sum(ratios) / len(ratios),
        1.2,
        "lower",
        detail=f"per prompt: {', '.join(f'{r:.3f}' for r in ratios)}; naive: 10",
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
    """P6 and P6b, as medians of per-round ratios over alternating rounds."""
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

    def plain_batches() -> None:
        with torch.inference_mode():
            for k in range(0, len(prompts), batch):
                chunk = prompts[k : k + batch]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, p in enumerate(chunk):  # left padding: every prompt ends at the last column
                    ids[row, width - len(p) :] = torch.tensor(p)
                    mask[row, width - len(p) :] = 1
                engine.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    items = [ScoreItem(group.context, r) for r in group.responses]
    times: list[tuple[float, float, float]] = []
    for _ in range(rounds):
        t_group = median_time(lambda: lab.group_rewards([group], "helpful"), 1, warmup=0)
        t_plain = median_time(plain_batches, 1, warmup=0)
        t_scores = median_time(lambda: lab.scores(items, "helpful"), 1, warmup=0)
        times.append((t_group, t_plain, t_scores))
    p6 = statistics.median(g / p for g, p, _ in times)
    p6b = statistics.median(g / s for g, _, s in times)
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
            f"(max_batch_tokens {engine.max_batch_tokens}); median of {rounds} alternating rounds "
            f"(group / plain / {n} direct scores: {per_round})",
        ),
        Result(
            "P6b",
            f"group-relative rewards of {n} completions / {n} direct 1-10 scores of the same completions",
            p6b,
            None,
            "lower",
            detail=f"same rounds as P6; {n} direct scores in one call; information, no goal",
        ),
    ]


def bench_judgment(lab: Labeler, engine: TransformersEngine, repeats: int) -> Result:
    """P7: the exact yes/no probability against one plain forward of the same prompt."""
    ratios = exact_vs_plain(lab, engine, repeats, lab.render_judgment, lab.judgments)
    return Result(
        "P7",
        "exact yes/no judgment cost / one plain forward of the same prompt",
        sum(ratios) / len(ratios),
        1.1,
        "lower",
        detail=f"per prompt: {', '.join(f'{r:.3f}' for r in ratios)}; labels Yes/yes/No/no, one token each",
    )


if __name__ == "__main__":
    sys.exit(main())
