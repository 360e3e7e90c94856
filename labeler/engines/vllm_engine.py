"""The in-process vLLM engine: vLLM's AsyncLLM (`AsyncLLMEngine` is the same class).

Label log-probs are read with `SamplingParams(max_tokens=1, logprob_token_ids=[...])`,
which returns the full-vocabulary log-probs of exactly those tokens and, unlike
`prompt_logprobs`, goes through the prefix cache. Multi-token labels are chained: the
reads of a longer label prefix are sent after the reads they extend have finished, so
they find the prompt's KV blocks cached and cost about one token each.

All reads of a call go to the engine at once (continuous batching); nothing is
serialized behind a lock. Prompts go in as vLLM's already-rendered token input, so
vLLM takes them without a hop through its tokenizer thread. `import vllm` happens only
when this engine is created.

On a CPU the engine gets the arguments that make vLLM start and run well there
(`labeler.engines.vllm_cpu`, shared with `labeler vllm-server`).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EngineError, EngineUnavailable, ModelLoadError
from ..fingerprint import check_unchanged, tokenizer_fingerprint
from ..models import load_tokenizer
from .base import (
    PLAIN_SAMPLING,
    EngineStats,
    GenerateRequest,
    Generation,
    Logprobs,
    ScoreRequest,
    chained_reads,
    check_generate_requests,
    check_score_requests,
    finish_generation,
    gather_or_cancel,
)
from .transformers_engine import _as_list, default_model_id
from .vllm_cpu import VLLM_MISSING, cpu_defaults, on_cpu, parse_sizes, scoped_environ


def engine_tokenizer(model_dir: str | Path, engine_args: dict[str, Any]) -> Any:
    """The tokenizer vLLM uses for `model_dir` under `engine_args` (its `tokenizer=`,
    `tokenizer_revision=` or `revision=`, `trust_remote_code=`), read without vLLM."""
    return load_tokenizer(
        engine_args.get("tokenizer") or model_dir,
        trust_remote_code=bool(engine_args.get("trust_remote_code", False)),
        revision=engine_args.get("tokenizer_revision") or engine_args.get("revision"),  # as vLLM falls back
    )


class VLLMEngine:
    """Hosts a local model directory with vLLM's AsyncLLM.

    `engine_args` are `vllm.AsyncEngineArgs` fields. Ours on top of vLLM's defaults:
    prefix caching on, seed 0, and on a CPU the `cpu_defaults`.
    """

    def __init__(self, model_dir: str | Path, *, model_id: str | None = None, **engine_args: Any) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelLoadError(VLLM_MISSING) from exc
        model_dir = Path(model_dir)
        engine_args = {"enable_prefix_caching": True, "seed": 0, **parse_sizes(engine_args)}
        # Before the tokenizer and the weights load, checked after (as the transformers engine).
        before = None if model_id else default_model_id(model_dir)
        # Read before vLLM starts: a failure then leaves no engine processes behind.
        self.tokenizer = engine_tokenizer(model_dir, engine_args)
        self.model_id = model_id or vllm_model_id(model_dir, engine_args, before)
        env: dict[str, str] = {}
        if on_cpu():
            defaults = cpu_defaults(model_dir, engine_args)
            engine_args = {**defaults.args, **engine_args}
            env = defaults.env
        self.engine_args = engine_args  # as given to vLLM, CPU defaults included
        self.env = env
        try:
            args = AsyncEngineArgs(model=str(model_dir), **engine_args)
        except TypeError as exc:
            raise ModelLoadError(f"not a vLLM engine argument: {exc}") from exc
        try:
            with scoped_environ(env):
                self._engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds at start-up
            raise ModelLoadError(f"vLLM could not start on {model_dir}: {exc}") from exc
        try:  # what fails now must not leave vLLM's engine processes behind
            if before is not None:
                check_unchanged(model_dir, before)
            config = self._engine.model_config
            self.max_model_len = int(config.max_model_len)
            # A multimodal checkpoint's config keeps the language model's fields in its text config.
            eos = getattr(config.hf_config, "eos_token_id", None)
            if eos is None:
                eos = getattr(config.hf_text_config, "eos_token_id", None)
        except BaseException:
            self._engine.shutdown()
            raise
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._prefix = f"labeler-{uuid.uuid4().hex[:8]}-"
        self.inflight = 0
        self.peak_inflight = 0  # most requests in the engine at once (continuous batching)
        self._eos = {self.tokenizer.eos_token_id} | set(_as_list(eos))

    # -- protocol ------------------------------------------------------------------------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[Logprobs]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        check_score_requests(requests, self.max_model_len)

        async def read(_: int, ids: tuple[int, ...], tokens: tuple[int, ...]) -> dict[int, float]:
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=list(tokens),
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            final = await self._run(ids, params)
            if final is None or not final.outputs or not final.outputs[0].logprobs:
                raise EngineError("vLLM returned no log-probs")
            self._count_computed(len(ids), final)
            lps = final.outputs[0].logprobs[0]
            try:
                return {t: float(lps[t].logprob) for t in tokens}
            except KeyError as exc:
                raise EngineError(f"vLLM did not return the log-prob of token {exc.args[0]}") from exc

        return await chained_reads(requests, read, self.stats)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        check_generate_requests(requests, self.max_model_len)
        self.stats.generate_calls += 1

        async def one(req: GenerateRequest) -> list[Generation]:
            params = SamplingParams(
                **PLAIN_SAMPLING,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                n=req.n,
                seed=req.seed if req.temperature > 0 else None,
                # Text is decoded by finish_generation, like every engine; one output at the end.
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            final = await self._run(req.prompt_ids, params)
            if final is None:
                raise EngineError("vLLM returned no generation")
            self._count_computed(len(req.prompt_ids), final)
            # vLLM keeps the stop token in token_ids; finish_generation cuts it like the other engines.
            outputs = sorted(final.outputs, key=lambda o: o.index)
            return [finish_generation(o.token_ids, self._eos, self.tokenizer, self.stats) for o in outputs]

        return await gather_or_cancel([one(r) for r in requests])

    async def aclose(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            # Dropped now, so AsyncLLM.__del__ does not shut down again at interpreter exit.
            self._engine = None  # type: ignore[assignment]

    @property
    def failure(self) -> str | None:
        """Set once vLLM's engine-core process has died: every request fails from then on."""
        if self._engine is None or not self._engine.errored:
            return None
        return "the vLLM engine process died (its log says why)"

    def _count_computed(self, prompt_tokens: int, final: Any) -> None:
        """Prompt tokens the engine ran, those its prefix cache held aside."""
        self.stats.computed_tokens += prompt_tokens - (getattr(final, "num_cached_tokens", None) or 0)

    async def _run(self, prompt_ids: Sequence[int], params: Any) -> Any:
        """One vLLM request to completion; returns its final output. A dead or closed engine
        is `EngineUnavailable` (every request would fail), for the service and the batch
        commands alike."""
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._engine is None:
            raise EngineUnavailable("the vLLM engine is closed")
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            final = None
            request_id = self._prefix + str(next(self._ids))
            async for output in self._engine.generate(tokens_input(list(prompt_ids)), params, request_id):
                final = output
            return final
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine process died: {exc}") from exc
        finally:
            self.inflight -= 1


def vllm_model_id(model_dir: Path, engine_args: dict[str, Any], base: str | None = None) -> str:
    """The model id of `model_dir` (`base`: its `default_model_id`, when known) as these engine
    arguments load it. Another tokenizer (`tokenizer=`) adds its tokenizer files' fingerprint,
    or its name: its chat template and label token ids change the prompts read. Random weights
    (`load_format=dummy`, for throughput runs) get an id of their own, unique to the process:
    their labels must never be cached as the model's, nor shared between replicas."""
    base = base or default_model_id(model_dir)
    tokenizer = engine_args.get("tokenizer")
    if tokenizer and Path(tokenizer).resolve() != Path(model_dir).resolve():
        # A directory by its content; a name (a model hub's, found in its local cache) by itself.
        base += f"+tokenizer-{tokenizer_fingerprint(tokenizer)[:16] if Path(tokenizer).is_dir() else tokenizer}"
    return f"{base}+dummy-{uuid.uuid4().hex[:8]}" if engine_args.get("load_format") == "dummy" else base
