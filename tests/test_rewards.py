"""Pairwise rewards for online RL: against a reference, and group-relative. The math against
hand-computed values; the labeler's numbers against direct forwards of the embedded model;
the group's single engine call and its prefix sharing."""

from __future__ import annotations

import math

import pytest

from labeler import GroupItem, InvalidInput, ReferenceItem, scoring
from tests.test_engine_exact import TOL, reference_distribution


# -- math ---------------------------------------------------------------------------------------
def test_reference_reward():
    assert scoring.reference_reward(0.5) == 0.0
    assert scoring.reference_reward(0.9) == pytest.approx(0.8)
    assert scoring.reference_reward(0.0) == -1.0
    with pytest.raises(InvalidInput):
        scoring.reference_reward(1.2)


def test_group_rewards_by_hand():
    # q[i][j] = P("1") with i shown first. Diagonal ignored.
    q = [
        [None, 0.9, 0.7],
        [0.3, None, 0.6],
        [0.5, 0.2, None],
    ]
    q = [[0.0 if x is None else x for x in row] for row in q]
    got = scoring.group_rewards(q)
    # P(0>1) = (.9 + 1 - .3)/2 = .8   P(0>2) = (.7 + 1 - .5)/2 = .6   P(1>2) = (.6 + 1 - .2)/2 = .7
    expected = [[None, 0.8, 0.6], [0.2, None, 0.7], [0.4, 0.3, None]]
    for row, exp in zip(got.p_win, expected, strict=True):
        assert row == [None if e is None else pytest.approx(e) for e in exp]
    # w = (.8+.6)/2, (.2+.7)/2, (.4+.3)/2 = .7, .45, .35 ; r = 2w - 1 = .4, -.1, -.3
    assert got.win_rate == pytest.approx([0.7, 0.45, 0.35])
    assert got.rewards == pytest.approx([0.4, -0.1, -0.3])
    assert sum(got.rewards) == pytest.approx(0.0, abs=1e-12)


def test_group_rewards_follow_bradley_terry_order_and_stay_bounded():
    s = [2.0, -1.0, 0.5, 30.0]  # one completion far stronger: BT strengths would run away
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    q = [[sig(a - b) for b in s] for a in s]
    got = scoring.group_rewards(q)
    assert sorted(range(4), key=lambda i: got.rewards[i]) == sorted(range(4), key=lambda i: s[i])
    assert all(-1.0 <= r <= 1.0 for r in got.rewards)
    assert got.rewards[3] == pytest.approx(1.0, abs=1e-9)
    assert sum(got.rewards) == pytest.approx(0.0, abs=1e-12)


def test_group_rewards_refuse_bad_input():
    with pytest.raises(InvalidInput, match="at least two"):
        scoring.group_rewards([[0.5]])
    with pytest.raises(InvalidInput, match="N x N"):
        scoring.group_rewards([[0.5, 0.5], [0.5]])
    with pytest.raises(InvalidInput, match="probability"):
        scoring.group_rewards([[0.0, 1.5], [0.5, 0.0]])


# -- on the model -------------------------------------------------------------------------------
pytest_model = pytest.mark.model


@pytest_model
def test_reference_rewards_equal_direct_forwards(labeler, engine):
    ctx, resp, ref = "Name a fruit.", "An apple.", "A chair."
    got = labeler.reference_rewards([ReferenceItem(ctx, resp, ref)], "tiny")[0]
    ab = labeler.render_pairwise("tiny", ctx, resp, ref, order="ab")
    ba = labeler.render_pairwise("tiny", ctx, resp, ref, order="ba")
    p_ab = reference_distribution(engine, ab.prompt_token_ids, ab.labels)["1"]
    p_ba = reference_distribution(engine, ba.prompt_token_ids, ba.labels)["2"]
    assert got.p_win_ab == pytest.approx(p_ab, abs=TOL) and got.p_win_ba == pytest.approx(p_ba, abs=TOL)
    assert got.p_win == pytest.approx((p_ab + p_ba) / 2, abs=TOL)
    assert got.reward == pytest.approx(p_ab + p_ba - 1.0, abs=2 * TOL)
    assert got.consistent == ((p_ab > 0.5) == (p_ba > 0.5))
    with pytest.raises(InvalidInput) as exc:
        labeler.reference_rewards(
            [ReferenceItem(ctx, resp, ref), {"context": ctx, "response": resp, "reference": None}], "tiny"
        )
    assert exc.value.field == "items[1].reference"


@pytest_model
def test_group_rewards_one_call_exact_and_shared(labeler, engine):
    ctx = "Name a fruit."
    responses = ["An apple.", "A chair.", "Banana, the yellow fruit."]
    group = GroupItem(ctx, responses)
    before = (engine.stats.score_calls, engine.stats.computed_tokens, engine.stats.prompt_tokens)
    got = labeler.group_rewards([group], "tiny")[0]
    calls = engine.stats.score_calls - before[0]
    computed = engine.stats.computed_tokens - before[1]
    given = engine.stats.prompt_tokens - before[2]
    assert calls == 1  # all N (N - 1) = 6 comparisons in one engine call

    # Every comparison equals a direct forward of its own prompt (the group's fence tag).
    tag = labeler.prompts.group_tag(ctx, responses)
    task = labeler.task("tiny")
    prompts = {}
    q = [[0.5] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(3):
            if i != j:
                r = labeler.prompts.pairwise(task, ctx, responses[i], responses[j], tag=tag)
                prompts[i, j] = r.prompt_token_ids
                q[i][j] = reference_distribution(engine, r.prompt_token_ids, r.labels)["1"]
    for i in range(3):
        for j in range(3):
            if i != j:
                assert got.p_win[i][j] == pytest.approx((q[i][j] + 1 - q[j][i]) / 2, abs=TOL)
    ref = scoring.group_rewards(q)
    assert got.rewards == pytest.approx(ref.rewards, abs=2 * TOL)
    assert sum(got.rewards) == pytest.approx(0.0, abs=1e-9)
    agree = [(q[i][j] - 0.5) * (q[j][i] - 0.5) < 0 for i, j in ((0, 1), (0, 2), (1, 2))]
    assert got.consistency == pytest.approx(sum(agree) / 3)

    # The layout shares the context across the group, and each first response across its
    # comparisons: all prompts agree up to the first response, those showing i first up to
    # the second one (give or take the token that straddles the boundary).
    def common(x, y):
        return next(n for n, (s, t) in enumerate(zip(x, y, strict=False)) if s != t)

    def tokens_before(text, marker):
        return len(engine.tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]) - 1

    for (i, j), ids in prompts.items():
        text = labeler.prompts.pairwise(task, ctx, responses[i], responses[j], tag=tag).prompt
        for (k, m), other in prompts.items():
            if k != i:
                assert common(ids, other) >= tokens_before(text, "<<<RESPONSE 1")
            elif m != j:
                assert common(ids, other) >= tokens_before(text, "<<<RESPONSE 2")
    # What the engine computed: every distinct prefix once.
    assert given == sum(len(p) for p in prompts.values())
    assert computed == len({p[:n] for p in prompts.values() for n in range(1, len(p) + 1)})


def test_a_group_prompt_differs_from_a_pair_prompt_only_in_its_tag(builder, test_tasks):
    ctx, a, b = "Say hi.", "Hi!", "Go away."
    task = test_tasks.get("tiny")
    g = builder.pairwise(task, ctx, a, b, tag=builder.group_tag(ctx, [a, b, "Hello there."]))
    p = builder.pairwise(task, ctx, a, b)
    tag_g = g.prompt.split("<<<CONTEXT ")[-1].split(">>>")[0]
    tag_p = p.prompt.split("<<<CONTEXT ")[-1].split(">>>")[0]
    assert tag_g != tag_p and g.prompt.replace(tag_g, tag_p) == p.prompt


@pytest_model
def test_chunks_of_one_group_compute_its_shared_prefix_once(labeler, engine):
    """A call split into chunks (max_batch_tokens) computes the prefix consecutive chunks
    share once, and gives the numbers of one unsplit call."""
    from labeler.engines.base import ScoreRequest
    from labeler.engines.transformers_engine import TransformersEngine

    ctx, responses = "Name a fruit.", ["An apple.", "A chair.", "Banana, the yellow fruit."]
    task, tag = labeler.task("tiny"), labeler.prompts.group_tag(ctx, responses)
    rendered = [
        labeler.prompts.pairwise(task, ctx, responses[i], responses[j], tag=tag)
        for i in range(3)
        for j in range(3)
        if i != j
    ]
    queries = scoring.label_queries(rendered[0].labels)
    requests = [ScoreRequest(r.prompt_token_ids, queries) for r in rendered]
    prompts = [r.prompt_token_ids for r in rendered]
    # Two prompts a chunk: the two comparisons that show the same response first.
    budget = 2 * max(len(p) for p in prompts)
    assert 3 * min(len(p) for p in prompts) > budget
    chunked = TransformersEngine.from_objects(
        engine.model, engine.tokenizer, model_id="chunked", max_batch_tokens=budget, min_shared_tokens=1
    )
    got = chunked.score_sync(requests)
    # Against one unsplit call of an engine that packs no leaves (the chunked one packs each
    # chunk's two leaves into one row over the shared base's cache).
    plain = TransformersEngine.from_objects(engine.model, engine.tokenizer, model_id="plain", pack_tokens=0)
    ref = plain.score_sync(requests)
    for g, r in zip(got, ref, strict=True):
        assert g[()] == pytest.approx(r[()], abs=TOL)

    def common(seqs):
        return next(n for n in range(min(map(len, seqs))) if len({s[n] for s in seqs}) > 1)

    def unique(seqs):
        return len({s[:n] for s in seqs for n in range(1, len(s) + 1)})

    shared = common(prompts)  # the preamble and context, up to the first response
    chunks = [prompts[k : k + 2] for k in range(0, 6, 2)]
    expected = shared + sum(unique([p[shared:] for p in c]) for c in chunks)
    assert chunked.stats.computed_tokens == expected
    assert expected < sum(unique(c) for c in chunks)  # what three separate trees would compute


@pytest_model
def test_group_errors_name_the_group_and_response(labeler):
    with pytest.raises(InvalidInput) as exc:
        labeler.group_rewards([GroupItem("c", ["a", "b"]), GroupItem("c", ["only one"])], "tiny")
    assert exc.value.field == "groups[1].responses"
    with pytest.raises(InvalidInput) as exc:
        labeler.group_rewards([{"context": "c", "responses": ["a", 3, "b"]}], "tiny")
    assert exc.value.field == "groups[0].responses[1]"
    with pytest.raises(InvalidInput) as exc:
        labeler.group_rewards([GroupItem("c", "ab")], "tiny")
    assert exc.value.field == "groups[0].responses"
    tag = labeler.prompts.group_tag("c", ["a", "b"])
    with pytest.raises(InvalidInput, match="fence tag"):
        labeler.prompts.pairwise(labeler.task("tiny"), "c", "a " + tag, "b", tag=tag)
