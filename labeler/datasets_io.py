"""Reading preference data: files, formats, and the content keys that make labeling resumable.

Files: JSONL (one object a line), a JSON array of objects, Parquet (via pyarrow), and a Hugging Face `datasets`
dataset saved with `save_to_disk` (a directory; needs `datasets`). The optional libraries
are imported only when such a file is read.

Pair formats, detected per record:

    trl        {"prompt", "chosen", "rejected"}: text, or conversational lists of
               {"role", "content"} messages (TRL's explicit-prompt preference format)
    trl-implicit {"chosen", "rejected"} as message lists that share the prompt turns
    pairs      {"context", "response_a", "response_b"} (optional "preferred": "a" | "b")
    hh         {"chosen", "rejected"} as Anthropic HH-RLHF transcripts ("\\n\\nHuman: ...
               \\n\\nAssistant: ..."): split at the last "\\n\\nAssistant:" into the shared
               context and the two final assistant responses

In `trl`, `trl-implicit` and `hh` the human-preferred response is `chosen`; it becomes A.
Single-response formats (scores mode): {"prompt", "completion"} (text or messages) or
{"context", "response"}, the prompt under either name; or AlpacaEval's {"instruction",
"output"} (Alpaca's "input", when a record has one, joins the instruction in the prompt).

A prompt reaches the labeler as the service shows every context: its canonical transcript
(`labeler.chat`); a response is its messages' contents, without end-of-turn markers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import clean_response, context_text
from .chat import response_text as messages_response_text
from .errors import InvalidInput

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


class MalformedRecord(InvalidInput):
    """A record that cannot be read or normalized; `where` names it ("line 7", "row 3")."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}", field=where)
        self.where = where


@dataclass(frozen=True)
class Pair:
    """One pair, normalized. `context`/`response_a`/`response_b` are the texts the labeler
    reads; `prompt`/`orig_a`/`orig_b` keep the input's own form (text or messages) for the
    output rows. `human` is the human-preferred side ("a" / "b") when the input says."""

    context: str
    response_a: str
    response_b: str
    prompt: Any
    orig_a: Any
    orig_b: Any
    fmt: str
    human: str | None
    where: str


@dataclass(frozen=True)
class Single:
    """One (prompt, response) for direct scores; `prompt`/`completion` keep the input form."""

    context: str
    response: str
    prompt: Any
    completion: Any
    where: str


# -- files --------------------------------------------------------------------------------
def read_records(
    path: str | Path, *, split: str | None = None, on_bad_line: Callable[[MalformedRecord], None] | None = None
) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSONL file, a JSON file holding an array of
    records (AlpacaEval's outputs), a Parquet file or a saved dataset.

    `where` is "PATH, line N" (1-based, counting blank lines) for JSONL, "PATH, record N" for
    a JSON array, "PATH, row N" (1-based) otherwise. A JSONL line that is not JSON raises
    MalformedRecord naming the line, or is passed to `on_bad_line` and skipped; a JSON array
    that does not parse is malformed as a whole. CSV is refused, saying what to give instead.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidInput(f"{p}: no such file or directory", field="input")
    if p.is_dir():
        yield from _rows(p, _load_saved_dataset(p, split))
        return
    if split is not None:
        raise InvalidInput(f"{p} is a file, with no splits: --split is for a saved DatasetDict", field="split")
    if p.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - depends on the environment
            raise InvalidInput("reading Parquet needs pyarrow: pip install pyarrow", field="input") from None
        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise InvalidInput(f"{p}: not a readable Parquet file ({exc})", field="input") from None
        yield from _rows(p, rows)
    elif p.suffix.lower() in (".csv", ".tsv"):
        raise InvalidInput(
            f"{p}: CSV is not read; give JSONL, a JSON array, Parquet or a saved dataset "
            "(from pandas: df.to_json(path, orient='records', lines=True))",
            field="input",
        )
    elif p.suffix.lower() in (".arrow", ".feather"):
        raise InvalidInput(
            f"{p}: an Arrow file is not read alone; give the folder `save_to_disk` wrote, Parquet, JSONL "
            "or a JSON array",
            field="input",
        )
    elif _is_json_array(p):
        yield from _array_records(p)
    else:
        seen = False  # a record line before this one
        with p.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                if n == 1:  # a byte-order mark (some editors' UTF-8) is not part of the first record
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if not raw.strip():
                    continue
                first, seen = not seen, True
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:  # another encoding, or a compressed file
                    bad = MalformedRecord(f"{p}, line {n}", f"not UTF-8 text (byte {exc.object[exc.start]:#04x})")
                except json.JSONDecodeError as exc:
                    why = f"not valid JSON ({exc.msg} at column {exc.colno})"
                    if first and raw.lstrip().startswith(b"{"):
                        why += "; a JSON object over several lines is not read: give one record a line (JSONL)"
                        why += " or a JSON array of records"
                    bad = MalformedRecord(f"{p}, line {n}", why)
                except (ValueError, RecursionError) as exc:  # a number of too many digits, nesting too deep
                    bad = MalformedRecord(f"{p}, line {n}", f"JSON that cannot be read ({_first_clause(exc)})")
                else:
                    yield f"{p}, line {n}", rec
                    continue
                if on_bad_line is None:
                    raise bad from None
                on_bad_line(bad)


def _is_json_array(p: Path) -> bool:
    """Whether the file's first character that is not blank is "[" (no JSONL record starts so).
    Only a regular file is looked into: a pipe (`<(zcat in.jsonl.gz)`) cannot be read twice,
    and is read as JSONL."""
    if not p.is_file():
        return False
    with p.open("rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        while not head:
            chunk = f.read(65536)
            if not chunk:
                return False
            head = chunk.lstrip()
    return head.startswith(b"[")


def _array_records(p: Path) -> Iterator[tuple[str, Any]]:
    data = p.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedRecord(str(p), f"not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    except json.JSONDecodeError as exc:
        raise MalformedRecord(
            str(p), f"not a valid JSON array ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # a number of too many digits, nesting too deep
        raise MalformedRecord(str(p), f"a JSON array that cannot be read ({_first_clause(exc)})") from None
    for n, rec in enumerate(records, start=1):
        yield f"{p}, record {n}", rec


def _first_clause(exc: BaseException) -> str:
    """An error's message up to its first colon: what went wrong, not Python's advice on it."""
    return str(exc).partition(":")[0]


def split_for(path: str | Path, split: str | None, inputs: Sequence[str | Path]) -> str | None:
    """`--split` as it applies to `path`, one of a command's `inputs`: to each input saved
    with splits (a `DatasetDict` directory); another input beside one is read whole. With no
    such input, `split` is passed on, and refused there."""

    def has_splits(p: str | Path) -> bool:
        return (Path(p) / "dataset_dict.json").is_file()

    if split is not None and not has_splits(path) and any(has_splits(i) for i in inputs):
        return None
    return split


def _rows(p: Path, rows: Any) -> Iterator[tuple[str, Any]]:
    """(where, record) for a table's rows. A table gives every row all its columns and every
    struct all its fields, null where a record had none: those nulls are left out, so that a
    row reads as the record it was (a message without `tool_calls` the same as that message
    in the prompt, a record of one format beside the columns of another). A null prompt
    beside text responses is kept, unless the row has its prompt under the other name: a
    missing value, refused as in a JSON line, not a record without a prompt (whose answers
    would be judged out of context); beside conversations, which hold their prompt (TRL's
    implicit-prompt rows), the normalizers leave it out (`_unless_null_beside`), as for a
    JSON line."""
    for n, row in enumerate(rows, start=1):
        record = _without_nulls(row)
        if isinstance(record, dict):
            record = {k: _as_messages(v) for k, v in record.items()}
        if isinstance(row, dict) and not any(k in record for k in _CONTEXT_KEYS):
            record.update({k: None for k in _CONTEXT_KEYS if k in row})
        yield f"{p}, row {n}", record


def _as_messages(value: Any) -> Any:
    """A column of messages as a list of them: `datasets` gives a `Sequence` of {role,
    content} (the older way to declare one) as a dict of equal-length lists, each message's
    fields spread over them; any other value as it is."""
    if not (isinstance(value, dict) and "role" in value and "content" in value):
        return value
    fields = list(value.values())
    if not all(isinstance(f, list) for f in fields) or len({len(f) for f in fields}) != 1:
        return value
    return [
        {k: v for k, v in zip(value, message, strict=True) if v is not None} for message in zip(*fields, strict=True)
    ]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _load_saved_dataset(p: Path, split: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise InvalidInput(
            f"{p} is a directory: reading a dataset saved with save_to_disk needs `datasets` "
            "(pip install datasets, or this package's extra: pip install -e '.[datasets]'), "
            "or export it to JSONL/Parquet first",
            field="input",
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:  # a directory, but not one save_to_disk wrote
        raise InvalidInput(
            f"{p} is a directory but not a dataset saved with save_to_disk: give a JSONL or Parquet file, or "
            "such a directory",
            field="input",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise InvalidInput(f"{p} has splits {sorted(ds)}: choose one with --split", field="split")
            split = next(iter(ds))
        if split not in ds:
            raise InvalidInput(f"{p} has no split {split!r} (splits: {sorted(ds)})", field="split")
        ds = ds[split]
    elif split is not None:
        raise InvalidInput(f"{p} is a dataset saved without splits: leave out --split", field="split")
    return ds


# -- normalization ----------------------------------------------------------------------------
def prompt_text(value: Any) -> str:
    """The labeler's context for a prompt, text or messages: its canonical transcript."""
    return context_text(value)


def response_text(value: Any) -> str:
    """The labeler's response text: text cleaned; messages from the first assistant turn on (a
    completion that repeats its prompt's last turns starts with them), as `chat.response_text`
    reads them."""
    if isinstance(value, str):
        return clean_response(value)
    first = next((k for k, m in enumerate(value) if m.get("role") == "assistant"), 0)
    return messages_response_text(value[first:])


def _after(prompt: Any, completion: Any) -> Any:
    """A conversational completion without the prompt's turns, where it repeats them (some
    datasets store the whole conversation in `chosen` and `rejected`, beside the `prompt`),
    with or without the prompt's system messages."""
    if not isinstance(prompt, list):
        return completion
    for turns in (prompt, [m for m in prompt if not (isinstance(m, dict) and m.get("role") == "system")]):
        if turns and completion[: len(turns)] == turns:
            return completion[len(turns) :]
    return completion


def _is_messages(v: Any) -> bool:
    """A non-empty list of messages, each with a content: text, content parts (OpenAI's, as
    TRL's multimodal datasets have them: their text parts are read), or none where the
    message calls tools."""
    return (
        isinstance(v, list)
        and bool(v)
        and all(
            isinstance(m, dict)
            and (isinstance(m.get("content"), (str, list)) or (m.get("content") is None and m.get("tool_calls")))
            for m in v
        )
    )


# A record's prompt, under either name (`_context_key`).
_CONTEXT_KEYS = ("prompt", "context")


def _context_key(rec: dict, own: str) -> str:
    """The key of a record's context: `own`, the format's own name ("prompt" beside
    "completion", "context" beside responses), else the other name when the record uses it."""
    other = "prompt" if own == "context" else "context"
    return other if own not in rec and other in rec else own


# The keys the formats above read; a record may also carry an "id" (win rates match by it).
_KNOWN_KEYS = frozenset(
    {"prompt", "context", "completion", "response", "response_a", "response_b", "chosen", "rejected", "preferred", "id"}
)


def _context(where: str, rec: dict, own: str) -> tuple[str, Any]:
    """(key, value) of a record's context (`_context_key`): "" when the record has none and
    nothing else either. A record with keys of its own but no prompt under either name most
    likely holds it under another ("question", "instruction"): judged without it, every
    answer would be read out of context, so it is malformed, naming those keys."""
    key = _context_key(rec, own)
    if key in rec:
        return key, rec[key]
    other = sorted(k for k in rec if k not in _KNOWN_KEYS)
    if other:
        raise MalformedRecord(
            where,
            f"no {own!r} (or {'context' if own == 'prompt' else 'prompt'!r}) key, and keys this format does not read: "
            f'{", ".join(map(repr, other))}; name the prompt {own!r}, or give {own!r}: "" for none',
        )
    return key, ""


def _unless_null_beside(rec: dict, *responses: Any) -> dict:
    """`rec` without a null prompt (under either name) where a response is a conversation,
    which holds the prompt (TRL's implicit-prompt rows): read as a table row's null is (`_rows`),
    so a JSON line and the same record from a table read alike. Beside text responses a null
    prompt stays, to be refused as a missing value."""
    if any(isinstance(r, list) for r in responses) and any(rec.get(k, "") is None for k in _CONTEXT_KEYS):
        return {k: v for k, v in rec.items() if not (k in _CONTEXT_KEYS and v is None)}
    return rec


def _text_or_messages(where: str, name: str, v: Any) -> Any:
    if isinstance(v, str) or _is_messages(v):
        return v
    raise MalformedRecord(where, f"{name!r} must be text or a list of {{role, content}} messages")


def normalize_pair(where: str, rec: Any) -> Pair:
    """One record in any pair format (see the module docstring) as a Pair."""
    if not isinstance(rec, dict):
        raise MalformedRecord(where, f"expected a JSON object, got {type(rec).__name__}")
    if "response_a" in rec or "response_b" in rec:
        context, ctx = _context(where, rec, "context")
        for name, v in ((context, ctx), ("response_a", rec.get("response_a")), ("response_b", rec.get("response_b"))):
            if not isinstance(v, str):
                raise MalformedRecord(where, f"{name!r} must be text (plain pairs format)")
        human = rec.get("preferred")
        if human is not None and human not in ("a", "b"):
            raise MalformedRecord(where, f'\'preferred\' must be "a" or "b", got {human!r}')
        a, b = rec["response_a"], rec["response_b"]
        return Pair(prompt_text(ctx), clean_response(a), clean_response(b), ctx, a, b, "pairs", human, where)
    if "chosen" in rec and "rejected" in rec:
        chosen = _text_or_messages(where, "chosen", rec["chosen"])
        rejected = _text_or_messages(where, "rejected", rec["rejected"])
        rec = _unless_null_beside(rec, chosen, rejected)
        if "prompt" in rec:
            prompt = _text_or_messages(where, "prompt", rec["prompt"])
            if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
                if _shared_question(chosen, rejected):
                    # A text prompt beside conversations that hold it (some datasets add one):
                    # read from the conversations, as TRL's maybe_extract_prompt does. Beside
                    # completions alone, the prompt is their context (below).
                    return _split_messages(where, chosen, rejected)
            elif len({isinstance(prompt, str), isinstance(chosen, str), isinstance(rejected, str)}) != 1:
                raise MalformedRecord(where, "'prompt', 'chosen' and 'rejected' must all be text or all be messages")
            cut = _answer_start(prompt) if isinstance(prompt, str) and isinstance(chosen, str) else None
            if cut is not None:
                # TRL's extract_prompt cuts text where chosen and rejected first differ: when both
                # answers begin alike ("I can't ...", "I can ..."), inside the answer. Judged
                # with each answer whole; the rows keep the given split.
                start = prompt[cut:]
                context, a, b = _hh_context(prompt[:cut]), start + chosen, start + rejected
            else:
                context, a, b = prompt_text(prompt), _after(prompt, chosen), _after(prompt, rejected)
            return Pair(context, response_text(a), response_text(b), prompt, chosen, rejected, "trl", "a", where)
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_hh(where, chosen, rejected)
        if isinstance(chosen, list) and isinstance(rejected, list):
            return _split_messages(where, chosen, rejected)
        raise MalformedRecord(where, "'chosen' and 'rejected' must both be text or both be messages")
    raise MalformedRecord(
        where,
        "not a known pair format: expected prompt/chosen/rejected (TRL), chosen/rejected (HH-RLHF "
        f"transcripts) or context/response_a/response_b; got keys {sorted(rec)}",
    )


def _answer_start(prompt: str) -> int | None:
    """Where the final answer starts in an HH-RLHF prompt that ends inside it (text after its
    last "\n\nAssistant:", and no turn header of any form after that), else None."""
    hh = HH_HUMAN in prompt or prompt.lstrip().startswith(HH_HUMAN.lstrip())
    i = prompt.rfind(HH_ASSISTANT)
    if not hh or i < 0:
        return None
    cut = i + len(HH_ASSISTANT)
    rest = prompt[cut:]
    return cut if rest.strip() and not _TURN_HEADER.search(rest) else None


# A turn header of a plain transcript, in any of the role names one uses.
_TURN_HEADER = re.compile(r"\n\n(?:Human|User|System|Assistant|Tool):")


def _shared_question(chosen: list, rejected: list) -> bool:
    """Whether two conversations share their leading turns up to a user's (they hold the
    prompt), rather than only the policy's first steps."""
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            return False
        if a.get("role") == "user":
            return True
    return False


def split_hh(transcript: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript at its last "\\n\\nAssistant:" into (prompt, response).

    The prompt keeps the marker, so prompt + response is the transcript unchanged (what a
    reward model trained on TRL's format reads)."""
    i = transcript.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError('no "\\n\\nAssistant:" turn')
    cut = i + len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _hh_context(prompt: str) -> str:
    """The labeler's context for an HH prompt: the turns before the final answer, as their
    canonical transcript."""
    return context_text(prompt)


def _split_hh(where: str, chosen: str, rejected: str) -> Pair:
    if HH_HUMAN not in chosen and not chosen.startswith(HH_HUMAN.lstrip()):  # the first turn's "\n\n" is optional
        raise MalformedRecord(
            where,
            "'chosen'/'rejected' without a prompt must be HH-RLHF transcripts "
            '("\\n\\nHuman: ..." then "\\n\\nAssistant: ...")',
        )
    try:
        pc, rc = split_hh(chosen)
        pr, rr = split_hh(rejected)
    except ValueError as exc:
        raise MalformedRecord(where, f"HH transcript has {exc}") from None
    if pc != pr:
        raise MalformedRecord(where, "the chosen and rejected transcripts differ before the final Assistant turn")
    if HH_HUMAN in rc or HH_HUMAN in rr:  # the transcript's last turn would be judged as part of the answer
        raise MalformedRecord(where, "HH transcript ends with a Human turn, not the Assistant's answer")
    return Pair(_hh_context(pc), clean_response(rc), clean_response(rr), pc, rc, rr, "hh", "a", where)


def _split_messages(where: str, chosen: list, rejected: list) -> Pair:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise MalformedRecord(
            where,
            "conversational chosen/rejected without a prompt must share the prompt turns "
            "and differ in the final response",
        )
    prompt, a, b = chosen[:n], chosen[n:], rejected[n:]
    return Pair(prompt_text(prompt), response_text(a), response_text(b), prompt, a, b, "trl-implicit", "a", where)


def normalize_single(where: str, rec: Any) -> Single:
    """One record of {"prompt", "completion"} or {"context", "response"} as a Single (either
    name for the prompt), or of Alpaca's {"instruction", "output"} with an optional "input",
    whose prompt is the instruction, a blank line and the input when there is one."""
    if not isinstance(rec, dict):
        raise MalformedRecord(where, f"expected a JSON object, got {type(rec).__name__}")
    if "completion" in rec:
        completion = _text_or_messages(where, "completion", rec["completion"])
        name, given = _context(where, _unless_null_beside(rec, completion), "prompt")
        prompt = _text_or_messages(where, name, given)
        response = _after(prompt, completion)
        if prompt == "" and isinstance(completion, list):
            # A conversation without a prompt holds it: the turns up to its last user turn
            # (what follows, tool results included, is the policy's).
            cut = next((k + 1 for k in range(len(completion) - 1, -1, -1) if completion[k].get("role") == "user"), 0)
            prompt, response = completion[:cut], completion[cut:]
        return Single(prompt_text(prompt), response_text(response), given, completion, where)
    if "response" in rec:
        context, ctx = _context(where, rec, "context")
        resp = rec["response"]
        if not isinstance(ctx, str) or not isinstance(resp, str):
            raise MalformedRecord(where, f"{context!r} and 'response' must be text")
        return Single(prompt_text(ctx), clean_response(resp), ctx, resp, where)
    if "instruction" in rec and "output" in rec:  # AlpacaEval's model outputs, Alpaca's records
        ins, out, extra = rec["instruction"], rec["output"], rec.get("input")
        if not isinstance(ins, str) or not isinstance(out, str):
            raise MalformedRecord(where, "'instruction' and 'output' must be text")
        if extra is not None and not isinstance(extra, str):
            raise MalformedRecord(where, "'input' must be text")
        # Alpaca's `input` is the instruction's data ("Translate: <input>"): records that share
        # an instruction but not an input ask different things.
        prompt = f"{ins}\n\n{extra}" if extra and extra.strip() else ins
        return Single(prompt_text(prompt), clean_response(out), prompt, out, where)
    raise MalformedRecord(
        where, f"expected prompt/completion, context/response or instruction/output; got keys {sorted(rec)}"
    )


# -- the position coin ------------------------------------------------------------------------
def swap_for_position(key: str, seed: int) -> bool:
    """Whether to turn an item around (a fair coin per item, fixed by `seed` and the item's
    key, so re-runs and resumes make the same choice): `eval` turns each pair, its responses
    in sorted order, so the human-preferred one is shown second half the time."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1 == 1
