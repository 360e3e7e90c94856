"""The client's own wire types (kept apart from the server's; a test checks they match)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Preference(BaseModel):
    p_a: float = Field(..., description="P(response A preferred), averaged over the orders read")
    p_b: float = Field(..., description="1 - p_a")
    p_a_ab: float | None = Field(None, description="P(A) with A shown first")
    p_a_ba: float | None = Field(None, description="P(A) with B shown first")
    consistent: bool | None = Field(None, description="both orders pick the same winner")
    label_mass: dict[str, float] = Field(default_factory=dict)
    rationale: str | None = None
    rationales: dict[str, list[str]] | None = None
    cached: bool = False


class Score(BaseModel):
    reward: float = Field(..., description="(expected - 5.5) / 4.5, in [-1, 1]")
    expected: float = Field(..., description="expected score in [1, 10]")
    distribution: list[float] = Field(..., description="P(score = 1..10)")
    label_mass: float = 1.0
    rationale: str | None = None
    rationales: list[str] | None = None
    cached: bool = False


class TaskInfo(BaseModel):
    name: str
    version: str
    description: str = ""
    examples: int = 0
    score_examples: int = 0
