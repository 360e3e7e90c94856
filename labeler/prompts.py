"""Lay a task and an item out into the exact prompt the engine reads.

Layout (the wording comes from the task file):
- system turn: the task's preamble and fence notice;
- one user/assistant turn pair per few-shot example;
- the user turn: fenced context, fenced response(s), the question;
- the assistant turn, prefilled with the answer prefix ("Preferred response: ", "Score: ",
  "Answer:"), after which the label tokens are read. With chain-of-thought the assistant
  turn is left open for a rationale, and the answer prefix follows the rationale.

Untrusted text (context, responses) is fenced so that it cannot close or spoof the
template's structure:
- each block is delimited by `<<<NAME #tag>>>` / `<<<END NAME #tag>>>` lines whose tag is a
  hash of all the untrusted text of the question, re-drawn until no text contains it (a
  text cannot contain the hash of itself);
- strings the tokenizer would turn into special or added tokens (`<|im_start|>`,
  `<|im_end|>`, ...) are broken with a zero-width space, so the text tokenizes as
  plain text and cannot open or close chat turns;
- lone surrogates and control characters (C0 other than tab, newline and carriage return,
  DEL, C1) are replaced by U+FFFD.
An empty response is judged like any other: its block is shown with nothing inside.
A generated rationale (chain-of-thought) gets the last two steps before the label is read
after it: the judged text may have led the model to write a special-token string out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import InputTooLong, InvalidInput, ModelLoadError
from .scoring import JUDGMENT_LABELS, PAIRWISE_LABELS, SCORE_LABELS, judgment_label_text
from .tasks import JudgmentExample, PairExample, ScoreExample, Task

Kind = Literal["pairwise", "score", "judgment"]
Order = Literal["ab", "ba"]

ZWSP = "\u200b"
# What stands in front of an answer prefix when label ids are worked out: a line break (not
# the start of a text, which a SentencePiece tokenizer marks as a word start).
_ANCHOR = "\n"
_Example = TypeVar("_Example", PairExample, ScoreExample, JudgmentExample)
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1, surrogates


@dataclass(frozen=True)
class Rendered:
    """What the engine is given for one question.

    `prompt` ends with the answer prefix when labels are read right away, or with the
    open assistant turn when a rationale is generated first (`cot`).
    """

    kind: Kind
    prompt: str
    prompt_token_ids: tuple[int, ...]
    labels: dict[str, tuple[int, ...]]
    answer_prefix: str
    cot: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cot": self.cot,
            "prompt": self.prompt,
            "prompt_token_ids": list(self.prompt_token_ids),
            "candidates": [{"label": k, "token_ids": list(v)} for k, v in self.labels.items()],
        }


def clean_text(value: object, field: str, *, allow_empty: bool = False) -> str:
    """Check that `value` is a string and replace characters that cannot be encoded or
    that are control characters. Raises InvalidInput naming `field`."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, got {type(value).__name__}", field=field)
    if not allow_empty and not value.strip():
        raise InvalidInput(f"{field} is empty", field=field)
    return _BAD_CHARS.sub("\ufffd", value)


def fence_tag(texts: Sequence[str]) -> str:
    """A tag that none of `texts` contains: a hash of the texts (order-free, so both
    orders of a pair share it, and with it their prompt prefix)."""
    h = hashlib.sha256("\x00".join(sorted(texts)).encode("utf-8", "surrogatepass"))
    for _ in range(64):
        tag = "#" + h.hexdigest()[:10]
        if not any(tag in t for t in texts):
            return tag
        h.update(b"\x01")
    raise InvalidInput("could not find a fence tag absent from the text")  # pragma: no cover


def _fence(name: str, text: str, tag: str) -> str:
    return f"<<<{name} {tag}>>>\n{text}\n<<<END {name} {tag}>>>"


# A fenced block's opening line, as a model may copy it from its prompt (`fence_tag`'s tags).
_FENCE_OPEN = re.compile(r"^[ \t]*<<<(?!END )(.+?) (#[0-9a-f]{10})>>>[ \t]*$", re.MULTILINE)


def _copied_blocks(text: str, tags: Collection[str] | None = None) -> list[tuple[int, int]]:
    """The spans of `text` that are fenced blocks: from an opening line to its closing line
    (the same name and tag, which the fenced text cannot hold), or to the end of the text when
    the block is never closed. In a generation, the copies of its prompt's blocks: with
    `tags`, the prompt's own (`_fence_tags`), an opening line of another tag opens a copy only
    where its closing line follows (a block copied with its tag miscopied); unclosed, it is a
    line the judged text forged, and the model's verdict after it is its own."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while (opened := _FENCE_OPEN.search(text, pos)) is not None:
        end = rf"^[ \t]*<<<END {re.escape(opened[1])} {opened[2]}>>>[ \t]*$"
        closed = re.compile(end, re.MULTILINE).search(text, opened.end())
        if closed is None and tags is not None and opened[2] not in tags:
            pos = opened.end()
            continue
        pos = closed.end() if closed else len(text)
        spans.append((opened.start(), pos))
    return spans


def _fence_tags(prompt: str) -> set[str]:
    """The tags of a prompt's own fences. A fenced text cannot hold its block's tag
    (`fence_tag`), so each block's closing line is the first after its opening line with
    that tag, and what a fenced text forges (a fence line of another tag) is skipped with it."""
    return {m[2] for a, _ in _copied_blocks(prompt) if (m := _FENCE_OPEN.match(prompt, a))}


# A markdown quote's line (what `cut_rationale` never takes for the model's verdict).
_QUOTED = re.compile(r"[ \t]*>")
# The end of a sentence on a verdict's line, where a verdict led in mid-line starts.
_SENTENCE_END = re.compile(r"[.!?][ \t]+")
# What may lead a verdict in on its line: a bullet or a number, and a word ("Final"), in a
# few characters (a longer lead is a sentence of the rationale that names the prefix).
_LEAD_IN_CHARS = 40
_LEAD_IN = re.compile(r"[ \t]*(?:[-*+\u2022]|\d+[.)])?[ \t]*[*_]*(?:[^\W\d_]+[*_]*[ \t]+)?[*_]*")


def prompt_builder(model_dir: str | Path, tokenizer: Any = None, max_model_len: int | None = None) -> PromptBuilder:
    """A PromptBuilder from a model directory's tokenizer and config alone (no weights): what
    `labeler render` shows, without loading the model. `tokenizer`: the one an engine reads
    instead of the directory's (vLLM's `tokenizer=`); `max_model_len`: a context limit an
    engine is given below the model's."""
    import json

    from .models import load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {model_dir}: {exc}") from exc
    text = config.get("text_config") or config  # a multimodal config keeps the language model's there
    limits = [n for n in (text.get("max_position_embeddings"), max_model_len) if isinstance(n, int) and n > 0]
    return PromptBuilder(tokenizer, max_prompt_tokens=min(limits, default=None))


def judgment_question(task: Task) -> str:
    """The task's yes/no question; InvalidInput naming `task` when it asks none."""
    question = task.judgment_question.strip()
    if not question:
        raise InvalidInput(
            f"task {task.name!r} asks no yes/no question: set judgment_question in its task file", field="task"
        )
    return question


class PromptBuilder:
    """Renders tasks and items into prompts for one tokenizer (and its chat template)."""

    def __init__(self, tokenizer: Any, *, max_prompt_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        added = set(getattr(tokenizer, "get_added_vocab", dict)()) | set(tokenizer.all_special_tokens)
        # Longest first, so a token that contains another is broken as a whole. Runs of
        # whitespace (Gemma adds tokens for them) are text that no template marks a turn with:
        # breaking them would put a zero-width space into every paragraph break.
        self._specials = sorted(
            (t for t in added if len(t) > 1 and not t.replace("\u2581", " ").isspace()), key=len, reverse=True
        )
        self._label_ids: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}  # by kind and answer prefix
        self._judgment_ids: dict[str, dict[str, tuple[int, ...]]] = {}  # by answer prefix
        self._tail_tokens: dict[str, int] = {}  # by answer prefix: "\n" + prefix after a rationale
        self._shown_examples: dict[Any, Any] = {}  # a task's few-shot examples, neutralized

    # -- text hygiene ------------------------------------------------------------
    def neutralize(self, text: str) -> str:
        """Break every special/added-token string in `text` (whitespace runs aside) so it
        tokenizes as plain text."""
        changed = True
        while changed:
            changed = False
            for tok in self._specials:
                if tok in text:
                    text = text.replace(tok, tok[0] + ZWSP + tok[1:])
                    changed = True
        return text

    def _untrusted(self, value: object, field: str, *, allow_empty: bool = False) -> str:
        return self.neutralize(clean_text(value, field, allow_empty=allow_empty))

    def _shown(self, example: _Example) -> _Example:
        """A few-shot example as the prompt shows it: its texts neutralized as the judged texts
        are (a task quoting a chat format must not open or end a turn), and so shown as the
        same text judged is. Once per example."""
        shown = self._shown_examples.get(example)
        if shown is None:
            texts = ("context", "response", "response_a", "response_b", "rationale")
            shown = replace(example, **{f: self.neutralize(getattr(example, f)) for f in texts if hasattr(example, f)})
            self._shown_examples[example] = shown
        return shown

    # -- public renderers ----------------------------------------------------------
    def pairwise(
        self,
        task: Task,
        context: object,
        response_a: object,
        response_b: object,
        *,
        order: Order = "ab",
        cot: bool = False,
        tokenize: bool = True,
        tag: str | None = None,
    ) -> Rendered:
        """The pairwise question with the responses shown in `order` ("ba" swaps them).
        `tokenize=False` leaves `prompt_token_ids` empty for `tokenize_many`.

        `tag`: a fence tag drawn over more texts than this pair's (`group_tag`), so that all
        comparisons of a group share it, and with it their prompt up to the first response.
        It must not occur in the context or either response (InvalidInput otherwise)."""
        if order not in ("ab", "ba"):
            raise InvalidInput(f"order must be 'ab' or 'ba', got {order!r}", field="order")
        ctx = self._untrusted(context, "context", allow_empty=True)
        # An empty response is a normal policy output: judged like any other.
        a = self._untrusted(response_a, "response_a", allow_empty=True)
        b = self._untrusted(response_b, "response_b", allow_empty=True)
        first, second = (a, b) if order == "ab" else (b, a)
        if tag is None:
            tag = fence_tag([ctx, first, second])
        elif any(tag in text for text in (ctx, a, b)):
            raise InvalidInput("the fence tag occurs in the text it would fence")
        messages = self._system(task)
        for ex in map(self._shown, task.examples):
            user = self._pair_user(task, ex.context, ex.response_a, ex.response_b, cot)
            messages += [
                user,
                self._assistant(task.pairwise_answer_prefix, str(ex.preferred), ex.rationale, cot),
            ]
        messages.append(self._pair_user(task, ctx, first, second, cot, tag))
        return self._finish("pairwise", messages, task.pairwise_answer_prefix, cot, tokenize)

    def score(
        self, task: Task, context: object, response: object, *, cot: bool = False, tokenize: bool = True
    ) -> Rendered:
        """The direct-score question (1..10) for one response (`tokenize` as for `pairwise`)."""
        ctx = self._untrusted(context, "context", allow_empty=True)
        resp = self._untrusted(response, "response", allow_empty=True)
        messages = self._system(task)
        for ex in map(self._shown, task.score_examples):
            user = self._score_user(task, ex.context, ex.response, cot)
            messages += [user, self._assistant(task.score_answer_prefix, str(ex.score), ex.rationale, cot)]
        messages.append(self._score_user(task, ctx, resp, cot))
        return self._finish("score", messages, task.score_answer_prefix, cot, tokenize)

    def group_tag(self, context: object, responses: Sequence[object]) -> str:
        """One fence tag for every comparison among `responses` to `context`: drawn over the
        context and all the responses (after the same cleaning as the prompts'), so it is
        absent from each of them."""
        texts = [self._untrusted(context, "context", allow_empty=True)]
        texts += [self._untrusted(r, f"responses[{k}]", allow_empty=True) for k, r in enumerate(responses)]
        return fence_tag(sorted(set(texts)))

    def judgment(
        self, task: Task, context: object, response: object, *, cot: bool = False, tokenize: bool = True
    ) -> Rendered:
        """The task's yes/no question about one response (`tokenize` as for `pairwise`).
        The labels are read as `judgment_label_ids` says."""
        judgment_question(task)
        ctx = self._untrusted(context, "context", allow_empty=True)
        resp = self._untrusted(response, "response", allow_empty=True)
        prefix = task.judgment_answer_prefix
        messages = self._system(task)
        for ex in map(self._shown, task.judgment_examples):
            label = judgment_label_text(prefix, "Yes" if ex.answer == "yes" else "No")
            messages += [
                self._judgment_user(task, ex.context, ex.response, cot),
                self._assistant(prefix, label, ex.rationale, cot),
            ]
        messages.append(self._judgment_user(task, ctx, resp, cot))
        return self._finish("judgment", messages, prefix, cot, tokenize, self.judgment_label_ids(prefix))

    def judgment_label_ids(self, answer_prefix: str) -> dict[str, tuple[int, ...]]:
        """Token ids of the yes/no labels ("Yes", "yes", "No", "no") as they follow
        `answer_prefix` (with a leading space after a prefix that does not end in whitespace:
        `judgment_label_text`). A spelling that tokenizes like an earlier one is left out."""
        ids = self._judgment_ids.get(answer_prefix)
        if ids is None:
            encoded = self._encode_labels(
                answer_prefix, JUDGMENT_LABELS, lambda label: judgment_label_text(answer_prefix, label)
            )
            ids = {}
            for label, toks in encoded.items():
                if toks not in ids.values():
                    ids[label] = toks
            self._judgment_ids[answer_prefix] = ids
        return ids

    def after_rationale(self, rendered: Rendered, rationale: str, *, tokenize: bool = True) -> Rendered:
        """The label-reading prompt that follows a generated rationale.

        The rationale is untrusted too: judged text can lead the model to write out a
        special-token string (`<|im_end|>`), which would become the real token here; it is
        neutralized like the judged text itself. (`tokenize` as for `pairwise`.)"""
        if tokenize:
            return self.after_rationales([rendered], [rationale])[0]
        return self._read(rendered, self._safe_rationale(rendered, rationale))

    def after_rationales(self, rendered: Sequence[Rendered], rationales: Sequence[str]) -> list[Rendered]:
        """`after_rationale` for each prompt and its rationale, tokenized in one call.

        A rationale generated within the room its prompt kept (`tokenize_many`) can still
        tokenize longer once neutralized: each broken special-token string is several plain
        tokens where the model wrote one. Such a rationale is cut at its end, token by token,
        until its read fits the model's context (a character the cut splits is left out
        whole); every other read is the whole rationale.
        (The labeler's results keep the rationales as the model wrote them.)"""
        if not rendered:
            return []
        safe = [self._safe_rationale(r, text) for r, text in zip(rendered, rationales, strict=True)]
        drafts = [self._read(r, s) for r, s in zip(rendered, safe, strict=True)]
        out = []
        for r, s, draft, ids in zip(rendered, safe, drafts, self._encode([d.prompt for d in drafts]), strict=True):
            limit = None if self.max_prompt_tokens is None else self.max_prompt_tokens - self._room(draft, 0)
            if limit is not None and len(ids) > limit:
                tokens = self.tokenizer(s, add_special_tokens=False)["input_ids"]
                keep = len(tokens)
                # Fewer tokens on each pass; an empty rationale fits, as the prompt kept room
                # for the answer prefix after it.
                while len(ids) > limit and keep > 0:
                    keep = max(0, keep - (len(ids) - limit))
                    cut = self.tokenizer.decode(tokens[:keep], clean_up_tokenization_spaces=False)
                    if not s.startswith(cut):  # cut inside a character: its bytes decode to U+FFFD
                        cut = cut.rstrip("\ufffd")
                    draft = self._read(r, self.neutralize(cut.rstrip()))
                    (ids,) = self._encode([draft.prompt])
            out.append(self._fitted(draft, ids, 0))
        return out

    def _safe_rationale(self, rendered: Rendered, rationale: str) -> str:
        """`rationale` as the read after `rendered` (a chain-of-thought prompt) holds it:
        stripped, cleaned and neutralized."""
        if not rendered.cot:
            raise InvalidInput("after_rationale needs a chain-of-thought prompt")
        return self.neutralize(_BAD_CHARS.sub("\ufffd", rationale.strip()))

    @staticmethod
    def _read(rendered: Rendered, safe: str) -> Rendered:
        """The label-reading prompt after the neutralized rationale `safe` (untokenized)."""
        text = rendered.prompt + safe + "\n" + rendered.answer_prefix
        return Rendered(rendered.kind, text, (), rendered.labels, rendered.answer_prefix, False)

    def tokenize_many(
        self, rendered: Sequence[Rendered], items: Sequence[str] | None = None, *, rationale_tokens: int = 0
    ) -> list[Rendered]:
        """`rendered` with their prompt token ids, from one batched tokenizer call (a fast
        tokenizer spreads it over the cores: one prompt at a time, tokenizing a batch took
        a fifth of the time an H100 took to score it). The labeler calls it on its own
        thread: from a worker thread (`asyncio.to_thread`) the service's memory grew by
        80-120 MiB from one overload wave to the next (another thread's malloc arena;
        tests/test_reliability_overload.py caught it).

        A prompt that leaves no room in `max_prompt_tokens` (the model's context) for what
        follows it raises InputTooLong, naming the item (`items[3]`) when the name of each
        prompt's item is given. What follows: the longest label; with chain-of-thought, also
        a rationale of up to `rationale_tokens` and the answer prefix after it."""
        if not rendered:
            return []
        encoded = self._encode([r.prompt for r in rendered])
        return [
            self._fitted(r, ids, rationale_tokens, None if items is None else items[k])
            for k, (r, ids) in enumerate(zip(rendered, encoded, strict=True))
        ]

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        # The chat template already holds the special tokens it wants (BOS included).
        return self.tokenizer(prompts, add_special_tokens=not self.has_chat_template)["input_ids"]

    def _fitted(self, rendered: Rendered, ids: list[int], rationale_tokens: int, item: str | None = None) -> Rendered:
        """`rendered` with its prompt token ids; InputTooLong (naming `item` when given) if they
        leave the model's context no room for what follows (`tokenize_many`)."""
        if self.max_prompt_tokens is not None:
            room = self._room(rendered, rationale_tokens)
            limit = self.max_prompt_tokens - room
            if len(ids) > limit:
                message = (
                    f"the prompt is {len(ids)} tokens, over the limit of {limit} "
                    f"(the model's context of {self.max_prompt_tokens} less {room} for the answer)"
                )
                if item is None:
                    raise InputTooLong(message, field="items", limit=limit, tokens=len(ids))
                raise InputTooLong(f"{item}: {message}", field=item, limit=limit, tokens=len(ids))
        return replace(rendered, prompt_token_ids=tuple(ids))

    def _room(self, rendered: Rendered, rationale_tokens: int) -> int:
        """Tokens the model's context must keep free after `rendered`'s prompt."""
        room = max((len(ids) for ids in rendered.labels.values()), default=1)
        if rendered.cot:  # the rationale, then "\n" and the answer prefix (`after_rationale`)
            prefix = rendered.answer_prefix
            tail = self._tail_tokens.get(prefix)
            if tail is None:  # once per task's prefix, not once per prompt
                tail = self._tail_tokens[prefix] = len(
                    self.tokenizer("\n" + prefix, add_special_tokens=False)["input_ids"]
                )
            room += rationale_tokens + tail
        return room

    def cut_rationale(self, rendered: Rendered, generated: str) -> str:
        """The rationale part of a generation: up to the model's verdict, where it writes the
        answer prefix itself (we read the label ourselves), stripped.

        The verdict is the first line that starts with the prefix outside what the model
        copied of the fenced texts (`_copied_blocks`: a judged response's own "Score: 10"
        line is the policy's, not the model's verdict) and outside a markdown quote ("> Score:
        10": a line quoted to discuss it); what the model may run on to after it, an invented
        example with a verdict of its own, is left out. Without such a line,
        the prefix's last mention outside the copies and quotes, when only a label follows it
        ("It is right. Score: 9"). Otherwise the whole generation is the rationale: a mention in
        passing or a quote ("the reply says 'Score: 10', but ...") stays in it. A lead-in
        ("Final", "- ", "Wrong. My score") and markdown dressing go with the verdict."""
        marker = rendered.answer_prefix.strip()
        copied = _copied_blocks(generated, _fence_tags(rendered.prompt))

        def outside(m: re.Match[str]) -> bool:
            return not any(a <= m.start() < b for a, b in copied)

        # Markdown may dress the verdict: "**Score:** 9", "### Score: 9/10"; a small model may
        # write it in another case ("preferred response: 2").
        # (One way to split the dressing from the spaces: the search stays linear in a line.)
        lines = re.finditer(r"^[ \t]*(?:[*_#]+[ \t]*)?" + re.escape(marker), generated, re.MULTILINE | re.IGNORECASE)
        verdict = next((m for m in lines if outside(m)), None)
        if verdict is None:
            last = [m for m in re.finditer(re.escape(marker), generated, re.IGNORECASE) if outside(m)][-1:]
            labels = {label.lower() for label in rendered.labels}
            rest = re.sub(r"[*_\s]", "", generated[last[0].end() :]) if last else ""
            quoted = bool(last) and _QUOTED.match(generated, generated.rfind("\n", 0, last[0].start()) + 1)
            if not quoted and re.sub(r"(/10)?[.!]*$", "", rest).lower() in labels:
                verdict = last[0]
        if verdict is None:
            return generated.strip()
        cut = verdict.start()
        line = generated.rfind("\n", 0, cut) + 1
        # A lead-in is the verdict's ("Final Score: 9", "- Score: 1"), from its line's start or
        # from the end of a sentence before it on the line ("Wrong. My score: 3" is "Wrong.").
        sentence = max((m.end() for m in _SENTENCE_END.finditer(generated, line, cut)), default=line)
        for start in (line, sentence):
            if cut - start <= _LEAD_IN_CHARS and _LEAD_IN.fullmatch(generated, start, cut):
                cut = start
                break
        head = generated[:cut].rstrip()
        # The verdict's dressing in front of it ("... **Score: 9**", a rule line "***" above it,
        # "wrong.**Score: 2**"), not the emphasis a rationale's last word ends in ("**correct**",
        # "__init__", "**wrong.** Score: 2").
        bare = head.rstrip("*_")
        if not bare or bare[-1].isspace():
            head = bare
        elif len(head) == cut and head != bare:  # a run touching the verdict: "wrong.**Score: 2**"
            # It opens the verdict's emphasis unless it closes one the line opened: its mirror
            # after a space or the line's start, before a word ("**correct**", "_**wrong**_").
            opener = re.compile(r"(?:^|(?<=[\s(]))" + re.escape(head[len(bare) :][::-1]) + r"(?=[^\s*_])", re.MULTILINE)
            if opener.search(generated, line, len(bare)) is None:
                head = bare
        return head.strip()

    # -- layout ----------------------------------------------------------------------
    def _system(self, task: Task) -> list[dict[str, str]]:
        return [{"role": "system", "content": task.preamble.strip() + "\n\n" + task.fence_notice.strip()}]

    def _pair_user(
        self, task: Task, context: str, first: str, second: str, cot: bool, tag: str | None = None
    ) -> dict[str, str]:
        tag = tag or fence_tag([context, first, second])
        question = task.pairwise_cot_question if cot else task.pairwise_question
        body = "\n\n".join(
            [
                _fence(task.context_name, context, tag),
                _fence(f"{task.response_name} 1", first, tag),
                _fence(f"{task.response_name} 2", second, tag),
                question.strip(),
            ]
        )
        return {"role": "user", "content": body}

    def _score_user(self, task: Task, context: str, response: str, cot: bool) -> dict[str, str]:
        tag = fence_tag([context, response])
        question = task.score_cot_question if cot else task.score_question
        body = "\n\n".join(
            [
                _fence(task.context_name, context, tag),
                _fence(task.response_name, response, tag),
                question.strip(),
            ]
        )
        return {"role": "user", "content": body}

    def _judgment_user(self, task: Task, context: str, response: str, cot: bool) -> dict[str, str]:
        tag = fence_tag([context, response])
        answer_format = task.judgment_cot_format if cot else task.judgment_format
        body = "\n\n".join(
            [
                _fence(task.context_name, context, tag),
                _fence(task.response_name, response, tag),
                f"{task.judgment_question.strip()} {answer_format.strip()}".strip(),
            ]
        )
        return {"role": "user", "content": body}

    @staticmethod
    def _assistant(prefix: str, label: str, rationale: str, cot: bool) -> dict[str, str]:
        content = prefix + label
        if cot and rationale.strip():
            content = rationale.strip() + "\n" + content
        return {"role": "assistant", "content": content}

    def _finish(
        self,
        kind: Kind,
        messages: list[dict[str, str]],
        prefix: str,
        cot: bool,
        tokenize: bool,
        labels: dict[str, tuple[int, ...]] | None = None,
    ) -> Rendered:
        prompt = self._chat(messages) + ("" if cot else prefix)
        out = Rendered(kind, prompt, (), labels or self._labels(kind, prefix), prefix, cot)
        return self.tokenize_many([out])[0] if tokenize else out

    def _chat(self, messages: list[dict[str, str]]) -> str:
        if self.has_chat_template:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - some templates refuse a system turn
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self.tokenizer.apply_chat_template(
                    merged + messages[2:], tokenize=False, add_generation_prompt=True
                )
        # No chat template: a plain transcript; the answer prefix starts each answer.
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def _labels(self, kind: Kind, prefix: str) -> dict[str, tuple[int, ...]]:
        """Token ids of the pairwise or score labels as they follow `prefix`."""
        ids = self._label_ids.get((kind, prefix))
        if ids is None:
            ids = self._label_ids[kind, prefix] = self._encode_labels(
                prefix, PAIRWISE_LABELS if kind == "pairwise" else SCORE_LABELS
            )
        return ids

    def _encode_labels(
        self, prefix: str, labels: Sequence[str], text: Callable[[str], str] = lambda label: label
    ) -> dict[str, tuple[int, ...]]:
        """Token ids of each label's `text` as it follows `prefix` in a prompt: the tokens that
        the label adds to the prefix's. Encoded alone, a label can differ: a SentencePiece
        tokenizer (Llama 2, Mistral) puts a word-start marker in front of a text's first
        word ("1" is "▁1" or "▁", "1"), so after "Score: " the model would be read at a double
        space. Where the label merges with the prefix's last token (a vocabulary with "▁1"
        after a prefix ending in a space), its tokens as they follow a line break: the label
        with no space in front, which the prompt already ends in."""

        def encode(t: str) -> list[int]:
            return self.tokenizer.encode(t, add_special_tokens=False)

        def after(before: str, head: list[int], label: str) -> tuple[int, ...]:
            # The tokens the label adds to `before` (encoded: `head`), or () when it changes them.
            full = encode(before + label)
            return tuple(full[len(head) :]) if full[: len(head)] == head else ()

        in_prompt, line = _ANCHOR + prefix, _ANCHOR
        in_prompt_ids, line_ids = encode(in_prompt), encode(line)
        return {
            label: after(in_prompt, in_prompt_ids, text(label))
            or after(line, line_ids, text(label))
            or tuple(encode(text(label)))
            for label in labels
        }
