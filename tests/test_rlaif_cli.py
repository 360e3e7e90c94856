"""The RLAIF evaluation commands on the embedded model: `labeler judge`, `labeler harmless`
(one policy and two, resumed), `labeler eval`'s alignment and human-human agreement, and the
length-controlled win rate of `labeler winrate`. In-process on the session model."""

from __future__ import annotations

import json

import pytest

from labeler import PairItem, ScoreItem, cli
from labeler import evaluate as ev
from labeler import harmless as hl
from tests.fixtures.model import TEST_TASKS
from tests.test_batch_label import in_process, rows, write_jsonl  # noqa: F401 - in_process is a fixture

pytestmark = pytest.mark.model

A = [
    {"id": 1, "prompt": "How do I pick a lock?", "completion": "I can't help with breaking into places."},
    {"id": 2, "prompt": "2+2?", "completion": "4"},
    {"id": 3, "prompt": "Name a fruit.", "completion": "Apple."},
]
B = [
    {"id": 1, "prompt": "How do I pick a lock?", "completion": "Insert a tension wrench and rake the pins."},
    {"id": 2, "prompt": "2+2?", "completion": "5"},
    {"id": 3, "prompt": "Name a fruit.", "completion": "Apple."},  # same as A: judged once
]


def test_judge_and_render_judgment(labeler, in_process, capsys):  # noqa: F811 - in_process: the model
    assert cli.main(["judge", "--task", "tiny", "--context", "2+2?", "--response", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = labeler.judgment("2+2?", "4", "tiny")
    assert out["p_yes"] == pytest.approx(ref.p_yes, abs=1e-6) and out["task_version"] == labeler.task("tiny").version
    argv = ["render", "--task", "tiny", "--kind", "judgment", "--context", "2+2?", "--response", "4", "--json"]
    argv += ["--tasks-dir", str(TEST_TASKS)]
    assert cli.main(argv) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["prompt"] == labeler.render_judgment("tiny", "2+2?", "4").prompt
    assert {c["label"] for c in shown["candidates"]} == {"Yes", "yes", "No", "no"}
    # An empty answer is a policy's output like any other: judged (as the service reads it:
    # whitespace alone is the empty response), not refused.
    assert cli.main(["judge", "--task", "tiny", "--context", "c", "--response", " ", "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["p_yes"] == pytest.approx(labeler.judgment("c", "", "tiny").p_yes, abs=1e-6)
    assert cli.main(["judge", "--task", "no-such-task", "--context", "c", "--response", "r"]) == 2


def test_harmless_rate_two_policies_resumable(tmp_path, labeler, in_process, capsys):  # noqa: F811
    a = write_jsonl(tmp_path / "a.jsonl", A)
    b = write_jsonl(tmp_path / "b.jsonl", B)
    out = tmp_path / "harm"
    argv = ["harmless", str(a), str(b), "--task", "tiny", "--out", str(out), "--json"]
    assert in_process(*argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["summary"]["labeled"] == 5 and got["summary"]["duplicates"] == 1

    ref = {
        name: [r.p_yes for r in labeler.judgments([ScoreItem(x["prompt"], x["completion"]) for x in pol], "tiny")]
        for name, pol in (("A", A), ("B", B))
    }
    judged = rows(out / "judgments.jsonl")
    assert len(judged) == 5 and all(r["task"] == "tiny" for r in judged)
    for pol, name in zip(got["policies"], "AB", strict=True):
        expect = hl.harmless_rate(ref[name], seed=0)
        assert pol["n"] == 3
        assert pol["mean_p_yes"] == pytest.approx(expect["mean_p_yes"], abs=1e-5)
        assert pol["share_harmless"] == expect["share_harmless"]
        assert pol["mean_p_yes_ci"] == pytest.approx(list(expect["mean_p_yes_ci"]), abs=1e-5)
    diff = got["difference"]
    assert diff["paired"] is True  # the same three prompts in both files
    assert diff["mean_p_yes"] == pytest.approx(sum(ref["A"]) / 3 - sum(ref["B"]) / 3, abs=1e-5)
    report = (out / "report.md").read_text()
    assert (
        "# Rate judged yes: task `tiny`" in report and "A - B" in report and (out / "harmless.png").stat().st_size > 0
    )
    assert json.loads((out / "metrics.json").read_text())["difference"]["paired"] is True

    # A second run judges nothing and reports the same figures.
    assert in_process(*argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["summary"]["labeled"] == 0 and again["summary"]["skipped"] == 5
    assert again["policies"] == got["policies"] and again["difference"] == got["difference"]

    # Every response of B refused (longer than the labeler's context) and set aside: the summary, a clear
    # end with status 1, no figures.
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "completion": "word " * 9000}])
    argv = ["harmless", str(a), str(long), "--task", "tiny", "--out", str(tmp_path / "h2"), "--skip-invalid"]
    assert in_process(*argv) == 1
    captured = capsys.readouterr()
    assert "no response of policy B was judged" in captured.err and "1 invalid (skipped)" in captured.out
    assert not (tmp_path / "h2" / "metrics.json").exists()
    # A file with no valid record: refused before anything is judged
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "p"}])  # no completion
    with pytest.raises(SystemExit, match=f"no response of policy B to judge: {empty} holds no valid record"):
        in_process("harmless", str(a), str(empty), "--task", "tiny", "--out", str(tmp_path / "h3"), "--skip-invalid")
    assert not (tmp_path / "h3" / "judgments.jsonl").exists() or not rows(tmp_path / "h3" / "judgments.jsonl")


def test_harmless_rate_resamples_a_prompts_samples_together(tmp_path, in_process, capsys):  # noqa: F811
    """Two sampled completions for each of two prompts: the CIs are those of a bootstrap over
    the two prompts, computed here from the judged rows; so is the difference's CI against
    a second policy, paired (the same prompts one-to-one) or not (B one sample short)."""
    samples = [("2+2?", "4"), ("2+2?", "Four."), ("Name a fruit.", "Apple."), ("Name a fruit.", "A chair.")]
    others = [("2+2?", "5"), ("2+2?", "Twenty-two."), ("Name a fruit.", "Pear."), ("Name a fruit.", "A table.")]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": q, "completion": c} for q, c in samples])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": q, "completion": c} for q, c in others])
    b_more = write_jsonl(tmp_path / "b_more.jsonl", [{"prompt": q, "completion": c} for q, c in others[:3]])
    out = tmp_path / "h"
    assert in_process("harmless", str(a), "--task", "tiny", "--out", str(out), "--json") == 0
    got = json.loads(capsys.readouterr().out)["policies"][0]
    p_yes = {(r["prompt"], r["completion"]): r["p_yes"] for r in rows(out / "judgments.jsonl")}
    prompts = [q for q, _ in samples]
    expect = hl.harmless_rate([p_yes[qc] for qc in samples], prompts=prompts, seed=0)
    assert got["mean_p_yes_ci"] == pytest.approx(list(expect["mean_p_yes_ci"]), abs=1e-9)
    assert got["share_harmless_ci"] == pytest.approx(list(expect["share_harmless_ci"]), abs=1e-9)
    assert (got["n"], got["prompts"]) == (4, 2)
    report = (out / "report.md").read_text()
    assert "bootstrap over prompts" in report and f"| `{a}` | 4 | 2 |" in report

    for other, paired in ((b, True), (b_more, False)):
        assert in_process("harmless", str(a), str(other), "--task", "tiny", "--out", str(out), "--json") == 0
        diff = json.loads(capsys.readouterr().out)["difference"]
        p_yes = {(r["prompt"], r["completion"]): r["p_yes"] for r in rows(out / "judgments.jsonl")}
        theirs = others if paired else others[:3]
        expect = hl.harmless_difference(
            [p_yes[qc] for qc in samples],
            [p_yes[qc] for qc in theirs],
            paired=paired,
            prompts_a=prompts,
            prompts_b=[q for q, _ in theirs],
        )
        assert diff["paired"] is paired
        assert diff["mean_p_yes_ci"] == pytest.approx(list(expect["mean_p_yes_ci"]), abs=1e-9)


def test_harmless_rate_one_policy_text_output(tmp_path, in_process, capsys):  # noqa: F811
    a = write_jsonl(tmp_path / "a.jsonl", A[:2])
    assert in_process("harmless", str(a), "--task", "tiny", "--out", str(tmp_path / "h")) == 0
    text = capsys.readouterr().out
    # The tiny task asks whether the answer is right: its yes is not called harmless.
    assert "policy A" in text and "2 responses to 2 prompts, judged yes" in text and "A - B" not in text
    assert "judged harmless" not in text
    assert in_process("harmless", str(a), "--task", "plain-nonexistent", "--out", str(tmp_path / "x")) == 2


def test_eval_with_no_human_labeled_pair_ends_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "build_labeler", no_load)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "p", "chosen": "a"}])  # no rejected
    with pytest.raises(SystemExit, match=f"{empty}: no human-labeled pairs to evaluate"):
        cli.main(
            ["eval", str(empty), "--task", "tiny", "--out", str(tmp_path / "ev"), "--skip-invalid", "--no-progress"]
        )


def test_a_report_folder_that_cannot_be_written_ends_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`eval` and `harmless` write their reports beside their rows: a DIR where no file can be
    created (here under /proc) is refused with status 2, naming it, before the model loads."""

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "build_labeler", no_load)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "p", "completion": "a"}])
    for command, src in (("eval", pairs), ("harmless", answers)):
        task = "tiny" if command == "eval" else "harmless"
        assert cli.main([command, str(src), "--task", task, "--out", "/proc/labeler-report", "--no-progress"]) == 2
        assert "cannot write the report in /proc/labeler-report: " in capsys.readouterr().err


def test_label_with_no_valid_record_ends_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "build_labeler", no_load)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "a"}])  # no rejected
    out = tmp_path / "out.jsonl"
    argv = ["label", str(src), str(out), "--task", "tiny", "--skip-invalid", "--no-progress"]
    with pytest.raises(SystemExit, match=f"nothing to label: {src} holds no valid record"):
        cli.main(argv)
    assert not out.exists()


def test_ctrl_c_while_the_input_is_read_ends_with_status_130(tmp_path, capsys):
    """A SIGINT while a command still reads its input (here a pipe whose writer is slow)
    ends it as any Ctrl-C does: status 130 and a message, no traceback."""
    import os
    import signal
    import threading

    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)

    def slow_writer():
        with open(fifo, "w") as w:  # opens once the command opens the pipe to read it
            w.write('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
            w.flush()
            os.kill(os.getpid(), signal.SIGINT)  # the command is reading, waiting for more

    writer = threading.Thread(target=slow_writer, daemon=True)
    writer.start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a `labeler` process has
    try:
        status = cli.main(["label", str(fifo), str(tmp_path / "out.jsonl"), "--task", "tiny", "--no-progress"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the command: the user gets a traceback")
    finally:
        signal.signal(signal.SIGINT, previous)
        writer.join(timeout=60)
    assert status == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    assert not (tmp_path / "out.jsonl").exists()


def test_an_interrupted_winrate_says_whether_its_judgments_were_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C (here while the model loads): with --out the rows written are kept and a second
    run resumes; without it nothing was kept, and the message says how to keep them."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_labeler", interrupted)
    a, b = write_jsonl(tmp_path / "a.jsonl", A), write_jsonl(tmp_path / "b.jsonl", B)
    argv = ["winrate", str(a), str(b), "--task", "tiny", "--no-progress"]
    assert cli.main(argv) == 130
    assert "nothing was kept (give --out FILE" in capsys.readouterr().err
    assert cli.main([*argv, "--out", str(tmp_path / "w.jsonl")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_ctrl_c_during_the_model_load_stops_it_at_once(tmp_path, monkeypatch, capsys):
    """A SIGINT while the model loads interrupts the load itself (the load runs before the
    event loop, whose own handler would only cancel the command once the load returned)."""
    import os
    import signal
    import time

    loads: list[str] = []

    def slow_load(args):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(500):  # a load of 5 s, unless the interrupt stops it
            time.sleep(0.01)
        loads.append("finished")
        raise AssertionError("the load ran to its end")

    monkeypatch.setattr(cli, "build_labeler", slow_load)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    # Python's own SIGINT handler, as a `labeler` process starts with (a library used by an
    # earlier test in this process may have put another in).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = cli.main(["label", str(src), str(tmp_path / "out.jsonl"), "--task", "tiny", "--no-progress"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    assert loads == [] and "interrupted" in capsys.readouterr().err


def test_eval_reports_alignment_and_human_human_agreement(tmp_path, labeler, in_process, capsys):  # noqa: F811
    pair = {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Chair."}
    flipped = {"prompt": "Name a fruit.", "chosen": "Chair.", "rejected": "Apple."}
    single = {"prompt": "2+2?", "chosen": "4", "rejected": "Fish."}  # which the model reads consistently
    unlabeled = {"context": "2+2?", "response_a": "4", "response_b": "5"}  # no human choice
    src = write_jsonl(tmp_path / "human.jsonl", [pair, pair, flipped, single, unlabeled])
    out = tmp_path / "eval"
    # A pair without a human choice is malformed for eval: refused before any labeling,
    # or skipped and counted with --skip-invalid.
    assert in_process("eval", str(src), "--task", "tiny", "--out", str(out)) != 0
    assert "line 5: no human choice" in capsys.readouterr().err and not (out / "labels.jsonl").exists()
    assert in_process("eval", str(src), "--task", "tiny", "--out", str(out), "--json", "--skip-invalid") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 4 and got["summary"]["invalid"] == 1  # every human label counts
    assert got["summary"]["duplicates"] == 2  # the fruit pair's three rows, either way round: read once
    assert in_process("eval", str(src), "--task", "tiny", "--out", str(out), "--skip-invalid") == 0
    text = capsys.readouterr().out  # the summary line calls them what they are (run again: resumed)
    assert "2 more labels of a pair labeled already (read once)" in text and "duplicates" not in text, text
    assert got["prompts"] == 2  # what the CIs resample
    # Position consistency is a pair's, however many humans labeled it: the summary counts
    # each pair once, as the metrics do. Here one pair of two is consistent, that of one label
    # of four.
    assert got["position_consistency"] == pytest.approx(0.5)
    assert got["summary"]["position_inconsistent_share"] == pytest.approx(1 - got["position_consistency"])
    # The file keeps one row per pair, with every human label of the pair as shown.
    labeled = {r["context"]: r for r in rows(out / "labels.jsonl")}
    fruit = labeled["Name a fruit."]
    assert [fruit["response_" + h] for h in fruit["humans"]] == ["Apple.", "Apple.", "Chair."]
    assert [labeled["2+2?"]["response_" + h] for h in labeled["2+2?"]["humans"]] == ["4"]
    h = got["human_agreement"]
    # One pair with three labels (2 for Apple, 1 for Chair): C(2,2) / C(3,2) = 1/3.
    assert (h["pairs"], h["labels"]) == (1, 3) and h["human_human"] == pytest.approx(1 / 3)
    assert h["prompts"] == 1  # what its CIs resample: the one prompt with a repeated pair, of 2
    p = labeler.preferences([PairItem("Name a fruit.", "Apple.", "Chair.")], "tiny")[0].p_a
    o = ev.outcome(p)
    assert h["ai_human"] == pytest.approx((2 * o + (1 - o)) / 3, abs=1e-9)
    report = (out / "report.md").read_text()
    assert "AI labeler alignment" in report and "accuracy against human labels" in report
    assert "two humans agree" in report and "2 prompts in all" in report
    assert "(3 labels; prompts the CIs resample: 1)" in report

    # Without repeated pairs the report says human-human agreement cannot be measured.
    src2 = write_jsonl(tmp_path / "h2.jsonl", [single])
    assert in_process("eval", str(src2), "--task", "tiny", "--out", str(tmp_path / "e2")) == 0
    assert "no pair has more than one human label" in capsys.readouterr().out
    assert "cannot be measured" in (tmp_path / "e2" / "report.md").read_text()


def test_winrate_shows_the_length_controlled_rate(tmp_path, labeler, in_process, capsys):  # noqa: F811
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": x["prompt"], "completion": x["completion"]} for x in A])
    b = write_jsonl(tmp_path / "b.jsonl", B)
    assert in_process("winrate", str(a), str(b), "--task", "tiny", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    lc = got["length_controlled"]
    prefs = labeler.preferences(
        [PairItem(x["prompt"], x["completion"], y["completion"]) for x, y in zip(A, B, strict=True)], "tiny"
    )
    outcomes = ev.win_outcomes([r.p_a_ab for r in prefs], [r.p_a_ba for r in prefs])
    expect = ev.length_controlled_win_rate(
        outcomes, [len(x["completion"]) for x in A], [len(y["completion"]) for y in B], seed=0
    )
    assert lc["win_rate"] == pytest.approx(expect["win_rate"], abs=1e-6)
    assert lc["gap"] == pytest.approx(got["win_rate"] - lc["win_rate"], abs=1e-12)
    assert in_process("winrate", str(a), str(b), "--task", "tiny") == 0
    assert "length-controlled" in capsys.readouterr().out
    # Rows `labeler label` wrote for the same pairs and options are the same labels: resumed from.
    pairs = [
        {"context": x["prompt"], "response_a": x["completion"], "response_b": y["completion"]}
        for x, y in zip(A, B, strict=True)
    ]
    shared = tmp_path / "shared.jsonl"
    assert in_process("label", str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), str(shared), "--task", "tiny") == 0
    capsys.readouterr()
    assert in_process("winrate", str(a), str(b), "--task", "tiny", "--json", "--out", str(shared)) == 0
    reused = json.loads(capsys.readouterr().out)
    # The third pair's answers are the same: a tie, not judged (the row `label` wrote stays aside).
    assert (reused["summary"]["skipped"], reused["summary"]["labeled"]) == (len(A) - 1, 0)
    assert reused["win_rate"] == pytest.approx(got["win_rate"], abs=1e-5)

    # A prompt that repeats with the answers it had is judged once and counted for each of its rows.
    a2 = write_jsonl(tmp_path / "a2.jsonl", [{"prompt": x["prompt"], "completion": x["completion"]} for x in A + A[:1]])
    b2 = write_jsonl(tmp_path / "b2.jsonl", [{"prompt": y["prompt"], "completion": y["completion"]} for y in B + B[:1]])
    assert in_process("winrate", str(a2), str(b2), "--task", "tiny", "--json") == 0
    twice = json.loads(capsys.readouterr().out)
    assert (twice["n"], twice["summary"]["duplicates"], twice["summary"]["labeled"]) == (len(A) + 1, 1, len(A) - 1)
    # The CIs resample the prompts: the repeated one's two comparisons go together.
    prompts = [x["prompt"] for x in A + A[:1]]
    again = prefs + prefs[:1]
    expect = ev.win_rate([r.p_a_ab for r in again], [r.p_a_ba for r in again], [r.p_a for r in again], prompts=prompts)
    assert twice["prompts"] == len(A) and (twice["ci_low"], twice["ci_high"]) == pytest.approx(
        (expect["ci_low"], expect["ci_high"]), abs=1e-9
    )
    soft = [r.p_a for r in prefs + prefs[:1]]
    assert twice["soft_win_rate"] == pytest.approx(sum(soft) / len(soft), abs=1e-6)
    # Every matched prompt refused (longer than the labeler's context) and set aside: the summary, status 1, no figures.
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "completion": "word " * 9000}])
    longer = write_jsonl(tmp_path / "longer.jsonl", [{"prompt": "p", "completion": "words " * 9000}])
    assert in_process("winrate", str(long), str(longer), "--task", "tiny", "--skip-invalid") == 1
    captured = capsys.readouterr()
    assert "no matched prompt was labeled" in captured.err and "1 invalid (skipped)" in captured.out
    # The pair of the same answers, not read, has no consistency to count.
    disagree = [not r.consistent for r in prefs[:2] + prefs[:1]]
    assert twice["position_inconsistent_share"] == pytest.approx(sum(disagree) / len(disagree))
    assert twice["summary"]["position_inconsistent_share"] == twice["position_inconsistent_share"]


def test_winrate_in_one_order_shows_either_policy_first(tmp_path, labeler, in_process, capsys):  # noqa: F811
    """Read in one order, which policy the labeler reads first is a coin's pick per pair: the
    rows and the win rate are the labeler's readings of the pairs as shown, turned to policy
    A's side; a re-run resumes from those rows to the same figures."""
    from labeler.datasets_io import swap_for_position
    from labeler.spec import item_digest

    n = 8
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Say {k}.", "completion": f"{k}"} for k in range(n)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Say {k}.", "completion": f"No, {k + 1}."} for k in range(n)])
    out = tmp_path / "judged.jsonl"
    argv = ["winrate", str(a), str(b), "--task", "tiny", "--order", "ab", "--out", str(out), "--json"]
    assert in_process(*argv) == 0
    got = json.loads(capsys.readouterr().out)
    shown, flipped = [], []
    for k in range(n):
        pair = PairItem(f"Say {k}.", *sorted((f"{k}", f"No, {k + 1}.")))
        if swap_for_position(item_digest(pair), 0):
            pair = PairItem(pair.context, pair.response_b, pair.response_a)
        shown.append(pair)
        flipped.append(pair.response_a != f"{k}")
    assert any(flipped) and not all(flipped)
    read = [r.p_a for r in labeler.preferences(shown, "tiny", order="ab")]
    p_a = [1 - p if f else p for p, f in zip(read, flipped, strict=True)]
    written = rows(out)
    assert [r["shown_first"] for r in written] == ["b" if f else "a" for f in flipped]
    assert [r["p_a"] for r in written] == pytest.approx(p_a, abs=1e-5)
    assert got["win_rate"] == pytest.approx(sum(ev.outcome(p) for p in p_a) / n, abs=1e-9)
    # The length-controlled rate reads lengths from policy A's side too, whichever was shown first.
    diffs = [len(f"{k}") - len(f"No, {k + 1}.") for k in range(n)]
    assert got["length_controlled"]["mean_length_diff"] == pytest.approx(sum(diffs) / n)
    assert in_process(*argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["summary"]["labeled"] == 0 and again["win_rate"] == got["win_rate"]


def test_winrate_of_two_alpacaeval_output_files(tmp_path, labeler, in_process, capsys):  # noqa: F811
    """Two AlpacaEval model_outputs.json files (JSON arrays of instruction/output), matched by
    instruction: the same win rate as the same outputs given as prompt/completion JSONL."""
    outputs = [
        [{"instruction": x["prompt"], "output": x["completion"], "generator": name} for x in policy]
        for name, policy in (("a", A), ("b", B))
    ]
    files = []
    for name, rows_ in zip("ab", outputs, strict=True):
        path = tmp_path / f"{name}_outputs.json"
        path.write_text(json.dumps(rows_, indent=2))
        files.append(str(path))
    assert in_process("winrate", *files, "--task", "tiny", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": x["prompt"], "completion": x["completion"]} for x in A])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": x["prompt"], "completion": x["completion"]} for x in B])
    assert in_process("winrate", str(a), str(b), "--task", "tiny", "--json") == 0
    ref = json.loads(capsys.readouterr().out)
    assert (got["n"], got["win_rate"], got["soft_win_rate"]) == (len(A), ref["win_rate"], ref["soft_win_rate"])


def test_winrate_lengths_are_those_of_the_responses_judged(tmp_path, in_process, capsys):  # noqa: F811
    """A conversational completion that repeats its prompt's turns (some datasets store the
    whole conversation): its length is that of the answer judged, not of the earlier turns."""
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! " * 60},
        {"role": "user", "content": "2+2?"},
    ]
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": prompt, "completion": [*prompt, {"role": "assistant", "content": "4"}]}]
    )
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": prompt, "completion": [{"role": "assistant", "content": "four"}]}]
    )
    assert in_process("winrate", str(a), str(b), "--task", "tiny", "--json") == 0
    assert json.loads(capsys.readouterr().out)["length_controlled"]["mean_length_diff"] == len("4") - len("four")


def test_winrate_of_the_same_answers_is_a_tie_in_every_order(tmp_path, in_process, capsys):  # noqa: F811
    """A pair whose two responses are the same text once read is a tie in every order, and is
    not judged: in one order the coin cannot turn it, and the labeler's position bias would
    make it a win (ab) or a loss (ba). It counts in the win rates, soft and length-controlled
    too, and is neither in --out nor in the position-inconsistent share; a re-run resumes to
    the same figures."""
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Name a fruit.", "completion": "Apple."}],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [{"prompt": "2+2?", "completion": " 4\n"}, {"prompt": "Name a fruit.", "completion": "A chair."}],
    )
    for order in ("ab", "ba", "both"):
        out = tmp_path / f"{order}.jsonl"
        argv = ["winrate", str(a), str(b), "--task", "tiny", "--order", order, "--out", str(out), "--json"]
        assert in_process(*argv) == 0
        got = json.loads(capsys.readouterr().out)
        (fruit,) = rows(out)  # the one pair judged
        assert fruit["prompt"] == "Name a fruit." and got["identical"] == 1, order
        assert (got["n"], got["summary"]["labeled"]) == (2, 1)
        assert got["win_rate"] == pytest.approx((0.5 + fruit["outcome"]) / 2)
        assert got["soft_win_rate"] == pytest.approx((0.5 + fruit["p_a"]) / 2)
        assert got["ties"] == 1 + (fruit["outcome"] == 0.5)
        assert got["length_controlled"]["mean_length_diff"] == pytest.approx((len("Apple.") - len("A chair.")) / 2)
        if order == "both":
            assert got["position_inconsistent_share"] == (0.0 if fruit["consistent"] else 1.0)
        assert in_process(*argv) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["summary"]["labeled"] == 0
        assert (again["win_rate"], again["soft_win_rate"]) == (got["win_rate"], got["soft_win_rate"])
    # Two files of the same answers: every pair a tie, nothing judged, nothing written.
    same = tmp_path / "same.jsonl"
    assert in_process("winrate", str(a), str(a), "--task", "tiny", "--order", "ab", "--out", str(same)) == 0
    text = capsys.readouterr().out
    assert "win rate of A over B: 0.500" in text and "(0 wins, 2 ties, 0 losses; soft 0.500)" in text
    assert "2 with the same answer from A and B: ties, not judged" in text and not same.exists()


def test_winrate_in_order_ba_names_the_policy_read_first_and_resumes_older_rows(
    tmp_path,
    labeler,
    in_process,  # noqa: F811
    capsys,
):
    """--order ba reads the labeled pair's second response first: each row's `shown_first`
    names the policy read then, whichever way the coin turned the pair. Rows written before
    rows had `a_is` (whose `shown_first` marked a turned pair instead) resume to the same
    figures."""
    from labeler.datasets_io import swap_for_position
    from labeler.spec import item_digest

    n = 6
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Say {k}.", "completion": f"{k}"} for k in range(n)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Say {k}.", "completion": f"No, {k + 1}."} for k in range(n)])
    out = tmp_path / "ba.jsonl"
    argv = ["winrate", str(a), str(b), "--task", "tiny", "--order", "ba", "--out", str(out), "--json"]
    assert in_process(*argv) == 0
    got = json.loads(capsys.readouterr().out)
    shown = []
    for k in range(n):
        pair = PairItem(f"Say {k}.", *sorted((f"{k}", f"No, {k + 1}.")))
        if swap_for_position(item_digest(pair), 0):
            pair = PairItem(pair.context, pair.response_b, pair.response_a)
        shown.append(pair)
    read_first = ["a" if pair.response_b == f"{k}" else "b" for k, pair in enumerate(shown)]
    assert "a" in read_first and "b" in read_first
    written = rows(out)
    assert [r["shown_first"] for r in written] == read_first
    read = [r.p_a for r in labeler.preferences(shown, "tiny", order="ba")]
    p_a = [p if pair.response_a == f"{k}" else 1 - p for k, (p, pair) in enumerate(zip(read, shown, strict=True))]
    assert [r["p_a"] for r in written] == pytest.approx(p_a, abs=1e-5)
    # The same judgments as an earlier version wrote them: no `a_is`, `shown_first` "b" for a turned pair.
    write_jsonl(out, [{k: v for k, v in r.items() if k != "a_is"} | {"shown_first": r["a_is"]} for r in written])
    assert in_process(*argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["summary"]["labeled"] == 0 and again["summary"]["skipped"] == n
    for figure in ("win_rate", "soft_win_rate", "length_controlled"):
        assert again[figure] == got[figure], figure


def test_harmless_records_matched_by_id_with_other_prompts_are_not_paired(tmp_path, in_process, capsys, caplog):  # noqa: F811
    """Matched by id, records of two prompts: each response is judged on its own prompt, the
    warning says so, and the difference A - B resamples each file on its own."""
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [{"id": 1, "prompt": "2+2?", "completion": "4"}, {"id": 2, "prompt": "Name a fruit.", "completion": "Apple."}],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [{"id": 1, "prompt": "Name a fruit.", "completion": "Pear."}, {"id": 2, "prompt": "2+2?", "completion": "5"}],
    )
    out = tmp_path / "h"
    with caplog.at_level("WARNING", logger="labeler.evaluate"):
        assert in_process("harmless", str(a), str(b), "--task", "tiny", "--out", str(out), "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert "2 of 2 records matched by id have different prompts" in caplog.text
    assert "each response is judged on its own prompt" in caplog.text and "A's prompt" not in caplog.text
    p_yes = {(r["prompt"], r["completion"]): r["p_yes"] for r in rows(out / "judgments.jsonl")}
    assert set(p_yes) == {("2+2?", "4"), ("Name a fruit.", "Apple."), ("Name a fruit.", "Pear."), ("2+2?", "5")}
    expect = hl.harmless_difference(
        [p_yes["2+2?", "4"], p_yes["Name a fruit.", "Apple."]],
        [p_yes["Name a fruit.", "Pear."], p_yes["2+2?", "5"]],
        paired=False,
        prompts_a=["2+2?", "Name a fruit."],
        prompts_b=["Name a fruit.", "2+2?"],
    )
    assert got["difference"]["paired"] is False
    assert got["difference"]["mean_p_yes_ci"] == pytest.approx(list(expect["mean_p_yes_ci"]), abs=1e-9)
    assert "independent resamples" in (out / "report.md").read_text()


def test_a_difference_without_a_ci_is_printed_as_n_a(tmp_path, in_process, capsys):  # noqa: F811
    """One prompt, paired: there is no spread to resample, and the printed A - B says n/a, as
    the report does, not +nan."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2+2?", "completion": "5"}])
    out = tmp_path / "h"
    assert in_process("harmless", str(a), str(b), "--task", "tiny", "--out", str(out)) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("A - B")]
    assert "nan" not in line and line.count("n/a") == 4 and "[95% CI n/a, n/a]" in line and "(paired)" in line
    assert "nan" not in (out / "report.md").read_text()


def test_winrate_with_a_file_of_no_valid_record_names_it(tmp_path, monkeypatch):
    """Before the model loads: the file is named as holding no record, not as sharing no
    prompt with the other."""

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "build_labeler", no_load)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])  # no completion
    a = write_jsonl(tmp_path / "a.jsonl", A)
    argv = ["--task", "tiny", "--no-progress", "--skip-invalid"]
    with pytest.raises(SystemExit, match=f"no response of policy A to compare: {empty} holds no valid record"):
        cli.main(["winrate", str(empty), str(a), *argv])
    with pytest.raises(SystemExit, match=f"no response of policy B to compare: {bad} holds no valid record"):
        cli.main(["winrate", str(a), str(bad), *argv])


def test_an_eval_that_labels_nothing_prints_its_summary_and_ends_with_status_1(tmp_path, in_process, capsys):  # noqa: F811
    """Every pair set aside as invalid under --skip-invalid (longer than the labeler's
    context): the summary counts what was set aside, standard error says why there are no
    figures, and the status is 1. The report an earlier run left in the folder is gone, not
    left there as this run's."""
    src = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "chosen": "word " * 9000, "rejected": "x"}])
    out = tmp_path / "ev"
    out.mkdir()
    earlier = ["metrics.json", "report.md", "reliability.png", "length_bias.png"]
    for name in earlier:
        (out / name).write_text("an earlier run's")
    assert in_process("eval", str(src), "--task", "tiny", "--out", str(out), "--skip-invalid") == 1
    captured = capsys.readouterr()
    assert "1 items, 0 labeled" in captured.out and "1 invalid (skipped)" in captured.out
    assert "no human-labeled pair was labeled" in captured.err
    assert not any((out / name).exists() for name in earlier), sorted(p.name for p in out.iterdir())
    assert in_process("eval", str(src), "--task", "tiny", "--out", str(out), "--skip-invalid", "--json") == 1
    got = json.loads(capsys.readouterr().out)
    assert (got["summary"]["labeled"], got["summary"]["invalid"], got["task"]) == (0, 1, "tiny")
    # harmless alike: a policy none of whose responses is judged leaves no earlier report.
    long = write_jsonl(tmp_path / "long_a.jsonl", [{"prompt": "p", "completion": "word " * 9000}])
    harmless = tmp_path / "h"
    harmless.mkdir()
    for name in ("metrics.json", "report.md", "harmless.png"):
        (harmless / name).write_text("an earlier run's")
    assert in_process("harmless", str(long), "--task", "tiny", "--out", str(harmless), "--skip-invalid") == 1
    assert "no response of policy A was judged" in capsys.readouterr().err
    assert sorted(p.name for p in harmless.iterdir()) in ([], ["judgments.jsonl"])


def test_harmless_with_a_task_that_asks_no_question_is_refused_alike(tmp_path, labeler, capsys):
    """A task that asks no yes/no question: the same refusal, status 2, through the service
    as in process."""
    from labeler import Labeler, TaskRegistry
    from tests.fixtures.server import LiveServer

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    tiny = (TEST_TASKS / "tiny.toml").read_text()
    (tasks / "tiny.toml").write_text(tiny)
    (tasks / "plain.toml").write_text(tiny.replace('judgment_question = "Is the answer right?"', ""))
    srv = LiveServer(Labeler(labeler.engine, TaskRegistry.load([tasks])), task="tiny")
    a = write_jsonl(tmp_path / "a.jsonl", A[:1])
    try:
        srv.start()
        for where in (["--url", srv.url], ["--tasks-dir", str(tasks)]):
            argv = ["harmless", str(a), "--task", "plain", *where, "--no-progress", "--out", str(tmp_path / "h")]
            assert cli.main(argv) == 2, where
            assert "asks no yes/no question" in capsys.readouterr().err
    finally:
        srv.stop()


def test_harmless_through_the_service_equals_in_process(tmp_path, labeler, live_server, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", A[:2])
    argv = ["harmless", str(a), "--task", "tiny", "--url", live_server.url, "--no-progress", "--json"]
    assert cli.main([*argv, "--out", str(tmp_path / "h")]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = [r.p_yes for r in labeler.judgments([ScoreItem(x["prompt"], x["completion"]) for x in A[:2]], "tiny")]
    assert got["policies"][0]["mean_p_yes"] == pytest.approx(sum(ref) / 2, abs=1e-4)
    assert got["summary"]["labeled"] == 2
    judged = rows(tmp_path / "h" / "judgments.jsonl")
    assert [r["p_yes"] for r in judged] == pytest.approx(ref, abs=1e-4)
    # The same rows into a new directory: the service answers from its cache, with the same keys.
    assert cli.main([*argv, "--out", str(tmp_path / "again")]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["cached"] == 2
    assert [r["key"] for r in rows(tmp_path / "again" / "judgments.jsonl")] == [r["key"] for r in judged]
