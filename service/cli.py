"""`labeler serve`: run the HTTP service. Flags override the matching `LABELER_*` variables."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import logging.config
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from labeler.cli import add_model_options

if TYPE_CHECKING:
    from .settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per log line. Request headers (and so API keys) are never logged."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("model", "engine", "cache"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


# The app's own loggers (`labeler serve` configures them with uvicorn's; a Ray Serve replica
# configures them alone: service/ray_serve.py).
APP_LOGGERS = ("service", "labeler")


def log_config(level: str) -> dict[str, Any]:
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", *APP_LOGGERS)
        },
    }


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `labeler` parser."""
    p = sub.add_parser("serve", help="run the HTTP service (defaults: 127.0.0.1:8000, embedded model)")
    p.add_argument("--host", help="bind address [LABELER_HOST, default 127.0.0.1]")
    p.add_argument("--port", type=int, help="[LABELER_PORT, default 8000]")
    p.add_argument("--redis-url", help="Redis URL; without one the cache is in-process [LABELER_REDIS_URL]")
    p.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="accepted bearer key, repeatable [LABELER_API_KEYS, comma-separated]",
    )
    p.add_argument("--task", help="default task of /get_reward [LABELER_TASK, default general]")
    p.add_argument("--cache-ttl", type=int, help="seconds [LABELER_CACHE_TTL]")
    p.add_argument("--max-items", type=int, help="items per request [LABELER_MAX_ITEMS]")
    p.add_argument("--max-chars", type=int, help="characters per text [LABELER_MAX_CHARS]")
    p.add_argument("--max-item-tokens", type=int, help="tokens per item [LABELER_MAX_ITEM_TOKENS]")
    p.add_argument("--max-body-bytes", type=int, help="[LABELER_MAX_BODY_BYTES]")
    p.add_argument("--max-samples", type=int, help="self-consistency samples per item [LABELER_MAX_SAMPLES]")
    p.add_argument("--max-group-size", type=int, help="completions per group [LABELER_MAX_GROUP_SIZE]")
    p.add_argument("--max-queue-items", type=int, help="queued items before 429 [LABELER_MAX_QUEUE_ITEMS]")
    p.add_argument("--batch-max-items", type=int, help="items per engine call [LABELER_BATCH_MAX_ITEMS]")
    p.add_argument("--batch-wait-ms", type=float, help="[LABELER_BATCH_WAIT_MS]")
    p.add_argument("--batch-concurrency", type=int, help="engine calls at once [LABELER_BATCH_CONCURRENCY]")
    p.add_argument("--log-level", help="[LABELER_LOG_LEVEL, default info]")
    add_model_options(p)
    p.set_defaults(func=serve)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, with every flag given on the command line on top."""
    from .settings import Settings

    flags = {
        "host": args.host,
        "port": args.port,
        "redis_url": args.redis_url,
        "api_keys": args.api_keys,
        "task": args.task,
        "cache_ttl": args.cache_ttl,
        "max_items": args.max_items,
        "max_chars": args.max_chars,
        "max_item_tokens": args.max_item_tokens,
        "max_body_bytes": args.max_body_bytes,
        "max_samples": args.max_samples,
        "max_group_size": args.max_group_size,
        "max_queue_items": args.max_queue_items,
        "batch_max_items": args.batch_max_items,
        "batch_wait_ms": args.batch_wait_ms,
        "batch_concurrency": args.batch_concurrency,
        "log_level": args.log_level,
        "model": args.model,
        "engine": args.engine,
        "device": args.device,
        "engine_args": args.engine_arg or None,
        "vllm_urls": args.vllm_urls,
        "tasks_dir": args.tasks_dir or None,
    }
    from pydantic import ValidationError

    from labeler.errors import InvalidInput

    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:  # one line per refused setting, not a traceback
        lines = [
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        ]
        raise InvalidInput("invalid settings: " + "; ".join(lines), field="settings") from None


def auth_warnings(
    settings: Settings, environ: Mapping[str, str] = os.environ, *, reached_by: str | None = None
) -> list[str]:
    """What the operator of a server without API keys should hear at start-up: that a
    client-side key variable was set in vain, and who can reach the label routes: any
    client of the bind address unless it is loopback, or `reached_by` where the bind
    address does not say (a Serve replica, reached through Serve)."""
    if settings.api_keys:
        return []
    out = []
    if environ.get("LABELER_API_KEY"):
        out.append(
            "LABELER_API_KEY is the client's variable and is ignored here: the server's keys are "
            "LABELER_API_KEYS (comma-separated) or --api-key"
        )
    if reached_by is None:
        try:
            loopback = ipaddress.ip_address(settings.host).is_loopback
        except ValueError:  # a host name
            loopback = settings.host == "localhost"
        reached_by = None if loopback else f"{settings.host}:{settings.port}"
    if reached_by is not None:
        out.append(
            f"no API key is required (LABELER_API_KEYS, --api-key): any client that reaches {reached_by} can "
            "request labels"
        )
    return out


def check_start(settings: Settings) -> None:
    """Refuse, as one line (a LabelerError) before the server starts, what the app's start-up
    would refuse with a traceback after minutes of loading: an unknown engine or engine option,
    vllm-remote without URLs or with a local copy that cannot name the served weights, a model
    that is no local model (the embedded one is converted here, once), and what vLLM would
    refuse of its arguments."""
    from labeler.engines import check_engine
    from labeler.models import resolve_model

    options = settings.engine_options()
    check_engine(settings.engine, options)
    model_dir = resolve_model(settings.model)
    if settings.engine == "vllm-remote":
        from labeler.engines.vllm_remote import check_local_copy

        check_local_copy(model_dir, options.get("model_id"))
    if settings.engine == "vllm":
        from labeler.engines.vllm_cpu import check_start as check_vllm_start

        check_vllm_start(settings.model, options)


def serve(args: argparse.Namespace) -> int:
    from labeler.models import hide_load_progress

    from .app import create_app
    from .settings import misspelled_variables

    settings = settings_from_args(args)
    # Logging first: a misspelt variable's warning explains a refusal below, and a first
    # start's model conversion logs its progress.
    logging.config.dictConfig(log_config(settings.log_level))
    hide_load_progress()  # JSON lines only, from a first start's model conversion on
    for warning in [*misspelled_variables(), *auth_warnings(settings)]:
        logging.getLogger("service").warning(warning)
    check_start(settings)
    return run_server(create_app(settings), settings)


# `labeler serve`'s exit status once its engine died for good (`Engine.failure`): the process
# ends so that a restart policy (Docker's, systemd's, a pod's) starts it anew, where Docker
# would leave a container that is merely unhealthy running. (3 is uvicorn's failed start-up.)
ENGINE_FAILED = 4


def run_server(app: Any, settings: Settings, *, grace_s: float = 60, poll_s: float = 1.0) -> int:
    """Serve `app` under uvicorn until a signal stops it (0), or until its engine has died for
    good (`ENGINE_FAILED`, after a graceful shutdown of `grace_s` at most, the reason logged)."""
    import asyncio

    import uvicorn

    from .app import engine_failure

    failed: list[str] = []

    class Server(uvicorn.Server):
        async def serve(self, sockets: Any = None) -> None:
            watch = asyncio.create_task(self._watch())
            try:
                await super().serve(sockets)
            finally:
                watch.cancel()

        async def _watch(self) -> None:
            while not self.should_exit:
                await asyncio.sleep(poll_s)
                failure = engine_failure(app.state)
                if failure is not None:
                    logging.getLogger("service").error(
                        "%s: shutting down (exit status %d) to be restarted", failure, ENGINE_FAILED
                    )
                    failed.append(failure)
                    self.should_exit = True

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # as the caller configured it (`serve`: before anything else)
        timeout_graceful_shutdown=grace_s,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises Ctrl-C again once it has shut down
        Server(config).run()
    return ENGINE_FAILED if failed else 0


if __name__ == "__main__":  # this module is `labeler serve`'s, not a command of its own
    raise SystemExit("run the service with `labeler serve` (or `python -m labeler.cli serve`); --help lists its flags")
