"""A real TRL GRPOTrainer run rewarded by the labeler's pairwise rewards: group-relative (each
completion against the others of its prompt) and against a reference column of the dataset,
then TRL's evaluation, whose groups are of `num_generations_eval`.

Run by tests/test_frameworks_trl.py with the frameworks venv's Python; writes one JSON object:
what TRL logged per reward function and what each reward call received (a weight-0 recorder),
in training and in the evaluation. A second run gives the group reward function a
`num_generations` that does not match the trainer's (3, and 2, which divides it) and records
the errors TRL's calls raised.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from datasets import Dataset
from labeler_client.trl import group_reward_function, reference_reward_function
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer
from trl_grpo import grpo_config  # this directory's sibling driver (the script's own directory is on sys.path)

PROMPTS = ["Name a fruit.", "What is 2+2?"]
REFERENCES = ["An apple.", "4"]
NUM_GENERATIONS = 4
EVAL_GENERATIONS = 2


class Recorder:
    """A reward function (weight 0) that keeps what TRL passed."""

    __name__ = "recorder"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, **columns):
        self.calls.append({"prompts": prompts, "completions": completions, "reference": list(columns["reference"])})
        return [0.0] * len(completions)


def train(model_dir: str, reward_funcs: list, steps: int, evaluate: bool = False) -> GRPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "reference": REFERENCES})
    with tempfile.TemporaryDirectory() as out:
        args = grpo_config(
            out,
            per_device_train_batch_size=2 * NUM_GENERATIONS,  # both prompts' groups in one batch
            num_generations=NUM_GENERATIONS,
            num_generations_eval=EVAL_GENERATIONS,
            per_device_eval_batch_size=2 * EVAL_GENERATIONS,
            max_completion_length=6,
            max_steps=steps,
            reward_weights=[1.0] * (len(reward_funcs) - 1) + [0.0],
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=dataset,
            eval_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        if evaluate:
            trainer.evaluate()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--task", default="tiny")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)  # the labeler server shares the machine
    torch.manual_seed(0)
    group = group_reward_function(
        a.url, task=a.task, num_generations=NUM_GENERATIONS, num_generations_eval=EVAL_GENERATIONS
    )
    vs_ref = reference_reward_function(a.url, task=a.task)
    recorder = Recorder()
    trainer = train(a.model_dir, [group, vs_ref, recorder], a.steps, evaluate=True)

    def logged(prefix: str) -> dict:
        return {
            f.__name__: {
                stat: [
                    h[key] for h in trainer.state.log_history if (key := f"{prefix}rewards/{f.__name__}/{stat}") in h
                ]
                for stat in ("mean", "std")
            }
            for f in (group, vs_ref)
        }

    # The trainer's groups are of 4; a function told 3 cannot find whole groups in a batch of 8.
    try:
        train(a.model_dir, [group_reward_function(a.url, task=a.task, num_generations=3), Recorder()], 1)
        mismatch = None
    except ValueError as exc:
        mismatch = str(exc)
    # A function told 2 finds whole groups of 2, each prompt's 4 completions split in two.
    try:
        train(a.model_dir, [group_reward_function(a.url, task=a.task, num_generations=2), Recorder()], 1)
        divisor = None
    except ValueError as exc:
        divisor = str(exc)
    out = {
        "reward_func_names": trainer.reward_func_names,
        "logged": logged(""),
        "calls": recorder.calls[: a.steps],
        "eval_logged": logged("eval_"),
        "eval_calls": recorder.calls[a.steps :],
        "mismatch": mismatch,
        "mismatch_divisor": divisor,
    }
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
