"""Yes/no judgments and pairwise rewards (against a reference, group-relative) over HTTP: the real
app under uvicorn on loopback, the real model, through the real client and the TRL reward
functions. Results equal the in-process labeler's; a repeat is a cache hit; bad input is a 4xx
naming the field."""

from __future__ import annotations

import asyncio

import httpx
import labeler_client as lc
import pytest
from labeler_client.trl import (
    async_reward_function,
    group_reward_function,
    reference_reward_function,
    reward_function,
)

from labeler import GroupItem, ReferenceItem, ScoreItem
from service.protocol import GroupRewardsResponse, JudgmentsResponse, ReferenceRewardsResponse
from tests.fixtures.load import error_shape_ok, metric

pytestmark = pytest.mark.model
# A result moves with its engine batch-mates by a few 1e-6 (fp32 padding).
TOL = 1e-4


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120)


def assert_error(resp: httpx.Response, status: int, param: str) -> dict:
    assert resp.status_code == status, resp.text
    assert error_shape_ok(resp.json(), status), resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    return err


def test_judgments_equal_the_labeler_and_repeat_from_the_cache(live_server, labeler):
    items = [{"context": "2+2?", "response": "4"}, {"context": "Is the sky green?", "response": ""}]
    before = metric(live_server.url, "labeler_items_total")
    with lc.Client(live_server.url) as client:
        first = client.judgments(items, "tiny")
        again = client.judgments(items, "tiny")
    ref = labeler.judgments([ScoreItem(**it) for it in items], "tiny")
    for got, want in zip(first, ref, strict=True):
        assert isinstance(got, lc.Judgment) and got.cached is False
        assert got.p_yes == pytest.approx(want.p_yes, abs=TOL) and got.p_no == pytest.approx(want.p_no, abs=TOL)
        assert got.label_mass == pytest.approx(want.label_mass, abs=TOL)
    assert all(a.cached for a in again)
    assert [a.p_yes for a in again] == [f.p_yes for f in first]  # the cached values, exactly
    assert metric(live_server.url, "labeler_items_total") == before + 4
    raw = post(live_server, "/v1/judgments", {"task": "tiny", "items": items[:1]}).json()
    JudgmentsResponse.model_validate(raw)
    assert raw["usage"] == {"items": 1, "cached": 1, "computed": 0, "shared": 0}


def test_reference_rewards_equal_the_labeler_both_orders_and_one(live_server, labeler):
    items = [
        {"context": "Name a fruit.", "response": "A chair.", "reference": "An apple."},
        {"context": "2+2?", "response": "4", "reference": "5"},
    ]
    ref = labeler.reference_rewards([ReferenceItem(**it) for it in items], "tiny")
    with lc.Client(live_server.url) as client:
        got = client.reference_rewards(items, "tiny")
        one = client.reference_rewards(items[:1], "tiny", order="ab")[0]
        rewards = client.rewards_against(
            [it["context"] for it in items], [it["response"] for it in items], [it["reference"] for it in items], "tiny"
        )
    for g, w, r in zip(got, ref, rewards, strict=True):
        assert isinstance(g, lc.ReferenceReward) and g.cached is False
        assert g.p_win_ab == pytest.approx(w.p_win_ab, abs=TOL) and g.p_win_ba == pytest.approx(w.p_win_ba, abs=TOL)
        assert g.reward == pytest.approx(w.reward, abs=2 * TOL) and g.consistent == w.consistent
        assert r == g.reward  # the same label, from the cache
    assert one.p_win_ba is None and one.consistent is None and one.p_win == pytest.approx(ref[0].p_win_ab, abs=TOL)
    raw = post(live_server, "/v1/rewards/reference", {"task": "tiny", "items": items}).json()
    ReferenceRewardsResponse.model_validate(raw)
    assert raw["usage"]["cached"] == 2


def test_group_rewards_equal_the_labeler_and_normalize_like_every_response(live_server, labeler):
    groups = [
        {"context": "Name a fruit.", "responses": ["An apple.", "A chair.", "Banana."]},
        {"context": "2+2?", "responses": ["4", "5"]},
    ]
    ref = labeler.group_rewards([GroupItem(g["context"], tuple(g["responses"])) for g in groups], "tiny")
    with lc.Client(live_server.url) as client:
        got = client.group_rewards(groups, "tiny")
        # End-of-turn markers and surrounding space are stripped from each response, as for
        # every response: the same group, the same cache entry.
        marked = [{"context": "Name a fruit.", "responses": ["An apple.<|im_end|>", " A chair. ", "Banana.</s>"]}]
        (hit,) = client.group_rewards(marked, "tiny")
    for g, w in zip(got, ref, strict=True):
        assert isinstance(g, lc.GroupRewards) and g.cached is False
        assert g.rewards == pytest.approx(w.rewards, abs=2 * TOL) and g.win_rate == pytest.approx(w.win_rate, abs=TOL)
        assert sum(g.rewards) == pytest.approx(0.0, abs=1e-9)
        for row, want in zip(g.p_win, w.p_win, strict=True):
            assert row == [None if x is None else pytest.approx(x, abs=TOL) for x in want]
        assert g.consistency == w.consistency
    assert hit.cached and hit.rewards == got[0].rewards
    raw = post(live_server, "/v1/rewards/group", {"task": "tiny", "items": groups}).json()
    GroupRewardsResponse.model_validate(raw)
    assert raw["usage"] == {"items": 2, "cached": 2, "computed": 0, "shared": 0}


def test_a_group_counts_its_comparisons_against_the_queue_and_batches(make_server, labeler):
    """A group of N is N (N - 1) / 2 comparisons for the queue, the engine batches and a
    request: 3 groups of 4 (18) over a queue of 12 are a 422 on `items`, which the client
    answers by sending halves, and each group of 6 comparisons is an engine call of its own
    with batches of 6 (a queue that could not hold a group of `max_group_size` is refused at
    start-up: test_batcher)."""
    srv = make_server(max_queue_items=12, max_items=4, batch_max_items=6, max_group_size=4)
    groups = [
        {"context": f"Name fruit {k}.", "responses": ["An apple.", "A chair.", "Banana.", "Pear."]} for k in range(3)
    ]
    err = assert_error(post(srv, "/v1/rewards/group", {"task": "tiny", "items": groups}), 422, "items")
    assert "3 groups make 18 comparisons, over the limit of 12 per request" in err["message"]
    calls = metric(srv.url, "labeler_engine_batch_items_count")
    with lc.Client(srv.url) as client:
        got = client.group_rewards(groups, "tiny")
    ref = labeler.group_rewards([GroupItem(g["context"], tuple(g["responses"])) for g in groups], "tiny")
    assert [g.rewards for g in got] == [pytest.approx(w.rewards, abs=2 * TOL) for w in ref]
    assert metric(srv.url, "labeler_engine_batch_items_count") - calls == 3


def test_async_client_gives_the_same_labels(live_server):
    items = [{"context": "2+2?", "response": "4"}]
    refs = [{"context": "2+2?", "response": "4", "reference": "5"}]
    groups = [{"context": "2+2?", "responses": ["4", "5"]}]

    async def run():
        async with lc.AsyncClient(live_server.url) as client:
            return (
                await client.judgments(items, "tiny"),
                await client.reference_rewards(refs, "tiny"),
                await client.group_rewards(groups, "tiny"),
                await client.rewards_against(["2+2?"], ["4"], ["5"], "tiny"),
                await client.group_relative_rewards(["2+2?"], [["4", "5"]], "tiny"),
            )

    a_j, a_r, a_g, a_rw, a_grw = asyncio.run(run())
    with lc.Client(live_server.url) as client:
        s_j, s_r = client.judgments(items, "tiny"), client.reference_rewards(refs, "tiny")
        s_g = client.group_rewards(groups, "tiny")
    assert a_j[0].p_yes == s_j[0].p_yes and a_r[0].reward == s_r[0].reward == a_rw[0]
    assert a_g[0].rewards == s_g[0].rewards == a_grw[0]


def test_trl_reward_functions_find_references_and_groups(live_server, labeler):
    prompts = ["Name a fruit."] * 3 + ["2+2?"] * 3
    completions = ["An apple.", "A chair.", "Banana.", "4", "5", "four"]
    group_fn = group_reward_function(live_server.url, "tiny", num_generations=3)
    got = group_fn(prompts=prompts, completions=completions, reference=["x"] * 6, trainer_state=None)
    ref = labeler.group_rewards(
        [GroupItem(prompts[0], tuple(completions[:3])), GroupItem("2+2?", ("4", "5", "four"))], "tiny"
    )
    assert got == pytest.approx([r for g in ref for r in g.rewards], abs=2 * TOL)
    with pytest.raises(ValueError, match="completion 4 has another prompt"):
        group_fn(prompts=prompts[:4] + ["other"] + prompts[5:], completions=completions)
    ref_fn = reference_reward_function(live_server.url, "tiny", reference_column="sft")
    sft = ["An apple."] * 3 + ["4"] * 3
    got = ref_fn(prompts=prompts, completions=completions, sft=sft)
    want = labeler.reference_rewards(
        [ReferenceItem(p, c, r) for p, c, r in zip(prompts, completions, sft, strict=True)], "tiny"
    )
    assert got == pytest.approx([w.reward for w in want], abs=2 * TOL)
    assert ref_fn.__name__ == "labeler_tiny_vs_sft" and group_fn.__name__ == "labeler_tiny_group"


def test_bad_input_is_a_4xx_naming_the_field(live_server):
    long = "x" * (live_server.settings.max_chars + 1)
    cases = [
        ("/v1/judgments", {"task": "tiny", "items": [{"response": "a"}, {"response": long}]}, "items[1].response"),
        ("/v1/judgments", {"task": "nope", "items": [{"response": "a"}]}, "task"),
        ("/v1/rewards/reference", {"task": "tiny", "items": [{"response": "a"}]}, "items[0].reference"),
        (
            "/v1/rewards/reference",
            {"task": "tiny", "order": "x", "items": [{"response": "a", "reference": "b"}]},
            "order",
        ),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": ["only one"]}]}, "items[0].responses"),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": ["a"] * 33}]}, "items[0].responses"),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": ["a", long]}]}, "items[0].responses[1]"),
        ("/v1/rewards/group", {"task": "tiny", "items": [{"responses": "ab"}]}, "items[0].responses"),
    ]
    for path, body, param in cases:
        err = assert_error(post(live_server, path, body), 422, param)
        assert param in err["message"]
    err = assert_error(post(live_server, "/v1/rewards/group", cases[5][1]), 422, "items[0].responses")
    assert err["type"] == "input_too_long" and "32" in err["message"]
    with lc.Client(live_server.url) as client, pytest.raises(lc.InvalidRequest) as exc:
        client.group_rewards([{"responses": ["a", "b"]}, {"responses": ["c"]}], "tiny")
    assert exc.value.param == "items[1].responses"


def test_openapi_declares_the_routes_and_their_limits(live_server):
    spec = httpx.get(live_server.url + "/openapi.json").json()
    assert {"/v1/judgments", "/v1/rewards/reference", "/v1/rewards/group"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    group = schemas["GroupItemIn"]["properties"]["responses"]
    assert (group["minItems"], group["maxItems"]) == (2, 32)
    text, messages = group["items"]["anyOf"]  # each completion: text, or chat messages
    assert text["maxLength"] == live_server.settings.max_chars
    assert messages["items"]["$ref"] == "#/components/schemas/ChatMessageIn"
    assert schemas["JudgmentsRequest"]["properties"]["items"]["maxItems"] == live_server.settings.max_items
    for path in ("/v1/judgments", "/v1/rewards/reference", "/v1/rewards/group"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"422", "413", "429"} <= set(responses)
        # The headers those answers carry: when to try again, how to authenticate.
        assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
        assert "WWW-Authenticate" in responses["401"]["headers"]
    # The largest seed as published (JSON numbers the document writes as floats) is the one
    # the server takes: 2**59 - 1 as a float would read as 2**59, which it refuses.
    seed = schemas["ScoresRequest"]["properties"]["seed"]
    assert (seed["minimum"], seed["exclusiveMaximum"], "maximum" in seed) == (0, 2**59, False)
    item = {"context": "q", "response": "r"}
    assert post(live_server, "/v1/scores", {"task": "tiny", "items": [item], "seed": 2**59 - 1}).status_code == 200
    assert_error(post(live_server, "/v1/scores", {"task": "tiny", "items": [item], "seed": 2**59}), 422, "seed")
    # An unknown task's name, which may be as long as a body, is quoted by its start.
    err = assert_error(post(live_server, "/v1/scores", {"task": "x" * 100_000, "items": [item]}), 422, "task")
    assert err["message"].startswith(f"unknown task {'x' * 80!r}... (100000 characters)") and len(err["message"]) < 300


def test_openrlhf_get_reward_against_reference_labels(live_server, labeler):
    prompts = ["Name a fruit.", "2+2?"]
    responses = ["A chair.", "4"]
    body = {"query": [p + r for p, r in zip(prompts, responses, strict=True)], "prompts": prompts}
    body["labels"] = ["An apple.", "5"]
    got = post(live_server, "/get_reward?task=tiny&reward=reference", body).json()
    want = labeler.reference_rewards(
        [ReferenceItem(p, r, ref) for p, r, ref in zip(prompts, responses, body["labels"], strict=True)], "tiny"
    )
    assert got["rewards"] == pytest.approx([w.reward for w in want], abs=2 * TOL) and got["scores"] == got["rewards"]
    assert got["extra_logs"]["p_win"] == pytest.approx([w.p_win for w in want], abs=TOL)
    assert_error(post(live_server, "/get_reward?task=tiny&reward=reference", {**body, "labels": ["x"]}), 422, "labels")
    bad = {**body, "labels": ["x", 3]}
    assert_error(post(live_server, "/get_reward?task=tiny&reward=reference", bad), 422, "labels[1]")
    long = {**body, "labels": ["x", "y" * (live_server.settings.max_chars + 1)]}
    assert_error(post(live_server, "/get_reward?task=tiny&reward=reference", long), 422, "labels[1]")
    assert_error(post(live_server, "/get_reward?task=tiny&reward=other", body), 422, "reward")
    plain = post(live_server, "/get_reward?task=tiny", body).json()  # labels ignored: the direct score
    assert plain["rewards"] == pytest.approx(
        [labeler.score(p, r, "tiny").reward for p, r in zip(prompts, responses, strict=True)], abs=TOL
    )


def test_openrlhf_get_reward_gives_overlong_queries_the_lowest_reward(make_server, labeler):
    """?overlong=lowest: a query over the character limit or the token limit gets reward -1
    (expected score 1) and is marked in extra_logs; the others get their rewards, as without
    it. The default refuses the request, naming the first query over a limit."""
    srv = make_server(max_chars=60, max_item_tokens=25)
    digits = " ".join("1234567890" * 3)[:59]  # under 60 characters, over 25 tokens
    prompts = ["2+2?", "Name a fruit.", "Name a fruit.", "Name a fruit."]
    responses = ["4", "x" * 80, digits, "A chair."]
    body = {"query": [p + r for p, r in zip(prompts, responses, strict=True)], "prompts": prompts}
    err = assert_error(post(srv, "/get_reward?task=tiny", body), 422, "query[1].response")
    assert "over the limit of 60" in err["message"] and "?overlong=lowest" in err["message"]
    by_tokens = {"query": [body["query"][k] for k in (0, 2)], "prompts": [prompts[k] for k in (0, 2)]}
    err = assert_error(post(srv, "/get_reward?task=tiny", by_tokens), 422, "query[1]")
    assert "over the limit of 25" in err["message"] and "?overlong=lowest" in err["message"]
    # A prompt over the token limit by itself is named as the request names it, as one over
    # the character limit is: prompts[k].
    by_prompt = {"query": ["2+2?4", digits + "4"], "prompts": ["2+2?", digits]}
    err = assert_error(post(srv, "/get_reward?task=tiny", by_prompt), 422, "prompts[1]")
    assert err["message"].startswith("prompts[1]: ")
    # A reference over the token limit by itself is named as the request names it.
    by_ref = {"query": ["2+2?4"], "prompts": ["2+2?"], "labels": [digits]}
    err = assert_error(post(srv, "/get_reward?task=tiny&reward=reference", by_ref), 422, "labels[0]")
    assert err["message"].startswith("labels[0]: ") and "?overlong=lowest" not in err["message"]

    got = post(srv, "/get_reward?task=tiny&overlong=lowest", body).json()
    want = [labeler.score(prompts[k], responses[k], "tiny") for k in (0, 3)]
    assert got["extra_logs"]["overlong"] == [0.0, 1.0, 1.0, 0.0]
    assert got["rewards"][1:3] == [-1.0, -1.0] and got["extra_logs"]["expected_score"][1:3] == [1.0, 1.0]
    assert [got["rewards"][k] for k in (0, 3)] == pytest.approx([w.reward for w in want], abs=TOL)
    assert [got["extra_logs"]["expected_score"][k] for k in (0, 3)] == pytest.approx(
        [w.expected for w in want], abs=TOL
    )
    assert got["scores"] == got["rewards"]

    refs = {**body, "labels": ["4", "An apple.", "An apple.", "An apple."]}
    got = post(srv, "/get_reward?task=tiny&reward=reference&overlong=lowest", refs).json()
    want = labeler.reference_rewards(
        [ReferenceItem(prompts[k], responses[k], refs["labels"][k]) for k in (0, 3)], "tiny"
    )
    assert got["extra_logs"]["overlong"] == [0.0, 1.0, 1.0, 0.0]
    assert got["rewards"][1:3] == [-1.0, -1.0] and got["extra_logs"]["p_win"][1:3] == [0.0, 0.0]
    assert [got["rewards"][k] for k in (0, 3)] == pytest.approx([w.reward for w in want], abs=2 * TOL)

    every = {"query": [body["query"][k] for k in (1, 2)], "prompts": [prompts[k] for k in (1, 2)]}
    got = post(srv, "/get_reward?task=tiny&overlong=lowest", every).json()
    assert got["rewards"] == [-1.0, -1.0] and got["extra_logs"]["overlong"] == [1.0, 1.0]
    # what is not the policy's output stays an error: too many queries, a reference over a limit
    many = {"query": ["q"] * (srv.settings.max_items + 1)}
    assert_error(post(srv, "/get_reward?task=tiny&overlong=lowest", many), 422, "query")
    long_ref = {**refs, "labels": ["4", "A", "A", "y" * 61]}
    assert_error(post(srv, "/get_reward?task=tiny&reward=reference&overlong=lowest", long_ref), 422, "labels[3]")
    # over the token limit by itself, under the character limit: the data's too, not the policy's
    many_tokens = {**refs, "labels": ["4", "A", "A", digits]}
    err = assert_error(
        post(srv, "/get_reward?task=tiny&reward=reference&overlong=lowest", many_tokens), 422, "labels[3]"
    )
    assert err["message"].startswith("labels[3]: ") and "over the limit of 25" in err["message"]
    assert_error(post(srv, "/get_reward?task=tiny&overlong=maybe", body), 422, "overlong")
    # Misspelt, the option would be ignored and the whole request refused for its long query.
    err = assert_error(post(srv, "/get_reward?task=tiny&overlng=lowest", body), 422, "overlng")
    assert err["message"].startswith("unknown query parameter 'overlng'"), err


def test_trl_reward_functions_give_overlong_completions_the_lowest_reward(make_server, labeler):
    """overlong="lowest" on TRL's reward functions, against the real server's limits: a
    completion over the character or the token limit gets -1.0, the others their rewards as
    without it (sync, async, against a reference); by default the call fails naming the
    completion's row, and a prompt or a reference over a limit by itself, the data's, fails it
    either way."""
    srv = make_server(max_chars=60, max_item_tokens=25)
    digits = " ".join("1234567890" * 3)[:59]  # under 60 characters, over 25 tokens
    prompts = ["2+2?", "Name a fruit.", "Name a fruit.", "Name a fruit."]
    completions = ["4", "x" * 80, digits, "A chair."]
    want = [labeler.score(prompts[k], completions[k], "tiny").reward for k in (0, 3)]
    with pytest.raises(lc.InvalidRequest) as refused:
        reward_function(srv.url, "tiny")(prompts=prompts, completions=completions)
    assert (refused.value.param, refused.value.item) == ("items[1].response", 1)

    got = reward_function(srv.url, "tiny", overlong="lowest")(prompts=prompts, completions=completions)
    assert got[1:3] == [-1.0, -1.0] and [got[k] for k in (0, 3)] == pytest.approx(want, abs=TOL)
    async_fn = async_reward_function(srv.url, "tiny", overlong="lowest")
    assert asyncio.run(async_fn(prompts=prompts, completions=completions)) == pytest.approx(got, abs=TOL)
    refs = [None, "An apple.", "An apple.", "An apple."]
    ref_fn = reference_reward_function(srv.url, "tiny", overlong="lowest")
    got_refs = ref_fn(prompts=prompts, completions=completions, reference=refs)
    want_ref = labeler.reference_rewards([ReferenceItem(prompts[3], completions[3], refs[3])], "tiny")[0].reward
    assert got_refs[:3] == [None, -1.0, -1.0] and got_refs[3] == pytest.approx(want_ref, abs=2 * TOL)

    long_prompt = [*prompts[:3], "y" * 61]
    with pytest.raises(lc.InvalidRequest) as data:
        reward_function(srv.url, "tiny", overlong="lowest")(prompts=long_prompt, completions=completions)
    assert (data.value.param, data.value.item) == ("items[3].context", 3)
    # Over the token limit by themselves, under the character limit: the data's too.
    with pytest.raises(lc.InvalidRequest) as data:
        reward_function(srv.url, "tiny", overlong="lowest")(prompts=[*prompts[:3], digits], completions=completions)
    assert (data.value.param, data.value.item, data.value.type) == ("items[3].context", 3, "input_too_long")
    with pytest.raises(lc.InvalidRequest) as data:
        ref_fn(prompts=prompts, completions=completions, reference=[*refs[:3], digits])
    assert (data.value.param, data.value.item, data.value.type) == ("items[3].reference", 3, "input_too_long")
    with pytest.raises(ValueError, match="overlong"):
        reward_function(srv.url, "tiny", overlong="cut")
    with pytest.raises(ValueError, match="group rewards take no overlong"):
        group_reward_function(srv.url, "tiny", num_generations=2, overlong="lowest")


def test_overlong_lowest_counts_tokens_of_the_queries_to_compute_only(make_server, labeler, monkeypatch):
    """With ?overlong=lowest the item token limit is counted for the queries the cache does
    not answer, after the queue had room for them: a repeat counts only the query set aside
    (never cached), and each query is looked up in the cache once."""
    srv = make_server(max_item_tokens=25)
    digits = " ".join("1234567890" * 3)[:59]  # over 25 tokens
    prompts = ["2+2?", "Name a fruit.", "Name a fruit."]
    body = {"query": [p + r for p, r in zip(prompts, ["4", digits, "A chair."], strict=True)], "prompts": prompts}
    counted: list[int] = []
    text_tokens = labeler.text_tokens
    monkeypatch.setattr(labeler, "text_tokens", lambda items: counted.append(len(items)) or text_tokens(items))
    misses = metric(srv.url, "labeler_cache_misses_total")
    first = post(srv, "/get_reward?task=tiny&overlong=lowest", body).json()
    assert first["extra_logs"]["overlong"] == [0.0, 1.0, 0.0] and first["rewards"][1] == -1.0
    assert counted == [3] and metric(srv.url, "labeler_cache_misses_total") - misses == 3
    again = post(srv, "/get_reward?task=tiny&overlong=lowest", body).json()
    assert again["rewards"] == first["rewards"] and again["extra_logs"]["cached"] == [1.0, 0.0, 1.0]
    assert counted == [3, 1]


def test_overlong_queries_set_aside_leave_the_others_named_by_their_place(labeler, test_tasks):
    """With a query set aside as too long, an error on another query still names that
    query's place in the request, not its place among the queries judged."""
    from labeler import Labeler
    from tests.fixtures.faults import FaultyEngine
    from tests.fixtures.server import LiveServer

    poison = "POISON-7f3a"
    srv = LiveServer(Labeler(FaultyEngine(labeler.engine, poison=poison, exc_type="nan"), test_tasks), max_chars=60)
    srv.start()
    try:
        body = {"query": ["x" * 80, "Name a fruit. Apple.", f"Name a fruit. {poison}"]}
        err = assert_error(post(srv, "/get_reward?task=tiny&overlong=lowest", body), 500, "query[2]")
        assert "zero probability" in err["message"]
    finally:
        srv.stop()


def test_openrlhf_get_reward_answers_an_empty_shard(live_server):
    """OpenRLHF 0.11.0 (not 0.11.2) splits a batch over its reward URLs in equal shards and posts
    the empty ones too (one query, two URLs): an empty answer, not a 422 that costs the
    query's reward."""
    for reward in ("score", "reference"):
        got = post(live_server, f"/get_reward?task=tiny&reward={reward}", {"query": [], "prompts": [], "labels": []})
        assert got.status_code == 200 and got.json()["rewards"] == [] and got.json()["scores"] == []
        assert all(v == [] for v in got.json()["extra_logs"].values())
    assert_error(post(live_server, "/get_reward?task=nope", {"query": []}), 422, "task")
    assert_error(post(live_server, "/get_reward?task=", {"query": []}), 422, "task")  # not the default


def test_verl_reference_score(live_server, labeler):
    from labeler_client import verl

    opts = {"task": "tiny", "base_url": live_server.url}
    extra = {"prompt": "Name a fruit.", "reference": "An apple."}
    got = verl.compute_reference_score("data", "A chair.", None, extra, **opts)
    want = labeler.reference_rewards([ReferenceItem("Name a fruit.", "A chair.", "An apple.")], "tiny")[0].reward
    assert got == pytest.approx(want, abs=2 * TOL)
    # Without extra_info["reference"], verl's ground_truth is the reference.
    assert verl.compute_reference_score("data", "A chair.", "An apple.", {"prompt": "Name a fruit."}, **opts) == got
    # A Parquet column that other rows fill reads None here: the same as absent.
    sparse = {"prompt": "Name a fruit.", "reference": None}
    assert verl.compute_reference_score("data", "A chair.", "An apple.", sparse, **opts) == got
    # A reference given as chat messages (a conversational dataset's answer column): its assistant turns.
    messages = {"prompt": "Name a fruit.", "reference": [{"role": "assistant", "content": "An apple."}]}
    assert verl.compute_reference_score("data", "A chair.", None, messages, **opts) == got
    with pytest.raises(ValueError, match="needs a reference response"):
        verl.compute_reference_score("data", "A chair.", None, {"prompt": "Name a fruit."}, **opts)
