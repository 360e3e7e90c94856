"""The transformers engine: a local PyTorch model (the CPU default).

Scoring runs every sequence that must be read (each prompt, and each prompt + label
prefix) through one *prefix tree* forward: the sequences of a batch are arranged in a
compressed trie, and the trie is run level by level, each node's tokens once, on top of
its parent's KV cache. So the shared preamble of a batch is computed once, the shared
context of the two orders of a pair once, and a label prefix such as "1" of "10" costs
one token on top of the prompt's cache. Nodes of one level run as one padded batch;
padding sits inside the sequence, masked out, with explicit position ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EngineError, InvalidInput, ModelLoadError
from ..scoring import TokenIds
from .base import (
    EngineStats,
    GenerateRequest,
    Generation,
    Logprobs,
    ScoreRequest,
    check_generate_requests,
    check_score_requests,
    finish_generation,
)


@dataclass
class _Node:
    edge: TokenIds
    children: list[_Node] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # indices of sequences ending here
    row: int = -1  # row of this node in its level's batch


def build_prefix_tree(seqs: Sequence[TokenIds]) -> _Node:
    """Compressed trie of `seqs`. The root's edge may be empty (no common prefix)."""

    def build(idx: list[int], offset: int) -> _Node:
        first = seqs[idx[0]]
        end = min(len(seqs[i]) for i in idx)
        n = offset
        while n < end and all(seqs[i][n] == first[n] for i in idx):
            n += 1
        node = _Node(edge=tuple(first[offset:n]))
        groups: dict[int, list[int]] = {}
        for i in idx:
            if len(seqs[i]) == n:
                node.ends.append(i)
            else:
                groups.setdefault(seqs[i][n], []).append(i)
        node.children = [build(g, n) for g in groups.values()]
        return node

    if any(len(s) == 0 for s in seqs):
        raise InvalidInput("cannot score an empty sequence")
    return build(list(range(len(seqs))), 0)


class TransformersEngine:
    """Hosts a causal LM from a local HF directory with PyTorch."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_id: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_tokens: int = 4096,
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if threads:
            torch.set_num_threads(threads)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
            ).to(device)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a model from {model_dir}: {exc}") from exc
        self._setup(model, tokenizer, model_id or default_model_id(model_dir), max_batch_tokens)

    @classmethod
    def from_objects(
        cls, model: Any, tokenizer: Any, *, model_id: str, max_batch_tokens: int = 4096
    ) -> TransformersEngine:
        """An engine around an already-built model (e.g. `from_config` with random weights
        for a throughput benchmark)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, max_batch_tokens)
        return engine

    def _setup(self, model: Any, tokenizer: Any, model_id: str, max_batch_tokens: int) -> None:
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self._torch = torch
        self.device = next(model.parameters()).device
        self.model_id = model_id
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch_tokens = max_batch_tokens
        self.stats = EngineStats()
        # One model, one forward at a time; torch uses every core for each forward.
        self._lock = threading.Lock()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- protocol ------------------------------------------------------------------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[Logprobs]:
        return await asyncio.to_thread(self.score_sync, requests)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        return await asyncio.to_thread(self.generate_sync, requests)

    async def aclose(self) -> None:
        self.model = None  # type: ignore[assignment]

    # -- scoring -------------------------------------------------------------------
    def score_sync(self, requests: Sequence[ScoreRequest]) -> list[Logprobs]:
        """Blocking `score`: every request's queries, via prefix-tree forwards."""
        check_score_requests(requests, self.max_model_len)
        reads: list[tuple[int, TokenIds, TokenIds]] = []  # (request, prefix, next tokens)
        seqs: list[TokenIds] = []
        for r, req in enumerate(requests):
            for q in req.queries:
                reads.append((r, q.prefix, q.next_tokens))
                seqs.append(tuple(req.prompt_ids) + tuple(q.prefix))
        out: list[Logprobs] = [{} for _ in requests]
        with self._lock:
            self.stats.score_calls += 1
            self.stats.prompts_scored += len(requests)
            self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
            for chunk in self._chunks(seqs):
                wanted = [reads[i][2] for i in chunk]
                values = self._tree_logprobs([seqs[i] for i in chunk], wanted)
                for i, vals in zip(chunk, values, strict=True):
                    r, prefix, toks = reads[i]
                    out[r][prefix] = dict(zip(toks, vals, strict=True))
        return out

    def _chunks(self, seqs: Sequence[TokenIds]) -> list[list[int]]:
        """Consecutive runs of sequences of at most `max_batch_tokens` (counted without
        sharing, so a chunk never needs more memory than that)."""
        chunks: list[list[int]] = [[]]
        used = 0
        for i, s in enumerate(seqs):
            if chunks[-1] and used + len(s) > self.max_batch_tokens:
                chunks.append([])
                used = 0
            chunks[-1].append(i)
            used += len(s)
        return [c for c in chunks if c]

    def _tree_logprobs(self, seqs: list[TokenIds], wanted: list[TokenIds]) -> list[list[float]]:
        torch = self._torch
        root = build_prefix_tree(seqs)
        level = [root] if root.edge else list(root.children)
        if not root.edge and root.ends:  # pragma: no cover - empty sequences are refused above
            raise InvalidInput("cannot score an empty sequence")
        results: list[list[float] | None] = [None] * len(seqs)
        past = None  # (list of (k, v) per layer, attention mask [rows, past_len], real lengths [rows])
        parents: list[int] = [-1] * len(level)
        try:
            with torch.inference_mode():
                while level:
                    width = max(len(n.edge) for n in level)
                    ids = torch.full((len(level), width), self.tokenizer.pad_token_id, dtype=torch.long)
                    edge_mask = torch.zeros((len(level), width), dtype=torch.long)
                    for row, node in enumerate(level):
                        node.row = row
                        ids[row, : len(node.edge)] = torch.tensor(node.edge)
                        edge_mask[row, : len(node.edge)] = 1
                    if past is None:
                        cache, mask, start = None, edge_mask, torch.zeros(len(level), dtype=torch.long)
                    else:
                        kv, pmask, plen = past
                        sel = torch.tensor(parents)
                        cache = self._cache([(k[sel], v[sel]) for k, v in kv])
                        mask = torch.cat([pmask[sel], edge_mask], dim=1)
                        start = plen[sel]
                    positions = start[:, None] + torch.arange(width)[None, :]
                    outputs = self.model(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        position_ids=positions.to(self.device),
                        past_key_values=cache if cache is not None else self._cache(None),
                        use_cache=True,
                    )
                    self.stats.computed_tokens += int(edge_mask.sum())
                    self.stats.batch_sizes.append(len(level))
                    logits = outputs.logits
                    for node in level:
                        if node.ends:
                            lp = torch.log_softmax(logits[node.row, len(node.edge) - 1].float(), dim=-1)
                            for i in node.ends:
                                results[i] = lp[list(wanted[i])].tolist()
                    nxt = [c for n in level for c in n.children]
                    if not nxt:
                        break
                    kv_new = [(k, v) for k, v, *_ in outputs.past_key_values]
                    past = (kv_new, mask, start + edge_mask.sum(dim=1))
                    parents = [n.row for n in level for _ in n.children]
                    level = nxt
        except RuntimeError as exc:
            raise EngineError(f"forward failed: {exc}") from exc
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _cache(self, kv: list[tuple[Any, Any]] | None) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=kv) if kv is not None else DynamicCache()

    # -- generation ---------------------------------------------------------------------
    def generate_sync(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        """Blocking `generate`. Greedy requests run as one left-padded batch; sampled
        ones one by one, each seeded by its own `seed`, so a result does not depend on
        what else was in the batch."""
        torch = self._torch
        check_generate_requests(requests, self.max_model_len)
        out: list[list[Generation]] = [[] for _ in requests]
        greedy = [i for i, r in enumerate(requests) if r.temperature <= 0]
        sampled = [i for i, r in enumerate(requests) if r.temperature > 0]
        with self._lock:
            self.stats.generate_calls += 1
            try:
                # Same max_tokens batch together (the usual case: one labeling call).
                by_len: dict[int, list[int]] = {}
                for i in greedy:
                    by_len.setdefault(requests[i].max_tokens, []).append(i)
                for max_tokens, idx in by_len.items():
                    gens = self._generate([requests[i].prompt_ids for i in idx], max_tokens, None, 1)
                    for i, g in zip(idx, gens, strict=True):
                        out[i] = g
                for i in sampled:
                    r = requests[i]
                    torch.manual_seed(r.seed)
                    out[i] = self._generate([r.prompt_ids], r.max_tokens, r.temperature, r.n)[0]
            except RuntimeError as exc:
                raise EngineError(f"generation failed: {exc}") from exc
        return out

    def _generate(
        self, prompts: list[TokenIds], max_tokens: int, temperature: float | None, n: int
    ) -> list[list[Generation]]:
        torch = self._torch
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature is not None:
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_tokens,
                num_return_sequences=n,
                pad_token_id=pad,
                **kwargs,
            )
        eos = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        self.stats.computed_tokens += sum(len(p) for p in prompts)
        return [
            [finish_generation(seqs[row * n + j, width:].tolist(), eos, self.tokenizer, self.stats) for j in range(n)]
            for row in range(len(prompts))
        ]


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


def default_model_id(model_dir: Path) -> str:
    """`<directory name>@<hash of its config and weight files' names and sizes>`: stable
    for one set of weights, different when the weights are swapped in place."""
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin", ".jinja"}):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            if p.suffix in {".json", ".jinja"}:
                h.update(p.read_bytes())
    return f"{model_dir.name}@{h.hexdigest()[:8]}"
