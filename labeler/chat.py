"""Chat transcripts: the chat-template markup training frameworks send, parsed into messages,
and the one canonical transcript the labeler is shown for every context.

Frameworks hand over the same dialogue in different shapes: TRL as `{"role", "content"}`
messages (or as a string a chat template already laid out), OpenRLHF as the policy's decoded
tokens (prompt and response with the template's markup), verl as whatever the data put in
`extra_info`. Judged as they come, one dialogue got different rewards per framework, and
end-of-turn markers moved the reward of the response they ended. So every context is brought
to one canonical transcript, and every response loses its end-of-turn markers, before the
prompt is built and before the cache key is computed: same dialogue, same reward, same cache
entry.

Templates recognized, when a string starts with their markup (after a BOS token):

    ChatML (Qwen, SmolLM, ...)  <|im_start|>user\\n...<|im_end|>
    ChatML, Phi-4's variant     <|im_start|>user<|im_sep|>...<|im_end|>
    Llama 3                     <|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>
    Llama 2 / Mistral           [INST] <<SYS>>...<</SYS>> ... [/INST] ...</s>
    Gemma                       <start_of_turn>user\\n...<end_of_turn>   ("model" is the assistant)
    Phi-3                       <|user|>\\n...<|end|>
    DeepSeek (V2.5, V3, R1)     system<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>
                                (its system prompt stands bare in front: a user marker
                                further in counts after DeepSeek's BOS or when an
                                assistant marker follows it)
    gpt-oss (harmony)           <|start|>user<|message|>...<|end|>
                                <|start|>assistant<|channel|>final<|message|>...<|return|>
                                (its system message is the template's own and is dropped,
                                the developer message is the system prompt; a turn's
                                analysis becomes its reasoning block)
    plain transcripts           Human: / User: / System: / Assistant: / Tool: turns (any case)
                                separated by blank lines (Anthropic HH, TRL's simple template,
                                DeepSeek LLM, and the canonical form itself), or by single
                                newlines where that alone gives a dialogue (OpenRLHF's
                                `User: {}\nAssistant: ` prompt template)

The canonical transcript:
- a lone user message is its content, as is (a plain-text prompt and the same prompt as one
  user message read the same), unless that text would read as a transcript of its own
  ("User: hi", "[INST] ..."): then `User: content`, so the transcript reads back as itself;
- otherwise one `Role: content` block per message, joined by blank lines, with the roles
  System, User, Assistant and Tool;
- contents are trimmed and lose trailing end-of-turn markers, an assistant's also the empty
  reasoning block a template puts in front of its answer (`<think></think>`), whether the
  dialogue came as text or as messages; an assistant's reasoning block that only closes
  (its "<think>" was the template's, as DeepSeek R1's generation prompt writes it) gets its
  opening tag back, and an opening tag is followed by one newline; messages left empty are
  dropped (a template's open assistant turn, an empty system turn);
- a message's tool calls (OpenAI's and TRL's `tool_calls`) follow its content, one
  `[call functions.NAME] ARGUMENTS` block each, as harmony's transcripts write them, and as
  the `<tool_call>` blocks at the end of a ChatML assistant turn read (Qwen's and Hermes'
  layout: JSON, or Qwen 3.5's and later's `<function=NAME>` and `<parameter=NAME>` blocks);
  `<tool_response>` blocks in a ChatML turn are tool turns, and the tool list Qwen's
  templates write into the system turn (and Qwen 3.8's reasoning effort) are the
  template's, dropped.
The canonical transcript reads as itself: given again (a batch run through the service), it
is read the same, and so has the same key and label. Where a first reading still reads as
other turns (a lone user message whose lines open turns of their own, a header its stripped
end marker had hidden), it is read again until it does (a few readings at most).

A response loses surrounding whitespace and trailing end-of-turn markers (`END_MARKERS`, or
the set given), and its reasoning block takes the same form as an assistant turn's; one that
goes on past its turn into ChatML turns (an agent's rollout: its calls' results, its next
turns) is read as those turns, as a response given as messages (after a ChatML prompt at any
turn header, as in the query read whole; elsewhere once it ended its turn, `<|im_end|>`;
never inside a code block that closes after the header). What is
left may be empty: an empty response is judged like any other (the
labeler is shown its response block with nothing inside). A response given as messages (a
conversational completion; with tools, the policy's turns and the tools' results in turn) is
judged as text too (`response_text`): its assistant turns as their content and tool calls,
its other turns as `Role: content` blocks, joined by blank lines; a lone assistant message
reads as its content, as the same completion given as text does.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "END_MARKERS",
    "clean_content",
    "clean_response",
    "context_text",
    "normalize_item",
    "parse",
    "render",
    "response_text",
    "split_query",
]

Message = dict[str, str]

# Padding tokens, as decoded text: a batch decoded with its padding has them around each
# sequence (besides end-of-sequence tokens, which many tokenizers pad with).
PAD_TOKENS: tuple[str, ...] = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "[PAD]")

# Tokens that end a turn or a sequence, as decoded text. Stripped from the end of responses
# and message contents (configurable: the service's `end_markers` setting).
END_MARKERS: tuple[str, ...] = (
    "<|im_end|>",  # ChatML
    "<|endoftext|>",  # GPT-2 family, Qwen, Phi
    "<|end_of_text|>",  # Llama 3
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 (end of message, tool call)
    "<|end|>",  # Phi-3, gpt-oss
    "<|return|>",  # gpt-oss (end of the final answer)
    "<|call|>",  # gpt-oss (end of a tool call)
    "<end_of_turn>",  # Gemma
    "<eos>",  # Gemma
    "</s>",  # Llama 2, Mistral
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "<|end▁of▁sentence|>",  # DeepSeek, as some tokenizers spell it in ASCII bars
    *PAD_TOKENS,  # padding after the end
)

# Sequence starts, dropped wherever a turn begins.
# A byte-order mark too: Python's whitespace is not its, and a file or a tokenizer may leave one.
_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<｜begin▁of▁sentence｜>", "<|startoftext|>", "\ufeff")

_ROLE_NAMES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "human": "User",
    "assistant": "Assistant",
    "model": "Assistant",
    "gpt": "Assistant",
    "bot": "Assistant",
    "tool": "Tool",
    "ipython": "Tool",
    "function": "Tool",
}
_CANONICAL_ROLES = {"System": "system", "User": "user", "Assistant": "assistant", "Tool": "tool"}

# An empty reasoning block that a template puts in front of an answer (Qwen 3 with thinking
# off, DeepSeek R1's open "<think>" generation prompt): template, not content.
_CLOSING_RUN = re.compile(r"(?:\s*</think>)+\s*")
# Opening tags in a row: a policy that writes "<think>" after a generation prompt that ends in one.
_OPENING_RUN = re.compile(r"\A\s*<think>(?:\s*<think>)+")
_EMPTY_THINK = re.compile(r"\A\s*<think>\s*(?:</think>\s*)?\Z|\A\s*(?:<think>\s*</think>\s*)+")


@dataclass(frozen=True)
class _Template:
    starts: tuple[str, ...]  # how a string laid out by this template begins (after a BOS)
    header: re.Pattern[str]  # one turn's opening; group 1 is the role
    ends: tuple[str, ...] = ()  # the template's own turn ends, stripped from contents
    preamble: re.Pattern[str] | None = None  # what the template itself writes in front of a system turn


# The system prompts ChatML templates write where the dialogue has none (SmolLM2's, Qwen 2.5's,
# Qwen 2's): the template's words, not the dialogue's. A system message of exactly these
# words is left out of the transcript (`_render`), laid out as text or given as a message.
_DEFAULT_SYSTEM = re.compile(
    r"\A\s*(?:You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    r"|You are Qwen, created by Alibaba Cloud\. You are a helpful assistant\."
    r"|You are a helpful assistant\.)\s*\Z"
)

_TEMPLATES = (
    # ChatML; Phi-4 ends the role with "<|im_sep|>" instead of a newline. A header is a role
    # name and its line's end: the marker's text inside a turn ("use <|im_start|> tokens") is
    # no header.
    _Template(
        ("<|im_start|>",),
        # What follows the role name on its line ("name=..." in OpenAI's ChatML) is not read.
        re.compile(r"<\|im_start\|>([A-Za-z][\w.-]*)(?:[ \t][^\n<]*)?(?:<\|im_sep\|>|\r?\n|\Z)"),
        ("<|im_end|>",),
    ),
    _Template(
        ("<|start_header_id|>",),
        re.compile(r"<\|start_header_id\|>([^<\n]*)<\|end_header_id\|>\n*"),
        ("<|eot_id|>", "<|eom_id|>"),
        # Llama 3.1 to 3.3 date every system turn (3.2 with the day it renders), and mark one
        # with tools: the template's words, not the dialogue's.
        re.compile(r"\A\s*(?:Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*(?:\n|\Z)"),
    ),
    _Template(("<start_of_turn>",), re.compile(r"<start_of_turn>([A-Za-z][\w.-]*)(?:\r?\n|\Z)"), ("<end_of_turn>",)),
    _Template(
        ("<|system|>", "<|user|>", "<|assistant|>"),
        re.compile(r"<\|(system|user|assistant|tool)\|>\n?"),
        ("<|end|>",),
    ),
)
_CHATML = _TEMPLATES[0]  # the layout a response that goes on into turns is read in (`_chatml_reply`)
# DeepSeek puts the system prompt bare in front of the first turn.
_DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
_DEEPSEEK = _Template(("<｜User｜>",), re.compile(r"<｜(User|Assistant)｜>"), ("<｜end▁of▁sentence｜>",))
# gpt-oss's harmony format: a message's header names its role (and a recipient, "to=..."),
# then its channel; its end tells a finished answer (<|return|>) and a tool call (<|call|>)
# from other messages. A header with no message after it ends the text: the generation prompt.
_HARMONY = _Template(
    ("<|start|>",),
    # Group 1: role and recipient, then "<|channel|>" and the channel, then "<|constrain|>"
    # and a format (each part optional), as `_harmony` splits them.
    re.compile(
        r"<\|start\|>((?:[^<]|<\|(?:channel|constrain)\|>)*)"
        r"(?:<\|message\|>|(?=<\|(?:end|return|call|start)\|>)|\Z)"
    ),
    ("<|end|>", "<|return|>", "<|call|>"),
)
# The tool list gpt-oss's template writes at the end of the developer message (each search
# stops at the next list, so an unclosed one costs linear time).
_HARMONY_TOOLS = re.compile(
    r"(?:\A|\n\n)# Tools\n\n## functions\n\nnamespace functions \{(?:(?!namespace functions \{).)*?"
    r"\} // namespace functions\Z",
    re.DOTALL,
)
# What a response after a harmony prompt starts with: the channel of the policy's first message
# (the prompt's generation prompt wrote its "<|start|>assistant"), or a header of its own.
_HARMONY_REPLY = ("<|channel|>", "<|start|>")
# How many wrappings a response is taken out of (harmony headers in front of its text, empty
# reasoning blocks): a policy's output holds one or two; past this many, a run of them (each
# unwrapping reads the whole text again) is judged as written, in time linear in its length.
_MAX_UNWRAP = 8
# How many readings a context takes to read as itself: one or two; past this many (contrived
# markup), the last reading is kept.
_MAX_READS = 8
# Every template's own turn ends (Llama 2's "</s>" besides): a set of end markers holding
# them all strips whatever a template's turn ends with.
_TEMPLATE_ENDS = frozenset({*(end for t in (*_TEMPLATES, _DEEPSEEK, _HARMONY) for end in t.ends), "</s>"})
# Role names in any case: "user: ..." is how older clients wrote transcripts. A turn opens
# after a blank line (CRLF too); only spaces and tabs may stand around that line's newlines,
# so that a long run of newlines is scanned in linear time, not once per newline.
_PLAIN_ROLES = ("human", "user", "system", "assistant", "tool")
_PLAIN_ROLE = "(?i:" + "|".join(_PLAIN_ROLES) + ")"
_PLAIN_HEADER = re.compile(r"(?:\A\s*|\n[ \t]*\r?\n[ \t]*)(" + _PLAIN_ROLE + r"):[ \t]?")
_PLAIN_START = re.compile(r"\A\s*(" + _PLAIN_ROLE + "):")
# A turn opening after one newline, for transcripts that separate turns by one.
_PLAIN_LINE_HEADER = re.compile(r"(?:\A\s*|\n[ \t]*)(" + _PLAIN_ROLE + r"):[ \t]?")
# How Qwen 2.5's and Qwen 3's templates open and close the tool list they write into the system turn.
_QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>",
)
# How Qwen 3.5's and later templates open and close theirs (at the start of the system turn,
# the system prompt after it), and the reasoning effort Qwen 3.8's states there.
_QWEN_XML_TOOLS = (
    "# Tools\n\nYou have access to the following functions:\n\n<tools>",
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the "
    "specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> "
    "XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function "
    "call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, "
    "answer the question like normal with your current knowledge and do not tell the user about function "
    "calls\n</IMPORTANT>",
)
# Both stand at the start of a ChatML system turn, where alone they are read as the template's.
_SYSTEM_START = r"(?<=<\|im_start\|>system\n)"
_REASONING_EFFORT = re.compile(
    _SYSTEM_START
    + r"Reasoning effort is set to (?:xhigh\. Please think carefully through the task, validate key assumptions, "
    r"consider plausible alternatives, and prioritize correctness, consistency, and clarity in the final answer\."
    r"|low\. Keep your thinking brief and focused, moving directly to the conclusion without unnecessary "
    r"elaboration\.)(?:\n\n|(?=<\|im_end\|>))"
)
# Qwen's and Hermes' layout of tool calls (ChatML): an assistant turn's calls after its content,
# a `<tool_call>` block of JSON (`{"name", "arguments"}`) each; the tools' results in a user
# turn (Qwen's) or a tool turn (Hermes'), a `<tool_response>` block each.
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"
_RESULT_OPEN, _RESULT_CLOSE = "<tool_response>", "</tool_response>"
# Qwen 3.5's and later templates' layout of a call inside its `<tool_call>` block:
# `<function=NAME>`, then a `<parameter=NAME>` block a line each side of its value.
_FUNCTION_OPEN = "<function="
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>\n(.*)</function>", re.DOTALL)
# A value ends where a closing line is followed by the next parameter or the function's end
# (a value may hold a closing line of its own: an agent writing XML).
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>\n(?=<parameter=|\Z)", re.DOTALL)
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def _written_block(opening: str, closing: str, lead: str = "") -> re.Pattern[str]:
    """A block a template writes from `opening` to `closing` (both as written), `lead` in
    front where it stands; each search stops at the next opening, so that text with many
    unclosed ones is scanned in linear time."""
    o = re.escape(opening)
    return re.compile(lead + o + r"(?:(?!" + o + r").)*?" + re.escape(closing), re.DOTALL)


# What a template writes wherever it puts it, no part of the dialogue, as (a marker it
# starts with, the whole of it): an image or a video in a Qwen-VL prompt (a placeholder token
# per patch; the labeler reads text only, as it reads a message's text parts), Mistral's tool
# list (in front of the first or the last [INST]), Qwen's tool list and call instructions (at
# the end of the system turn, Qwen 2.5's and 3's, the whole of it where the dialogue has no
# system prompt of its own; at its start, Qwen 3.5's and later's), Qwen 3.8's reasoning effort.
_TEMPLATE_WRITTEN = (
    ("<|vision_start|>", re.compile(r"<\|vision_start\|>(?:<\|(?:image|video)_pad\|>)*<\|vision_end\|>")),
    ("[AVAILABLE_TOOLS]", _written_block("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]")),
    (_QWEN_TOOLS[0], _written_block(*_QWEN_TOOLS, lead=r"(?:\n\n)?")),
    ("Reasoning effort is set to ", _REASONING_EFFORT),  # before the tool list it stands in front of
    (_QWEN_XML_TOOLS[0], _written_block(*_QWEN_XML_TOOLS, lead=_SYSTEM_START)),
)
# What every string a template laid out starts with (a BOS or a turn header, "[INST]", a
# plain role name), DeepSeek aside.
_MAYBE_MARKUP = re.compile(r"[\s\ufeff]*(?:[<\[]|" + _PLAIN_ROLE + ":)")
# A turn holds no "[INST]" of its own: each search stops at the next one, so that text with
# many unclosed ones is scanned in linear time.
_INST = re.compile(r"\[INST\]((?:(?!\[INST\]).)*?)\[/INST\]", re.DOTALL)
_LLAMA2_SYS = re.compile(r"\A\s*<<SYS>>\n?(.*?)\n?<</SYS>>\s*", re.DOTALL)
_MISTRAL_SYS = re.compile(r"\[SYSTEM_PROMPT\]((?:(?!\[SYSTEM_PROMPT\]).)*?)\[/SYSTEM_PROMPT\]", re.DOTALL)


def _markers(end_markers: Iterable[str]) -> tuple[str, ...]:
    if type(end_markers) is tuple and "" not in end_markers:
        return end_markers
    return tuple(m for m in end_markers if m)


def _strip_bos(text: str) -> str:
    # An index moves past the tokens: slicing after each would copy the text once per token.
    at = len(text) - len(text.lstrip())
    if not text.startswith(_BOS, at):
        return text
    while text.startswith(_BOS, at):
        at += len(next(b for b in _BOS if text.startswith(b, at)))
        while at < len(text) and text[at].isspace():
            at += 1
    return text[at:]


def clean_content(text: str, end_markers: Iterable[str] = END_MARKERS) -> str:
    """`text` without surrounding whitespace, sequence-start tokens in front, or end-of-turn
    markers at its end (repeatedly: "Paris.<|im_end|>\n<|endoftext|>" gives "Paris.")."""
    return _clean(text, _markers(end_markers))


def _clean(text: str, markers: tuple[str, ...]) -> str:
    # Runs on every item of every request, cache hits included: the common case (no marker)
    # costs one tuple-startswith and one tuple-endswith.
    text = text.strip()
    if text.startswith(_BOS):
        text = _strip_bos(text).strip()
    if not (markers and text.endswith(markers)):
        return text
    end = len(text)  # moved back past the markers: slicing after each would copy the text each time
    while text.endswith(markers, 0, end):
        end -= len(next(m for m in markers if text.endswith(m, 0, end)))
        while end and text[end - 1].isspace():
            end -= 1
    return text[:end]


def clean_response(text: str, end_markers: Iterable[str] = END_MARKERS) -> str:
    """A response as the labeler judges it: surrounding whitespace and trailing end-of-turn
    markers removed, and its reasoning block in one form: an empty one in front (a
    template's) dropped, one the template opened given its opening tag back. May be empty."""
    return _clean_response(text, _markers(end_markers))


def _clean_response(text: str, markers: tuple[str, ...]) -> str:
    return _chatml_reply(_one_reply(text, markers), markers)


def _one_reply(text: str, markers: tuple[str, ...]) -> str:
    """A response cleaned as one turn (`clean_response` but for the turns it may go on into)."""
    return _harmony_reply(_turn_content("Assistant", text, markers), markers)


def _chatml_reply(text: str, markers: tuple[str, ...], after_chatml: bool = False) -> str:
    """A cleaned response that went on past its turn into turns of ChatML markup (its tool
    calls' results and its next turns, or a policy writing on into a turn of another role)
    read as those turns, as the same completion given as messages is (`response_text`); any
    other response as it is. A header inside a code block (closed after it) opens none (a response that quotes
    ChatML is read as written); after a ChatML prompt (`after_chatml`) any other does, as in
    the query read whole (`parse`); elsewhere only one after the response ended its turn
    (`<|im_end|>`)
    Read again while that finds more turns (a turn end a reading took off can leave a
    header), a few readings at most."""
    for _ in range(_MAX_READS):
        header = _CHATML.header.search(text) if "<|im_start|>" in text else None
        if header is None:
            break
        # Inside a code block, one opened before it and closed after it, the header is quoted
        # (a fence left open, as a policy cut off in its code leaves one, quotes nothing).
        quoted = text.count("```", 0, header.start()) % 2 and text.find("```", header.end()) != -1
        if quoted or (not after_chatml and not text[: header.start()].rstrip().endswith(_CHATML.ends)):
            break
        turns = parse("<|im_start|>assistant\n" + text, markers) or []
        if len(turns) < 2:
            break
        text = _response_text(turns, markers, _one_reply)
    return text


def _harmony_reply(text: str, markers: tuple[str, ...]) -> str:
    """A cleaned response as its one assistant turn when it is the policy's harmony messages
    (after its prompt's "<|start|>assistant"), as the turns it goes on into when it goes on
    past that turn (read as a response given as messages), else as it is."""
    for _ in range(_MAX_UNWRAP):
        if not text.startswith(_HARMONY_REPLY):
            break
        turns = _harmony(text if text.startswith("<|start|>") else "<|start|>assistant" + text)
        if not turns or turns[0]["role"] != "assistant":
            break
        if len(turns) > 1:  # it went on past its turn (a tool's result, its next turn): those turns
            reply = _response_text(turns, markers, _assistant_turn)
        else:
            reply = _turn_content("Assistant", turns[0]["content"], markers)
        if reply == text:
            break
        text = reply
    return text


def _assistant_turn(text: str, markers: tuple[str, ...]) -> str:
    return _turn_content("Assistant", text, markers)


def _role(role: Any) -> str:
    name = str(role or "user").strip()
    return _ROLE_NAMES.get(name.lower(), name.capitalize() or "User")


def _turns(text: str, pattern: re.Pattern[str], lead_role: str | None = None) -> list[Message]:
    """Split `text` at the turn headers `pattern` finds; text in front of the first header
    becomes a `lead_role` message (dropped without one)."""
    matches = list(pattern.finditer(text))
    messages: list[Message] = []
    lead = text[: matches[0].start()] if matches else text
    if lead_role and lead.strip():
        messages.append({"role": lead_role, "content": lead})
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        messages.append({"role": m.group(1), "content": text[m.end() : end]})
    return messages


def _llama2(text: str) -> list[Message]:
    messages: list[Message] = []
    turns = list(_INST.finditer(text))
    lead = text[: turns[0].start()] if turns else text
    system = _MISTRAL_SYS.search(lead)
    if system:
        messages.append({"role": "system", "content": system.group(1)})
    for k, m in enumerate(turns):
        user = m.group(1)
        sys_block = _LLAMA2_SYS.match(user)
        if sys_block:
            messages.append({"role": "system", "content": sys_block.group(1)})
            user = user[sys_block.end() :]
        messages.append({"role": "user", "content": user})
        end = turns[k + 1].start() if k + 1 < len(turns) else len(text)
        answer = text[m.end() : end].rstrip()
        # Llama 2 opens each later turn with a new BOS: "answer </s><s>[INST] ...".
        if k + 1 < len(turns) and answer.endswith(_BOS):
            answer = _strip_trailing_bos(answer)
        messages.append({"role": "assistant", "content": answer})
    return messages


def _strip_trailing_bos(text: str) -> str:
    bos = next(b for b in _BOS if text.endswith(b))
    return text[: -len(bos)]


def _raw_turns(body: str, deepseek_bos: bool = False) -> tuple[list[Message], tuple[str, ...]] | None:
    """The turns of `body` (a BOS already dropped: `deepseek_bos` when it was DeepSeek's) and
    its template's turn ends, or None."""
    head = body.lstrip()
    for t in _TEMPLATES:
        if head.startswith(t.starts):
            turns = _turns(body, t.header)
            if t.preamble is not None:
                for m in turns:
                    if m["role"].strip().lower() == "system":
                        m["content"] = t.preamble.sub("", m["content"], count=1)
            return turns, t.ends
    if head.startswith(_HARMONY.starts):
        return _harmony(body), _HARMONY.ends
    if head.startswith(("[INST]", "[SYSTEM_PROMPT]")):
        return _llama2(body), ("</s>",)
    if _deepseek(head, deepseek_bos):
        return _turns(body, _DEEPSEEK.header, "system"), _DEEPSEEK.ends
    if _PLAIN_START.match(body):
        # DeepSeek LLM ends each answer with its EOS and starts the next turn right after it.
        for marker in END_MARKERS:
            if marker in body:
                body = body.replace(marker + "User:", marker + "\n\nUser:")
        turns = _turns(body, _PLAIN_HEADER)
        if len(turns) == 1:  # no blank line between turns: one newline, where that reads as a dialogue
            lines = _turns(body, _PLAIN_LINE_HEADER)
            if _alternating([_role(m["role"]) for m in lines]):
                return lines, ()
        return turns, ()
    return None


def _alternating(roles: list[str]) -> bool:
    """Whether `roles` are a dialogue's: an optional system turn, then user and assistant
    turns in turn, an assistant's among them (so a prompt that quotes a chat log line by
    line is no dialogue of its own)."""
    if roles[:1] == ["System"]:
        roles = roles[1:]
    expected = ("User", "Assistant")
    return "Assistant" in roles and all(r == expected[k % 2] for k, r in enumerate(roles))


def _harmony(body: str) -> list[Message]:
    """The turns of a harmony transcript (gpt-oss): its system message, which the template
    writes (model identity, dates, reasoning effort, channels), dropped; the developer's
    (the system prompt, under "# Instructions") as the system turn; each run of assistant
    messages as one turn: its analysis as a reasoning block (left open when the text stops
    inside it), then its answers (final, and commentary: a preamble, or a tool call written
    as `[call <recipient>] <arguments>`); any other role (`functions.<name>`) as a tool turn."""
    messages: list[Message] = []
    reasoning: list[str] = []
    answers: list[str] = []
    open_think = False

    def close_turn() -> None:
        nonlocal reasoning, answers, open_think
        if reasoning or answers:
            think = "\n\n".join(reasoning)
            if open_think and not answers:
                text = f"<think>\n{think}"
            else:
                text = (f"<think>\n{think}\n</think>\n\n" if reasoning else "") + "\n\n".join(answers)
            messages.append({"role": "assistant", "content": text})
        reasoning, answers, open_think = [], [], False

    for m in _turns(body, _HARMONY.header):
        head, _, channel = m["role"].partition("<|constrain|>")[0].partition("<|channel|>")
        head_words, channel_words = head.split(), channel.split()
        role = head_words[0].lower() if head_words else "assistant"
        channel = channel_words[0] if channel_words else ""
        recipient = next((w[3:] for w in [*head_words, *channel_words] if w.startswith("to=")), None)
        text = m["content"]
        ended = text.rstrip().endswith(_HARMONY.ends)
        text = _clean(text, _HARMONY.ends)
        if role != "assistant":
            close_turn()
            if role == "developer":  # the system prompt, and the tool list the template writes after it
                text = _HARMONY_TOOLS.sub("", text).removeprefix("# Instructions").lstrip()
                messages.append({"role": "system", "content": text})
            elif role == "user":
                messages.append({"role": "user", "content": text})
            elif role != "system":  # a tool's result, which gpt-oss's template writes as JSON
                messages.append({"role": "tool", "content": _json_text(text)})
        elif channel == "analysis":
            reasoning.append(text)
            open_think = not ended
        elif recipient and not recipient.startswith("assistant"):
            answers.append(_call_block(recipient, text, ()))
        else:
            answers.append(text)
    close_turn()
    return messages


def _json_text(text: str) -> str:
    """The text a JSON string holds, or `text` as it is when it holds none."""
    if not text.startswith('"'):
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, str) else text


def _deepseek(head: str, bos: bool) -> bool:
    """True when DeepSeek's template laid `head` (a BOS already dropped) out. Its system
    prompt stands bare in front of the first turn, so a user turn marker inside a prompt is
    taken for the template only when it opens the text, when DeepSeek's BOS opened it, or
    when an assistant turn marker follows it (a query, a prompt with its generation prompt)."""
    user = head.find(_DEEPSEEK.starts[0])
    return user == 0 or (user > 0 and (bos or "<｜Assistant｜>" in head[user:]))


def _plain_text(text: str) -> bool:
    """True when no template laid `text` out. Most contexts are plain text: one match rules
    out every template (each starts with "<", "[" or a role name), one search DeepSeek's."""
    return not _MAYBE_MARKUP.match(text) and _DEEPSEEK.starts[0] not in text


def parse(text: str, end_markers: Iterable[str] = END_MARKERS) -> list[Message] | None:
    """The messages of a string laid out by a known chat template (see the module docstring),
    or None when `text` does not start with one. Roles come out as system / user /
    assistant / tool; contents are cleaned (`clean_content`); an assistant turn left open
    at the end (a generation prompt) is kept, with empty content."""
    found = _template_turns(text) if isinstance(text, str) else None
    if found is None:
        return None
    turns, ends = found
    markers = (*ends, *_markers(end_markers))
    if not turns and _clean(text, markers):  # markup opened and never laid out ("[INST] hi"): text
        return None
    out = []
    for m in turns:
        role = _role(m["role"])
        content = _turn_content(role, m["content"], markers)
        results = _tool_results(content) if role in ("User", "Tool") else None
        if results is not None:
            out.extend({"role": "tool", "content": _clean(r, markers)} for r in results)
        else:
            out.append({"role": _CANONICAL_ROLES.get(role, m["role"].strip().lower()), "content": content})
    return out


def _template_turns(text: str) -> tuple[list[Message], tuple[str, ...]] | None:
    """The raw turns of `text` and its template's turn ends (`_raw_turns`), or None when no
    known template laid it out."""
    if _plain_text(text):
        return None
    for marker, written in _TEMPLATE_WRITTEN:
        if marker in text:
            text = written.sub("", text)
    return _raw_turns(_strip_bos(text), text.lstrip().startswith(_DEEPSEEK_BOS))


def _turn_content(role: str, content: str, markers: tuple[str, ...]) -> str:
    """A turn's content as cleaned (`clean_content`), an assistant's with its reasoning block
    in one form (`_reasoning`): the same whether the turn came laid out as text or as a
    message, with or without the part the template wrote."""
    content = _clean(content, markers)
    if role == "Assistant" and content.endswith(_CALL_CLOSE):  # before the reasoning block's form
        content = _laid_out_calls(content, markers)
    for _ in range(_MAX_UNWRAP if role == "Assistant" else 0):
        if "think>" not in content:
            break
        reasoned = _reasoning(content)
        if reasoned == content:
            break
        content = _clean(reasoned, markers)  # a dropped block may leave a sequence start in front
    return content


def _laid_out_calls(content: str, markers: tuple[str, ...]) -> str:
    """An assistant turn's text whose `<tool_call>` blocks at its end (Qwen's and Hermes'
    layout of its calls) are written as `_with_tool_calls` writes a message's calls, so that
    the turn as text and as a message read the same; text with a block at its end that is
    not such a call is left as it is."""
    calls: list[dict[str, Any]] = []
    end = len(content)
    while content.endswith(_CALL_CLOSE, 0, end):
        start = content.rfind(_CALL_OPEN, 0, end)
        call = _laid_out_call(content[start + len(_CALL_OPEN) : end - len(_CALL_CLOSE)]) if start != -1 else None
        if call is None:
            return content
        calls.append(call)
        end = start
        while end and content[end - 1].isspace():
            end -= 1
    return _with_tool_calls(_clean(content[:end], markers), {"tool_calls": calls[::-1]}, markers)


def _laid_out_call(block: str) -> dict[str, Any] | None:
    """The call a `<tool_call>` block holds, `{"name", "arguments"}` as JSON (Qwen 2.5's, Qwen
    3's, Hermes') or a `<function=NAME>` block of `<parameter=NAME>` blocks (Qwen 3.5's and
    later, `_xml_call`), or None."""
    if block.lstrip().startswith(_FUNCTION_OPEN):
        return _xml_call(block.strip())
    try:
        call = json.loads(block)
    except (ValueError, RecursionError):  # not JSON (over 4,300 digits, nested too deep)
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        return None
    return call if set(call) <= {"name", "arguments"} else None


def _xml_call(block: str) -> dict[str, Any] | None:
    """The call of a `<function=NAME>` block, or None. A parameter's value is text the
    template wrote: JSON for an object or a list, and for the other values Qwen 3.6's and
    later's; Python's spelling for Qwen 3.5's booleans and None; a string as it is. So a value
    that reads as JSON (or as Python's True, False, None) is that value: a string argument
    that looks like a number or a boolean reads as one (the template does not tell them apart)."""
    function = _XML_FUNCTION.fullmatch(block)
    if function is None or not function[1].strip():
        return None
    arguments: dict[str, Any] = {}
    body, at = function[2], 0
    while at < len(body):
        parameter = _XML_PARAMETER.match(body, at)
        if parameter is None or parameter[1] in arguments:  # a name given twice: no call of a message's
            return None
        try:
            value = json.loads(parameter[2])
        except (ValueError, RecursionError):  # not JSON (text, Python's literals, too deep)
            value = _PYTHON_LITERALS.get(parameter[2], parameter[2])
        arguments[parameter[1]] = value
        at = parameter.end()
    return {"name": function[1], "arguments": arguments}


def _tool_results(content: str) -> list[str] | None:
    """The results of a turn made of `<tool_response>` blocks alone (Qwen's and Hermes' layout
    of the tools' results), or None."""
    if not (content.startswith(_RESULT_OPEN) and content.endswith(_RESULT_CLOSE)):
        return None
    results = []
    for part in content.split(_RESULT_CLOSE)[:-1]:
        part = part.strip()
        if not part.startswith(_RESULT_OPEN) or _RESULT_OPEN in part[len(_RESULT_OPEN) :]:
            return None
        results.append(part[len(_RESULT_OPEN) :])
    return results


def _reasoning(content: str) -> str:
    """An assistant's answer (cleaned) with its reasoning block in one form: a block the
    template opened (DeepSeek R1's generation prompt ends in "<think>", so the policy's text
    only closes it) gets its opening tag back, an empty block (Qwen 3 with thinking off) is
    dropped, and the opening tag is followed by one newline. So the policy's text, the turn
    as its template laid it out, and the text after a prompt read the same (also where the
    policy wrote the opening tag again after the template's: one opening tag)."""
    content = _OPENING_RUN.sub("<think>", content, count=1)
    for _ in range(_MAX_UNWRAP):
        if not content.startswith("<think>"):
            if not _holds_a_block(content):
                return content
            if content.startswith("</think>"):  # blocks the template opened that close at once: empty
                content = content[_CLOSING_RUN.match(content).end() :]
                continue
            content = "<think>" + content
        emptied = _EMPTY_THINK.sub("", content, count=1)
        if emptied == content:
            return "<think>\n" + content[len("<think>") :].lstrip()
        content = emptied
    return content


def _ends_a_block(content: str, close: int) -> bool:
    """Whether the "</think>" at `close` ends a reasoning block: opening the text, with a line
    break at either side (as a reasoning model writes it: "...\n</think>\n\nanswer"), or with
    the answer tag after it ("...</think> <answer>7</answer>", R1-Zero's format), rather than
    being mentioned in a sentence ("use the </think> tag", "close it with </think> <b>...")."""
    before = content[:close].rstrip(" \t")
    after = content[close + len("</think>") :].lstrip(" \t")
    return not before or before.endswith("\n") or after.startswith(("\n", "\r", "<answer>"))


def message_text(content: Any) -> str:
    """A message's `content` as text: a string as it is, none (an assistant turn that only
    called a tool) as "", OpenAI's content parts (a list, or one part) as their text parts
    joined by newlines; other parts (images) carry no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    if isinstance(content, Sequence):
        parts = (p if isinstance(p, str) else p.get("text") if isinstance(p, Mapping) else None for p in content)
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


# Where a reasoning model's message keeps its reasoning apart from its content: vLLM's and
# OpenAI-style `reasoning_content`, and `thinking` (what TRL parses some models' responses into).
REASONING_KEYS = ("reasoning_content", "thinking")


def _message_content(m: Mapping[str, Any], role: str) -> str:
    """A message's text, an assistant's with the reasoning it keeps apart in front as its
    reasoning block (unless its content holds one), as the same turn laid out as text has it."""
    text = message_text(m.get("content"))
    if role == "Assistant":
        reasoning = next((r for k in REASONING_KEYS if isinstance(r := m.get(k), str) and r.strip()), None)
        if reasoning is not None and not _holds_a_block(text):
            text = f"<think>\n{reasoning.strip()}\n</think>\n\n{text}"
    return text


def _holds_a_block(text: str) -> bool:
    """Whether an answer's text opens with a reasoning block (a `<think>` one, or one a
    template opened that only closes), rather than mentioning the tag."""
    text = text.lstrip()
    if text.startswith("<think>"):
        return True
    close = text.find("</think>")
    return close != -1 and "<think>" not in text[:close] and _ends_a_block(text, close)


def render(messages: Sequence[Mapping[str, Any]], end_markers: Iterable[str] = END_MARKERS) -> str:
    """The canonical transcript of `messages` (see the module docstring)."""
    markers = _markers(end_markers)
    text, quiet = _render(messages, markers)
    return text if quiet else _settled(text, markers)


def _render(messages: Sequence[Mapping[str, Any]], markers: tuple[str, ...]) -> tuple[str, bool]:
    """`render`'s first reading, and whether it surely reads as itself (`_quiet` contents)."""
    kept = []
    for m in messages:
        role = _role(m.get("role"))
        content = _with_tool_calls(_turn_content(role, _message_content(m, role), markers), m, markers)
        if content and not (role == "System" and _DEFAULT_SYSTEM.match(content)):  # as a template's text reads
            kept.append((role, content))
    # A role of another name ("Observation: ...") reads as part of the turn before it.
    quiet = all(role in _CANONICAL_ROLES and _quiet(content) for role, content in kept)
    if len(kept) == 1 and kept[0][0] == "User":
        content = kept[0][1]
        # Bare, unless as text it would read as a transcript of its own ("User: hi", "[INST]
        # ..."): then under its header, so that it is not read as the turns it names
        # ("System: ..."), and the transcript is read the same when it is given again (a
        # batch run through the service; `_settled` reads it until it does).
        if _plain_text(content) or parse(content, markers) is None:
            return content, quiet
        return f"User: {content}", False
    return "\n\n".join(f"{role}: {content}" for role, content in kept), quiet


# A line's first word, where a colon follows it (a role's header, when it names one).
_HEAD = re.compile(r"[ \t]*([A-Za-z]+):")
_LINE_HEAD = re.compile(r"\n[ \t]*([A-Za-z]+):")
_ROLE_WORDS = frozenset(_PLAIN_ROLES)
# Letters a case-blind match takes for the ASCII ones of a role's name ("ſystem:" is a header).
_FOLDS_TO_ASCII = "ſıİK"


def _quiet(content: str) -> bool:
    """Whether a turn's content holds nothing that may read otherwise in a transcript: no
    markup (a tag, a template's token, a bracket, DeepSeek's bar) and no line that opens with
    a role's name. A transcript of such contents reads as itself, without reading it again.
    (Substring tests first: a regex over every content would cost as much as the reading.)"""
    if "<" in content or "[" in content or "\ufeff" in content or "｜" in content:
        return False
    if not content.isascii() and any(c in content for c in _FOLDS_TO_ASCII):
        return False
    if ":" not in content:
        return True
    head = _HEAD.match(content)
    if head is not None and head[1].lower() in _ROLE_WORDS:
        return False
    return "\n" not in content or not any(m[1].lower() in _ROLE_WORDS for m in _LINE_HEAD.finditer(content))


def _read(text: str, markers: tuple[str, ...]) -> tuple[str, bool]:
    """One reading of a context given as text (its turns rendered, when a template laid it
    out), and whether that surely reads as itself."""
    if _plain_text(text):  # most contexts: no template to look for
        return _clean(text, markers), True
    messages = parse(text, markers)
    if messages is None:
        cleaned = _clean(text, markers)
        return cleaned, cleaned == text
    return _render(messages, markers)


def _settled(text: str, markers: tuple[str, ...]) -> str:
    """`_settling`, memoized for texts of up to `_MEMO_CHARS` (a few MB held at most)."""
    return _settled_memo(text, markers) if len(text) <= _MEMO_CHARS else _settling(text, markers)


_MEMO_CHARS = 16_384


def _settling(text: str, markers: tuple[str, ...]) -> str:
    """`text` read until it reads as itself: a reading can leave markup that reads as turns
    of its own (a turn's end marker cut off that kept a header from matching, a content laid
    out as a transcript). What the service reads of a transcript sent again is then what it
    was sent, and so are its key and its label."""
    for _ in range(_MAX_READS):
        again, quiet = _read(text, markers)
        if quiet or again == text:
            return again
        text = again
    return text


# A group's responses, both orders of a pair, a batch's samples share their context: its
# readings are done once.
_settled_memo = functools.lru_cache(maxsize=256)(_settling)


def response_text(messages: Sequence[Mapping[str, Any]], end_markers: Iterable[str] = END_MARKERS) -> str:
    """A response given as messages, as the labeler judges it: each assistant turn (a message
    without a role is one) as its content cleaned like a response given as text
    (`clean_response`) and its tool calls; any other turn (a tool's result) as a `Role:
    content` block; joined by blank lines, empty turns left out. A lone assistant message
    reads as its content alone: the same completion as text or as a message is judged the same."""
    return _response_text(messages, _markers(end_markers), _clean_response)


def _response_text(
    messages: Sequence[Mapping[str, Any]], markers: tuple[str, ...], clean: Callable[[str, tuple[str, ...]], str]
) -> str:
    """`response_text`, each reply read by `clean` (`_one_reply` for the turns `_chatml_reply`
    read, which it reads again itself)."""
    blocks = []
    for m in messages:
        role = _role(m.get("role") or "assistant")
        text = _message_content(m, role)
        if role == "Assistant":
            blocks.append(_with_tool_calls(clean(text, markers), m, markers))
        else:
            content = _with_tool_calls(_turn_content(role, text, markers), m, markers)
            blocks.append(f"{role}: {content}" if content else "")
    text = "\n\n".join(b for b in blocks if b)
    if len(messages) == 1 and role == "Assistant" and not messages[0].get("tool_calls"):
        return text  # a lone answer, cleaned as a text is: it reads as itself
    # Read as a response given as text until it reads as itself (a block may end in what a
    # text's cleaning takes off): the text sent again, as `labeler label --url` sends a
    # file's completions, is then judged as the messages were, under the same key.
    for _ in range(_MAX_READS):
        again = clean(text, markers)
        if again == text:
            break
        text = again
    return text


def _with_tool_calls(content: str, message: Mapping[str, Any], markers: tuple[str, ...] = ()) -> str:
    """`content` followed by `message`'s tool calls, a `[call functions.NAME] ARGUMENTS`
    block each (the form harmony's transcripts give a call: `_harmony`); a call as OpenAI's
    API writes it (`{"function": {"name", "arguments"}}`) or flat (`{"name", "arguments"}`,
    as chat templates such as Qwen's and Hermes' also take it); arguments as `_arguments`
    writes them; a call that names no function is not shown."""
    calls = message.get("tool_calls")
    if not calls or not isinstance(calls, Sequence) or isinstance(calls, str):  # none, or none to read
        return content
    blocks = [content] if content else []
    for call in calls:
        function = (call.get("function") or call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not function.get("name"):
            continue
        blocks.append(_call_block(f"functions.{function['name']}", function.get("arguments"), markers))
    return "\n\n".join(blocks)


def _call_block(recipient: str, arguments: Any, markers: tuple[str, ...]) -> str:
    """One call as the transcript writes it, from a message or from harmony's markup alike:
    `[call RECIPIENT] ARGUMENTS`, nothing after the recipient where there are no arguments."""
    return f"[call {recipient}] {_arguments(arguments, markers)}".rstrip()


def _arguments(arguments: Any, markers: tuple[str, ...]) -> str:
    """A call's arguments as one text: JSON (an object, or a text of JSON) written as
    `json.dumps` writes it, and a JSON string as the text it holds (a template that writes
    arguments given as text as JSON, gpt-oss's and Qwen 2.5's), so that the same call reads
    the same whether its template wrote the arguments as given or as JSON of its own; any
    other text cleaned as it is. No arguments and an empty object are one (nothing), as
    templates that write parameter blocks (Qwen 3.5's) lay them out alike."""
    if arguments is None:
        return ""
    value = arguments
    for _ in range(_MAX_UNWRAP):
        if not isinstance(value, str):
            break
        text = _clean(value, markers)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # not JSON (over 4,300 digits, nested too deep)
            return text
    if isinstance(value, Mapping) and not value:
        return ""
    try:
        return _clean(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), markers)
    except (TypeError, ValueError, RecursionError):  # not JSON's (a Python object): as Python writes it
        try:
            return _clean(str(value), markers)
        except (ValueError, RecursionError):  # not even that (an int past Python's digit limit)
            return ""


def context_text(context: str | Sequence[Mapping[str, Any]], end_markers: Iterable[str] = END_MARKERS) -> str:
    """The canonical transcript of a context given as text (parsed when a chat template laid
    it out) or as messages."""
    markers = _markers(end_markers)
    if isinstance(context, str):
        # A plain text reads as itself once cleaned; markup may take more readings.
        return _clean(context, markers) if _plain_text(context) else _settled(context, markers)
    return render(context, markers)


def split_query(
    query: str, prompt: str | None = None, end_markers: Iterable[str] = END_MARKERS
) -> tuple[str | list[Message], str]:
    """(context, response) of an OpenRLHF query (the prompt and the response, decoded).

    1. With the request's `prompts[i]` and the query starting with it (or with the same text
       but for whitespace, as a tokenizer's decoding clean-up changes it), or with its end (a
       prompt the trainer cut from the left to its length limit): the rest is the response,
       the prompt the context.
    2. Otherwise, when a known chat template laid the query out, the response is the content of
       its last assistant turn with the assistant and tool turns in a row before it (a policy
       that opened a turn of its own after its answer, an agent's calls and the tools' results;
       not a tool turn that leads them, which no call of the policy's asked for)
       and any turns after it (a policy that went on into a turn of another role), read as
       `response_text` reads them; the turns before it the context (as messages); with no
       assistant turn, empty (the policy said nothing).
    3. Otherwise the whole query is the response, with an empty context.
    The response is cleaned (`clean_response`), losing its template's own turn end also with
    end markers of one's own that leave it out, and may be empty; `context_text` renders the
    context. Padding around the query or in front of the prompt (pad or end-of-sequence
    tokens, as a padded batch decodes) is left out first, and the prompt is found at the query's
    start with or without a start-of-sequence token in front of either."""
    markers = _markers(end_markers)
    padding = markers + PAD_TOKENS  # the pad tokens also with end_markers of one's own
    query = _rstrip_tokens(_lstrip_tokens(query, padding), padding)
    if prompt:
        prompt = _lstrip_tokens(prompt, padding)
        # Matched without a start-of-sequence token, which one may have and the other not; and
        # in NFC too: a tokenizer that normalizes text (Qwen's) decodes the query composed
        # whatever form the prompt was given in.
        bare_query, bare_prompt = _lstrip_tokens(query, _BOS), _lstrip_tokens(prompt, _BOS)
        for form in dict.fromkeys((bare_prompt, unicodedata.normalize("NFC", bare_prompt))):
            if form and bare_query.startswith(form):
                return prompt, _after_prompt(prompt, bare_query[len(form) :], markers)
            past = _past_prompt(form, bare_query)
            if past is not None:
                return prompt, _after_prompt(prompt, bare_query[past:], markers)
        for form in dict.fromkeys((prompt, unicodedata.normalize("NFC", prompt))):
            kept = _kept_tail(form, query)
            if kept is not None:
                return prompt, _after_prompt(prompt, query[kept:], markers)
    messages = parse(query, markers)
    if messages is None:
        return "", _clean_response(query, markers)
    last = next((k for k in range(len(messages) - 1, -1, -1) if messages[k]["role"] == "assistant"), None)
    if last is None:
        return messages, ""
    # The policy's turns in a row up to its last answer (several answers, its calls and the
    # tools' results between them), and any turns after it (a policy that went on into a turn
    # of another role): its response, judged together, none of it moved into the context.
    first = last
    while first and messages[first - 1]["role"] in _POLICY_SIDE:
        first -= 1
    while messages[first]["role"] == "tool":  # results no call of the policy's asked for: context
        first += 1
    if first == last == len(messages) - 1:
        return messages[:-1], _harmony_reply(messages[-1]["content"], markers)  # cleaned by parse
    return messages[:first], response_text(messages[first:], markers)  # its replies read as responses are


# The roles of a rollout's turns: the policy's, and the tools' results it called for.
_POLICY_SIDE = ("assistant", "tool")


def _after_prompt(prompt: str, response: str, markers: tuple[str, ...]) -> str:
    """The response that follows `prompt`, cleaned; after a prompt whose template opened the
    reasoning block (DeepSeek R1's and Qwen 3's generation prompts end in "<think>"), with the
    opening tag back, as the same turn split by its template reads."""
    if _opens_reasoning(prompt) and not response.lstrip().startswith("<think>"):
        response = "<think>\n" + response
    markers = _with_template_ends(prompt, markers)
    after_chatml = _strip_bos(prompt).lstrip().startswith(_CHATML.starts)
    return _chatml_reply(_one_reply(response, markers), markers, after_chatml)


def _opens_reasoning(prompt: str) -> bool:
    """Whether `prompt` ends by opening the answer's reasoning block: "<think>" after a chat
    template's generation prompt, or after a plain transcript's "Assistant:" (R1-Zero's
    form), not at the end of a text that mentions the tag."""
    head = prompt.rstrip()
    if not head.endswith("<think>"):
        return False
    head = head[: -len("<think>")].rstrip()
    return head.endswith("Assistant:") or _template_turns(prompt) is not None


def _with_template_ends(prompt: str, markers: tuple[str, ...]) -> tuple[str, ...]:
    """`markers` and the turn ends of the template that laid `prompt` out: what the response
    after a prompt loses, as the last turn of a query split by its template does (`parse`),
    also with end markers of one's own that leave a template's out."""
    if _TEMPLATE_ENDS.issubset(markers):  # the default set: nothing to add
        return markers
    found = _template_turns(prompt)
    return markers if found is None else (*found[1], *markers)


def _rstrip_tokens(text: str, tokens: tuple[str, ...]) -> str:
    """`text` without any run of `tokens` at its end."""
    end = len(text)
    while tokens and text.endswith(tokens, 0, end):
        end -= len(next(t for t in tokens if text.endswith(t, 0, end)))
    return text[:end]


def _lstrip_tokens(text: str, tokens: tuple[str, ...]) -> str:
    """`text` without any run of `tokens` in front."""
    at = 0
    while tokens and text.startswith(tokens, at):
        at += len(next(t for t in tokens if text.startswith(t, at)))
    return text[at:]


def _past_prompt(prompt: str, query: str) -> int | None:
    """Where `query` goes on past `prompt` when the two differ only in whitespace, or None:
    a tokenizer's decoding clean-up drops the space before punctuation and contractions
    (Llama 3's `clean_up_tokenization_spaces`: "a != b" decodes as "a!= b"), SentencePiece
    puts a space after a start-of-sequence token. The index follows the query's match of the
    prompt's last non-space character."""
    target = "".join(prompt.split())
    if not target or not "".join(query.split()).startswith(target):
        return None
    need = len(target)
    for word in _WORD.finditer(query):  # the query's runs of non-space, up to the prompt's end
        if word.end() - word.start() >= need:
            return word.start() + need
        need -= word.end() - word.start()
    return None


_WORD = re.compile(r"\S+")
# A prompt's kept end must be this long to be recognized at the start of a query.
_MIN_TAIL = 32
_MAX_CANDIDATES = 8


def _kept_tail(prompt: str, query: str) -> int | None:
    """Where the response starts in `query` when the query begins with the end of `prompt`
    (its start cut off, as OpenRLHF cuts a prompt over its length limit from the left); the
    longest such end wins. The first few characters of the query may differ from the
    prompt's: the decoded cut can start inside a character or a word-start marker."""
    for skip in range(4):
        head = query[skip : skip + _MIN_TAIL]
        if len(head) < _MIN_TAIL:
            return None
        # An end longer than the rest of the query cannot be at its start; and a text that
        # repeats the query's head all over is not searched through (a few candidates each).
        pos = prompt.find(head, max(0, len(prompt) - (len(query) - skip)))
        for _ in range(_MAX_CANDIDATES):
            if pos == -1:
                break
            tail = prompt[pos:]
            if query.startswith(tail, skip):
                return skip + len(tail)
            pos = prompt.find(head, pos + 1)
    return None


def normalize_item(item: Mapping[str, Any], end_markers: Iterable[str] = END_MARKERS) -> dict[str, str]:
    """A label item as the labeler reads it: the context as its canonical transcript, each
    response (`response`, `response_a`, `response_b`, `reference`, each of a group's
    `responses`) cleaned, or its text (`response_text`) when given as messages. Values that
    are neither text nor messages are left for the prompt builder to refuse by name."""
    markers = _markers(end_markers)
    out: dict[str, Any] = {}
    for name, value in item.items():
        if name == "context":
            if isinstance(value, str) or _is_messages(value):
                value = context_text(value, markers)
        elif name == "responses" and isinstance(value, (list, tuple)):
            value = [_response(v, markers) for v in value]
        elif isinstance(value, str) or name in _RESPONSE_FIELDS:
            value = _response(value, markers)
        out[name] = value
    return out


_RESPONSE_FIELDS = ("response", "response_a", "response_b", "reference")


def _response(value: Any, markers: tuple[str, ...]) -> Any:
    """A response cleaned (text) or rendered (messages); anything else as it is."""
    if isinstance(value, str):
        return _clean_response(value, markers)
    return response_text(value, markers) if _is_messages(value) else value


def _is_messages(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(m, Mapping) for m in value)
