"""The `labeler` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.model import TEST_TASKS

pytestmark = pytest.mark.model


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LABELER_TASKS_DIR": str(TEST_TASKS)}
    proc = subprocess.run(
        [sys.executable, "-m", "labeler.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def test_tasks_lists_versions(test_tasks):
    rows = json.loads(run("tasks", "--json", "--tasks-dir", str(TEST_TASKS)).stdout)
    assert {r["name"]: r["version"] for r in rows} == {t.name: t.version for t in test_tasks}
    text = run("tasks").stdout
    assert "summarize" in text and test_tasks.get("summarize").version in text


def test_render_gives_exactly_what_the_engine_reads(labeler, engine):
    out = json.loads(
        run("render", "--task", "tiny", "--kind", "score", "--context", "2+2?", "--response", "4", "--json").stdout
    )
    r = labeler.render_score("tiny", "2+2?", "4")
    assert out["prompt"] == r.prompt and out["prompt_token_ids"] == list(r.prompt_token_ids)
    assert out["prompt_token_ids"] == engine.tokenizer(out["prompt"], add_special_tokens=False)["input_ids"]
    assert {c["label"]: tuple(c["token_ids"]) for c in out["candidates"]} == r.labels


def test_prefer_and_score_match_the_library(labeler):
    out = json.loads(
        run(
            "prefer",
            "--task",
            "tiny",
            "--context",
            "Name a fruit.",
            "--response-a",
            "Apple.",
            "--response-b",
            "Chair.",
            "--json",
        ).stdout
    )
    ref = labeler.preference("Name a fruit.", "Apple.", "Chair.", "tiny")
    assert out["p_a"] == pytest.approx(ref.p_a, abs=1e-5) and out["p_a_ba"] == pytest.approx(ref.p_a_ba, abs=1e-5)
    assert out["task_version"] == labeler.task("tiny").version and out["model"] == labeler.model_id
    out = json.loads(run("score", "--task", "tiny", "--context", "2+2?", "--response", "4", "--json").stdout)
    ref = labeler.score("2+2?", "4", "tiny")
    assert out["distribution"] == pytest.approx(ref.distribution, abs=1e-5)
    assert out["reward"] == pytest.approx(ref.reward, abs=1e-5)


def test_errors_are_clear_and_exit_2():
    proc = run("score", "--task", "nope", "--response", "r", check=False)
    assert proc.returncode == 2 and "unknown task 'nope'" in proc.stderr and "Traceback" not in proc.stderr
