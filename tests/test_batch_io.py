"""Reading and normalizing pair files, content keys, and the append-only output (no model)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labeler import datasets_io as io
from labeler.batch import Job, JsonlSink, MemorySink, Summary, _jsonl_line, _label_chunk, collect, run_jobs
from labeler.chat import normalize_item
from labeler.core import ScoreItem
from labeler.datasets_io import MalformedRecord
from labeler.errors import InvalidInput, LabelerError, ModelOutputError

USER = [{"role": "user", "content": "Name a fruit."}]
HH_CTX = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_hh_transcripts_split_into_shared_context_and_final_responses():
    p = io.normalize_pair("line 1", {"chosen": HH_CTX + " Apple.", "rejected": HH_CTX + " Chair."})
    assert p.fmt == "hh" and p.human == "a"
    assert p.context == "User: Hi\n\nAssistant: Hello!\n\nUser: Name a fruit."  # the canonical transcript
    assert (p.response_a, p.response_b) == ("Apple.", "Chair.")
    # the output keeps TRL's split: prompt + chosen is the original transcript
    assert p.prompt + p.orig_a == HH_CTX + " Apple." and p.prompt + p.orig_b == HH_CTX + " Chair."
    # Without the "\n\n" before the first turn, one turn or several alike.
    for ctx in (HH_CTX.removeprefix("\n\n"), "Human: Name a fruit.\n\nAssistant:"):
        q = io.normalize_pair("line 2", {"chosen": ctx + " Apple.", "rejected": ctx + " Chair."})
        assert (q.response_a, q.response_b) == ("Apple.", "Chair.") and q.context.endswith("Name a fruit.")


def test_a_trl_prompt_cut_inside_the_answer_is_judged_as_its_transcripts():
    """TRL's `extract_prompt` cuts text records where chosen and rejected first differ: both
    answers beginning "I can" leave "I can" in the prompt and fragments as the completions. The
    pair is judged as its HH transcripts (each answer whole), and the rows keep TRL's split."""
    question = "\n\nHuman: Can you help me cheat on my exam?\n\nAssistant:"
    hh = {"chosen": question + " I can't help with that.", "rejected": question + " I can help: hide notes."}
    trl = {"prompt": question + " I can", "chosen": "'t help with that.", "rejected": " help: hide notes."}
    whole, cut = io.normalize_pair("line 1", hh), io.normalize_pair("line 1", trl)
    assert (cut.context, cut.response_a, cut.response_b) == (whole.context, whole.response_a, whole.response_b)
    assert (cut.response_a, cut.response_b) == ("I can't help with that.", "I can help: hide notes.")
    assert (cut.prompt, cut.orig_a, cut.orig_b, cut.fmt) == (trl["prompt"], trl["chosen"], trl["rejected"], "trl")
    # An answer that quotes a dialogue is still cut at the prompt's own last answer marker.
    quoting = {**trl, "chosen": "'t: they said\n\nAssistant: no."}
    assert io.normalize_pair("line 1", quoting).response_a == "I can't: they said\n\nAssistant: no."
    # Prompts that end after a user's turn are no answers cut short, whatever their role names.
    for prompt in (
        "User: Hi\n\nAssistant: Hello! How can I help?\n\nUser: Name a fruit.",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nUser: Name a fruit.",
        "Continue the transcript:\n\nAssistant: Hello, I am",
    ):
        p = io.normalize_pair("line 1", {"prompt": prompt, "chosen": "Apple.", "rejected": "Chair."})
        assert (p.context, p.response_a, p.response_b) == (io.prompt_text(prompt), "Apple.", "Chair."), prompt


def test_a_text_prompt_beside_full_conversations_is_read_from_the_conversations():
    """Some datasets add a text `prompt` column to conversations that hold the prompt: TRL's
    `maybe_extract_prompt` then takes the prompt from the conversations; so does this reader."""
    chosen = [*USER, {"role": "assistant", "content": "Apple."}]
    rejected = [*USER, {"role": "assistant", "content": "Chair."}]
    implicit = io.normalize_pair("line 1", {"chosen": chosen, "rejected": rejected})
    given = io.normalize_pair("line 1", {"prompt": "Name a fruit.", "chosen": chosen, "rejected": rejected})
    assert given == implicit and (given.context, given.response_a, given.response_b) == (
        "Name a fruit.",
        "Apple.",
        "Chair.",
    )
    # Completions alone (a shared first tool step, no user turn): the text prompt is the context.
    step = {"role": "assistant", "content": "Let me check."}
    done = io.normalize_pair(
        "line 1",
        {
            "prompt": "Weather in Paris?",
            "chosen": [step, {"role": "assistant", "content": "Sunny."}],
            "rejected": [step],
        },
    )
    assert done.context == "Weather in Paris?" and done.response_a == "Let me check.\n\nSunny."


def test_hh_with_different_contexts_is_malformed():
    other = HH_CTX.replace("Hi", "Hey")
    with pytest.raises(io.MalformedRecord, match="line 4: the chosen and rejected transcripts differ"):
        io.normalize_pair("line 4", {"chosen": HH_CTX + " A.", "rejected": other + " B."})
    with pytest.raises(io.MalformedRecord, match="HH-RLHF"):
        io.normalize_pair("line 2", {"chosen": "just text", "rejected": "more text"})


def test_hh_transcript_ending_with_a_human_turn_is_malformed():
    """After the last Assistant turn a Human turn: split there, it would be judged as part of
    both answers."""
    end = "\n\nHuman: Thanks!"
    for chosen, rejected in ((HH_CTX + " A." + end, HH_CTX + " B." + end), (HH_CTX + " A." + end, HH_CTX + " B.")):
        with pytest.raises(io.MalformedRecord, match="line 3: HH transcript ends with a Human turn"):
            io.normalize_pair("line 3", {"chosen": chosen, "rejected": rejected})


def test_a_prompt_under_another_name_is_malformed_not_dropped():
    """A record with keys the formats do not read and no prompt under either name holds its
    prompt elsewhere ("question"): refused, naming those keys, rather than judged without it.
    A record with nothing else reads as one without a prompt, as the service's default."""
    for norm, rec, own in (
        (io.normalize_single, {"question": "2+2?", "completion": "4"}, "prompt"),
        (io.normalize_single, {"instruction": "2+2?", "response": "4"}, "context"),
        (io.normalize_pair, {"instruction": "2+2?", "response_a": "4", "response_b": "5"}, "context"),
    ):
        with pytest.raises(io.MalformedRecord, match=f"line 9: no '{own}' .*'(question|instruction)'"):
            norm("line 9", rec)
    assert io.normalize_single("l", {"id": 3, "completion": "4"}).context == ""
    assert io.normalize_single("l", {"prompt": "", "completion": "4", "source": "x"}).context == ""
    assert io.normalize_pair("l", {"response_a": "4", "response_b": "5", "preferred": "a"}).context == ""


def test_trl_text_and_conversational_formats():
    p = io.normalize_pair("l", {"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    assert (p.context, p.response_a, p.response_b, p.fmt, p.human) == ("Q?", "yes", "no", "trl", "a")
    chosen = [{"role": "assistant", "content": "Apple."}]
    rejected = [{"role": "assistant", "content": "Chair."}]
    p = io.normalize_pair("l", {"prompt": USER, "chosen": chosen, "rejected": rejected})
    assert (p.context, p.response_a, p.response_b) == ("Name a fruit.", "Apple.", "Chair.")
    assert p.prompt == USER and p.orig_a == chosen
    # A multi-turn prompt repeated at the head of each completion: the response is the new turns.
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *USER]
    p = io.normalize_pair("l", {"prompt": turns, "chosen": turns + chosen, "rejected": turns + rejected})
    assert (p.response_a, p.response_b, p.orig_a) == ("Apple.", "Chair.", turns + chosen)
    assert p.context == "User: Hi\n\nAssistant: Hello!\n\nUser: Name a fruit."
    # implicit prompt: the shared leading turns
    p = io.normalize_pair("l", {"chosen": USER + chosen, "rejected": USER + rejected})
    assert (p.fmt, p.prompt, p.orig_a, p.orig_b, p.context) == (
        "trl-implicit",
        USER,
        chosen,
        rejected,
        "Name a fruit.",
    )
    with pytest.raises(io.MalformedRecord, match="all be text or all be messages"):
        io.normalize_pair("l", {"prompt": "Q?", "chosen": chosen, "rejected": "no"})


def test_plain_pairs_and_their_optional_human_choice():
    p = io.normalize_pair("l", {"context": "Q?", "response_a": "a1", "response_b": "b1"})
    assert (p.context, p.response_a, p.response_b, p.human, p.fmt) == ("Q?", "a1", "b1", None, "pairs")
    assert io.normalize_pair("l", {"context": "", "response_a": "x", "response_b": "y", "preferred": "b"}).human == "b"
    with pytest.raises(io.MalformedRecord, match="'preferred' must be"):
        io.normalize_pair("l", {"context": "", "response_a": "x", "response_b": "y", "preferred": 1})
    # The error names the field the record has: its context may be called "prompt".
    with pytest.raises(io.MalformedRecord, match="'prompt' must be text"):
        io.normalize_pair("l", {"prompt": USER, "response_a": "x", "response_b": "y"})
    with pytest.raises(io.MalformedRecord, match="'prompt' and 'response' must be text"):
        io.normalize_single("l", {"prompt": USER, "response": "r"})
    with pytest.raises(io.MalformedRecord, match="'context' must be text"):
        io.normalize_pair("l", {"context": USER, "prompt": "p", "response_a": "x", "response_b": "y"})


def test_every_format_gives_the_labeler_the_item_the_service_would_read():
    # A ChatML-laid context and end-of-turn markers: the plain formats are read like the TRL
    # ones and like the service's items, so the rows' keys are the service's cache keys.
    chatml = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    raw = {"context": chatml, "response_a": " Apple.<|im_end|>\n", "response_b": "Chair.<|endoftext|>"}
    want = normalize_item(raw)
    p = io.normalize_pair("l", raw)
    assert (p.context, p.response_a, p.response_b) == (want["context"], want["response_a"], want["response_b"])
    assert (p.context, p.response_a, p.response_b) == ("Name a fruit.", "Apple.", "Chair.")
    assert (p.prompt, p.orig_a, p.orig_b) == (chatml, raw["response_a"], raw["response_b"])  # rows keep the input
    trl = io.normalize_pair("l", {"prompt": chatml, "chosen": raw["response_a"], "rejected": raw["response_b"]})
    assert (trl.context, trl.response_a, trl.response_b) == (p.context, p.response_a, p.response_b)
    s = io.normalize_single("l", {"context": chatml, "response": raw["response_a"]})
    assert (s.context, s.response, s.prompt, s.completion) == ("Name a fruit.", "Apple.", chatml, raw["response_a"])


def test_single_formats():
    s = io.normalize_single("l", {"prompt": USER, "completion": [{"role": "assistant", "content": "Apple."}]})
    assert (s.context, s.response) == ("Name a fruit.", "Apple.")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *USER]
    s = io.normalize_single("l", {"prompt": turns, "completion": [*turns, {"role": "assistant", "content": "Apple."}]})
    assert s.response == "Apple."  # the prompt's turns, repeated at the head of the completion, left out
    # The conversation repeated with no new turn: the policy answered nothing, judged as empty.
    s = io.normalize_single("l", {"prompt": turns, "completion": turns})
    assert (s.context, s.response) == ("User: Hi\n\nAssistant: Hello!\n\nUser: Name a fruit.", "")
    p = io.normalize_pair(
        "l", {"prompt": USER, "chosen": USER, "rejected": USER + [{"role": "assistant", "content": "A."}]}
    )
    assert (p.response_a, p.response_b) == ("", "A.")
    # A tool-calling completion (a null content beside its call), read as the service reads it;
    # a completion that repeats only the prompt's last turn is read from its first assistant turn.
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    calling = [{"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "4"}]
    s = io.normalize_single("l", {"prompt": USER, "completion": [*calling, {"role": "assistant", "content": "4."}]})
    assert s.response == '[call functions.add] {"a": 2, "b": 2}\n\nTool: 4\n\n4.'
    system = [{"role": "system", "content": "Be brief."}]
    answer = [{"role": "assistant", "content": "A."}]
    s = io.normalize_single("l", {"prompt": system + USER, "completion": USER + answer})
    assert s.response == "A."
    # A multi-turn conversation repeated without the prompt's system message: read from after it.
    s = io.normalize_single("l", {"prompt": system + turns, "completion": turns + answer})
    assert (s.context, s.response) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Name a fruit.",
        "A.",
    )
    apple = [{"role": "assistant", "content": "Apple."}]
    p = io.normalize_pair("l", {"prompt": system + turns, "chosen": turns + answer, "rejected": turns + apple})
    assert (p.response_a, p.response_b) == ("A.", "Apple.")
    s = io.normalize_single("l", {"context": "Q?", "response": "A."})
    assert (s.context, s.response, s.prompt, s.completion) == ("Q?", "A.", "Q?", "A.")
    for mixed in ({"context": "Q?", "completion": "A."}, {"prompt": "Q?", "response": "A."}):  # the names mixed
        s = io.normalize_single("l", mixed)
        assert (s.context, s.response, s.prompt, s.completion) == ("Q?", "A.", "Q?", "A.")
    with pytest.raises(io.MalformedRecord, match="expected prompt/completion"):
        io.normalize_single("l", {"text": "x"})
    # A conversation given without a prompt holds it: the turns before its first answer are
    # the context, not dropped (its answer would be judged out of context).
    lock = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Sure."}]
    for rec in ({"completion": lock}, {"prompt": "", "completion": lock}, {"prompt": None, "completion": lock}):
        s = io.normalize_single("l", rec)
        assert (s.context, s.response, s.completion) == ("How do I pick a lock?", "Sure.", lock)
    with pytest.raises(io.MalformedRecord, match="'prompt' must be text"):  # beside text: a missing value
        io.normalize_single("l", {"prompt": None, "completion": "Sure."})
    # A dialogue of several turns: the prompt is up to its last user turn, as the pair formats
    # and the service read it; the tool calls and results after it are the policy's.
    dialogue = [*turns, {"role": "assistant", "content": "Apple."}]
    s = io.normalize_single("l", {"completion": dialogue})
    assert (s.context, s.response) == ("User: Hi\n\nAssistant: Hello!\n\nUser: Name a fruit.", "Apple.")
    s = io.normalize_single("l", {"completion": [*USER, *calling, {"role": "assistant", "content": "4."}]})
    assert (s.context, s.response) == ("Name a fruit.", '[call functions.add] {"a": 2, "b": 2}\n\nTool: 4\n\n4.')


def test_malformed_lines_are_named_and_stop_before_anything(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "Q?", "chosen": "y", "rejected": "n"},
            "",
            '{"prompt": "Q?", "chosen": "y"',
            {"question": "what?"},
            {"prompt": "Q2?", "chosen": "y", "rejected": "n"},
        ],
    )
    with pytest.raises(io.MalformedRecord, match=r"in\.jsonl, line 3: not valid JSON"):
        collect(path, io.normalize_pair)
    summary = Summary()
    pairs = collect(path, io.normalize_pair, skip_invalid=True, summary=summary)
    assert [p.where.rsplit(", ", 1)[1] for p in pairs] == ["line 1", "line 5"]
    assert len(summary.invalid) == 2 and "line 3" in summary.invalid[0] and "line 4" in summary.invalid[1]
    assert "not a known pair format" in summary.invalid[1]


def test_json_that_the_parser_cannot_read_is_a_malformed_record_named_by_its_line(tmp_path):
    """A number of more digits than Python reads (4,300) or nesting too deep for its parser,
    valid JSON both, is a malformed record named by its line (skippable), not a traceback;
    in a JSON array, the file is named."""
    digits = '{"prompt": "Q?", "chosen": "y", "rejected": "n", "score": ' + "9" * 5000 + "}"
    deep = '{"prompt": "Q?", "chosen": ' + "[" * 100_000 + "]" * 100_000 + ', "rejected": "n"}'
    path = write_jsonl(tmp_path / "in.jsonl", [digits, deep, {"prompt": "Q?", "chosen": "y", "rejected": "n"}])
    with pytest.raises(io.MalformedRecord, match=r"in\.jsonl, line 1: JSON that cannot be read \(Exceeds the limit"):
        collect(path, io.normalize_pair)
    summary = Summary()
    pairs = collect(path, io.normalize_pair, skip_invalid=True, summary=summary)
    assert [p.where.rsplit(", ", 1)[1] for p in pairs] == ["line 3"]
    assert len(summary.invalid) == 2 and "line 2: JSON that cannot be read (maximum recursion" in summary.invalid[1]
    array = tmp_path / "in.json"
    array.write_text("[" + deep + "]")
    with pytest.raises(io.MalformedRecord, match=r"in\.json: a JSON array that cannot be read"):
        collect(array, io.normalize_pair)


def test_lines_that_are_not_utf8_are_malformed_records_and_a_bom_is_skipped(tmp_path):
    """A Latin-1 line or a compressed file is named like invalid JSON (and skippable), not a
    decoding traceback; a UTF-8 byte-order mark does not spoil the first record."""
    path = tmp_path / "in.jsonl"
    good = '{"prompt": "Caf\u00e9?", "chosen": "y", "rejected": "n"}\n'
    path.write_bytes("\ufeff".encode() + good.encode() + good.encode("latin-1") + good.encode())
    with pytest.raises(io.MalformedRecord, match=r"in\.jsonl, line 2: not UTF-8 text \(byte 0xe9\)"):
        collect(path, io.normalize_pair)
    summary = Summary()
    pairs = collect(path, io.normalize_pair, skip_invalid=True, summary=summary)
    assert [p.where.rsplit(", ", 1)[1] for p in pairs] == ["line 1", "line 3"] and pairs[0].context == "Caf\u00e9?"
    assert len(summary.invalid) == 1
    # A byte-order mark alone on the first line: a blank line.
    path.write_bytes("\ufeff\n".encode() + good.encode())
    assert [p.where.rsplit(", ", 1)[1] for p in collect(path, io.normalize_pair)] == ["line 2"]
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(good.encode()))
    with pytest.raises(io.MalformedRecord, match="line 1: not UTF-8 text"):
        collect(gz, io.normalize_pair)


def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q?", "chosen": "y", "rejected": "n"}]), path)
    pairs = collect(path, io.normalize_pair)
    assert len(pairs) == 1 and pairs[0].where.endswith("row 1") and pairs[0].response_a == "y"
    upper = tmp_path / "IN.PQ"  # any case, and the short suffix
    upper.write_bytes(path.read_bytes())
    assert [p.response_a for p in collect(upper, io.normalize_pair)] == ["y"]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InvalidInput, match="broken.parquet: not a readable Parquet file"):
        collect(broken, io.normalize_pair)


def test_a_null_prompt_in_a_table_is_a_missing_value_not_an_empty_prompt(tmp_path):
    """A table's null prompt (a missing value in a pandas frame) is refused naming its row, as
    the same record is in JSONL, not read as a record without a prompt whose answer would be
    judged out of context; a row with its prompt under the other name reads as that, and
    other nulls (an Alpaca record's absent input) are left out as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    rows = [
        {"prompt": "Translate: cat", "completion": "chat", "tags": ["fr"]},  # a list column of its own
        {"prompt": None, "completion": "chien", "tags": ["fr"]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(InvalidInput, match=r"in.parquet, row 2: 'prompt' must be text"):
        collect(path, io.normalize_single)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InvalidInput, match=r"in.jsonl, line 2: 'prompt' must be text"):
        collect(jsonl, io.normalize_single)
    mixed = tmp_path / "mixed.parquet"
    rows = [
        {"prompt": "Q?", "context": None, "response_a": None, "response_b": None, "chosen": "y", "rejected": "n"},
        {"prompt": None, "context": "R?", "response_a": "a", "response_b": "b", "chosen": None, "rejected": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), mixed)
    assert [(p.context, p.response_a) for p in collect(mixed, io.normalize_pair)] == [("Q?", "y"), ("R?", "a")]
    # Beside conversations, which hold their prompt (TRL's implicit prompt), a null prompt is no prompt.
    user, answer = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "y"}
    other = {"role": "assistant", "content": "n"}
    rows = [
        {"prompt": [user], "chosen": [answer], "rejected": [other]},
        {"prompt": None, "chosen": [user, answer], "rejected": [user, other]},
    ]
    implicit = tmp_path / "implicit.parquet"
    pq.write_table(pa.Table.from_pylist(rows), implicit)
    assert [(p.context, p.response_a) for p in collect(implicit, io.normalize_pair)] == [("Q?", "y")] * 2
    # The same records as JSON lines read alike; so does a single conversation with a null
    # prompt, whose turns before its answer are its prompt, from either file.
    write_jsonl(tmp_path / "implicit.jsonl", rows)
    assert [(p.context, p.response_a) for p in collect(tmp_path / "implicit.jsonl", io.normalize_pair)] == [
        ("Q?", "y")
    ] * 2
    singles = [{"prompt": None, "completion": [user, answer]}, {"completion": [user, answer]}]
    pq.write_table(pa.Table.from_pylist(singles), tmp_path / "singles.parquet")
    write_jsonl(tmp_path / "singles.jsonl", singles)
    for name in ("singles.parquet", "singles.jsonl"):
        assert [(s.context, s.response) for s in collect(tmp_path / name, io.normalize_single)] == [("Q?", "y")] * 2
    alpaca = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "Name a fruit.", "input": None, "output": "Fig."}]), alpaca)
    assert [s.context for s in collect(alpaca, io.normalize_single)] == ["Name a fruit."]


def test_saved_dataset_directory_with_splits(tmp_path):
    import datasets

    rows = [{"prompt": "Q?", "chosen": "y", "rejected": "n"}, {"prompt": "R?", "chosen": "a", "rejected": "b"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    pairs = collect(tmp_path / "one", io.normalize_pair)
    assert [(p.context, p.response_a, p.response_b) for p in pairs] == [("Q?", "y", "n"), ("R?", "a", "b")]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InvalidInput, match="choose one with --split"):
        list(io.read_records(tmp_path / "dd"))
    assert len(collect(tmp_path / "dd", io.normalize_pair, split="test")) == 1
    # --split where there are no splits is refused, not silently ignored.
    with pytest.raises(InvalidInput, match="saved without splits") as err:
        list(io.read_records(tmp_path / "one", split="test"))
    assert err.value.field == "split"
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(InvalidInput, match="is a file, with no splits"):
        list(io.read_records(jsonl, split="test"))
    # A directory that save_to_disk did not write (a hub snapshot of Parquet files, say).
    (tmp_path / "snapshot").mkdir()
    with pytest.raises(InvalidInput, match="not a dataset saved with save_to_disk"):
        list(io.read_records(tmp_path / "snapshot"))
    # Beside an input with splits (winrate's and harmless's two policies), one without is read whole.
    inputs = [tmp_path / "dd", jsonl]
    assert [io.split_for(p, "test", inputs) for p in inputs] == ["test", None]
    assert io.split_for(jsonl, "test", [jsonl, tmp_path / "one"]) == "test"  # refused where it is read
    assert io.split_for(tmp_path / "dd", None, inputs) is None


def test_a_saved_dataset_whose_messages_are_a_sequence_feature_reads_as_its_messages(tmp_path):
    """`datasets`' older way to declare a column of messages, a `Sequence` of {role,
    content}, gives each row's messages as a dict of lists: read as the messages they are,
    as the same records from JSONL or a list-of-structs column."""
    import datasets

    message = datasets.Sequence({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({"chosen": message, "rejected": message})
    spread = {
        "chosen": [{"role": ["user", "assistant"], "content": ["Q?", "y"]}],
        "rejected": [{"role": ["user", "assistant"], "content": ["Q?", "n"]}],
    }
    ds = datasets.Dataset.from_dict(spread, features=features)
    assert ds[0]["chosen"] == spread["chosen"][0]  # as datasets gives it back
    user = {"role": "user", "content": "Q?"}
    rows = [
        {"chosen": [user, {"role": "assistant", "content": a}], "rejected": [user, {"role": "assistant", "content": b}]}
        for a, b in [("y", "n")]
    ]
    ds.save_to_disk(str(tmp_path / "seq"))
    write_jsonl(tmp_path / "seq.jsonl", rows)
    for path in (tmp_path / "seq", tmp_path / "seq.jsonl"):
        assert [(p.context, p.response_a, p.response_b) for p in collect(path, io.normalize_pair)] == [("Q?", "y", "n")]


def test_saved_dataset_directory_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` sees when it is absent
    with pytest.raises(InvalidInput, match="needs `datasets`"):
        list(io.read_records(tmp_path))


def test_the_position_coin():
    swaps = [io.swap_for_position(f"key{i}", 0) for i in range(400)]
    assert swaps == [io.swap_for_position(f"key{i}", 0) for i in range(400)]
    assert 150 < sum(swaps) < 250
    assert swaps != [io.swap_for_position(f"key{i}", 1) for i in range(400)]


def test_sink_writes_text_cut_inside_a_character_and_reads_it_back(tmp_path):
    """A lone surrogate (a truncated escape in JSON input) has no UTF-8 form: that row goes
    with JSON escapes; the others stay plain UTF-8; every row reads back as written."""
    path = tmp_path / "out.jsonl"
    cut = {"task": "t", "task_version": "v", "model": "m", "key": "a", "text": "hi \ud83d", "other": "caf\u00e9"}
    plain = {"task": "t", "task_version": "v", "model": "m", "key": "b", "text": "caf\u00e9"}
    JsonlSink(path).append([cut, plain])
    lines = path.read_bytes().splitlines()
    assert b"\\ud83d" in lines[0] and "caf\u00e9".encode() in lines[1]
    assert JsonlSink(path).rows == {"a": cut, "b": plain}


def test_a_sink_holds_rows_without_the_input_texts_they_repeat(tmp_path):
    """The texts a row repeats from its input (most of its size) are written, but not held:
    a resumed command reads back only a row's figures."""
    path = tmp_path / "out.jsonl"
    texts = {"prompt": "q", "chosen": "y", "rejected": "n", "completion": "c", "context": "x", "rationales": ["r"]}
    meta = {"task": "t", "task_version": "v", "model": "m", "key": "k"}
    row = {**texts, "response_a": "a", "response_b": "b", "p_a": 0.75, "consistent": True, **meta}
    sink = JsonlSink(path)
    sink.append([row])
    figures = {"p_a": 0.75, "consistent": True, **meta}
    assert sink.rows == {"k": figures} and JsonlSink(path).rows == {"k": figures}
    assert json.loads(path.read_text()) == row


def test_sink_refuses_a_file_of_other_data_without_touching_it(tmp_path):
    """An OUT that is a dataset (or the input itself), whose last line lacks its newline: it
    is refused as it is, not cut to its last newline first; so is a file that is not UTF-8,
    and a dataset with a `key` column of its own."""
    path = tmp_path / "train.jsonl"
    for data in (
        b'{"prompt": "q", "chosen": "a"}\n{"prompt": "r", "chosen": "b"}',
        b'{"prompt": "only one line"}',
        b'{"prompt": "caf\xe9"}\n',
        b'{"prompt": "caf\xe9", "chosen": "a"}',  # one line, no newline, not UTF-8: not a torn row
        b"{'prompt': 'a Python dict, not JSON'}",
        b'{"key": "ex-001", "prompt": "q", "chosen": "a", "rejected": "b"}\n',  # a dataset's own key column
        b'{"key": "ex-001", "task": "qa", "prompt": "q"}\n',
    ):
        path.write_bytes(data)
        with pytest.raises(InvalidInput, match="is not a row of this tool"):
            JsonlSink(path)
        assert path.read_bytes() == data


def test_sink_refuses_the_name_of_standard_output(tmp_path, monkeypatch):
    """ "-" means standard output to most tools; the output is a file a re-run resumes from,
    so it is refused, not written as a file named "-"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match="not standard output") as err:
        JsonlSink("-")
    assert err.value.field == "output" and not (tmp_path / "-").exists()


def test_sink_refuses_a_directory_or_a_file_it_cannot_open_by_name(tmp_path):
    with pytest.raises(InvalidInput, match="is a directory") as err:
        JsonlSink(tmp_path)
    assert err.value.field == "output"
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInput, match="cannot open") as err:
        JsonlSink(tmp_path / "file" / "out.jsonl")  # a file where its folder should be
    assert err.value.field == "output"
    # A file that cannot be created (here in /proc, where no file can), refused when the sink
    # is made, before any model loads; one that can be is not left behind by the check.
    with pytest.raises(InvalidInput, match="cannot open /proc/labeler-out.jsonl") as err:
        JsonlSink(Path("/proc/labeler-out.jsonl"))
    JsonlSink(tmp_path / "new.jsonl")
    assert not (tmp_path / "new.jsonl").exists() and not list(tmp_path.glob(".labeler-probe-*"))


def test_a_failed_write_says_what_to_do_about_it(tmp_path, monkeypatch):
    """A write that fails keeps the rows before it; the message asks for free space only
    where more room would mend it (a full disk), not for any error (a device that cannot sync)."""

    def row(key: str) -> dict:
        return {"task": "t", "task_version": "v", "model": "m", "key": key}

    with pytest.raises(LabelerError, match="cannot write /dev/null: Invalid argument") as err:
        JsonlSink(Path("/dev/null")).append([row("k")])  # fsync of a device: EINVAL
    assert "free space" not in str(err.value)
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    sink.append([row("a")])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LabelerError, match="No space left on device; the rows written before are kept .*: free space"):
        sink.append([row("b")])
    monkeypatch.undo()
    assert "a" in JsonlSink(path).rows


def test_sink_reads_an_output_an_editor_saved_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "out.jsonl"
    JsonlSink(path).append(
        [
            {"task": "t", "task_version": "v", "model": "m", "key": "a", "x": 1},
            {"task": "t", "task_version": "v", "model": "m", "key": "b", "x": 2},
        ]
    )
    rows = path.read_bytes()
    path.write_bytes(b"\xef\xbb\xbf" + rows)
    assert set(JsonlSink(path).rows) == {"a", "b"}
    path.write_bytes(b"\xef\xbb\xbf" + rows.split(b"\n")[0])  # one row, as an editor saves it: no newline
    assert set(JsonlSink(path).rows) == {"a"}
    path.write_bytes(b"\xef\xbb\xbf" + rows + rows[:9])  # a row torn by a killed write after it
    sink = JsonlSink(path)
    assert set(sink.rows) == {"a", "b"} and sink.repaired and path.read_bytes() == b"\xef\xbb\xbf" + rows


FULL_DISK = """
import resource, sys
from pathlib import Path
from labeler.batch import JsonlSink
from labeler.errors import LabelerError
sink = JsonlSink(Path(sys.argv[1]))
sink.append([{"task": "t", "task_version": "v", "model": "m", "key": "a", "x": "first"}])
resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # what a full disk does to the next write
try:
    sink.append([{"task": "t", "task_version": "v", "model": "m", "key": "b", "x": "y" * 1000}])
except LabelerError as exc:
    print(exc)
"""


def test_a_write_the_disk_refuses_stops_with_a_message_and_keeps_the_rows_before(tmp_path):
    """A chunk's write refused by the system (a full disk; here a file-size limit, EFBIG):
    a LabelerError that names the file and says the rows before are kept, not a traceback;
    the row it cut off is dropped when the run resumes."""
    path = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(f"cannot write {path}: File too large; the rows written before are kept")
    sink = JsonlSink(path)
    assert set(sink.rows) == {"a"} and sink.repaired


READ_ONLY = """
import asyncio, json, sys
from pathlib import Path
from labeler.batch import Job, JsonlSink, run_jobs
from labeler.core import ScoreItem
from labeler.errors import InvalidInput

class Refusing:  # no item of a finished file is labeled again
    async def scores(self, items, task, **opts):
        raise AssertionError("labeled again")

params = {"task": "t", "cot": False, "samples": 1, "seed": 0}
meta = {"task": "t", "task_version": "v", "model": "m"}
jobs = [Job(f"k{i}", "", ScoreItem("q", a), lambda r, i=i: r | meta | {"key": f"k{i}"}) for i, a in enumerate("abc")]
for name in sys.argv[1:]:
    sink = JsonlSink(Path(name))
    print(json.dumps([sorted(sink.rows), sink.read_only, sink.repaired]))
    summary = asyncio.run(run_jobs(jobs[:2], Refusing(), sink, "scores", params, progress=False))
    print(json.dumps([summary.skipped, summary.labeled, [r["key"] for r in summary.rows]]))
    try:
        asyncio.run(run_jobs(jobs, Refusing(), sink, "scores", params, progress=False))
    except InvalidInput as exc:
        print(exc.field, exc)

class Labeling:
    async def scores(self, items, task, **opts):
        return [{"reward": 0.25} for _ in items]

# Made writable after it was read (its last row's newline not added then): a run completes
# that row before it appends.
sink = JsonlSink(Path(sys.argv[1]))
Path(sys.argv[1]).chmod(0o644)
asyncio.run(run_jobs(jobs, Labeling(), sink, "scores", params, progress=False))
print(json.dumps([json.loads(line)["key"] for line in Path(sys.argv[1]).read_text().splitlines()]))
"""


def test_a_finished_output_this_process_cannot_write_is_read_as_it_is(tmp_path):
    """A finished OUT on a read-only mount, or not this user's to write (here: its permission
    bits, and root's override of them dropped): read without touching it (a last row without
    its newline kept, a torn one left out), its items skipped, so figures can be computed
    again from it; a run with items not in it is refused, naming the file and the reason.
    One made writable after it was read is repaired before a run appends to it."""
    rows = b"".join(
        _jsonl_line({"task": "t", "task_version": "v", "model": "m", "key": k, "reward": 0.5}) for k in ("k0", "k1")
    )
    files = {
        "no_newline.jsonl": rows[:-1],
        "torn.jsonl": rows + b'{"task": "t", "task_version": "v", "model": "m", "key": "k2", "rew',
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o444)
    as_user = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*as_user, sys.executable, "-c", READ_ONLY, *(str(tmp_path / n) for n in files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for i, name in enumerate(files):
        assert json.loads(lines[3 * i]) == [["k0", "k1"], "Permission denied", False]
        assert json.loads(lines[3 * i + 1]) == [2, 0, ["k0", "k1"]]
        assert lines[3 * i + 2] == (
            f"output {tmp_path / name} cannot be written (Permission denied): 1 of these items are not in it yet; "
            "give an output that can be written"
        )
    assert (tmp_path / "torn.jsonl").read_bytes() == files["torn.jsonl"]
    assert json.loads(lines[6]) == ["k0", "k1", "k2"]


def test_sink_completes_a_whole_last_row_and_cuts_one_torn_inside_a_character(tmp_path):
    path = tmp_path / "out.jsonl"
    meta = {"task": "t", "task_version": "v", "model": "m"}
    JsonlSink(path).append([{"prompt": "a", **meta, "key": "a"}, {"prompt": "caf\u00e9", **meta, "key": "b"}])
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # its newline lost (a hand edit, a concatenation): the row is kept
    sink = JsonlSink(path)
    assert set(sink.rows) == {"a", "b"} and sink.repaired and path.read_bytes() == whole
    path.write_bytes(whole + '{"prompt": "caf\u00e9'.encode()[:-1])  # killed inside "é"
    sink = JsonlSink(path)
    assert set(sink.rows) == {"a", "b"} and sink.repaired and path.read_bytes() == whole


def test_sink_cuts_off_a_torn_last_line_and_refuses_a_corrupt_file(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    sink.append(
        [
            {"task": "t", "task_version": "v", "model": "m", "key": "a", "x": 1},
            {"task": "t", "task_version": "v", "model": "m", "key": "b", "x": 2},
        ]
    )
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"task": "t", "task_version": "v", "model": "m", "key": "c", "x"')  # a run killed mid-write
    sink = JsonlSink(path)
    assert set(sink.rows) == {"a", "b"} and sink.repaired and path.read_bytes() == whole
    sink.append([{"task": "t", "task_version": "v", "model": "m", "key": "c", "x": 3}])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    # Killed right after a row's first byte; blocks of NULs a power loss left (after a torn
    # row, or alone): all cut off.
    for torn in (b"{", b'{"task": "t", "task_version": "v", "model": "m", "key": "c"\x00\x00', b"\x00" * 4096):
        path.write_bytes(whole + torn)
        sink = JsonlSink(path)
        assert set(sink.rows) == {"a", "b"} and sink.repaired and path.read_bytes() == whole, torn
    row = '{"task": "t", "task_version": "v", "model": "m", "key": "%s"}\n'
    path.write_text(row % "a" + "not json\n" + row % "b")
    with pytest.raises(InvalidInput, match="line 2 is not a row"):
        JsonlSink(path)


def test_sink_reopens_rows_whose_texts_hold_unicode_line_separators(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 as they are: a row holding
    # them is still one line, and a second run resumes from it.
    path = tmp_path / "out.jsonl"
    texts = ["one\u2028two", "three\u2029four", "five\x85six", "seven\x0beight"]
    JsonlSink(path).append(
        [{"task": "t", "task_version": "v", "model": "m", "key": str(i), "text": t} for i, t in enumerate(texts)]
    )
    sink = JsonlSink(path)
    assert [sink.rows[str(i)]["text"] for i in range(len(texts))] == texts and not sink.repaired


def test_position_consistency_counts_the_rows_given():
    summary = Summary()
    rows = [{"consistent": True}, {"consistent": False}, {"consistent": None}, {}, {"consistent": False}]
    summary.count_orders(rows)
    assert (summary.both_orders, summary.inconsistent, summary.inconsistent_share) == (3, 2, 2 / 3)
    summary.count_orders(rows[:1] * 3)  # a repeated row counts each time; a recount replaces the last
    assert (summary.both_orders, summary.inconsistent, summary.inconsistent_share) == (3, 0, 0.0)
    summary.count_orders([])
    assert summary.inconsistent_share is None and "position-inconsistent" not in summary.text()


def test_an_errors_reason_drops_the_name_it_leads_with():
    """The field, or the item a field is in; a message led by neither stays whole."""
    assert InvalidInput("items[3].response: too long", field="items[3].response").reason == "too long"
    assert InvalidInput("items[3]: response must be text", field="items[3].response").reason == "response must be text"
    assert InvalidInput("3 items, over the limit of 2", field="items").reason == "3 items, over the limit of 2"


HOLDER = """
import sys
from pathlib import Path
from labeler.batch import JsonlSink
with JsonlSink(sys.argv[1]).writing():
    print("held", flush=True)
    sys.stdin.read()
"""


async def test_a_second_run_into_the_same_output_is_refused_while_the_first_holds_it(tmp_path, capsys):
    """Two runs into one OUT would label the same items and write each row twice: the second
    (another process here) is refused, when its sink opens (`labeler label` before its model
    loads: the model named here does not exist) and when its run starts, with the file
    untouched; once the first ends, a run goes ahead."""
    import subprocess

    from labeler.cli import main

    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"task": "t", "task_version": "v", "model": "m", "key": "k0", "reward": 0.5}) + "\n")
    before = path.read_bytes()
    params = {"task": "t", "cot": False, "samples": 1, "seed": 0}
    jobs = [
        Job(
            f"k{i}",
            f"in.jsonl, line {i + 1}",
            ScoreItem("q", a),
            lambda r, i=i: r | {"task": "t", "task_version": "v", "model": "m", "key": f"k{i}"},
        )
        for i, a in enumerate("ab")
    ]
    opened = JsonlSink(path)  # before the other run starts
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(InvalidInput, match="is being written by another run") as err:
            JsonlSink(path)
        assert err.value.field == "output"
        src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q?", "chosen": "y", "rejected": "n"}])
        argv = ["label", str(src), str(path), "--task", "general", "--model", str(tmp_path / "no-model")]
        assert main(argv) == 2
        assert f"{path} is being written by another run" in capsys.readouterr().err
        backend = _Unlabeling()
        with pytest.raises(InvalidInput, match="is being written by another run"):
            await run_jobs(jobs, backend, opened, "scores", params, progress=False)
        assert backend.requests == [] and path.read_bytes() == before
    finally:
        holder.communicate("")
    summary = await run_jobs(jobs, _Unlabeling(), opened, "scores", params, progress=False)
    assert (summary.labeled, summary.skipped) == (1, 1)
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k0", "k1"]


def test_a_run_into_an_output_another_run_reads_is_refused_as_read(tmp_path):
    """A run reading a finished OUT it cannot write (its lock shared) keeps a run that would
    write it out, which is told that the file is being read (not written) by another run."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(_jsonl_line({"task": "t", "task_version": "v", "model": "m", "key": "k0", "reward": 0.5}))
    path.chmod(0o444)
    as_user = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
    reader = subprocess.Popen(
        [*as_user, sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline() == "held\n"
        path.chmod(0o644)  # writable to the second run, as to the file's owner
        with pytest.raises(InvalidInput, match=f"^{re.escape(str(path))} is being read by another run; wait") as err:
            JsonlSink(path)
        assert err.value.field == "output"
    finally:
        reader.communicate("")
    assert reader.returncode == 0 and JsonlSink(path).rows.keys() == {"k0"}


async def test_a_run_reads_the_rows_written_since_its_output_was_opened(tmp_path):
    """Rows another run appended after this one opened OUT (and before it started) are done:
    not labeled again. A run that writes nothing leaves no file it created."""
    path = tmp_path / "out.jsonl"
    params = {"task": "t", "cot": False, "samples": 1, "seed": 0}
    jobs = [
        Job(
            f"k{i}",
            f"in.jsonl, line {i + 1}",
            ScoreItem("q", a),
            lambda r, i=i: r | {"task": "t", "task_version": "v", "model": "m", "key": f"k{i}"},
        )
        for i, a in enumerate("ab")
    ]
    late, early = JsonlSink(path), JsonlSink(path)
    with pytest.raises(ModelOutputError):
        await run_jobs(jobs[:1], _Refusing(ModelOutputError("no label")), early, "scores", params, progress=False)
    assert not path.exists()
    await run_jobs(jobs[:1], _Unlabeling(), early, "scores", params, progress=False)
    backend = _Unlabeling()
    summary = await run_jobs(jobs, backend, late, "scores", params, progress=False)
    assert backend.requests == [["b"]] and (summary.labeled, summary.skipped) == (1, 1)
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k0", "k1"]


async def test_an_output_named_by_a_link_is_written_where_the_link_points(tmp_path):
    """OUT as a symbolic link to a file not there yet (a run's output linked into place):
    the file is created where the link points, held, written, and removed again by a run
    that writes nothing."""
    params = {"task": "t", "cot": False, "samples": 1, "seed": 0}
    job = Job(
        "k0",
        "in.jsonl, line 1",
        ScoreItem("q", "a"),
        lambda r: r | {"task": "t", "task_version": "v", "model": "m", "key": "k0"},
    )
    (tmp_path / "runs").mkdir()
    link = tmp_path / "out.jsonl"
    link.symlink_to(tmp_path / "runs" / "out.jsonl")
    with pytest.raises(ModelOutputError):
        await run_jobs(
            [job], _Refusing(ModelOutputError("no label")), JsonlSink(link), "scores", params, progress=False
        )
    assert link.is_symlink() and not (tmp_path / "runs" / "out.jsonl").exists()
    summary = await run_jobs([job], _Unlabeling(), JsonlSink(link), "scores", params, progress=False)
    assert summary.labeled == 1 and link.is_symlink()
    assert [json.loads(line)["key"] for line in (tmp_path / "runs" / "out.jsonl").read_text().splitlines()] == ["k0"]


class _Refusing:
    """A backend that refuses every call with `error` (pure logic of the chunk loop)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def scores(self, items, task, **opts):
        raise self.error


async def test_a_refused_record_is_named_by_its_line_and_field_once():
    chunk = [Job(f"k{i}", f"in.jsonl, line {i + 1}", ScoreItem("q", "a"), dict) for i in range(2)]
    cases = [
        (InvalidInput("items[1].response: too long", field="items[1].response"), "line 2: response: too long"),
        (InvalidInput("items[1]: response must be text", field="items[1].response"), "line 2: response must be text"),
    ]
    for error, says in cases:
        with pytest.raises(MalformedRecord) as err:
            await _label_chunk(_Refusing(error), "scores", list(chunk), "t", {}, False, Summary())
        assert str(err.value).endswith(says), str(err.value)
    # The service names no item when the model labeled none of a request's: the chunk's lines,
    # each (a chunk is not a run of lines when resumed or repeated items were left out of it).
    none = ModelOutputError("the model's answer gives no label: zero probability")
    with pytest.raises(ModelOutputError, match=r"^in.jsonl, lines 1, 2: the model labeled none of them"):
        await _label_chunk(_Refusing(none), "scores", list(chunk), "t", {}, True, Summary())
    gaps = [Job(f"k{n}", f"in.jsonl, line {n}", ScoreItem("q", "a"), dict) for n in (3, 7, 900)]
    with pytest.raises(ModelOutputError, match=r"^in.jsonl, lines 3, 7, 900: the model labeled none"):
        await _label_chunk(_Refusing(none), "scores", gaps, "t", {}, True, Summary())


class _Unlabeling:
    """Labels every item but those whose response is "?": names the first of those in a
    request, as the labeler does, and none in a request of those alone, as the service does."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    async def scores(self, items, task, **opts):
        self.requests.append([it.response for it in items])
        bad = [i for i, it in enumerate(items) if it.response == "?"]
        if len(items) > 1 and len(bad) == len(items):
            raise ModelOutputError("the model's answer gives no label")
        if bad:
            raise ModelOutputError(f"items[{bad[0]}]: the model's answer gives no label", field=f"items[{bad[0]}]")
        return [{"reward": 0.5} for _ in items]


async def test_a_resumed_run_labels_past_the_items_it_skipped_before():
    """The items a run set aside as unlabeled come first when it is resumed, together in one
    chunk: labeled one by one and set aside again, so the rest of the input is labeled. A
    run that has labeled nothing yet still ends at such a chunk."""
    params = {"task": "t", "cot": False, "samples": 1, "seed": 0}
    answers = ["?", "?", "a", "b", "c"]
    jobs = [
        Job(
            f"k{i}",
            f"in.jsonl, line {i + 1}",
            ScoreItem("q", a),
            lambda r, i=i: r | {"task": "t", "task_version": "v", "model": "m", "key": f"k{i}"},
        )
        for i, a in enumerate(answers)
    ]
    sink = MemorySink()
    sink.append(
        [{"task": "t", "task_version": "v", "model": "m", "key": "k4", "reward": 0.5}]
    )  # the first run labeled line 5 and skipped lines 1-2
    backend = _Unlabeling()
    summary = await run_jobs(jobs, backend, sink, "scores", params, chunk_size=2, skip_invalid=True, progress=False)
    assert (summary.labeled, summary.skipped, len(summary.unlabeled)) == (2, 1, 2)
    assert sorted(sink.rows) == ["k2", "k3", "k4"]
    assert backend.requests == [["?", "?"], ["?"], ["?"], ["a", "b"]]
    with pytest.raises(ModelOutputError, match=r"^in.jsonl, lines 1, 2: the model labeled none of them"):
        await run_jobs(
            jobs, _Unlabeling(), MemorySink(), "scores", params, chunk_size=2, skip_invalid=True, progress=False
        )


def test_table_rows_read_as_the_records_they_were(tmp_path):
    """A Parquet table gives every row every column and every message every field, null where
    the record had none: read as JSONL and as Parquet, the records are the same pairs (a
    completion that repeats the prompt's turns still starts after them; a record of another
    format in the same table is read in its own)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "search", "arguments": "{}"}}]}
    records = [
        {
            "prompt": prompt,
            "chosen": [*prompt, {"role": "assistant", "content": "Paris."}],
            "rejected": [*prompt, call],
        },
        {"context": "Name a fruit.", "response_a": "Apple.", "response_b": "Chair."},
    ]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = tmp_path / "in.parquet"
    columns = dict.fromkeys(k for r in records for k in r)
    pq.write_table(pa.table({k: [r.get(k) for r in records] for k in columns}), table)

    def read(path):
        return [(p.context, p.response_a, p.response_b) for p in collect(path, io.normalize_pair)]

    assert read(table) == read(jsonl)
    assert read(jsonl)[0][2] == "[call functions.search]"  # no arguments, as an empty object


def test_message_content_given_as_parts_is_read_as_its_text():
    as_parts = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "Name a fruit."}, {"type": "image"}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Apple."}]}],
    }
    as_text = {
        "prompt": [{"role": "user", "content": "Name a fruit."}],
        "completion": [{"role": "assistant", "content": "Apple."}],
    }
    got, ref = io.normalize_single("w", as_parts), io.normalize_single("w", as_text)
    assert (got.context, got.response) == (ref.context, ref.response) == (ref.context, "Apple.")


def test_row_values_json_has_no_type_for_are_written_as_their_text():
    import datetime

    at = datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert json.loads(_jsonl_line({"key": "k", "messages": [{"content": "hi", "created_at": at}]})) == {
        "key": "k",
        "messages": [{"content": "hi", "created_at": "2024-01-02 03:04:05"}],
    }


def test_a_json_array_of_alpacaeval_outputs_is_read(tmp_path):
    """AlpacaEval's model_outputs.json: one JSON array of {"instruction", "output", ...}."""
    outputs = [
        {"instruction": "Name a fruit.", "output": "Apple.", "generator": "m", "dataset": "d"},
        {"instruction": "2+2?", "output": "4", "generator": "m", "dataset": "d"},
    ]
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps(outputs, indent=2))
    got = collect(path, io.normalize_single)
    ref = [io.normalize_single("w", {"prompt": o["instruction"], "completion": o["output"]}) for o in outputs]
    assert [(s.context, s.response) for s in got] == [(s.context, s.response) for s in ref]
    assert [s.where for s in got] == [f"{path}, record 1", f"{path}, record 2"]
    path.write_text(json.dumps(outputs)[:-2])
    with pytest.raises(MalformedRecord, match=r"model_outputs.json: not a valid JSON array \(.* at line 1, column"):
        collect(path, io.normalize_single)
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nq,a,b\n")
    with pytest.raises(InvalidInput, match=r"pairs.csv: CSV is not read; give JSONL"):
        collect(csv, io.normalize_pair)
    # One pretty-printed object, a shard of a saved dataset: said as such, not as a broken line.
    pretty = tmp_path / "pair.json"
    pretty.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}, indent=2))
    with pytest.raises(MalformedRecord, match=r"pair.json, line 1: not valid JSON .*over several lines is not read"):
        collect(pretty, io.normalize_pair)
    shard = tmp_path / "data-00000-of-00001.arrow"
    shard.write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(InvalidInput, match=r"an Arrow file is not read alone; give the folder `save_to_disk` wrote"):
        collect(shard, io.normalize_pair)


def test_alpaca_records_fold_their_input_into_the_prompt():
    """Alpaca's {"instruction", "input", "output"}: the input is the instruction's data, so the
    prompt is the instruction, a blank line and the input; records that share an instruction
    but not an input are different prompts, and win rates do not match them with each other."""
    from labeler.evaluate import match_policies

    ins = "Translate to French."
    s = io.normalize_single("l", {"instruction": ins, "input": "Good morning.", "output": "Bonjour."})
    assert (s.context, s.response, s.prompt) == (f"{ins}\n\nGood morning.", "Bonjour.", f"{ins}\n\nGood morning.")
    ref = io.normalize_single("l", {"prompt": f"{ins}\n\nGood morning.", "completion": "Bonjour."})
    assert s.context == ref.context
    for none in ({}, {"input": ""}, {"input": None}):  # no input: the instruction alone, as before
        assert io.normalize_single("l", {"instruction": ins, "output": "Merci."} | none).context == ins
    with pytest.raises(MalformedRecord, match="l: 'input' must be text"):
        io.normalize_single("l", {"instruction": ins, "input": ["Hi."], "output": "Salut."})

    def policy(outputs: list[tuple[str, str]]) -> list:
        return [(None, io.normalize_single("l", {"instruction": ins, "input": i, "output": o})) for i, o in outputs]

    a = policy([("Good morning.", "Bonjour."), ("Thank you.", "Merci.")])
    b = policy([("Thank you.", "Merci bien."), ("Good morning.", "Salut.")])
    matched, only_a, only_b = match_policies(a, b)
    assert [(x.response, y.response) for x, y in matched] == [("Bonjour.", "Salut."), ("Merci.", "Merci bien.")]
    assert (only_a, only_b) == (0, 0)


def test_a_pipe_is_read_once_as_jsonl(tmp_path):
    """`<(zcat in.jsonl.gz)`: a pipe cannot be read twice, so it is not looked into for a JSON
    array; its lines are the records."""
    import os
    import threading

    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    lines = "".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) + "\n" for i in range(3))
    writer = threading.Thread(target=fifo.write_text, args=(lines,), daemon=True)
    writer.start()
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(collect(fifo, io.normalize_single)), daemon=True)
    reader.start()
    reader.join(60)  # a second open of the pipe would wait for a writer that is gone
    assert [s.response for s in got] == ["A0", "A1", "A2"]
