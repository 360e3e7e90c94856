"""Fuzzing the live API: schemathesis cases generated from the server's own /openapi.json,
sent over HTTP to the real app under uvicorn, with the real model and a real redis-server.

Every operation of the schema is fuzzed, with valid (positive) and invalid (negative) data.
Each answer must be below 500, every 4xx in the one error shape, and the answer must match
the schema (documented status, content type, body and headers); invalid data must be refused.
Positive cases get a known task half the time, so that they reach the engine instead of all
stopping at "unknown task". Sizes: `N_CASES` per operation and mode (docs/RELIABILITY.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fixtures.load import error_shape_ok
from tests.fixtures.reliability import FULL, scale
from tests.fixtures.server import LiveServer

pytestmark = [pytest.mark.model, pytest.mark.reliability]

OPERATIONS = [
    "POST /v1/preferences",
    "POST /v1/scores",
    "POST /get_reward",
    "POST /v1/judgments",
    "POST /v1/rewards/reference",
    "POST /v1/rewards/group",
    "GET /v1/tasks",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
]
# Operations that take input: fuzzed in both modes, N_CASES each. The others take none, so
# one case says all there is to say (hypothesis stops once it has tried every input).
WITH_INPUT = OPERATIONS[:6]
N_CASES = scale(ci=50, full=200)
RUNS = [(op, mode) for op in OPERATIONS for mode in ("positive", "negative") if op in WITH_INPUT or mode == "positive"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# Small limits keep engine work per case small; they are exercised (422) as well.
LIMITS = {"max_items": 3, "max_chars": 1000, "max_item_tokens": 128, "max_samples": 2, "max_group_size": 3}
KNOWN_TASKS = ["tiny", "tiny", "tiny_fewshot", "general"]


@pytest.fixture(scope="module")
def target(labeler, redis_server) -> Iterator[tuple[LiveServer, schemathesis.BaseSchema]]:
    srv = LiveServer(labeler, redis_url=redis_server.url, task="tiny", batch_wait_ms=1, **LIMITS)
    srv.start()
    try:
        yield srv, schemathesis.openapi.from_url(srv.url + "/openapi.json")
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def totals(figures) -> Iterator[dict[tuple[str, str], Counter]]:
    """Status counts per (operation, mode); one figures line for the module at the end."""
    runs: dict[tuple[str, str], Counter] = {}
    yield runs
    allc = sum(runs.values(), Counter())
    if allc:
        by_op = {op: sum(sum(c.values()) for (o, _), c in runs.items() if o == op) for op in OPERATIONS}
        figures.record(
            "fuzz",
            cases=sum(allc.values()),
            status_5xx=sum(n for s, n in allc.items() if s >= 500),
            status_2xx=sum(n for s, n in allc.items() if s < 300),
            status_4xx=sum(n for s, n in allc.items() if 400 <= s < 500),
            per_operation="/".join(str(by_op[op]) for op in OPERATIONS),
        )


def with_known_task(case: Case, task: str | None) -> Case:
    """Put a known task in a positive case (body field and /get_reward's query)."""
    if task is not None:
        if isinstance(case.body, dict) and "task" in case.body:
            case.body["task"] = task
        if case.query and "task" in case.query:
            case.query["task"] = task
    return case


def test_the_schema_is_what_we_fuzz(target):
    _, schema = target
    assert sorted(r.ok().label for r in schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize(("operation", "mode"), RUNS)
def test_fuzz(target, totals, operation: str, mode: str):
    srv, schema = target
    op = schema.find_operation_by_label(operation)
    gen_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    strategy = op.as_strategy(generation_mode=gen_mode)
    if mode == "positive" and operation in WITH_INPUT:
        strategy = st.builds(with_known_task, strategy, st.sampled_from([*KNOWN_TASKS, None, None, None, None]))
    statuses = totals.setdefault((operation, mode), Counter())
    session = requests.Session()

    # No shrinking: each step re-runs the model; the failure message carries the curl command.
    @settings(
        max_examples=N_CASES,
        deadline=None,
        database=None,
        derandomize=not FULL,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: Case) -> None:
        response = case.call(base_url=srv.url, session=session, timeout=120)
        statuses[response.status_code] += 1
        where = f"{response.status_code} {response.text[:300]}\nreproduce: {case.as_curl_command()}"
        assert response.status_code < 500, where
        if response.status_code >= 400:
            assert error_shape_ok(response.json(), response.status_code), where
        case.validate_response(response, checks=CHECKS)

    run()
    assert sum(statuses.values()) >= 1


def test_fuzz_reached_every_operation_and_the_engine(totals):
    if set(totals) != set(RUNS):
        pytest.skip("run the whole module: the totals cover every fuzz run")
    assert all(sum(totals[run].values()) >= 1 for run in RUNS)
    # Positive cases with a known task reach the model: some answers are 200 on every label route.
    for op in WITH_INPUT:
        assert totals[(op, "positive")][200] >= 1, (op, totals[(op, "positive")])
    if FULL:
        assert sum(sum(c.values()) for c in totals.values()) >= 1000
