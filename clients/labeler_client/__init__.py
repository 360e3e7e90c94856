"""Client for the RLAIF labeler service.

from labeler_client import Client
client = Client("http://127.0.0.1:8000")          # or LABELER_URL / LABELER_API_KEY
client.rewards(prompts, completions, task="helpful")  # -> list[float] in [-1, 1]
"""

from ._client import AsyncClient, Client, as_text
from ._config import Retry, Timeouts
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InvalidRequest,
    LabelerError,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    ServerError,
    Timeout,
)
from ._models import Preference, Score, TaskInfo

__version__ = "0.1.0"

__all__ = [
    "APIStatusError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "InvalidRequest",
    "LabelerError",
    "PayloadTooLarge",
    "Preference",
    "RateLimited",
    "RequestError",
    "Retry",
    "Score",
    "ServerError",
    "TaskInfo",
    "Timeout",
    "Timeouts",
    "as_text",
]
