"""verl's own custom-reward loader and reward managers calling labeler_client.verl.

Run by tests/test_frameworks_verl.py with the frameworks venv's Python (verl pinned there,
installed without its GPU dependencies); writes one JSON object to --out.

The config is verl's own `ppo_trainer` config, composed by Hydra with the overrides the docs
give (`reward.custom_reward_function.*`, `reward.reward_manager.name`), in both forms of
`path`: the module's file and `pkg://labeler_client.verl`. `RewardLoopWorker` is the class
verl's trainer runs as a Ray actor: it loads the tokenizer, the custom reward function
(`load_reward_manager` -> `get_custom_reward_fn` -> `load_extern_object`) and the reward
manager, and `compute_score_batch` runs the manager on a `DataProto` batch of rollouts (with
`compute_score`, and with `compute_score_async`, which the manager awaits).
Here it runs in this process, without Ray. The legacy `BatchRewardManager` gets
`compute_score_batch` through the same loader. verl's remote reward manager hands the loaded
function to Ray actors: it goes through Ray's pickler here, and the copy is called as that
manager calls it (by keyword). verl's `dapo` and `rate_limited` managers run the awaited form
through the same worker. `compute_reference_score` and its async form run through the
same worker on rollouts whose reference is verl's ground truth or `extra_info["reference"]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import traceback

import labeler_client.verl
import numpy as np
import torch
import verl
from hydra import compose, initialize_config_dir
from ray import cloudpickle
from transformers import AutoTokenizer
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.trainer.ppo.reward import get_custom_reward_fn

SYSTEM = {"role": "system", "content": "Answer in one word."}
FRANCE = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
ROLLOUTS = [(FRANCE, "Paris."), (FRANCE, ""), ("Name a fruit.", "Apple.")]
# Reference responses for compute_reference_score: the first two as the data's ground truth,
# the third as extra_info["reference"], beside a ground truth of its own that it wins over.
REFERENCES = ["Paris is the capital.", "Paris.", "A banana."]


def config(model_dir: str, path: str, name: str, manager: str, reward_kwargs: dict):
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        f"reward.custom_reward_function.path={path}",
        f"reward.custom_reward_function.name={name}",
        f"reward.reward_manager.name={manager}",
        "reward.num_workers=1",
    ]
    overrides += [f"+reward.custom_reward_function.reward_kwargs.{k}={v}" for k, v in reward_kwargs.items()]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def messages_of(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def batch(tokenizer, agent_loop: bool = False, references: bool = False) -> DataProto:
    """Rollouts as verl's trainer hands them over: left-padded prompts, right-padded
    responses ending with EOS (an empty answer is the EOS alone), one attention mask. With
    `agent_loop`, as verl's agent loop hands them to the reward loop: the data's `extra_info`
    without the prompt, and the prompt's messages as `raw_prompt` in `tool_extra_fields`,
    which the reward managers merge into `extra_info`. With `references`, each rollout's
    reference response (`REFERENCES`) in its ground truth or its `extra_info`."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts, responses = [], []
    for prompt, answer in ROLLOUTS:
        text = tokenizer.apply_chat_template(messages_of(prompt), tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        responses.append(tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos])
    p_len, r_len = max(map(len, prompts)), max(map(len, responses)) + 2
    p_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    r_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor(
        [
            [0] * (p_len - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (r_len - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    non_tensors = {
        "data_source": np.array(["labeler"] * len(ROLLOUTS), dtype=object),
        "reward_model": np.array([{"ground_truth": None} for _ in ROLLOUTS], dtype=object),
        # The prompt in extra_info, as the data may put it.
        "extra_info": np.array([{"prompt": p} for p, _ in ROLLOUTS], dtype=object),
    }
    if references:
        truths = [*REFERENCES[:2], "A cherry."]
        non_tensors["reward_model"] = np.array([{"ground_truth": t} for t in truths], dtype=object)
        non_tensors["extra_info"][2]["reference"] = REFERENCES[2]
    if agent_loop:
        non_tensors["extra_info"] = np.array([{"index": i} for i in range(len(ROLLOUTS))], dtype=object)
        non_tensors["tool_extra_fields"] = np.array([{"raw_prompt": messages_of(p)} for p, _ in ROLLOUTS], dtype=object)
    return DataProto.from_dict(
        tensors={"prompts": p_ids, "responses": r_ids, "attention_mask": mask}, non_tensors=non_tensors
    )


def reward_loop(cfg, *batches: DataProto, awaited: list[bool] | None = None) -> list[list[float]]:
    """What the trainer's reward-loop actor computes for each of `batches`, in turn on its one
    event loop (`rate_limited`'s limiters are bound to the first loop they run on); `awaited`
    is told whether its reward manager awaits the function (a coroutine) or runs it in a thread."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the worker and its manager take the current loop
    try:
        worker = RewardLoopWorker(cfg)
        if awaited is not None:
            awaited.append(worker.reward_manager.is_async_reward_score)
        outputs = [loop.run_until_complete(worker.compute_score_batch(data)) for data in batches]
    finally:
        loop.close()
    return [[o["reward_score"] for o in batch_outputs] for batch_outputs in outputs]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--task", default="tiny")
    a = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    data = batch(tokenizer)
    kwargs = {"task": a.task, "base_url": a.url}
    forms = {"file": labeler_client.verl.__file__, "pkg": "pkg://labeler_client.verl"}
    out: dict = {
        "naive": {},
        "naive_async": {},
        "awaited": {},
        "legacy_batch": {},
        "pickled": {},
        "agent_loop": {},
        "reference": {},
        "reference_async": {},
        "managers": {},
        "errors": {},
    }
    for form, path in forms.items():
        cfg = config(a.model_dir, path, "compute_score", "naive", kwargs)
        (out["naive"][form],) = reward_loop(cfg, data)
        awaited: list[bool] = []
        async_cfg = config(a.model_dir, path, "compute_score_async", "naive", kwargs)
        (out["naive_async"][form],) = reward_loop(async_cfg, data, awaited=awaited)
        out["awaited"][form] = awaited[0]
        (out["agent_loop"][form],) = reward_loop(cfg, batch(tokenizer, agent_loop=True))
        # As verl's remote reward manager ships it to its reward actors (after this process used it).
        copy = cloudpickle.loads(cloudpickle.dumps(get_custom_reward_fn(cfg)))
        out["pickled"][form] = [
            copy(data_source="x", solution_str=response, ground_truth=None, extra_info={"prompt": prompt})
            for prompt, response in ROLLOUTS
        ]
        # Against references, in the ground truth (verl's reward_model column) or extra_info.
        with_refs = batch(tokenizer, references=True)
        for name, fn_name in (
            ("reference", "compute_reference_score"),
            ("reference_async", "compute_reference_score_async"),
        ):
            (out[name][form],) = reward_loop(config(a.model_dir, path, fn_name, "naive", kwargs), with_refs)
        # verl's legacy batch manager, through the same loader
        from verl.workers.reward_manager.batch import BatchRewardManager

        fn = get_custom_reward_fn(config(a.model_dir, path, "compute_score_batch", "naive", kwargs))
        manager = BatchRewardManager(tokenizer, num_examine=0, compute_score=fn)
        scores = manager(data, return_dict=True)["reward_tensor"]
        out["legacy_batch"][form] = scores.sum(dim=1).tolist()
    # verl's other managers that take a custom function, with the awaited form the docs give
    # them; `rate_limited` also on the agent loop's rollouts (it merges their raw_prompt too).
    awaited = []
    cfg = config(a.model_dir, forms["pkg"], "compute_score_async", "dapo", kwargs)
    (out["managers"]["dapo"],) = reward_loop(cfg, data, awaited=awaited)
    cfg = config(a.model_dir, forms["pkg"], "compute_score_async", "rate_limited", kwargs)
    out["managers"]["rate_limited"], out["managers"]["rate_limited_agent_loop"] = reward_loop(
        cfg, data, batch(tokenizer, agent_loop=True), awaited=awaited
    )
    out["awaited"]["dapo"], out["awaited"]["rate_limited"] = awaited
    try:  # an unknown reward_kwargs key is an error, not a silent default
        reward_loop(config(a.model_dir, forms["pkg"], "compute_score", "naive", {**kwargs, "tsak": "x"}), data)
        out["errors"]["unknown_key"] = None
    except Exception:  # noqa: BLE001 - reported to the test as text
        out["errors"]["unknown_key"] = traceback.format_exc()
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
