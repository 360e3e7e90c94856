"""Exceptions. Every one carries the request (method and URL) it belongs to.

LabelerError
├── RequestError            the request did not get an HTTP answer
│   └── Timeout             connect or read timeout
└── APIStatusError          the server answered with an error status (.status, .type, .param)
    ├── BadRequestError     4xx the caller must fix (not retried)
    │   ├── AuthenticationError   401
    │   ├── PayloadTooLarge       413
    │   └── InvalidRequest        422 (the message names the field and the limit)
    ├── RateLimited         429 (retried, honouring Retry-After; raised when retries run out)
    └── ServerError         5xx (503 is retried)
"""

from __future__ import annotations

from typing import Any


class LabelerError(Exception):
    """Root of every error the client raises."""

    def __init__(self, message: str, *, request: Any = None) -> None:
        super().__init__(message)
        self.request = request


class RequestError(LabelerError):
    """No HTTP answer (connection refused, reset, DNS, ...)."""


class Timeout(RequestError):
    """The connect or read timeout passed."""


class APIStatusError(LabelerError):
    """The server answered with an error status, in its error shape."""

    def __init__(self, message: str, *, request: Any = None, status: int, type: str = "", param: str | None = None,
                 retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(message, request=request)
        self.status = status
        self.type = type
        self.param = param
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """A 4xx the caller must fix; never retried."""


class AuthenticationError(BadRequestError):
    """401: missing or wrong API key."""


class PayloadTooLarge(BadRequestError):
    """413: the request body is over the server's limit; lower batch_size."""


class InvalidRequest(BadRequestError):
    """422: a field is invalid or over a limit (see .param)."""


class RateLimited(APIStatusError):
    """429: the server's queue is full (after the retries ran out)."""


class ServerError(APIStatusError):
    """5xx."""


def from_response(status: int, body: Any, request: Any, retry_after: float | None) -> APIStatusError:
    """The exception for an error response."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = f"HTTP {status}: {err.get('message') or str(body)[:300]}"
    kwargs = {"request": request, "status": status, "type": err.get("type", ""), "param": err.get("param"),
              "retry_after": retry_after}  # fmt: skip
    cls = {401: AuthenticationError, 413: PayloadTooLarge, 422: InvalidRequest, 429: RateLimited}.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else BadRequestError
    return cls(message, **kwargs)
