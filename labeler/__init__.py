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
    InputTooLong,
    InvalidInput,
    LabelerError,
    ModelLoadError,
    TaskFileError,
    UnknownTask,
)
from .tasks import Task, TaskRegistry

__version__ = "0.1.0"

__all__ = [
    "EngineError",
    "GroupItem",
    "GroupRewards",
    "InputTooLong",
    "InvalidInput",
    "JudgmentResult",
    "Labeler",
    "LabelerError",
    "ModelLoadError",
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
