"""Exceptions. Every one carries the `request` (an `httpx.Request`) it belongs to; those with
an HTTP answer also carry the `response`, its `status` and the server's error fields.

LabelerClientError
├── RequestError            the request did not get an HTTP answer (retried, unless .misconfigured)
│   └── TimeoutException    connect or read timeout (retried)
├── APIStatusError          the server answered with an error status (.status .type .param .code
│                           .message)
│   ├── BadRequestError     4xx the caller must fix (never retried, but 408: a proxy's timeout)
│   │   ├── AuthenticationError   401
│   │   ├── PayloadTooLarge       413 (one item over the server's body limit)
│   │   └── InvalidRequest        422 (.param names the field, the message the limit)
│   ├── RateLimited         429 (retried after Retry-After; raised once retries run out)
│   └── ServerError         5xx (502/503/504 retried; .param names the item the engine
│                           failed on, when one did)
└── ResponseError           a 2xx answer the client cannot use (wrong shape or result count)

When a call's items are sent in several requests, `.param`, `.item` and `.message` of an error
about one item name it by its position in the caller's list (`items[70].response` for the 7th item of
the second 64-item request), not in the request that carried it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx

_INDEX = re.compile(r"\b(items|query)\[(\d+)\]")


class LabelerClientError(Exception):
    """Root of every error the client raises."""

    def __init__(self, message: str, *, request: httpx.Request) -> None:
        super().__init__(message)
        self.request = request

    def __reduce__(self) -> tuple[Any, ...]:
        # The constructors take keyword-only arguments, which pickle's default cannot pass:
        # rebuild from the class, the message and the attributes, so that an error crosses a
        # process boundary (a process pool's worker, a Ray task) whole.
        return (_rebuild, (type(self), self.args), self.__dict__)


def _rebuild(cls: type[LabelerClientError], args: tuple[Any, ...]) -> LabelerClientError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    return error


class RequestError(LabelerClientError):
    """No HTTP answer (connection refused or reset, DNS, protocol error...). `misconfigured`:
    the base URL's scheme is neither http nor https, its https port speaks plain HTTP or its
    certificate is not trusted, or the client was closed: no try would get an answer, so it
    is never retried, and raised even with on_error="none"."""

    misconfigured = False


class TimeoutException(RequestError):
    """The connect or read timeout passed."""


class APIStatusError(LabelerClientError):
    """The server answered with an error status, in its `{"error": {...}}` shape."""

    def __init__(
        self, message: str, *, response: httpx.Response, body: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status: int = response.status_code
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        self.type: str = str(err.get("type") or "")
        param = err.get("param")
        self.param: str | None = param if isinstance(param, str) else None  # a proxy's other shapes name nothing
        # The server's own message, without the request line and status that str(error) puts first.
        self.message: str = str(err.get("message") or "")
        self.code = err.get("code", self.status)
        self.retry_after = retry_after
        self.item: int | None = None  # the caller's index of the item the error is about, if one

    @property
    def _names_item(self) -> bool:
        """The server said which item of the request this error is about (`items[3]...`)."""
        return _INDEX.match(self.param or "") is not None

    def _about_item(self, offset: int) -> None:
        """Name the item by its position in the caller's list: this error's request carried
        the caller's items from `offset` on."""
        self._renumber(lambda k: offset + k)

    def _name_item(self, index: int) -> None:
        """Name the caller's item `index` as the one this error is about, where the server
        named none: its request carried that item alone."""
        name = f"items[{index}]"
        self.param, self.item = name, index
        self.message = f"{name}: {self.message}" if self.message else name
        self.args = (f"{self} ({name} alone)",)

    def _renumber(self, position: Callable[[int], int]) -> None:
        """Name the item by `position` of its index in the request (param, message, `item`)."""
        match = _INDEX.match(self.param or "")
        if match is None:
            return
        self.item = position(int(match.group(2)))
        if self.item == int(match.group(2)):
            return

        def shift(m: re.Match[str]) -> str:
            return f"{m.group(1)}[{position(int(m.group(2)))}]"

        self.param = _INDEX.sub(shift, self.param, count=1)
        self.message = _INDEX.sub(shift, self.message, count=1)
        self.args = (_INDEX.sub(shift, str(self), count=1),)


class BadRequestError(APIStatusError):
    """A 4xx the caller must fix; never retried (but a 408, a proxy's timeout, which is)."""


class AuthenticationError(BadRequestError):
    """401: missing or wrong API key."""


class PayloadTooLarge(BadRequestError):
    """413: the request body is over the server's limit. The client sends a batch refused so
    again in halves: this reaches the caller for one item over the limit on its own, named
    by `.item` and `.param`."""


class InvalidRequest(BadRequestError):
    """422: a field is invalid or over a limit (see .param)."""

    @property
    def _response_too_long(self) -> bool:
        """Whether it refuses an item's response (a message of it too) or the item as a whole
        as over a length limit: the policy's output, where its prompt or reference would be
        the data's."""
        if self.type != "input_too_long" or self.item is None:
            return False
        head = f"items[{self.item}]"
        param = self.param or ""
        return param in (head, head + ".response") or param.startswith((head + ".response[", head + ".response."))


class RateLimited(APIStatusError):
    """429: the server's queue is full (after the retries ran out)."""


class ServerError(APIStatusError):
    """5xx."""


class ResponseError(LabelerClientError):
    """A successful status with a body the client cannot use (never a silent placeholder)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    401: AuthenticationError,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
}


def from_response(response: httpx.Response, retry_after: float | None = None) -> APIStatusError:
    """The exception for an error response."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    err = body.get("error") if isinstance(body, dict) else None
    detail = err.get("message") if isinstance(err, dict) else None
    request = response.request
    message = f"{request.method} {request.url.path} -> HTTP {response.status_code}: {detail or str(body)[:300]}"
    if response.is_redirect:
        location = response.headers.get("location", "")
        base = location.removesuffix(request.url.path) if location.endswith(request.url.path) else location
        message += f" (redirected to {location}: give {base} as base_url)"
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else BadRequestError
    return cls(message, response=response, body=body, retry_after=retry_after)
