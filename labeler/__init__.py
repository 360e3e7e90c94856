"""The labeler core: tasks, prompts, scoring math and engines (no HTTP)."""

from .core import Labeler, PairItem, PreferenceResult, ScoreItem, ScoreResult
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
    "InputTooLong",
    "InvalidInput",
    "Labeler",
    "LabelerError",
    "ModelLoadError",
    "PairItem",
    "PreferenceResult",
    "ScoreItem",
    "ScoreResult",
    "Task",
    "TaskFileError",
    "TaskRegistry",
    "UnknownTask",
    "load_engine",
]
