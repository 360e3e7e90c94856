"""The labeler core: tasks, prompts, scoring math and engines (no HTTP)."""

from .core import (
    GroupItem,
    GroupRewards,
    JudgmentResult,
    Labeler,
    PairItem,
    PreferenceResult,
    ReferenceItem,
    ReferenceReward,
    ScoreItem,
    ScoreResult,
)
from .engines import load_engine
from .errors import (
    EngineError,
    EngineUnavailable,
    InputTooLong,
    InvalidInput,
    LabelerError,
    ModelLoadError,
    ModelOutputError,
    TaskFileError,
    UnknownTask,
)
from .spec import LabelSpec
from .tasks import Task, TaskRegistry

__version__ = "0.1.0"

__all__ = [
    "EngineError",
    "EngineUnavailable",
    "GroupItem",
    "GroupRewards",
    "InputTooLong",
    "InvalidInput",
    "JudgmentResult",
    "LabelSpec",
    "Labeler",
    "LabelerError",
    "ModelLoadError",
    "ModelOutputError",
    "PairItem",
    "PreferenceResult",
    "ReferenceItem",
    "ReferenceReward",
    "ScoreItem",
    "ScoreResult",
    "Task",
    "TaskFileError",
    "TaskRegistry",
    "UnknownTask",
    "load_engine",
]
