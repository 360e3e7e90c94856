"""The engine's label probabilities equal an independent computation on the same model.

The reference runs one plain forward of prompt + candidate tokens per candidate (no KV
cache, no batching, no prefix tree) and sums the candidates' token log-probs.
"""

from __future__ import annotations

import math

import pytest
import torch

from labeler import scoring
from labeler.engines.base import ScoreRequest
from labeler.engines.transformers_engine import build_prefix_tree, merge_short_edges

pytestmark = pytest.mark.model
TOL = 1e-4


def seq_logprob(engine, prompt_ids, cand_ids) -> list[float]:
    """log p(c_i | prompt, c_<i) for each candidate token, from one full forward."""
    ids = torch.tensor([list(prompt_ids) + list(cand_ids)])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [lp[n - 1 + i, t].item() for i, t in enumerate(cand_ids)]


def reference_distribution(engine, prompt_ids, labels) -> dict[str, float]:
    """The definition, computed directly: P(label) = p(label tokens) * (1 - p(onward))."""
    raw = {}
    for label, toks in labels.items():
        p = math.exp(sum(seq_logprob(engine, prompt_ids, toks)))
        onward = {o[len(toks)] for o in labels.values() if len(o) > len(toks) and o[: len(toks)] == toks}
        cont = sum(math.exp(seq_logprob(engine, prompt_ids, toks + (t,))[-1]) for t in onward)
        raw[label] = p * (1 - cont)
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def test_score_distribution_with_prefix_label_10(labeler, engine):
    r = labeler.render_score("tiny", "What is 2+2?", "4")
    assert r.labels["10"][0] == r.labels["1"][0] and len(r.labels["10"]) == 2  # the prefix case
    got = labeler.scores([{"context": "What is 2+2?", "response": "4"}], "tiny")[0]
    ref = reference_distribution(engine, r.prompt_token_ids, r.labels)
    assert got.distribution == pytest.approx([ref[str(i)] for i in range(1, 11)], abs=TOL)
    s = sum(i * ref[str(i)] for i in range(1, 11))
    assert got.expected == pytest.approx(s, abs=1e-3)
    assert got.reward == pytest.approx((s - 5.5) / 4.5, abs=1e-3)


def test_pairwise_both_orders_match_reference(labeler, engine):
    ctx, a, b = "Name a fruit.", "An apple.", "A chair."
    got = labeler.preferences([{"context": ctx, "response_a": a, "response_b": b}], "tiny")[0]
    ab = labeler.render_pairwise("tiny", ctx, a, b, order="ab")
    ba = labeler.render_pairwise("tiny", ctx, a, b, order="ba")
    p_ab = reference_distribution(engine, ab.prompt_token_ids, ab.labels)["1"]
    p_ba = reference_distribution(engine, ba.prompt_token_ids, ba.labels)["2"]
    assert got.p_a_ab == pytest.approx(p_ab, abs=TOL)
    assert got.p_a_ba == pytest.approx(p_ba, abs=TOL)
    assert got.p_a == pytest.approx((p_ab + p_ba) / 2, abs=TOL)
    assert got.p_a + got.p_b == pytest.approx(1.0, abs=1e-12)
    assert got.consistent == ((p_ab > 0.5) == (p_ba > 0.5))


def test_arbitrary_multi_token_labels_in_a_mixed_batch(engine):
    """Multi-token labels, a label that prefixes others, and prompts of different lengths
    that share prefixes, all in one engine call, each equal to its own reference."""
    tok = engine.tokenizer
    labels = {
        w: tuple(tok.encode(w, add_special_tokens=False))
        for w in ["yes", "no", " maybe", " maybe not", "unsure about it"]
    }
    assert max(len(v) for v in labels.values()) >= 3
    prompts = [
        "Is the sky blue? Answer:",
        "Is the sky blue? Answer in one word:",
        "Is grass red? Answer:",
        "Q",
    ]
    ids = [tuple(tok.encode(p, add_special_tokens=False)) for p in prompts]
    queries = scoring.label_queries(labels)
    answers = engine.score_sync([ScoreRequest(i, queries) for i in ids])
    for pid, ans in zip(ids, answers, strict=True):
        got = scoring.label_distribution(labels, ans).probs
        ref = reference_distribution(engine, pid, labels)
        assert got == pytest.approx(ref, abs=TOL)


def test_batched_equals_one_by_one_and_reuses_prefixes(labeler, engine):
    items = [
        {"context": "Say hi.", "response_a": "Hi!", "response_b": "Bye."},
        {"context": "Say hi, but longer this time please.", "response_a": "Hello there!", "response_b": "No."},
        {"context": "Say hi.", "response_a": "Hello.", "response_b": "Hi!"},
    ]
    before = engine.stats.computed_tokens, engine.stats.prompt_tokens
    batch = labeler.preferences(items, "tiny")
    computed = engine.stats.computed_tokens - before[0]
    given = engine.stats.prompt_tokens - before[1]
    single = [labeler.preferences([it], "tiny")[0] for it in items]
    for x, y in zip(batch, single, strict=True):
        assert x.p_a_ab == pytest.approx(y.p_a_ab, abs=TOL) and x.p_a_ba == pytest.approx(y.p_a_ba, abs=TOL)
    # Every distinct prefix of the batch's prompts is computed exactly once: the shared
    # preamble once for the batch, each pair's shared context once for both orders.
    prompts = [
        labeler.render_pairwise("tiny", it["context"], it["response_a"], it["response_b"], order=o).prompt_token_ids
        for it in items
        for o in ("ab", "ba")
    ]
    assert given == sum(len(p) for p in prompts)
    assert computed == len({p[:n] for p in prompts for n in range(1, len(p) + 1)})
    assert computed < 0.8 * given


def test_packed_leaves_attend_each_to_its_own_tokens_only():
    """Leaves packed into one row: each token sits at its position after the cache and
    attends to its own leaf's earlier tokens only, never to a leaf laid out before it;
    padding columns attend to themselves alone, at their row's first position. A single leaf
    is a plain row, causal over its edge in a group with packed rows."""
    from labeler.engines.transformers_engine import _Node, edge_row, lay_out, pack_leaves, packed_mask

    leaves = [_Node(edge=(5, 6, 7), ends=[(0, 2)]), _Node(edge=(8,), ends=[(1, 0)]), _Node(edge=(9, 9), ends=[(2, 1)])]
    row = pack_leaves(leaves)
    assert row.packed and row.ids == [5, 6, 7, 8, 9, 9]
    alone = pack_leaves(leaves[:1])
    assert not alone.packed and alone == edge_row(leaves[0])
    width = len(row.ids) + 2
    ids, real, offsets, segments = lay_out([row, alone], width, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 9, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]]
    assert real.sum(dim=1).tolist() == [6, 3]
    assert offsets[0, :6].tolist() == [0, 1, 2, 0, 0, 1] and offsets[1, :3].tolist() == [0, 1, 2]
    # Padding at the row's first position: one past its last token would raise the forward's
    # longest position, from which longrope and dynamic NTK choose their frequencies.
    assert offsets[0, 6:].tolist() == [0, 0] and offsets[1, 3:].tolist() == [0] * 5
    mask, edge_mask = packed_mask(segments)
    for i, col in row.ends:
        seen = [c for c in range(len(row.ids)) if mask[col, c]]
        assert tuple(row.ids[c] for c in seen) == leaves[i].edge  # the leaf itself, in order
        assert [offsets[0, c].item() for c in seen] == list(range(len(leaves[i].edge)))
    assert mask[len(row.ids) :].nonzero().tolist() == [[0, len(row.ids)], [1, len(row.ids) + 1]]
    assert edge_mask[:3, :3].tolist() == torch.ones(3, 3, dtype=torch.bool).tril().tolist()
    assert edge_mask[:3, 3:].sum() == 0 and edge_mask[3:].nonzero().tolist() == [[k, 3 + k] for k in range(5)]


def test_leaves_are_packed_only_where_every_layer_attends_to_every_earlier_token():
    """A packed row's mask replaces the model's own: models with chunked (Llama 4) or
    sliding-window layers (Gemma 2) keep theirs."""
    from transformers import Gemma2Config, Llama4TextConfig, LlamaConfig

    from labeler.engines.transformers_engine import _full_attention_only

    assert _full_attention_only(LlamaConfig())
    assert not _full_attention_only(Llama4TextConfig()) and not _full_attention_only(Gemma2Config())


def test_packed_and_unpacked_leaves_agree(labeler, engine):
    """Pairs in both orders and 1-10 scores ("1" prefixes "10") in one call give the same
    labels, and compute each distinct token once, whether each leaf runs as its own row,
    only some leaves are packed, or every pair's two orders share a row; and match the direct
    computation."""
    from labeler import Labeler
    from labeler.engines.transformers_engine import TransformersEngine

    pairs = [
        {"context": "Name a fruit.", "response_a": "An apple.", "response_b": "A chair."},
        {"context": "Name a colour, please.", "response_a": "Blue", "response_b": "Seven, or maybe eight."},
    ]
    scores = [{"context": "What is 2+2?", "response": "4"}, {"context": "What is 2+2?", "response": "five"}]
    prompts = [
        labeler.render_pairwise("tiny", p["context"], p["response_a"], p["response_b"], order=o).prompt_token_ids
        for p in pairs
        for o in ("ab", "ba")
    ]
    (root,) = merge_short_edges(build_prefix_tree(prompts), 8)
    assert len(root.children) == 2 and all(len(c.children) == 2 for c in root.children)  # a pair's orders
    contexts = sorted(root.children, key=lambda c: sum(len(leaf.edge) for leaf in c.children))
    sizes = [sum(len(leaf.edge) for leaf in c.children) for c in contexts]
    runs = {}
    # None, the first pair's orders in one row, both pairs', and also the scores' leaves (the
    # "1" of "10" read inside its leaf, at two columns of a packed row).
    for pack in (0, sizes[0], sizes[1], 256):
        packed = TransformersEngine.from_objects(engine.model, engine.tokenizer, model_id="packed", pack_tokens=pack)
        assert [[r.packed for r in packed._rows(c.children, None)] for c in contexts] == [
            [True] if pack >= size else [False, False] for size in sizes
        ]
        lab = Labeler(packed, labeler.tasks)
        packed_reads: list[int] = []  # per call, the reads in packed rows
        rows = packed._rows

        def counted(nodes, past, rows=rows, packed_reads=packed_reads):
            out = rows(nodes, past)
            packed_reads[-1] += sum(len(r.ends) for r in out if r.packed)
            return out

        packed._rows = counted
        results = []
        for method, items in ((lab.preferences, pairs), (lab.scores, scores)):
            packed_reads.append(0)
            results.append(method(items, "tiny"))
        assert packed_reads == [2 * (pack >= sizes[0]) + 2 * (pack >= sizes[1]), 4 * (pack >= 256)]
        runs[pack] = (*results, packed.stats.computed_tokens)
    level, *others = runs.values()
    for prefs, dists, computed in others:
        assert computed == level[2]
        for x, y in zip(prefs, level[0], strict=True):
            assert (x.p_a_ab, x.p_a_ba) == pytest.approx((y.p_a_ab, y.p_a_ba), abs=TOL)
        for x, y in zip(dists, level[1], strict=True):
            assert x.distribution == pytest.approx(y.distribution, abs=TOL)
    ab, ba = (labeler.render_pairwise("tiny", **pairs[1], order=o) for o in ("ab", "ba"))
    assert (runs[256][0][1].p_a_ab, runs[256][0][1].p_a_ba) == pytest.approx(
        (
            reference_distribution(engine, ab.prompt_token_ids, ab.labels)["1"],
            reference_distribution(engine, ba.prompt_token_ids, ba.labels)["2"],
        ),
        abs=TOL,
    )
    r = labeler.render_score("tiny", "What is 2+2?", "five")
    ref = reference_distribution(engine, r.prompt_token_ids, r.labels)
    assert runs[256][1][1].distribution == pytest.approx([ref[str(i)] for i in range(1, 11)], abs=TOL)


def test_leaves_without_a_cached_prefix_and_over_one_pack_match_reference(engine):
    """Leaves that share no prefix at all (packed on no cache) and leaves of one parent that
    fill more than one pack each get their own label probabilities, as a plain forward of
    each prompt gives them."""
    from labeler.engines.transformers_engine import TransformersEngine

    tok = engine.tokenizer
    labels = {w: tuple(tok.encode(w, add_special_tokens=False)) for w in ["yes", "no"]}
    stem = "Answer with yes or no, and nothing else. Question:"
    prompts = [f"{stem} {q}" for q in ("Is ice cold?", "Is fire wet?", "Do fish swim?", "Can a rock fly?")]
    prompts += ["Sky blue?", "Grass red?", "Q"]  # no prefix shared with any other prompt
    ids = [tuple(tok.encode(p, add_special_tokens=False)) for p in prompts]
    queries = scoring.label_queries(labels)
    roots = merge_short_edges(build_prefix_tree(ids), 8)
    (stemmed,) = [r for r in roots if r.children]
    assert sorted(len(r.edge) for r in roots if not r.children) == [1, 3, 4]  # 8 tokens
    assert sorted(len(leaf.edge) for leaf in stemmed.children) == [4, 4, 4, 5]  # 17 tokens
    packs = TransformersEngine.from_objects(engine.model, engine.tokenizer, model_id="packs", pack_tokens=8)
    assert sorted((r.packed, len(r.nodes)) for r in packs._rows(roots, None)) == [(False, 1), (True, 3)]
    rows = packs._rows(stemmed.children, None)  # 5 alone, 4 + 4 packed, 4 alone
    assert [(r.packed, len(r.nodes)) for r in rows] == [(False, 1), (True, 2), (False, 1)]
    answers = packs.score_sync([ScoreRequest(i, queries) for i in ids])
    for pid, ans in zip(ids, answers, strict=True):
        got = scoring.label_distribution(labels, ans).probs
        assert got == pytest.approx(reference_distribution(engine, pid, labels), abs=TOL)


def test_prefix_tree_shape():
    root = build_prefix_tree([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3), (1, 9)])
    assert root.edge == (1,) and not root.ends
    kids = {c.edge: c for c in root.children}
    assert set(kids) == {(2, 3), (9,)}
    assert kids[(2, 3)].ends == [(2, 1)] and {c.edge for c in kids[(2, 3)].children} == {(4,), (5,)}
    no_common = build_prefix_tree([(1,), (2, 3)])
    assert no_common.edge == () and len(no_common.children) == 2


def test_short_shared_edges_are_merged_and_prefix_sequences_read_inside_longer_ones():
    # "Post 1" / "Post 10" / "Post 12": digit-split numbers share one-token edges; (1, 2) is
    # a prefix of (1, 2, 3, 4, 5, 6) but shares its node with another branch.
    seqs = [(1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 7), (1, 2), (1, 9, 9, 9, 9, 9), (8, 8, 8, 8), (8, 8, 8, 8, 0)]
    forest = merge_short_edges(build_prefix_tree(seqs), 3)

    def reads(nodes, prefix=()):
        for n in nodes:
            for i, pos in n.ends:
                yield i, prefix + n.edge[: pos + 1]
            yield from reads(n.children, prefix + n.edge)

    got = sorted(reads(forest))
    # Every sequence is read exactly once, at the position of its own last token.
    assert got == [(i, s) for i, s in enumerate(seqs)]
    # The short shared edge (1,) is gone; the long shared (1, 2, 3, 4, 5) stays, and (1, 2)
    # is read inside it; (8, 8, 8, 8) is read inside the forward of (8, 8, 8, 8, 0).
    edges = sorted(n.edge for n in forest)
    assert edges == [(1, 2, 3, 4, 5), (1, 9, 9, 9, 9, 9), (8, 8, 8, 8, 0)]
    shared = next(n for n in forest if n.edge == (1, 2, 3, 4, 5))
    assert shared.ends == [(2, 1)] and {c.edge for c in shared.children} == {(6,), (7,)}
    folded = next(n for n in forest if n.edge == (8, 8, 8, 8, 0))
    assert sorted(folded.ends) == [(4, 3), (5, 4)] and not folded.children
    # A limit of 1 keeps the trie's sharing; only the single-child chain is folded.
    assert len(merge_short_edges(build_prefix_tree(seqs), 1)) == 2


def test_rows_are_grouped_by_width_to_bound_padding():
    from labeler.engines.transformers_engine import _Node, edge_row, group_by_width

    def row(n, children=()):
        return edge_row(_Node(edge=(0,) * n, children=list(children)))

    rows = [row(n) for n in (300, 10, 290, 12, 100, 11)]
    groups = group_by_width(rows, slack=0.25, min_tokens=16)
    assert [[len(r.ids) for r in g] for g in groups] == [[300, 290], [100], [12, 11, 10]]
    for g in groups:  # each group's padding is within the slack
        assert len(g[0].ids) * len(g) <= 1.25 * sum(len(r.ids) for r in g)
    # Small groups are not split: below min_tokens everything runs as one forward.
    assert len(group_by_width(rows[:2], min_tokens=1000)) == 1
    # For a sliding-window model, a row with children is never padded; leaves still are.
    leaf = _Node(edge=(0,) * 5)
    parents = [row(n, [leaf]) for n in (9, 9, 7)]
    groups = group_by_width([*parents, row(8), row(3)], min_tokens=1000, unpadded_parents=True)
    assert [[len(r.ids) for r in g] for g in groups] == [[9, 9, 8], [7, 3]]


def test_a_sliding_window_model_scores_a_batch_as_each_item_alone(engine, test_tasks):
    """A sliding window counts cache columns: a parent edge padded in its group would stand
    its children's tokens further from their context than they are. Random weights of a
    sliding-window architecture (Mistral's, a window of 128 tokens, which reaches back from
    the label past the responses into the context; weights large enough that attention is
    not uniform): pairs whose contexts differ in length, in both orders, give in one batch
    what each gives alone."""
    from transformers import MistralConfig, MistralForCausalLM

    from labeler import Labeler
    from labeler.engines.transformers_engine import TransformersEngine

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(engine.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        sliding_window=128,
        initializer_range=0.2,
    )
    model = MistralForCausalLM(config).eval()
    windowed = Labeler(TransformersEngine.from_objects(model, engine.tokenizer, model_id="sliding"), test_tasks)
    assert model.config._attn_implementation == "sdpa" and windowed.engine.pack_tokens == 0  # a mask of its own
    items = [
        {"context": "Say hi.", "response_a": "Hi!", "response_b": "Bye."},
        {
            "context": "Say hi, but in a much longer way this time, please.",
            "response_a": "Hello there!",
            "response_b": "No.",
        },
        {"context": "Greet me in a few words.", "response_a": "Hello.", "response_b": "Hi!"},
    ]
    batch = windowed.preferences(items, "tiny")
    for got, item in zip(batch, items, strict=True):
        alone = windowed.preferences([item], "tiny")[0]
        assert got.p_a_ab == pytest.approx(alone.p_a_ab, abs=TOL) and got.p_a_ba == pytest.approx(alone.p_a_ba, abs=TOL)


def test_a_chunked_attention_model_reads_each_prompt_as_a_plain_forward_does(engine):
    """Llama 4's chunked attention splits cache columns into chunks: a parent row padded in its
    group would move its children's tokens across a chunk boundary. Random weights of that
    architecture (chunks of 4 tokens), a 7-token and a 2-token prompt read together, with
    reads after further tokens (children of the prompts' rows): each read is what one plain
    forward of its whole sequence gives, and no label read is asked for an empty token list
    without an answer."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from labeler.engines.transformers_engine import TransformersEngine

    torch.manual_seed(0)
    config = Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_chunk_size=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    model = Llama4ForCausalLM(config).eval()
    chunked = TransformersEngine.from_objects(model, engine.tokenizer, model_id="chunked", min_shared_tokens=1)
    queries = tuple(scoring.LabelQuery(prefix, (30, 31)) for prefix in ((), (2,), (3,), (3, 4)))
    requests = [ScoreRequest((10, 11, 12, 13, 14, 15, 16), queries), ScoreRequest((20, 21), queries)]
    got = chunked.score_sync(requests)
    for r, req in enumerate(requests):
        for q in req.queries:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([list(req.prompt_ids + q.prefix)])).logits[0, -1]
            want = torch.log_softmax(logits.double(), -1)
            for t in q.next_tokens:
                assert got[r][q.prefix][t] == pytest.approx(want[t].item(), abs=TOL), (r, q.prefix)
    # Reads that ask for no token (every one of a forward's): an empty answer, not an IndexError.
    assert chunked.score_sync([ScoreRequest((10, 11, 12), (scoring.LabelQuery((), ()),))]) == [{(): {}}]
