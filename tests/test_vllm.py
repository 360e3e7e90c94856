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


async def test_http_service_on_vllm_through_the_client(vllm_engine, reference, test_tasks):
    """The app on the in-process vLLM engine, served in this event loop (AsyncLLM is bound
    to it), answering the async client like the transformers engine does."""
    import labeler_client as lc
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from tests.fixtures.redis import free_port

    port = free_port()
    lab = Labeler(vllm_engine, test_tasks, max_rationale_tokens=reference.max_rationale_tokens)
    app = create_app(Settings(port=port, engine="vllm"), labeler=lab)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        async with lc.AsyncClient(f"http://127.0.0.1:{port}", batch_size=2) as client:
            assert (await client.health()).engine == "vllm"
            pairs = [{"context": p.context, "response_a": p.response_a, "response_b": p.response_b} for p in PAIRS]
            got = await client.preferences(pairs, "tiny")
            rewards = await client.rewards([s.context for s in SCORES], [s.response for s in SCORES], task="tiny")
        want = await reference.apreferences(PAIRS, "tiny")
        for g, w in zip(got, want, strict=True):
            assert g.p_a == pytest.approx(w.p_a, abs=TOL)
        want_s = await reference.ascores(SCORES, "tiny")
        assert rewards == pytest.approx([w.reward for w in want_s], abs=TOL)
    finally:
        server.should_exit = True
        await serving


def test_labeler_serve_with_the_vllm_engine(vllm_servers, tmp_path):
    """`labeler serve --engine vllm` as a user runs it on this CPU machine."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.fixtures.model import TEST_TASKS
    from tests.fixtures.redis import free_port

    for s in vllm_servers:  # let the shared servers finish booting first: CPU is scarce
        if s.proc is not None:
            s.wait_ready()
    port = free_port()
    args = ["kv_cache_memory_bytes=1073741824", "enforce_eager=true", "dtype=float32", "max_model_len=2048"]
    cmd = [
        sys.executable,
        "-m",
        "labeler.cli",
        "serve",
        "--engine",
        "vllm",
        "--port",
        str(port),
        "--tasks-dir",
        str(TEST_TASKS),
    ] + [a for kv in args for a in ("--engine-arg", kv)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert httpx.get(url + "/readyz").json()["engine"] == "vllm"
        r = httpx.post(url + "/v1/scores", json={"task": "tiny", "items": [{"response": "hi"}]}, timeout=120)
        assert r.status_code == 200 and -1 <= r.json()["results"][0]["reward"] <= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
