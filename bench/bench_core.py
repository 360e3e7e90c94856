"""P4 and P5: the cost of both orders and of the exact 1-10 distribution, on the CPU engine.

P4 = time(one pair, both orders) / time(the same pair, one order), on a workload shaped
     like the summarization task: the summarize preamble and a post make ~80% of one
     order's tokens, the two summaries the rest. Naive (two independent forwards): 2.0.
P5 = time(exact 1-10 distribution) / time(one plain forward of the same prompt).
     Naive (one forward per label): 10.

Each figure is a ratio of medians measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.common import Result, median_time
from labeler import Labeler, PairItem, ScoreItem
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
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    engine = TransformersEngine(resolve_model(args.model))
    lab = Labeler(engine)
    results: list[Result] = []

    # P4 -----------------------------------------------------------------------------------
    ratios, shares = [], []
    for post, (good, bad) in zip(POSTS, SUMMARIES, strict=True):
        item = PairItem(post, good, bad)
        ab = lab.render_pairwise("summarize", post, good, bad, order="ab").prompt_token_ids
        ba = lab.render_pairwise("summarize", post, good, bad, order="ba").prompt_token_ids
        common = next(i for i, (x, y) in enumerate(zip(ab, ba, strict=False)) if x != y)
        shares.append(common / len(ab))
        t_one = median_time(lambda item=item: lab.preferences([item], "summarize", order="ab"), args.repeats)
        t_both = median_time(lambda item=item: lab.preferences([item], "summarize", order="both"), args.repeats)
        ratios.append(t_both / t_one)
    p4 = sum(ratios) / len(ratios)
    results.append(
        Result(
            "P4",
            "both-orders pair cost / one-order cost (CPU, transformers engine)",
            p4,
            1.3,
            "lower",
            detail=f"shared prefix = {100 * sum(shares) / len(shares):.0f}% of one order's tokens; "
            f"per pair: {', '.join(f'{r:.3f}' for r in ratios)}; naive: 2.0",
        )
    )

    # P5 -----------------------------------------------------------------------------------
    ratios = []
    for post, (good, _) in zip(POSTS, SUMMARIES, strict=True):
        item = ScoreItem(post, good)
        ids = torch.tensor([list(lab.render_score("summarize", post, good).prompt_token_ids)])

        def plain_forward(ids=ids):
            with torch.inference_mode():
                engine.model(input_ids=ids)

        t_plain = median_time(plain_forward, args.repeats)
        t_exact = median_time(lambda item=item: lab.scores([item], "summarize"), args.repeats)
        ratios.append(t_exact / t_plain)
    p5 = sum(ratios) / len(ratios)
    results.append(
        Result(
            "P5",
            "exact 1-10 distribution cost / one plain forward of the same prompt",
            p5,
            1.2,
            "lower",
            detail=f"per prompt: {', '.join(f'{r:.3f}' for r in ratios)}; naive: 10",
        )
    )
    for r in results:
        print(json.dumps(r.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
