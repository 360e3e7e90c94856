"""The `vllm-remote` engine: one or more `vllm serve` servers over HTTP.

This is how a deployment grows past one GPU box: API replicas (sharing Redis) talk to M
vLLM servers (data parallel), or to one server with tensor parallelism.

- Label reads: `POST /v1/completions` with the prompt as token ids, `max_tokens=1`,
  `logprobs` and `logprob_token_ids` (the same full-vocabulary reads as the in-process
  engine, through each server's prefix cache), `return_tokens_as_token_ids` so the
  answer is keyed by token id. Longer label prefixes are chained after the reads they
  extend, like the in-process engine.
- Generation: `POST /v1/completions` with `return_token_ids`.
- Load spreading: round robin over the servers that are up, except that a request's
  chained reads follow its first read to the same server, and the label read after a
  chain-of-thought rationale goes to the server that generated the rationale: there its
  prompt's KV is in the prefix cache (elsewhere it would be computed again). A server that fails
  (connection error, timeout, 502-504, or a 500 while its `/health` fails too) is marked
  down for `cooldown` seconds and the request is retried on the next one (when every server
  is down, once the first cooldown ends); a 500 from a healthy server is that request's
  `EngineError`, not retried on the others;
  after the cooldown a `GET /health` must answer before the server gets traffic again.
  Up to `retries` tries per server, then `EngineUnavailable`. A refused key or an unknown
  model (401, 403, 404) is that server's: it waits out a cooldown and the request goes on
  to the others; refused by every server, it is `EngineUnavailable` at once.
- The served model's name and context length come from `GET /v1/models` (at start when a
  server answers, else before the first request): a server started with a shorter
  `--max-model-len` than the model's own limits prompts to it, and a prompt over it is an
  `InputTooLong` before anything is sent.

The tokenizer is read from a local copy of the served model (`model_dir`): the labeler
renders and tokenizes prompts itself, so the servers only ever see token ids.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from ..errors import EngineError, EngineUnavailable, InputTooLong, InvalidInput, ModelLoadError
from ..fingerprint import is_weight, model_files
from .base import (
    PLAIN_SAMPLING,
    EngineStats,
    GenerateRequest,
    Generation,
    Logprobs,
    ScoreRequest,
    chained_reads,
    check_generate_requests,
    check_score_requests,
    finish_generation,
    gather_or_cancel,
    int_option,
    number_option,
)
from .transformers_engine import _as_list, default_model_id

log = logging.getLogger(__name__)

_RETRY_STATUS = {500, 502, 503, 504}
_CONFIG_STATUS = {401, 403, 404}  # the key or the model name is wrong for every request


# vLLM's completions API gives no log-prob below this (a zero probability included): one
# there is read as zero, as the in-process engines read it, not as a tiny probability that a
# distribution over labels all at zero would turn into a uniform one.
_LOGPROB_FLOOR = -9999.0


def _logprob(value: Any) -> float:
    v = float(value)
    return -math.inf if v <= _LOGPROB_FLOOR else v


# How an answer to GET /v1/models that is not vLLM's model list (a proxy's page) fails to read.
_NOT_A_MODEL_LIST = (ValueError, TypeError, AttributeError, KeyError)


def checked_urls(urls: Sequence[str] | str) -> list[str]:
    """The server URLs of `urls` (a list, or comma-separated text), each an http(s) URL with a
    host, without a trailing slash; InvalidInput naming `vllm_urls` otherwise: a URL without
    its scheme would never reach a server, and read as servers that are down."""
    if isinstance(urls, str):
        urls = urls.split(",")
    if any(not isinstance(u, str) for u in urls):
        raise InvalidInput(f"vLLM server URLs must be text, got {list(urls)!r}", field="vllm_urls")
    out = [u.strip().rstrip("/") for u in urls if u.strip()]
    if not out:
        raise InvalidInput(
            "the vllm-remote engine needs server URLs (--vllm-urls / LABELER_VLLM_URLS)", field="vllm_urls"
        )
    for url in out:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InvalidInput(f"vLLM server URL {url!r} is not a URL: {exc}", field="vllm_urls") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidInput(
                f"vLLM server URL {url!r} needs http:// or https:// and a host (e.g. http://127.0.0.1:8001)",
                field="vllm_urls",
            )
    return out


class _Server:
    def __init__(self, url: str) -> None:
        self.url = url
        self.down_until = 0.0
        self.needs_probe = False
        self.probe: asyncio.Future[bool] | None = None  # the health probe in flight, which concurrent requests share
        self.known = False  # its /v1/models read: its served model and context length learnt


class RemoteOptions(NamedTuple):
    """The vllm-remote engine's options, checked."""

    retries: int
    max_concurrency: int
    timeout: float
    connect_timeout: float
    cooldown: float
    max_model_len: int | None  # None: the servers' own
    api_key: str  # "": none


def check_local_copy(model_dir: Path, model_id: str | None) -> None:
    """Refuse (InvalidInput) a local copy without weights unless `model_id` names the served
    weights: its id would name the tokenizer alone, and labels of other served weights (a new
    fine-tune behind the same servers) would share its cache entries."""
    if not model_id and model_dir.is_dir() and not any(map(is_weight, model_files(model_dir))):
        raise InvalidInput(
            f"{model_dir} holds no weights, so its id cannot name what the servers serve: give "
            "model_id=NAME for the served weights (a new name whenever they change), or a copy with the weights",
            field="model_id",
        )


class VLLMRemoteEngine:
    """Spreads label reads and generations over `vllm serve` servers."""

    def __init__(
        self,
        urls: Sequence[str] | str,
        model_dir: str | Path,
        *,
        served_model: str | None = None,
        model_id: str | None = None,
        max_model_len: int | str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        cooldown: float = 5.0,
        max_concurrency: int = 128,
    ) -> None:
        from transformers import AutoConfig

        from ..models import load_tokenizer

        urls = checked_urls(urls)
        # Checked before anything is read: a value of the wrong type would fail every request.
        opts = self.checked_options(
            retries=retries,
            max_concurrency=max_concurrency,
            timeout=timeout,
            connect_timeout=connect_timeout,
            cooldown=cooldown,
            max_model_len=max_model_len,
            api_key=api_key,
        )
        model_dir = Path(model_dir)
        check_local_copy(model_dir, model_id)
        # Before the tokenizer loads, as the other engines take it.
        self.model_id = model_id or default_model_id(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the config of {model_dir}: {exc}") from exc
        self.servers = [_Server(u) for u in urls]
        self._eos = {self.tokenizer.eos_token_id} | set(_as_list(getattr(config, "eos_token_id", None)))
        self.served_model = served_model
        # Until a server says its own: the config's (a multimodal config keeps it in its text config).
        self._given_max_len = opts.max_model_len
        self._served_max_len: int | None = None  # the least of the servers' that answered
        self.max_model_len = int(
            opts.max_model_len or getattr(config.get_text_config(), "max_position_embeddings", 2048)
        )
        self.retries = opts.retries
        self.cooldown = opts.cooldown
        self.stats = EngineStats()
        self._rr = itertools.count()
        self._sem = asyncio.Semaphore(opts.max_concurrency)
        headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(opts.timeout, connect=opts.connect_timeout),
            headers=headers,
            # A connection beyond the requests' for each server's health probe and look-up: with
            # every request slot busy, a probe must not wait for one and time out.
            limits=httpx.Limits(
                max_connections=opts.max_concurrency + len(self.servers), max_keepalive_connections=opts.max_concurrency
            ),
        )
        # The context limit before any prompt is built, from every server that is up: the least
        # of theirs, so that a prompt fits whichever of them it goes to (a server that comes up
        # later is learnt from before its first request, and lowers the limit for later ones).
        for server in self.servers:
            try:
                resp = httpx.get(server.url + "/v1/models", headers=headers, timeout=opts.connect_timeout)
                if resp.status_code == 200:
                    self._learn(resp.json())
                    server.known = True
            except (httpx.HTTPError, *_NOT_A_MODEL_LIST):
                continue  # not up, or not a vLLM answer: learnt before its first request

    @staticmethod
    def checked_options(
        *,
        retries: Any,
        max_concurrency: Any,
        timeout: Any,
        connect_timeout: Any,
        cooldown: Any,
        max_model_len: Any,
        api_key: Any = None,
        **_: Any,
    ) -> RemoteOptions:
        """The options as the engine uses them, or InvalidInput naming an option of the wrong
        kind (an API key that no HTTP header can carry too); `check_engine` calls it too,
        before a server starts. max_model_len None: the servers' own; the key "": none."""
        # A key read from a file keeps its newline; one given as --engine-arg may read as a number.
        key = "" if api_key is None else str(api_key).strip()
        if not (key.isascii() and key.isprintable()):
            raise InvalidInput(
                "the vllm-remote engine's api_key must be printable ASCII text, as an HTTP header carries it",
                field="api_key",
            )
        if isinstance(max_model_len, str) and max_model_len.strip().lower() == "auto" or max_model_len == -1:
            max_model_len = None  # vLLM's "auto": the servers' own length, learnt from them
        elif max_model_len is not None:
            max_model_len = int_option("vllm-remote", "max_model_len", max_model_len, size=True)
        return RemoteOptions(
            retries=int_option("vllm-remote", "retries", retries),
            max_concurrency=int_option("vllm-remote", "max_concurrency", max_concurrency),
            timeout=number_option("vllm-remote", "timeout", timeout, strict=True),
            connect_timeout=number_option("vllm-remote", "connect_timeout", connect_timeout, strict=True),
            cooldown=number_option("vllm-remote", "cooldown", cooldown),
            max_model_len=max_model_len,
            api_key=key,
        )

    # -- transport -------------------------------------------------------------------------

    async def _pick(self, prefer: _Server | None = None) -> _Server:
        """`prefer` while it is up, else the next server that is up, round robin; probes a
        server whose cooldown ended."""
        if prefer is not None and not prefer.needs_probe and prefer.down_until <= time.monotonic():
            return prefer
        n = len(self.servers)
        for _ in range(n):
            server = self.servers[next(self._rr) % n]
            if server.down_until > time.monotonic():
                continue
            if server.needs_probe:
                if not await self._healthy(server):
                    server.down_until = time.monotonic() + self.cooldown
                    continue
                if server.needs_probe:  # the first of the requests that shared the probe
                    server.needs_probe = False
                    log.info("vllm server %s is back", server.url)
            return server
        raise EngineUnavailable(f"no vLLM server is up (of {', '.join(s.url for s in self.servers)})")

    def _check_open(self) -> None:
        """A closed engine is `EngineUnavailable`, as on the other engines."""
        if self._http.is_closed:
            raise EngineUnavailable("the vllm-remote engine is closed")

    async def _healthy(self, server: _Server) -> bool:
        """Whether `server` answers `GET /health` (vLLM's checks that its engine is alive).
        One probe a server at a time: the requests that ask meanwhile share its answer (a
        burst of probes would queue for the pool's connections, time out, and mark a server
        that is back down again)."""
        if server.probe is None:
            server.probe = asyncio.ensure_future(self._get_health(server))
            server.probe.add_done_callback(lambda _: setattr(server, "probe", None))
        return await asyncio.shield(server.probe)

    async def _get_health(self, server: _Server) -> bool:
        try:
            return (await self._http.get(server.url + "/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def _mark_down(self, server: _Server, why: str) -> None:
        log.warning("vllm server %s failed (%s); retrying elsewhere for %.0f s", server.url, why, self.cooldown)
        server.down_until = time.monotonic() + self.cooldown
        server.needs_probe = True

    async def _post(
        self, path: str, body: dict[str, Any], prefer: _Server | None = None
    ) -> tuple[dict[str, Any], _Server]:
        """The answer of the first server that gives one (`prefer` first while it is up), and
        that server."""
        last = "no attempt"
        tries = waits = 0
        refused: set[str] = set()  # the servers that refused this request's key or model
        while tries < self.retries * len(self.servers):
            self._check_open()  # closed while a try was in flight
            try:
                server = await self._pick(prefer)
            except EngineUnavailable:
                if waits >= self.retries:
                    last = f"no server came back within {waits} cooldowns; {last}"
                    break
                # Every server is cooling down: wait for the first to come back.
                waits += 1
                await asyncio.sleep(max(0.05, min(s.down_until for s in self.servers) - time.monotonic()))
                continue
            tries += 1
            try:
                if not server.known:
                    await self._discover(server)
                async with self._sem:
                    resp = await self._http.post(server.url + path, json={"model": self.served_model, **body})
            except httpx.TransportError as exc:
                self._mark_down(server, type(exc).__name__)
                last = f"{server.url}: {exc!r}"
                continue
            except EngineUnavailable as refusal:  # its look-up refused the key
                self._set_aside(server, refusal, refused)
                continue
            if resp.status_code in _CONFIG_STATUS:
                self._set_aside(server, self._refusal(server, resp), refused)
                continue
            if resp.status_code == 500 and await self._healthy(server):
                # The server is up and failed this request alone: sent on, it would fail on
                # every server and take each one out for a cooldown.
                raise self._refusal(server, resp)
            if resp.status_code in _RETRY_STATUS:
                self._mark_down(server, f"HTTP {resp.status_code}")
                last = f"{server.url}: HTTP {resp.status_code} {resp.text[:200]}"
                continue
            if resp.status_code != 200:
                raise self._refusal(server, resp)
            try:
                return resp.json(), server
            except ValueError:  # a proxy's page, not vLLM's answer
                raise EngineError(f"{server.url}{path} answered HTTP 200 without JSON: {resp.text[:200]!r}") from None
        raise EngineUnavailable(f"every vLLM server failed; last: {last}")

    def _set_aside(self, server: _Server, refusal: Exception, refused: set[str]) -> None:
        """After `server` refused a request's key or model (`refusal`): that server's
        configuration, which the others need not share, so it waits out a cooldown and the
        request goes on to them; raised once every server has refused it."""
        refused.add(server.url)
        if len(refused) == len(self.servers):
            raise refusal
        self._mark_down(server, str(refusal))

    @staticmethod
    def _refusal(server: _Server, resp: httpx.Response) -> Exception:
        message = f"vLLM server {server.url} refused the request: HTTP {resp.status_code} {resp.text[:300]}"
        if resp.status_code in _CONFIG_STATUS:
            return EngineUnavailable(message + " (check the API key and the served model's name)")
        # Two wordings: the OpenAI server's own check, and the engine's (a prompt one token short
        # of the limit, which leaves no room for the label).
        if resp.status_code == 400 and ("context length" in resp.text or "maximum model length" in resp.text):
            return InputTooLong(message)  # the item is the service's to name, not the count's "items"
        return EngineError(message)

    async def _discover(self, server: _Server) -> None:
        resp = await self._http.get(server.url + "/v1/models")
        if resp.status_code in _CONFIG_STATUS:
            raise self._refusal(server, resp)
        if resp.status_code != 200:
            raise httpx.TransportError(f"GET /v1/models answered HTTP {resp.status_code}")
        try:
            self._learn(resp.json())
        except _NOT_A_MODEL_LIST as exc:
            raise EngineError(f"{server.url}/v1/models answered no model list: {exc!r}") from None
        server.known = True

    def _learn(self, models: dict[str, Any]) -> None:
        """The served model's name (unless given) and its context length, from `/v1/models`."""
        listed = models.get("data") or []
        data = next((m for m in listed if m.get("id") == self.served_model), None)
        if data is None and self.served_model is None and listed:
            data = listed[0]
            self.served_model = data["id"]
        if data is not None and data.get("max_model_len"):
            # The first server's limit replaces the config's guess; later ones lower it (a prompt
            # must fit whichever server it goes to), as a given limit does.
            served = int(data["max_model_len"])
            self._served_max_len = min(served, self._served_max_len or served)
            limit = self._served_max_len
            self.max_model_len = min(limit, self._given_max_len) if self._given_max_len else limit

    async def _ready(self) -> None:
        """Learn the context limit before a request is checked against it. Without a server
        up, `_post` waits for one and learns it there."""
        self._check_open()
        if any(s.known for s in self.servers):
            return
        try:
            server = await self._pick()
            await self._discover(server)
        except EngineUnavailable:
            return
        except httpx.TransportError as exc:
            self._mark_down(server, type(exc).__name__)

    # -- protocol ------------------------------------------------------------------------------
    failure: str | None = None  # servers that are down may come back: never dead for good

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Logprobs]:
        await self._ready()
        check_score_requests(requests, self.max_model_len)
        # request -> the server that holds its prompt: that of its last read, or before any,
        # that of the rationale it reads after
        home: dict[int, _Server] = {r: req.site for r, req in enumerate(requests) if isinstance(req.site, _Server)}

        async def read(r: int, ids: tuple[int, ...], tokens: tuple[int, ...]) -> dict[int, float]:
            body = {
                "prompt": list(ids),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 1,
                "logprob_token_ids": list(tokens),
                "return_tokens_as_token_ids": True,
            }
            data, server = await self._post("/v1/completions", body, home.get(r))
            home[r] = server  # also when the rationale's server was down and another read it
            try:
                self._count_computed(data)
                top = data["choices"][0]["logprobs"]["top_logprobs"][0]
                by_id = {int(k.rsplit(":", 1)[1]): _logprob(v) for k, v in top.items()}
                return {t: by_id[t] for t in tokens}
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise self._unexpected(server, data) from exc

        return await chained_reads(requests, read, self.stats)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        await self._ready()
        check_generate_requests(requests, self.max_model_len)
        self.stats.generate_calls += 1

        async def one(req: GenerateRequest) -> list[Generation]:
            # The server fills every option left out from the model's generation config.
            body: dict[str, Any] = {
                **PLAIN_SAMPLING,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "prompt": list(req.prompt_ids),
                "max_tokens": req.max_tokens,
                "temperature": req.temperature,
                "n": req.n,
                "return_token_ids": True,
                "skip_special_tokens": True,
            }
            if req.temperature > 0:
                body["seed"] = req.seed
            data, server = await self._post("/v1/completions", body)
            try:
                self._count_computed(data)
                choices = sorted(data["choices"], key=lambda c: int(c["index"]))
                indices = [int(c["index"]) for c in choices]
                missing = any(c.get("token_ids") is None for c in choices)
                tokens = [[int(t) for t in c["token_ids"]] for c in choices] if not missing else []
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise self._unexpected(server, data) from exc
            if missing:
                # A server that ignores `return_token_ids` would otherwise give empty rationales.
                raise EngineError(
                    f"vLLM server {server.url} returned a completion without token ids: it needs a "
                    "vLLM that supports `return_token_ids` on /v1/completions"
                )
            if indices != list(range(req.n)):
                # Fewer rationales than asked would be averaged as if they were all.
                raise EngineError(
                    f"vLLM server {server.url} returned the completions {indices[:20]} for n={req.n} (0 to {req.n - 1})"
                )
            done = [finish_generation(t, self._eos, self.tokenizer, self.stats) for t in tokens]
            return [replace(g, site=server) for g in done]

        return await gather_or_cancel([one(r) for r in requests])

    @staticmethod
    def _unexpected(server: _Server, data: Any) -> EngineError:
        """A 200 whose JSON is not a vLLM completion (a gateway's error, a server of another API)."""
        return EngineError(f"vLLM server {server.url} answered an unexpected completion: {str(data)[:300]}")

    def _count_computed(self, data: dict[str, Any]) -> None:
        """Prompt tokens a server ran, when it tells which its prefix cache held (a server
        started with `--enable-prompt-tokens-details`); else none are counted."""
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            self.stats.computed_tokens += int(usage.get("prompt_tokens", 0)) - int(details["cached_tokens"])

    async def aclose(self) -> None:
        await self._http.aclose()
