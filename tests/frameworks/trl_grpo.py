"""A real TRL GRPOTrainer run of a few steps on the embedded model, rewarded by the labeler.

Run by tests/test_frameworks_trl.py with the frameworks venv's Python (TRL pinned there);
prints one JSON object: per mode, what TRL logged, the per-sample rewards it trained on, and
what each reward call received. The plain run rewards with `reward_function`, the
conversational one with `async_reward_function` (TRL awaits it on a loop of its own).

One prompt of each run ends with "###", and the generation config biases the end-of-turn
token after that ending (`sequence_bias`, TRL's own `generation_kwargs`): its completions
are empty, as a small policy's often are, while the other prompt's are sampled freely.
A second reward function with weight 0 records what TRL passed to the reward functions.

A third run gives the policy a tool (`tools=`, TRL's tool-calling loop, with Qwen 3's chat
template, whose tool-call format TRL parses, on the same tokens): biased the same way, the
policy calls the tool, TRL runs it and appends its result, and the policy answers; the reward
functions get the whole trajectory as messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import tempfile

import torch
from datasets import Dataset
from labeler_client.trl import PairwiseJudge, async_reward_function, reward_function
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.chat_template_utils import qwen3_chat_template
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.trainer.utils import get_callable_name, is_async_callable

SYSTEM = {"role": "system", "content": "Answer in one word."}
DIALOGUES = [
    [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    [SYSTEM, {"role": "user", "content": "Say nothing at all ###"}],
]


TOOL_DIALOGUE = [{"role": "user", "content": "What is 3 times 4? Use the tool. ###"}]
TOOL_CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
TOOL_ANSWER = "It is 12."


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


# The settings every run of these drivers shares: CPU, fp32, seeded, every step logged,
# nothing saved or reported.
SHARED = {
    "learning_rate": 1e-6,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "use_cpu": True,
    "bf16": False,
    "seed": 0,
    "dataloader_num_workers": 0,
}


def grpo_config(out: str, config: type = GRPOConfig, **settings) -> GRPOConfig:
    """The shared settings, no KL term, and the run's own `settings`, as `config` (GRPO's by
    default, or RLOO's, which has the same fields)."""
    return config(output_dir=out, beta=0.0, **SHARED, **settings)


class Recorder:
    """A reward function (weight 0) that keeps what TRL passed."""

    __name__ = "recorder"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, **columns):
        self.calls.append({"prompts": prompts, "completions": completions})
        return [0.0] * len(completions)


class Rewards(TrainerCallback):
    """The per-sample rewards TRL computed advantages from at each step (the trainer's
    `_logs["rewards"]`, one generation batch long), of the reward function `name`."""

    def __init__(self, name: str) -> None:
        self.name, self.trainer, self.steps = name, None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(list(self.trainer._logs["rewards"][self.name]))


def trained(trainer: GRPOTrainer, name: str) -> dict:
    """Run `trainer`; what it logged of reward function `name`, and its per-sample rewards."""
    rewards = Rewards(name)
    rewards.trainer = trainer
    trainer.add_callback(rewards)
    trainer.train()
    key = f"rewards/{name}/mean"
    return {"logged": [h[key] for h in trainer.state.log_history if key in h], "rewards": rewards.steps}


def run(mode: str, model_dir: str, url: str, task: str, steps: int, rloo: bool = False) -> dict:
    """`steps` GRPO steps (RLOO's with `rloo`) on the dialogues, plain-text or conversational."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    templated = [tokenizer.apply_chat_template(d, tokenize=False, add_generation_prompt=True) for d in DIALOGUES]
    # The end of the second prompt as the policy reads it: " ###", then the template's end of
    # turn and assistant header (the suffix both prompts share).
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in templated]
    shared = next(n for n in range(1, len(ids[1])) if ids[0][-n - 1] != ids[1][-n - 1])
    tail = ids[1][-shared - 1 :]
    eos = tokenizer.eos_token_id
    # Conversational: the messages; plain: the same dialogues as strings laid out by the template.
    prompts = DIALOGUES if mode == "conversational" else templated
    dataset = Dataset.from_dict({"prompt": prompts})
    recorder = Recorder()
    # Conversational: the async reward function, which TRL awaits on a loop of its own.
    labeler = (async_reward_function if mode == "conversational" else reward_function)(url, task=task)
    with tempfile.TemporaryDirectory() as out:
        args = grpo_config(
            out,
            RLOOConfig if rloo else GRPOConfig,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=6,
            max_steps=steps,
            reward_weights=[1.0, 0.0],
            generation_kwargs={"sequence_bias": [[[*tail, eos], 100.0]]},
        )
        trainer = (RLOOTrainer if rloo else GRPOTrainer)(
            model=model,
            reward_funcs=[labeler, recorder],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        got = trained(trainer, labeler.__name__)
    return {"reward_func_names": trainer.reward_func_names, **got, "calls": recorder.calls}


def run_tools(model_dir: str, url: str, task: str) -> dict:
    """One GRPO step whose policy calls `multiply` (forced by `sequence_bias` after the
    prompt's " ###" ending), gets its result from TRL's tool loop, and answers (forced after
    the tool's result)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = qwen3_chat_template  # ChatML, as the model's own, and a tool-call format TRL parses
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def ids(messages: list, **kw) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tools=[multiply], tokenize=False, **kw)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def forced(after: list[int], text: str) -> list:
        """Biases that make the policy write `text` and end its turn right after `after`."""
        wanted = [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        return [[[*after, *wanted[: k + 1]], 100.0] for k in range(len(wanted))]

    asked = ids(TOOL_DIALOGUE, add_generation_prompt=True)
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}
    answered = TOOL_DIALOGUE + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "multiply", "content": "12"},
    ]
    after_tool = ids(answered, add_generation_prompt=True)

    def end(full: list[int], text: str) -> list[int]:  # the last tokens of `full`, as many as `text` has
        return full[-len(tokenizer(text, add_special_tokens=False)["input_ids"]) :]

    # The prompt's end from its " ###" on; the tool result's end from the result on.
    tail = end(asked, "###<|im_end|>\n<|im_start|>assistant\n")
    result_tail = end(after_tool, "12\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    recorder = Recorder()
    labeler = reward_function(url, task=task)
    with tempfile.TemporaryDirectory() as out:
        args = grpo_config(
            out,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=96,
            max_steps=1,
            reward_weights=[1.0, 0.0],
            generation_kwargs={"sequence_bias": forced(tail, TOOL_CALL) + forced(result_tail, TOOL_ANSWER)},
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[labeler, recorder],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": [TOOL_DIALOGUE]}),
            processing_class=tokenizer,
            tools=[multiply],
        )
        got = trained(trainer, labeler.__name__)
    return {**got, "calls": recorder.calls}


def run_online_dpo(model_dir: str, url: str, task: str) -> dict:
    """One online DPO step (TRL's `trl.experimental.online_dpo`) on the plain-text prompts,
    rewarded by the (sync) reward function: TRL samples two completions a prompt and keeps
    the higher-rewarded one as chosen. What it logged of the rewards, and what each reward
    call received."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [tokenizer.apply_chat_template(d, tokenize=False, add_generation_prompt=True) for d in DIALOGUES]
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as out:
        args = OnlineDPOConfig(
            output_dir=out,
            per_device_train_batch_size=2,
            max_new_tokens=8,
            max_steps=1,
            reward_weights=[1.0, 0.0],
            **SHARED,
        )
        trainer = OnlineDPOTrainer(
            model=model,
            reward_funcs=[reward_function(url, task=task), recorder],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
        )
        trainer.train()
    logged = {
        k: [h[k] for h in trainer.state.log_history if k in h] for k in ("objective/scores", "objective/scores_margin")
    }
    return {"logged": logged, "calls": recorder.calls}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="where the JSON goes (the trainer prints to stdout)")
    p.add_argument("--url", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--task", default="tiny")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    # One thread: the labeler server shares the machine, and OpenMP threads spinning against
    # it cost more than they bring for a 135M model.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {mode: run(mode, a.model_dir, a.url, a.task, a.steps) for mode in ("plain", "conversational")}
    out["tools"] = run_tools(a.model_dir, a.url, a.task)
    # RLOO awaits the async reward function as GRPO does; online DPO calls the sync one.
    out["rloo"] = run("conversational", a.model_dir, a.url, a.task, 1, rloo=True)
    out["online_dpo"] = run_online_dpo(a.model_dir, a.url, a.task)
    # How TRL tells reward functions apart, and AsyncGRPOTrainer's pickling into its child:
    # the copies reward a batch as the originals do.
    sync_fn, async_fn = reward_function(a.url, task=a.task), async_reward_function(a.url, task=a.task)
    judge = PairwiseJudge(a.url, a.task)
    copies = [pickle.loads(pickle.dumps(f)) for f in (sync_fn, async_fn, judge)]
    batch = {"prompts": ["What is 2+2?", "Name a colour."], "completions": ["4", "Blue."]}
    pair = (["What is 2+2?"], [("4", "5")])
    out["checks"] = {
        "names": [get_callable_name(sync_fn), get_callable_name(async_fn)],
        "async": [is_async_callable(sync_fn), is_async_callable(async_fn)],
        "pickled": [type(c).__name__ for c in copies],
        "rewards": [
            sync_fn(**batch),
            copies[0](**batch),
            asyncio.run(async_fn(**batch)),
            asyncio.run(copies[1](**batch)),
        ],
        "judged": [judge.judge(*pair, return_scores=True), copies[2].judge(*pair, return_scores=True)],
    }
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
