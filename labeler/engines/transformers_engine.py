"""The transformers engine: a local PyTorch model (the CPU default).

Scoring runs every sequence that must be read (each prompt, and each prompt + label
prefix) through one *prefix tree* forward: the sequences of a batch are arranged in a
compressed trie, and the trie is run level by level, each node's tokens once, on top of
its parent's KV cache. So the shared preamble of a batch is computed once, the shared
context of the two orders of a pair once, and a label prefix such as "1" of "10" costs
one token on top of the prompt's cache. Nodes of one level run as padded batches, grouped
by length so that padding stays small (`group_by_width`); padding sits inside the sequence,
masked out, with explicit position ids (a padding column takes its row's first position: one
past the row's last token would count in the forward's longest position, from which longrope
and dynamic NTK scaling choose their frequencies, `_rope_limit`).

With longrope the frequencies switch once a forward reaches past the pretraining length
(Phi-3/3.5/4-mini's long-context models): a sequence longer than that is run unshared, in
forwards of such sequences only, as a plain forward of it would be; the shorter ones batch and
share as any model's.

A call larger than `max_batch_tokens` runs as consecutive chunks, each its own tree; the
prefix that consecutive chunks share (the preamble and context of one prompt's many
comparisons) is computed once and its KV cache reused by each of them (`_shared_bases`).
Generation keeps to the same limit: greedy requests run in left-padded batches of at most
`max_batch_tokens` rows × (longest prompt + new tokens), shortest prompts first
(`generation_batches`).

A shared edge shorter than `min_shared_tokens` is not given a level of its own: it is
copied into its children (`merge_short_edges`). Digit-split numbers ("Post 1" / "Post 10")
otherwise make deep tries of one-token levels, each padded to the level's widest node, which
cost far more than the few tokens their sharing saves (it halved GPU throughput on the P1
workload).

Leaves that hang on the same cache row (a pair's two orders after their shared context, the
second responses of a group's comparisons after their shared first one) run packed into
rows of at most `pack_tokens` tokens (`pack_leaves`): each attends to the cache and to its
own earlier tokens only (a 4D mask), at the positions it has in its sequence, so the row
uses one copy of the parent's cache instead of one each (P4 in docs/BENCHMARKS.md measures
the two orders of a pair). The limit is low because the mask is dense: each packed leaf's
queries are also computed against its neighbours' columns, a cost that grows with the
square of the row and soon outweighs the cache copies it saves. Nodes with children always
run as their own rows, which keeps the causal kernel for the long shared parts. Models with
sliding-window or chunked attention layers (whose masks a custom one would replace) and
attention implementations other than SDPA never pack.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import EngineError, EngineUnavailable, InvalidInput, ModelLoadError
from ..scoring import TokenIds
from .base import (
    PLAIN_SAMPLING,
    EngineStats,
    GenerateRequest,
    Generation,
    Logprobs,
    ScoreRequest,
    check_generate_requests,
    check_score_requests,
    finish_generation,
    int_option,
)

T = TypeVar("T")


@dataclass
class _Node:
    edge: TokenIds
    children: list[_Node] = field(default_factory=list)
    # (sequence index, position in `edge` of its last token) for the sequences read here
    ends: list[tuple[int, int]] = field(default_factory=list)


def build_prefix_tree(seqs: Sequence[TokenIds]) -> _Node:
    """Compressed trie of `seqs`. The root's edge may be empty (no common prefix). A sequence
    that ends where others go on ends at the last token of a node's edge."""

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
                node.ends.append((i, n - offset - 1))
            else:
                groups.setdefault(seqs[i][n], []).append(i)
        node.children = [build(g, n) for g in groups.values()]
        return node

    if any(len(s) == 0 for s in seqs):
        raise InvalidInput("cannot score an empty sequence")
    return build(list(range(len(seqs))), 0)


def merge_short_edges(node: _Node, min_tokens: int) -> list[_Node]:
    """The nodes that replace `node` in the forward plan (bottom-up):

    - a node with a single child absorbs it: a causal model's logits at a position do not
      depend on the tokens after it, so a sequence that is a prefix of another is read inside
      the longer one's forward ("1" and "1","0" of the label "10": one forward, not two);
    - a shared edge shorter than `min_tokens` is pushed down into its children; a merged
      node's own sequences become a leaf with its edge.

    The tokens and positions each sequence is computed with are unchanged; only what is
    shared, and where it is read, changes.
    """
    node.children = [m for c in node.children for m in merge_short_edges(c, min_tokens)]
    if len(node.children) == 1:
        (child,) = node.children
        shift = len(node.edge)
        node.ends += [(i, shift + pos) for i, pos in child.ends]
        node.edge += child.edge
        node.children = child.children
    if len(node.edge) >= min_tokens or not node.children:
        return [node]
    out = [_Node(edge=node.edge, ends=node.ends)] if node.ends else []
    for c in node.children:
        c.ends = [(i, len(node.edge) + pos) for i, pos in c.ends]
        c.edge = node.edge + c.edge
        out.append(c)
    return out


@dataclass
class _Row:
    """One row of a forward: one node's edge, its children to run next on this row's cache;
    or, `packed`, several leaves that hang on the same cache row, one after the other."""

    nodes: list[_Node]
    ids: list[int]
    spans: list[tuple[int, int]]  # (first column, end column) of each node; its positions count from 0
    ends: list[tuple[int, int]]  # (sequence index, column) of the sequences read here
    packed: bool = False

    @property
    def children(self) -> list[_Node]:
        return [] if self.packed else self.nodes[0].children


def edge_row(node: _Node) -> _Row:
    """`node`'s edge as a row; its children run on the row's cache."""
    n = len(node.edge)
    return _Row([node], list(node.edge), [(0, n)], list(node.ends))


def pack_leaves(leaves: Sequence[_Node]) -> _Row:
    """`leaves` (of one cache row) one after the other in one row, each at its own positions;
    `packed_mask` keeps each to its own tokens."""
    if len(leaves) == 1:
        return edge_row(leaves[0])
    row = _Row(list(leaves), [], [], [], packed=True)
    for n in leaves:
        start = len(row.ids)
        row.ids += n.edge
        row.spans.append((start, len(row.ids)))
        row.ends += [(i, start + pos) for i, pos in n.ends]
    return row


def lay_out(rows: Sequence[_Row], width: int, pad_id: int) -> tuple[Any, Any, Any, Any]:
    """`rows` as the tensors of one padded forward, each [len(rows), width]: token ids, the
    real columns (1) and padding (0), each column's position after the row's cached prefix
    (0 for padding: masked out, it must not reach past its row's last position, which would
    raise the forward's longest one), and its segment: the index of its node's span in the
    row, a padding column a segment of its own (negative)."""
    import torch

    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = torch.zeros((len(rows), width), dtype=torch.long)
    segments = (-1 - torch.arange(width)).repeat(len(rows), 1)
    for row, r in enumerate(rows):
        ids[row, : len(r.ids)] = torch.tensor(r.ids)
        real[row, : len(r.ids)] = 1
        for k, (start, end) in enumerate(r.spans):
            offsets[row, start:end] = torch.arange(end - start)
            segments[row, start:end] = k
    return ids, real, offsets, segments


def packed_mask(segments: Any) -> Any:
    """[rows, width, width] bool from `lay_out`'s segments: which of its row's columns each
    column attends to (the cache's columns aside): the earlier ones of its own segment. A
    padding column attends to itself alone: a query that attends to nothing makes NaNs that
    the masked-out products do not cancel. Built where `segments` lie (on the model's device:
    only the [rows, width] segments are copied there, not the mask)."""
    return (segments[:, :, None] == segments[:, None, :]).tril()


def group_by_width(
    rows: Sequence[_Row], *, slack: float = 0.25, min_tokens: int = 256, unpadded_parents: bool = False
) -> list[list[_Row]]:
    """`rows` in groups that each run as one padded forward: longest first, a group closed
    once padding it to its widest row would cost more than `slack` × its real tokens (and it
    holds at least `min_tokens`, so short rows do not each get a forward). With
    `unpadded_parents`, a row with children is never padded (its group is as wide as it is):
    its children's tokens would stand that padding further from their context."""
    groups: list[list[_Row]] = []
    cur: list[_Row] = []
    real = 0
    for n in sorted(rows, key=lambda n: -len(n.ids)):
        wide = len(cur[0].ids) if cur else 0
        padded_parent = unpadded_parents and bool(n.children) and len(n.ids) < wide
        if cur and (
            padded_parent or (real >= min_tokens and wide * (len(cur) + 1) > (1 + slack) * (real + len(n.ids)))
        ):
            groups.append(cur)
            cur, real = [], 0
        cur.append(n)
        real += len(n.ids)
    if cur:
        groups.append(cur)
    return groups


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
        min_shared_tokens: int = 8,
        pack_tokens: int = 256,
    ) -> None:
        import torch
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM

        from ..models import load_tokenizer

        limits, threads, torch_dtype = self.checked_options(  # before the model loads
            max_batch_tokens=max_batch_tokens,
            min_shared_tokens=min_shared_tokens,
            pack_tokens=pack_tokens,
            threads=threads,
            dtype=dtype,
            device=device,
        )
        model_dir = Path(model_dir)
        if threads is not None:
            torch.set_num_threads(threads)
        # Before the tokenizer and the weights load, checked after: a file written meanwhile
        # (a new chat template too) would be named by the id and not read by the engine.
        before = None if model_id else default_model_id(model_dir)
        tokenizer = load_tokenizer(model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
            model = model.to(device)
        # AssertionError: torch's "not compiled with CUDA enabled" for a device it was built without;
        # SafetensorError: a weights file cut short (a copy that did not finish).
        except (OSError, ValueError, RuntimeError, AssertionError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot load a model from {model_dir} onto {device!r}: {exc}") from exc
        if before is not None:
            from ..fingerprint import check_unchanged

            check_unchanged(model_dir, before)
        self._setup(model, tokenizer, model_id or before, *limits)

    @staticmethod
    def checked_options(
        *,
        max_batch_tokens: Any,
        min_shared_tokens: Any,
        pack_tokens: Any,
        threads: Any,
        dtype: Any,
        device: Any = "cpu",
        **_: Any,
    ) -> tuple[tuple[int, int, int], int | None, Any]:
        """(token limits, threads, torch dtype) as the engine uses them, or InvalidInput naming
        an option of the wrong kind or a device torch cannot reach; `check_engine` calls it
        too, before a server starts."""
        import torch

        try:
            torch.empty(0, device=device)
        # AssertionError: torch's "not compiled with CUDA enabled" for a device it was built without.
        except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
            # torch's first sentence: some of its messages run to pages.
            why = next(iter(str(exc).splitlines()), type(exc).__name__).split(". ")[0]
            raise InvalidInput(f"device {device!r} cannot be used by this torch: {why}", field="device") from None

        limits = _limits(max_batch_tokens, min_shared_tokens, pack_tokens)
        if threads is not None:
            threads = int_option("transformers", "threads", threads)
        torch_dtype = getattr(torch, str(dtype), None)
        # The types a model's weights load and compute in (float8 types are storage formats).
        if torch_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise InvalidInput(
                f"dtype must be float32, bfloat16, float16 or float64 (or their torch aliases), got {dtype!r}",
                field="dtype",
            )
        return limits, threads, torch_dtype

    @classmethod
    def from_objects(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        max_batch_tokens: int = 4096,
        min_shared_tokens: int = 8,
        pack_tokens: int = 256,
    ) -> TransformersEngine:
        """An engine around an already-built model (e.g. `from_config` with random weights
        for a throughput benchmark). The engine takes the model over: its generation config
        is replaced by a plain one, as at load."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, *_limits(max_batch_tokens, min_shared_tokens, pack_tokens))
        return engine

    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        max_batch_tokens: int,
        min_shared_tokens: int,
        pack_tokens: int,
    ) -> None:
        import inspect

        import torch

        self.model = model.eval()
        # generate() fills every option a call leaves unset from the model's generation config
        # (Qwen2.5 ships a repetition penalty, top-p and top-k; others beams or suppressed
        # tokens), which the vLLM engines do not read: only its special tokens are kept, so
        # the request alone decides a rationale, as on every engine.
        model.generation_config = _plain_generation_config(model.generation_config)
        self.tokenizer = tokenizer
        self._torch = torch
        self.device = next(model.parameters()).device
        self.model_id = model_id
        self.max_model_len = int(getattr(_text_config(model.config), "max_position_embeddings", 2048))
        self.max_batch_tokens = max_batch_tokens
        self.min_shared_tokens = min_shared_tokens
        # Logits only where a label is read, not for every position (a 128k vocabulary makes
        # the full [rows, width, vocab] tensor gigabytes on a GPU).
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # A sliding window counts cache columns, not positions: padding inside a sequence
        # (a parent's, before its children's tokens) would shorten what the window sees.
        self._window = _sliding_window(model.config)
        # Chunked attention (Llama 4) counts them at any length: its chunks are of columns.
        self._chunked = _chunked_attention(model.config)
        # A custom 4D mask replaces the model's own (a sliding window's, Llama 4's chunks), and
        # only SDPA reads a boolean one.
        sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
        plain = self._window is None and _full_attention_only(model.config)
        self.pack_tokens = pack_tokens if sdpa and plain else 0
        # The length past which a forward's RoPE frequencies change, where they do.
        self._rope_limit = _rope_limit(model.config)
        self.stats = EngineStats()
        # One model, one forward at a time; torch uses every core for each forward. The
        # forwards wait in a queue of their own: on asyncio's shared thread pool, batches
        # waiting for the lock would hold the threads a Redis host-name lookup or the
        # service's start-up needs.
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labeler-forward")
        self._closed = False
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- protocol ------------------------------------------------------------------
    failure: str | None = None  # in this process: nothing to die apart from it

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Logprobs]:
        return await self._in_worker(self.score_sync, requests)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        return await self._in_worker(self.generate_sync, requests)

    async def _in_worker(self, fn: Callable[[Sequence[Any]], T], requests: Sequence[Any]) -> T:
        # A call cancelled while it waits for the worker never runs (`to_thread` ran it anyway).
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn, requests)
        except RuntimeError:
            if self._closed:  # the worker was shut down with the engine
                raise EngineUnavailable("the transformers engine is closed") from None
            raise

    async def aclose(self) -> None:
        self._closed = True
        # Calls already queued run and find the engine closed (`EngineUnavailable`), and a
        # call running stops before its next forward: the process that closed the engine
        # (Ctrl-C in `labeler label`) waits for one forward at most, not for a whole call.
        self._worker.shutdown(wait=False)
        # The model is dropped unless a forward still runs on it in a worker thread (a batch
        # cancelled at shutdown): waiting for that forward would hold up the shutdown.
        if self._lock.acquire(blocking=False):
            try:
                self.model = None  # type: ignore[assignment]
            finally:
                self._lock.release()

    def _check_open(self) -> None:
        """A closed engine is `EngineUnavailable`, as on the vLLM engines (called under the lock)."""
        if self._closed:
            raise EngineUnavailable("the transformers engine is closed")

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
            self._check_open()
            self.stats.score_calls += 1
            self.stats.prompts_scored += len(requests)
            self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
            # Every forward inside: a shared prefix's cache (`_prefix_past`) can run out of
            # memory as well as a tree's level.
            try:
                for part, share in self._parts(seqs):
                    chunks = [[part[k] for k in c] for c in self._chunks([seqs[i] for i in part])]
                    in_chunks = [[seqs[i] for i in c] for c in chunks]
                    bases = self._shared_bases(in_chunks) if share else [()] * len(chunks)
                    base: tuple[TokenIds, Any] | None = None
                    for chunk, shared in zip(chunks, bases, strict=True):
                        self._check_open()  # closed meanwhile (Ctrl-C, shutdown): no more forwards
                        wanted = [reads[i][2] for i in chunk]
                        if not shared:
                            base = None
                        elif base is None or base[0] != shared:
                            base = (shared, self._prefix_past(shared))
                        values = self._tree_logprobs([seqs[i] for i in chunk], wanted, base, share=share)
                        for i, vals in zip(chunk, values, strict=True):
                            r, prefix, toks = reads[i]
                            out[r][prefix] = dict(zip(toks, vals, strict=True))
            except RuntimeError as exc:
                raise EngineError(f"forward failed: {exc}") from exc
        return out

    def _parts(self, seqs: Sequence[TokenIds]) -> list[tuple[list[int], bool]]:
        """The sequences (by index) in runs that share no forward, each with whether its
        sequences share their prefixes: all in one, shared; for a model whose RoPE
        frequencies switch past `_rope_limit`, the sequences longer than it apart and
        unshared, so that each is computed with the frequencies a plain forward of it uses,
        never with a shorter one's (a shared parent within the limit, a batch-mate below it)."""
        every = list(range(len(seqs)))
        if self._rope_limit is None:
            return [(every, True)]
        short = [i for i in every if len(seqs[i]) <= self._rope_limit]
        long = [i for i in every if len(seqs[i]) > self._rope_limit]
        return [(part, share) for part, share in ((short, True), (long, False)) if part]

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

    def _shared_bases(self, chunks: Sequence[Sequence[TokenIds]]) -> list[TokenIds]:
        """Per chunk, a prefix of all its sequences whose KV cache it shares with a
        neighbouring chunk (empty: none). The previous chunk's base is kept while it still
        prefixes the chunk; otherwise the longest prefix common to the chunk and its
        previous or next one, if at least `min_shared_tokens` long. Every sequence keeps a
        token beyond its base, to read its labels at. A single chunk gets none."""
        if len(chunks) < 2:
            return [()] * len(chunks)
        lcps = [_common_prefix(c, spare=1) for c in chunks]
        bases: list[TokenIds] = []
        for k, lcp in enumerate(lcps):
            last = bases[-1] if bases else ()
            if last and lcp[: len(last)] == last:
                bases.append(last)
                continue
            near = [_common_prefix([lcp, lcps[o]]) for o in (k - 1, k + 1) if 0 <= o < len(lcps)]
            best = max(near, key=len)
            bases.append(best if len(best) >= self.min_shared_tokens else ())
        return bases

    def _prefix_past(self, prefix: TokenIds) -> Any:
        """The KV cache of `prefix` alone (one row), as `_forward_group` passes a cache on."""
        with self._torch.inference_mode():
            kv, mask, plen, _ = self._forward_group([edge_row(_Node(edge=prefix))], None, [], [], keep=True)
        return kv, mask, plen

    def _tree_logprobs(
        self,
        seqs: list[TokenIds],
        wanted: list[TokenIds],
        base: tuple[TokenIds, Any] | None = None,
        *,
        share: bool = True,
    ) -> list[list[float]]:
        """Label log-probs of `seqs`, on top of `base` = (a prefix of every sequence, its
        cache from `_prefix_past`) when given; without `share`, each sequence as a leaf of
        its own (one that prefixes another still read inside it)."""
        results: list[list[float]] = [[] for _ in seqs]
        past, reach = None, 0
        if base is not None:
            prefix, (kv, mask, plen) = base
            seqs = [s[len(prefix) :] for s in seqs]
            reach = len(prefix)
        min_tokens = self.min_shared_tokens if share else 1 + max(len(s) for s in seqs)
        roots = merge_short_edges(build_prefix_tree(seqs), min_tokens)
        if base is not None:
            past = (kv, mask, plen, {id(r): 0 for r in roots})
        # Parents go unpadded only where the window can fall short of a row's columns: its
        # cache holds at most the base and, per tree level, the widest edge.
        unpadded = self._chunked or (self._window is not None and reach + _widest_path(roots) > self._window)
        # Depth-first over groups of rows: a group's KV cache lives only until its subtree is done.
        todo: list[tuple[list[_Node], Any]] = [(roots, past)]
        with self._torch.inference_mode():
            while todo:
                nodes, past = todo.pop()
                rows = self._rows(nodes, past)
                for group in reversed(group_by_width(rows, unpadded_parents=unpadded)):
                    kv = self._forward_group(group, past, wanted, results)
                    kids = [c for r in group for c in r.children]
                    if kids:
                        todo.append((kids, kv))
        return results

    def _rows(self, nodes: list[_Node], past: Any) -> list[_Row]:
        """The rows that run `nodes` (all on the cache `past`): a node with children, or a
        leaf of `pack_tokens` or more, alone; the leaves of one cache row packed, longest
        first, into rows of at most `pack_tokens`."""
        rows: list[_Row] = []
        leaves: dict[int, list[_Node]] = {}  # by the cache row they run on
        row_of = past[3] if past is not None else {}
        for n in nodes:
            if n.children or len(n.edge) >= self.pack_tokens:
                rows.append(edge_row(n))
            else:
                leaves.setdefault(row_of.get(id(n), 0), []).append(n)
        for same in leaves.values():
            pack: list[_Node] = []
            size = 0
            for n in sorted(same, key=lambda n: -len(n.edge)):
                if pack and size + len(n.edge) > self.pack_tokens:
                    rows.append(pack_leaves(pack))
                    pack, size = [], 0
                pack.append(n)
                size += len(n.edge)
            if pack:
                rows.append(pack_leaves(pack))
        return rows

    def _forward_group(
        self, group: list[_Row], past: Any, wanted: list[TokenIds], results: list[list[float]], *, keep: bool = False
    ) -> Any:
        """Run `group`'s rows on top of their parents' cache `past`; store the label
        log-probs of the sequences ending in it; return its own cache for its children
        (also without children with `keep`)."""
        torch = self._torch
        width = max(len(r.ids) for r in group)
        ids, edge_mask, offsets, segments = lay_out(group, width, self.tokenizer.pad_token_id)
        if past is None:
            cache, pmask, start = self._cache(None), edge_mask[:, :0], torch.zeros(len(group), dtype=torch.long)
        else:
            kv, pmask, start, rows_of = past
            parents = [rows_of[id(r.nodes[0])] for r in group]
            if parents == list(range(len(start))):  # the parent's rows in their order: no gather
                cache = self._cache(list(kv))
            else:
                sel = torch.tensor(parents)
                sel_dev = sel.to(self.device)
                cache = self._cache([(k[sel_dev], v[sel_dev]) for k, v in kv])
                pmask, start = pmask[sel], start[sel]
        mask = torch.cat([pmask, edge_mask], dim=1)  # the columns a child of a row attends to
        if any(r.packed for r in group):
            own = packed_mask(segments.to(self.device))
            cached = pmask.to(self.device).bool()[:, None, :].expand(-1, width, -1)
            attention = torch.cat([cached, own], dim=2)[:, None]
        else:
            attention = mask
        positions = start[:, None] + offsets
        # Where labels are read: the last token of every sequence that ends in this group.
        reads = [(row, pos, i) for row, r in enumerate(group) for i, pos in r.ends]
        cols = sorted({c for _, c, _ in reads})
        extra: dict[str, Any] = {}
        if self._keep_logits:
            extra["logits_to_keep"] = torch.tensor(cols, device=self.device) if cols else 1
        outputs = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        self.stats.computed_tokens += int(edge_mask.sum())
        if reads:
            col_of = {c: j for j, c in enumerate(cols)} if self._keep_logits else {c: c for c in cols}
            rows = torch.tensor([r for r, _, _ in reads], device=self.device)
            at = torch.tensor([col_of[c] for _, c, _ in reads], device=self.device)
            lp = torch.log_softmax(outputs.logits[rows, at].float(), dim=-1)
            # One gather and one device→host copy for the whole group.
            flat_rows = [j for j, (_, _, i) in enumerate(reads) for _ in wanted[i]]
            flat_toks = [t for _, _, i in reads for t in wanted[i]]
            index = {"dtype": torch.long, "device": self.device}  # long also when no read wants a token
            vals = lp[torch.tensor(flat_rows, **index), torch.tensor(flat_toks, **index)].tolist()
            pos = 0
            for _, _, i in reads:
                results[i] = vals[pos : pos + len(wanted[i])]
                pos += len(wanted[i])
        if not keep and not any(r.children for r in group):
            return None
        rows_of = {id(c): row for row, r in enumerate(group) for c in r.children}
        kv_new = [(k, v) for k, v, *_ in outputs.past_key_values]
        return (kv_new, mask, start + edge_mask.sum(dim=1), rows_of)

    def _cache(self, kv: list[tuple[Any, Any]] | None) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=kv) if kv is not None else DynamicCache()

    # -- generation ---------------------------------------------------------------------
    def generate_sync(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        """Blocking `generate`. Greedy requests run in left-padded batches within
        `max_batch_tokens` (`generation_batches`); sampled ones one by one, each seeded by
        its own `seed`, so a result does not depend on what else was in the batch."""
        torch = self._torch
        check_generate_requests(requests, self.max_model_len)
        out: list[list[Generation]] = [[] for _ in requests]
        sampled = [i for i, r in enumerate(requests) if r.temperature > 0]
        with self._lock:
            self._check_open()
            self.stats.generate_calls += 1
            try:
                for batch in generation_batches(requests, self.max_batch_tokens, self._rope_limit):
                    self._check_open()  # closed meanwhile: no more generations
                    prompts = [requests[i].prompt_ids for i in batch]
                    gens = self._generate(prompts, requests[batch[0]].max_tokens, None, 1)
                    for i, g in zip(batch, gens, strict=True):
                        out[i] = g
                # One request a call: its n draws come from the generator seeded for it
                # alone, whatever else the call holds (n rows, however many tokens they take).
                for i in sampled:
                    self._check_open()
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
        # Sampling as every engine samples: transformers' own default top-k is 50.
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature is not None:
            kwargs |= {**PLAIN_SAMPLING, "do_sample": True, "temperature": temperature}
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
        self.stats.computed_tokens += n * sum(len(p) for p in prompts)  # each of n rows runs its prompt
        return [
            [finish_generation(seqs[row * n + j, width:].tolist(), eos, self.tokenizer, self.stats) for j in range(n)]
            for row in range(len(prompts))
        ]


def generation_batches(
    requests: Sequence[GenerateRequest], budget: int, rope_limit: int | None = None
) -> list[list[int]]:
    """The greedy requests of `requests` (by index) in batches of one left-padded `generate`
    each: requests of one `max_tokens`, shortest prompts first (least padding), each batch at
    most `budget` tokens of rows × (its longest prompt + max_tokens), the KV cache it fills;
    a request larger than that runs alone. With a `rope_limit` (`_rope_limit`), a request
    whose prompt and new tokens reach past it runs alone too: a batch's frequencies switch
    when its longest row passes the limit, not when each row does."""
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        if r.temperature <= 0:
            by_len.setdefault(r.max_tokens, []).append(i)
    batches: list[list[int]] = []
    for max_tokens, idx in by_len.items():
        batch: list[int] = []
        for i in sorted(idx, key=lambda i: len(requests[i].prompt_ids)):
            row = len(requests[i].prompt_ids) + max_tokens
            alone = rope_limit is not None and row > rope_limit
            if batch and (alone or (len(batch) + 1) * row > budget):
                batches.append(batch)
                batch = []
            batch.append(i)
            if alone:
                batches.append(batch)
                batch = []
        if batch:
            batches.append(batch)
    return batches


def _limits(max_batch_tokens: Any, min_shared_tokens: Any, pack_tokens: Any) -> tuple[int, int, int]:
    """The engine's token limits as whole numbers (sizes such as 8K read as vLLM reads them),
    or InvalidInput naming the option: a value of another type would fail every call instead."""
    return (
        int_option("transformers", "max_batch_tokens", max_batch_tokens, size=True),
        int_option("transformers", "min_shared_tokens", min_shared_tokens, size=True),
        int_option("transformers", "pack_tokens", pack_tokens, least=0, size=True),
    )


def _rope_limit(config: Any) -> int | None:
    """The sequence length past which the model's RoPE frequencies change with the longest
    position of a forward (transformers' `dynamic_rope_update`): longrope's pretraining
    length (`original_max_position_embeddings`, Phi-3/3.5/4-mini's long-context models), or
    dynamic NTK's `max_position_embeddings`; None for rotary embeddings that stay fixed."""
    text = _text_config(config)
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    # Per layer type (Gemma 3's sliding and full layers) or one for all layers.
    layers = list(params.values()) if all(isinstance(v, dict) for v in params.values()) and params else [params]
    limits = []
    for p in layers:
        kind = str(p.get("rope_type", p.get("type")) or "")
        if kind == "longrope":
            original = p.get("original_max_position_embeddings") or getattr(
                text, "original_max_position_embeddings", None
            )
            limits.append(int(original or text.max_position_embeddings))
        elif "dynamic" in kind:
            limits.append(int(text.max_position_embeddings))
    return min(limits) if limits else None


def _plain_generation_config(config: Any) -> Any:
    """transformers' defaults with only `config`'s special tokens (end, start, padding)."""
    from transformers import GenerationConfig

    keep = ("bos_token_id", "eos_token_id", "pad_token_id")
    return GenerationConfig(**{k: getattr(config, k) for k in keep if getattr(config, k, None) is not None})


def _common_prefix(seqs: Sequence[TokenIds], *, spare: int = 0) -> TokenIds:
    """The longest common prefix of `seqs`, leaving at least `spare` tokens of each beyond it."""
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest - spare and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return tuple(seqs[0][:n])


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


def _text_config(config: Any) -> Any:
    """The language model's part of a model config: a multimodal one keeps its layers and
    context length in a text config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _sliding_window(config: Any) -> int | None:
    """The sliding attention window of the model's layers that have one (Gemma 2 and 3,
    Mistral 7B v0.1, Phi-3 mini 4k...), in tokens; None when none has (Qwen 2 names one that
    `use_sliding_window=False` turns off); 0 when one has but names no size."""
    text = _text_config(config)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types is not None else bool(window)
    if not sliding or getattr(text, "use_sliding_window", True) is False:
        return None
    return int(window or 0)


def _chunked_attention(config: Any) -> bool:
    """Whether some layers attend within fixed chunks of cache columns (Llama 4's)."""
    text = _text_config(config)
    return bool(getattr(text, "attention_chunk_size", None)) or "chunked_attention" in (
        getattr(text, "layer_types", None) or ()
    )


def _full_attention_only(config: Any) -> bool:
    """Whether every layer attends to every earlier token (no layer types other than full
    attention: not Llama 4's chunked layers, nor any sliding window)."""
    layer_types = getattr(_text_config(config), "layer_types", None)
    return layer_types is None or set(layer_types) <= {"full_attention"}


def _widest_path(roots: list[_Node]) -> int:
    """The sum over the tree's levels of the widest edge at each: a bound on the columns of
    any row's cache, padding included."""
    total, level = 0, roots
    while level:
        total += max(len(n.edge) for n in level)
        level = [c for n in level for c in n.children]
    return total


def default_model_id(model_dir: Path) -> str:
    """The model id of a local model directory: `labeler.fingerprint.model_id`."""
    from ..fingerprint import model_id

    return model_id(model_dir)
