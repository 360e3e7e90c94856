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
    text = run("tasks").stdout  # LABELER_TASKS_DIR (set by `run`) adds the test tasks, as for the server
    assert "summarize" in text and test_tasks.get("summarize").version in text and "tiny_fewshot" in text


def test_tasks_dir_from_the_environment_is_split_as_the_server_splits_it(monkeypatch, test_tasks):
    """A blank entry (`dir: `, a trailing separator) is no directory, for the CLI as for the
    server's LABELER_TASKS_DIR."""
    from labeler import cli
    from service.settings import Settings

    value = f"{TEST_TASKS}{os.pathsep} {os.pathsep}"
    monkeypatch.setenv("LABELER_TASKS_DIR", value)
    args = cli.build_parser().parse_args(["tasks"])
    assert args.tasks_dir == Settings().tasks_dir == [str(TEST_TASKS)]
    assert {t.name for t in cli.load_tasks(args)} >= {t.name for t in test_tasks}


def test_vllm_server_takes_its_own_options_before_the_model():
    """After MODEL every argument is vLLM's: `--dry-run` or `--model` there would act unseen
    (start the server; serve another model than the CPU defaults were sized for). Run as a
    process: the command replaces its process with vLLM's server when it starts one."""
    for argv in (["embedded", "--dry-run"], ["embedded", "--port", "8001", "--model=/x"]):
        proc = run("vllm-server", *argv, check=False)
        assert proc.returncode == 2 and "goes before MODEL" in proc.stderr, proc.stderr[-2000:]


def test_render_gives_exactly_what_the_engine_reads(labeler, engine):
    out = json.loads(
        run("render", "--task", "tiny", "--kind", "score", "--context", "2+2?", "--response", "4", "--json").stdout
    )
    r = labeler.render_score("tiny", "2+2?", "4")
    assert out["prompt"] == r.prompt and out["prompt_token_ids"] == list(r.prompt_token_ids)
    assert out["prompt_token_ids"] == engine.tokenizer(out["prompt"], add_special_tokens=False)["input_ids"]
    assert {c["label"]: tuple(c["token_ids"]) for c in out["candidates"]} == r.labels


def test_render_reads_no_weights_and_renders_a_file_of_items(labeler, model_dir, tmp_path):
    """A model directory without its weights still renders (only the tokenizer and config are
    read); a JSONL file of items renders to one JSON line each, and --json prints nothing else."""
    light = tmp_path / "light"
    light.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            (light / f.name).write_bytes(f.read_bytes())
    items = [
        {"context": "Name a fruit.", "response_a": "Apple.", "response_b": "Chair."},
        {"response_a": "x\u2028y", "response_b": "y"},  # a line separator inside a text, written as is
        # Any format `label` reads, read as it and the service read it: messages as their
        # transcript, end-of-turn markers dropped.
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4<|im_end|>"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
    ]
    read_as = [("Name a fruit.", "Apple.", "Chair."), ("", "x\u2028y", "y"), ("2+2?", "4", "5")]
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    (tmp_path / "items.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())  # an editor's byte-order mark
    args = ["render", "--task", "tiny", "--kind", "pairwise", "--order", "ba", "--model", str(light), "--json"]
    proc = run(*args, "--input", str(tmp_path / "items.jsonl"))
    rows = [json.loads(line) for line in proc.stdout.split("\n") if line]
    assert len(rows) == 3 and proc.stderr == ""
    for row, (context, a, b) in zip(rows, read_as, strict=True):
        ref = labeler.render_pairwise("tiny", context, a, b, order="ba")
        assert row["prompt"] == ref.prompt and row["prompt_token_ids"] == list(ref.prompt_token_ids)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response_a": "only one"}\n')
    proc = run(*args, "--input", str(bad), check=False)
    assert proc.returncode == 2 and f"{bad}, line 1" in proc.stderr and "response_b" in proc.stderr
    bad.write_bytes('{"response_a": "caf\u00e9", "response_b": "b"}\n'.encode("latin-1"))  # not UTF-8
    proc = run(*args, "--input", str(bad), check=False)
    assert proc.returncode == 2 and "line 1: not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_render_for_vllm_reads_the_tokenizer_and_context_its_arguments_name(model_dir, tmp_path):
    """vLLM's `tokenizer=` (another chat template) and `max_model_len=` change what the engine
    reads: render shows that, not the model directory's own tokenizer and context."""
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            (tok / f.name).write_bytes(f.read_bytes())
    (tok / "chat_template.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    args = ["render", "--task", "tiny", "--kind", "score", "--context", "Hi", "--response", "Hello", "--json"]
    own = json.loads(run(*args, "--model", str(model_dir)).stdout)
    vllm = ["--model", str(model_dir), "--engine", "vllm", "--engine-arg", f"tokenizer={tok}"]
    other = json.loads(run(*args, *vllm).stdout)
    assert "<|im_start|>assistant" in own["prompt"] and "### assistant: " in other["prompt"]
    assert "<|im_start|>" not in other["prompt"]
    short = run(*args, *vllm, "--engine-arg", "max_model_len=64", check=False)
    assert short.returncode == 2 and "64" in short.stderr, short.stderr


def test_render_into_a_pipe_closed_early_ends_quietly(model_dir, tmp_path):
    """`labeler render --input ... --json | head -1`: the reader leaves after one line; the
    command ends with the status of a command a closed pipe stopped, without a traceback.
    Items missing a response are a usage error (status 2), not a plain exit message."""
    items = tmp_path / "items.jsonl"
    items.write_text((json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n") * 2000)
    args = ["render", "--task", "tiny", "--kind", "score", "--model", str(model_dir), "--json", "--input", str(items)]
    env = os.environ | {"LABELER_TASKS_DIR": str(TEST_TASKS)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "labeler.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert json.loads(proc.stdout.readline())["kind"] == "score"
    proc.stdout.close()
    assert proc.wait(timeout=300) == 141
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Broken pipe" not in err, err
    proc = run("render", "--task", "tiny", "--kind", "score", "--model", str(model_dir), check=False)
    assert proc.returncode == 2 and "render --kind score needs --response (or --input FILE.jsonl)" in proc.stderr


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
    # Read as the service and `label` read it: a template's markup is not part of the texts.
    chatml = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    out = json.loads(run("score", "--task", "tiny", "--context", chatml, "--response", "4<|im_end|>", "--json").stdout)
    assert out["distribution"] == pytest.approx(ref.distribution, abs=1e-5)


def test_errors_are_clear_and_exit_2():
    proc = run("score", "--task", "nope", "--response", "r", check=False)
    assert proc.returncode == 2 and "unknown task 'nope'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "in.jsonl", "--out", "o", "--level", "95"], "between 0 and 1 (0.95 for 95%), got '95'"),
        (["winrate", "a.jsonl", "b.jsonl", "--level", "1"], "between 0 and 1"),
        (["eval", "in.jsonl", "--out", "o", "--bins", "0"], "at least 1, got '0'"),
        (["label", "in.jsonl", "out.jsonl", "--chunk-size", "-4"], "at least 1, got '-4'"),
    ],
)
def test_batch_options_out_of_range_are_refused_before_any_work(argv, message, capsys):
    """A 95 meant as 95 %, or zero bins: refused by the parser (exit 2), not a traceback after
    labeling, nor an empty calibration that reads as a perfect one."""
    from labeler.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_task_or_option_is_refused_before_the_model_loads(tmp_path, capsys):
    """The model named here does not exist: the task's or option's error comes first, as it
    would before minutes of loading a large model."""
    from labeler.cli import main

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "chosen": "y", "rejected": "n"}) + "\n")
    missing = str(tmp_path / "no-model")
    for argv in (
        ["score", "--task", "nope", "--response", "r", "--model", missing],
        ["label", str(data), str(tmp_path / "out.jsonl"), "--task", "nope", "--model", missing],
    ):
        assert main(argv) == 2
        assert "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    # So are labeling options that no label spec takes, and an order for single responses.
    for options, message in (
        (["--samples", "4"], "needs cot=true"),
        (["--cot", "--seed", "-1"], "seed must be"),
        (["--scores", "--order", "ab"], "--order is for pairs; --scores scores each response alone"),
    ):
        assert (
            main(["label", str(data), str(tmp_path / "out.jsonl"), "--task", "general", "--model", missing, *options])
            == 2
        )
        assert message in capsys.readouterr().err
