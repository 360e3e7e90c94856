"""`labeler serve` as a user runs it: settings from LABELER_* env vars and flags, JSON logs
that never contain an API key, and a graceful exit on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.fixtures.load import metric
from tests.fixtures.model import TEST_TASKS
from tests.fixtures.redis import free_port
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.model


def test_serve_reads_env_and_flags_logs_json_and_stops_gracefully(tmp_path):
    port = free_port()
    secret = "sk-serve-secret-5678"
    # Short rationales: the in-flight request below must finish within uvicorn's 60 s of grace
    # on a loaded machine too.
    env = os.environ | {
        "LABELER_API_KEYS": f"{secret},second",
        "LABELER_MAX_ITEMS": "3",
        "LABELER_MAX_RATIONALE_TOKENS": "16",
        "LABELER_REDIS_ULR": "redis://127.0.0.1:1",  # misspelled: the cache stays in-process, with a warning
    }
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "labeler.cli", "serve", "--port", str(port), "--tasks-dir", str(TEST_TASKS)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("server not ready: " + (tmp_path / "serve.log").read_text())
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"task": "tiny", "items": [{"response": "hi"}]}
        assert httpx.post(url + "/v1/scores", json=body, timeout=60).status_code == 401
        assert httpx.post(url + "/v1/scores", json=body, headers=auth, timeout=60).status_code == 200
        too_many = {"task": "tiny", "items": [{"response": "hi"}] * 4}
        assert httpx.post(url + "/v1/scores", json=too_many, headers=auth, timeout=60).status_code == 422
        # SIGTERM while a request is in flight: it still gets its answer.
        slow = {"task": "tiny", "cot": True, "items": [{"response": f"slow {i}"} for i in range(3)]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/scores", json=slow, headers=auth, timeout=120)
            wait_for(lambda: metric(url, "labeler_inflight_items") > 0, 60, "the request in flight")
            proc.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    text = (tmp_path / "serve.log").read_text()
    assert secret not in text
    raw = text.splitlines()
    served = next(i for i, line in enumerate(raw) if "Finished server process" in line)
    lines = [json.loads(line) for line in raw[: served + 1]]  # every line JSON (no progress bars)
    assert any(r["logger"] == "uvicorn.access" and "/v1/scores" in r["message"] for r in lines)
    assert any(r["message"] == "ready" and r.get("cache") == "memory" for r in lines)
    assert any(r["level"] == "warning" and "did you mean LABELER_REDIS_URL?" in r["message"] for r in lines)
    assert any("Finished server process" in r["message"] for r in lines)


def test_ctrl_c_stops_the_server_gracefully_with_status_0(tmp_path):
    """Ctrl-C (SIGINT, as systemd's `KillSignal=SIGINT` sends it) is a stop asked for: a
    graceful shutdown and status 0, which no `Restart=on-failure` restarts."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "labeler.cli", "serve", "--port", str(port), "--tasks-dir", str(TEST_TASKS)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{port}"), 120, "the server to be ready")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "serve.log").read_text()
    assert rc == 0, text[-2000:]
    assert "Finished server process" in text and "interrupted" not in text


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_server_without_keys_says_who_can_reach_it():
    from service.cli import auth_warnings
    from service.settings import Settings

    assert auth_warnings(Settings(), {}) == []  # loopback: this machine only
    assert auth_warnings(Settings(host="localhost"), {}) == []
    assert auth_warnings(Settings(host="::1"), {}) == []
    [exposed] = auth_warnings(Settings(host="0.0.0.0", port=8100), {})
    assert "no API key is required" in exposed and "0.0.0.0:8100" in exposed
    # The client's variable, set on the server in vain (its keys are LABELER_API_KEYS).
    [ignored] = auth_warnings(Settings(), {"LABELER_API_KEY": "sk-1"})
    assert "LABELER_API_KEY is the client's variable" in ignored and "sk-1" not in ignored
    assert auth_warnings(Settings(host="0.0.0.0", api_keys=["k"]), {"LABELER_API_KEY": "sk-1"}) == []


def test_a_key_no_client_could_send_is_refused_at_start():
    """A key of characters other than printable ASCII: HTTP clients write no others into a
    header, so no request could ever be let in with it."""
    from pydantic import ValidationError

    from service.settings import Settings

    for bad in ("clé", "sk\x7f1"):
        with pytest.raises(ValidationError, match="an API key must be printable ASCII"):
            Settings(api_keys=bad)
    assert Settings(api_keys="sk-1,sk-2").api_keys == ["sk-1", "sk-2"]


def test_a_misspelled_setting_variable_is_named_with_the_setting_it_nearly_spells():
    from service.settings import misspelled_variables

    environ = {
        "LABELER_REDIS_ULR": "redis://cache:6379",  # the setting keeps its default: no shared cache
        "LABELER_TASK_DIR": "/tasks",
        "LABELER_REDIS_URL": "redis://cache:6379",  # settings and the product's other variables pass
        "LABELER_CACHE_ttl": "60",  # a setting too: names are read whatever their case
        "LABELER_CACHE_DIR": "/models",
        "LABELER_API_KEY": "sk-1",
        "LABELER_API_THREADS": "2",
        # the compose files' own variables, some near a setting's name
        "LABELER_ENV_FILE": "../.env",
        "LABELER_GPU_MODEL": "/models/model",
        "LABELER_GPU_ENGINE_ARGS": "max_model_len=8192",
        "LABELER_GPU_PUBLISH": "127.0.0.1:8001",
        "LABELER_SOMETHING_ELSE": "1",  # near no setting: another tool's
        "REDIS_ULR": "x",
    }
    assert misspelled_variables(environ) == [
        "LABELER_REDIS_ULR is not a setting and is ignored; did you mean LABELER_REDIS_URL?",
        "LABELER_TASK_DIR is not a setting and is ignored; did you mean LABELER_TASKS_DIR?",
    ]


@pytest.mark.parametrize("name", ["LABELER_BATCH_WAIT_MS", "LABELER_REDIS_COOLDOWN"])
def test_an_endless_wait_is_refused_as_a_setting(name, monkeypatch):
    """inf would hold every batch under its size forever (or bypass Redis for good)."""
    import argparse

    from labeler.errors import InvalidInput
    from service.cli import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.setenv(name, "inf")
    field = name.removeprefix("LABELER_").lower()
    with pytest.raises(InvalidInput, match=f"invalid settings: {field}: Input should be a finite number"):
        settings_from_args(parser.parse_args(["serve"]))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--engine", "bogus"], "unknown engine 'bogus'; choose one of transformers, vllm, vllm-remote"),
        (["--engine-arg", "foo=1"], "the transformers engine takes no option 'foo' (--engine-arg)"),
        # option values of the wrong kind, which the engine's constructor would refuse at start-up
        (["--engine-arg", "max_batch_tokens=abc"], "the transformers engine's max_batch_tokens must be a whole number"),
        (["--engine-arg", "dtype=int8"], "dtype must be float32, bfloat16, float16 or float64"),
        # a floating-point storage format, not a type a model computes in
        (["--engine-arg", "dtype=float8_e4m3fn"], "dtype must be float32, bfloat16, float16 or float64"),
        (["--device", "cuda:99"], "device 'cuda:99' cannot be used by this torch"),
        (
            ["--engine", "vllm-remote", "--vllm-urls", "http://127.0.0.1:1", "--engine-arg", "timeout=0"],
            "the vllm-remote engine's timeout must be more than 0, got 0",
        ),
        (["--engine", "vllm-remote"], "the vllm-remote engine needs server URLs (--vllm-urls / LABELER_VLLM_URLS)"),
        (["--model", "/nonexistent/model"], "model '/nonexistent/model' is neither 'embedded'"),
        (["--redis-url", "localhost:6379"], "redis_url: Redis URL must specify one of the following schemes"),
        (["--redis-url", "redis://localhost:port"], "redis_url: Port could not be cast to integer"),
    ],
)
def test_serve_refuses_a_start_that_would_fail_as_one_line(argv, says):
    """What the app's start-up would refuse after loading the model, with a traceback and
    uvicorn's status 3, is refused before the server starts: one line, status 2. (A process
    of its own: `serve` configures the logging of the process it runs in.)"""
    err = refused_start(argv)
    assert says in err, err


def refused_start(argv: list[str]) -> str:
    """The one line `labeler serve ARGV` refuses its start with (status 2, no traceback)."""
    done = subprocess.run(
        [sys.executable, "-m", "labeler.cli", "serve", "--port", str(free_port()), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_vllm_remote_with_a_copy_without_weights_is_refused_before_the_server_starts(model_dir, tmp_path):
    """A local copy of the tokenizer and config alone cannot name the served weights: the
    engine refuses it without `model_id=`, and `serve` says so as one line before it starts,
    not as the lifespan's traceback once uvicorn is up."""
    import shutil

    from labeler.fingerprint import is_weight

    bare = tmp_path / "tokenizer-only"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and not is_weight(f):
            shutil.copy2(f, bare / f.name)
    err = refused_start(["--engine", "vllm-remote", "--vllm-urls", "http://127.0.0.1:1", "--model", str(bare)])
    assert "holds no weights" in err and "model_id=NAME" in err, err


def test_a_misspelt_variable_is_named_before_a_refusal_it_explains():
    """`LABELER_VLLM_URL` for `LABELER_VLLM_URLS`: the warning comes before the refusal."""
    env = os.environ | {"LABELER_VLLM_URL": "http://127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "labeler.cli", "serve", "--port", str(free_port()), "--engine", "vllm-remote"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    warning, refusal = done.stderr.strip().splitlines()
    assert "LABELER_VLLM_URL is not a setting and is ignored; did you mean LABELER_VLLM_URLS?" in warning
    assert refusal.startswith("error: the vllm-remote engine needs server URLs")


def test_repeatable_flags_replace_their_variables(monkeypatch, tmp_path):
    """--engine-arg and --tasks-dir override LABELER_ENGINE_ARGS and LABELER_TASKS_DIR, as every
    other flag overrides its variable: a stale variable is fixed on the command line."""
    import argparse

    from service.cli import register, settings_from_args

    monkeypatch.setenv("LABELER_ENGINE_ARGS", "gpu_memory_utilization=0.85 max_model_len=4096")
    monkeypatch.setenv("LABELER_TASKS_DIR", str(tmp_path / "gone"))
    parser = argparse.ArgumentParser()  # the flags' defaults are the variables when it is built
    register(parser.add_subparsers())
    kept = settings_from_args(parser.parse_args(["serve"]))
    assert kept.engine_args == ["gpu_memory_utilization=0.85", "max_model_len=4096"]
    assert kept.tasks_dir == [str(tmp_path / "gone")]
    args = ["serve", "--engine-arg", "dtype=float32", "--engine-arg", "threads=2", "--tasks-dir", str(TEST_TASKS)]
    given = settings_from_args(parser.parse_args(args))
    assert given.engine_args == ["dtype=float32", "threads=2"] and given.tasks_dir == [str(TEST_TASKS)]


def test_serve_reads_its_variables_in_any_case_as_its_settings_do(monkeypatch):
    """The settings read `labeler_engine` as `LABELER_ENGINE` (pydantic-settings' lookup is
    case-insensitive): `--engine` and `--device`, left out, do not put their own defaults over
    such a variable; given, they win over it, and without either the defaults are the same."""
    import argparse

    from service.cli import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.delenv("LABELER_ENGINE", raising=False)
    monkeypatch.delenv("LABELER_DEVICE", raising=False)
    plain = settings_from_args(parser.parse_args(["serve"]))
    assert (plain.engine, plain.device) == ("transformers", "cpu")
    monkeypatch.setenv("labeler_engine", "vllm-remote")
    monkeypatch.setenv("labeler_device", "cuda:1")
    read = settings_from_args(parser.parse_args(["serve"]))
    assert (read.engine, read.device) == ("vllm-remote", "cuda:1")
    given = settings_from_args(parser.parse_args(["serve", "--engine", "vllm", "--device", "cpu"]))
    assert (given.engine, given.device) == ("vllm", "cpu")


def test_a_redis_cooldown_of_zero_is_refused(monkeypatch):
    """0 would never bypass an unreachable Redis: every request would wait on it and log it."""
    import argparse

    from labeler.errors import InvalidInput
    from service.cli import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.setenv("LABELER_REDIS_COOLDOWN", "0")
    with pytest.raises(InvalidInput, match="invalid settings: redis_cooldown: Input should be greater than 0"):
        settings_from_args(parser.parse_args(["serve"]))


def test_running_the_serve_module_alone_points_to_the_command():
    """`python -m service.cli` starts nothing: it says which command does, and exits 1."""
    done = subprocess.run([sys.executable, "-m", "service.cli"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "labeler serve" in done.stderr, done
