"""The request models: untrusted text with lone surrogates is cleaned, limits still hold."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.protocol import request_models
from service.settings import Settings

MODELS = request_models(Settings(max_chars=8), ["tiny"])
LONE = "a\ud800b\udfff"  # what JSON "a\ud800b\udfff" parses to
CLEAN = "a\ufffdb\ufffd"


@pytest.mark.parametrize(
    ("model", "item", "read"),
    [
        (MODELS.scores, {"context": LONE, "response": LONE}, lambda it: [it.context, it.response]),
        (
            MODELS.judgments,
            {"context": [{"role": "user", "content": LONE}], "response": "r"},
            lambda it: [it.context[0].content],
        ),
        (  # OpenAI content parts: each part's text
            MODELS.scores,
            {"context": [{"role": "user", "content": [{"type": "text", "text": LONE}]}], "response": "r"},
            lambda it: [it.context[0].content],
        ),
        (MODELS.preferences, {"response_a": LONE, "response_b": LONE}, lambda it: [it.response_a, it.response_b]),
        (MODELS.reference_rewards, {"response": "r", "reference": LONE}, lambda it: [it.reference]),
        (MODELS.group_rewards, {"context": LONE, "responses": [LONE, "x"]}, lambda it: [it.context, it.responses[0]]),
        (  # a response as messages, in a group: each turn's text (content parts too)
            MODELS.group_rewards,
            {"responses": ["x", [{"role": "assistant", "content": [{"type": "text", "text": LONE}]}]]},
            lambda it: [it.responses[1][0].content],
        ),
    ],
)
def test_lone_surrogates_become_replacement_characters(model, item, read):
    req = model.model_validate({"task": "tiny", "items": [item]})
    assert read(req.items[0]) == [CLEAN] * len(read(req.items[0]))


def test_texts_without_lone_surrogates_are_kept_as_sent():
    # JSON's escaped surrogate pair is one character, no lone surrogate.
    plain = json.loads('{"context": "é ✓ 😀", "response": "\\ud83d\\ude00"}')
    req = MODELS.scores.model_validate({"task": "tiny", "items": [plain, {"response": LONE}]})
    assert (req.items[0].context, req.items[0].response, req.items[1].response) == ("é ✓ 😀", "😀", CLEAN)


def test_a_key_with_a_lone_surrogate_is_an_unknown_field_or_an_extra_key():
    """A lone surrogate in a key: on a label route an unknown field, named (cleaned) as any
    other; /get_reward takes OpenRLHF's extra keys, this one too."""
    with pytest.raises(ValidationError) as exc:
        MODELS.scores.model_validate({"task": "tiny", "items": [{"response": "r"}], LONE: 1})
    assert [(e["type"], e["loc"]) for e in exc.value.errors()] == [("extra_forbidden", (CLEAN,))]
    with pytest.raises(ValidationError) as exc:
        MODELS.scores.model_validate({"task": "tiny", "items": [{"response": "r", LONE: 1}]})
    assert [(e["type"], e["loc"]) for e in exc.value.errors()] == [("extra_forbidden", ("items", 0, CLEAN))]
    req = MODELS.get_reward.model_validate({"query": [LONE], LONE: 1})
    assert req.query == [CLEAN] and req.model_extra == {CLEAN: 1}


def test_limits_still_hold_for_text_with_lone_surrogates():
    """A cleaned text is measured like any other: over the limit is the length error, at its field."""
    with pytest.raises(ValidationError) as exc:
        MODELS.scores.model_validate({"task": "tiny", "items": [{"response": "ok"}, {"response": "\ud800" * 9}]})
    errors = exc.value.errors()
    # A response is text or messages: the text branch's error, and the messages branch's (not a list).
    assert [(e["type"], e["loc"]) for e in errors] == [
        ("string_too_long", ("items", 1, "response", "constrained-str")),
        ("list_type", ("items", 1, "response", "list[ChatMessageIn]")),
    ]
    assert errors[0]["input"] == "\ufffd" * 9
    # Other errors of a request are reported with the cleaned texts, not hidden by them.
    with pytest.raises(ValidationError) as exc:
        MODELS.scores.model_validate({"task": "tiny", "samples": 0, "items": [{"response": LONE}]})
    assert [e["loc"] for e in exc.value.errors()] == [("samples",)]


def test_deeply_nested_bodies_with_lone_surrogates_are_refused_not_crashed():
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValidationError) as exc:
        MODELS.scores.model_validate({"task": "tiny", "items": [{"context": LONE, "response": deep}]})
    assert {e["loc"][:3] for e in exc.value.errors()} == {("items", 0, "response")}


def test_the_published_schema_says_what_each_route_accepts(tmp_path):
    """/v1/judgments lists only the tasks that ask a yes/no question (another is refused); the
    group route states its per-request comparisons limit, /get_reward its texts' length."""
    from service.app import create_app

    (tmp_path / "noq.toml").write_text('description = "No question."\npreamble = "Judge."\n')
    settings = Settings(tasks_dir=str(tmp_path), max_chars=100, max_queue_items=500)
    schemas = create_app(settings).openapi()["components"]["schemas"]
    assert "noq" in schemas["ScoresRequest"]["properties"]["task"]["enum"]
    judged = schemas["JudgmentsRequest"]["properties"]["task"]["enum"]
    assert "noq" not in judged and "general" in judged
    assert "at most 500 in all per request" in schemas["GroupRewardsRequest"]["properties"]["items"]["description"]
    reward = schemas["GetRewardRequest"]["properties"]
    for field in ("query", "prompts", "labels"):
        assert "at most 100 characters" in reward[field]["description"], field
