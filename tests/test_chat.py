"""labeler.chat: chat templates parsed into messages, one canonical transcript, end-of-turn
markers stripped. Pure functions: no model."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeler import chat

S, U, R = "You are terse.", "What is the capital of France?", "Paris."
DIALOGUE = [{"role": "system", "content": S}, {"role": "user", "content": U}]
CANONICAL = f"System: {S}\n\nUser: {U}"

# The same dialogue (system, user, assistant "Paris.") as each template lays it out, with
# the end-of-turn markers it writes after the answer.
TEMPLATES = {
    "chatml": (
        f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n{R}<|im_end|>\n"
    ),
    "qwen3-no-thinking": (
        f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n\n</think>\n\n{R}<|im_end|><|endoftext|>"
    ),
    "llama3": (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{R}<|eot_id|><|end_of_text|>"
    ),
    "llama3.1-tool-eom": (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{R}<|eom_id|>"
    ),
    "llama2": f"<s>[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U} [/INST] {R} </s>",
    "mistral-v7": f"<s>[SYSTEM_PROMPT]{S}[/SYSTEM_PROMPT][INST]{U}[/INST]{R}</s>",
    "gemma": (
        f"<bos><start_of_turn>system\n{S}<end_of_turn>\n<start_of_turn>user\n{U}<end_of_turn>\n"
        f"<start_of_turn>model\n{R}<end_of_turn>\n<eos>"
    ),
    "phi3": f"<|system|>\n{S}<|end|>\n<|user|>\n{U}<|end|>\n<|assistant|>\n{R}<|end|>\n<|endoftext|>",
    "phi4": (
        f"<|im_start|>system<|im_sep|>{S}<|im_end|><|im_start|>user<|im_sep|>{U}<|im_end|>"
        f"<|im_start|>assistant<|im_sep|>{R}<|im_end|>"
    ),
    "deepseek-v3": f"<｜begin▁of▁sentence｜>{S}<｜User｜>{U}<｜Assistant｜>{R}<｜end▁of▁sentence｜>",
    "deepseek-r1-open-think": f"<｜begin▁of▁sentence｜>{S}<｜User｜>{U}<｜Assistant｜><think>\n\n</think>{R}",
    "hh": f"\n\nSystem: {S}\n\nHuman: {U}\n\nAssistant: {R}",
    "trl-simple-template": f"System: {S}\n\nUser: {U}\n\nAssistant: {R}\n\n",
    "canonical": f"{CANONICAL}\n\nAssistant: {R}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_gives_the_same_context_and_response(name):
    context, response = chat.split_query(TEMPLATES[name])
    assert response == R
    assert chat.context_text(context) == CANONICAL == chat.render(DIALOGUE)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_prompt_with_its_open_assistant_turn_is_the_context(name):
    """What a framework sends as `prompts[i]`: the template up to the open assistant turn."""
    query = TEMPLATES[name]
    cut = query.index(R)
    prompt = query[:cut]
    assert chat.context_text(prompt) == CANONICAL
    assert chat.split_query(query, prompt) == (prompt, R)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("pad", ["<|endoftext|>", "<pad>", "</s>"])
def test_a_query_decoded_with_its_batchs_padding_splits_as_without_it(name, pad):
    """A left- and right-padded batch, decoded: pad (or end-of-sequence) tokens around each
    query, and around the prompt or not. The split is the unpadded query's."""
    query = TEMPLATES[name]
    prompt = query[: query.index(R)]
    padded = pad * 3 + query + pad * 2
    for sent in (prompt, pad * 2 + prompt):
        assert chat.split_query(padded, sent) == chat.split_query(query, prompt) == (prompt, R)
    context, response = chat.split_query(padded)
    assert response == R and chat.context_text(context) == CANONICAL


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_end_markers_of_ones_own_split_a_query_alike_with_or_without_its_prompt(name):
    """A set of end markers that leaves the template's own out: the response after the prompt
    loses the template's turn end as the query's last turn does, also before right padding."""
    query = TEMPLATES[name]
    prompt = query[: query.index(R)]
    own = ("<|my_end|>",)
    after_prompt = chat.split_query(query, prompt, own)[1]
    assert after_prompt == chat.split_query(query, None, own)[1] == chat.split_query(query[5:], prompt, own)[1]
    # Right-padded (a batch decoded with its padding): the pad tokens go with them too.
    padded = query + "<pad>" * 2
    assert chat.split_query(padded, prompt, own)[1] == chat.split_query(padded, None, own)[1] == after_prompt


def test_a_start_of_sequence_token_on_one_side_only_still_finds_the_prompt():
    prompt = "Question: the capital of France?\nAnswer:"
    for query, sent in ((f"<bos>{prompt} Paris", prompt), (f"{prompt} Paris", f"<|begin_of_text|>{prompt}")):
        assert chat.split_query(query, sent) == (sent, "Paris")
    # A prompt of nothing but padding or a BOS says nothing: the query's own template splits it.
    for sent in ("<pad>", "<s>"):
        context, response = chat.split_query(TEMPLATES["chatml"], sent)
        assert response == R and chat.context_text(context) == CANONICAL


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_an_empty_answer_is_an_empty_response(name):
    """The policy emitted only its end-of-turn token: the response is empty, not an error."""
    query = TEMPLATES[name].replace(R, "", 1)
    context, response = chat.split_query(query)
    assert response == "" and chat.context_text(context) == CANONICAL


def test_turns_after_the_policys_answer_are_judged_with_it():
    """Without `prompts`, a policy that went on after its answer (a base model writing the
    next user turn, an answer with a line that reads as a header, a second assistant turn)
    is judged from its answer on, not as an empty answer or from its last turn alone; a query
    with no assistant turn still reads as one."""
    chatml = (
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\nApple.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
    )
    context, response = chat.split_query(chatml)
    assert (chat.context_text(context), response) == ("Name a fruit.", "Apple.\n\nUser: Thanks!")
    hh = "\n\nHuman: How do I log in?\n\nAssistant: Use these credentials:\nuser: admin\npassword: hunter2"
    context, response = chat.split_query(hh)
    assert chat.context_text(context) == "How do I log in?"
    assert response.startswith("Use these credentials:") and "admin" in response and "hunter2" in response
    context, response = chat.split_query("<|im_start|>user\nhi<|im_end|>\n")
    assert (chat.context_text(context), response) == ("hi", "")
    # A policy that opens an assistant turn of its own after its answer: both turns are its
    # answer, judged together, not the first moved into the context out of the judge's sight.
    prompt = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    again = "I refuse, this is garbage.<|im_end|>\n<|im_start|>assistant\nThe answer is 4.<|im_end|>"
    context, response = chat.split_query(prompt + again)
    assert (chat.context_text(context), response) == ("Q?", "I refuse, this is garbage.\n\nThe answer is 4.")
    # The assistant turns of the dialogue before its last user turn stay its context.
    earlier = "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    context, response = chat.split_query(earlier + prompt + "4<|im_end|>")
    assert (chat.context_text(context), response) == ("User: Hi.\n\nAssistant: Hello!\n\nUser: Q?", "4")


@pytest.mark.parametrize(
    "marker",
    [m for m in chat.END_MARKERS],
)
def test_each_end_marker_is_stripped_from_a_response(marker):
    assert chat.clean_response(f"Paris.{marker}") == "Paris."
    assert chat.clean_response(f"  Paris. {marker}\n{marker}  ") == "Paris."
    assert chat.clean_response(marker) == ""  # only a marker: the empty response
    assert chat.clean_response(f"a {marker} b") == f"a {marker} b"  # only trailing ones


def test_whitespace_only_and_marker_only_responses_are_empty():
    for text in ["", " ", "\n\t ", "<|im_end|>", " <|eot_id|>\n<|end_of_text|> ", "<think>\n\n</think>\n\n"]:
        assert chat.clean_response(text) == ""
    item = chat.normalize_item({"context": "Q?", "response": "<|im_end|>"})
    assert item == {"context": "Q?", "response": ""}


def test_end_markers_are_configurable():
    assert chat.clean_response("Paris.<|im_end|>", end_markers=()) == "Paris.<|im_end|>"
    assert chat.clean_response("Paris.[STOP]", end_markers=["[STOP]"]) == "Paris."
    item = chat.normalize_item({"context": "Q", "response_a": "a[STOP]", "response_b": "b</s>"}, ["[STOP]"])
    assert item == {"context": "Q", "response_a": "a", "response_b": "b</s>"}


def test_a_lone_user_message_reads_like_the_plain_prompt():
    assert chat.context_text([{"role": "user", "content": U}]) == U == chat.context_text(U)
    assert chat.context_text(f"<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n") == U
    assert chat.context_text(f"  {U}\n") == U


def test_roles_and_multi_turn():
    messages = [
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": ""},  # the open turn is dropped
    ]
    want = "System: Be kind.\n\nUser: hi\n\nAssistant: hello\n\nTool: 42\n\nUser: more"
    assert chat.render(messages) == want
    hh = "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: b"
    context, response = chat.split_query(hh)
    assert (chat.context_text(context), response) == ("User: hi\n\nAssistant: a\n\nUser: more", "b")
    llama2 = "<s>[INST] hi [/INST] a </s><s>[INST] more [/INST] b </s>"  # each turn after the first opens a BOS
    context, response = chat.split_query(llama2)
    assert (chat.context_text(context), response) == ("User: hi\n\nAssistant: a\n\nUser: more", "b")
    deepseek_llm = "User: hi\n\nAssistant: a<｜end▁of▁sentence｜>User: more\n\nAssistant: b<｜end▁of▁sentence｜>"
    context, response = chat.split_query(deepseek_llm)
    assert (chat.context_text(context), response) == ("User: hi\n\nAssistant: a\n\nUser: more", "b")


def test_a_prompt_cut_from_the_left_still_splits_the_query():
    """OpenRLHF cuts a prompt over its length limit from the left and sends the full prompt
    in `prompts[i]`: the query starts inside the prompt, not with it. The response is still
    what follows the prompt, not the whole query."""
    prompt = TEMPLATES["chatml"][: TEMPLATES["chatml"].index(R)]
    query = prompt[20:] + R + "<|im_end|>"
    assert chat.split_query(query, prompt) == (prompt, R)
    garbled = "\ufffd" + prompt[21:] + R + "<|im_end|>"  # the cut split a character
    assert chat.split_query(garbled, prompt) == (prompt, R)
    other = "An unrelated query that shares nothing with the prompt at all."
    assert chat.split_query(other, prompt) == ("", other)
    # A prompt that repeats the query's head all over is tried at a few places, not searched
    # through place by place (400,000 of them here).
    assert chat.split_query("-" * 40 + "\nsomething else", "-" * 400_000 + "\nQ?")[0] == ""


def test_an_empty_reasoning_block_reads_the_same_as_text_or_as_messages():
    """Qwen 3 (thinking off) puts an empty <think></think> in front of every answer: a
    dialogue laid out as text and the same dialogue as messages give one transcript."""
    think = "<think>\n\n</think>\n\n"
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": f"{think}hello"},
        {"role": "user", "content": "more"},
    ]
    laid_out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    want = "User: hi\n\nAssistant: hello\n\nUser: more"
    assert chat.render(messages) == chat.context_text(laid_out) == chat.context_text(messages) == want
    assert chat.parse(laid_out)[1]["content"] == "hello"
    # Only an assistant's, and only an empty block: reasoning is content.
    assert chat.render([{"role": "user", "content": f"{think}hi"}]) == f"{think}hi".strip()
    reasoned = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>y"}]
    twice = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"{think}{think}hello"}]
    assert chat.render(twice) == want.rsplit("\n\n", 1)[0] and chat.render(chat.parse(laid_out)) == want
    assert chat.render(reasoned) == "User: hi\n\nAssistant: <think>\nx</think>y"


def test_a_reasoning_block_the_template_opened_reads_the_same_every_way():
    """DeepSeek R1's generation prompt ends in "<think>": the policy's text only closes the
    block. The query after its prompt, the query split by its template, a prompt cut from the
    left, the policy's text as a message, and the same answer with the tag written by the
    model give one response, and one context."""
    prompt = f"<｜begin▁of▁sentence｜>{S}<｜User｜>{U}<｜Assistant｜><think>\n"
    generated = "France's capital city is Paris.\n</think>\n\nParis."
    want = "<think>\nFrance's capital city is Paris.\n</think>\n\nParis."
    query = f"{prompt}{generated}<｜end▁of▁sentence｜>"
    tail = len(prompt) - 40  # the prompt as a trainer cut it from the left
    splits = [chat.split_query(query, prompt), chat.split_query(query), chat.split_query(query[tail:], prompt)]
    assert [response for _, response in splits] == [want] * 3
    assert {chat.context_text(context) for context, _ in splits} == {CANONICAL}
    for written in (generated, f"<think>{generated}", f"<think>\n\n{generated}  <｜end▁of▁sentence｜>"):
        assert chat.clean_response(written) == want
        dialogue = [*DIALOGUE, {"role": "assistant", "content": written}, {"role": "user", "content": "And Italy?"}]
        assert chat.render(dialogue) == f"{CANONICAL}\n\nAssistant: {want}\n\nUser: And Italy?"
    # A block closed at once is the empty one; text that opens its own block is left as it is.
    assert chat.clean_response("</think>\n\nParis.") == "Paris."
    assert chat.clean_response("a <think>b</think> c") == "a <think>b</think> c"
    # A response that mentions the closing tag in a sentence closes no block.
    for mention in (
        "Close the block with the </think> tag, then answer.",
        "Close it with </think>",
        "Close it with </think> <b>then bold</b>",
    ):
        assert chat.clean_response(mention) == mention
    # R1-Zero's format, a tag right after the block: the same response split either way.
    zero = "3 plus 4 is 7.</think> <answer>7</answer>"
    assert chat.clean_response(zero) == "<think>\n" + zero
    assert chat.split_query(prompt + zero)[1] == chat.split_query(prompt + zero, prompt)[1] == "<think>\n" + zero


def test_a_deepseek_marker_inside_a_plain_prompt_is_text():
    """DeepSeek's system prompt stands bare in front of its first turn, so its user marker is
    taken for the template only when it opens the text or an assistant marker follows."""
    plain = "How do I write <｜User｜> in a DeepSeek prompt?"
    assert chat.parse(plain) is None and chat.context_text(plain) == plain
    assert chat.split_query(plain) == ("", plain)
    assert chat.parse("<｜User｜>hi") == [{"role": "user", "content": "hi"}]
    # The template without its generation prompt, after its BOS: still the template.
    laid_out = f"<｜begin▁of▁sentence｜>{S}<｜User｜>{U}"
    assert chat.context_text(laid_out) == CANONICAL == chat.context_text(DIALOGUE)
    context, response = chat.split_query(f"{S}<｜User｜>{U}<｜Assistant｜>{R}")
    assert (chat.context_text(context), response) == (CANONICAL, R)


def test_a_prompt_decoded_in_another_unicode_form_is_still_found():
    """A tokenizer that normalizes text (Qwen's, to NFC) decodes the query composed while the
    request's prompt keeps the dataset's decomposed form: the prompt is found all the same, and
    only the answer is judged (not the whole query, with an empty context)."""
    import unicodedata

    prompt = "Question: Qu'est-ce qu'un cafe\u0301 au lait ?\nAnswer:"
    query = unicodedata.normalize("NFC", prompt) + " A coffee with milk."
    assert chat.split_query(query, prompt) == (prompt, "A coffee with milk.")
    # The same prompt cut from the left to a length limit, as OpenRLHF cuts one.
    long = "Some background. " * 8 + prompt
    cut = unicodedata.normalize("NFC", long)[40:] + " A coffee with milk."
    assert chat.split_query(cut, long) == (long, "A coffee with milk.")


@pytest.mark.parametrize(
    ("query", "prompt", "context", "response"),
    [
        ("P: hi A: yo", "P: hi", "P: hi", "A: yo"),
        ("just text", None, "", "just text"),
        ("mismatch yo", "other", "", "mismatch yo"),
        ("<|im_start|>user\nhi<|im_end|>", None, "hi", ""),  # no assistant turn: it said nothing
        ("Explain <|im_start|> tokens.", None, "", "Explain <|im_start|> tokens."),  # not at the start
        ("Note: User: hi", None, "", "Note: User: hi"),
    ],
)
def test_split_query_without_a_template(query, prompt, context, response):
    got_context, got_response = chat.split_query(query, prompt)
    assert (chat.context_text(got_context), got_response) == (context, response)


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        (
            "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n",
            "Simple.</think>The answer is 4.<｜end▁of▁sentence｜>",
        ),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n", "Adding.\n</think>\n\n4<|im_end|>"),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n", "Still adding<|im_end|>"),
    ],
)
def test_an_answer_after_a_prompt_that_opened_its_reasoning_reads_the_same_with_the_prompt(prompt, answer):
    """A generation prompt that ends in "<think>" (DeepSeek R1's, Qwen 3's with thinking on):
    the answer after it gets its opening tag back, as the same query split by its template
    without `prompts` reads it."""
    with_prompt = chat.split_query(prompt + answer, prompt)[1]
    assert with_prompt == chat.split_query(prompt + answer)[1] and with_prompt.startswith("<think>\n")


def test_a_prompt_that_mentions_the_reasoning_tag_opens_no_block():
    """A plain prompt ending in the tag as a word is no generation prompt: the answer after it
    is read as written; after a plain transcript's "Assistant:" (R1-Zero's form) it opens one."""
    prompt = "Explain the tag <think>"
    assert chat.split_query(prompt + "\nIt opens a reasoning block.", prompt)[1] == "It opens a reasoning block."
    zero = "User: 2+2?\n\nAssistant: <think>"
    assert chat.split_query(zero + "\nadd</think> 4", zero)[1] == "<think>\nadd</think> 4"


@pytest.mark.parametrize(
    "content",
    [
        "User: hi",
        "Human: pretend you are my grandma",
        "[INST] what does this tag mean? [/INST]",
        "System: S\n\nUser: Q",
    ],
)
def test_a_lone_message_that_reads_as_a_transcript_keeps_its_header(content):
    """A user's message whose text looks like a transcript of its own: its canonical
    transcript reads back as itself (a batch run through the service normalizes it again), and
    not as the turns its text names."""
    once = chat.context_text([{"role": "user", "content": content}])
    assert once == f"User: {content}" and chat.context_text(once) == once
    if content.startswith("System:"):
        assert once != chat.context_text([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])


def test_reasoning_kept_apart_reads_as_the_turn_laid_out_as_text():
    """An assistant message's `reasoning_content` (or `thinking`) is its reasoning block, in a
    response and in a context's earlier turns alike; a content that holds a block already keeps
    its own; another role's is not read."""
    as_text = "<think>\nIt is 4.\n</think>\n\nFour."
    for key in chat.REASONING_KEYS:
        message = {"role": "assistant", "content": "Four.", key: " It is 4. "}
        assert chat.response_text([message]) == chat.clean_response(as_text)
        history = [{"role": "user", "content": "2+2?"}, message, {"role": "user", "content": "Sure?"}]
        assert chat.render(history) == f"User: 2+2?\n\nAssistant: {chat.clean_response(as_text)}\n\nUser: Sure?"
    own = {"role": "assistant", "content": "<think>\nMine.\n</think>\n\nFour.", "reasoning_content": "Other."}
    assert chat.response_text([own]) == "<think>\nMine.\n</think>\n\nFour."
    # An answer that mentions the tag holds no block of its own: its reasoning goes in front.
    mention = {"role": "assistant", "content": "Wrap it in <think> tags.", "reasoning_content": "About tags."}
    assert chat.response_text([mention]) == "<think>\nAbout tags.\n</think>\n\nWrap it in <think> tags."
    user = [{"role": "user", "content": "Hi", "reasoning_content": "private"}, {"role": "user", "content": "2+2?"}]
    assert "private" not in chat.render(user)


def test_a_response_wrapped_over_and_over_is_read_in_linear_time():
    """A policy output that repeats a harmony answer header, or closes empty reasoning blocks,
    to the body limit: each unwrapping read the whole text again (2 MB took minutes on the
    event loop). A run of closed empty blocks is dropped at once; a few harmony headers are
    taken off, as a real output holds, and the rest is judged as written. One wrapping still
    reads as the answer it wraps."""
    import time

    t0 = time.perf_counter()
    header, closing = "<|channel|>final<|message|>", "</think>\n"
    got = chat.normalize_item({"context": "hi", "response": header * (2_000_000 // len(header)) + "x"})
    assert got["response"].endswith(header + "x")
    got = chat.normalize_item({"context": "hi", "response": closing * (2_000_000 // len(closing)) + "x"})
    assert got["response"] == "x"
    for unit in (header, closing):
        assert chat.normalize_item({"context": "hi", "response": unit + "x"})["response"] == "x"
    seconds = time.perf_counter() - t0
    # A liveness bound, not a speed goal: linear takes milliseconds, quadratic minutes.
    assert seconds < 20, f"{seconds:.1f} s"


def test_a_plain_transcript_splits_in_linear_time_and_with_crlf():
    """A policy that runs on in newlines (or in turn headers) to its length limit: splitting
    and rendering stay linear (a pattern that rescanned the run from every newline took 34 s
    on 32,000 of them, blocking the server's event loop). Turns separated by CRLF blank lines split like LF."""
    import time

    run = "\n" * 32_000
    t0 = time.perf_counter()
    context, response = chat.split_query(f"Human: hi\n\nAssistant: b{run}x")
    text = chat.context_text(f"Human: a{run}x")
    # Headers that are opened again and again and never closed, on one line.
    for opened in ("[INST]" * 5000, "<|start_header_id|>" * 1500, "[AVAILABLE_TOOLS]" * 5000):
        chat.split_query(opened + "x")
    # A harmony header that a long run of spaces leaves open.
    chat.normalize_item({"context": "hi", "response": "<|channel|>" + " " * 100_000 + "<x"})
    seconds = time.perf_counter() - t0
    assert (context, response) == ([{"role": "user", "content": "hi"}], f"b{run}x")
    assert text == f"a{run}x"
    # A liveness bound, not a speed goal: linear takes milliseconds, quadratic over a minute.
    assert seconds < 20, f"{seconds:.1f} s"
    crlf = chat.split_query("User: hi\r\n\r\nAssistant: hello there")
    assert (
        crlf
        == chat.split_query("User: hi\n\nAssistant: hello there")
        == ([{"role": "user", "content": "hi"}], "hello there")
    )
    # a blank line holding spaces, and extra newlines, still open a turn
    assert chat.split_query("User: hi\n \n\n Assistant: yo") == ([{"role": "user", "content": "hi"}], "yo")


def test_a_byte_order_mark_in_front_is_no_content():
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"
    assert (
        chat.split_query("\ufeff" + chatml)
        == chat.split_query(chatml)
        == ([{"role": "user", "content": "hi"}], "hello")
    )
    assert chat.context_text("\ufeffhello") == "hello" and chat.clean_response("\ufeff hello") == "hello"


def test_markup_opened_and_never_laid_out_is_text():
    """A turn header with no turn after it (an [INST] never closed) is no template: the text
    is kept, not erased."""
    assert chat.context_text("[INST] Translate this sentence please") == "[INST] Translate this sentence please"
    assert chat.split_query("<s>[INST] hi there") == ("", "[INST] hi there")


def test_text_that_merely_mentions_markup_is_left_alone():
    text = "Summarize: the model printed <|im_end|> and stopped."
    assert chat.parse(text) is None and chat.context_text(text) == text
    assert chat.normalize_item({"context": 42, "response": 7}) == {"context": 42, "response": 7}


_role = st.sampled_from(["system", "user", "assistant", "tool", "human", "model"])
_content = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": _role, "content": _content}), max_size=6))
def test_the_canonical_transcript_is_a_fixed_point(messages):
    once = chat.render(messages)
    assert chat.context_text(once) == once
    assert chat.context_text(chat.context_text(once)) == once


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_normalizing_any_text_is_idempotent(text):
    context = chat.context_text(text)
    assert chat.context_text(context) == context
    response = chat.clean_response(text)
    assert chat.clean_response(response) == response


_thinking = st.lists(st.sampled_from(["<think>", "</think>", "\n", " ", "x", "<|im_end|>", "<s>"]), max_size=8).map(
    "".join
)


@settings(max_examples=300, deadline=None)
@given(_thinking)
def test_a_reasoning_block_is_normalized_once(text):
    response = chat.clean_response(text)
    assert chat.clean_response(response) == response
    laid_out = f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n{text}"
    assert chat.split_query(laid_out)[1] == response


# Pieces every recognizer looks for, so that generated text often starts or contains a template.
_markup = st.sampled_from(
    [
        "<|im_start|>user\n",
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<start_of_turn>model\n",
        "<|user|>\n",
        "[INST] ",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "<|start|>user<|message|>",
        "<|start|>assistant",
        "<｜User｜>",
        "<｜Assistant｜>",
        "<s>",
        "<|begin_of_text|>",
        "User:",
        "human: ",
        "Assistant:",
        "\n\n",
        " ",
        "\t",
        "<",
        "[",
        "x",
        "é",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(_markup, st.sampled_from(["</s>", "<|im_end|>", "\n", "hi", "user:", "\nTool:"])), max_size=6
    ).map("".join)
)
def test_a_context_in_markup_reads_as_itself_once_normalized(text):
    """Markup as text, or as turns' contents: its canonical transcript is read as itself
    when it is given again, as the service reads what a batch run sends it (the same key, the
    same label)."""
    turns = [
        {"role": "system", "content": text},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": text},
    ]
    for context in (text, [{"role": "user", "content": text}], turns):
        once = chat.context_text(context)
        assert chat.context_text(once) == once, context


@pytest.mark.parametrize(
    "messages",
    [
        # a role of another name reads as part of the turn before it
        [{"role": "user", "content": "Find the weather"}, {"role": "observation", "content": "sunny"}],
        # a letter a case-blind match takes for an ASCII one: "ſystem:" opens a turn
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nſystem: c"}],
    ],
)
def test_turns_that_read_otherwise_once_rendered_are_read_again(messages):
    once = chat.context_text(messages)
    assert chat.context_text(once) == once
    item = chat.normalize_item({"context": messages, "response": "r"})
    assert chat.normalize_item(item) == item


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ("<|start|>assistant</s>", ""),  # its end marker cut off, a header reads as an open turn
        (
            [{"role": "user", "content": "Human: What is 2+2?\nAssistant: 4"}],
            "User: Human: What is 2+2?\n\nAssistant: 4",
        ),
        # DeepSeek's layout under the user's header: its bare system prompt is the header's turn
        ([{"role": "user", "content": "sys<｜User｜>hi<｜Assistant｜>"}], "System: User: sys\n\nUser: hi"),
    ],
)
def test_contexts_that_took_two_readings_read_as_their_last(context, expected):
    once = chat.context_text(context)
    assert once == expected and chat.context_text(once) == once
    item = chat.normalize_item({"context": context, "response": "4"})
    assert chat.normalize_item(item) == item


@settings(max_examples=500, deadline=None)
@given(st.lists(_markup, max_size=6).map("".join))
def test_the_plain_text_shortcut_never_hides_a_template(text):
    """`parse` skips its recognizers when one quick match rules every template out; with that
    match forced, the answer is the same."""
    quick = chat.parse(text)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(chat, "_MAYBE_MARKUP", re.compile(""))
        assert chat.parse(text) == quick


_harmony_pieces = st.sampled_from(
    [
        "<|start|>user<|message|>",
        "<|start|>developer<|message|>",
        "<|start|>assistant",
        "<|start|>assistant<|channel|>analysis<|message|>",
        "<|channel|>final<|message|>",
        "<|start|>functions.f to=assistant<|channel|>commentary<|message|>",
        "<|end|>",
        "<|return|>",
        "<|startoftext|>",
        "<think>",
        "\n",
        " ",
        "x",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_harmony_pieces, max_size=8).map("".join))
def test_normalizing_harmony_markup_is_idempotent(text):
    context = chat.context_text(text)
    assert chat.context_text(context) == context
    response = chat.clean_response(text)
    assert chat.clean_response(response) == response


# gpt-oss's chat template, as it lays out a system prompt and a question (its own system
# message first), with its generation prompt.
_HARMONY_PROMPT = (
    "<|startoftext|><|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2026-12-04\n\nReasoning: medium\n\n# Valid channels: analysis, "
    "commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>developer<|message|># Instructions\n\nAnswer briefly.\n\n<|end|>"
    "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"
)


def test_gpt_oss_harmony_reads_as_the_same_dialogue_as_its_messages():
    """The template's own system message (dates, reasoning effort) is no part of the dialogue;
    the developer's instructions are its system prompt; the policy's analysis is its reasoning
    block and its final message the answer, with the query split by its prompt or by its markup."""
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]
    reply = (
        "<|channel|>analysis<|message|>Simple arithmetic.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|return|>"
    )
    answer = "<think>\nSimple arithmetic.\n</think>\n\n4"
    query = _HARMONY_PROMPT + reply
    assert (
        chat.context_text(_HARMONY_PROMPT) == chat.render(messages) == "System: Answer briefly.\n\nUser: What is 2+2?"
    )
    assert chat.split_query(query) == (messages, answer)
    context, response = chat.split_query(query, _HARMONY_PROMPT)
    assert response == answer and chat.context_text(context) == chat.render(messages)
    # The same answer as a reasoning model laid out by another template gives.
    qwen = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nSimple arithmetic.\n</think>\n\n4"
    assert chat.split_query(qwen)[1] == answer
    # Cut inside the analysis: the reasoning block stays open; a tool call is kept as text.
    assert chat.split_query(_HARMONY_PROMPT + "<|channel|>analysis<|message|>Let me")[1] == "<think>\nLet me"
    call = (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary <|constrain|>json<|message|>{"city":"SF"}<|call|>'
    )
    assert chat.split_query(_HARMONY_PROMPT + call, _HARMONY_PROMPT)[1] == (
        '<think>\nNeed the weather.\n</think>\n\n[call functions.get_weather] {"city": "SF"}'
    )
    # Earlier turns and a tool's result in the context.
    dialogue = (
        "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>hello<|end|>"
        '<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>{"x":1}<|end|>'
        "<|start|>user<|message|>more<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"
    )
    assert chat.split_query(dialogue) == (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "tool", "content": '{"x":1}'},
            {"role": "user", "content": "more"},
        ],
        "ok",
    )


def test_tool_calls_read_the_same_as_messages_or_as_harmony_markup():
    """A tool-calling dialogue given as OpenAI / TRL messages reads as harmony's markup of it
    does: each call a `[call functions.NAME] ARGUMENTS` block after its turn's content, the
    tool's result a Tool turn. Arguments, an object or a text of JSON, are written as
    `json.dumps` writes them."""
    weather = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"SF"}'}}
    messages = [
        {"role": "user", "content": "Weather in SF?"},
        {"role": "assistant", "content": None, "tool_calls": [weather]},
        {"role": "tool", "name": "get_weather", "content": "18C, sunny"},
    ]
    harmony = (
        "<|start|>user<|message|>Weather in SF?<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"SF"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>18C, sunny<|end|>"
    )
    want = 'User: Weather in SF?\n\nAssistant: [call functions.get_weather] {"city": "SF"}\n\nTool: 18C, sunny'
    assert chat.render(messages) == chat.context_text(harmony) == want
    add = {"function": {"name": "add", "arguments": {"a": 2, "b": 2}}}  # TRL's parsed call: an object
    turn = {"role": "assistant", "content": "Let me add.<|im_end|>", "tool_calls": [add, weather]}
    assert chat.render([turn]) == (
        'Assistant: Let me add.\n\n[call functions.add] {"a": 2, "b": 2}\n\n[call functions.get_weather] {"city": "SF"}'
    )
    assert chat.render([{"role": "assistant", "content": "", "tool_calls": None}]) == ""
    # A call given flat, as Qwen's and Hermes' chat templates also take it, reads the same.
    flat = {"name": "add", "arguments": {"a": 2, "b": 2}}
    assert chat.render([{**turn, "tool_calls": [flat, weather]}]) == chat.render([turn])
    # Calls without arguments, two in a row (gpt-oss calls functions without parameters so).
    bare = [{"function": {"name": "get_time", "arguments": {}}}, {"function": {"name": "get_date", "arguments": "{}"}}]
    harmony = (
        "<|start|>user<|message|>Time?<|end|>"
        "<|start|>assistant to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
        "<|start|>assistant to=functions.get_date<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
        "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>12:00<|end|>"
    )
    called = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "tool_calls": bare},
        {"role": "tool", "content": "12:00"},
    ]
    want = "User: Time?\n\nAssistant: [call functions.get_time]\n\n[call functions.get_date]\n\nTool: 12:00"
    assert chat.context_text(harmony) == chat.context_text(called) == want


_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# A tool whose description names the tags the tool list is written in.
_MARKUP = {"type": "function", "function": {"name": "strip_tags", "description": "Drops tags such as </tools>"}}


def _call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "qwen3_5_think", "qwen3_5_nothink", "qwen3_6", "qwen3_8"])
def test_a_tool_calling_dialogue_laid_out_by_qwens_templates_reads_as_its_messages(
    template, frameworks_python, model_dir
):
    """Qwen's chat templates (as TRL ships them) write a tool list into the system turn, an
    assistant's calls as `<tool_call>` JSON blocks after its content and the tools' results
    as `<tool_response>` blocks in a user turn. Laid out so, a context reads as its messages
    do (the tool list is the template's, as Mistral's is), and a completion after its prompt
    (OpenRLHF's decoded text, verl's response text) reads as TRL's conversational completion
    of the same turns does: one transcript, one key, whichever framework sent it."""
    from transformers import AutoTokenizer

    found = sorted(frameworks_python.parents[1].glob(f"lib/python*/site-packages/trl/chat_templates/{template}.jinja"))
    assert found, "TRL's chat templates are missing from the frameworks venv"
    jinja = found[0].read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def laid_out(messages: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, tools=[_WEATHER, _MARKUP], chat_template=jinja, tokenize=False, add_generation_prompt=prompt
        )

    dialogue = [
        {"role": "user", "content": "Weather in SF and NYC?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [_call("SF"), _call("NYC")]},
        {"role": "tool", "content": "18C, sunny"},
        {"role": "tool", "content": "25C"},
        {"role": "assistant", "content": "SF: 18C, NYC: 25C."},
        {"role": "user", "content": "Thanks. And Paris?"},
    ]
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        text = laid_out(system + dialogue, prompt=True)
        assert "<tool_call>" in text and "<tool_response>" in text and "# Tools" in text
        assert chat.context_text(text) == chat.context_text(system + dialogue)
    assert chat.context_text(dialogue) == (
        "User: Weather in SF and NYC?\n\nAssistant: Let me check.\n\n"
        '[call functions.get_weather] {"city": "SF"}\n\n[call functions.get_weather] {"city": "NYC"}\n\n'
        "Tool: 18C, sunny\n\nTool: 25C\n\nAssistant: SF: 18C, NYC: 25C.\n\nUser: Thanks. And Paris?"
    )

    if template in ("qwen2_5", "qwen3"):
        # Arguments as OpenAI's API gives them, a text of JSON (spaced its own way, with a
        # character other than ASCII escaped): Qwen 2.5 writes them as a JSON string, Qwen 3 as
        # they are. (Qwen 3.5's and later templates take an object alone.)
        as_text = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Z\\u00fcrich"}'}}
        called = [dialogue[0], {"role": "assistant", "content": None, "tool_calls": [as_text]}, dialogue[2]]
        assert (
            chat.context_text(laid_out(called))
            == chat.context_text(called)
            == chat.context_text([dialogue[0], {**called[1], "tool_calls": [_call("Zürich")]}, dialogue[2]])
        )
    else:
        # Qwen 3.5 and later write each argument as a `<parameter=NAME>` block: objects and
        # lists as JSON, strings as they are (over several lines, holding a closing line of
        # their own), numbers, booleans and None as JSON or as Python spells them; a call
        # without arguments as an empty function block.
        values = {"city": "Zürich\nthe old town", "days": 3, "metric": True, "hours": [9, 17], "units": None}
        values["note"] = "<x>\n</parameter>\n</x>"
        call = {"type": "function", "function": {"name": "get_weather", "arguments": values}}
        clock = {"type": "function", "function": {"name": "get_time"}}
        called = [dialogue[0], {"role": "assistant", "content": "", "tool_calls": [call, clock]}, dialogue[2]]
        assert "<parameter=days>\n3\n</parameter>" in laid_out(called)
        assert chat.context_text(laid_out(called)) == chat.context_text(called)

    question = dialogue[:1]
    prompt = laid_out(question, prompt=True)
    completions = [
        [{"role": "assistant", "content": "Let me check.", "tool_calls": [_call("SF")]}],
        [
            {"role": "assistant", "content": "", "tool_calls": [_call("SF"), _call("NYC")]},
            {"role": "tool", "content": "18C, sunny"},
            {"role": "tool", "content": "25C"},
            {"role": "assistant", "content": "SF: 18C, NYC: 25C."},
        ],
    ]
    for completion in completions:
        query = laid_out(question + completion)
        assert query.startswith(prompt)
        want = chat.response_text(completion)
        context, response = chat.split_query(query, prompt)
        assert response == want and chat.context_text(context) == chat.context_text(question)
        context, response = chat.split_query(query)  # without the prompt: the same split
        assert response == want and chat.context_text(context) == chat.context_text(question)
        item = chat.normalize_item({"context": prompt, "response": query[len(prompt) :]})
        assert item == {"context": chat.context_text(question), "response": want}
    assert chat.response_text(completions[1]) == (
        '[call functions.get_weather] {"city": "SF"}\n\n[call functions.get_weather] {"city": "NYC"}\n\n'
        "Tool: 18C, sunny\n\nTool: 25C\n\nSF: 18C, NYC: 25C."
    )


@pytest.mark.parametrize("arguments", ['{"city":"SF"}', {"city": "SF"}])
def test_a_tool_calling_dialogue_laid_out_by_gpt_oss_s_template_reads_as_its_messages(
    arguments, frameworks_python, model_dir
):
    """gpt-oss's chat template (as TRL ships it) writes the tool list at the end of the
    developer message, a call's arguments as JSON (arguments given as text become a JSON
    string) and a tool's result as JSON: the same dialogue reads as its messages do."""
    from transformers import AutoTokenizer

    found = sorted(frameworks_python.parents[1].glob("lib/python*/site-packages/trl/chat_templates/gptoss.jinja"))
    assert found, "TRL's chat templates are missing from the frameworks venv"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        dialogue = [
            *system,
            {"role": "user", "content": "Weather in SF?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "18C, sunny"},
            {"role": "assistant", "content": "It is 18C."},
            {"role": "user", "content": "Thanks."},
        ]
        text = tokenizer.apply_chat_template(
            dialogue, tools=[_WEATHER], chat_template=found[0].read_text(), tokenize=False, add_generation_prompt=True
        )
        assert "namespace functions" in text and '"18C, sunny"' in text
        assert chat.context_text(text) == chat.context_text(dialogue)
        assert '[call functions.get_weather] {"city": "SF"}\n\nTool: 18C, sunny' in chat.context_text(dialogue)


def test_a_rollout_reads_as_one_response_with_or_without_its_prompt():
    """An agent's rollout (reasoning, a call, the tool's result, the answer) or a policy that
    writes on past its answer is one response whether `/get_reward` gets the prompt or splits
    the query by its template: harmony messages after a harmony prompt read as the turns they
    are, as the same completion given as messages does; the policy's turns in a row before its
    last answer are all its response. A ChatML quote inside a code block is the response's
    text, after a ChatML prompt too."""
    harmony = "<|start|>user<|message|>Weather?<|end|><|start|>assistant"
    rollout = (
        "<|channel|>analysis<|message|>Need tool.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city":"SF"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"18C"<|end|>'
        "<|start|>assistant<|channel|>final<|message|>It is 18C.<|return|>"
    )
    messages = [
        {"role": "assistant", "reasoning_content": "Need tool.", "content": "", "tool_calls": [_call("SF")]},
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
    ]
    want = chat.response_text(messages)
    assert (
        want
        == '<think>\nNeed tool.\n</think>\n\n[call functions.get_weather] {"city": "SF"}\n\nTool: 18C\n\nIt is 18C.'
    )
    assert chat.split_query(harmony + rollout, harmony)[1] == chat.split_query(harmony + rollout)[1] == want
    chatml = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    on = "A<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC"
    assert chat.split_query(chatml + on) == ([{"role": "user", "content": "Q"}], "A\n\nB\n\nUser: C")
    assert chat.split_query(chatml + on, chatml)[1] == "A\n\nB\n\nUser: C"
    quoting = (
        "Like this:\n```\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n```\nThat is all."
    )
    assert chat.split_query(chatml + quoting + "<|im_end|>", chatml)[1] == chat.clean_response(quoting) == quoting
    # A fence the policy's ended turn left open closes with that turn: its later turns are turns.
    fenced = "Wrap code in ``` fences.<|im_end|>\n<|im_start|>user\nThanks"
    assert (
        chat.split_query(chatml + fenced, chatml)[1]
        == chat.split_query(chatml + fenced)[1]
        == ("Wrap code in ``` fences.\n\nUser: Thanks")
    )
    # A tool's result no call of the policy's asked for (retrieval put it in the dialogue) is context.
    retrieved = (
        "<|im_start|>user\nWho wrote Dune?<|im_end|>\n<|im_start|>tool\nDune (1965) is by Frank Herbert.<|im_end|>\n"
        "<|im_start|>assistant\nFrank Herbert.<|im_end|>"
    )
    context, response = chat.split_query(retrieved)
    assert response == "Frank Herbert." and context[-1] == {
        "role": "tool",
        "content": "Dune (1965) is by Frank Herbert.",
    }


def test_tool_blocks_read_as_calls_and_results_only_where_they_are_such():
    """Hermes' layout puts a result in a tool turn; a call's arguments given as JSON text read
    as the same text given in a message. A block that is no call (not JSON, no name, keys a
    call has not), calls followed by more text, and a result beside other text are the
    policy's text as written."""
    hermes = (
        "<|im_start|>user\nAdd 2 and 2.<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"arguments": "{\\"a\\": 2, \\"b\\": 2}", "name": "add"}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "add", "arguments": '{"a": 2, "b": 2}'}]},
        {"role": "tool", "content": "4"},
    ]
    assert chat.context_text(hermes) == chat.context_text(messages)
    # Qwen 3.5's layout of the same call: a parameter block each.
    parameters = "<parameter=a>\n2\n</parameter>\n<parameter=b>\n2\n</parameter>\n"
    xml = f"<tool_call>\n<function=add>\n{parameters}</function>\n</tool_call>"
    assert chat.clean_response(xml) == chat.response_text(messages[1:2]) == '[call functions.add] {"a": 2, "b": 2}'
    # The reasoning effort Qwen 3.8 writes at the start of the system turn is the template's;
    # the same sentence anywhere else is the dialogue's.
    effort = "Reasoning effort is set to low. Keep your thinking brief and focused, moving directly to the "
    effort += "conclusion without unnecessary elaboration."
    written = f"<|im_start|>system\n{effort}\n\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert chat.context_text(written) == "System: Be brief.\n\nUser: hi"
    quoted = f"<|im_start|>user\nWhat does this mean?\n\n{effort}<|im_end|>\n<|im_start|>assistant\n"
    assert chat.context_text(quoted) == f"What does this mean?\n\n{effort}"
    said = chat.context_text([{"role": "system", "content": effort}, {"role": "user", "content": "hi"}])
    assert said == f"System: {effort}\n\nUser: hi" and chat.context_text(said) == said
    for written in (
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}, "id": 1}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nDone.',
        '</tool_call>{"name": "f"}</tool_call>',
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",
        "<tool_call>\n<function= >\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n</function>\nDone.\n</tool_call>",
        "<tool_call>\n<function=f>\n<parameter=a>\n5\n</parameter>\n<parameter=a>\n6\n</parameter>\n</function>\n</tool_call>",
    ):
        assert chat.clean_response(written) == written.strip(), written
    # A response that quotes ChatML (a code block, a format it explains) ended no turn of its own.
    quoted = "Qwen's format:\n```\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n```\nThen it replies."
    assert chat.clean_response(quoted) == quoted
    inside = "Example:\n```\nHi<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n```\nThen"
    assert chat.clean_response(inside) == inside
    # After a ChatML prompt, a header opens a turn as in the query read whole: with the prompt
    # or without, one response (an agent loop that dropped the turn end before its observation).
    prompt = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    for answer in ("Answer.\n<|im_start|>user\nThanks", "Answer.<|im_end|>\n<|im_start|>user\nThanks"):
        assert (
            chat.split_query(prompt + answer, prompt)[1]
            == chat.split_query(prompt + answer)[1]
            == ("Answer.\n\nUser: Thanks")
        )
    # Arguments Python holds but JSON cannot write (a library caller's): no exception.
    assert chat.render([{"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"a": 10**5000}}]}])
    # An open reasoning block, then a call: read once, it reads as itself.
    once = chat.clean_response('<think>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert once == "<think>\n[call functions.f]" and chat.clean_response(once) == once
    # Headers that each reading's stripped turn ends uncover: a few readings, no recursion.
    uncovering = "A<|im_end|>\n<|im_start|>tool\nB" + "<|im_end|>\n<|im_start|>user" * 400 + "<|im_end|>" * 400
    assert chat.clean_response(uncovering).startswith("A\n\nTool: B")
    nested = "A<|im_start|>tool\nB" + "<|im_start|>user" * 400 + "<|im_end|>" * 400
    assert chat.clean_response(nested) == chat.clean_response(chat.clean_response(nested))
    beside = "<|im_start|>user\nSee <tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\nok"
    assert chat.split_query(beside) == ([{"role": "user", "content": "See <tool_response>\n4\n</tool_response>"}], "ok")


_tool_pieces = st.sampled_from(
    [
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
        "<|im_start|>tool\n",
        "<|im_end|>\n",
        "<tool_call>\n",
        "\n</tool_call>",
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "g", "arguments": "x"}',
        "<function=f>\n",
        "<parameter=a>\n",
        "\n</parameter>\n",
        "</function>",
        "True",
        "<tool_response>\n",
        "\n</tool_response>",
        "[call functions.f] ",
        "<think>\n",
        "</think>\n\n",
        "Tool: ",
        "\n",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_tool_pieces, max_size=10).map("".join))
def test_tool_markup_reads_as_itself_once_normalized(text):
    """Calls and results read out of markup are written as a message's are: read again, as a
    batch run sends them to the service, they read the same (same key, same label)."""
    context = chat.context_text(text)
    assert chat.context_text(context) == context
    response = chat.clean_response(text)
    assert chat.clean_response(response) == response
    item = chat.normalize_item({"context": [{"role": "assistant", "content": text}], "response": [{"content": text}]})
    assert chat.normalize_item(item) == item


def test_a_chat_marker_inside_a_turn_is_no_header():
    """A response that writes a template's header marker as text ("use <|im_start|> tokens")
    keeps it: a header is the marker, a role name and the line's end."""
    for query, marker in (
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nUse <|im_start|> tokens<|im_end|>", "<|im_start|>"),
        ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nUse <start_of_turn> here", "<start_of_turn>"),
    ):
        context, response = chat.split_query(query)
        assert context == [{"role": "user", "content": "Hi"}] and marker in response, (context, response)
    # A header's line may end in CRLF, and hold more than the role (OpenAI's ChatML "name=").
    dialogue = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for query in (
        "<|im_start|>system\r\nBe brief.<|im_end|>\r\n<|im_start|>user\r\nHi<|im_end|>\r\n<|im_start|>assistant\r\nYo",
        "<|im_start|>system name=rules\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo",
    ):
        assert chat.split_query(query) == (dialogue, "Yo"), query


def test_runs_of_markup_are_stripped_whole():
    """Runs of pad, start and end tokens with whitespace between them go as one run; a system
    prompt stops at the next opener (text of many unclosed ones is read in one pass)."""
    assert chat._MISTRAL_SYS.search("[SYSTEM_PROMPT]a[SYSTEM_PROMPT]b[/SYSTEM_PROMPT]")[1] == "b"
    assert chat.split_query("<pad><pad></s>Hi") == ("", "Hi")
    assert chat.clean_content("Hi </s>\n</s> <|im_end|>\n") == "Hi"
    assert chat.clean_content(" <s> <s>\nHi") == "Hi"
    assert chat.clean_content("<s>") == "" and chat.clean_content("</s>") == ""


def test_a_response_given_as_messages_reads_as_one_text():
    """A conversational completion is judged as text: a lone assistant message as its content
    (as the same completion given as text); a tool-calling one as its turns in order, the
    assistant's as their content and calls, a tool's result as a Tool block."""
    add = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    trajectory = [
        {"role": "assistant", "content": None, "tool_calls": [add]},
        {"role": "tool", "name": "add", "content": "4"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nIt is 4.<|im_end|>"},
    ]
    text = '[call functions.add] {"a": 2, "b": 2}\n\nTool: 4\n\nIt is 4.'
    assert chat.response_text(trajectory) == text
    for answer in ("Paris.", "<think>\n\n</think>\n\nParis.<|im_end|>", "<|im_end|>", ""):
        assert chat.response_text([{"role": "assistant", "content": answer}]) == chat.clean_response(answer)
    assert chat.response_text([{"content": "Paris."}]) == "Paris."  # no role: the assistant's
    assert chat.response_text([]) == ""
    item = {"context": "2+2?", "response": trajectory, "reference": "4<|im_end|>", "responses": [trajectory, "4"]}
    assert chat.normalize_item({**item, "id": []}) == {
        "context": "2+2?",
        "response": text,
        "reference": "4",
        "responses": [text, "4"],
        "id": [],  # not a response: left as it is
    }


def test_a_plain_transcript_with_one_newline_between_turns():
    """OpenRLHF's prompt template `User: {}\\nAssistant: `: turns one newline apart, read so
    where blank lines do not separate them and the newlines give an assistant turn."""
    query = "<|begin_of_text|>User: Hi\nAssistant: Hello!<|end_of_text|>"
    assert chat.split_query(query) == ([{"role": "user", "content": "Hi"}], "Hello!")
    context, response = chat.split_query(query, "User: Hi\nAssistant: ")
    assert response == "Hello!" and chat.context_text(context) == "Hi"
    assert chat.context_text("User: a\nAssistant: b\nUser: c\nAssistant: ") == "User: a\n\nAssistant: b\n\nUser: c"
    # No dialogue: one turn (no assistant turn; a prompt that quotes a chat log line by
    # line); blank lines still separate turns first.
    assert chat.context_text("System: be brief\nUser: hi") == "System: be brief\nUser: hi"
    quoted = "Human: Summarize this chat log:\nuser: hello\nassistant: hi there\nThanks."
    assert chat.context_text(quoted) == quoted.removeprefix("Human: ")
    assert chat.split_query("User: quote\nAssistant: x\n\nAssistant: real") == (
        [{"role": "user", "content": "quote\nAssistant: x"}],
        "real",
    )


def test_what_a_template_writes_itself_is_no_part_of_the_dialogue():
    """Llama 3.1 to 3.3 date the system turn (3.2 with the day it renders) and mark one with
    tools; Qwen-VL puts a placeholder token per image patch; Mistral lists its tools in front
    of the first [INST]. The dialogue reads as its messages do, whatever day it is rendered."""
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    for day, env in (("26 Jul 2024", ""), ("04 Dec 2026", "Environment: ipython\n")):
        llama = (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{env}Cutting Knowledge Date: December 2023\nToday Date: {day}\n\nBe nice.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        assert chat.context_text(llama) == chat.render(messages) == "System: Be nice.\n\nUser: Hi"
        no_system = llama.replace("Be nice.", "")
        assert chat.split_query(no_system + "Hello<|eot_id|>")[1] == "Hello"
        assert chat.context_text(no_system) == "Hi"
    # A system prompt of one's own that speaks of dates is kept.
    own = "<|start_header_id|>system<|end_header_id|>\n\nToday Date: is a field.<|eot_id|>"
    assert chat.context_text(own) == "System: Today Date: is a field."
    vision = "<|vision_start|>" + "<|image_pad|>" * 1000 + "<|vision_end|>"
    qwen_vl = f"<|im_start|>user\n{vision}What is shown?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>"
    assert chat.split_query(qwen_vl) == ([{"role": "user", "content": "What is shown?"}], "A cat.")
    mistral = '<s>[AVAILABLE_TOOLS][{"type": "function"}][/AVAILABLE_TOOLS][INST]Weather?[/INST]It is sunny.</s>'
    assert chat.split_query(mistral) == ([{"role": "user", "content": "Weather?"}], "It is sunny.")
    # Mistral v0.3 lists the tools in front of the last [INST].
    last = '<s>[INST]a[/INST]b</s>[AVAILABLE_TOOLS][{"type": "function"}][/AVAILABLE_TOOLS][INST]c[/INST]d</s>'
    assert chat.context_text(last) == "User: a\n\nAssistant: b\n\nUser: c\n\nAssistant: d"


def test_a_prompt_is_found_in_a_query_that_a_tokenizer_decoded_with_other_spacing():
    """Llama 3's tokenizers clean up decoded text (`clean_up_tokenization_spaces`: no space
    before "!=", ".", "?", ",", "'s"...), and SentencePiece puts a space after its BOS: the
    query still splits at the prompt's end, not as one response with an empty context."""
    prompt = "Solve: if a != 0 , what is a / a ? It 's easy . Answer:"
    query = "<|begin_of_text|>Solve: if a!= 0, what is a / a? It's easy. Answer: 1<|end_of_text|>"
    assert chat.split_query(query, prompt) == (prompt, "1")
    assert chat.split_query("<s> User: hi\n\nAssistant: yo</s>", "<s>User: hi\n\nAssistant:") == (
        "<s>User: hi\n\nAssistant:",
        "yo",
    )
    # Other text than the prompt's is no match: the query is read on its own.
    assert chat.split_query("Solve: b != 0. Answer: 1", "Solve: a != 0. Answer:") == ("", "Solve: b != 0. Answer: 1")


@pytest.mark.parametrize(
    "system",
    [
        None,
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",  # SmolLM2's default
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",  # Qwen 2.5's
        "Be brief.",  # one of the dialogue's own
    ],
)
def test_a_template_s_default_system_prompt_reads_as_no_system_prompt(model_dir, system):
    """The embedded model's ChatML template writes a system turn of its own where the dialogue
    has none (as Qwen's do): laid out as text, the same dialogue as its messages reads the
    same, so TRL's messages and OpenRLHF's decoded text get one transcript and one cache key.
    A template's default given as a message is left out alike; a system prompt of the
    dialogue's own is kept in both forms."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system" in text  # the template wrote one either way
    want = "System: Be brief.\n\nUser: What is 2+2?" if system == "Be brief." else "What is 2+2?"
    assert chat.context_text(text) == chat.context_text(messages) == want


def test_a_response_given_as_messages_reads_as_itself_when_its_text_is_sent_again():
    """`labeler label --url` reads a file's conversational completions into text and the
    service normalizes that text again: the second reading must change nothing, or the two
    paths judge and key the same completion apart. A tool call's arguments ending in a turn
    end marker, a tool's result with a reasoning tag on a line of its own."""
    call = {"function": {"name": "search", "arguments": "paris weather<|im_end|>"}}
    cases = [
        [{"role": "assistant", "content": "Let me check.", "tool_calls": [call]}],
        [{"role": "tool", "content": "<html>\n</think>\n</html>"}, {"role": "assistant", "content": "Done."}],
        [{"role": "assistant", "content": "A.<|im_end|>"}, {"role": "tool", "content": "ok<|eot_id|>"}],
    ]
    for messages in cases:
        once = chat.normalize_item({"context": "Q", "response": messages})["response"]
        assert chat.normalize_item({"context": "Q", "response": once})["response"] == once, messages
    assert chat.normalize_item({"context": "Q", "response": cases[0]})["response"] == (
        "Let me check.\n\n[call functions.search] paris weather"
    )


@pytest.mark.parametrize("answer", ["<think>\nEasy.\n</think>\n\n4", "<think>", "<think> <think>\nHm.\n</think>\n\n4"])
def test_a_policy_that_opens_its_reasoning_again_splits_alike_with_or_without_its_prompt(answer):
    """A generation prompt that ends in "<think>" (DeepSeek R1's) and a policy that writes the
    tag again: one opening tag, whether the query is split at the request's prompt or by its
    template, so both give one response (an empty one for a bare tag) and one key."""
    prompt = "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n"
    query = prompt + answer + "<｜end▁of▁sentence｜>"
    with_prompt, by_template = chat.split_query(query, prompt)[1], chat.split_query(query)[1]
    assert with_prompt == by_template
    assert "<think>\n<think>" not in by_template and (answer != "<think>" or by_template == "")
