"""vLLM engines on this CPU: in-process AsyncLLM and remote `labeler vllm-server`, both
equal to the transformers engine on the same weights (within 1e-4), CoT with greedy
decoding too; the CPU defaults both get (fp32, eager, a KV cache that fits, thread
binding) and the clear errors when a KV cache cannot fit."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from labeler import Labeler, PairItem, ScoreItem
from labeler.commands_vllm import given_args, server_command
from labeler.engines import vllm_cpu
from labeler.engines.vllm_cpu import (
    CPU_KV_CACHE_MAX,
    THREADS_BIND_ENV,
    GiB,
    check_kv_cache_fits,
    cpu_defaults,
    default_kv_cache_bytes,
    kv_bytes_per_token,
    one_sequence_bytes,
    parse_sizes,
    threads_bind,
    weights_bytes,
)
from labeler.engines.vllm_engine import VLLMEngine, vllm_model_id
from labeler.engines.vllm_remote import VLLMRemoteEngine
from labeler.errors import InvalidInput, ModelLoadError
from tests.fixtures.wait import async_wait_for

pytestmark = [pytest.mark.model, pytest.mark.vllm]
TOL = 1e-4

PAIRS = [
    PairItem("Name a fruit.", "An apple.", "A chair."),
    PairItem("What is 2+2?", "4", "5"),
    PairItem("Say hi.", "Hello there, friend!", "Go away."),
]
SCORES = [ScoreItem("What is 2+2?", "4"), ScoreItem("Name a color.", "Blue."), ScoreItem("", "A reply with no prompt.")]


async def assert_same_labels(lab: Labeler, ref: Labeler, *, cot: bool) -> None:
    got, want = await asyncio.gather(lab.apreferences(PAIRS, "tiny", cot=cot), ref.apreferences(PAIRS, "tiny", cot=cot))
    for g, w in zip(got, want, strict=True):
        assert g.p_a_ab == pytest.approx(w.p_a_ab, abs=TOL) and g.p_a_ba == pytest.approx(w.p_a_ba, abs=TOL)
        assert g.rationales == w.rationales
    got_s, want_s = await asyncio.gather(lab.ascores(SCORES, "tiny", cot=cot), ref.ascores(SCORES, "tiny", cot=cot))
    for g, w in zip(got_s, want_s, strict=True):
        assert g.distribution == pytest.approx(w.distribution, abs=TOL)  # "10" is two tokens: a chained read
        assert g.rationales == w.rationales


@pytest.fixture(scope="module")
def reference(labeler: Labeler) -> Labeler:
    return labeler


@pytest.mark.parametrize("cot", [False, True], ids=["direct", "cot-greedy"])
async def test_in_process_vllm_equals_transformers(vllm_engine, reference, test_tasks, cot):
    lab = Labeler(vllm_engine, test_tasks, max_rationale_tokens=reference.max_rationale_tokens)
    await assert_same_labels(lab, reference, cot=cot)


async def test_neighbouring_seeds_share_no_sampled_rationale(vllm_engine, test_tasks):
    """vLLM draws sample i of a request with its seed + i: the labeler spaces seeds out, so
    seeds 0 and 1 (three samples each) draw six rationales, not four."""
    lab = Labeler(vllm_engine, test_tasks, max_rationale_tokens=24)
    item = [ScoreItem("Name a color.", "Blue.")]
    draws = [(await lab.ascores(item, "tiny", cot=True, samples=3, seed=seed))[0].rationales for seed in (0, 1)]
    assert [len(d) for d in draws] == [3, 3]
    assert not set(draws[0]) & set(draws[1]), draws
    assert (await lab.ascores(item, "tiny", cot=True, samples=3, seed=1))[0].rationales == draws[1]


async def test_concurrent_requests_reach_vllm_at_once(vllm_engine, test_tasks):
    lab = Labeler(vllm_engine, test_tasks)
    vllm_engine.peak_inflight = 0
    before = vllm_engine.stats.computed_tokens
    results = await asyncio.gather(*(lab.ascores([ScoreItem("Hi", f"reply {i}")], "tiny") for i in range(8)))
    assert len(results) == 8 and vllm_engine.stats.computed_tokens > before  # the tokens run are counted
    # Prompts of a few cache blocks (vLLM caches whole blocks, 128 tokens on a CPU), asked
    # again: they are in the prefix cache, and fewer tokens run than they hold.
    long = [ScoreItem("Tell me why the sky is blue, and why sunsets are red. " * 25, f"reply {i}") for i in range(4)]
    await lab.ascores(long, "tiny")
    before = vllm_engine.stats.prompt_tokens, vllm_engine.stats.computed_tokens
    await lab.ascores(long, "tiny")
    prompt, computed = (vllm_engine.stats.prompt_tokens - before[0], vllm_engine.stats.computed_tokens - before[1])
    assert 0 <= computed < prompt, (computed, prompt)
    # Eight one-item calls, each with a first-token read: all in the engine together,
    # not one after another behind a lock.
    assert vllm_engine.peak_inflight >= 8


async def test_remote_engine_equals_transformers_and_fails_over(vllm_servers, model_dir, reference, test_tasks):
    for s in vllm_servers:
        s.wait_ready()
    remote = VLLMRemoteEngine([s.url for s in vllm_servers], model_dir, cooldown=30, timeout=120)
    try:
        lab = Labeler(remote, test_tasks, max_rationale_tokens=reference.max_rationale_tokens)
        assert remote.served_model == "labeler-test"  # learnt from /v1/models at start
        await assert_same_labels(lab, reference, cot=False)
        # Scores' "10" is two tokens: a prompt's second read goes to the server that read it
        # first, where its whole cache blocks (128 tokens on a CPU) are: at most a block and
        # the label's token run again per prompt, not the prompt again on the other server.
        # Three prompts: round robin over two servers would send every second read elsewhere.
        long = [
            ScoreItem("Tell me why the sea is salty, and why rivers are not. " * 25, f"reply {i}") for i in range(3)
        ]
        before = remote.stats.prompt_tokens, remote.stats.computed_tokens
        await lab.ascores(long, "tiny")
        prompt, computed = (remote.stats.prompt_tokens - before[0], remote.stats.computed_tokens - before[1])
        assert prompt > 3 * 300 and 0 < computed <= prompt + 3 * 129, (computed, prompt)
        # With chain-of-thought, the label read after a rationale goes to the server that
        # generated it: each prompt is computed once (for its rationale), then each of its two
        # reads at most a block and a label token. Round robin would send all three first
        # reads elsewhere (A B A, then B A B), computing each prompt's own part twice (the
        # prompts differ from their first line of context on).
        fresh = [
            ScoreItem(f"Case {i}. " + "Explain why tides follow the moon, and why some coasts get two. " * 20, "ok")
            for i in range(3)
        ]
        before = remote.stats.prompt_tokens, remote.stats.computed_tokens
        await lab.ascores(fresh, "tiny", cot=True)
        prompt, computed = (remote.stats.prompt_tokens - before[0], remote.stats.computed_tokens - before[1])
        assert prompt > 3 * 300 and 0 < computed <= prompt + 3 * 2 * 129, (computed, prompt)
        # Stop one server: every request still succeeds on the other, with the same numbers.
        vllm_servers[0].stop()
        before = await reference.ascores(SCORES, "tiny")
        after = await lab.ascores(SCORES, "tiny")
        for g, w in zip(after, before, strict=True):
            assert g.distribution == pytest.approx(w.distribution, abs=TOL)
        assert remote.servers[0].down_until > 0 and remote.servers[0].needs_probe
    finally:
        await remote.aclose()


async def test_http_service_on_vllm_through_the_client(vllm_engine, reference, test_tasks):
    """The app on the in-process vLLM engine, served in this event loop (AsyncLLM is bound
    to it), answering the async client like the transformers engine does."""
    import labeler_client as lc
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from tests.fixtures.redis import free_port

    port = free_port()
    lab = Labeler(vllm_engine, test_tasks, max_rationale_tokens=reference.max_rationale_tokens)
    app = create_app(Settings(port=port, engine="vllm"), labeler=lab)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await async_wait_for(lambda: server.started or serving.done(), 120, "the server to start")
        assert server.started, serving
        async with lc.AsyncClient(f"http://127.0.0.1:{port}", batch_size=2) as client:
            assert (await client.health()).engine == "vllm"
            pairs = [{"context": p.context, "response_a": p.response_a, "response_b": p.response_b} for p in PAIRS]
            got = await client.preferences(pairs, "tiny")
            rewards = await client.rewards([s.context for s in SCORES], [s.response for s in SCORES], task="tiny")
        want = await reference.apreferences(PAIRS, "tiny")
        for g, w in zip(got, want, strict=True):
            assert g.p_a == pytest.approx(w.p_a, abs=TOL)
        want_s = await reference.ascores(SCORES, "tiny")
        assert rewards == pytest.approx([w.reward for w in want_s], abs=TOL)
    finally:
        server.should_exit = True
        await serving


def test_labeler_serve_with_the_vllm_engine(vllm_servers, tmp_path):
    """`labeler serve --engine vllm` as a user runs it on this CPU machine; when vLLM's
    engine process dies (killed, as the OOM killer would), the server exits by itself with
    status 4 and says why, for its restart policy to start it anew."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.fixtures.model import TEST_TASKS
    from tests.fixtures.redis import free_port

    for s in vllm_servers:  # let the shared servers finish booting first: CPU is scarce
        if s.proc is not None:
            s.wait_ready()
    port = free_port()
    args = ["kv_cache_memory_bytes=512M"]  # every other vLLM setting is the engine's CPU default
    cmd = [
        sys.executable,
        "-m",
        "labeler.cli",
        "serve",
        "--engine",
        "vllm",
        "--port",
        str(port),
        "--tasks-dir",
        str(TEST_TASKS),
    ] + [a for kv in args for a in ("--engine-arg", kv)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)  # also after a 503 while the model loads
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert httpx.get(url + "/readyz").json()["engine"] == "vllm"
        r = httpx.post(url + "/v1/scores", json={"task": "tiny", "items": [{"response": "hi"}]}, timeout=120)
        assert r.status_code == 200 and -1 <= r.json()["results"][0]["reward"] <= 1
        engine_processes = psutil.Process(proc.pid).children(recursive=True)
        assert engine_processes, "vLLM's engine runs in a process of its own"
        for child in engine_processes:
            child.kill()
        assert proc.wait(timeout=120) == 4, (tmp_path / "serve.log").read_text()[-3000:]
        assert (
            "the vLLM engine process died (its log says why): shutting down (exit status 4)"
            in (tmp_path / "serve.log").read_text()
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


# -- CPU defaults ------------------------------------------------------------------------------


def embedded_kv_bytes_per_token(model_dir) -> int:
    """Independently: K and V, per layer, per KV head, head_dim floats of 4 bytes."""
    c = json.loads((model_dir / "config.json").read_text())
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 4


def test_kv_and_weight_sizes_from_the_model_files(model_dir):
    assert kv_bytes_per_token(model_dir, "float32") == embedded_kv_bytes_per_token(model_dir)
    assert kv_bytes_per_token(model_dir, "bfloat16") * 2 == embedded_kv_bytes_per_token(model_dir)
    files = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert weights_bytes(model_dir, "float32") == files  # stored as fp32
    assert weights_bytes(model_dir, "bfloat16") == files // 2


def test_weights_are_the_files_vllm_loads(tmp_path):
    """A directory with the weights in two formats, a consolidated copy beside an index's shards,
    or training state beside .bin weights: each byte vLLM loads counted once."""
    (tmp_path / "config.json").write_text('{"torch_dtype": "float32"}')

    def files(**sizes: int) -> int:
        for f in tmp_path.iterdir():
            if f.name != "config.json":
                f.unlink()
        for name, size in sizes.items():
            (tmp_path / name.replace("__", ".")).write_bytes(b"\0" * size)
        return weights_bytes(tmp_path, "float32")

    assert files(model__safetensors=100, pytorch_model__bin=100) == 100
    assert files(pytorch_model__bin=100, optimizer__pt=300, training_args__bin=7) == 100
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    sizes = {"model-00001-of-00002__safetensors": 60, "model-00002-of-00002__safetensors": 40}
    assert files(consolidated__safetensors=100, **sizes) == 200  # no index: every safetensors file
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weights_bytes(tmp_path, "float32") == 100


def test_random_weights_get_a_model_id_of_their_own(model_dir):
    """`load_format=dummy` runs random weights: their labels must not be cached under the
    model's id, nor shared with another process's random weights."""
    real = vllm_model_id(model_dir, {"load_format": "auto"})
    assert real == vllm_model_id(model_dir, {})
    dummies = {vllm_model_id(model_dir, {"load_format": "dummy"}) for _ in range(2)}
    assert len(dummies) == 2 and all(d.startswith(real + "+dummy-") for d in dummies)


def test_a_tokenizer_of_another_directory_is_part_of_the_model_id(model_dir, tmp_path):
    """`tokenizer=` reads the prompts with another tokenizer (another chat template, other
    label ids): the id, so every cache and resume key, tells the two apart; the model's own
    directory given as the tokenizer is the model as it is."""
    real = vllm_model_id(model_dir, {})
    assert vllm_model_id(model_dir, {"tokenizer": str(model_dir)}) == real
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, tok / name)
    same = vllm_model_id(model_dir, {"tokenizer": str(tok)})
    assert same.startswith(real + "+tokenizer-") and same == vllm_model_id(model_dir, {"tokenizer": str(tok)})
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    other = vllm_model_id(model_dir, {"tokenizer": str(tok)})
    assert other.startswith(real + "+tokenizer-") and other != same
    # A tokenizer by name (a model hub's, from its local cache): named in the id.
    assert vllm_model_id(model_dir, {"tokenizer": "org/tokenizer"}) == real + "+tokenizer-org/tokenizer"


def test_default_kv_cache_size(model_dir):
    weights = weights_bytes(model_dir, "float32")
    one_sequence = embedded_kv_bytes_per_token(model_dir) * 8192  # the model's context

    def size(available: int, max_model_len: int | None = None) -> int:
        return default_kv_cache_bytes(model_dir, dtype="float32", max_model_len=max_model_len, available=available)

    assert size(64 * GiB) == CPU_KV_CACHE_MAX  # a big machine: the cap
    assert size(4 * GiB) == ((4 * GiB - weights) // 4) >> 20 << 20  # a quarter of what is left, whole MiB
    # Little memory: still one full-length sequence as vLLM counts it (whole 128-token blocks,
    # and one block more that its pool holds back), or a clear refusal that names the fix.
    little = weights + one_sequence + (64 << 20)
    assert size(little) >= embedded_kv_bytes_per_token(model_dir) * 128 * (8192 // 128 + 1)
    assert size(little) % (1 << 20) == 0
    with pytest.raises(ModelLoadError, match="max_model_len") as err:
        size(weights + one_sequence // 2)
    assert "8192 tokens" in str(err.value)
    assert size(weights + one_sequence // 2, max_model_len=2048) >= one_sequence // 4


def test_cpu_defaults_fill_in_only_what_is_not_given(model_dir):
    d = cpu_defaults(model_dir, {}, environ={})
    assert d.args["dtype"] == "float32" and d.args["enforce_eager"] is True
    assert 0 < d.args["kv_cache_memory_bytes"] <= CPU_KV_CACHE_MAX
    assert d.env == {THREADS_BIND_ENV: threads_bind()}
    given = {"dtype": "bfloat16", "enforce_eager": False, "kv_cache_memory_bytes": 1 << 28}
    assert cpu_defaults(model_dir, given, environ={}).args == {}
    assert "kv_cache_memory_bytes" not in cpu_defaults(model_dir, {"gpu_memory_utilization": 0.01}, environ={}).args
    assert "kv_cache_memory_bytes" not in cpu_defaults(model_dir, {}, environ={"VLLM_CPU_KVCACHE_SPACE": "1"}).args
    # A binding of the user's own, a setting only vLLM's own binding reads (cores it keeps
    # back, the memory nodes to run on), or an engine over several ranks keeps vLLM's handling.
    for name in (THREADS_BIND_ENV, "VLLM_CPU_NUM_OF_RESERVED_CPU", "CPU_VISIBLE_MEMORY_NODES"):
        assert cpu_defaults(model_dir, {}, environ={name: "1"}).env == {}, name
    assert cpu_defaults(model_dir, {}, environ={"CPU_VISIBLE_MEMORY_NODES": ""}).env  # empty: unset, as vLLM reads it
    for ranks in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        assert cpu_defaults(model_dir, {ranks: 2}, environ={}).env == {}


def test_dtype_auto_is_sized_as_the_16_bit_type_vllm_loads_on_a_cpu(model_dir, monkeypatch):
    """vLLM's "auto" on a CPU loads a float32 checkpoint (as this one is) in bfloat16: its
    weights and cache are sized as such, not as float32's twice as many bytes."""
    monkeypatch.setattr(vllm_cpu, "memory", lambda: (8 * GiB, 2 * GiB))

    def size(dtype: str) -> int:
        return cpu_defaults(model_dir, {"dtype": dtype}, environ={}).args["kv_cache_memory_bytes"]

    assert size("auto") == size("bfloat16") > size("float32")


def test_the_one_sequence_check_knows_full_attention_and_stretched_contexts(model_dir, tmp_path):
    """A window switched off (Qwen2's `use_sliding_window: false`) or layer types all of full
    attention keep every token, so a cache under one sequence is refused; a window in use is
    vLLM's to size. A linear RoPE scaling stretches the context vLLM allows by its factor
    (Gemma 3's and YaRN's positions come scaled already)."""
    config = json.loads((model_dir / "config.json").read_text())

    def model(**changes) -> Path:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for f in model_dir.iterdir():
            if f.name != "config.json":
                (folder / f.name).symlink_to(f)
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    small = 64 << 20  # under one 8192-token sequence (0.35 GiB), over a window's few tokens
    for full in (
        {"sliding_window": 32768, "use_sliding_window": False},
        {"layer_types": ["full_attention"] * config["num_hidden_layers"]},
    ):
        with pytest.raises(ModelLoadError, match="less than one sequence"):
            check_kv_cache_fits(model(**full), small, "float32")
    for partial in ({"sliding_window": 4096}, {"layer_types": ["sliding_attention", "full_attention"] * 15}):
        check_kv_cache_fits(model(**partial), small, "float32")
    length = config["max_position_embeddings"]
    for rope, factor in (
        ({"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5}, 4),
        ({"type": "dynamic", "factor": 2.0}, 2),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 1),
        ({"full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}}, 8),
    ):
        assert one_sequence_bytes(model(rope_parameters=rope), "float32")[1] == length * factor, rope
    gemma3 = model(model_type="gemma3_text", rope_parameters={"rope_type": "linear", "factor": 8.0})
    assert one_sequence_bytes(gemma3, "float32")[1] == length


def test_the_context_the_cache_is_sized_for_is_vllms(model_dir, tmp_path):
    """The context a default cache must hold one sequence of is the max_model_len vLLM's own
    ModelConfig derives for the model: the smallest length its config gives under any of
    vLLM's keys, 2,048 when it gives none, stretched by a linear RoPE scaling, a LongRoPE
    model's original length; a smaller `model_max_length` of the tokenizer counts for vLLM's
    pooling models only."""
    from vllm.config import ModelConfig

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    bare = {k: v for k, v in config.items() if k != "max_position_embeddings"}
    cases = [
        ({}, {}),
        ({"n_positions": 4096}, {}),
        ({"seq_length": 3000}, {}),
        ({}, {"model_max_length": 2500}),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5}}, {"model_max_length": 3000}),
        # LongRoPE (Phi-3.5's long context): vLLM's default is the original length, not the stretched one.
        (
            {
                "max_position_embeddings": 32768,
                "original_max_position_embeddings": 2048,
                "rope_parameters": {
                    "rope_type": "longrope",
                    "short_factor": [1.0] * (config["hidden_size"] // config["num_attention_heads"] // 2),
                    "long_factor": [4.0] * (config["hidden_size"] // config["num_attention_heads"] // 2),
                    "rope_theta": 1e5,
                },
            },
            {},
        ),
    ]
    for k, (changes, tokenizer) in enumerate([*cases, (None, {})]):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        for f in model_dir.iterdir():
            if f.name not in ("config.json", "tokenizer_config.json"):
                (folder / f.name).symlink_to(f)
        (folder / "config.json").write_text(json.dumps(bare if changes is None else {**config, **changes}))
        (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **tokenizer}))
        vllms = ModelConfig(model=str(folder), dtype="float32").max_model_len
        assert one_sequence_bytes(folder, "float32")[1] == vllms, (changes, tokenizer, vllms)


def test_sizes_are_read_as_vllms_command_line_reads_them(model_dir, monkeypatch):
    given = {"max_model_len": "2K", "kv_cache_memory_bytes": "1g", "served_model_name": "1k", "dtype": "auto"}
    assert parse_sizes(given) == {
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 10**9,
        "served_model_name": "1k",  # not a size: as given
        "dtype": "auto",
    }
    assert parse_sizes({"max_model_len": "auto"}) == {"max_model_len": -1}  # vLLM's "the longest that fits"
    assert parse_sizes({"max_model_len": "1.5K"}) == {"max_model_len": "1.5K"}  # vLLM's to refuse, by name
    # "auto" sizes the default cache for the model's context, as no max_model_len does (from
    # one reading of the machine's free memory, which moves between calls)
    reading = vllm_cpu.memory()
    monkeypatch.setattr(vllm_cpu, "memory", lambda: reading)
    none = cpu_defaults(model_dir, {}, environ={}).args["kv_cache_memory_bytes"]
    assert (
        cpu_defaults(model_dir, parse_sizes({"max_model_len": "auto"}), environ={}).args["kv_cache_memory_bytes"]
        == none
    )
    assert cpu_defaults(model_dir, {"max_model_len": "auto"}, environ={}).args["kv_cache_memory_bytes"] == none


def test_threads_bind_is_every_cpu_of_this_process():
    cores = {}
    for cpu in psutil.Process().cpu_affinity():
        core = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id").read_text().strip()
        cores.setdefault(core, cpu)
    # One NUMA node here: one CPU per physical core, all of them.
    assert threads_bind() == ",".join(str(c) for c in sorted(cores.values()))


def _cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup tree under tmp_path/cg with `files` (paths below it) and a /proc/self/cgroup."""
    root = tmp_path / "cg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_a_cpu_quota_anywhere_on_the_cgroup_path_limits_the_threads(tmp_path, monkeypatch):
    """A job's cgroup below the root (cgroup v2), its parent holding a quota of 2.5 CPUs: 3;
    a container's cgroup v1 quota of 1.5 CPUs: 2; no quota: None. The bound threads are
    that many of this process's CPUs."""
    root, proc = _cgroup(
        tmp_path / "v2",
        "0::/system.slice/job.scope",
        {"system.slice/job.scope/cpu.max": "max 100000\n", "system.slice/cpu.max": "250000 100000\n"},
    )
    assert vllm_cpu.cgroup_cpus(root, proc) == 3
    root, proc = _cgroup(
        tmp_path / "v1",
        "4:cpu,cpuacct:/docker/abc",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
    )
    assert vllm_cpu.cgroup_cpus(root, proc) == 2
    root, proc = _cgroup(
        tmp_path / "none", "4:cpu:/", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    assert vllm_cpu.cgroup_cpus(root, proc) is None
    assert vllm_cpu.cgroup_cpus(root, tmp_path / "missing") is None
    every = threads_bind()
    monkeypatch.setattr(vllm_cpu, "cgroup_cpus", lambda: 1)
    assert threads_bind() == every.split(",")[0]


def test_the_memory_limit_of_a_job_cgroup_bounds_the_memory_counted(tmp_path, monkeypatch):
    """A job cgroup (v2) limited to 8 GiB that uses 3 GiB, 1 GiB of it inactive page cache:
    6 GiB left; its parent without a limit. cgroup v1's "unlimited" is no limit. memory()
    counts what is available within it; the total stays vLLM's, of which it takes a
    gpu_memory_utilization share, so a share the job cannot hold is refused."""
    gib = 1 << 30
    root, proc = _cgroup(
        tmp_path / "v2",
        "0::/slurm/job_7",
        {
            "slurm/job_7/memory.max": f"{8 * gib}\n",
            "slurm/job_7/memory.current": f"{3 * gib}\n",
            "slurm/job_7/memory.stat": f"anon {2 * gib}\ninactive_file {gib}\n",
            "slurm/memory.max": "max\n",
            "slurm/memory.current": f"{3 * gib}\n",
        },
    )
    assert vllm_cpu.cgroup_memory(root, proc) == (8 * gib, 6 * gib)
    root, proc = _cgroup(
        tmp_path / "v1",
        "4:memory:/",
        {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": f"{gib}\n"},
    )
    assert vllm_cpu.cgroup_memory(root, proc) is None
    total, available = vllm_cpu.memory()
    monkeypatch.setattr(vllm_cpu, "cgroup_memory", lambda: (gib, gib // 2))
    assert vllm_cpu.memory() == (total, gib // 2)
    share = 0.75 * gib / total  # 0.75 GiB of the node: more than the job has left
    with pytest.raises(ModelLoadError, match=f"gpu_memory_utilization={share} reserves 0.75 GiB.*0.50 GiB"):
        vllm_cpu.check_memory_share_fits(share)
    vllm_cpu.check_memory_share_fits(0.25 * gib / total)


def test_kv_cache_that_cannot_fit_is_refused_before_vllm_starts(model_dir):
    with pytest.raises(ModelLoadError, match=r"kv_cache_memory_bytes=.*does not fit.*pass a smaller"):
        VLLMEngine(model_dir, kv_cache_memory_bytes="1000G")
    with pytest.raises(ModelLoadError, match=r"gpu_memory_utilization=1.0 reserves"):
        VLLMEngine(model_dir, gpu_memory_utilization=1.0)  # more than is ever free
    # The commands say it in one line, exit status 2.
    for command in (
        ["vllm-server", "embedded", "--kv-cache-memory-bytes", "1000G"],
        ["serve", "--engine", "vllm", "--engine-arg", "kv_cache_memory_bytes=1000G"],
    ):
        cmd = [sys.executable, "-m", "labeler.cli", *command]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: kv_cache_memory_bytes=1073741824000 (1000.00 GiB)"), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_kv_cache_too_small_for_one_sequence_is_refused_before_vllm_starts(model_dir):
    """A cache that cannot hold one sequence of the longest length: vLLM refuses it only
    from inside its engine process (a traceback); here in one line, naming both fixes. The
    embedded model's 8192-token context in fp32 takes over 0.35 GiB; 2048 tokens fit in 256M."""
    small = {"kv_cache_memory_bytes": 256 << 20}
    with pytest.raises(ModelLoadError, match=r"is less than one sequence of 8192 tokens needs \(0\.3\d GiB\): pass at"):
        cpu_defaults(model_dir, small, environ={})
    assert "kv_cache_memory_bytes" not in cpu_defaults(model_dir, {**small, "max_model_len": 2048}, environ={}).args
    cmd = [sys.executable, "-m", "labeler.cli", "vllm-server", "embedded", "--kv-cache-memory-bytes", "256M"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: kv_cache_memory_bytes=268435456 (0.25 GiB) is less than"), proc.stderr


def test_a_command_on_the_vllm_engine_prints_only_its_json(tmp_path):
    """vLLM logs to stdout unless told otherwise (its engine processes too): a one-item
    command's --json output stays one JSON document, vLLM's lines on stderr."""
    from tests.fixtures.model import TEST_TASKS

    cmd = [
        sys.executable,
        "-m",
        "labeler.cli",
        "score",
        "--engine",
        "vllm",
        "--engine-arg",
        "kv_cache_memory_bytes=512M",
    ]
    cmd += ["--tasks-dir", str(TEST_TASKS), "--task", "tiny", "--context", "2+2?", "--response", "4", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_STREAM"}  # vLLM's own default
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["task"] == "tiny" and abs(sum(out["distribution"]) - 1) < 1e-4
    assert "INFO" in proc.stderr  # vLLM did log: on stderr


def test_the_tokenizer_is_read_before_vllm_starts(model_dir, tmp_path):
    """The in-process engine reads the tokenizer vLLM will use (its `tokenizer` argument, else
    the model's) before anything starts: a model without one is refused by name, with none
    of vLLM's processes to leave behind (here ahead of the KV-cache check that follows)."""
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).symlink_to(f)
    with pytest.raises(ModelLoadError, match=f"cannot read the tokenizer of {bare}"):
        VLLMEngine(bare, kv_cache_memory_bytes="1000G")
    with pytest.raises(ModelLoadError, match="kv_cache_memory_bytes=.*does not fit"):
        VLLMEngine(bare, tokenizer=str(model_dir), kv_cache_memory_bytes="1000G")


def test_given_args_reads_vllm_flags():
    argv = ["--port", "8001", "--max-model-len=2048", "--enforce-eager", "--no-enable-prefix-caching"]
    argv += ["-tp", "2", "--kv_cache_memory_bytes", "1G"]
    assert given_args(argv) == {
        "port": "8001",
        "max_model_len": "2048",
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "tensor_parallel_size": "2",
        "kv_cache_memory_bytes": "1G",
    }
    assert given_args(["--seed", "-1", "--max-model-len", "512"]) == {"seed": "-1", "max_model_len": "512"}
    assert given_args(["-pp", "2", "-dp", "2"]) == {"pipeline_parallel_size": "2", "data_parallel_size": "2"}


def test_a_memory_share_that_cannot_fit_is_refused_by_vllm_server(model_dir):
    """`--gpu-memory-utilization 1.0` on a CPU reserves the whole memory: refused before the
    server starts, as the in-process engine refuses it."""
    with pytest.raises(ModelLoadError, match=r"gpu_memory_utilization=1.0 reserves"):
        server_command("embedded", ["--gpu-memory-utilization", "1.0"])


def test_vllm_server_command_adds_the_cpu_defaults_the_user_did_not_give(model_dir):
    cmd, env = server_command("embedded", ["--port", "8001", "--dtype", "bfloat16"])
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    assert cmd.count("--dtype") == 1 and cmd[-4:] == ["--port", "8001", "--dtype", "bfloat16"]
    assert "--enforce-eager" in cmd
    assert int(cmd[cmd.index("--kv-cache-memory-bytes") + 1]) <= CPU_KV_CACHE_MAX
    assert env == {THREADS_BIND_ENV: threads_bind()}
    cmd, _ = server_command("embedded", ["--kv-cache-memory-bytes", "512M", "--no-enforce-eager"])
    assert cmd.count("--kv-cache-memory-bytes") == 1 and "--enforce-eager" not in cmd


def test_vllm_server_command_reads_the_flags_of_a_config_file_as_given(model_dir, tmp_path):
    """vLLM reads a `--config` YAML file's flags under the command line's: the defaults a
    CPU gets must not be added over what the file sets (they would win over it), and what
    the file sets counts for the rest (the cache sized for its max_model_len)."""
    config = tmp_path / "server.yaml"
    config.write_text("dtype: bfloat16\nkv-cache-memory-bytes: 1G\nenforce-eager: false\nmax_model_len: 1024\n")
    cmd, _ = server_command("embedded", ["--config", str(config), "--port", "8001"])
    for flag in ("--dtype", "--kv-cache-memory-bytes", "--enforce-eager", "--max-model-len"):
        assert flag not in cmd, (flag, cmd)
    assert cmd[-4:] == ["--config", str(config), "--port", "8001"]
    # The command line still wins over the file, as in vLLM.
    cmd, _ = server_command("embedded", ["--config", str(config), "--dtype", "float32"])
    assert cmd.count("--dtype") == 1 and cmd[-2:] == ["--dtype", "float32"]
    small = tmp_path / "small.yaml"
    small.write_text("kv-cache-memory-bytes: 1M\n")
    with pytest.raises(ModelLoadError, match="less than one sequence"):
        server_command("embedded", ["--config", str(small)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("- just\n- a list\n")
    with pytest.raises(InvalidInput, match="not a mapping") as refused:
        server_command("embedded", ["--config", str(broken)])
    assert refused.value.field == "config"


def _environ(proc: psutil.Process) -> dict[str, str]:
    """A child's environment; empty for one that exited meanwhile (another test's server)."""
    try:
        return proc.environ()
    except psutil.NoSuchProcess:  # a zombie too
        return {}


def test_engines_run_with_the_cpu_defaults(vllm_engine, vllm_servers):
    """The in-process engine and `labeler vllm-server` as started: fp32, eager, and vLLM's
    processes (not this one) bound to every CPU of the process."""
    import torch

    config = vllm_engine._engine.vllm_config
    assert config.model_config.dtype == torch.float32 and config.model_config.enforce_eager
    assert config.cache_config.kv_cache_memory_bytes == 512 << 20  # both given as text ("512M", "8K")
    assert config.model_config.max_model_len == 8192
    assert THREADS_BIND_ENV not in os.environ  # set only while vLLM started its processes
    bound = [
        p for p in psutil.Process().children(recursive=True) if _environ(p).get(THREADS_BIND_ENV) == threads_bind()
    ]
    assert bound, "no vLLM process of the in-process engine got the thread binding"
    server = vllm_servers[1]
    server.wait_ready()
    assert psutil.Process(server.proc.pid).environ()[THREADS_BIND_ENV] == threads_bind()
    log = server.log_path.read_text()
    assert "dtype=torch.float32" in log and "enforce_eager=True" in log
    assert f"VLLM_CPU_OMP_THREADS_BIND='{threads_bind()}'" in log  # vLLM's own account of the binding


async def test_a_dead_or_closed_vllm_engine_is_unavailable():
    """vLLM's AsyncLLM raises EngineDeadError once its engine-core process is gone: every
    request fails alike, so it is EngineUnavailable (a 503 for the whole batch, not a split
    down to single items), for the library and the service alike, and the engine's `failure`
    says so (the service's health checks read it); so is a closed engine."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from labeler.errors import EngineUnavailable

    class Dead:  # stands in for AsyncLLM after its engine core died (vLLM's own attribute)
        errored = False

        async def generate(self, *args, **kwargs):
            raise EngineDeadError()
            yield

    engine = VLLMEngine.__new__(VLLMEngine)
    engine._engine, engine._prefix, engine._ids = Dead(), "t-", iter(range(10))
    engine.inflight = engine.peak_inflight = 0
    assert engine.failure is None
    with pytest.raises(EngineUnavailable, match="died"):
        await engine._run((1, 2, 3), None)
    assert engine.inflight == 0
    engine._engine.errored = True  # AsyncLLM.errored once its engine core is gone
    assert engine.failure == "the vLLM engine process died (its log says why)"
    engine._engine = None  # after aclose()
    with pytest.raises(EngineUnavailable, match="closed"):
        await engine._run((1, 2, 3), None)
