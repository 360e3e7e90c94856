"""A fake labeling service on an `httpx.MockTransport`, for unit tests of code that uses the
client (and of the client itself): same routes and wire shapes as the server, deterministic
labels, and injectable faults. No model, no network.

    fake = FakeLabeler()
    fake.fail_next(503, times=2, retry_after=0)  # then answers normally
    fake.fail_item("bad answer", 500)            # any request with this response
    # Retry-After: 0 leaves the wait to the client's backoff: none with backoff=0.
    client = Client("http://labeler.test", transport=fake.transport(), retry=Retry(backoff=0))
    client.rewards(["2+2?"], ["4"], task="general")

Labels are a hash of the text: stable across calls, different across inputs, so a test can
check that every result landed at its own item's position.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import threading
import time
from collections import deque
from typing import Any

import httpx

from ._text import _REASONING_KEYS, _content

__all__ = ["FakeLabeler", "fake_reward"]

# The server's error `type` for each status a fault can inject.
_TYPES = {
    400: "http_error",
    401: "unauthorized",
    413: "body_too_large",
    415: "unsupported_content_encoding",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "engine_error",
}


def fake_reward(context: str, response: str) -> float:
    """The fake service's reward in [-1, 1] for one item (a hash of the text)."""
    digest = hashlib.sha256(f"{context}\x00{response}".encode("utf-8", "surrogatepass")).digest()
    return round(int.from_bytes(digest[:4], "big") / 2**32 * 2 - 1, 6)


def _text(value: Any) -> str:
    """A context or a response as text: chat messages as their JSON (the fake renders no
    transcript), but for a lone assistant message without tool calls, which is its content (as
    the server reads such a response: a completion as text or as a message is the same)."""
    if isinstance(value, str):
        return value
    lone = value[0] if len(value) == 1 else {}
    reasoning = any(isinstance(r := lone.get(k), str) and r.strip() for k in _REASONING_KEYS)
    if lone.get("role") == "assistant" and not lone.get("tool_calls") and not reasoning:
        return _content(lone)
    return json.dumps(value, sort_keys=True)


def _context(item: dict[str, Any]) -> str:
    return _text(item.get("context", ""))


def _score(item: dict[str, Any]) -> dict[str, Any]:
    reward = fake_reward(_context(item), _text(item["response"]))
    expected = reward * 4.5 + 5.5
    low = min(8, int(expected) - 1)  # expected 10.0: all the mass on the last score
    frac = expected - (low + 1)
    dist = [0.0] * 10
    dist[low], dist[low + 1] = 1 - frac, frac
    return {"reward": reward, "expected": expected, "distribution": dist, "label_mass": 1.0, "cached": False}


def _preference(item: dict[str, Any], order: str) -> dict[str, Any]:
    ctx = _context(item)
    gap = fake_reward(ctx, _text(item["response_a"])) - fake_reward(ctx, _text(item["response_b"]))
    p_a = 1 / (1 + math.exp(-4 * gap))
    ab = p_a if order in ("both", "ab") else None
    ba = p_a if order in ("both", "ba") else None
    return {
        "p_a": p_a,
        "p_b": 1 - p_a,
        "p_a_ab": ab,
        "p_a_ba": ba,
        "consistent": True if order == "both" else None,
        "label_mass": {},
        "cached": False,
    }


def _win(ctx: str, first: str, second: str) -> float:
    """P(first preferred over second) in the fake: a logistic of their fake rewards' gap."""
    return 1 / (1 + math.exp(-4 * (fake_reward(ctx, first) - fake_reward(ctx, second))))


def _judgment(item: dict[str, Any]) -> dict[str, Any]:
    p_yes = (fake_reward(_context(item), _text(item["response"])) + 1) / 2
    return {"p_yes": p_yes, "p_no": 1 - p_yes, "label_mass": 1.0, "cached": False}


def _reference_reward(item: dict[str, Any], order: str) -> dict[str, Any]:
    p_win = _win(_context(item), _text(item["response"]), _text(item["reference"]))
    return {
        "reward": 2 * p_win - 1,
        "p_win": p_win,
        "p_win_ab": p_win if order in ("both", "ab") else None,
        "p_win_ba": p_win if order in ("both", "ba") else None,
        "consistent": True if order == "both" else None,
        "label_mass": {},
        "cached": False,
    }


def _group_rewards(item: dict[str, Any]) -> dict[str, Any]:
    ctx, rs = _context(item), [_text(r) for r in item["responses"]]
    n = len(rs)
    p_win = [[None if i == j else _win(ctx, rs[i], rs[j]) for j in range(n)] for i in range(n)]
    win_rate = [sum(p for p in row if p is not None) / (n - 1) for row in p_win]
    return {
        "rewards": [2 * w - 1 for w in win_rate],
        "win_rate": win_rate,
        "p_win": p_win,
        "label_mass": 1.0,
        "consistency": 1.0,
        "cached": False,
    }


# The server's defaults for the limits the fake enforces.
_MAX_ITEMS, _MAX_SAMPLES, _MAX_GROUP_SIZE, _MAX_SEED = 256, 8, 32, 2**59 - 1
_MAX_QUEUE_ITEMS = 4096  # the server's LABELER_MAX_QUEUE_ITEMS
_MAX_ROLE_CHARS = 64  # a chat message's role, whatever max_chars is
_ORDERED = ("/v1/preferences", "/v1/rewards/reference")


# Each label route: the text fields of its items, and the fake result of one item.
# /get_reward's options, its query parameters: any other is refused, and these in the body too.
_GET_REWARD_PARAMS = ("task", "reward", "overlong")

_ROUTES = {
    "/v1/scores": (("response",), lambda it, body: _score(it)),
    "/v1/preferences": (("response_a", "response_b"), lambda it, body: _preference(it, body.get("order", "both"))),
    "/v1/judgments": (("response",), lambda it, body: _judgment(it)),
    "/v1/rewards/reference": (
        ("response", "reference"),
        lambda it, body: _reference_reward(it, body.get("order", "both")),
    ),
    "/v1/rewards/group": (("responses",), lambda it, body: _group_rewards(it)),
}


class FakeLabeler:
    """The service's wire contract in memory. Faults queued with `fail_next` are served
    first, one per request: an HTTP status (with the service's error shape and, for 429
    and 503, `Retry-After`: 1 s as the server sends, unless `retry_after` says otherwise;
    with 0 the client waits its backoff instead, none with `Retry(backoff=0)`) or an `httpx`
    exception class such as `httpx.ConnectError`.

    Requests are checked as the server checks them, with its default limits (`max_items`,
    `max_samples`, `max_queue_items`, and `max_chars` when given): a missing, unknown or
    mistyped field, an empty or too long list of items, groups that make more comparisons
    (N (N - 1) / 2 each) than the queue holds, an unknown task or option value is a 422
    naming the field. (The server also holds a chat context's whole transcript to `max_chars`; the fake,
    which renders no transcript, checks each message's text.)

    `requests` records every request; `max_in_flight` the most requests seen at once.
    """

    def __init__(
        self,
        *,
        tasks: tuple[str, ...] = ("general", "tiny"),
        api_key: str | None = None,
        max_chars: int | None = None,
        max_items: int = _MAX_ITEMS,
        max_samples: int = _MAX_SAMPLES,
        max_queue_items: int = _MAX_QUEUE_ITEMS,
        latency: float = 0.0,
        model: str = "fake-labeler",
    ) -> None:
        self.tasks, self.api_key, self.max_chars = tasks, api_key, max_chars
        self.max_items, self.max_samples, self.max_queue_items = max_items, max_samples, max_queue_items
        self.latency, self.model = latency, model
        self.requests: list[httpx.Request] = []
        self.max_in_flight = 0
        self._faults: deque[tuple[int | type[Exception], float | None]] = deque()
        self._item_faults: dict[str, tuple[int, float | None]] = {}
        self._lock = threading.Lock()
        self._in_flight = 0

    def fail_next(self, fault: int | type[Exception], *, times: int = 1, retry_after: float | None = None) -> None:
        """Answer the next `times` requests with `fault` instead of labels."""
        self._faults.extend([(fault, retry_after)] * times)

    def fail_item(self, response: str, status: int = 500, *, retry_after: float | None = None) -> None:
        """Fail every label request that carries an item with `response` among its responses
        (`response`, `response_a`, `response_b`, `reference`, or one of a group's
        `responses`), as the server answers for an item the engine fails on: `status` (500
        `model_output_error` or 503 `engine_error`, with `Retry-After`) naming the first such
        item (`items[3]`), but for a request of several items that all fail, where the server
        names none."""
        if status not in (500, 503):
            raise ValueError("an item fails with 500 or 503")
        self._item_faults[response] = (status, retry_after)

    def transport(self) -> httpx.MockTransport:
        """For `Client(transport=...)`; `latency` is slept in the calling thread."""

        def handle(request: httpx.Request) -> httpx.Response:
            self._enter()
            try:
                time.sleep(self.latency)
                return self.handle(request)
            finally:
                self._leave()

        return httpx.MockTransport(handle)

    def async_transport(self) -> httpx.MockTransport:
        """For `AsyncClient(transport=...)`; `latency` is awaited."""

        async def handle(request: httpx.Request) -> httpx.Response:
            self._enter()
            try:
                await asyncio.sleep(self.latency)
                return self.handle(request)
            finally:
                self._leave()

        return httpx.MockTransport(handle)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def handle(self, request: httpx.Request) -> httpx.Response:
        """One request to one answer (or a raised transport error)."""
        with self._lock:
            self.requests.append(request)
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            kind, retry_after = fault
            if isinstance(kind, int):
                if retry_after is None and kind in (429, 503):
                    retry_after = 1  # the server always tells when to come back
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                return self._error(kind, f"injected {kind}", _TYPES.get(kind, "http_error"), None, headers)
            raise kind("injected fault", request=request)
        path = request.url.path
        key_ok = _given_key(request.headers.get("authorization", "")) == self.api_key
        if self.api_key and path.startswith(("/v1/", "/get_reward")) and not key_ok:
            return self._error(401, "missing or invalid API key", "unauthorized")
        if request.method == "GET" and path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if request.method == "GET" and path == "/readyz":
            ready = {
                "status": "ready",
                "model": self.model,
                "engine": "fake",
                "cache": "memory",
                "cache_status": "ok",
                # The fake strips no end-of-turn markers from what it is sent.
                "labeler": {"temperature": 0.7, "max_rationale_tokens": 128, "end_markers": []},
            }
            return httpx.Response(200, json=ready)
        if request.method == "GET" and path == "/v1/tasks":
            tasks = [
                {
                    "name": t,
                    "version": hashlib.sha256(t.encode()).hexdigest()[:12],
                    "description": t,
                    "examples": 0,
                    "score_examples": 0,
                    "judgment_question": "Is this response good?",
                    "judgment_examples": 0,
                }
                for t in self.tasks
            ]
            return httpx.Response(200, json={"default_task": self.tasks[0], "tasks": tasks})
        if request.method == "POST" and path in _ROUTES:
            return self._label(path, json.loads(request.content))
        if request.method == "POST" and path == "/get_reward":
            params = request.url.params
            body = json.loads(request.content)  # read first, as the server reads it
            unknown = [k for k in params if k not in _GET_REWARD_PARAMS]
            if unknown:  # validated before the body's fields, as the server's query parameters are
                message = f"unknown query parameter {unknown[0]!r} (the route's own are in /openapi.json)"
                return self._error(422, message, "invalid_request", unknown[0])
            return self._get_reward(
                body,
                params.get("task", self.tasks[0]),
                params.get("reward"),
                params.get("overlong", "refuse"),
            )
        return self._error(404, "Not Found", "http_error")

    def _unknown_task(self, task: Any) -> httpx.Response | None:
        if task in self.tasks:
            return None
        msg = f"unknown task {task!r}; known tasks: {', '.join(sorted(self.tasks))}"
        return self._error(422, msg, "unknown_task", "task")

    def _too_long(self, where: str, text: str) -> httpx.Response | None:
        if self.max_chars is None or len(text) <= self.max_chars:
            return None
        msg = f"{where}: String should have at most {self.max_chars} characters (the limit of {self.max_chars})"
        return self._error(422, msg, "input_too_long", where)

    def _invalid(self, where: str, message: str, type_: str = "invalid_request") -> httpx.Response:
        return self._error(422, f"{where}: {message}", type_, where)

    def _extra(self, where: str, key: str) -> httpx.Response:
        """The 422 for an unknown `key` of the object at `where` ("" for the body): named as
        a field when it can be written as one, else the object is (with the key in the message)."""
        if key.isidentifier():
            return self._invalid(f"{where}.{key}" if where else key, "Extra inputs are not permitted")
        return self._invalid(where or "body", f"unknown field {key!r} (Extra inputs are not permitted)")

    def _check_list(self, where: str, value: Any, what: str = "text") -> httpx.Response | None:
        """A 422 unless `value` is a list of 1 to `max_items` entries."""
        if not isinstance(value, list) or not value:
            return self._invalid(where, f"must be a non-empty list of {what}")
        if len(value) > self.max_items:
            return self._invalid(where, f"at most {self.max_items} entries", "input_too_long")
        return None

    def _get_reward(self, body: Any, task: str, reward: str | None = None, overlong: str = "refuse") -> httpx.Response:
        """OpenRLHF's /get_reward: with `prompts`, each query's prompt is split off (else the
        query is scored whole); with `reward=reference`, each against its `labels` entry. A
        context or response over `max_chars` is refused, or with `overlong=lowest` gets the
        lowest reward (`extra_logs.overlong` marks it). A prompt is held to the limit whole (the
        server holds one a chat template laid out to it per message: the fake reads no templates)."""
        if not isinstance(body, dict):
            return self._invalid("body", "must be a JSON object")
        query = body.get("query")
        # An empty list is an empty answer, as the server gives OpenRLHF's empty shards.
        refused = None if query == [] else self._check_list("query", query)
        for i, query in enumerate(body.get("query") or []):
            if not isinstance(query, str):
                refused = refused or self._invalid(f"query[{i}]", "must be text")
        if refused is not None:
            return refused
        if reward not in (None, "score", "reference"):
            return self._invalid("reward", "must be 'score' or 'reference'")
        if overlong not in ("refuse", "lowest"):
            return self._invalid("overlong", "must be 'refuse' or 'lowest'")
        for name in _GET_REWARD_PARAMS:
            if name in body:
                message = f"{name} is a query parameter of /get_reward (/get_reward?{name}=...), not a body field"
                return self._error(422, message, "invalid_input", name)
        prompts = body.get("prompts")
        if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(body["query"])):
            return self._error(422, "prompts must have one entry per query", "invalid_input", "prompts")
        prompts = prompts or [""] * len(body["query"])
        labels = body.get("labels") or []
        if reward == "reference" and len(labels) != len(body["query"]):
            return self._error(
                422, "reward=reference needs one reference per query in labels", "invalid_input", "labels"
            )
        pairs = [(p, q[len(p) :]) if q.startswith(p) else ("", q) for q, p in zip(body["query"], prompts, strict=True)]
        too_long = set()
        for k, (context, response) in enumerate(pairs):
            # The server names a context split off by the request's prompt after that prompt.
            where = f"prompts[{k}]" if context else f"query[{k}].context"
            for name, text in ((where, context), (f"query[{k}].response", response)):
                refused = self._too_long(name, text)
                if refused is not None and overlong == "refuse":
                    return refused
                if refused is not None:
                    too_long.add(k)
        refused = self._unknown_task(task)  # after the lengths, as the server reads them
        if refused is not None:
            return refused
        lowest = {"reward": -1.0, "expected": 1.0, "p_win": 0.0}
        if reward == "reference":
            refs = [
                lowest if k in too_long else _reference_reward({"context": c, "response": r, "reference": ref}, "both")
                for k, ((c, r), ref) in enumerate(zip(pairs, labels, strict=True))
            ]
            logs = {"p_win": [r["p_win"] for r in refs]}
        else:
            refs = [
                lowest if k in too_long else _score({"context": c, "response": r}) for k, (c, r) in enumerate(pairs)
            ]
            logs = {"expected_score": [r["expected"] for r in refs]}
        rewards = [r["reward"] for r in refs]
        logs["cached"] = [0.0] * len(refs)
        if overlong == "lowest":
            logs["overlong"] = [float(k in too_long) for k in range(len(refs))]
        return httpx.Response(200, json={"rewards": rewards, "scores": rewards, "extra_logs": logs})

    def _check_options(self, path: str, body: dict[str, Any]) -> httpx.Response | None:
        allowed = {"task", "items", "cot", "samples", "seed", "cache", *(("order",) if path in _ORDERED else ())}
        extra = sorted(set(body) - allowed)
        if extra:
            return self._extra("", extra[0])
        if "task" not in body:
            return self._invalid("task", "Field required")
        refused = self._check_list("items", body.get("items"), "items")
        if refused is not None:
            return refused
        # Read strictly, as the server's request models read them: a JSON boolean, a JSON integer.
        cot, cache = body.get("cot", False), body.get("cache", True)
        for name, value in (("cot", cot), ("cache", cache)):
            if not isinstance(value, bool):
                return self._invalid(name, "must be true or false")
        samples, seed = body.get("samples", 1), body.get("seed", 0)
        samples, seed = (v if isinstance(v, int) and not isinstance(v, bool) else None for v in (samples, seed))
        # Over a limit is `input_too_long`, as the server says it; any other bad value is not.
        for name, value, low, top in (("samples", samples, 1, self.max_samples), ("seed", seed, 0, _MAX_SEED)):
            if value is None or not low <= value <= top:
                over = value is not None and value > top
                return self._invalid(
                    name, f"must be an integer from {low} to {top}", "input_too_long" if over else "invalid_request"
                )
        if body.get("order", "both") not in ("both", "ab", "ba"):
            return self._invalid("order", "Input should be 'both', 'ab' or 'ba'")
        refused = self._unknown_task(body["task"])
        if refused is None and samples > 1 and not cot:
            return self._error(422, "samples > 1 (self-consistency) needs cot=true", "invalid_input", "samples")
        return refused

    def _check_item(self, where: str, item: Any, fields: tuple[str, ...]) -> httpx.Response | None:
        if not isinstance(item, dict):
            return self._invalid(where, "must be an object")
        extra = sorted(set(item) - {"context", *fields})
        if extra:
            return self._extra(where, extra[0])
        texts: list[tuple[str, Any]] = [(f"{where}.context", item.get("context", ""))]
        for name in fields:
            if name not in item:
                return self._invalid(f"{where}.{name}", "Field required")
            value = item[name]
            if name == "responses":
                if not isinstance(value, list) or not 2 <= len(value) <= _MAX_GROUP_SIZE:
                    return self._invalid(f"{where}.responses", f"must list 2 to {_MAX_GROUP_SIZE} completions")
                texts += [(f"{where}.responses[{k}]", v) for k, v in enumerate(value)]
            else:
                texts.append((f"{where}.{name}", value))
        checked: list[tuple[str, Any]] = []
        for at, value in texts:  # chat messages: each one's content is a text
            found = self._message_texts(at, value) if isinstance(value, list) else [(at, value)]
            if isinstance(found, httpx.Response):
                return found
            checked += found
        for at, text in checked:
            if not isinstance(text, str):
                return self._invalid(at, "Input should be a valid string")
            refused = self._too_long(at, text)
            if refused is not None:
                return refused
        return None

    def _message_texts(self, at: str, messages: list[Any]) -> list[tuple[str, Any]] | httpx.Response:
        """The texts of chat `messages` (a context or a response at `at`) to check, each named,
        or the refusal of a malformed message."""
        texts = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return self._invalid(f"{at}[{k}]", "must be a {role, content} message")
            if len(m["role"]) > _MAX_ROLE_CHARS:
                return self._invalid(f"{at}[{k}].role", f"at most {_MAX_ROLE_CHARS} characters", "input_too_long")
            if "content" not in m and not m.get("tool_calls"):
                return self._invalid(
                    f"{at}[{k}]", "a message needs a 'content' (text, content parts or null) or 'tool_calls'"
                )
            content = m.get("content", "")
            if content is None or (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
                content = _content(m)
            texts.append((f"{at}[{k}].content", content))
            for key in _REASONING_KEYS:
                if m.get(key) is not None:
                    texts.append((f"{at}[{k}].{key}", m[key]))
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                return self._invalid(f"{at}[{k}].tool_calls", "Input should be a valid list")
            for c, call in enumerate(calls or ()):
                if not isinstance(call, dict):
                    return self._invalid(f"{at}[{k}].tool_calls[{c}]", "Input should be a valid dictionary")
        return texts

    def _label(self, path: str, body: Any) -> httpx.Response:
        if not isinstance(body, dict):
            return self._invalid("body", "must be a JSON object")
        refused = self._check_options(path, body)
        if refused is not None:
            return refused
        fields, result = _ROUTES[path]
        for i, item in enumerate(body["items"]):
            refused = self._check_item(f"items[{i}]", item, fields)
            if refused is not None:
                return refused
        if path == "/v1/rewards/group":
            comparisons = sum(len(it["responses"]) * (len(it["responses"]) - 1) // 2 for it in body["items"])
            if comparisons > self.max_queue_items:
                msg = (
                    f"{len(body['items'])} groups make {comparisons} comparisons, over the limit of "
                    f"{self.max_queue_items} per request (LABELER_MAX_QUEUE_ITEMS)"
                )
                return self._error(422, msg, "input_too_long", "items")
        faults = []  # (index, fault) of each item that fails
        for i, item in enumerate(body["items"]):
            texts = [_text(t) for name in fields for t in (item[name] if name == "responses" else [item[name]])]
            fault = next((f for t in texts if (f := self._item_faults.get(t))), None)
            if fault is not None:
                faults.append((i, fault))
        if faults:
            (i, (status, retry_after)), n = faults[0], len(body["items"])
            headers = {"Retry-After": f"{1 if retry_after is None else retry_after:g}"} if status == 503 else None
            type_ = "engine_error" if status == 503 else "model_output_error"
            if len(faults) < n or n == 1:
                return self._error(status, f"items[{i}]: injected item failure", type_, f"items[{i}]", headers)
            return self._error(status, "injected item failure", type_, None, headers)
        results = [result(it, body) for it in body["items"]]
        n = len(results)
        usage = {"items": n, "cached": 0, "computed": n, "shared": 0}
        return httpx.Response(
            200,
            json={
                "model": self.model,
                "task": body["task"],
                "task_version": "fake",
                "results": results,
                "usage": usage,
            },
        )

    @staticmethod
    def _error(
        status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
        return httpx.Response(status, json=body, headers=headers)


def _given_key(authorization: str) -> str:
    """The key of an Authorization header as the server reads it: a bearer token, or the
    password of HTTP Basic credentials."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(given.strip(), validate=True).decode("latin-1").partition(":")[2]
        except binascii.Error:
            return ""
    return given.strip() if scheme.lower() == "bearer" else ""
