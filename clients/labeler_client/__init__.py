"""Client for the RLAIF labeler service.

    from labeler_client import Client
    client = Client("http://127.0.0.1:8000")              # or LABELER_URL / LABELER_API_KEY
    client.rewards(prompts, completions, task="helpful")  # -> list[float] in [-1, 1]
    client.rewards_against(prompts, completions, references, task="helpful")  # pairwise vs a reference
    client.group_relative_rewards(prompts, groups, task="helpful")  # per group, rewards summing to 0
    client.judgments([{"context": p, "response": r}], task="harmless")  # P(yes)

Prompts may be text or chat messages: the service renders every context into one canonical
transcript. Adapters: `labeler_client.trl` (reward functions, pairwise judge),
`labeler_client.verl` (`compute_score`); fake server for tests: `labeler_client.testing`.
"""

from ._client import AsyncClient, Client
from ._config import ENV_API_KEY, ENV_URL, TRAINING_RETRY, Retry, Timeout
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InvalidRequest,
    LabelerClientError,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    ResponseError,
    ServerError,
    TimeoutException,
)
from ._models import GroupRewards, Health, Judgment, Preference, ReferenceReward, Score, TaskInfo

__version__ = "0.1.0"

__all__ = [
    "APIStatusError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ENV_API_KEY",
    "ENV_URL",
    "GroupRewards",
    "Health",
    "InvalidRequest",
    "Judgment",
    "LabelerClientError",
    "PayloadTooLarge",
    "Preference",
    "RateLimited",
    "ReferenceReward",
    "RequestError",
    "ResponseError",
    "Retry",
    "Score",
    "ServerError",
    "TRAINING_RETRY",
    "TaskInfo",
    "Timeout",
    "TimeoutException",
]
