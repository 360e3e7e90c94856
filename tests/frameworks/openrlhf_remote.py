"""OpenRLHF's own remote-reward request code against the labeler's /get_reward.

Run by tests/test_frameworks_openrlhf.py with the frameworks venv's Python (OpenRLHF pinned
there, installed without its GPU dependencies); writes one JSON object to --out.

`SingleTurnAgentExecutor.execute` is OpenRLHF's rollout step for one prompt: it tokenizes the
prompt with the policy's tokenizer (here the embedded model's), asks the engine for a
completion, decodes prompt + completion with the special tokens kept, posts
`{"query", "prompts", "labels"}` to the reward URL (`--reward.remote_url`) and reads the
reward back. vLLM is replaced by a scripted engine that returns the given completion's token
ids: the generation is not under test, the reward request is. `_fetch_rewards_via_http` is
the same request code for a batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace

from openrlhf.utils.agent import SingleTurnAgentExecutor
from transformers import AutoTokenizer

SYSTEM = {"role": "system", "content": "Answer in one word."}
FRANCE = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
CASES = {
    "answer": (FRANCE, "Paris."),
    "empty": (FRANCE, ""),  # the policy emitted only its end-of-turn token
    "whitespace": (FRANCE, " \n"),
    "overlong": (FRANCE, "and " * 80),  # over the server's token limit
}
REFERENCE = "Paris is the capital of France."


class ScriptedEngine:
    """Stands in for OpenRLHF's vLLM engine: "generates" the given token ids."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(token_ids=list(self.token_ids), finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


async def rollout(url: str, tokenizer, messages: list, completion: str, label: str | None = None) -> dict:
    """`execute` of one prompt whose policy answers `completion`, rewarded at `url`."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    params = SimpleNamespace(max_tokens=16, logprobs=None)
    result = await SingleTurnAgentExecutor(url).execute(
        prompt, label, params, max_length=512, hf_tokenizer=tokenizer, llm_engine=ScriptedEngine(ids)
    )
    return {"prompt": prompt, **result}


async def run(url: str, model_dir: str, reference_url: str, refusing_url: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    executor = SingleTurnAgentExecutor(url)
    out: dict = {"single": {}, "batch": None}
    queries, prompts = [], []
    for name, (messages, completion) in CASES.items():
        result = await rollout(url, tokenizer, messages, completion)
        prompt = result["prompt"]
        query = tokenizer.decode(result["observation_tokens"], skip_special_tokens=False)
        out["single"][name] = {
            "reward": result["reward"],
            "scores": result["scores"],
            "extra_logs": result["extra_logs"],
            "query": query,
        }
        queries.append(query)
        prompts.append(prompt)
    batch = await executor._fetch_rewards_via_http(queries, prompts, [None] * len(queries))
    out["batch"] = batch
    # The dataset's label as the reference response (`?reward=reference`).
    out["reference"] = (await rollout(reference_url, tokenizer, FRANCE, "Paris.", REFERENCE))["reward"]
    # Over the token limit at a URL without `overlong=lowest`: refused, retried, given up on.
    out["refused"] = (await rollout(refusing_url, tokenizer, *CASES["overlong"]))["reward"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--url", required=True, help="the reward URL, as given to --reward.remote_url")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--reference-url", required=True, help="a reward URL with ?reward=reference")
    p.add_argument("--refusing-url", required=True, help="a reward URL without overlong=lowest")
    a = p.parse_args()
    with open(a.out, "w") as f:
        json.dump(asyncio.run(run(a.url, a.model_dir, a.reference_url, a.refusing_url)), f)


if __name__ == "__main__":
    main()
