"""OpenRLHF 0.11.2's own remote-reward request code against the live /get_reward.

tests/frameworks/openrlhf_remote.py runs `SingleTurnAgentExecutor.execute` (OpenRLHF's rollout
step: tokenize the prompt with the policy's tokenizer, generate, decode prompt + completion
with its special tokens, post `{"query", "prompts", "labels"}` to `--reward.remote_url`) and
its batch request `_fetch_rewards_via_http`, in the frameworks venv; only vLLM is replaced, by
a scripted engine. The server takes API keys, given in the reward URL's credentials. The
rewards must be the labeler's for the canonical transcript of the dialogue, an empty
completion included, and equal to what TRL's call gets for it; a completion over the
server's token limit gets the lowest reward (`?overlong=lowest`) instead of failing the call;
without that option it is refused, and OpenRLHF tries 5 times and leaves the rollout without a
reward, as docs/client.md says. With `?reward=reference` the dataset's label is the reference.
"""

from __future__ import annotations

import httpx
import pytest
from labeler_client.trl import reward_function

from labeler import ReferenceItem, ScoreItem
from labeler.chat import render
from tests.fixtures.frameworks import run_driver
from tests.fixtures.load import metric

pytestmark = pytest.mark.model

KEY = "sk-rollout-key"
TOL = 1e-5  # above the ~3e-6 a reward moves with its batch-mates
FRANCE = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_openrlhf_remote_reward_requests(frameworks_python, make_server, labeler, model_dir, tmp_path):
    # OpenRLHF sends no headers of its own: a keyed server takes the key from the URL's
    # credentials, which aiohttp sends as HTTP Basic
    srv = make_server(api_keys=[KEY], max_item_tokens=64)
    assert httpx.post(srv.url + "/get_reward", json={"query": ["q"]}).status_code == 401
    base = srv.url.replace("http://", f"http://labeler:{KEY}@") + "/get_reward?task=tiny"
    refused_before = metric(srv.url, 'labeler_request_seconds_count{route="/get_reward",status="422"}')
    out = run_driver(
        frameworks_python,
        "openrlhf_remote",
        tmp_path,
        *("--url", base + "&overlong=lowest", "--model-dir", str(model_dir)),
        *("--reference-url", base + "&reward=reference", "--refusing-url", base),
    )
    single = out["single"]
    want = labeler.scores([ScoreItem(render(FRANCE), "Paris."), ScoreItem(render(FRANCE), "")], "tiny")
    # OpenRLHF stores the answer's "rewards" list as the sample's reward
    assert single["answer"]["reward"] == pytest.approx([want[0].reward], abs=TOL)
    assert single["answer"]["query"].endswith("<|im_start|>assistant\nParis.<|im_end|>")
    # the policy's bare end-of-turn token: labeled, not refused (OpenRLHF would log and go on with None)
    assert single["empty"]["query"].endswith("<|im_start|>assistant\n<|im_end|>")
    assert single["empty"]["reward"] == pytest.approx([want[1].reward], abs=TOL)
    assert single["whitespace"]["reward"] == single["empty"]["reward"]  # the same empty response
    assert set(single["empty"]["extra_logs"]) == {"expected_score", "cached", "overlong"}
    # a rollout over the token limit: the lowest reward, the others judged
    assert single["overlong"]["reward"] == [-1.0] and single["overlong"]["extra_logs"]["overlong"] == [1.0]
    assert single["answer"]["extra_logs"]["overlong"] == [0.0]
    batch = out["batch"]
    assert len(batch) == 1 and batch[0]["rewards"] == [
        single[k]["reward"][0] for k in ("answer", "empty", "whitespace", "overlong")
    ]
    # the label as the reference response: the labeler's reward against it
    (ref,) = labeler.reference_rewards(
        [ReferenceItem(render(FRANCE), "Paris.", "Paris is the capital of France.")], "tiny"
    )
    assert out["reference"] == pytest.approx([ref.reward], abs=2 * TOL)
    # over the limit without overlong=lowest: OpenRLHF tries 5 times, then leaves no reward
    assert out["refused"] is None
    refused = metric(srv.url, 'labeler_request_seconds_count{route="/get_reward",status="422"}') - refused_before
    assert refused == 5
    # the same dialogue through TRL's reward-function call: the same reward
    fn = reward_function(srv.url, task="tiny", api_key=KEY)
    assert (
        fn(prompts=[FRANCE], completions=[[{"role": "assistant", "content": "Paris."}]]) == single["answer"]["reward"]
    )
