"""The images, built for real (tests/fixtures/docker.py): what the CPU image holds and runs as,
that the CA bundle secret never lands in it, and that a source edit rebuilds only the source
layers."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest

from tests.fixtures.docker import ROOT, build_project_image, ca_bundle

pytestmark = pytest.mark.docker

# Shared libraries of a CUDA build of torch (and of the nvidia-* wheels it pulls).
CUDA_LIBS = ("libcuda*", "libcudart*", "libcublas*", "libcudnn*", "libnccl*", "libnvrtc*", "libcusparse*")


def test_cpu_image_runs_as_non_root_and_holds_no_cuda(docker_engine, cpu_image, docker_figures):
    assert docker_engine.docker("image", "inspect", "-f", "{{.Config.User}}", cpu_image).stdout.strip() == "10001"
    probe = (
        "import importlib.metadata as m, json, os, torch;"
        "print(json.dumps({'uid': os.getuid(), 'cuda': torch.version.cuda, 'torch': torch.__version__,"
        "'nvidia': sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia'))}))"
    )
    out = docker_engine.docker("run", "--rm", "--network", "none", "--entrypoint", "python", cpu_image, "-c", probe)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["uid"] == 10001
    assert info["cuda"] is None and info["torch"].endswith("+cpu") and info["nvidia"] == []
    names = " -o ".join(f"-name '{n}'" for n in CUDA_LIBS)
    found = docker_engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "0",
        "--entrypoint",
        "sh",
        cpu_image,
        "-c",
        f"find / -xdev \\( {names} \\)",
    ).stdout.split()
    assert found == []
    docker_figures.record(
        "cpu image", bytes=docker_engine.image_size(cpu_image), torch=info["torch"], cuda_libraries=len(found)
    )


def test_ca_bundle_secret_is_not_in_the_image(docker_engine, cpu_image):
    """The bundle was mounted for the pip steps only: no file in the image has its bytes."""
    bundle = ca_bundle()
    if bundle is None:
        pytest.skip("this machine has no CA bundle to pass as a secret")
    data = bundle.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    # Candidates: every file of exactly the bundle's size; then their hashes.
    out = docker_engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "0",
        "--entrypoint",
        "sh",
        cpu_image,
        "-c",
        f"ls /run/secrets 2>/dev/null; find / -xdev -type f -size {len(data)}c -exec sha256sum {{}} +",
    ).stdout
    assert digest not in out and "ca_bundle" not in out


def test_source_edit_rebuilds_only_the_source_layers(
    docker_engine, standin_images, cpu_image, tmp_path, docker_figures
):
    """A copy of the build context with one edited service file: torch, the dependencies and
    the model come from the cache; only the source steps run."""
    ctx = tmp_path / "ctx"
    (ctx / "docker").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(ROOT / name, ctx / name)
    for name in ("labeler", "service"):
        shutil.copytree(ROOT / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Dockerfile", "healthcheck.py"):
        shutil.copy2(ROOT / "docker" / name, ctx / "docker" / name)
    app = ctx / "service" / "app.py"
    app.write_text(app.read_text() + f"\n# edited {time.time_ns()}\n")
    tag = "rlaif-labeler:cpu-standin-edit"
    try:
        build = build_project_image(docker_engine, standin_images["python:3.11-slim"], tag, context=ctx)
    finally:
        docker_engine.docker("rmi", tag, check=False)
    ran = " | ".join(build.ran)
    assert "COPY service ./service" in ran, build.steps
    for heavy in ('pip install "torch==', "pip install .", "resolve_model(None)"):
        assert not any(heavy in step for step in build.ran), f"{heavy} ran again: {ran}"
    docker_figures.record(
        "cpu image rebuild after a source edit", seconds=build.seconds, steps=len(build.steps), ran=len(build.ran)
    )
