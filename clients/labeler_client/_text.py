"""Input normalization: plain text or chat messages (TRL's conversational format) to the
strings the service labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]
Text = str | Sequence[Message] | Message


def _content(message: Message) -> str:
    """A message's text: a string, or the text parts of a multimodal content list."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return str(content)


def as_text(value: Text, *, role: str | None = None) -> str:
    """Plain text from a string or from chat messages.

    Without `role`, messages become a transcript (`system: ...`, blank line, `user: ...`):
    the context for a conversational prompt. With `role`, only the content of that role's
    messages is kept (a completion's assistant turns); if none has that role, every
    message's content is.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(m, Mapping) for m in value):
        raise TypeError(f"expected text or a list of {{'role', 'content'}} messages, got {type(value).__name__}")
    if role is not None:
        picked = [m for m in value if m.get("role") == role] or list(value)
        return "\n".join(_content(m) for m in picked)
    return "\n\n".join(f"{m.get('role', 'user')}: {_content(m)}" for m in value)


def completion_text(value: Text) -> str:
    """A completion's text: the string itself, or its assistant messages' content."""
    return as_text(value, role="assistant")


def score_items(prompts: Sequence[Text], completions: Sequence[Text]) -> list[dict[str, str]]:
    """`/v1/scores` items for (prompt, completion) pairs."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists, not a single string")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [{"context": as_text(p), "response": completion_text(c)} for p, c in zip(prompts, completions, strict=True)]


def pair_items(prompts: Sequence[Text], pairs: Sequence[Sequence[Text]]) -> list[dict[str, str]]:
    """`/v1/preferences` items for prompts and their (first, second) completion pairs."""
    if len(prompts) != len(pairs):
        raise ValueError(f"{len(prompts)} prompts but {len(pairs)} completion pairs")
    items = []
    for p, pair in zip(prompts, pairs, strict=True):
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError("each entry of completions must hold exactly two completions")
        items.append(
            {"context": as_text(p), "response_a": completion_text(pair[0]), "response_b": completion_text(pair[1])}
        )
    return items
