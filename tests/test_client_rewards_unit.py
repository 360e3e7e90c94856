"""The client's judgments and pairwise rewards on the fake transport (labeler_client.testing):
wire types against the server's, batching and order, the TRL reward functions' reading of
TRL's batch (reference column, groups from repeated prompts). No model, no network."""

from __future__ import annotations

import asyncio
import json
import math
import pickle

import httpx
import labeler_client as lc
import pytest
from labeler_client.testing import FakeLabeler, fake_reward
from labeler_client.trl import (
    PairwiseJudge,
    async_reward_function,
    find_groups,
    group_reward_function,
    reference_reward_function,
    reward_function,
)

from service.protocol import (
    GroupRewardsOut,
    GroupRewardsResponse,
    JudgmentOut,
    JudgmentsResponse,
    ReferenceRewardOut,
    ReferenceRewardsResponse,
    TaskInfo,
)

URL = "http://labeler.test"
NO_WAIT = lc.Retry(max_retries=3, backoff=0.0)


def client_for(fake: FakeLabeler, **kw) -> lc.Client:
    return lc.Client(URL, transport=fake.transport(), **{"retry": NO_WAIT, **kw})


def win(ctx: str, a: str, b: str) -> float:
    return 1 / (1 + math.exp(-4 * (fake_reward(ctx, a) - fake_reward(ctx, b))))


def test_wire_types_match_the_server():
    pairs = ((lc.Judgment, JudgmentOut), (lc.ReferenceReward, ReferenceRewardOut), (lc.GroupRewards, GroupRewardsOut))
    for client_model, server_model in (*pairs, (lc.TaskInfo, TaskInfo)):
        assert set(client_model.model_fields) == set(server_model.model_fields), client_model.__name__


def test_fake_answers_the_new_routes_in_the_servers_wire_shapes():
    fake = FakeLabeler()
    cases = [
        ("/v1/judgments", [{"response": "a"}], JudgmentsResponse),
        ("/v1/rewards/reference", [{"response": "a", "reference": "b"}], ReferenceRewardsResponse),
        ("/v1/rewards/group", [{"responses": ["a", "b", "c"]}], GroupRewardsResponse),
    ]
    for path, items, model in cases:
        resp = fake.handle(httpx.Request("POST", URL + path, json={"task": "tiny", "items": items}))
        model.model_validate(resp.json())
    long = FakeLabeler(max_chars=3).handle(
        httpx.Request("POST", URL + "/v1/rewards/group", json={"task": "tiny", "items": [{"responses": ["a", "long"]}]})
    )
    assert long.status_code == 422 and long.json()["error"]["param"] == "items[0].responses[1]"


def test_results_in_input_order_across_batches_sync_and_async():
    fake = FakeLabeler()
    client = client_for(fake, batch_size=2)
    items = [{"context": f"q{i}", "response": f"a{i}", "reference": f"r{i}"} for i in range(5)]
    refs = client.reference_rewards(items, "tiny")
    assert len(fake.requests) == 3  # 5 items, 2 per request
    assert [r.p_win for r in refs] == pytest.approx(
        [win(it["context"], it["response"], it["reference"]) for it in items]
    )
    assert client.rewards_against(
        [it["context"] for it in items], [it["response"] for it in items], [it["reference"] for it in items], "tiny"
    ) == [r.reward for r in refs]
    singles = [{"context": it["context"], "response": it["response"]} for it in items]
    judged = client.judgments(singles, "tiny")
    assert [j.p_yes for j in judged] == pytest.approx([(fake_reward(f"q{i}", f"a{i}") + 1) / 2 for i in range(5)])
    groups = [["x", "y"], ["x", "y", "z"], ["u", "v", "w", "t"]]
    per_group = client.group_relative_rewards(["p0", "p1", "p2"], groups, "tiny")
    for ctx, g, rewards in zip(["p0", "p1", "p2"], groups, per_group, strict=True):
        n = len(g)
        want = [2 * sum(win(ctx, g[i], g[j]) for j in range(n) if j != i) / (n - 1) - 1 for i in range(n)]
        assert rewards == pytest.approx(want) and sum(rewards) == pytest.approx(0.0)

    async def run():
        async with lc.AsyncClient(URL, transport=fake.async_transport(), retry=NO_WAIT, batch_size=2) as ac:
            return (
                await ac.judgments(singles, "tiny"),
                await ac.rewards_against(["q0"], ["a0"], ["r0"], "tiny"),
                await ac.group_relative_rewards(["p0", "p1", "p2"], groups, "tiny"),
            )

    a_judged, a_ref, a_groups = asyncio.run(run())
    assert [j.p_yes for j in a_judged] == [j.p_yes for j in judged]
    assert a_ref == [refs[0].reward] and a_groups == per_group
    with pytest.raises(ValueError, match="3 prompts, 2 completions and 3 references"):
        client.rewards_against(["a", "b", "c"], ["x", "y"], ["r", "s", "t"], "tiny")


def test_on_error_none_leaves_a_failed_group_out():
    fake = FakeLabeler()
    client = client_for(fake, batch_size=1, max_concurrency=1)  # in order: the first request is the first group's
    fake.fail_next(422)  # the first group's request is refused for its content: not retried
    got = client.group_relative_rewards(["p0", "p1"], [["a", "b"], ["c", "d"]], "tiny", on_error="none")
    assert got[0] is None and got[1] == pytest.approx([2 * win("p1", "c", "d") - 1, 2 * win("p1", "d", "c") - 1])


def test_overlong_lowest_beside_on_error_none():
    """With both: an over-long completion gets -1.0 and one the server fails to label gets
    None, the others their rewards, also an over-long one the failure came before; a
    conversational completion over the limit alike."""
    fake = FakeLabeler(max_chars=100)
    fake.fail_item("boom", 500)
    reward = reward_function(URL, "tiny", on_error="none", overlong="lowest", client=client_for(fake))
    prompts = ["a", "b", "c", "d", "e"]
    got = reward(prompts=prompts, completions=["ok", "boom", "x" * 200, "fine", "y" * 200])
    assert got == [fake_reward("a", "ok"), None, -1.0, fake_reward("d", "fine"), -1.0]
    # A conversational completion: a message over the limit is named `items[i].response[m].content`.
    long_message = [{"role": "assistant", "content": "z" * 200}]
    got = reward(prompts=["a", "b"], completions=[[{"role": "assistant", "content": "ok"}], long_message])
    assert got[1] == -1.0 and got[0] is not None


def test_overlong_lowest_beside_on_error_none_after_a_failure_that_names_no_row():
    """A failure that names no row (no answer once the retries are spent) leaves the call to
    on_error="none", which gives an over-long completion None like a failed one: the rows that
    come back None are sent once more with errors raised, so the over-long one still gets
    -1.0, in the sync, async and reference reward functions alike. A failure that lasts (no
    answer meanwhile) leaves every row None without that third round."""
    fake = FakeLabeler(max_chars=12)
    long = "x" * 20
    prompts, completions = ["p"] * 3, ["a", "b", long]
    want = [fake_reward("p", "a"), fake_reward("p", "b"), -1.0]
    once = {"retry": 0}
    fn = reward_function(URL, "tiny", on_error="none", overlong="lowest", transport=fake.transport(), **once)
    fake.fail_next(503)
    assert fn(prompts=prompts, completions=completions) == want
    afn = async_reward_function(
        URL, "tiny", on_error="none", overlong="lowest", transport=fake.async_transport(), **once
    )
    fake.fail_next(503)
    assert asyncio.run(afn(prompts=prompts, completions=completions)) == want
    ref = reference_reward_function(URL, "tiny", on_error="none", overlong="lowest", transport=fake.transport(), **once)
    fake.fail_next(503)
    got = ref(prompts=prompts, completions=completions, reference=["r"] * 3)
    assert got[2] == -1.0 and None not in got
    fake.requests.clear()
    fake.fail_next(503, times=100)  # down for good
    assert fn(prompts=prompts, completions=completions) == [None] * 3
    assert len(fake.requests) == 2  # with errors raised, then as on_error="none"; no answer: nothing rechecked


def test_a_single_string_for_the_prompts_is_refused_not_read_per_character():
    """As `rewards` and `rewards_against` refuse one: "ab" would be two prompts, "a" and "b"."""
    fake = FakeLabeler()
    client = client_for(fake)
    with pytest.raises(TypeError, match="prompts must be a list, not a single string"):
        client.group_relative_rewards("ab", [["x", "y"], ["z", "w"]], task="tiny")
    with pytest.raises(TypeError, match="groups must be a list, not a single string"):
        client.group_relative_rewards(["a", "b"], "xy", task="tiny")
    judge = PairwiseJudge(URL, task="tiny", client=client)
    with pytest.raises(TypeError, match="prompts must be a list, not a single string"):
        judge.judge("ab", [["x", "y"], ["z", "w"]])
    with pytest.raises(TypeError, match="completions must be a list, not a single string"):
        judge.judge(["a", "b"], "xy")
    assert fake.requests == []


def test_find_groups_reads_trls_layout_and_refuses_others():
    assert find_groups(["a", "a", "b", "b"], 2) == [range(0, 2), range(2, 4)]
    msgs = [{"role": "user", "content": "hi"}]
    assert find_groups([msgs, list(msgs), msgs], 3) == [range(0, 3)]  # conversational prompts compare by value
    with pytest.raises(ValueError, match="holds 5 completions, not a multiple of num_generations=2"):
        find_groups(["a"] * 5, 2)
    with pytest.raises(ValueError, match="completion 3 has another prompt than completion 2"):
        find_groups(["a", "a", "b", "c"], 2)


def test_group_reward_function_on_a_grpo_batch():
    fake = FakeLabeler()
    fn = group_reward_function(URL, "tiny", num_generations=3, client=client_for(fake))
    prompts = ["p"] * 3 + ["q"] * 3
    completions = ["a", "b", "c", "d", "e", "f"]
    got = fn(prompts=prompts, completions=completions, completion_ids=[[1]] * 6, trainer_state=None)
    direct = client_for(FakeLabeler()).group_relative_rewards(["p", "q"], [["a", "b", "c"], ["d", "e", "f"]], "tiny")
    assert got == direct[0] + direct[1]
    (request,) = fake.requests
    assert request.url.path == "/v1/rewards/group"  # both groups in one request
    with pytest.raises(ValueError, match="not a multiple of num_generations=3"):
        fn(prompts=prompts[:4], completions=completions[:4])
    with pytest.raises(ValueError, match="num_generations must be an integer from 2 to 32"):
        group_reward_function(URL, "tiny", num_generations=1)
    copy = pickle.loads(pickle.dumps(fn))
    assert copy.num_generations == 3 and copy.__name__ == "labeler_tiny_group"


def test_group_reward_function_refuses_a_group_size_that_divides_the_trainers():
    """Told 2 where the trainer repeats each prompt 4 times, whole groups of 2 are found and
    every reward would be relative to half a group: the first batch is refused. Later
    batches are not checked (a repeated prompt may land twice in a row in a dataset), and
    a copy checks its own first batch."""
    fake = FakeLabeler()
    fn = group_reward_function(URL, "tiny", num_generations=2, client=client_for(fake))
    prompts, completions = ["p"] * 4 + ["q"] * 4, list("abcdefgh")
    with pytest.raises(ValueError, match="repeated 4 times in a row, a multiple of num_generations=2"):
        pickle.loads(pickle.dumps(fn))(prompts=prompts, completions=completions)
    with pytest.raises(ValueError, match="repeated 4 times in a row"):
        fn(prompts=prompts, completions=completions)
    assert fake.requests == []
    assert len(fn(prompts=prompts, completions=completions)) == 8  # the first batch was checked
    fresh = group_reward_function(URL, "tiny", num_generations=2, client=client_for(fake))
    assert len(fresh(prompts=["p", "p", "p", "p", "q", "q"], completions=list("abcdef"))) == 6  # one prompt once


def test_group_reward_function_on_an_evaluation_batch():
    """TRL's evaluation groups by `num_generations_eval`: groups of that size are read when the
    training size does not fit the batch, the larger when both do, and one alone gets 0."""
    for train, evaluation, prompts, sizes in ((4, 2, ["p", "p", "q", "q"], [2, 2]), (4, 8, ["p"] * 8, [8])):
        fake = FakeLabeler()
        fn = group_reward_function(
            URL, "tiny", num_generations=train, num_generations_eval=evaluation, client=client_for(fake)
        )
        completions = [f"c{i}" for i in range(len(prompts))]
        got = fn(prompts=prompts, completions=completions)
        (request,) = fake.requests
        groups = json.loads(request.content)["items"]
        assert [len(g["responses"]) for g in groups] == sizes
        assert sum(got) == pytest.approx(0.0, abs=1e-9) and len(got) == len(prompts)
    # A training batch cut inside a group is the training size's error, not groups of 2.
    cut = group_reward_function(
        URL, "tiny", num_generations=4, num_generations_eval=2, client=client_for(FakeLabeler())
    )
    with pytest.raises(ValueError, match="holds 6 completions, not a multiple of num_generations=4"):
        cut(prompts=["p"] * 4 + ["q"] * 2, completions=list("abcdef"))
    fake = FakeLabeler()
    alone = group_reward_function(URL, "tiny", num_generations=4, num_generations_eval=1, client=client_for(fake))
    assert alone(prompts=["p", "q", "r", "s"], completions=["a", "b", "c", "d"]) == [0.0] * 4
    assert fake.requests == []
    with pytest.raises(ValueError, match="num_generations_eval must be an integer from 1 to 32"):
        group_reward_function(URL, "tiny", num_generations=4, num_generations_eval=0)


def test_reference_reward_function_reads_the_column():
    fake = FakeLabeler()
    fn = reference_reward_function(URL, "tiny", reference_column="sft", client=client_for(fake))
    got = fn(prompts=["p", "q"], completions=["a", "b"], sft=["r", "s"])
    assert got == pytest.approx([2 * win("p", "a", "r") - 1, 2 * win("q", "b", "s") - 1])
    with pytest.raises(KeyError, match="dataset column 'sft', which this batch lacks \\(columns: reference\\)"):
        fn(prompts=["p"], completions=["a"], reference=["r"], trainer_state=None)
    # TRL's GRPO leaves the column "completion" out of the call (it is `completions`' source).
    from_completion = reference_reward_function(URL, "tiny", reference_column="completion", client=client_for(fake))
    with pytest.raises(KeyError, match="'completion', which TRL does not pass to reward functions"):
        from_completion(prompts=["p"], completions=["a"], completion_ids=[[1]], reference=["r"])
    copy = pickle.loads(pickle.dumps(fn))
    assert copy.reference_column == "sft" and copy.__name__ == "labeler_tiny_vs_sft"


def test_reference_reward_function_gives_none_to_a_row_without_a_reference():
    """A None in the reference column gets None (TRL's "no reward for this sample"); only the
    other rows are sent, an error names the row by its place in TRL's batch, and a batch
    without any reference sends nothing."""
    fake = FakeLabeler()
    fn = reference_reward_function(URL, "tiny", client=client_for(fake))
    got = fn(prompts=["p", "q", "s", "t"], completions=["a", "b", "c", "d"], reference=[None, "r", None, "u"])
    assert got[0] is None and got[2] is None
    assert got[1] == pytest.approx(2 * win("q", "b", "r") - 1) and got[3] == pytest.approx(2 * win("t", "d", "u") - 1)
    (request,) = fake.requests
    assert [(it["response"], it["reference"]) for it in json.loads(request.content)["items"]] == [
        ("b", "r"),
        ("d", "u"),
    ]
    assert fn(prompts=["p", "q"], completions=["a", "b"], reference=[None, None]) == [None, None]
    assert len(fake.requests) == 1
    fake.fail_item("bad", 500)
    with pytest.raises(lc.ServerError) as err:
        fn(prompts=["p", "q", "s"], completions=["a", "b", "bad"], reference=[None, "r", "u"])
    assert err.value.item == 2 and err.value.param == "items[2]"


def test_fake_get_reward_against_reference_labels():
    fake = FakeLabeler()
    body = {"query": ["pa", "qb"], "prompts": ["p", "q"], "labels": ["r", "s"]}
    got = fake.handle(httpx.Request("POST", URL + "/get_reward?task=tiny&reward=reference", json=body)).json()
    assert got["rewards"] == pytest.approx([2 * win("p", "a", "r") - 1, 2 * win("q", "b", "s") - 1])
    short = fake.handle(httpx.Request("POST", URL + "/get_reward?reward=reference", json={**body, "labels": ["r"]}))
    assert short.status_code == 422 and short.json()["error"]["param"] == "labels"


def test_a_copy_keeps_the_url_and_key_its_original_read_from_the_environment(monkeypatch):
    """A reward function built where LABELER_URL and LABELER_API_KEY are set, pickled to a
    process without them (a Ray worker): its copy talks to the same server with the same key."""
    monkeypatch.setenv("LABELER_URL", "http://labeler.internal:9000")
    monkeypatch.setenv("LABELER_API_KEY", "key-1")
    data = pickle.dumps(reward_function(task="tiny"))
    monkeypatch.delenv("LABELER_URL")
    monkeypatch.delenv("LABELER_API_KEY")
    copy = pickle.loads(data)
    assert (copy.client.base_url, copy.client.api_key) == ("http://labeler.internal:9000", "key-1")
    explicit = pickle.loads(pickle.dumps(reward_function("http://other:1", "tiny", api_key="key-2")))
    assert (explicit.client.base_url, explicit.client.api_key) == ("http://other:1", "key-2")
