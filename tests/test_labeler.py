"""The Labeler's API on the real model: chain-of-thought, self-consistency, errors."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from labeler import InvalidInput, Labeler, PairItem, ScoreItem, UnknownTask
from labeler.prompts import Rendered
from tests.test_engine_exact import TOL, reference_distribution

pytestmark = pytest.mark.model


def greedy_rationale(labeler, engine, rendered: Rendered) -> str:
    """Independent greedy decode with plain `generate` (no batching, no padding)."""
    ids = torch.tensor([list(rendered.prompt_token_ids)])
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, max_new_tokens=labeler.max_rationale_tokens, do_sample=False)
    text = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return labeler.prompts.cut_rationale(rendered, text)


def test_cot_reads_labels_after_the_greedy_rationale(labeler, engine):
    item = ScoreItem("What is 2+2?", "4")
    got = labeler.scores([item], "tiny", cot=True)[0]
    rendered = labeler.render_score("tiny", item.context, item.response, cot=True)
    rationale = greedy_rationale(labeler, engine, rendered)
    assert got.rationales == [rationale]
    follow = labeler.prompts.after_rationale(rendered, rationale)
    ref = reference_distribution(engine, follow.prompt_token_ids, follow.labels)
    assert got.distribution == pytest.approx([ref[str(i)] for i in range(1, 11)], abs=TOL)


def test_cot_pairwise_both_orders(labeler, engine):
    got = labeler.preferences([PairItem("2+2?", "4", "5")], "tiny", cot=True)[0]
    assert set(got.rationales) == {"ab", "ba"}
    for order, label in (("ab", "1"), ("ba", "2")):
        rendered = labeler.render_pairwise("tiny", "2+2?", "4", "5", order=order, cot=True)
        follow = labeler.prompts.after_rationale(rendered, got.rationales[order][0])
        ref = reference_distribution(engine, follow.prompt_token_ids, follow.labels)[label]
        assert getattr(got, f"p_a_{order}") == pytest.approx(ref, abs=TOL)


def test_self_consistency_averages_the_sampled_rationales(labeler, engine, test_tasks):
    """Rationales long enough to go past the model's copy of the fenced reply, which it
    nearly always starts with: the samples differ, so the average is of two readings."""
    labeler = Labeler(engine, test_tasks, max_rationale_tokens=40)
    item = ScoreItem("Name a color.", "Blue.")
    got = labeler.scores([item], "tiny", cot=True, samples=2, seed=7)[0]
    assert len(got.rationales) == 2 and got.rationales[0] != got.rationales[1]
    rendered = labeler.render_score("tiny", item.context, item.response, cot=True)
    refs = []
    for rationale in got.rationales:
        follow = labeler.prompts.after_rationale(rendered, rationale)
        refs.append(reference_distribution(engine, follow.prompt_token_ids, follow.labels))
    mean = [(refs[0][str(i)] + refs[1][str(i)]) / 2 for i in range(1, 11)]
    assert got.distribution == pytest.approx(mean, abs=TOL)
    # Seeded: the same request draws the same rationales, another seed others.
    again = labeler.scores([item], "tiny", cot=True, samples=2, seed=7)[0]
    assert again.rationales == got.rationales
    other = labeler.scores([item], "tiny", cot=True, samples=2, seed=8)[0]
    assert set(other.rationales).isdisjoint(got.rationales)


def test_empty_batch_makes_no_engine_call(labeler, engine):
    calls = engine.stats.score_calls
    assert labeler.preferences([], "tiny") == [] and labeler.scores([], "tiny") == []
    assert engine.stats.score_calls == calls


def test_one_engine_call_for_many_items(labeler, engine):
    calls = engine.stats.score_calls
    items = [ScoreItem("Hi", f"answer {i}") for i in range(5)]
    assert len(labeler.scores(items, "tiny")) == 5
    assert engine.stats.score_calls == calls + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"order": "abc"}, "order must be"),
        ({"samples": 2}, "needs cot=true"),
        ({"samples": 0, "cot": True}, "samples must be"),
        ({"items": [{"context": "c", "response_a": 1, "response_b": "b"}]}, "must be a string"),
        ({"items": [{"context": "c", "response_a": "a"}]}, "lacks 'response_b'"),
    ],
)
def test_bad_input_raises_typed_errors(labeler, kwargs, match):
    args = {"items": [PairItem("c", "a", "b")], "task": "tiny"} | kwargs
    items, task = args.pop("items"), args.pop("task")
    with pytest.raises((InvalidInput, UnknownTask), match=match):
        labeler.preferences(items, task, **args)


async def test_blocking_api_refuses_to_run_inside_an_event_loop(labeler):
    with pytest.raises(RuntimeError, match="await the a"):
        labeler.score("c", "r", "tiny")
    r = await labeler.ascore("c", "r", "tiny")
    assert -1.0 <= r.reward <= 1.0 and len(r.distribution) == 10


def test_an_item_is_refused_up_front_when_its_answer_would_not_fit_the_context(labeler, monkeypatch):
    """The prompt must leave the model's context room for what the engine adds: the longest
    label ("10" is two tokens), and with chain-of-thought the rationale and the answer prefix
    after it. An item that leaves less is refused while it is prepared, naming it, not in
    the engine after it was queued."""
    from labeler.engines.base import GenerateRequest, ScoreRequest, check_generate_requests, check_score_requests
    from labeler.errors import InputTooLong
    from labeler.scoring import label_queries

    item = ScoreItem("2+2?", "4")
    plain, cot = labeler.spec("score", "tiny"), labeler.spec("score", "tiny", cot=True)
    (r,) = labeler.prepare(plain, [item])[0]
    n = len(r.prompt_token_ids)
    read = [ScoreRequest(r.prompt_token_ids, label_queries(r.labels))]
    check_score_requests(read, n + 2)  # the engine's own rule: the longest label is 2 tokens
    with pytest.raises(InputTooLong, match="exceeds the model's context") as too_long:
        check_score_requests(read, n + 1)
    assert too_long.value.limit == n + 1 and too_long.value.field is None
    monkeypatch.setattr(labeler.engine, "max_model_len", n + 2)
    assert labeler.prepare(plain, [item])[0][0].prompt_token_ids == r.prompt_token_ids
    monkeypatch.setattr(labeler.engine, "max_model_len", n + 1)
    # Rendering holds to the context the engine knows now, as prepare() does.
    with pytest.raises(InputTooLong, match=r"the prompt is \d+ tokens, over the limit of"):
        labeler.render_score("tiny", "2+2?", "4")
    with pytest.raises(InputTooLong, match=r"items\[0\]: the prompt is \d+ tokens") as exc:
        labeler.prepare(plain, [item])
    assert exc.value.field == "items[0]" and exc.value.limit == n - 1

    monkeypatch.setattr(labeler.engine, "max_model_len", 8192)
    (c,) = labeler.prepare(cot, [item])[0]
    tail = len(labeler.engine.tokenizer("\n" + c.answer_prefix, add_special_tokens=False)["input_ids"])
    room = labeler.max_rationale_tokens + tail + 2
    m = len(c.prompt_token_ids)
    rationale = [GenerateRequest(c.prompt_token_ids, labeler.max_rationale_tokens, 0.0, 1, 0)]
    check_generate_requests(rationale, m + room)
    with pytest.raises(InputTooLong, match="new ones exceeds the model's context") as too_long:
        check_generate_requests(rationale, m + labeler.max_rationale_tokens - 1)
    assert too_long.value.limit == m + labeler.max_rationale_tokens - 1
    monkeypatch.setattr(labeler.engine, "max_model_len", m + room)
    assert labeler.prepare(cot, [item])[0][0].prompt_token_ids == c.prompt_token_ids
    monkeypatch.setattr(labeler.engine, "max_model_len", m + room - 1)
    with pytest.raises(InputTooLong, match=r"items\[0\]"):
        labeler.prepare(cot, [item])


def test_an_item_over_a_limit_without_its_responses_names_its_context_or_reference(labeler, monkeypatch):
    """Over the per-item token limit or the model's context also with its responses left
    out, an item is refused naming its text that is the data's (its context, a reference
    reward's reference): the client's reward adapters answer a refusal of the item
    (`items[0]`) or of its response with the lowest reward under overlong="lowest", and
    raise any other. An item that its responses push over names the item, as before."""
    from labeler import ReferenceItem
    from labeler.errors import InputTooLong

    score, ref = labeler.spec("score", "tiny"), labeler.spec("reference", "tiny")
    cases = [
        (score, ScoreItem("word " * 30, "4"), "items[0].context"),
        (score, ScoreItem("2+2?", "word " * 30), "items[0]"),
        (ref, ReferenceItem("2+2?", "4", "word " * 30), "items[0].reference"),
        (ref, ReferenceItem("word " * 8, "4 " * 8, "word " * 8), "items[0]"),  # 24 tokens: 16 without the response
    ]
    for spec, item, field in cases:
        with pytest.raises(InputTooLong) as exc:
            labeler.prepare(spec, [item], max_item_tokens=20)
        assert exc.value.field == field and str(exc.value).startswith(field + ":"), (item, str(exc.value))

    (r,) = labeler.prepare(score, [ScoreItem("2+2?", "4")])[0]
    monkeypatch.setattr(labeler.engine, "max_model_len", len(r.prompt_token_ids) + 12)
    for item, field in ((ScoreItem("2+2? " * 10, "4"), "items[0].context"), (ScoreItem("2+2?", "4 " * 20), "items[0]")):
        with pytest.raises(InputTooLong, match=r"the prompt is \d+ tokens") as exc:
            labeler.prepare(score, [item])
        assert exc.value.field == field and str(exc.value).startswith(field + ":"), (item, str(exc.value))
    with pytest.raises(InputTooLong) as exc:
        labeler.prepare(ref, [ReferenceItem("2+2?", "4", "four " * 20)])
    assert exc.value.field == "items[0].reference", str(exc.value)


async def test_a_closed_transformers_engine_is_unavailable(model_dir):
    """After `aclose` a read or a generation is `EngineUnavailable`, as on the vLLM engines,
    not a TypeError from the dropped model. Closing does not wait for a forward still
    running in a worker thread (a batch cancelled at shutdown), which keeps the model."""
    from labeler.engines.base import GenerateRequest, LabelQuery, ScoreRequest
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.errors import EngineUnavailable

    closed = TransformersEngine(model_dir)
    ids = tuple(closed.tokenizer("2+2=", add_special_tokens=False)["input_ids"])
    assert (await closed.score([ScoreRequest(ids, (LabelQuery((), (16, 17)),))]))[0][()].keys() == {16, 17}
    with closed._lock:  # a forward still running
        await asyncio.wait_for(closed.aclose(), 5)
    assert closed.model is not None
    with pytest.raises(EngineUnavailable, match="closed"):
        await closed.score([ScoreRequest(ids, (LabelQuery((), (16, 17)),))])
    with pytest.raises(EngineUnavailable, match="closed"):
        await closed.generate([GenerateRequest(ids, 4, 0.0, 1, 0)])
    await closed.aclose()  # nothing running: the model is dropped
    assert closed.model is None


async def test_a_call_running_when_the_engine_closes_stops_before_its_next_forward(model_dir, monkeypatch):
    """Closing the engine (Ctrl-C in `labeler label`, a shutdown) while a call runs its
    forwards: the call ends with `EngineUnavailable` before the next one, so the process
    waits for one forward, not for the rest of the call."""
    from labeler.engines.base import LabelQuery, ScoreRequest
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.errors import EngineUnavailable

    engine = TransformersEngine(model_dir, max_batch_tokens=64)
    prompts = engine.tokenizer([f"Item {k}: is 2+2 four?" for k in range(24)], add_special_tokens=False)
    requests = [ScoreRequest(tuple(ids), (LabelQuery((), (16, 17)),)) for ids in prompts["input_ids"]]
    forward, loop = engine._tree_logprobs, asyncio.get_running_loop()
    forwards, closing = 0, False

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        if closing:  # the engine closed from the event loop during the forward
            asyncio.run_coroutine_threadsafe(engine.aclose(), loop).result(timeout=60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_tree_logprobs", counted)
    assert len(await engine.score(requests)) == len(requests)
    whole = forwards
    assert whole >= 3, whole

    forwards, closing = 0, True
    with pytest.raises(EngineUnavailable, match="closed"):
        await engine.score(requests)
    assert forwards == 1, (forwards, whole)


async def test_forwards_wait_in_the_engines_own_queue(engine, monkeypatch):
    """Batches waiting for the model hold no thread of asyncio's default pool, which a Redis
    host-name lookup or the service's start-up needs: with more batches waiting than that
    pool has threads, a call on it still runs. A batch cancelled while it waits never runs."""
    from concurrent.futures import ThreadPoolExecutor

    from labeler.engines.base import LabelQuery, ScoreRequest

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    ids = tuple(engine.tokenizer("2+2=", add_special_tokens=False)["input_ids"])
    request = [ScoreRequest(ids, (LabelQuery((), (16, 17)),))]
    runs: list[int] = []
    score_sync = engine.score_sync
    monkeypatch.setattr(engine, "score_sync", lambda r: runs.append(len(r)) or score_sync(r))
    with engine._lock:  # a forward running
        waiting = [asyncio.ensure_future(engine.score(request)) for _ in range(4)]
        await asyncio.sleep(0)
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: "ran"), 10) == "ran"
        waiting[-1].cancel()
    answers = await asyncio.gather(*waiting[:3])
    assert [a[0][()].keys() for a in answers] == [{16, 17}] * 3
    assert runs == [1, 1, 1]
    assert waiting[-1].cancelled()


async def test_rationales_ignore_the_models_own_generation_defaults(engine, model_dir, tmp_path):
    """A model whose generation_config.json sets generation options (Qwen2.5 ships a repetition
    penalty, top-p and top-k; others beams, truncations or suppressed tokens) generates the
    same rationales as without them: the request decides, as it does on the vLLM engines, so
    one cache key means one rationale."""
    import json

    from labeler.engines.base import GenerateRequest
    from labeler.engines.transformers_engine import TransformersEngine

    chat = [{"role": "user", "content": "Why is the sky blue? Explain."}]
    prompt = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    requests = {t: [GenerateRequest(tuple(prompt), 24, t, n, seed=5)] for t, n in ((0.0, 1), (0.9, 2))}
    plain = {t: await engine.generate(r) for t, r in requests.items()}
    first = engine.tokenizer(plain[0.0][0][0].text, add_special_tokens=False)["input_ids"][0]
    copy = tmp_path / model_dir.name
    copy.mkdir()
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (copy / f.name).symlink_to(f)
    config = json.loads((model_dir / "generation_config.json").read_text())
    defaults = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "top_k": 3, "top_p": 0.5, "min_p": 0.2}
    # The greedy rationale's first token suppressed; beam search; sampling truncations.
    others = {"suppress_tokens": [first], "num_beams": 3, "typical_p": 0.5, "epsilon_cutoff": 0.01}
    (copy / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, **defaults, **others}))
    tuned = TransformersEngine(copy)
    for t, request in requests.items():
        other = await tuned.generate(request)
        assert [g.text for g in other[0]] == [g.text for g in plain[t][0]] and plain[t][0][0].text


@pytest.mark.parametrize("command", ["prefer", "score", "judge"])
def test_one_item_commands_close_their_engine(command, engine, test_tasks, monkeypatch, capsys):
    """`labeler prefer/score/judge` close the engine they built once they have answered (a
    vLLM engine's processes and a remote engine's connections with it)."""
    from labeler import Labeler, cli
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.errors import EngineUnavailable

    own = TransformersEngine.from_objects(engine.model, engine.tokenizer, model_id=engine.model_id)
    monkeypatch.setattr(cli, "build_labeler", lambda args: Labeler(own, test_tasks))
    responses = ["--response-a", "Apple.", "--response-b", "Chair."] if command == "prefer" else ["--response", "4"]
    assert cli.main([command, "--task", "tiny", "--context", "2+2?", *responses, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == engine.model_id
    with pytest.raises(EngineUnavailable, match="closed"):
        own.score_sync([])


def test_a_closed_labeler_is_unavailable(engine, test_tasks):
    """After `close()` the labeler's calls are `EngineUnavailable`, as its engine's are, not
    a RuntimeError from its rendering thread, gone with it."""
    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.errors import EngineUnavailable

    own = TransformersEngine.from_objects(engine.model, engine.tokenizer, model_id=engine.model_id)
    with Labeler(own, test_tasks) as lab:
        assert 1 <= lab.score("2+2?", "4", "tiny").expected <= 10
    with pytest.raises(EngineUnavailable, match="the labeler is closed"):
        lab.score("2+2?", "4", "tiny")
    with pytest.raises(EngineUnavailable, match="the labeler is closed"):
        asyncio.run(lab.apreferences([PairItem("2+2?", "4", "5")], "tiny"))
