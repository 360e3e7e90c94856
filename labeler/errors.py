"""Errors raised by the labeler core.

    LabelerError
    ├── InvalidInput       bad item, parameter or label set (the caller can fix it)
    │   └── InputTooLong   an item exceeds a length limit
    ├── UnknownTask        no task of that name
    ├── TaskFileError      a task file that does not parse or misses fields
    ├── ModelLoadError     a model path or file that cannot be loaded
    ├── ModelOutputError   the model's answer cannot be turned into a label (no mass on any label)
    └── EngineError        the engine failed while computing (a batch that fails is split to
        │                  find the items that fail it)
        └── EngineUnavailable  the engine as a whole is down (every batch fails; retry later)

`service/` maps these to HTTP statuses; nothing here knows about HTTP.
"""

from __future__ import annotations


class LabelerError(Exception):
    """Root of every error the labeler raises on purpose. `field` names the item or field
    the error is about, when known."""

    field: str | None = None

    @property
    def reason(self) -> str:
        """The message without the `<field>: ` it starts with, or the `<item>: ` of a field
        within an item (`items[3]` of `items[3].response`), so that whoever names the item
        anew does not name it twice."""
        text = str(self)
        if self.field:
            for lead in (self.field, self.field.partition(".")[0]):
                if text.startswith(f"{lead}: "):
                    return text[len(lead) + 2 :]
        return text


class InvalidInput(LabelerError, ValueError):
    """An input the caller can fix. `field` names the offending field when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InputTooLong(InvalidInput):
    """An item is longer than a configured limit."""

    def __init__(
        self, message: str, *, field: str | None = None, limit: int | None = None, tokens: int | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.limit = limit
        self.tokens = tokens  # the prompt's, for a prompt over the model's context


class UnknownTask(LabelerError, KeyError):
    """No task with the requested name is registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name, known)  # both, so that a copy or a pickle rebuilds it
        self.name = name
        self.known = known

    def __str__(self) -> str:
        # A name of any length may come in a request: the answer quotes its start.
        name = repr(self.name) if len(self.name) <= 80 else f"{self.name[:80]!r}... ({len(self.name)} characters)"
        return f"unknown task {name}; known tasks: {', '.join(self.known) or '(none)'}"


class TaskFileError(LabelerError):
    """A task definition file is malformed."""


class ModelLoadError(LabelerError):
    """A model could not be located, converted or loaded."""


class ModelOutputError(LabelerError):
    """The model answered, but not in a way a label can be read from (e.g. -inf or NaN
    log-probs on every label). Neither the caller's fault nor transient: retrying gives the
    same answer. `field` names the item (`items[3]`) when the labeler knows it, the first of
    them when several failed; `items` holds the place of each."""

    def __init__(self, message: str, *, field: str | None = None, items: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.items = items


class EngineError(LabelerError):
    """The engine failed while scoring or generating."""


class EngineUnavailable(EngineError):
    """The engine cannot compute anything right now (its process died, no server answers)."""
