"""TRL 1.16.0's own GRPO, RLOO and online DPO trainers, rewarded by the labeler through the
live server.

tests/frameworks/trl_grpo.py runs two training steps on the embedded model in the frameworks
venv, once with plain-text prompts (strings a chat template laid out) and once with
conversational ones; one prompt's completions are forced empty (a bare end-of-turn token).
TRL's logged mean reward of each step must equal the mean of the labeler's rewards for the
(prompt, completion) pairs TRL passed, computed here in process on the canonical transcripts,
and so must each per-sample reward TRL computed its advantages from. The conversational run
rewards with the async reward function, which TRL awaits on a loop of its own.
A NaN, a crash or a refused empty completion fails it. A third run gives the policy a tool:
TRL's tool loop runs the call the policy makes and appends the result, and the trajectory is
rewarded as the text the service reads it as. RLOO runs a conversational step with the async
reward function, checked the same way; online DPO runs a step with the sync one, and what it
logged of the rewards (their mean, and the mean margin of chosen over rejected) must be that
of the labeler's rewards with the higher-rewarded completion of each pair chosen. Tolerance
1e-5: above the ~3e-6 a reward moves with its batch-mates.
"""

from __future__ import annotations

import math
import statistics

import pytest
from labeler_client._text import completion_value, context_value

from labeler import GroupItem, PairItem, ReferenceItem, ScoreItem
from labeler.chat import normalize_item
from tests.fixtures.frameworks import run_driver

pytestmark = pytest.mark.model

TOL = 1e-5


def called_items(call: dict) -> list[dict]:
    """The items a reward call's (prompt, completion) pairs are to the service: canonical
    transcripts of both."""
    return [
        normalize_item({"context": context_value(p), "response": completion_value(c)})
        for p, c in zip(call["prompts"], call["completions"], strict=True)
    ]


def test_grpo_rloo_and_online_dpo_train_on_labeler_rewards_with_empty_and_tool_calling_completions(
    frameworks_python, live_server, labeler, model_dir, tmp_path
):
    out = run_driver(frameworks_python, "trl_grpo", tmp_path, "--url", live_server.url, "--model-dir", str(model_dir))
    contexts: dict[str, set[str]] = {}
    for mode, steps in (("plain", 2), ("conversational", 2), ("rloo", 1)):
        run = out[mode]
        assert run["reward_func_names"] == ["labeler_tiny", "recorder"]  # TRL names it by __name__
        assert len(run["logged"]) == len(run["calls"]) == len(run["rewards"]) == steps
        responses = []
        for logged, trained, call in zip(run["logged"], run["rewards"], run["calls"], strict=True):
            items = called_items(call)
            want = labeler.scores([ScoreItem(**it) for it in items], "tiny")
            assert math.isfinite(logged)
            assert logged == pytest.approx(sum(r.reward for r in want) / len(want), abs=TOL)
            # Each completion's reward, as TRL computed its advantage from (not only the mean).
            assert trained == pytest.approx([r.reward for r in want], abs=TOL)
            responses += [it["response"] for it in items]
            contexts.setdefault(mode, set()).update(it["context"] for it in items)
        assert "" in responses and any(responses), responses  # empty ones, rewarded like the others
    # Online DPO: two completions a prompt (TRL lays them out as two halves of the batch),
    # the higher-rewarded one chosen.
    dpo = out["online_dpo"]
    (call,) = dpo["calls"]
    rewards = [r.reward for r in labeler.scores([ScoreItem(**it) for it in called_items(call)], "tiny")]
    half = len(rewards) // 2
    assert half == 2 and call["prompts"][:half] == call["prompts"][half:]
    margins = [abs(a - b) for a, b in zip(rewards[:half], rewards[half:], strict=True)]
    assert dpo["logged"]["objective/scores"] == [pytest.approx(statistics.fmean(rewards), abs=TOL)]
    assert dpo["logged"]["objective/scores_margin"] == [pytest.approx(statistics.fmean(margins), abs=TOL)]
    assert statistics.fmean(margins) > 0  # the pairs' completions were told apart, so the margin is the labeler's
    checks = out["checks"]  # TRL's own helpers on our callables; pickled copies work as the originals
    assert checks["names"] == ["labeler_tiny", "labeler_tiny"] and checks["async"] == [False, True]
    assert checks["pickled"] == ["RewardFunction", "AsyncRewardFunction", "PairwiseJudge"]
    want = [
        r.reward for r in labeler.scores([ScoreItem("What is 2+2?", "4"), ScoreItem("Name a colour.", "Blue.")], "tiny")
    ]
    assert all(got == pytest.approx(want, abs=TOL) for got in checks["rewards"]), checks["rewards"]
    (p_pair,) = labeler.preferences([PairItem("What is 2+2?", "4", "5")], "tiny")
    assert checks["judged"] == [pytest.approx([p_pair.p_a], abs=TOL)] * 2
    # The same dialogues as strings with template markup and as messages: the same token ids
    # for the policy (same seed, same completions), the same contexts, the same rewards.
    texts = {
        m: [
            [normalize_item({"response": completion_value(c)})["response"] for c in call["completions"]]
            for call in out[m]["calls"]
        ]
        for m in contexts
    }
    assert texts["plain"] == texts["conversational"]
    assert out["plain"]["logged"] == pytest.approx(out["conversational"]["logged"], abs=TOL)
    assert contexts["plain"] == contexts["conversational"]
    assert "System: Answer in one word.\n\nUser: What is the capital of France?" in contexts["plain"]
    # With a tool: the trajectory TRL's tool loop built (the call, the tool's result, the
    # answer), rewarded as the text the service reads it as, calls and result included.
    tools = out["tools"]
    assert len(tools["logged"]) == len(tools["calls"]) == 1
    (call,) = tools["calls"]
    items = called_items(call)
    for completion, item in zip(call["completions"], items, strict=True):
        assert [m["role"] for m in completion] == ["assistant", "tool", "assistant"], completion
        assert completion[0]["tool_calls"][0]["function"] == {"name": "multiply", "arguments": {"a": 3, "b": 4}}
        assert item["response"] == '[call functions.multiply] {"a": 3, "b": 4}\n\nTool: 12\n\nIt is 12.'
    want = labeler.scores([ScoreItem(**it) for it in items], "tiny")
    assert tools["logged"][0] == pytest.approx(sum(r.reward for r in want) / len(want), abs=TOL)
    assert tools["rewards"] == [pytest.approx([r.reward for r in want], abs=TOL)]


def test_grpo_trains_on_group_relative_and_reference_rewards(
    frameworks_python, live_server, labeler, model_dir, tmp_path
):
    """TRL's GRPOTrainer with `group_reward_function` (groups found from TRL's own batch layout)
    and `reference_reward_function` (the dataset's `reference` column): TRL's logged mean and
    standard deviation of each equal those of the labeler's rewards for what TRL passed, in
    training and in TRL's evaluation (groups of `num_generations_eval`); a `num_generations`
    that does not match the trainer's fails the run with the layout error, also one that
    divides the trainer's (whole groups of it found, each prompt's completions split)."""
    out = run_driver(
        frameworks_python, "trl_grpo_pairwise", tmp_path, "--url", live_server.url, "--model-dir", str(model_dir)
    )
    assert out["reward_func_names"] == ["labeler_tiny_group", "labeler_tiny_vs_reference", "recorder"]

    def labeled(call: dict, size: int) -> tuple[list[dict], list[float]]:
        """The normalized items of a reward call, and the labeler's group rewards for its groups of `size`."""
        items = [
            normalize_item({"context": context_value(p), "response": completion_value(c), "reference": r})
            for p, c, r in zip(call["prompts"], call["completions"], call["reference"], strict=True)
        ]
        groups = [items[i : i + size] for i in range(0, len(items), size)]
        assert len(groups) == 2 and all(len({it["context"] for it in g}) == 1 for g in groups)  # TRL's layout
        want = labeler.group_rewards(
            [GroupItem(g[0]["context"], tuple(it["response"] for it in g)) for g in groups], "tiny"
        )
        return items, [r for w in want for r in w.rewards]

    group_log, ref_log = out["logged"]["labeler_tiny_group"], out["logged"]["labeler_tiny_vs_reference"]
    assert len(out["calls"]) == len(group_log["mean"]) == len(ref_log["mean"]) == 2
    for k, call in enumerate(out["calls"]):
        items, rewards = labeled(call, 4)
        assert group_log["mean"][k] == pytest.approx(0.0, abs=TOL)  # each group's rewards sum to 0
        assert group_log["std"][k] == pytest.approx(statistics.stdev(rewards), abs=TOL)
        refs = [r.reward for r in labeler.reference_rewards([ReferenceItem(**it) for it in items], "tiny")]
        assert ref_log["mean"][k] == pytest.approx(statistics.fmean(refs), abs=TOL)
        assert ref_log["std"][k] == pytest.approx(statistics.stdev(refs), abs=TOL)
    (call,) = out["eval_calls"]
    _, rewards = labeled(call, 2)
    eval_log = out["eval_logged"]["labeler_tiny_group"]
    assert eval_log["mean"] == [pytest.approx(0.0, abs=TOL)]
    assert eval_log["std"] == [pytest.approx(statistics.stdev(rewards), abs=TOL)]
    assert "not a multiple of num_generations=3" in out["mismatch"]
    assert "repeated 4 times in a row, a multiple of num_generations=2" in out["mismatch_divisor"]
