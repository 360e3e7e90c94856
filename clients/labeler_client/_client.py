"""`Client` and `AsyncClient`: thin I/O twins over `_BaseClient`, which holds every step that
is not I/O (configuration, request bodies, reading answers, deciding on retries and splits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import httpx

from . import _batching as batching
from . import _exceptions as exc
from ._config import (
    CALL_WIDE_STATUSES,
    RETRY_STATUSES,
    Retry,
    Timeout,
    parse_retry_after,
    resolve_key,
    resolve_url,
    shown_url,
)
from ._models import GroupRewards, Health, Judgment, Preference, ReferenceReward, Score, TaskInfo
from ._text import Text, group_items, json_body, reference_items, score_items

T = TypeVar("T")
OnError = Literal["raise", "none"]
Order = Literal["both", "ab", "ba"]
Item = Mapping[str, Any]
_ONCE = Retry(max_retries=0)
# Connections a client keeps to the server: requests beyond them wait their turn in the client
# (the service batches whatever reaches it; a few hundred feed it, and stay under a process's
# usual limit of 1024 open files). All are kept alive: httpx's default of 20 closes and opens
# connections at every burst.
_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=256)

__all__ = ["AsyncClient", "Client"]


class Answer(NamedTuple):
    """A 2xx answer's JSON body and the request it answered."""

    data: Any
    request: httpx.Request


def _causes(error: BaseException) -> list[BaseException]:
    """`error`'s chain of causes (what raised it, and what raised that, ...)."""
    chain: list[BaseException] = []
    while (error := error.__cause__ or error.__context__) is not None and error not in chain:
        chain.append(error)
    return chain


def _task_infos(data: Any) -> list[TaskInfo]:
    return [TaskInfo.model_validate(t) for t in data["tasks"]]


class _BaseClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: Timeout | float | None = None,
        retry: Retry | int | None = None,
        batch_size: int = 64,
        max_concurrency: int = 4,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = resolve_url(base_url)
        self.api_key = resolve_key(api_key)
        if isinstance(timeout, (int, float)):
            timeout = Timeout(read=float(timeout), connect=min(10.0, float(timeout)))
        self.timeout = timeout or Timeout()
        self.retry = self._as_retry(retry) if retry is not None else Retry()
        self._clock: Callable[[], float] = time.monotonic  # what Retry.max_elapsed is counted on
        if batch_size < 1 or max_concurrency < 1:
            raise ValueError("batch_size and max_concurrency must be at least 1")
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self._headers = dict(headers or {})
        # Answers received but an outage's (`_answered`): whether the server answered since a call met one.
        self._answers = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({shown_url(self.base_url)!r})"

    @staticmethod
    def _as_retry(retry: Retry | int) -> Retry:
        """A retry policy from a policy or a number of retries (0: none)."""
        if isinstance(retry, Retry):
            return retry
        if isinstance(retry, int) and not isinstance(retry, bool):
            return Retry(max_retries=retry)
        raise TypeError(f"retry must be a Retry or a number of retries, not {type(retry).__name__}")

    @staticmethod
    def _typed(answer: Answer, parse: Callable[[Any], T]) -> T:
        """`parse` of a 2xx answer's body; ResponseError when the body has another shape."""
        try:
            return parse(answer.data)
        except (ValueError, KeyError, TypeError) as e:  # pydantic.ValidationError is a ValueError
            raise exc.ResponseError(f"malformed answer: {e}", request=answer.request) from e

    def _request(self, method: str, path: str, body: Any) -> httpx.Request:
        if body is None:
            return self._http.build_request(method, path)
        headers = {"Content-Type": "application/json"}
        return self._http.build_request(method, path, content=json_body(body), headers=headers)

    def _http_options(self) -> dict[str, Any]:
        headers = {"User-Agent": "labeler-client/0.1.0", **self._headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {
            "base_url": self.base_url,
            "headers": headers,
            # A request waiting for one of the client's connections has not reached the
            # server yet: that wait counts against no timeout (httpx's counts it against the
            # read timeout, so a burst of a trainer's calls timed out in the client's queue).
            "timeout": httpx.Timeout(self.timeout.read, connect=self.timeout.connect, pool=None),
            "limits": _LIMITS,
        }

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        """The JSON body of a 2xx answer, else the matching exception."""
        if response.is_success:
            try:
                return response.json()
            except ValueError as e:
                message = f"invalid JSON in a {response.status_code} answer"
                raise exc.ResponseError(message, request=response.request) from e
        raise exc.from_response(response, parse_retry_after(response.headers.get("retry-after")))

    def _answered(self, response: httpx.Response, request: httpx.Request) -> Answer:
        """`response` as an Answer (or its error), counted in `_answers` unless it is an
        outage's (a 503 about no item, say)."""
        try:
            data = self._answer(response)
        except exc.LabelerClientError as error:
            if not self._outage(error):
                self._answers += 1
            raise
        self._answers += 1
        return Answer(data, request)

    @staticmethod
    def _wrap(error: httpx.HTTPError, request: httpx.Request) -> exc.LabelerClientError:
        if isinstance(error, httpx.TimeoutException):
            return exc.TimeoutException(
                f"{request.method} {shown_url(str(request.url))}: timed out ({type(error).__name__})", request=request
            )
        wrapped = exc.RequestError(
            f"{request.method} {shown_url(str(request.url))}: {type(error).__name__}: {error}", request=request
        )
        # Every try and every batch would fail alike: a URL scheme httpx cannot send, TLS the
        # server does not speak or a certificate this machine does not trust (an https URL to
        # a plain-HTTP port, a self-signed certificate).
        wrapped.misconfigured = isinstance(error, httpx.UnsupportedProtocol) or any(
            isinstance(cause, ssl.SSLCertVerificationError)
            # OpenSSL before 3.2 names a plain-HTTP answer to its handshake so; 3.2 and later:
            or (isinstance(cause, ssl.SSLError) and cause.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"))
            for cause in _causes(error)
        )
        return wrapped

    @staticmethod
    def _closed_error(request: httpx.Request) -> exc.RequestError:
        """The error of a request made on a closed client (httpx's own is a RuntimeError,
        which no handler of this client's errors would catch)."""
        error = exc.RequestError(
            f"{request.method} {shown_url(str(request.url))}: the client is closed", request=request
        )
        error.misconfigured = True  # every try and every batch would fail alike
        return error

    @staticmethod
    def _retry_delay(
        error: exc.LabelerClientError,
        attempt: int,
        retry: Retry,
        isolate: bool,
        elapsed: float,
        outage: Retry | None = None,
    ) -> float | None:
        """Seconds before the next try, or None when `error` is final (`elapsed`: seconds
        since the request's first try). With `isolate`, an error about one item is final: the
        batch is cut around that item instead, and the item alone is retried. `outage`, where
        given, is the policy for an outage's errors (`_outage`) instead of `retry`."""
        if outage is not None and _BaseClient._outage(error):
            retry = outage
        if attempt >= retry.max_retries:
            return None
        if isolate and isinstance(error, exc.APIStatusError) and error._names_item:
            return None
        if isinstance(error, exc.RequestError):
            delay = None if error.misconfigured else retry.delay(attempt)
        elif isinstance(error, exc.APIStatusError) and error.status in RETRY_STATUSES:
            delay = retry.delay(attempt, error.retry_after)
        else:
            return None
        if delay is None or retry.max_elapsed is None:
            return delay
        left = retry.max_elapsed - elapsed
        return min(delay, left) if left > 0 else None

    def _parts_after(self, error: exc.LabelerClientError, idx: range, on_error: OnError) -> list[range]:
        """What to send again after batch `idx` failed with `error` (nothing: its items stay
        None), or `error` raised, named by the caller's index of its item."""
        if isinstance(error, exc.APIStatusError):
            error._about_item(idx.start)
        if isinstance(error, exc.PayloadTooLarge) and len(idx) == 1 and error.item is None:
            error._name_item(idx.start)  # the server names no item of a body it did not read
        if self._too_big(error, idx):  # the client's batch size, not the caller's data: in either mode
            return batching.parts(idx)
        if on_error == "raise" or self._request_wide(error):
            raise error
        return batching.parts(idx, getattr(error, "item", None)) if self._splittable(error, idx, on_error) else []

    @staticmethod
    def _too_big(error: exc.LabelerClientError, idx: range) -> bool:
        """A batch of several items refused for its size: a body over the server's limit (413)
        or more items than it takes (a 422 about `items` as a whole). It is sent again in
        halves; one item too large on its own is the caller's error."""
        too_many = isinstance(error, exc.InvalidRequest) and error.param == "items"
        return len(idx) > 1 and (too_many or isinstance(error, exc.PayloadTooLarge))

    @staticmethod
    def _isolating(idx: range, on_error: OnError) -> bool:
        """With on_error="none", a batch of several items that fails for some of them is cut
        (`_splittable`) so that only those items come back as None."""
        return on_error == "none" and len(idx) > 1

    @classmethod
    def _splittable(cls, error: exc.LabelerClientError, idx: range, on_error: OnError) -> bool:
        """A batch refused for its content (422), or one the engine failed on for an item the
        server names (500, 503), is cut when isolating: around the named item, else in halves."""
        about_items = isinstance(error, exc.InvalidRequest) or (
            isinstance(error, exc.ServerError) and error.item is not None
        )
        return about_items and cls._isolating(idx, on_error)

    @staticmethod
    def _outage(error: exc.LabelerClientError) -> bool:
        """An error of the server's availability, not of the batch: no answer (a timeout
        too), or 408, 502, 503, 504 about no item. Once a batch of a call has used up its
        retries on one, the call's requests get one try at such an error (`_ONCE`), until one is
        answered: a call waits out an outage about as long as one request's retries, not once
        per batch. (A 429 is a server at work that asks each request to come back: each keeps
        its retries, also after an outage.)"""
        if isinstance(error, exc.RequestError):
            return not error.misconfigured
        return (
            isinstance(error, exc.APIStatusError)
            and error.status in RETRY_STATUSES
            and error.status != 429
            and not error._names_item
        )

    @staticmethod
    def _request_wide(error: exc.LabelerClientError) -> bool:
        """An error every batch of the call would get, so it is raised even with
        on_error="none": a request that cannot be sent as configured (`RequestError.misconfigured`),
        a refused API key (401, 403), a URL that is not the labeler's (404,
        405, a redirect, which the client does not follow, or a 2xx that is no labeler's
        answer: not JSON, or not one result per item), a compressed body (415), or a 422 about the request's own
        options (`task`, `samples`, ...), not about its items."""
        if isinstance(error, exc.ResponseError) or (isinstance(error, exc.RequestError) and error.misconfigured):
            return True
        if isinstance(error, exc.APIStatusError) and error.status in CALL_WIDE_STATUSES:
            return True
        param = getattr(error, "param", None)
        return (
            isinstance(error, exc.InvalidRequest)
            and param is not None
            and param not in ("items", "body")
            and not param.startswith("items[")
        )

    @staticmethod
    def _options(task: str, **opts: Any) -> dict[str, Any]:
        if not isinstance(task, str) or not task:
            raise ValueError("task must be a non-empty string (see tasks())")
        return {"task": task, **opts}

    @staticmethod
    def _check_on_error(on_error: str) -> None:
        if on_error not in ("raise", "none"):
            raise ValueError(f'on_error must be "raise" or "none", not {on_error!r}')

    @staticmethod
    def _check_items(items: Sequence[Any]) -> None:
        """Texts given where items belong (the item's fields: a dict, or what `dict()` reads,
        such as a pandas row), refused before any request is sent."""
        if isinstance(items, (str, bytes)):
            raise TypeError("items must be a list of the items' fields, not one text")
        for i, item in enumerate(items):
            if isinstance(item, (str, bytes)):
                raise TypeError(
                    f"items[{i}] is a text, not the item's fields (e.g. {{'context': ..., 'response': ...}})"
                )


class Client(_BaseClient):
    """Blocking client. Large inputs are split into `batch_size` items per request, sent at
    most `max_concurrency` at a time; results come back in input order.

        with Client("http://127.0.0.1:8000", api_key="...") as client:
            client.rewards(prompts, completions, task="helpful")

    `base_url` and `api_key` default to `LABELER_URL` and `LABELER_API_KEY`; `transport`
    takes any `httpx.BaseTransport` (see `labeler_client.testing` for a fake server). In a
    process forked after it was used, it opens connections of its own.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._transport = transport  # for copies of reward functions built on this client
        self._http = httpx.Client(transport=transport, **self._http_options())
        self._pid = os.getpid()  # the process self._http's connections belong to
        self._forking = threading.Lock()
        self._sleep: Callable[[float], None] = time.sleep

    def _http_here(self) -> httpx.Client:
        """The HTTP client of this process: a new one in a process forked after this client
        was used (unless it was closed, or the caller gave a transport, whose own pool
        stays). The pooled connections came along with the fork: a request of the child's on
        one would read the answer to the parent's, and closing them could end the parent's, so
        they are left as they are."""
        if self._pid != os.getpid():
            with self._forking:  # the batches of a call may get here at once
                if self._pid != os.getpid():
                    if self._transport is None and not self._http.is_closed:
                        self._http = httpx.Client(**self._http_options())
                    self._pid = os.getpid()
        return self._http

    def close(self) -> None:
        self._http_here().close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        retry: Retry | int | None = None,
        outage: Retry | None = None,
        isolate: bool = False,
        stop: threading.Event | None = None,
    ) -> Answer:
        """One request, retried by the policy (`outage`, where given, for an outage's errors
        alone: `_outage`). A retry's wait ends early, raising the last error, when `stop` is
        set (another batch of the same call failed)."""
        retry = self.retry if retry is None else self._as_retry(retry)
        attempt, started = 0, self._clock()
        while True:
            http = self._http_here()
            request = self._request(method, path, body)
            try:
                if http.is_closed:
                    raise self._closed_error(request)
                try:
                    response = http.send(request)
                except httpx.HTTPError as e:
                    raise self._wrap(e, request) from e
                return self._answered(response, request)
            except exc.LabelerClientError as error:
                delay = self._retry_delay(error, attempt, retry, isolate, self._clock() - started, outage)
                if delay is None:
                    raise
                if stop is None:
                    self._sleep(delay)
                elif stop.wait(delay):
                    raise
                attempt += 1

    def _batched(
        self, path: str, items: Sequence[Item], opts: dict[str, Any], parse: Callable[[Any], T], on_error: OnError
    ) -> list[T | None]:
        self._check_on_error(on_error)
        self._check_items(items)
        out: list[T | None] = [None] * len(items)

        stop: threading.Event | None = None  # set when a batch fails: the others stop sending
        failures: list[BaseException] = []
        outage: Retry | None = None  # set once a batch's retries ran out on an outage, until an answer

        def run(batch: range) -> None:
            nonlocal outage
            todo = [batch]  # a worklist, not recursion: a cut can leave many failing items after it
            try:
                while todo and not (stop is not None and stop.is_set()):
                    idx = todo.pop(0)
                    try:
                        body = {**opts, "items": batching.select(items, idx)}
                        isolate = self._isolating(idx, on_error)
                        answer = self._send("POST", path, body, outage=outage, isolate=isolate, stop=stop)
                        outage = None  # an answer: the server is back, and requests get their retries again
                        batching.place(out, idx, answer.data, parse, answer.request)
                    except exc.LabelerClientError as error:
                        if self._outage(error):
                            outage = _ONCE
                        todo[:0] = self._parts_after(error, idx, on_error)
            except BaseException as error:
                failures.append(error)
                if stop is not None:
                    stop.set()
                raise

        chunks = batching.split(len(items), self.batch_size)
        if len(chunks) <= 1 or self.max_concurrency == 1:
            for chunk in chunks:
                run(chunk)
            return out
        stop = threading.Event()
        pending = iter(chunks)
        taking = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                with taking:
                    chunk = next(pending, None)
                if chunk is None:
                    return
                with contextlib.suppress(BaseException):  # `run` recorded it in `failures` and set `stop`
                    run(chunk)

        # Daemon threads, not a ThreadPoolExecutor, whose workers the interpreter joins at exit:
        # after an interrupt (Ctrl-C) a request in flight must not hold the process until answered.
        threads = [
            threading.Thread(target=worker, name=f"labeler-client-{i}", daemon=True)
            for i in range(min(self.max_concurrency, len(chunks)))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:  # the batches in flight end at their next step once one has failed
                t.join()
        except BaseException:  # an interrupt: the batches in flight stop at their next step, unwaited
            stop.set()
            raise
        if failures:
            raise failures[0]  # the first batch to fail; the others stopped after it
        return out

    def preferences(
        self,
        items: Sequence[Item],
        task: str,
        *,
        order: Order = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[Preference | None]:
        """Pairwise preferences for items `{"context", "response_a", "response_b"}`, in input order.

        Raises the first `LabelerClientError` of any batch; with `on_error="none"` the items that
        failed (after retries) are None instead."""
        opts = self._options(task, order=order, cot=cot, samples=samples, seed=seed, cache=cache)
        return self._batched("/v1/preferences", items, opts, Preference.model_validate, on_error)

    def scores(
        self,
        items: Sequence[Item],
        task: str,
        *,
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[Score | None]:
        """Direct 1..10 scores for items `{"context", "response"}`, in input order."""
        opts = self._options(task, cot=cot, samples=samples, seed=seed, cache=cache)
        return self._batched("/v1/scores", items, opts, Score.model_validate, on_error)

    def rewards(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        task: str = "general",
        *,
        on_error: OnError = "raise",
        **options: Any,
    ) -> list[float | None]:
        """Rewards in [-1, 1] for (prompt, completion) pairs, plain text or chat messages:
        the `reward` of `scores()` (options: cot, samples, seed, cache)."""
        results = self.scores(score_items(prompts, completions), task, on_error=on_error, **options)
        return [s.reward if s is not None else None for s in results]

    def judgments(
        self,
        items: Sequence[Item],
        task: str,
        *,
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[Judgment | None]:
        """Yes/no judgments (P(yes) to the task's question) for items `{"context", "response"}`,
        in input order."""
        opts = self._options(task, cot=cot, samples=samples, seed=seed, cache=cache)
        return self._batched("/v1/judgments", items, opts, Judgment.model_validate, on_error)

    def reference_rewards(
        self,
        items: Sequence[Item],
        task: str,
        *,
        order: Order = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[ReferenceReward | None]:
        """Pairwise rewards against a reference, 2 P(response preferred) - 1, for items
        `{"context", "response", "reference"}`, in input order."""
        opts = self._options(task, order=order, cot=cot, samples=samples, seed=seed, cache=cache)
        return self._batched("/v1/rewards/reference", items, opts, ReferenceReward.model_validate, on_error)

    def group_rewards(
        self,
        items: Sequence[Item],
        task: str,
        *,
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[GroupRewards | None]:
        """Group-relative rewards for groups `{"context", "responses": [2 to 32 completions]}`,
        in input order (`batch_size` counts groups)."""
        opts = self._options(task, cot=cot, samples=samples, seed=seed, cache=cache)
        return self._batched("/v1/rewards/group", items, opts, GroupRewards.model_validate, on_error)

    def rewards_against(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        references: Sequence[Text],
        task: str = "general",
        *,
        on_error: OnError = "raise",
        **options: Any,
    ) -> list[float | None]:
        """Rewards in [-1, 1] of completions against reference responses to the same prompts:
        the `reward` of `reference_rewards()` (options: order, cot, samples, seed, cache)."""
        items = reference_items(prompts, completions, references)
        results = self.reference_rewards(items, task, on_error=on_error, **options)
        return [r.reward if r is not None else None for r in results]

    def group_relative_rewards(
        self,
        prompts: Sequence[Text],
        groups: Sequence[Sequence[Text]],
        task: str = "general",
        *,
        on_error: OnError = "raise",
        **options: Any,
    ) -> list[list[float] | None]:
        """Per group, the group-relative rewards of its completions (the `rewards` of
        `group_rewards()`; options: cot, samples, seed, cache)."""
        results = self.group_rewards(group_items(prompts, groups), task, on_error=on_error, **options)
        return [r.rewards if r is not None else None for r in results]

    def tasks(self) -> list[TaskInfo]:
        """The tasks the server knows."""
        return self._typed(self._send("GET", "/v1/tasks"), _task_infos)

    def health(self, *, retry: Retry | int | None = None) -> Health:
        """The server's readiness (`GET /readyz`). While the server starts it does not listen
        yet (it does once its model is loaded): `RequestError`, connection refused. A
        `ServerError` is a 503 of a server not ready, or a 502/503 of a proxy in front of one
        that is not up. Both are retried by the policy first. `retry`: a policy or a number of
        retries for this call (0: fail at once)."""
        return self._typed(self._send("GET", "/readyz", retry=retry), Health.model_validate)


def _close_at_shutdown(http: httpx.AsyncClient) -> Any:
    """An async generator of the running loop, started, that closes `http` when it is closed:
    by `loop.shutdown_asyncgens()` (which `asyncio.run` calls as it ends), or once collected
    while its loop still runs. Connections of a loop cannot be closed from another one, and
    left open they stay until the garbage collector finds them (a socket per `asyncio.run`).
    In a process forked from this one it leaves `http` open: the connections are the
    parent's too, and closing one would end it for the parent."""
    pid = os.getpid()

    async def closer() -> Any:
        try:
            yield
        finally:
            if os.getpid() == pid:
                await http.aclose()

    gen = closer()
    with contextlib.suppress(StopIteration):  # run to its yield, which nothing awaits: the loop now tracks it
        gen.__anext__().send(None)
    return gen


class AsyncClient(_BaseClient):
    """The same surface as `Client`, awaitable; use `async with` or `await client.aclose()`.
    It may be awaited from one event loop after another (an `asyncio.run` per training step):
    a new loop gets new connections, since those of an ended loop cannot be used (a loop that
    still runs keeps its own, also when others took turns), and a loop's
    connections are closed when `asyncio.run` shuts it down (with a `transport` of the
    caller's, whose pool is its own, keep to one loop). One thread at a time, as
    `httpx.AsyncClient`: threads that each run a loop take a client each."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._transport = transport  # for copies of reward functions built on this client
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop self._http's connections belong to
        self._pid = os.getpid()  # and the process
        self._closed = False  # by aclose(): a loop's end closes its connections, not the client
        # Per loop (by id) that used this client and still runs: the loop, its HTTP client, and
        # the async generator that closes that client as the loop shuts down; kept until then
        # (collected early, one would close its client while the loop still runs). A loop that
        # comes back gets its own connections again rather than a new pool.
        self._closers: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, Any]] = {}
        self._sleep: Callable[[float], Any] = asyncio.sleep

    def _http_here(self) -> httpx.AsyncClient:
        """The HTTP client for the running loop: that loop's own when it used this client
        before and still runs, else a new one when the loop or the process (a fork) changed,
        unless the client was closed, or the caller gave a transport, whose own pool stays."""
        loop = asyncio.get_running_loop()
        forked = self._pid != os.getpid()
        if self._loop is not loop or forked:
            if self._transport is None and not self._closed:
                # Let go of the closers with nothing left to close: finished, of a loop closed
                # without shutting them down (run by hand: the garbage collector then closes
                # their clients' sockets), or, in a forked child, the parent's.
                self._closers = {
                    k: v for k, v in self._closers.items() if not (forked or v[0].is_closed() or v[2].ag_frame is None)
                }
                known = self._closers.get(id(loop))
                if known is not None and known[0] is loop:
                    self._http = known[1]
                else:
                    if self._loop is not None:
                        self._http = httpx.AsyncClient(**self._http_options())
                    self._closers[id(loop)] = (loop, self._http, _close_at_shutdown(self._http))
            self._loop, self._pid = loop, os.getpid()
        return self._http

    async def aclose(self) -> None:
        http = self._http_here()
        self._closed = True
        await http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        retry: Retry | int | None = None,
        outage: Retry | None = None,
        isolate: bool = False,
    ) -> Answer:
        retry = self.retry if retry is None else self._as_retry(retry)
        attempt, started = 0, self._clock()
        while True:
            request = self._request(method, path, body)
            try:
                http = self._http_here()
                if http.is_closed:
                    raise self._closed_error(request)
                try:
                    response = await http.send(request)
                except httpx.HTTPError as e:
                    raise self._wrap(e, request) from e
                return self._answered(response, request)
            except exc.LabelerClientError as error:
                delay = self._retry_delay(error, attempt, retry, isolate, self._clock() - started, outage)
                if delay is None:
                    raise
                await self._sleep(delay)
                attempt += 1

    async def _batched(
        self, path: str, items: Sequence[Item], opts: dict[str, Any], parse: Callable[[Any], T], on_error: OnError
    ) -> list[T | None]:
        self._check_on_error(on_error)
        self._check_items(items)
        out: list[T | None] = [None] * len(items)
        gate = asyncio.Semaphore(self.max_concurrency)
        outage: Retry | None = None  # set once a batch's retries ran out on an outage, until an answer

        async def run(batch: range) -> None:
            nonlocal outage
            todo = [batch]  # a worklist, not recursion: a cut can leave many failing items after it
            while todo:
                idx = todo.pop(0)
                try:
                    body = {**opts, "items": batching.select(items, idx)}
                    isolate = self._isolating(idx, on_error)
                    answer = await self._send("POST", path, body, outage=outage, isolate=isolate)
                    outage = None  # an answer: the server is back, and requests get their retries again
                    batching.place(out, idx, answer.data, parse, answer.request)
                except exc.LabelerClientError as error:
                    if self._outage(error):
                        outage = _ONCE
                    todo[:0] = self._parts_after(error, idx, on_error)

        failed = asyncio.Event()

        async def gated(idx: range) -> None:
            async with gate:
                if failed.is_set():  # woken by a failed batch's release: the call is over
                    return
                try:
                    await run(idx)
                except BaseException:
                    failed.set()  # before the gate lets the next batch in
                    raise

        tasks = [asyncio.ensure_future(gated(chunk)) for chunk in batching.split(len(items), self.batch_size)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # fail fast: the other batches' answers would be thrown away
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return out

    async def preferences(
        self,
        items: Sequence[Item],
        task: str,
        *,
        order: Order = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[Preference | None]:
        """See `Client.preferences`."""
        opts = self._options(task, order=order, cot=cot, samples=samples, seed=seed, cache=cache)
        return await self._batched("/v1/preferences", items, opts, Preference.model_validate, on_error)

    async def scores(
        self,
        items: Sequence[Item],
        task: str,
        *,
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[Score | None]:
        """See `Client.scores`."""
        opts = self._options(task, cot=cot, samples=samples, seed=seed, cache=cache)
        return await self._batched("/v1/scores", items, opts, Score.model_validate, on_error)

    async def rewards(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        task: str = "general",
        *,
        on_error: OnError = "raise",
        **options: Any,
    ) -> list[float | None]:
        """See `Client.rewards`."""
        results = await self.scores(score_items(prompts, completions), task, on_error=on_error, **options)
        return [s.reward if s is not None else None for s in results]

    async def judgments(
        self,
        items: Sequence[Item],
        task: str,
        *,
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[Judgment | None]:
        """See `Client.judgments`."""
        opts = self._options(task, cot=cot, samples=samples, seed=seed, cache=cache)
        return await self._batched("/v1/judgments", items, opts, Judgment.model_validate, on_error)

    async def reference_rewards(
        self,
        items: Sequence[Item],
        task: str,
        *,
        order: Order = "both",
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[ReferenceReward | None]:
        """See `Client.reference_rewards`."""
        opts = self._options(task, order=order, cot=cot, samples=samples, seed=seed, cache=cache)
        return await self._batched("/v1/rewards/reference", items, opts, ReferenceReward.model_validate, on_error)

    async def group_rewards(
        self,
        items: Sequence[Item],
        task: str,
        *,
        cot: bool = False,
        samples: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_error: OnError = "raise",
    ) -> list[GroupRewards | None]:
        """See `Client.group_rewards`."""
        opts = self._options(task, cot=cot, samples=samples, seed=seed, cache=cache)
        return await self._batched("/v1/rewards/group", items, opts, GroupRewards.model_validate, on_error)

    async def rewards_against(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        references: Sequence[Text],
        task: str = "general",
        *,
        on_error: OnError = "raise",
        **options: Any,
    ) -> list[float | None]:
        """See `Client.rewards_against`."""
        items = reference_items(prompts, completions, references)
        results = await self.reference_rewards(items, task, on_error=on_error, **options)
        return [r.reward if r is not None else None for r in results]

    async def group_relative_rewards(
        self,
        prompts: Sequence[Text],
        groups: Sequence[Sequence[Text]],
        task: str = "general",
        *,
        on_error: OnError = "raise",
        **options: Any,
    ) -> list[list[float] | None]:
        """See `Client.group_relative_rewards`."""
        results = await self.group_rewards(group_items(prompts, groups), task, on_error=on_error, **options)
        return [r.rewards if r is not None else None for r in results]

    async def tasks(self) -> list[TaskInfo]:
        """See `Client.tasks`."""
        return self._typed(await self._send("GET", "/v1/tasks"), _task_infos)

    async def health(self, *, retry: Retry | int | None = None) -> Health:
        """See `Client.health`."""
        return self._typed(await self._send("GET", "/readyz", retry=retry), Health.model_validate)
