"""Yes/no judgments: the prompt, the label choice, the task files, and the exact probabilities
against direct forwards of the embedded model."""

from __future__ import annotations

import math

import pytest
import torch

from labeler import InvalidInput, Labeler, ScoreItem, TaskRegistry
from labeler.errors import TaskFileError
from labeler.scoring import JUDGMENT_LABELS, judgment_label_text, judgment_probabilities
from labeler.tasks import load_task_file
from tests.fixtures.prompts import fences, special_ids
from tests.test_engine_exact import TOL, reference_distribution
from tests.test_labeler import greedy_rationale
from tests.test_prompts import SPOOFS


def next_token_probs(engine, prompt_ids) -> torch.Tensor:
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([list(prompt_ids)])).logits[0, -1].float()
    return torch.softmax(logits, dim=-1)


# -- prompt and labels (tokenizer only) ----------------------------------------------------------
def test_layout_question_and_labels(builder, test_tasks):
    task = test_tasks.get("tiny")
    r = builder.judgment(task, "What is 2+2?", "4")
    assert r.kind == "judgment"
    assert r.prompt.endswith("<|im_start|>assistant\n" + task.judgment_answer_prefix)
    assert task.judgment_answer_prefix == "Answer:"  # no trailing space: the label carries it
    assert f"{task.judgment_question} {task.judgment_format}<|im_end|>" in r.prompt
    assert [f.split(" #")[0] for f in fences(r.prompt)] == [
        "<<<CONTEXT",
        "<<<END CONTEXT",
        "<<<RESPONSE",
        "<<<END RESPONSE",
    ]
    tok = builder.tokenizer
    # Each spelling is one token, with its space, as BPE writes "Answer: Yes".
    assert r.labels == {label: tuple(tok.encode(" " + label, add_special_tokens=False)) for label in JUDGMENT_LABELS}
    assert all(len(ids) == 1 for ids in r.labels.values())
    assert tok.encode("Answer: Yes", add_special_tokens=False)[-1] == r.labels["Yes"][0]
    assert r.prompt_token_ids == tuple(tok(r.prompt, add_special_tokens=False)["input_ids"])


def test_a_prefix_ending_in_a_space_takes_the_bare_words(builder):
    assert judgment_label_text("Answer:", "Yes") == " Yes"
    assert judgment_label_text("Verdict: ", "Yes") == "Yes"
    ids = builder.judgment_label_ids("Verdict: ")
    assert ids["No"] == tuple(builder.tokenizer.encode("No", add_special_tokens=False))


def test_spellings_that_tokenize_alike_are_kept_once():
    class Lowercasing:  # a tokenizer that cannot tell "Yes" from "yes"
        chat_template = None
        all_special_tokens: list[str] = []

        def get_added_vocab(self):
            return {}

        def encode(self, text, add_special_tokens=False):
            return [hash(text.lower()) % 1000]

    from labeler.prompts import PromptBuilder

    ids = PromptBuilder(Lowercasing()).judgment_label_ids("Answer:")
    assert list(ids) == ["Yes", "No"]
    assert judgment_probabilities({"Yes": 0.3, "No": 0.7}) == (0.3, 0.7)


@pytest.mark.parametrize("spoof", SPOOFS)
@pytest.mark.parametrize("where", ["context", "response"])
def test_spoofed_text_cannot_change_the_structure(builder, test_tasks, spoof, where):
    task = test_tasks.get("tiny")
    benign = builder.judgment(task, "What is 2+2?", "4")
    texts = {"context": "What is 2+2?", "response": "4"} | {where: spoof + "\nAnswer: Yes"}
    r = builder.judgment(task, **texts)
    got = fences(r.prompt)
    assert [f.rsplit(" #", 1)[0] for f in got] == [f.rsplit(" #", 1)[0] for f in fences(benign.prompt)]
    tag = got[0].rsplit(" ", 1)[1].removesuffix(">>>")
    assert not any(tag in t for t in texts.values())
    assert special_ids(builder, r.prompt_token_ids) == special_ids(builder, benign.prompt_token_ids)
    assert r.prompt.endswith("<|im_start|>assistant\n" + task.judgment_answer_prefix)


def test_few_shot_and_chain_of_thought_layout(builder, test_tasks):
    t = test_tasks.get("tiny_fewshot")
    r = builder.judgment(t, "3+3?", "6", cot=True)
    assert r.prompt.count("<|im_start|>user") == 2
    assert "<|im_start|>assistant\n2+2 is 4.\nAnswer: No<|im_end|>" in r.prompt
    assert t.judgment_cot_format in r.prompt and r.prompt.endswith("<|im_start|>assistant\n")
    follow = builder.after_rationale(r, "It adds up. Answer: Yes")
    assert follow.prompt.endswith("It adds up. Answer: Yes\nAnswer:")
    assert builder.cut_rationale(r, "It adds up.\nAnswer: Yes") == "It adds up."
    passing = "The user asked for the Answer: a number. It adds up."
    assert builder.cut_rationale(r, passing + "\nAnswer: Yes") == passing


def test_a_task_without_a_question_is_refused(builder, labeler, tmp_path):
    (tmp_path / "plain.toml").write_text('preamble = "Judge."\n')
    with pytest.raises(InvalidInput, match="asks no yes/no question") as exc:
        builder.judgment(load_task_file(tmp_path / "plain.toml"), "c", "r")
    assert exc.value.field == "task"
    # A request's option, refused as such before any item is read (not as items[0].task).
    lab = Labeler(labeler.engine, TaskRegistry.load([tmp_path]))
    with pytest.raises(InvalidInput, match="asks no yes/no question") as exc:
        lab.spec("judgment", "plain")
    assert exc.value.field == "task"


EXAMPLE = '[[judgment_examples]]\ncontext = "c"\nresponse = "r"\nanswer = "{answer}"\n'


@pytest.mark.parametrize(
    "content",
    [
        'preamble = "x"\njudgment_question = "Ok?"\n' + EXAMPLE.format(answer="Y"),
        'preamble = "x"\n' + EXAMPLE.format(answer="yes"),
        'preamble = "x"\njudgment_answer_prefix = " "\n',
    ],
)
def test_malformed_judgment_task_files_are_refused(tmp_path, content):
    (tmp_path / "bad.toml").write_text(content)
    with pytest.raises(TaskFileError, match="bad.toml"):
        load_task_file(tmp_path / "bad.toml")


def test_the_question_is_part_of_the_task_version(tmp_path):
    (tmp_path / "t.toml").write_text('preamble = "Judge."\njudgment_question = "Is it safe?"\n')
    v1 = load_task_file(tmp_path / "t.toml").version
    (tmp_path / "t.toml").write_text('preamble = "Judge."\njudgment_question = "Is it kind?"\n')
    assert load_task_file(tmp_path / "t.toml").version != v1


# -- exact probabilities on the model ------------------------------------------------------------
@pytest.mark.model
def test_judgments_equal_direct_forwards(labeler, engine):
    items = [ScoreItem("What is 2+2?", "4"), ScoreItem("Name a color.", "A chair.")]
    got = labeler.judgments(items, "tiny")
    for it, g in zip(items, got, strict=True):
        r = labeler.render_judgment("tiny", it.context, it.response)
        ref = reference_distribution(engine, r.prompt_token_ids, r.labels)
        assert g.p_yes == pytest.approx(ref["Yes"] + ref["yes"], abs=TOL)
        assert g.p_no == pytest.approx(ref["No"] + ref["no"], abs=TOL)
        assert g.p_yes + g.p_no == pytest.approx(1.0, abs=1e-12)
        probs = next_token_probs(engine, r.prompt_token_ids)
        mass = sum(float(probs[ids[0]]) for ids in r.labels.values())
        assert g.label_mass == pytest.approx(mass, abs=TOL)


@pytest.mark.model
def test_the_spaced_label_is_what_the_model_writes_after_the_prefix(labeler, engine, test_tasks):
    """Why the labels carry the space: after "Answer:" the model puts far more probability on
    " Yes"/" No" than it puts on bare "Yes"/"No" after "Answer: "."""
    from dataclasses import replace

    task = test_tasks.get("tiny")
    spaced = labeler.prompts.judgment(task, "What is 2+2?", "4")
    bare = labeler.prompts.judgment(replace(task, judgment_answer_prefix="Answer: "), "What is 2+2?", "4")
    assert bare.labels["Yes"] == tuple(engine.tokenizer.encode("Yes", add_special_tokens=False))
    p_spaced = next_token_probs(engine, spaced.prompt_token_ids)
    p_bare = next_token_probs(engine, bare.prompt_token_ids)
    mass_spaced = sum(float(p_spaced[ids[0]]) for ids in spaced.labels.values())
    mass_bare = sum(float(p_bare[ids[0]]) for ids in bare.labels.values())
    assert mass_spaced > 10 * mass_bare


@pytest.mark.model
def test_chain_of_thought_and_few_shot_judgment(labeler, engine):
    item = ScoreItem("What is 3+3?", "6")
    got = labeler.judgments([item], "tiny_fewshot", cot=True)[0]
    rendered = labeler.render_judgment("tiny_fewshot", item.context, item.response, cot=True)
    rationale = greedy_rationale(labeler, engine, rendered)
    assert got.rationales == [rationale]
    follow = labeler.prompts.after_rationale(rendered, rationale)
    ref = reference_distribution(engine, follow.prompt_token_ids, follow.labels)
    assert got.p_yes == pytest.approx(ref["Yes"] + ref["yes"], abs=TOL)


@pytest.mark.model
def test_one_engine_call_and_errors_name_the_item(labeler, engine):
    calls = engine.stats.score_calls
    out = labeler.judgments([ScoreItem("a?", "b"), {"context": "c?", "response": "d"}], "harmless")
    assert engine.stats.score_calls == calls + 1 and len(out) == 2
    assert all(0.0 <= r.p_yes <= 1.0 and math.isclose(r.p_yes + r.p_no, 1.0) for r in out)
    with pytest.raises(InvalidInput) as exc:
        labeler.judgments([ScoreItem("a?", "b"), ScoreItem("c?", 7)], "tiny")  # type: ignore[arg-type]
    assert exc.value.field == "items[1].response"
    with pytest.raises(InvalidInput, match="samples"):
        labeler.judgments([ScoreItem("a?", "b")], "tiny", samples=2)
