"""`labeler label` with the real embedded model: formats, scores, resuming a killed run, --url.

In-process runs use the session model (the CLI's `build_labeler` is pointed at the session
`labeler`); the kill-and-resume test runs the real console script in subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from labeler import Labeler, PairItem, ScoreItem, cli
from labeler.batch import (
    JsonlSink,
    LocalBackend,
    collect,
    label_pair_jobs,
    make_params,
    run_jobs,
)
from labeler.datasets_io import normalize_pair
from tests.fixtures.faults import FaultyEngine
from tests.fixtures.model import TEST_TASKS
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.model

HH = "\n\nHuman: Name a fruit.\n\nAssistant:"


class LentEngine:
    """The session's engine lent to one command, which closes the engine of its labeler at
    its end: the close is recorded, not done, so the engine serves the next test."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.closed = 0

    def __getattr__(self, name):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture
def in_process(labeler, test_tasks, monkeypatch):
    """Run `labeler ...` in this process on the session model; returns the exit code.
    Each command gets a labeler of its own (it closes what it builds) around the lent engine;
    `in_process.engine.closed` counts the commands' closes of their engine."""
    lent = LentEngine(labeler.engine)
    monkeypatch.setattr(
        cli, "build_labeler", lambda args: Labeler(lent, test_tasks, max_rationale_tokens=labeler.max_rationale_tokens)
    )

    def run(*argv):
        return cli.main([*argv, "--no-progress"])

    run.engine = lent
    return run


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_a_run_that_labels_nothing_ends_with_status_1(tmp_path, in_process, capsys):  # noqa: F811
    """Every record set aside as invalid (over the context length): the summary, then status
    1, so that a pipeline's next step does not take the empty output for a dataset."""
    src = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "completion": "word " * 9000}] * 2)
    out = tmp_path / "out.jsonl"
    assert in_process("label", str(src), str(out), "--task", "tiny", "--scores", "--skip-invalid", "--json") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["labeled"] == 0 and "no item was labeled" in captured.err


def test_hh_transcripts_become_trl_rows_with_soft_labels(tmp_path, labeler, in_process, capsys, caplog):
    src = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": HH + " Apple.", "rejected": HH + " Chair."},
            {"oops": "not a pair"},
            {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 5", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4"},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert in_process("label", str(src), str(out), "--task", "tiny", "--skip-invalid", "--json") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "line 2: not a known pair format" in captured.err
    assert (summary["items"], summary["labeled"], summary["invalid"], summary["skipped"]) == (2, 2, 1, 0)

    ref = labeler.preferences([PairItem("Name a fruit.", "Apple.", "Chair."), PairItem("2+2?", "5", "4")], "tiny")
    got = rows(out)
    assert len(got) == 2
    for row, r, (a, b) in zip(got, ref, [(" Apple.", " Chair."), (" 5", " 4")], strict=True):
        assert row["p_a"] == pytest.approx(r.p_a, abs=1e-5)
        assert row["p_a_ab"] == pytest.approx(r.p_a_ab, abs=1e-5) and row["p_a_ba"] == pytest.approx(r.p_a_ba, abs=1e-5)
        assert row["consistent"] == r.consistent
        # chosen is the labeler's pick, in the input's own (HH) form, so prompt + chosen is a transcript
        a_wins = r.p_a >= 0.5
        assert (row["chosen"], row["rejected"]) == ((a, b) if a_wins else (b, a))
        assert row["p_chosen"] == pytest.approx(max(r.p_a, r.p_b), abs=1e-5) and row["p_chosen"] >= 0.5
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["task"] == "tiny" and row["task_version"] == labeler.task("tiny").version
        assert row["model"] == labeler.model_id and len(row["key"]) == 64
    incons = sum(not r.consistent for r in ref) / 2
    assert summary["position_inconsistent_share"] == pytest.approx(incons)

    # a re-run labels nothing and leaves the file alone
    before = out.read_bytes()
    assert in_process("label", str(src), str(out), "--task", "tiny", "--skip-invalid", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["labeled"], again["skipped"]) == (0, 2) and out.read_bytes() == before
    assert again["other_rows"] == 0

    # other options are other labels: they go beside the first run's rows, which are counted
    assert in_process("label", str(src), str(out), "--task", "tiny", "--order", "ab", "--skip-invalid", "--json") == 0
    other = json.loads(capsys.readouterr().out)
    assert (other["labeled"], other["skipped"], other["other_rows"]) == (2, 0, 2)
    assert f"{out} holds 2 rows that are not of these items with these options" in caplog.text
    assert rows(out)[:2] == got and len(rows(out)) == 4


def test_malformed_line_stops_the_run_naming_it_and_writes_nothing(tmp_path, in_process, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q?", "chosen": "y", "rejected": "n"}, '{"prompt": "Q?",'])
    out = tmp_path / "out.jsonl"
    assert in_process("label", str(src), str(out), "--task", "tiny") == 2
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "Traceback" not in err
    assert not out.exists()


def test_an_empty_response_is_labeled_like_any_other(tmp_path, labeler, in_process, capsys):
    """A policy that said nothing (or only its end-of-turn token) wrote a response to judge, as
    the service judges it: not a malformed record."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q?", "chosen": " ", "rejected": "<|im_end|>"}])
    out = tmp_path / "out.jsonl"
    assert in_process("label", str(src), str(out), "--task", "tiny") == 0
    assert in_process.engine.closed == 1  # the command released its engine
    (row,) = rows(out)
    ref = labeler.preference("Q?", "", "", "tiny")
    assert row["p_a"] == pytest.approx(ref.p_a, abs=1e-5) and row["p_a_ab"] == pytest.approx(ref.p_a_ab, abs=1e-5)
    assert (row["chosen"], row["rejected"]) in ((" ", "<|im_end|>"), ("<|im_end|>", " "))


def test_scores_mode_for_conversational_completions(tmp_path, labeler, in_process, capsys):
    user = [{"role": "user", "content": "Name a fruit."}]
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": user, "completion": [{"role": "assistant", "content": "Apple."}]},
            {"prompt": user, "completion": [{"role": "assistant", "content": "Chair."}]},
        ],
    )
    out = tmp_path / "scores.jsonl"
    assert in_process("label", str(src), str(out), "--task", "tiny", "--scores", "--json") == 0
    assert json.loads(capsys.readouterr().out)["labeled"] == 2
    ref = labeler.scores([ScoreItem("Name a fruit.", "Apple."), ScoreItem("Name a fruit.", "Chair.")], "tiny")
    for row, r in zip(rows(out), ref, strict=True):
        assert row["prompt"] == user and row["completion"][0]["role"] == "assistant"
        assert row["reward"] == pytest.approx(r.reward, abs=1e-5)
        assert row["distribution"] == pytest.approx(r.distribution, abs=1e-5)
        assert row["expected"] == pytest.approx(r.expected, abs=1e-5)


def test_a_killed_run_resumes_to_the_same_file_as_an_uninterrupted_one(tmp_path, labeler):
    pairs = [
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Chair."},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Sky color?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", pairs)
    out = tmp_path / "out.jsonl"
    env = os.environ | {"LABELER_TASKS_DIR": str(TEST_TASKS)}
    cmd = [
        sys.executable,
        "-m",
        "labeler.cli",
        "label",
        str(src),
        str(out),
        "--task",
        "tiny",
        "--order",
        "ab",
        "--chunk-size",
        "1",
        "--no-progress",
        "--json",
    ]

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().endswith(b"\n")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no row written in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    written = out.read_text().splitlines()
    assert 1 <= len(written) < len(pairs), "the run finished before it could be killed"
    with out.open("a") as f:
        f.write('{"prompt": "Say hi.", "cho')  # as if killed in the middle of a write

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "it/s]" not in done.stderr, done.stderr  # --no-progress: no bar, the model's loading none either
    summary = json.loads(done.stdout)
    assert summary["skipped"] == len(written) and summary["labeled"] == len(pairs) - len(written)

    # The same input, uninterrupted, in-process on the session model.
    ref_out = tmp_path / "ref.jsonl"
    backend = LocalBackend(labeler)
    params = make_params(backend, "tiny", order="ab")
    jobs = label_pair_jobs(collect(src, normalize_pair), params)
    asyncio.run(run_jobs(jobs, backend, JsonlSink(ref_out), "pairs", params, progress=False))

    got, ref = rows(out), rows(ref_out)
    assert [r["key"] for r in got] == [r["key"] for r in ref]
    for g, r in zip(got, ref, strict=True):
        assert (g["prompt"], g["chosen"], g["rejected"]) == (r["prompt"], r["chosen"], r["rejected"])
        assert g["p_a"] == pytest.approx(r["p_a"], abs=1e-4) and g["p_chosen"] == pytest.approx(r["p_chosen"], abs=1e-4)
        assert g["p_a_ba"] is None and g["consistent"] is None and g["chosen_is"] == r["chosen_is"]
        assert set(g) == set(r) and all(g[k] == r[k] for k in ("task", "task_version", "model"))


def test_url_mode_labels_through_the_service(tmp_path, labeler, live_server, capsys):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"context": "Name a fruit.", "response_a": "Chair.", "response_b": "Apple."},
            {"context": "2+2?", "response_a": "4", "response_b": "5"},
        ],
    )
    out = tmp_path / "out.jsonl"
    argv = ["label", str(src), str(out), "--task", "tiny", "--url", live_server.url, "--no-progress", "--json"]
    assert cli.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["labeled"] == 2 and first["model"] == labeler.model_id
    ref = labeler.preferences([PairItem("Name a fruit.", "Chair.", "Apple."), PairItem("2+2?", "4", "5")], "tiny")
    for row, r, (a, b) in zip(rows(out), ref, [("Chair.", "Apple."), ("4", "5")], strict=True):
        assert row["p_a"] == pytest.approx(r.p_a, abs=1e-4)
        assert row["chosen"] == (a if r.p_a >= 0.5 else b) and row["rejected"] == (b if r.p_a >= 0.5 else a)
        assert row["task_version"] == labeler.task("tiny").version
    # same items into a new file: the service answers from its cache
    argv[2] = str(tmp_path / "again.jsonl")
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["cached"] == 2
    assert [r["key"] for r in rows(tmp_path / "again.jsonl")] == [r["key"] for r in rows(out)]
    # Model options beside --url: the server's model labels; the run says they are not used.
    argv[2] = str(tmp_path / "third.jsonl")
    assert cli.main([*argv, "--model", str(tmp_path / "elsewhere"), "--engine-arg", "dtype=float32"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"] == labeler.model_id
    assert "warning: --model, --engine-arg not used: --url labels with the server's model" in captured.err


def test_a_server_that_strips_other_end_markers_gives_its_labels_other_keys(tmp_path, labeler, in_process, capsys):
    """A server's `end_markers` change the texts it reads ("Paris. <END>" read as "Paris."):
    through it the same records get other keys than in-process (whose markers are the
    library's), so a run into the other's file labels them anew instead of taking the
    other labels for done; through a server with the library's markers the keys are
    in-process's."""
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris. <END>", "rejected": "Rome. <END>"}]
    )
    out = tmp_path / "out.jsonl"
    argv = ["label", str(src), str(out), "--task", "tiny", "--no-progress", "--json"]
    assert in_process(*argv) == 0
    assert json.loads(capsys.readouterr().out)["labeled"] == 1
    servers = {"library's": LiveServer(labeler), "<END>": LiveServer(labeler, end_markers=["<END>"])}
    summaries = {}
    try:
        for name, srv in servers.items():
            srv.start()
            assert cli.main([*argv, "--url", srv.url]) == 0
            summaries[name] = json.loads(capsys.readouterr().out)
    finally:
        for srv in servers.values():
            srv.stop()
    assert (summaries["library's"]["labeled"], summaries["library's"]["skipped"]) == (0, 1)
    assert (summaries["<END>"]["labeled"], summaries["<END>"]["skipped"]) == (1, 0)
    local, stripped = rows(out)
    assert local["key"] != stripped["key"]
    # Each key's label is of the texts it names: "<END>" read in process, stripped by the server.
    assert local["p_a"] == pytest.approx(
        labeler.preference("Capital of France?", "Paris. <END>", "Rome. <END>", "tiny").p_a, abs=1e-4
    )
    assert stripped["p_a"] == pytest.approx(
        labeler.preference("Capital of France?", "Paris.", "Rome.", "tiny").p_a, abs=1e-4
    )


@pytest.mark.parametrize(
    ("limit", "says"),
    [({"max_chars": 40}, "response: String should have at most 40 characters"), ({"max_item_tokens": 12}, "tokens")],
)
def test_url_mode_names_a_record_the_service_refuses_by_its_line_and_field(limit, says, tmp_path, labeler, capsys):
    """A record over the server's `max_chars` (or `max_item_tokens`): the run stops at its
    line, naming the field the server named (`response`), without the place in the request
    the server gives the item, and `--skip-invalid` labels the others."""
    long = "A fruit named at length, " * 3
    answers = ["Apple.", long, "Pear."]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Name a fruit.", "completion": a} for a in answers])
    out = tmp_path / "scores.jsonl"
    srv = LiveServer(labeler, **limit)
    srv.start()
    try:
        argv = ["label", str(src), str(out), "--task", "tiny", "--scores", "--url", srv.url, "--no-progress", "--json"]
        stopped = cli.main(argv)
        err = capsys.readouterr().err
        assert cli.main([*argv, "--skip-invalid"]) == 0
        captured = capsys.readouterr()
    finally:
        srv.stop()
    assert stopped == 2 and f"{src}, line 2: " in err and says in err, err
    assert f"skipped invalid input: {src}, line 2: " in captured.err and says in captured.err, captured.err
    assert "items[" not in err + captured.err and "HTTP" not in err + captured.err
    assert [r["completion"] for r in rows(out)] == ["Apple.", "Pear."]
    assert json.loads(captured.out)["invalid"] == 1


def test_skipped_lines_do_not_run_into_the_progress_bar(tmp_path, labeler, test_tasks, monkeypatch, capsys):
    """With the progress bar on, a skipped record's line is written on a line of its own
    (the bar cleared first), not after the bar's text."""
    poison = "POISON-7f3a"
    faulty = Labeler(FaultyEngine(LentEngine(labeler.engine), poison=poison, exc_type="nan"), test_tasks)
    monkeypatch.setattr(cli, "build_labeler", lambda args: faulty)
    answers = ["Apple.", poison, "Fig.", "Pear."]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Name a fruit.", "completion": a} for a in answers])
    argv = ["label", str(src), str(tmp_path / "out.jsonl"), "--task", "tiny", "--scores", "--skip-invalid"]
    assert cli.main([*argv, "--chunk-size", "2", "--json"]) == 0
    err = capsys.readouterr().err
    assert "labeling" in err  # the bar was drawn
    skipped = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if "skipped unlabeled item" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped unlabeled item: {src}, line 2: "), err


@pytest.mark.parametrize("via", ["in-process", "url"])
def test_an_item_the_model_gives_no_label_stops_the_run_at_its_line_or_is_skipped(
    via, tmp_path, labeler, test_tasks, monkeypatch, capsys
):
    """NaN label log-probs on one record (a half-precision model that overflowed on it): the
    run stops at that record's line with the chunks before it written, and `--skip-invalid`
    leaves it out and labels the rest, in-process and through the service alike. A chunk the
    model labels none of stops the run even so: that is the model, not the records."""
    poison = "POISON-7f3a"
    faulty = Labeler(FaultyEngine(LentEngine(labeler.engine), poison=poison, exc_type="nan"), test_tasks)
    answers = ["Apple.", "Plum.", "Fig.", poison, "Pear."]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Name a fruit.", "completion": a} for a in answers])
    out = tmp_path / "scores.jsonl"
    argv = ["label", str(src), str(out), "--task", "tiny", "--scores", "--no-progress", "--json"]
    srv = None
    if via == "url":
        srv = LiveServer(faulty)
        srv.start()
        argv += ["--url", srv.url]
    else:
        monkeypatch.setattr(cli, "build_labeler", lambda args: faulty)
    try:
        # Chunks of two: lines 1-2 are written, lines 3-4 stop at line 4 (the second of its chunk).
        stopped = cli.main([*argv, "--chunk-size", "2"])
        err = capsys.readouterr().err
        assert stopped == 2 and f"{src}, line 4: " in err and "zero probability on every label" in err, err
        assert [r["completion"] for r in rows(out)] == ["Apple.", "Plum."]
        assert cli.main([*argv, "--skip-invalid"]) == 0  # one chunk: Fig., the poison, Pear.
        captured = capsys.readouterr()
        all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": f"Q{i}", "completion": poison} for i in range(2)])
        none_labeled = cli.main(["label", str(all_bad), str(tmp_path / "bad_out.jsonl"), *argv[3:], "--skip-invalid"])
        none_err = capsys.readouterr().err
    finally:
        if srv is not None:
            srv.stop()
    summary = json.loads(captured.out)
    assert (summary["skipped"], summary["labeled"], summary["unlabeled"], summary["invalid"]) == (2, 2, 1, 0)
    assert f"skipped unlabeled item: {src}, line 4: " in captured.err, captured.err
    # The record is named by its line alone, not by its place in a request as well.
    assert "items[" not in err + captured.err and "HTTP" not in err + captured.err
    got = rows(out)
    assert [r["completion"] for r in got] == ["Apple.", "Plum.", "Fig.", "Pear."]
    ref = labeler.scores([ScoreItem("Name a fruit.", a) for a in ("Apple.", "Plum.", "Fig.", "Pear.")], "tiny")
    assert [r["reward"] for r in got] == pytest.approx([r.reward for r in ref], abs=1e-5)
    assert none_labeled == 2 and "zero probability on every label" in none_err and "skipped" not in none_err
    assert not (tmp_path / "bad_out.jsonl").exists() or rows(tmp_path / "bad_out.jsonl") == []
