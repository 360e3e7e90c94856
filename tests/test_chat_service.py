"""Through the real server and client: empty responses are labeled on every endpoint and
adapter, and one dialogue gets one reward (one cache entry) whichever shape it came in.

Tolerances against the in-process labeler are 1e-5: a result depends on its batch-mates by
up to ~3e-6 (padding in fp32), and the server batches as it likes. Values that must come
from the same cache entry are compared exactly.
"""

from __future__ import annotations

import re

import httpx
import pytest
from labeler_client import Client
from labeler_client import verl as lc_verl
from labeler_client.trl import PairwiseJudge, reward_function

from labeler import PairItem, ScoreItem
from labeler.chat import render, response_text

pytestmark = pytest.mark.model

TOL = 1e-5  # above the ~3e-6 batch-mate effect
SYSTEM, QUESTION, ANSWER = "Answer in one word.", "What is the capital of France?", "Paris."
DIALOGUE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
CANONICAL = f"System: {SYSTEM}\n\nUser: {QUESTION}"


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_labeler_is_shown_an_empty_response_block(labeler):
    prompt = labeler.render_score("tiny", "Q?", "").prompt
    assert re.search(r"<<<RESPONSE (#\w+)>>>\n\n<<<END RESPONSE \1>>>", prompt), prompt


def test_empty_responses_are_labeled_on_every_endpoint(live_server, labeler):
    ref = labeler.score("Q?", "", "tiny")
    first = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "Q?", "response": ""}]})
    assert first["results"][0]["reward"] == pytest.approx(ref.reward, abs=TOL)
    # whitespace only, or only end-of-turn markers: the same empty response, the same cache entry
    for blank in [" \n\t", "<|im_end|>", "<|eot_id|>\n<|end_of_text|>"]:
        again = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "Q?", "response": blank}]})
        assert again["usage"]["cached"] == 1 and again["results"][0]["reward"] == first["results"][0]["reward"]
    pair = post(
        live_server,
        "/v1/preferences",
        {"task": "tiny", "order": "both", "items": [{"context": "Q?", "response_a": "", "response_b": "Yes."}]},
    )["results"][0]
    want = labeler.preference("Q?", "", "Yes.", "tiny")
    assert pair["p_a"] == pytest.approx(want.p_a, abs=TOL) and pair["p_a_ba"] == pytest.approx(want.p_a_ba, abs=TOL)
    # OpenRLHF: the policy emitted only its end-of-turn token
    got = post(
        live_server,
        "/get_reward?task=tiny",
        {"query": ["<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<|im_end|>"]},
    )
    assert got["rewards"] == [first["results"][0]["reward"]] and got["extra_logs"]["cached"] == [1.0]
    # the client and the adapters
    with Client(live_server.url) as client:
        assert client.rewards(["Q?"], [""], "tiny") == [first["results"][0]["reward"]]
    fn = reward_function(live_server.url, task="tiny")
    assert fn(prompts=["Q?"], completions=[[{"role": "assistant", "content": ""}]]) == [first["results"][0]["reward"]]
    judge = PairwiseJudge(live_server.url, task="tiny")
    assert judge.judge(["Q?"], [["", "Yes."]], return_scores=True)[0] == pytest.approx(want.p_a, abs=TOL)
    assert (
        lc_verl.compute_score("d", "", None, {"prompt": "Q?"}, task="tiny", base_url=live_server.url)
        == (first["results"][0]["reward"])
    )


def test_one_dialogue_one_reward_whatever_the_shape(live_server, labeler):
    """TRL conversational, TRL plain text with template markup, OpenRLHF queries (with and
    without `prompts`), verl's extra_info, and the same dialogue in other templates: one
    canonical transcript, so one cache entry, so one reward."""
    tokenizer = labeler.engine.tokenizer
    chatml_prompt = tokenizer.apply_chat_template(DIALOGUE, tokenize=False, add_generation_prompt=True)
    assert chatml_prompt.startswith("<|im_start|>system")  # SmolLM2's template: ChatML
    ref = labeler.score(CANONICAL, ANSWER, "tiny").reward
    assert render(DIALOGUE) == CANONICAL

    fn = reward_function(live_server.url, task="tiny")
    first = fn(prompts=[DIALOGUE], completions=[[{"role": "assistant", "content": ANSWER}]])[0]
    assert first == pytest.approx(ref, abs=TOL)
    got = {
        "trl-plain-chatml": fn(prompts=[chatml_prompt], completions=[ANSWER])[0],
        "openrlhf-with-prompts": post(
            live_server,
            "/get_reward?task=tiny",
            {"query": [chatml_prompt + ANSWER + "<|im_end|>"], "prompts": [chatml_prompt], "labels": [None]},
        )["rewards"][0],
        "openrlhf-query-only": post(
            live_server, "/get_reward?task=tiny", {"query": [chatml_prompt + ANSWER + "<|im_end|>"]}
        )["rewards"][0],
        "verl-extra-info": lc_verl.compute_score(
            "d", ANSWER, None, {"prompt": DIALOGUE}, task="tiny", base_url=live_server.url
        ),
        "end-marker-left-in": fn(prompts=[DIALOGUE], completions=[ANSWER + "<|end_of_text|>"])[0],
    }
    others = {
        "llama3": (
            f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "llama2": f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{QUESTION} [/INST]",
        "gemma": f"<bos><start_of_turn>system\n{SYSTEM}<end_of_turn>\n<start_of_turn>user\n{QUESTION}<end_of_turn>\n",
        "phi3": f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n",
        "deepseek": f"<｜begin▁of▁sentence｜>{SYSTEM}<｜User｜>{QUESTION}<｜Assistant｜>",
        "hh": f"\n\nSystem: {SYSTEM}\n\nHuman: {QUESTION}\n\nAssistant:",
        "openrlhf-input-template": f"System: {SYSTEM}\nUser: {QUESTION}\nAssistant: ",
        "gpt-oss-harmony": (
            "<|startoftext|><|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Current date: 2026-12-04\n\nReasoning: medium<|end|>"
            f"<|start|>developer<|message|># Instructions\n\n{SYSTEM}\n\n<|end|>"
            f"<|start|>user<|message|>{QUESTION}<|end|><|start|>assistant"
        ),
        # OpenAI-style messages on the raw wire: content parts, and a tool-calling turn's null content
        "openai-parts": [
            {"role": "developer", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        ],
    }
    assert render(others["openai-parts"]) == CANONICAL  # in process too
    for name, prompt in others.items():
        body = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": prompt, "response": ANSWER}]})
        assert body["usage"]["cached"] == 1, name  # the same key as the first request's
        got[name] = body["results"][0]["reward"]
    assert got == {name: first for name in got}


def test_messages_on_the_wire(live_server, labeler):
    ok = post(
        live_server,
        "/v1/preferences",
        {
            "task": "tiny",
            "order": "ab",
            "items": [
                {
                    "context": [{"role": "user", "content": "Q?", "name": "ignored"}],
                    "response_a": "a",
                    "response_b": "b",
                }
            ],
        },
    )["results"][0]
    assert ok["p_a"] == pytest.approx(
        labeler.preferences([PairItem("Q?", "a", "b")], "tiny", order="ab")[0].p_a, abs=TOL
    )
    bad = httpx.post(
        live_server.url + "/v1/scores",
        json={"task": "tiny", "items": [{"context": [{"content": "no role"}], "response": "r"}]},
        timeout=60,
    )
    assert bad.status_code == 422 and "items" in bad.json()["error"]["param"]


def test_tool_call_arguments_nested_too_deep_to_write_are_refused_by_name(make_server):
    """Arguments nested about as deep as the body parser reads, which at some depths (a few,
    set by the stack) is deeper than json.dumps writes: refused naming the message, never a
    500. (The server's small token limit refuses the other depths before the engine runs.)"""
    srv = make_server(max_item_tokens=50)
    message = '{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": %s}}]}'
    seen = set()
    for depth in range(940, 1000):
        deep = "[" * depth + "1" + "]" * depth
        body = '{"task": "tiny", "items": [{"response": [%s]}]}' % (message % deep)
        r = httpx.post(srv.url + "/v1/scores", content=body, headers={"Content-Type": "application/json"}, timeout=60)
        error = r.json()["error"]
        if "nested too deep" in error["message"]:
            assert error["param"] == "items[0].response[0].tool_calls", error
        seen.add((r.status_code, error["param"]))
    assert seen <= {(422, "items[0]"), (422, "body"), (422, "items[0].response[0].tool_calls")}, seen
    assert (422, "body") in seen and (422, "items[0]") in seen  # deeper than the parser reads; shallow enough


def test_a_tool_calling_completion_is_judged_with_its_calls(live_server, labeler):
    """A completion given as messages (a TRL tool-calling trajectory) is judged as the text the
    service reads it as (`response_text`): the same reward and cache entry as that text, from
    the HTTP API and from TRL's reward function alike, on score and group routes; a malformed
    call is a 422 naming it; the schema documents calls."""
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    trajectory = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    text = response_text(trajectory)
    assert text.startswith("[call functions.add]") and "Tool: 4" in text
    first = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": trajectory}]})
    assert first["results"][0]["reward"] == pytest.approx(labeler.score("2+2?", text, "tiny").reward, abs=TOL)
    again = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": text}]})
    assert again["usage"]["cached"] == 1 and again["results"][0]["reward"] == first["results"][0]["reward"]
    assert reward_function(live_server.url, task="tiny")(prompts=["2+2?"], completions=[trajectory]) == [
        first["results"][0]["reward"]
    ]
    groups = [{"task": "tiny", "items": [{"context": "2+2?", "responses": [r, "4"]}]} for r in (trajectory, text)]
    by_messages, by_text = (post(live_server, "/v1/rewards/group", g) for g in groups)
    assert by_text["usage"]["cached"] == 1 and by_text["results"] == [{**by_messages["results"][0], "cached": True}]
    bad = httpx.post(
        live_server.url + "/v1/scores",
        json={"task": "tiny", "items": [{"response": [{"role": "assistant", "tool_calls": ["add(2, 2)"]}]}]},
        timeout=60,
    )
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "items[0].response[0].tool_calls[0]"
    # A call the labeler cannot show (no function name) is left out, not refused.
    odd = [{"role": "assistant", "content": "Four.", "tool_calls": [{"id": "c2", "function": {"arguments": "{}"}}]}]
    plain = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": "Four."}]})
    got = post(live_server, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": odd}]})
    assert got["usage"]["cached"] == 1 and got["results"][0]["reward"] == plain["results"][0]["reward"]
    schemas = httpx.get(live_server.url + "/openapi.json", timeout=60).json()["components"]["schemas"]
    assert "tool_calls" in schemas["ChatMessageIn"]["properties"]


def test_reasoning_kept_apart_is_judged_as_the_same_turn_as_text(make_server, labeler):
    """A reasoning model's answer as a message with its reasoning kept apart (vLLM's
    `reasoning_content`; `thinking`, as TRL parses some models' responses) is judged, and
    cached, as the same answer written as text with its <think> block: from the HTTP API and
    through TRL's reward function. The reasoning is held to `max_chars`, named."""
    srv = make_server(max_chars=200)
    thought, answer = "2+2 is 4... but I will say 5.", "The answer is 5."
    as_text = f"<think>\n{thought}\n</think>\n\n{answer}"
    first = post(srv, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": as_text}]})
    assert first["results"][0]["reward"] == pytest.approx(labeler.score("2+2?", as_text, "tiny").reward, abs=TOL)
    for key in ("reasoning_content", "thinking"):
        message = [{"role": "assistant", "content": answer, key: thought}]
        got = post(srv, "/v1/scores", {"task": "tiny", "items": [{"context": "2+2?", "response": message}]})
        assert got["usage"]["cached"] == 1 and got["results"][0]["reward"] == first["results"][0]["reward"]
        assert reward_function(srv.url, task="tiny")(prompts=["2+2?"], completions=[message]) == [
            first["results"][0]["reward"]
        ]
    too_long = [{"role": "assistant", "content": answer, "reasoning_content": "x" * 201}]
    bad = httpx.post(srv.url + "/v1/scores", json={"task": "tiny", "items": [{"response": too_long}]}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "items[0].response[0].reasoning_content"


def test_end_markers_are_a_setting(make_server, labeler):
    srv = make_server(end_markers=["[STOP]"])
    body = post(
        srv,
        "/v1/scores",
        {
            "task": "tiny",
            "cache": False,
            "items": [{"context": "Q?", "response": r} for r in ("Yes.[STOP]", "Yes.<|im_end|>")],
        },
    )
    want = labeler.scores([ScoreItem("Q?", "Yes."), ScoreItem("Q?", "Yes.<|im_end|>")], "tiny")
    for got, ref in zip(body["results"], want, strict=True):
        assert got["reward"] == pytest.approx(ref.reward, abs=TOL)


def test_a_prompt_a_template_laid_out_is_held_to_the_limit_per_message(make_server, labeler):
    """OpenRLHF sends its prompts: one a chat template laid out is held to `max_chars` per
    message, as the same context given as messages is, not with its markup as one text; a
    message over the limit is named in the prompt."""
    srv = make_server(max_chars=60)
    system, question = "S" * 40, "Q" * 40
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    query = prompt + "Paris.<|im_end|>"
    got = post(srv, "/get_reward?task=tiny", {"query": [query], "prompts": [prompt]})
    dialogue = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    want = labeler.scores([ScoreItem(render(dialogue), "Paris.")], "tiny")[0]
    assert got["rewards"][0] == pytest.approx(want.reward, abs=TOL)
    long = prompt.replace(question, "Q" * 61)
    r = httpx.post(srv.url + "/get_reward?task=tiny", json={"query": [long + "Paris."], "prompts": [long]}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompts[0][1].content", r.text
