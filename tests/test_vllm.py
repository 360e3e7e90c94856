"""vLLM engines on this CPU: in-process AsyncLLM and remote `vllm serve`, both equal to
the transformers engine on the same weights (within 1e-4), CoT with greedy decoding too."""

from __future__ import annotations

import asyncio

import pytest

from labeler import Labeler, PairItem, ScoreItem
from labeler.engines.vllm_remote import VLLMRemoteEngine

pytestmark = [pytest.mark.model, pytest.mark.vllm]
TOL = 1e-4

PAIRS = [
    PairItem("Name a fruit.", "An apple.", "A chair."),
    PairItem("What is 2+2?", "4", "5"),
    PairItem("Say hi.", "Hello there, friend!", "Go away."),
]
SCORES = [ScoreItem("What is 2+2?", "4"), ScoreItem("Name a color.", "Blue."), ScoreItem("", "A reply with no prompt.")]


async def assert_same_labels(lab: Labeler, ref: Labeler, *, cot: bool) -> None:
    got, want = await asyncio.gather(lab.apreferences(PAIRS, "tiny", cot=cot), ref.apreferences(PAIRS, "tiny", cot=cot))
    for g, w in zip(got, want, strict=True):
        assert g.p_a_ab == pytest.approx(w.p_a_ab, abs=TOL) and g.p_a_ba == pytest.approx(w.p_a_ba, abs=TOL)
        assert g.rationales == w.rationales
    got_s, want_s = await asyncio.gather(lab.ascores(SCORES, "tiny", cot=cot), ref.ascores(SCORES, "tiny", cot=cot))
    for g, w in zip(got_s, want_s, strict=True):
        assert g.distribution == pytest.approx(w.distribution, abs=TOL)  # "10" is two tokens: a chained read
        assert g.rationales == w.rationales


@pytest.fixture(scope="module")
def reference(labeler: Labeler) -> Labeler:
    return labeler


@pytest.mark.parametrize("cot", [False, True], ids=["direct", "cot-greedy"])
async def test_in_process_vllm_equals_transformers(vllm_engine, reference, test_tasks, cot):
    lab = Labeler(vllm_engine, test_tasks, max_rationale_tokens=reference.max_rationale_tokens)
    await assert_same_labels(lab, reference, cot=cot)


async def test_concurrent_requests_reach_vllm_at_once(vllm_engine, test_tasks):
    lab = Labeler(vllm_engine, test_tasks)
    vllm_engine.peak_inflight = 0
    results = await asyncio.gather(*(lab.ascores([ScoreItem("Hi", f"reply {i}")], "tiny") for i in range(8)))
    assert len(results) == 8
    # Eight one-item calls, each with a first-token read: all in the engine together,
    # not one after another behind a lock.
    assert vllm_engine.peak_inflight >= 8


async def test_remote_engine_equals_transformers_and_fails_over(vllm_servers, model_dir, reference, test_tasks):
    for s in vllm_servers:
        s.wait_ready()
    remote = VLLMRemoteEngine([s.url for s in vllm_servers], model_dir, cooldown=30, timeout=120)
    try:
        lab = Labeler(remote, test_tasks, max_rationale_tokens=reference.max_rationale_tokens)
        assert remote.served_model is None
        await assert_same_labels(lab, reference, cot=False)
        assert remote.served_model == "labeler-test"
        # Stop one server: every request still succeeds on the other, with the same numbers.
        vllm_servers[0].stop()
        before = await reference.ascores(SCORES, "tiny")
        after = await lab.ascores(SCORES, "tiny")
        for g, w in zip(after, before, strict=True):
            assert g.distribution == pytest.approx(w.distribution, abs=TOL)
        assert remote.servers[0].down_until > 0 and remote.servers[0].needs_probe
    finally:
        await remote.aclose()
