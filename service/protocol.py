"""Wire types: the request and response bodies of every endpoint.

The request models carry the server's own limits — items per request, characters per text,
samples — and the names of the tasks it loaded, so /openapi.json says exactly what the server
accepts. The classes below document the default limits; `request_models(settings, tasks)`
builds the ones an app validates with, from its settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StrictBool,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from labeler.chat import message_text
from labeler.spec import MAX_GROUP_SIZE, MAX_SEED

from .settings import Settings

_DEFAULTS = Settings.model_construct()


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# The deepest container of a request's texts: body > items > item > responses (a group's) >
# response > message > content (OpenAI content parts) > part; a part's text is one level deeper.
_TEXT_DEPTH = 8


def _without_lone_surrogates(data: Any, depth: int = 0) -> Any:
    """Parsed JSON `data` with U+FFFD for each lone surrogate (JSON "\\ud800") in its strings,
    as the prompt builder would clean them. Values nested deeper than any text of a request
    are left as they are (the request models refuse them), so no body can exhaust the stack."""
    if isinstance(data, str):
        return _LONE_SURROGATE.sub("\ufffd", data) if not data.isascii() else data
    if depth >= _TEXT_DEPTH:
        return data
    if isinstance(data, dict):  # keys too: a body's unknown key is named in its error
        return {_without_lone_surrogates(k): _without_lone_surrogates(v, depth + 1) for k, v in data.items()}
    if isinstance(data, list):
        return [_without_lone_surrogates(v, depth + 1) for v in data]
    return data


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Untrusted(BaseModel):
    """A request body of texts a policy wrote: any string, lone surrogates included."""

    @model_validator(mode="wrap")
    @classmethod
    def _lone_surrogates(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # pydantic refuses a lone surrogate once a length limit applies, and in a key
        # (string_unicode), yet it is text a policy wrote: such a request is cleaned and
        # validated again. Checking every string up front would cost a Python call per text
        # on every request.
        try:
            return handler(data)
        except ValidationError as exc:
            if not any(e["type"] == "string_unicode" for e in exc.errors(include_url=False, include_input=False)):
                raise
        return handler(_without_lone_surrogates(data))


# A role is a name (the transcript writes it in front of its turn), not a text to judge.
MAX_ROLE_CHARS = 64
_MESSAGE_CONTENT = (
    "the turn's text (untrusted); also null or OpenAI content parts, read as their text parts joined by "
    "newlines, which the text's character limit holds"
)


def _content_type(chars: int) -> Any:
    """A message's content as the schema declares it: text, null (a tool-calling turn's), or
    OpenAI content parts (objects). Each is read as text before it is validated."""
    return Annotated[str, Field(max_length=chars)] | list[dict[str, Any]] | None


# Read as loosely as they were ignored before: a call the labeler cannot show is left out,
# not refused (their texts count against the item's token limit like any other).
_TOOL_CALLS = (
    'an assistant turn\'s tool calls (OpenAI\'s and TRL\'s {"function": {"name", "arguments"}}, or flat '
    '{"name", "arguments"}; the arguments JSON text or an object), shown to the labeler after its content as '
    "`[call functions.NAME] ARGUMENTS`; "
    "a call without a function name is left out"
)


_REASONING = (
    "an assistant turn's reasoning kept apart from its content (vLLM's `reasoning_content`; `thinking` as TRL "
    "parses some models' responses): judged as the reasoning block in front of the content, as the same turn "
    "laid out as text has it (unless the content holds one)"
)


class ChatMessageIn(BaseModel):
    """One chat turn of a context or a response (TRL's conversational format, OpenAI-style
    messages, tool calls included)."""

    # What `_said_something` holds it to, in the schema: a content (null counts), or tool calls.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "anyOf": [
                {"required": ["content"]},
                {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
            ]
        },
    )
    role: str = Field(
        ...,
        max_length=MAX_ROLE_CHARS,
        description=f"system, user, assistant, tool (also developer, human, model); at most {MAX_ROLE_CHARS} chars",
    )
    content: _content_type(_DEFAULTS.max_chars) = Field("", description=_MESSAGE_CONTENT)  # type: ignore[valid-type]
    tool_calls: list[dict[str, Any]] | None = Field(None, description=_TOOL_CALLS)
    reasoning_content: Annotated[str, Field(max_length=_DEFAULTS.max_chars)] | None = Field(
        None, description=_REASONING
    )
    thinking: Annotated[str, Field(max_length=_DEFAULTS.max_chars)] | None = Field(None, description=_REASONING)

    @model_validator(mode="before")
    @classmethod
    def _said_something(cls, data: Any) -> Any:
        """A message without a `content` (null counts) or `tool_calls` is refused: a misspelt
        key ("contents", "text") would otherwise be judged as an empty turn."""
        if isinstance(data, dict) and "content" not in data and not data.get("tool_calls"):
            raise ValueError("a message needs a 'content' (text, content parts or null) or 'tool_calls'")
        return data

    @field_validator("tool_calls")
    @classmethod
    def _arguments_text(cls, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """Arguments given as an object, as the JSON text the labeler is shown, written here:
        an object nested too deep to write (the body parser reads deeper than json.dumps
        writes) is refused naming the message, not failed while the prompt is rendered."""
        for k, call in enumerate(calls or ()):
            function = call.get("function") or call
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if arguments is not None and not isinstance(arguments, str):
                try:
                    function["arguments"] = json.dumps(arguments, ensure_ascii=False)
                except (RecursionError, ValueError, TypeError):
                    raise ValueError(f"tool_calls[{k}]: the arguments are nested too deep to write as JSON") from None
        return calls

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """Null and a list of content parts as their text; anything else as it is, for the
        schema's types to accept or refuse."""
        if value is None or (isinstance(value, list) and all(isinstance(p, dict) for p in value)):
            return message_text(value)
        return value


Context = Annotated[str, Field(max_length=_DEFAULTS.max_chars)] | list[ChatMessageIn]
_CONTEXT = (
    "the prompt / context (untrusted): text, or chat messages; text that a known chat template laid out "
    "(ChatML, Llama 3, ...) is parsed into messages; either way the labeler reads the canonical transcript"
)
_RESPONSE = (
    "(untrusted): text, or chat messages (a conversational completion; with tools, the assistant's turns and the "
    "tools' results), read as text: assistant turns as their content and tool calls, other turns as `Role: ...` "
    "blocks; trailing end-of-turn markers are stripped; may be empty (judged as an empty response)"
)
Response = Annotated[str, Field(max_length=_DEFAULTS.max_chars)] | list[ChatMessageIn]


class PairItemIn(_Body):
    context: Context = Field("", description=_CONTEXT)
    response_a: Response = Field(..., description="first response " + _RESPONSE)
    response_b: Response = Field(..., description="second response " + _RESPONSE)


class ScoreItemIn(_Body):
    context: Context = Field("", description=_CONTEXT)
    response: Response = Field(..., description="the response to score " + _RESPONSE)


class ReferenceItemIn(_Body):
    context: Context = Field("", description=_CONTEXT)
    response: Response = Field(..., description="the completion to reward " + _RESPONSE)
    reference: Response = Field(..., description="the reference response " + _RESPONSE)


_GROUP = f"the completions of one prompt, 2 to {MAX_GROUP_SIZE}, each " + _RESPONSE


class GroupItemIn(_Body):
    context: Context = Field("", description=_CONTEXT)
    responses: list[Response] = Field(..., min_length=2, max_length=MAX_GROUP_SIZE, description=_GROUP)


class _Options(_Body, _Untrusted):
    """The options every label request shares."""

    task: str = Field(..., description="task name (GET /v1/tasks)")
    # Strict, as the schema says them: a JSON boolean, a JSON integer ("true", 1 for true and
    # false for 0 would be read as the schema does not say).
    cot: StrictBool = Field(False, description="generate a rationale before reading the label")
    samples: StrictInt = Field(
        1, ge=1, le=_DEFAULTS.max_samples, description="rationales to sample and average (needs cot)"
    )
    # `lt`, not `le`: the OpenAPI document writes bounds as floats, and MAX_SEED (2**59 - 1) as
    # a float is 2**59; MAX_SEED + 1 is exact.
    seed: StrictInt = Field(0, ge=0, lt=MAX_SEED + 1, description=f"seed of the sampled rationales (0 to {MAX_SEED})")
    cache: StrictBool = Field(True, description="false: neither read nor write the cache")


class PreferencesRequest(_Options):
    items: list[PairItemIn] = Field(..., min_length=1, max_length=_DEFAULTS.max_items)
    order: Literal["both", "ab", "ba"] = Field("both", description="both orders (default) or one")


class ScoresRequest(_Options):
    items: list[ScoreItemIn] = Field(..., min_length=1, max_length=_DEFAULTS.max_items)


class JudgmentsRequest(_Options):
    items: list[ScoreItemIn] = Field(..., min_length=1, max_length=_DEFAULTS.max_items)


class ReferenceRewardsRequest(_Options):
    items: list[ReferenceItemIn] = Field(..., min_length=1, max_length=_DEFAULTS.max_items)
    order: Literal["both", "ab", "ba"] = Field("both", description="both orders (default) or one")


class GroupRewardsRequest(_Options):
    items: list[GroupItemIn] = Field(
        ..., min_length=1, max_length=_DEFAULTS.max_items, description="groups; a group of N is N (N - 1) reads"
    )


class GetRewardRequest(_Untrusted):
    """OpenRLHF's remote reward-model request."""

    model_config = ConfigDict(extra="allow")
    # May be empty: OpenRLHF 0.11.0 (not 0.11.2) shards a batch across its reward URLs and
    # posts an empty shard to every URL past the last query.
    query: list[str] = Field(..., max_length=_DEFAULTS.max_items, description="prompt + response each")
    prompts: list[str] | None = Field(None, description="the prompts, one per query, to split each query exactly")
    labels: list[Any] | None = Field(
        None, description="reference responses, one per query, for reward=reference; otherwise ignored"
    )


_GET_REWARD_TASK = "task name (default: the server's LABELER_TASK)"


class GetRewardParams(BaseModel):
    """/get_reward's options, in its URL (OpenRLHF's request body is its own). Any other
    query parameter is refused: a misspelt option would otherwise be ignored."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description=_GET_REWARD_TASK)
    reward: Literal["score", "reference"] = Field(
        "score", description="score: the direct-score reward; reference: against `labels` as reference responses"
    )
    overlong: Literal["refuse", "lowest"] = Field(
        "refuse",
        description="a query over a length limit: refuse (422, the whole request) or lowest (reward -1 for that "
        "query, the others judged; extra_logs.overlong marks it)",
    )


class RequestModels(NamedTuple):
    preferences: type[PreferencesRequest]
    scores: type[ScoresRequest]
    get_reward: type[GetRewardRequest]
    judgments: type[JudgmentsRequest]
    reference_rewards: type[ReferenceRewardsRequest]
    group_rewards: type[GroupRewardsRequest]
    get_reward_params: type[GetRewardParams]


def request_models(settings: Settings, tasks: Sequence[str], judged: Sequence[str] | None = None) -> RequestModels:
    """The request models with `settings`' limits and the loaded task names (an enum in the
    schema; an unknown name still gets the 422 that lists the known ones); `judged`: the
    tasks that ask a yes/no question, all of them unless given, /v1/judgments' enum."""
    chars, most = settings.max_chars, settings.max_items

    content = Field("", description=f"{_MESSAGE_CONTENT}; at most {chars} characters")
    reasoning = (
        Annotated[str, Field(max_length=chars)] | None,
        Field(None, description=f"{_REASONING}; at most {chars} characters"),
    )
    message = create_model(
        "ChatMessageIn",
        __base__=ChatMessageIn,
        content=(_content_type(chars), content),
        reasoning_content=reasoning,
        thinking=reasoning,
    )
    texts = Annotated[str, Field(max_length=chars)] | list[message]  # type: ignore[valid-type]
    context = (texts, Field("", description=f"{_CONTEXT}; at most {chars} characters (each message's content)"))

    def text(default: Any, what: str) -> Any:
        return (texts, Field(default, description=f"{what}; at most {chars} characters (each message's content)"))

    pair = create_model(
        "PairItemIn",
        __base__=PairItemIn,
        context=context,
        response_a=text(..., "first response " + _RESPONSE),
        response_b=text(..., "second response " + _RESPONSE),
    )
    single = create_model(
        "ScoreItemIn", __base__=ScoreItemIn, context=context, response=text(..., "the response to score " + _RESPONSE)
    )
    reference = create_model(
        "ReferenceItemIn",
        __base__=ReferenceItemIn,
        context=context,
        response=text(..., "the completion to reward " + _RESPONSE),
        reference=text(..., "the reference response " + _RESPONSE),
    )
    group = create_model(
        "GroupItemIn",
        __base__=GroupItemIn,
        context=context,
        responses=(
            list[texts],  # type: ignore[valid-type]
            Field(
                ...,
                min_length=2,
                max_length=settings.max_group_size,
                description=f"the completions of one prompt, 2 to {settings.max_group_size}, each {_RESPONSE}; "
                f"at most {chars} characters",
            ),
        ),
    )

    def task(names: Sequence[str], what: str = "") -> Any:
        described = f"task name{what} (GET /v1/tasks)"
        return (str, Field(..., description=described, json_schema_extra={"enum": sorted(names)}))

    options: dict[str, Any] = {
        "task": task(tasks),
        "samples": (StrictInt, Field(1, ge=1, le=settings.max_samples, description="rationales to sample (needs cot)")),
    }
    judgment_task = task(tasks if judged is None else judged, ", of a task that asks a yes/no question")
    comparisons = settings.max_queue_items
    return RequestModels(
        create_model(
            "PreferencesRequest",
            __base__=PreferencesRequest,
            items=(list[pair], Field(..., min_length=1, max_length=most)),  # type: ignore[valid-type]
            **options,
        ),
        create_model(
            "ScoresRequest",
            __base__=ScoresRequest,
            items=(list[single], Field(..., min_length=1, max_length=most)),  # type: ignore[valid-type]
            **options,
        ),
        create_model(
            "GetRewardRequest",
            __base__=GetRewardRequest,
            query=(
                list[str],
                Field(
                    ...,
                    max_length=most,
                    description=f"prompt + response each; the prompt and the response at most {chars} characters "
                    "each (a prompt of chat markup: each message's content)",
                ),
            ),
            prompts=(
                list[str] | None,
                Field(
                    None,
                    description="the prompts, one per query, to split each query exactly; at most "
                    f"{chars} characters each (a prompt of chat markup: each message's content)",
                ),
            ),
            labels=(
                list[Any] | None,
                Field(
                    None,
                    description="reference responses, one per query, for reward=reference (texts of at most "
                    f"{chars} characters); otherwise ignored",
                ),
            ),
        ),
        create_model(
            "JudgmentsRequest",
            __base__=JudgmentsRequest,
            items=(list[single], Field(..., min_length=1, max_length=most)),  # type: ignore[valid-type]
            **{**options, "task": judgment_task},
        ),
        create_model(
            "ReferenceRewardsRequest",
            __base__=ReferenceRewardsRequest,
            items=(list[reference], Field(..., min_length=1, max_length=most)),  # type: ignore[valid-type]
            **options,
        ),
        create_model(
            "GroupRewardsRequest",
            __base__=GroupRewardsRequest,
            items=(
                list[group],  # type: ignore[valid-type]
                Field(
                    ...,
                    min_length=1,
                    max_length=most,
                    description="groups; a group of N is N (N - 1) reads: N (N - 1) / 2 comparisons, at most "
                    f"{comparisons} in all per request (LABELER_MAX_QUEUE_ITEMS)",
                ),
            ),
            **options,
        ),
        create_model(
            "GetRewardParams",
            __base__=GetRewardParams,
            task=(
                str | None,
                Field(
                    None,
                    description=_GET_REWARD_TASK,
                    json_schema_extra={"enum": sorted(tasks)},
                ),
            ),
        ),
    )


class Usage(BaseModel):
    items: int = Field(..., description="items in the request")
    cached: int = Field(..., description="answered from the cache")
    computed: int = Field(..., description="computed by the engine for this request")
    shared: int = Field(..., description="joined a computation already in flight (single-flight)")


class PreferenceOut(BaseModel):
    p_a: float = Field(..., description="P(response A preferred), averaged over the orders read")
    p_b: float = Field(..., description="1 - p_a")
    p_a_ab: float | None = Field(..., description="P(A) with A shown first (label '1'); null if not read")
    p_a_ba: float | None = Field(..., description="P(A) with B shown first (label '2'); null if not read")
    consistent: bool | None = Field(..., description="both orders pick the same winner; null with one order")
    label_mass: dict[str, float] = Field(..., description="per order, the model's probability on the labels")
    rationale: str | None = Field(None, description="with cot: the first rationale of the first order")
    rationales: dict[str, list[str]] | None = Field(None, description="with cot: every rationale, per order")
    cached: bool = Field(..., description="true when this result came from the cache")


class ScoreOut(BaseModel):
    reward: float = Field(..., description="(expected - 5.5) / 4.5, in [-1, 1]")
    expected: float = Field(..., description="expected score, in [1, 10]")
    distribution: list[float] = Field(..., description="P(score = 1..10)")
    label_mass: float = Field(..., description="the model's probability on the labels 1..10")
    rationale: str | None = Field(None, description="with cot: the first rationale")
    rationales: list[str] | None = Field(None, description="with cot: every rationale")
    cached: bool = Field(..., description="true when this result came from the cache")


class JudgmentOut(BaseModel):
    p_yes: float = Field(..., description="P(yes) to the task's yes/no question (both capitalizations summed)")
    p_no: float = Field(..., description="1 - p_yes")
    label_mass: float = Field(..., description="the model's probability on the yes/no labels")
    rationale: str | None = Field(None, description="with cot: the first rationale")
    rationales: list[str] | None = Field(None, description="with cot: every rationale")
    cached: bool = Field(..., description="true when this result came from the cache")


class ReferenceRewardOut(BaseModel):
    reward: float = Field(..., description="2 p_win - 1, in [-1, 1]")
    p_win: float = Field(..., description="P(response preferred over the reference), averaged over the orders read")
    p_win_ab: float | None = Field(..., description="with the response shown first; null if not read")
    p_win_ba: float | None = Field(..., description="with the reference shown first; null if not read")
    consistent: bool | None = Field(..., description="both orders pick the same winner; null with one order")
    label_mass: dict[str, float] = Field(..., description="per order, the model's probability on the labels")
    rationale: str | None = Field(None, description="with cot: the first rationale of the first order")
    rationales: dict[str, list[str]] | None = Field(None, description="with cot: every rationale, per order")
    cached: bool = Field(..., description="true when this result came from the cache")


class GroupRewardsOut(BaseModel):
    rewards: list[float] = Field(..., description="per completion, 2 w_i - 1 in [-1, 1]; they sum to 0")
    win_rate: list[float] = Field(..., description="w_i: completion i's mean probability of beating the others")
    p_win: list[list[float | None]] = Field(..., description="P(i preferred over j), both orders; null on the diagonal")
    label_mass: float = Field(..., description="the model's probability on the labels, averaged over the reads")
    consistency: float = Field(..., description="share of pairs whose two orders pick the same winner")
    rationales: list[list[list[str] | None]] | None = Field(
        None, description="with cot: [i][j] the rationales of the read showing i first"
    )
    cached: bool = Field(..., description="true when this result came from the cache")


# Each kind's result as a response carries it (with its `cached` flag): the `results` items of
# the responses below.
RESULT_MODELS: dict[str, type[BaseModel]] = {
    "pairwise": PreferenceOut,
    "score": ScoreOut,
    "judgment": JudgmentOut,
    "reference": ReferenceRewardOut,
    "group": GroupRewardsOut,
}


class _Reply(BaseModel):
    model: str = Field(..., description="model id: directory name @ content fingerprint (part of every cache key)")
    task: str
    task_version: str = Field(..., description="content hash of the task (part of every cache key)")
    usage: Usage


class PreferencesResponse(_Reply):
    results: list[PreferenceOut]


class ScoresResponse(_Reply):
    results: list[ScoreOut]


class JudgmentsResponse(_Reply):
    results: list[JudgmentOut]


class ReferenceRewardsResponse(_Reply):
    results: list[ReferenceRewardOut]


class GroupRewardsResponse(_Reply):
    results: list[GroupRewardsOut]


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class TaskInfo(BaseModel):
    name: str
    version: str
    description: str
    examples: int
    score_examples: int
    judgment_question: str = Field("", description="the task's yes/no question (POST /v1/judgments); empty: none")
    judgment_examples: int = 0


class TasksResponse(BaseModel):
    default_task: str
    tasks: list[TaskInfo]


class LabelDefaults(BaseModel):
    """The server's own parameters that are part of every label's identity."""

    temperature: float = Field(..., description="sampling temperature of self-consistency rationales")
    max_rationale_tokens: int = Field(..., description="tokens of a chain-of-thought rationale at most")
    end_markers: list[str] = Field(..., description="end-of-turn markers stripped from responses and chat turns")


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    model: str = Field(..., description="model id (part of every cache key)")
    engine: str
    cache: str = Field(..., description="memory or redis")
    cache_status: str = Field(
        ..., description="ok; bypassed while Redis does not answer; refused when it refuses a ping (labels still work)"
    )
    labeler: LabelDefaults


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The one error shape, for every 4xx and 5xx."""

    error: ErrorDetail
