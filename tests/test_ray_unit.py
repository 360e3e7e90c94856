"""The Ray Serve deployment's own code without a cluster: the replica's class built as Serve
builds it, from the environment alone."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pytest

# Ray's own modules use pydantic's deprecated Field arguments.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.PydanticDeprecatedSince20")

APP_LOGGERS = ("service", "labeler")


@pytest.fixture
def fresh_app_loggers() -> Iterator[list[logging.Logger]]:
    """The app's loggers as a new replica process has them (no level, no handler), and as
    they were again afterwards."""
    loggers = [logging.getLogger(name) for name in APP_LOGGERS]
    saved = [(lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.NOTSET)
        lg.handlers.clear()
    yield loggers
    for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


async def build() -> None:
    """A replica of the deployment, built as Serve builds one, then dropped."""
    from service.ray_serve import LabelerDeployment

    replica_class = LabelerDeployment.func_or_class
    # As Serve's replica builds it: the ingress wrapper's __init__ is a coroutine.
    replica = replica_class.__new__(replica_class)
    await replica.__init__()
    with warnings.catch_warnings():  # Serve's async __del__, which only a replica awaits
        warnings.simplefilter("ignore", RuntimeWarning)
        del replica


async def test_a_replica_warns_of_a_misspelled_setting_variable(monkeypatch, fresh_app_loggers, capsys):
    """A replica's settings come from its environment alone: a variable that nearly spells a
    setting is named in the replica's log (the setting keeps its default)."""
    monkeypatch.setenv("LABELER_REDIS_ULR", "redis://cache:6379")
    monkeypatch.setenv("LABELER_API_KEYS", "sk-node")
    await build()
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(r["level"], r["message"]) for r in records] == [
        ("warning", "LABELER_REDIS_ULR is not a setting and is ignored; did you mean LABELER_REDIS_URL?")
    ]


async def test_a_replica_without_api_keys_says_so_whatever_its_bind_address(monkeypatch, fresh_app_loggers, capsys):
    """A node started without LABELER_API_KEYS in its environment (the client's
    LABELER_API_KEY set instead): its replicas serve their share of the traffic without
    keys, whatever LABELER_HOST says (Serve's proxies and handles reach them); their log
    says so, and names the client's variable set in vain."""
    monkeypatch.delenv("LABELER_API_KEYS", raising=False)
    monkeypatch.setenv("LABELER_API_KEY", "sk-client")
    await build()
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records if r["level"] == "warning"]
    assert len(messages) == 2 and "LABELER_API_KEY is the client's variable" in messages[0], messages
    assert messages[1] == (
        "no API key is required (LABELER_API_KEYS, --api-key): any client that reaches this application through "
        "Serve (its HTTP proxies, deployment handles) can request labels"
    )
    assert "sk-client" not in err


async def test_a_replica_applies_the_log_level_to_the_apps_loggers(monkeypatch, fresh_app_loggers):
    """LABELER_LOG_LEVEL in a replica, where `labeler serve`'s logging config never runs: the
    `service` and `labeler` loggers take the level, and a record at that level reaches a
    handler (a Ray worker's root logger has none, and Python's last resort drops debug)."""
    monkeypatch.setenv("LABELER_LOG_LEVEL", "debug")
    await build()
    for lg in fresh_app_loggers:
        assert lg.level == logging.DEBUG and lg.isEnabledFor(logging.DEBUG)
        assert [h.level for h in lg.handlers] == [logging.NOTSET] and not lg.propagate
    handlers = [lg.handlers[0] for lg in fresh_app_loggers]
    # Another level (any case, as the setting takes it); the handler in place is kept.
    monkeypatch.setenv("LABELER_LOG_LEVEL", "ERROR")
    await build()
    for lg, handler in zip(fresh_app_loggers, handlers, strict=True):
        assert lg.level == logging.ERROR and lg.handlers == [handler]


async def test_a_replica_whose_engine_died_fails_serves_health_check(fresh_app_loggers):
    """Serve calls `check_health` on each replica and replaces one that raises: a replica
    whose engine died for good (every request would fail) raises, naming the failure; one
    still loading its model, or with a live engine, passes."""
    from types import SimpleNamespace

    from service.ray_serve import LabelerDeployment

    replica_class = LabelerDeployment.func_or_class
    replica = replica_class.__new__(replica_class)
    await replica.__init__()
    replica.check_health()  # the app not built yet
    engine = SimpleNamespace(failure=None)
    replica._app = SimpleNamespace(state=SimpleNamespace())
    replica.check_health()  # the model still loading
    replica._app.state.labeler = SimpleNamespace(engine=engine)
    replica.check_health()
    engine.failure = "the vLLM engine process died (its log says why)"
    with pytest.raises(RuntimeError, match="the vLLM engine process died"):
        replica.check_health()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        del replica


def test_the_test_clusters_nodes_get_the_environment_the_docs_give_every_node():
    """The variables docs/deploy.md exports on every node before `ray start` are the test
    cluster's, value for value (the cluster the tests run is the one users start)."""
    import re

    from tests.fixtures.ray import NODE_ENV, ROOT

    block = (ROOT / "docs" / "deploy.md").read_text().split("**Start the cluster and the application**")[1]
    exported = dict(re.findall(r"^export (RAY_\w+)=(\S+)", block.split("```")[1], re.MULTILINE))
    assert exported and exported == {k: v for k, v in NODE_ENV.items() if k != "RAY_USAGE_STATS_ENABLED"}
