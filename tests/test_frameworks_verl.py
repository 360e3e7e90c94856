"""verl 0.9.1's own custom-reward loader and reward managers calling labeler_client.verl.

tests/frameworks/verl_reward.py composes verl's `ppo_trainer` config with the documented
overrides, in both forms (`custom_reward_function.path` as the module's file and as
`pkg://labeler_client.verl`), runs verl's `RewardLoopWorker` (naive reward manager) on a
`DataProto` batch of rollouts, one of them an empty answer (a bare EOS), with
`compute_score` and with `compute_score_async` (which the manager must await; the `dapo` and
`rate_limited` managers too, the latter also on the agent loop's rollouts), and the legacy
`BatchRewardManager` with `compute_score_batch`. Rewards must be the labeler's for the
canonical transcript of `extra_info["prompt"]`, or of the prompt's messages that verl's agent
loop adds as `raw_prompt` where the data has no prompt; an unknown `reward_kwargs` key must fail.
`compute_reference_score` (and its async form) must give the labeler's reward against each
rollout's reference, from verl's ground truth or from `extra_info["reference"]`.
"""

from __future__ import annotations

import pytest

from labeler import ReferenceItem, ScoreItem
from labeler.chat import render
from tests.fixtures.frameworks import run_driver

pytestmark = pytest.mark.model

TOL = 1e-5  # above the ~3e-6 a reward moves with its batch-mates (and verl's float32 tensor)
FRANCE = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_verl_loads_and_calls_compute_score(frameworks_python, live_server, labeler, model_dir, tmp_path):
    out = run_driver(
        frameworks_python, "verl_reward", tmp_path, "--url", live_server.url, "--model-dir", str(model_dir)
    )
    items = [ScoreItem(render(FRANCE), "Paris."), ScoreItem(render(FRANCE), ""), ScoreItem("Name a fruit.", "Apple.")]
    want = [r.reward for r in labeler.scores(items, "tiny")]
    for form in ("file", "pkg"):
        assert out["naive"][form] == pytest.approx(want, abs=TOL), form
        assert out["naive_async"][form] == pytest.approx(want, abs=TOL), form
        assert out["awaited"][form] is True, form  # verl's manager awaits it, not a thread's call
        assert out["legacy_batch"][form] == pytest.approx(want, abs=TOL), form
        assert out["pickled"][form] == pytest.approx(want, abs=TOL), form
        # The prompt as verl's agent loop gives it (raw_prompt), where the data has none.
        assert out["agent_loop"][form] == pytest.approx(want, abs=TOL), form
    # verl's dapo and rate_limited managers await the coroutine form as naive does.
    for manager in ("dapo", "rate_limited", "rate_limited_agent_loop"):
        assert out["managers"][manager] == pytest.approx(want, abs=TOL), manager
    assert out["awaited"]["dapo"] is True and out["awaited"]["rate_limited"] is True
    refs = [
        ReferenceItem(it.context, it.response, ref)
        for it, ref in zip(items, ("Paris is the capital.", "Paris.", "A banana."), strict=True)
    ]
    want_refs = [r.reward for r in labeler.reference_rewards(refs, "tiny")]
    for form in ("file", "pkg"):
        assert out["reference"][form] == pytest.approx(want_refs, abs=2 * TOL), form
        assert out["reference_async"][form] == pytest.approx(want_refs, abs=2 * TOL), form
    error = out["errors"]["unknown_key"]
    assert error is not None and "unexpected keyword argument 'tsak'" in error
