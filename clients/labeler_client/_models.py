"""The client's own wire types (kept apart from the server's; a test checks they match)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Preference(BaseModel):
    p_a: float = Field(..., description="P(response A preferred), averaged over the orders read")
    p_b: float = Field(..., description="1 - p_a")
    p_a_ab: float | None = Field(None, description="P(A) with A shown first")
    p_a_ba: float | None = Field(None, description="P(A) with B shown first")
    consistent: bool | None = Field(None, description="both orders pick the same winner")
    label_mass: dict[str, float] = Field(default_factory=dict, description="per order, probability on the labels")
    rationale: str | None = Field(None, description="with cot: the first rationale of the first order")
    rationales: dict[str, list[str]] | None = Field(None, description="with cot: every rationale, per order")
    cached: bool = Field(False, description="true when this result came from the server's cache")


class Score(BaseModel):
    reward: float = Field(..., description="(expected - 5.5) / 4.5, in [-1, 1]")
    expected: float = Field(..., description="expected score in [1, 10]")
    distribution: list[float] = Field(..., description="P(score = 1..10)")
    label_mass: float = Field(1.0, description="the model's probability on the labels 1..10")
    rationale: str | None = Field(None, description="with cot: the first rationale")
    rationales: list[str] | None = Field(None, description="with cot: every rationale")
    cached: bool = Field(False, description="true when this result came from the server's cache")


class Judgment(BaseModel):
    p_yes: float = Field(..., description="P(yes) to the task's yes/no question")
    p_no: float = Field(..., description="1 - p_yes")
    label_mass: float = Field(1.0, description="the model's probability on the yes/no labels")
    rationale: str | None = Field(None, description="with cot: the first rationale")
    rationales: list[str] | None = Field(None, description="with cot: every rationale")
    cached: bool = Field(False, description="true when this result came from the server's cache")


class ReferenceReward(BaseModel):
    reward: float = Field(..., description="2 p_win - 1, in [-1, 1]")
    p_win: float = Field(..., description="P(response preferred over the reference), averaged over the orders read")
    p_win_ab: float | None = Field(None, description="with the response shown first")
    p_win_ba: float | None = Field(None, description="with the reference shown first")
    consistent: bool | None = Field(None, description="both orders pick the same winner")
    label_mass: dict[str, float] = Field(default_factory=dict, description="per order, probability on the labels")
    rationale: str | None = Field(None, description="with cot: the first rationale of the first order")
    rationales: dict[str, list[str]] | None = Field(None, description="with cot: every rationale, per order")
    cached: bool = Field(False, description="true when this result came from the server's cache")


class GroupRewards(BaseModel):
    rewards: list[float] = Field(..., description="per completion, 2 w_i - 1 in [-1, 1]; they sum to 0")
    win_rate: list[float] = Field(..., description="w_i: completion i's mean probability of beating the others")
    p_win: list[list[float | None]] = Field(..., description="P(i preferred over j), both orders; None on the diagonal")
    label_mass: float = Field(1.0, description="the model's probability on the labels, averaged over the reads")
    consistency: float = Field(1.0, description="share of pairs whose two orders pick the same winner")
    rationales: list[list[list[str] | None]] | None = Field(
        None, description="with cot: [i][j] the rationales of the read showing i first"
    )
    cached: bool = Field(False, description="true when this result came from the server's cache")


class TaskInfo(BaseModel):
    name: str = Field(..., description="task name, as passed in `task=`")
    version: str = Field(..., description="content hash of the task (part of every cache key)")
    description: str = ""
    examples: int = Field(0, description="few-shot examples for preferences")
    score_examples: int = Field(0, description="few-shot examples for scores")
    judgment_question: str = Field("", description="the task's yes/no question (judgments()); empty: none")
    judgment_examples: int = Field(0, description="few-shot examples for yes/no judgments")


class Health(BaseModel):
    """The server's readiness answer (`GET /readyz`)."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(..., description='"ready" once the model is loaded')
    model: str = Field("", description="model id (part of every cache key)")
    engine: str = Field("", description="engine name (transformers, vllm, ...)")
    cache: str = Field("", description="cache backend")
    cache_status: Any = Field(None, description="cache reachability")
    labeler: dict[str, Any] | None = Field(
        None,
        description="the server's label parameters (temperature, max_rationale_tokens, end_markers), part of each "
        "label's key",
    )
