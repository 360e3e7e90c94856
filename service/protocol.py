"""Wire types: the request and response bodies of every endpoint."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from labeler.core import MAX_SEED


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessageIn(BaseModel):
    """One chat turn of a context (TRL's conversational format, OpenAI-style messages)."""

    model_config = ConfigDict(extra="ignore")
    role: str = Field(..., description="system, user, assistant, tool (also developer, human, model)")
    content: str = Field("", description="the turn's text (untrusted)")


Context = str | list[ChatMessageIn]
_CONTEXT = (
    "the prompt / context (untrusted): text, or chat messages; text that a known chat template laid out "
    "(ChatML, Llama 3, ...) is parsed into messages; either way the labeler reads the canonical transcript"
)
_RESPONSE = "(untrusted); trailing end-of-turn markers are stripped; may be empty (judged as an empty response)"


# No constraints on the texts: with any, pydantic refuses a lone surrogate ("\ud800" in the
# JSON) that the prompt builder cleans.
class PairItemIn(_Body):
    context: Context = Field("", description=_CONTEXT)
    response_a: str = Field(..., description="first response " + _RESPONSE)
    response_b: str = Field(..., description="second response " + _RESPONSE)


class ScoreItemIn(_Body):
    context: Context = Field("", description=_CONTEXT)
    response: str = Field(..., description="the response to score " + _RESPONSE)


class _Options(_Body):
    task: str = Field(..., description="task name (GET /v1/tasks)")
    cot: bool = Field(False, description="generate a rationale before reading the label")
    samples: int = Field(1, ge=1, description="rationales to sample and average (needs cot)")
    # Bounded because engines seed a 64-bit generator: a larger seed used to crash the batch.
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the sampled rationales (0 to 2^63 - 1)")
    cache: bool = Field(True, description="false: neither read nor write the cache")


class PreferencesRequest(_Options):
    items: list[PairItemIn] = Field(..., min_length=1)
    order: Literal["both", "ab", "ba"] = Field("both", description="both orders (default) or one")


class ScoresRequest(_Options):
    items: list[ScoreItemIn] = Field(..., min_length=1)


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
    rationale: str | None = None
    rationales: list[str] | None = None
    cached: bool


class _Reply(BaseModel):
    model: str = Field(..., description="model id (part of every cache key)")
    task: str
    task_version: str = Field(..., description="content hash of the task (part of every cache key)")
    usage: Usage


class PreferencesResponse(_Reply):
    results: list[PreferenceOut]


class ScoresResponse(_Reply):
    results: list[ScoreOut]


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model request."""

    model_config = ConfigDict(extra="allow")
    query: list[str] = Field(..., min_length=1, description="prompt + response, one per sample")
    prompts: list[str] | None = Field(None, description="the prompts, to split each query exactly")
    labels: list[Any] | None = Field(None, description="accepted and ignored (reference answers)")


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


class TasksResponse(BaseModel):
    default_task: str
    tasks: list[TaskInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The one error shape, for every 4xx and 5xx."""

    error: ErrorDetail
