"""`Client` and `AsyncClient`: thin I/O twins over `_BaseClient`, which holds every step
that is not I/O (building batches, reading answers, deciding on retries)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import httpx

from . import _exceptions as exc
from ._config import RETRY_STATUSES, Retry, Timeouts, parse_retry_after, resolve_key, resolve_url
from ._models import Preference, Score, TaskInfo

T = TypeVar("T")
OnError = Literal["raise", "none"]
Text = str | list[dict[str, Any]]


def as_text(value: Text, *, role: str | None = None) -> str:
    """Plain text from a string or a list of chat messages (TRL's conversational format).
    With `role`, only messages of that role are kept (a completion's assistant turns)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = [m for m in value if isinstance(m, dict) and (role is None or m.get("role") == role)]
        if role is not None:
            return "\n".join(str(m.get("content", "")) for m in msgs)
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in msgs)
    raise TypeError(f"expected text or a list of messages, got {type(value).__name__}")


class _BaseClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: Timeouts | float | None = None,
        retry: Retry | None = None,
        batch_size: int = 64,
        max_concurrency: int = 4,
    ) -> None:
        self.base_url = resolve_url(base_url)
        self.api_key = resolve_key(api_key)
        if isinstance(timeout, (int, float)):
            timeout = Timeouts(read=float(timeout), connect=min(10.0, float(timeout)))
        self.timeout = timeout or Timeouts()
        self.retry = retry or Retry()
        if batch_size < 1 or max_concurrency < 1:
            raise ValueError("batch_size and max_concurrency must be at least 1")
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency

    def _http_options(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout.read, connect=self.timeout.connect),
        }

    def _chunks(self, n: int) -> list[range]:
        return [range(i, min(n, i + self.batch_size)) for i in range(0, n, self.batch_size)]

    @staticmethod
    def _pair_body(items: Sequence[dict[str, Any]], task: str, opts: dict[str, Any]) -> dict[str, Any]:
        return {"task": task, "items": [dict(it) for it in items], **opts}

    def _answer(self, resp: httpx.Response) -> Any:
        """The JSON body of a 2xx answer, else the matching exception."""
        if resp.status_code < 400:
            return resp.json()
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise exc.from_response(
            resp.status_code, body, resp.request, parse_retry_after(resp.headers.get("retry-after"))
        )

    def _retry_delay(self, error: exc.LabelerError, attempt: int) -> float | None:
        """Seconds before the next try, or None when `error` is final."""
        if attempt >= self.retry.max_retries:
            return None
        if isinstance(error, exc.RequestError):
            return self.retry.delay(attempt)
        if isinstance(error, exc.APIStatusError) and error.status in RETRY_STATUSES:
            return self.retry.delay(attempt, error.retry_after)
        return None

    @staticmethod
    def _wrap(error: httpx.HTTPError, request: Any) -> exc.LabelerError:
        if isinstance(error, httpx.TimeoutException):
            return exc.Timeout(f"timed out: {error!r}", request=request)
        return exc.RequestError(f"request failed: {error!r}", request=request)


class Client(_BaseClient):
    """Blocking client. Large inputs are split into `batch_size` items per request and sent
    `max_concurrency` at a time; results come back in input order."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.Client(**self._http_options())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                try:
                    resp = self._http.request(method, path, json=body)
                except httpx.HTTPError as e:
                    raise self._wrap(e, f"{method} {self.base_url}{path}") from e
                return self._answer(resp)
            except exc.LabelerError as error:
                delay = self._retry_delay(error, attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                attempt += 1

    def _batched(self, path: str, body: Callable[[range], dict], n: int, parse: Callable[[dict], T],
                 on_error: OnError) -> list[T | None]:  # fmt: skip
        out: list[T | None] = [None] * n

        def one(idx: range) -> None:
            try:
                results = self._request("POST", path, body(idx))["results"]
            except exc.LabelerError:
                if on_error == "raise":
                    raise
                return
            for i, r in zip(idx, results, strict=True):
                out[i] = parse(r)

        chunks = self._chunks(n)
        if len(chunks) == 1:
            one(chunks[0])
        else:
            with ThreadPoolExecutor(self.max_concurrency) as pool:
                for f in [pool.submit(one, c) for c in chunks]:
                    f.result()
        return out

    def preferences(self, items: Sequence[dict[str, Any]], task: str, *, order: str = "both", cot: bool = False,
                    samples: int = 1, seed: int = 0, cache: bool = True, on_error: OnError = "raise"
                    ) -> list[Preference | None]:  # fmt: skip
        """Pairwise preferences for items `{"context", "response_a", "response_b"}`, in order.
        With on_error="none", items of a failed batch are None instead of raising."""
        opts = {"order": order, "cot": cot, "samples": samples, "seed": seed, "cache": cache}
        return self._batched("/v1/preferences", lambda idx: self._pair_body([items[i] for i in idx], task, opts),
                             len(items), Preference.model_validate, on_error)  # fmt: skip

    def scores(self, items: Sequence[dict[str, Any]], task: str, *, cot: bool = False, samples: int = 1,
               seed: int = 0, cache: bool = True, on_error: OnError = "raise") -> list[Score | None]:  # fmt: skip
        """Direct scores for items `{"context", "response"}`, in order."""
        opts = {"cot": cot, "samples": samples, "seed": seed, "cache": cache}
        return self._batched("/v1/scores", lambda idx: self._pair_body([items[i] for i in idx], task, opts),
                             len(items), Score.model_validate, on_error)  # fmt: skip

    def rewards(self, prompts: Sequence[Text], completions: Sequence[Text], task: str = "general", *,
                on_error: OnError = "raise", **kwargs: Any) -> list[float | None]:  # fmt: skip
        """Rewards in [-1, 1] for (prompt, completion) pairs; text or chat messages."""
        items = _reward_items(prompts, completions)
        return [s.reward if s is not None else None for s in self.scores(items, task, on_error=on_error, **kwargs)]

    def tasks(self) -> list[TaskInfo]:
        return [TaskInfo.model_validate(t) for t in self._request("GET", "/v1/tasks")["tasks"]]

    def health(self) -> dict[str, Any]:
        """The server's /readyz answer (model, engine, cache status)."""
        return self._request("GET", "/readyz")


class AsyncClient(_BaseClient):
    """The same surface as `Client`, awaitable."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.AsyncClient(**self._http_options())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                try:
                    resp = await self._http.request(method, path, json=body)
                except httpx.HTTPError as e:
                    raise self._wrap(e, f"{method} {self.base_url}{path}") from e
                return self._answer(resp)
            except exc.LabelerError as error:
                delay = self._retry_delay(error, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1

    async def _batched(self, path: str, body: Callable[[range], dict], n: int, parse: Callable[[dict], T],
                       on_error: OnError) -> list[T | None]:  # fmt: skip
        out: list[T | None] = [None] * n
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(idx: range) -> None:
            async with gate:
                try:
                    results = (await self._request("POST", path, body(idx)))["results"]
                except exc.LabelerError:
                    if on_error == "raise":
                        raise
                    return
            for i, r in zip(idx, results, strict=True):
                out[i] = parse(r)

        await asyncio.gather(*(one(c) for c in self._chunks(n)))
        return out

    async def preferences(self, items: Sequence[dict[str, Any]], task: str, *, order: str = "both",
                          cot: bool = False, samples: int = 1, seed: int = 0, cache: bool = True,
                          on_error: OnError = "raise") -> list[Preference | None]:  # fmt: skip
        opts = {"order": order, "cot": cot, "samples": samples, "seed": seed, "cache": cache}
        return await self._batched("/v1/preferences", lambda idx: self._pair_body([items[i] for i in idx], task, opts),
                                   len(items), Preference.model_validate, on_error)  # fmt: skip

    async def scores(self, items: Sequence[dict[str, Any]], task: str, *, cot: bool = False, samples: int = 1,
                     seed: int = 0, cache: bool = True, on_error: OnError = "raise") -> list[Score | None]:  # fmt: skip
        opts = {"cot": cot, "samples": samples, "seed": seed, "cache": cache}
        return await self._batched("/v1/scores", lambda idx: self._pair_body([items[i] for i in idx], task, opts),
                                   len(items), Score.model_validate, on_error)  # fmt: skip

    async def rewards(self, prompts: Sequence[Text], completions: Sequence[Text], task: str = "general", *,
                      on_error: OnError = "raise", **kwargs: Any) -> list[float | None]:  # fmt: skip
        items = _reward_items(prompts, completions)
        scores = await self.scores(items, task, on_error=on_error, **kwargs)
        return [s.reward if s is not None else None for s in scores]

    async def tasks(self) -> list[TaskInfo]:
        return [TaskInfo.model_validate(t) for t in (await self._request("GET", "/v1/tasks"))["tasks"]]

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/readyz")


def _reward_items(prompts: Sequence[Text], completions: Sequence[Text]) -> list[dict[str, str]]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [
        {"context": as_text(p), "response": as_text(c, role="assistant" if isinstance(c, list) else None)}
        for p, c in zip(prompts, completions, strict=True)
    ]
