"""Inputs on the wire: plain text, or chat messages (TRL's conversational format) passed on as
messages.

The client renders no transcript of its own: the service brings every context, text or
messages, to one canonical transcript (parsing known chat templates in text), reads a
completion given as messages (a tool-calling one too: calls and tools' results) as one text,
and strips end-of-turn markers from responses, so the same dialogue gets the same reward
whichever framework sent it. Here a message list is only reduced to `{"role", "content"}`
strings (the text parts of multimodal content) and the tool calls a message makes; for the
pairwise judge, a string that TRL's simple chat template laid out as one assistant turn is
reduced to its answer (`judged_completion`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]
Text = str | Sequence[Message] | Message
Context = str | list[dict[str, Any]]


def _content(message: Message) -> str:
    """A message's text: a string, or the text parts of a multimodal content list (or of one
    such part alone)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):  # one part, not a list of them: not read as its key names
        content = [content]
    if isinstance(content, Iterable):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return str(content)


def _messages(value: Any) -> list[Message]:
    """`value` as a list of messages: one message, or any iterable of them (a list, or the
    numpy object array a dataframe column gives)."""
    if isinstance(value, Mapping):
        return [value]
    if not isinstance(value, (str, bytes)) and isinstance(value, Iterable):
        messages = list(value)
        if all(isinstance(m, Mapping) for m in messages):
            return messages
    raise TypeError(f"expected text or a list of {{'role', 'content'}} messages, got {type(value).__name__}")


# Where a reasoning model's message keeps its reasoning (vLLM's `reasoning_content`, TRL's
# parsed `thinking`): the service judges it as the turn's reasoning block.
_REASONING_KEYS = ("reasoning_content", "thinking")


def _wire_messages(value: Text, role: str) -> list[dict[str, Any]]:
    """Messages for the wire: `{"role", "content"}` strings (`role` where a message has none),
    with the message's `tool_calls` where it made any, and its reasoning where it keeps it apart."""
    out = []
    for m in _messages(value):
        message: dict[str, Any] = {"role": str(m.get("role") or role), "content": _content(m)}
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, str) and len(calls):  # a numpy array has no truth value
            message["tool_calls"] = _plain(list(calls))
        for key in _REASONING_KEYS:
            if isinstance(m.get(key), str) and m[key].strip():
                message[key] = m[key]
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """`value` with the numpy arrays a dataframe gives for lists (a Parquet file read by pandas)
    as lists, which JSON takes."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return [_plain(v) for v in value]
    return value


def context_value(value: Text) -> Context:
    """A context for the wire: text as is, or messages (`_wire_messages`)."""
    return value if isinstance(value, str) else _wire_messages(value, "user")


def completion_value(value: Text) -> Context:
    """A completion for the wire: text as is, or messages (`_wire_messages`, the assistant's
    where a message names no role), which the service reads as one text."""
    return value if isinstance(value, str) else _wire_messages(value, "assistant")


# How TRL's SIMPLE_CHAT_TEMPLATE (TRL 0.12 to 1.0) writes an assistant message: "Assistant: "
# + content + a blank line.
_TEMPLATE_ANSWER_START, _TEMPLATE_ANSWER_END = "Assistant: ", "\n\n"


def judged_completion(value: Text) -> Context:
    """A completion as `PairwiseJudge` hands it to the labeler: `completion_value`, except
    that a string which is one assistant turn as TRL's simple chat template writes it
    ("Assistant: Paris.\\n\\n") gives the answer alone ("Paris.", or "" for an empty one).
    TRL's online DPO, XPO and Nash-MD trainers (0.12 to 1.0) render a conversational
    completion through that template before calling the judge, and the service strips no role
    prefix from a response: the labeler would judge "Assistant: Paris." (an empty answer as
    "Assistant:"). Any other string, prose that starts with "Assistant" included, is unchanged."""
    if (
        isinstance(value, str)
        and len(value) >= len(_TEMPLATE_ANSWER_START) + len(_TEMPLATE_ANSWER_END)
        and value.startswith(_TEMPLATE_ANSWER_START)
        and value.endswith(_TEMPLATE_ANSWER_END)
    ):
        return value[len(_TEMPLATE_ANSWER_START) : -len(_TEMPLATE_ANSWER_END)]
    return completion_value(value)


def _refuse_strings(**lists: Any) -> None:
    """TypeError for a single string given where a list is (one item per character, else)."""
    for name, seq in lists.items():
        if isinstance(seq, str):
            raise TypeError(f"{name} must be a list, not a single string")


def score_items(prompts: Sequence[Text], completions: Sequence[Text]) -> list[dict[str, Any]]:
    """`/v1/scores` items for (prompt, completion) pairs."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists, not a single string")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pairs = zip(prompts, completions, strict=True)
    return [{"context": context_value(p), "response": completion_value(c)} for p, c in pairs]


def pair_items(prompts: Sequence[Text], pairs: Sequence[Sequence[Text]]) -> list[dict[str, Any]]:
    """`/v1/preferences` items for prompts and their (first, second) completion pairs, as
    `PairwiseJudge` is given them (`judged_completion`)."""
    _refuse_strings(prompts=prompts, completions=pairs)
    if len(prompts) != len(pairs):
        raise ValueError(f"{len(prompts)} prompts but {len(pairs)} completion pairs")
    items = []
    for p, pair in zip(prompts, pairs, strict=True):
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError("each entry of completions must hold exactly two completions")
        items.append(
            {
                "context": context_value(p),
                "response_a": judged_completion(pair[0]),
                "response_b": judged_completion(pair[1]),
            }
        )
    return items


def reference_items(
    prompts: Sequence[Text], completions: Sequence[Text], references: Sequence[Text]
) -> list[dict[str, Any]]:
    """`/v1/rewards/reference` items for (prompt, completion, reference) triples."""
    _refuse_strings(prompts=prompts, completions=completions, references=references)
    if not len(prompts) == len(completions) == len(references):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(references)} references")
    return [
        {"context": context_value(p), "response": completion_value(c), "reference": completion_value(r)}
        for p, c, r in zip(prompts, completions, references, strict=True)
    ]


def group_items(prompts: Sequence[Text], groups: Sequence[Sequence[Text]]) -> list[dict[str, Any]]:
    """`/v1/rewards/group` items for prompts and each prompt's completions."""
    _refuse_strings(prompts=prompts, groups=groups)
    if len(prompts) != len(groups):
        raise ValueError(f"{len(prompts)} prompts but {len(groups)} groups of completions")
    items = []
    for p, group in zip(prompts, groups, strict=True):
        if isinstance(group, str):
            raise TypeError("each group must be a list of completions, not a single string")
        items.append({"context": context_value(p), "responses": [completion_value(c) for c in group]})
    return items


def json_body(data: Any) -> bytes:
    """`data` as a JSON request body, UTF-8. Text a policy wrote can hold a lone surrogate (a
    character cut in two), which has no UTF-8 form: such a body goes with JSON escapes, which
    the server reads back and cleans like any other text."""
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("ascii")
