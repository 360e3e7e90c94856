"""The engines' limits and settings: generation within `max_batch_tokens`, label reads of
models whose RoPE frequencies depend on a forward's longest position (longrope, dynamic
NTK), engine options refused by name, a failing forward told as an engine failure, and the
vLLM CPU cache size that `VLLM_CPU_KVCACHE_SPACE` sets."""

from __future__ import annotations

import random

import pytest
import torch

from labeler.engines import vllm_cpu
from labeler.engines.base import GenerateRequest, ScoreRequest
from labeler.engines.transformers_engine import TransformersEngine
from labeler.errors import EngineError, InvalidInput, ModelLoadError
from labeler.scoring import LabelQuery

pytestmark = pytest.mark.model
TOL = 1e-4


# -- generation within max_batch_tokens ------------------------------------------------------
QUESTIONS = [
    "Why?",
    "Write one sentence about cats.",
    "What is the capital of France, and why is it famous?",
    "Name a fruit.",
]


def test_generation_runs_in_batches_within_max_batch_tokens(engine, monkeypatch):
    """Greedy rationales run in batches of at most `max_batch_tokens` rows × (longest prompt
    + new tokens), one request over it alone; each rationale is the one the request gets in a
    single batch of everything and alone, and a sampled request's draws stay those of its seed."""
    tok = engine.tokenizer
    prompts = [tuple(tok.encode(q)) for q in QUESTIONS]
    long = tuple(tok.encode(" ".join(QUESTIONS * 4)))
    new = 6
    budget = 50
    assert len(long) + new > budget and all(2 * (len(p) + new) <= budget for p in prompts)
    greedy = [GenerateRequest(p, new) for p in prompts[:2]] + [GenerateRequest(long, new)]
    greedy += [GenerateRequest(p, new) for p in prompts[2:]]
    # Sampling is slow on a CPU: a short draw.
    requests = [*greedy[:2], GenerateRequest(prompts[1], 3, 0.7, 2, 5), *greedy[2:]]

    shapes: list[tuple[int, int, int, bool]] = []  # rows, width, new tokens, sampled
    generate = engine.model.generate

    def recorded(**kwargs):
        ids = kwargs["input_ids"]
        shapes.append((ids.shape[0], ids.shape[1], kwargs["max_new_tokens"], kwargs["do_sample"]))
        return generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", recorded)
    small = TransformersEngine.from_objects(engine.model, tok, model_id="small", max_batch_tokens=budget)
    got = small.generate_sync(requests)
    batches = [(rows, width, n) for rows, width, n, sampled in shapes if not sampled]
    assert len(batches) > 1 and sum(rows for rows, _, _ in batches) == len(greedy)
    for rows, width, n in batches:
        assert rows == 1 or rows * (width + n) <= budget, batches
    assert (1, len(long), new) in batches  # the request over the limit, alone

    shapes.clear()
    large = TransformersEngine.from_objects(engine.model, tok, model_id="large", max_batch_tokens=100_000)
    assert large.generate_sync(requests) == got
    assert [rows for rows, _, _, sampled in shapes if not sampled] == [len(greedy)]
    assert [large.generate_sync([r])[0] if r.temperature <= 0 else got[i] for i, r in enumerate(requests)] == got
    assert len(got[2]) == 2 and len({g.text for g in got[2]}) > 1


# -- RoPE frequencies chosen from a forward's longest position --------------------------------
LIMIT = 64  # the tiny models' pretraining length


def rope_model(kind: str, tokenizer) -> TransformersEngine:
    """Random weights (large enough that attention is not uniform) of Phi-3's architecture
    with longrope whose long factors differ from the short ones, or of Llama's with dynamic
    NTK scaling past `LIMIT`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    torch.manual_seed(0)
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "initializer_range": 0.3,
    }
    if kind == "longrope":
        rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [16.0] * 8}
        config = Phi3Config(
            **shape,
            max_position_embeddings=1024,
            original_max_position_embeddings=LIMIT,
            rope_scaling=rope,
            sliding_window=None,
        )
    else:
        config = LlamaConfig(
            **shape, max_position_embeddings=LIMIT, rope_scaling={"rope_type": "dynamic", "factor": 4.0}
        )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return TransformersEngine.from_objects(model, tokenizer, model_id=f"tiny-{kind}")


def plain_logprobs(model, seq, tokens) -> dict[int, float]:
    """One forward of `seq` alone: no cache, no padding, positions 0 .. len − 1."""
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([list(seq)])).logits[0, -1].float(), -1)
    return {t: lp[t].item() for t in tokens}


def assert_reads_as_alone(engine: TransformersEngine, requests: list[ScoreRequest]) -> None:
    want = [
        {q.prefix: plain_logprobs(engine.model, r.prompt_ids + q.prefix, q.next_tokens) for q in r.queries}
        for r in requests
    ]
    got = engine.score_sync(requests)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for prefix in w:
            assert g[prefix] == pytest.approx(w[prefix], abs=TOL)


def test_rope_limits_are_read_from_the_config(engine):
    from labeler.engines.transformers_engine import _rope_limit

    assert _rope_limit(engine.model.config) is None  # SmolLM2: plain RoPE
    for kind in ("longrope", "dynamic"):
        assert _rope_limit(rope_model(kind, engine.tokenizer).model.config) == LIMIT


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_padding_takes_no_position_past_its_rows_last_token(engine, kind):
    """Sequences all within the pretraining length, whose tree pads a row that sits deep in
    its cache to the width of a long one at the same level (the first prompt's two leaves
    after 50 tokens, beside the second prompt's 50-token leaf after 8): every read is a
    plain forward's, whatever frequencies a padding position past 63 would have switched to."""
    eng = rope_model(kind, engine.tokenizer)
    rnd = random.Random(0)

    def text(n: int) -> tuple[int, ...]:
        return tuple(rnd.randrange(100, 40000) for _ in range(n))

    deep, shallow = text(50), text(8)
    q = (LabelQuery((), (33, 34)),)
    prompts = [deep + text(3), deep + text(4), shallow + text(50), shallow + text(52)]
    assert max(len(p) for p in prompts) + 1 <= LIMIT
    assert_reads_as_alone(eng, [ScoreRequest(p, q) for p in prompts])


@pytest.mark.parametrize("max_batch_tokens", [4096, 60])
def test_longrope_sequences_past_the_pretraining_length_read_as_alone(engine, max_batch_tokens):
    """Longrope switches to its long factors once a forward reaches past the pretraining
    length: short prompts batched with a long one, long prompts that share a prefix within
    the length, and a prompt that ends at the length while its label prefix "1" goes past
    it, each read as a plain forward of it reads (in one call or in chunks)."""
    eng = rope_model("longrope", engine.tokenizer)
    eng.max_batch_tokens = max_batch_tokens
    rnd = random.Random(1)

    def text(n: int) -> tuple[int, ...]:
        return tuple(rnd.randrange(100, 40000) for _ in range(n))

    queries = (LabelQuery((), (33, 34)), LabelQuery((33,), (32, 33)))
    short, shared = text(40), text(60)
    prompts = [short + text(5), short + text(6), text(100), shared + text(20), shared + text(21), text(LIMIT)]
    requests = [ScoreRequest(p, queries) for p in prompts]
    assert_reads_as_alone(eng, requests)
    alone = eng.score_sync(requests[:2])
    mixed = eng.score_sync(requests)
    for a, m in zip(alone, mixed[:2], strict=True):
        assert a[()] == pytest.approx(m[()], abs=TOL)


def test_longrope_generation_past_the_pretraining_length_runs_alone(engine):
    """A greedy rationale that runs past the pretraining length switches to the long factors
    at its own length: batched with shorter prompts it would switch theirs too. Each
    rationale is the one its request gets alone."""
    eng = rope_model("longrope", engine.tokenizer)
    rnd = random.Random(2)
    prompts = [tuple(rnd.randrange(100, 40000) for _ in range(n)) for n in (6, 9, 12, 58, 60)]
    requests = [GenerateRequest(p, 10) for p in prompts]
    got = eng.generate_sync(requests)
    assert got == [eng.generate_sync([r])[0] for r in requests]


# -- options refused by name ----------------------------------------------------------------------
def test_transformers_engine_options_are_checked_before_the_model_loads(engine):
    """Sizes read as vLLM's command line reads them; any other value is refused by name
    before the model loads (the directory here does not exist), not by every call after."""
    for option, value in [
        ("max_batch_tokens", "8KB"),
        ("max_batch_tokens", 0),
        ("max_batch_tokens", 1.5),
        ("max_batch_tokens", True),
        ("min_shared_tokens", 0),
        ("pack_tokens", -1),
        ("pack_tokens", "lots"),
        ("threads", 0),
        ("threads", "two"),
        ("dtype", "float8_e4m3fn"),  # a storage format, not a type a model computes in
        ("dtype", "int8"),
    ]:
        with pytest.raises(InvalidInput, match=option) as refused:
            TransformersEngine("/nonexistent/model", **{option: value})
        assert refused.value.field == option
    sized = TransformersEngine.from_objects(
        engine.model, engine.tokenizer, model_id="sized", max_batch_tokens="8K", min_shared_tokens="16", pack_tokens=0
    )
    assert (sized.max_batch_tokens, sized.min_shared_tokens, sized.pack_tokens) == (8192, 16, 0)
    with pytest.raises(InvalidInput, match="max_batch_tokens"):
        TransformersEngine.from_objects(engine.model, engine.tokenizer, model_id="x", max_batch_tokens="8 K")


def test_a_sampled_request_counts_its_prompt_once_a_draw(engine):
    """Its n draws are n rows of one `generate`, each running the prompt: n times its tokens computed."""
    prompt = tuple(engine.tokenizer("Name a fruit.", add_special_tokens=False)["input_ids"])
    before = engine.stats.computed_tokens
    (drawn,) = engine.generate_sync([GenerateRequest(prompt, 2, 0.7, 3, 1)])
    assert len(drawn) == 3 and engine.stats.computed_tokens - before == 3 * len(prompt)


def test_generations_that_cannot_be_honoured_are_refused_by_every_engine(engine):
    """No continuation asked for (n 0), or a temperature that is neither greedy nor sampled
    (NaN): refused by name, not answered with no generations."""
    for request, field in (
        (GenerateRequest((1, 2, 3), 4, 0.7, 0), "n"),
        (GenerateRequest((1, 2, 3), 4, float("nan"), 2), "temperature"),
        (GenerateRequest((1, 2, 3), 4, float("inf"), 1), "temperature"),
    ):
        with pytest.raises(InvalidInput) as refused:
            engine.generate_sync([request])
        assert refused.value.field == field, request


def test_sizes_are_read_as_vllm_reads_them():
    """`read_size` follows vLLM's own reader, which the engines that never import vLLM cannot call."""
    from vllm.utils import argparse_utils  # make test installs vLLM's CPU build

    from labeler.engines.base import read_size

    def outcome(read, text: str) -> int | str:
        try:
            return read(text)
        except Exception:  # noqa: BLE001 - vLLM refuses "1.5K" with argparse's ArgumentTypeError
            return "refused"

    for text in ["8K", "8k", "1G", "1g", "25.6k", "1.5K", "512M", "2T", "2t", " 4096 ", "-1", "auto", "8KB", "1e3", ""]:
        assert outcome(read_size, text) == outcome(argparse_utils.human_readable_int, text), text


# -- a failing forward is an engine failure ------------------------------------------------------
def test_a_forward_that_fails_on_a_shared_prefix_is_an_engine_error(engine, monkeypatch):
    """Chunks that share a prefix compute its cache first: a forward that runs out of memory
    there is an EngineError, as in the tree's forwards (the service then splits the batch)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(engine.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    eng = TransformersEngine.from_objects(model, engine.tokenizer, model_id="failing", max_batch_tokens=40)
    q = (LabelQuery((), (33, 34)),)
    stem = tuple(range(100, 130))
    requests = [ScoreRequest(stem + (200 + i, 300 + i), q) for i in range(4)]
    forwards: list[int] = []

    def out_of_memory(**kwargs):
        forwards.append(kwargs["input_ids"].shape[1])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "forward", out_of_memory)
    with pytest.raises(EngineError, match="forward failed: CUDA out of memory"):
        eng.score_sync(requests)
    assert forwards == [len(stem)]  # the shared prefix's forward, the first


# -- the vLLM CPU cache size from VLLM_CPU_KVCACHE_SPACE -----------------------------------------
def test_vllm_cpu_kvcache_space_is_the_size_checked(model_dir, monkeypatch):
    """vLLM's CPU backend takes the cache size from `VLLM_CPU_KVCACHE_SPACE` (GiB) over any
    argument: that size is checked against memory, and an argument naming another is refused."""
    monkeypatch.setattr(vllm_cpu, "memory", lambda: (16 << 30, 15 << 30))  # one machine's reading
    bind = {vllm_cpu.THREADS_BIND_ENV: "0"}

    def defaults(space: str, **given):
        return vllm_cpu.cpu_defaults(model_dir, given, environ={**bind, "VLLM_CPU_KVCACHE_SPACE": space})

    with pytest.raises(ModelLoadError, match=r"^VLLM_CPU_KVCACHE_SPACE=1000 \(1000.00 GiB\) plus .* does not fit"):
        defaults("1000")
    with pytest.raises(ModelLoadError, match=r"^VLLM_CPU_KVCACHE_SPACE=0 \(0.00 GiB\) is less than one sequence"):
        defaults("0")
    with pytest.raises(ModelLoadError, match="kv_cache_memory_bytes=2147483648 and VLLM_CPU_KVCACHE_SPACE=1"):
        defaults("1", kv_cache_memory_bytes=2 << 30)
    with pytest.raises(ModelLoadError, match="not a whole number of GiB"):
        defaults("1.5")
    assert "kv_cache_memory_bytes" not in defaults("1").args
    assert "kv_cache_memory_bytes" not in defaults("1", kv_cache_memory_bytes=1 << 30).args
    assert "kv_cache_memory_bytes" not in defaults("1", gpu_memory_utilization=0.99).args  # vLLM ignores the share
    assert defaults("").args["kv_cache_memory_bytes"] > 0  # set but empty: vLLM ignores it, the default applies
