"""Security: API keys compared in constant time and never logged, body and per-item size
limits on every label route, the default bind on loopback, CORS off unless configured.

Companions: test_service.py (401s and limits on /v1/scores) and
test_serve_cli.py (the key absent from the JSON log at info level).
"""

from __future__ import annotations

import base64
import gzip
import hmac
import json
import socket
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from labeler.cli import build_parser
from service.cli import settings_from_args
from service.settings import Settings
from tests.fixtures.load import error_shape_ok
from tests.fixtures.process import ServeProcess

pytestmark = [pytest.mark.model, pytest.mark.reliability]

SECRET = "sk-reliability-9f8e7d6c5b4a"


def test_every_key_is_compared_in_constant_time(make_server, monkeypatch):
    """Each request's key goes through hmac.compare_digest against every accepted key: no
    `==`, and no early exit on the first match that timing could reveal."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = [SECRET, "second-key", "third-key"]
    srv = make_server(api_keys=keys)
    body = {"task": "tiny", "items": [{"response": "auth"}]}
    for given, status in ((SECRET, 200), ("third-key", 200), (SECRET[:-1] + "X", 401), ("short", 401)):
        calls.clear()
        r = httpx.post(srv.url + "/v1/scores", json=body, headers={"Authorization": f"Bearer {given}"}, timeout=60)
        assert r.status_code == status
        assert sorted(a for a, _ in calls) == sorted(k.encode() for k in keys)  # every key, every time
        assert all(b == given.encode() for _, b in calls)


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`labeler serve` as a user starts it: no --host, keys from the environment, and its
    most verbose log level."""
    srv = ServeProcess(
        tmp_path_factory.mktemp("security") / "serve.log",
        "--log-level",
        "debug",
        "--max-body-bytes",
        "4096",
        env={"LABELER_API_KEYS": f"{SECRET},other"},
        host=None,
    )
    srv.start()
    yield srv
    srv.stop()


def test_default_bind_is_loopback(debug_server):
    assert Settings().host == "127.0.0.1"
    assert settings_from_args(build_parser().parse_args(["serve"])).host == "127.0.0.1"
    flags = build_parser().parse_args(["serve", "--max-samples", "4", "--max-group-size", "6"])
    assert (settings_from_args(flags).max_samples, settings_from_args(flags).max_group_size) == (4, 6)
    if debug_server.proc is None:  # stopped by the log test: start it again, same flags
        debug_server.start()
    listening = [c.laddr for c in psutil.Process(debug_server.proc.pid).net_connections("inet") if c.status == "LISTEN"]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_keys_never_logged_even_at_debug(debug_server):
    """The right key, a near miss, the wrong scheme, failing requests: neither key reaches
    the log (read after a graceful stop, so it is complete)."""
    srv, near_miss = debug_server, SECRET[:-1] + "X"
    basic = base64.b64encode(f"labeler:{SECRET}".encode()).decode()
    body = {"task": "tiny", "items": [{"response": "log me not"}]}
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for auth, status in (
            (f"Bearer {SECRET}", 200),
            (f"Bearer {near_miss}", 401),
            (f"Basic {SECRET}", 401),  # not base64
            (f"Basic {basic}", 200),  # URL credentials, as http://labeler:KEY@host sends them
            (f"bearer  {SECRET}", 200),
            (SECRET, 401),
        ):
            assert client.post("/v1/scores", json=body, headers={"Authorization": auth}).status_code == status
        auth = {"Authorization": f"Bearer {SECRET}"}
        assert client.post("/v1/scores", json={"task": "nope", "items": []}, headers=auth).status_code == 422
        big = {"task": "tiny", "items": [{"response": "x" * 5000}]}
        assert client.post("/v1/scores", json=big, headers=auth).status_code == 413
    srv.stop()
    text = srv.log()
    assert SECRET not in text and near_miss not in text and basic not in text
    lines = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    assert sum(r["logger"] == "uvicorn.access" for r in lines) >= 8  # the requests were logged, without keys


def test_body_and_item_limits_on_every_label_route(make_server):
    srv = make_server(max_items=2, max_chars=50, max_body_bytes=2048, max_item_tokens=30)
    bodies = {
        "/v1/scores": lambda t: {"task": "tiny", "items": [{"response": t}]},
        "/v1/preferences": lambda t: {"task": "tiny", "items": [{"response_a": t, "response_b": "b"}]},
        "/get_reward?task=tiny": lambda t: {"query": [t]},
    }
    params = {"/v1/scores": "items[0].response", "/v1/preferences": "items[0].response_a"}
    for path, body in bodies.items():
        over_chars = httpx.post(srv.url + path, json=body("x" * 51), timeout=60)
        assert over_chars.status_code == 422 and "50" in over_chars.json()["error"]["message"]
        if path in params:
            assert over_chars.json()["error"]["param"] == params[path]
        over_tokens = httpx.post(srv.url + path, json=body("1 " * 20), timeout=60)
        assert over_tokens.status_code == 422 and "30" in over_tokens.json()["error"]["message"]
        assert httpx.post(srv.url + path, json=body("y" * 4000), timeout=60).status_code == 413
    too_many = httpx.post(srv.url + "/get_reward", json={"query": ["a", "b", "c"]}, timeout=60)
    assert too_many.status_code == 422 and error_shape_ok(too_many.json(), 422)


def test_a_huge_declared_body_is_refused_before_it_is_sent(make_server):
    """Content-Length of 1 GB and no body: 413 at once, without waiting for (or reading) it."""
    srv = make_server(max_body_bytes=2048)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(
            b"POST /v1/scores HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and time.monotonic() - t0 < 5
    assert error_shape_ok(json.loads(head.split("\r\n\r\n", 1)[1]), 413)


def test_a_declared_length_written_with_many_leading_zeros_is_read_as_its_value(make_server):
    """HTTP allows leading zeros in Content-Length: thousands of them (past the digits
    Python's int() converts) are the same length, refused when over the limit and accepted
    when under it, never a 500."""
    srv = make_server(max_body_bytes=2048)
    body = json.dumps({"task": "tiny", "items": [{"response": "zeros"}]}).encode()
    for declared, expected in ((b"0" * 5000 + b"4096", "413"), (b"0" * 5000 + str(len(body)).encode(), "200")):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            s.sendall(
                b"POST /v1/scores HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + declared + b"\r\n\r\n" + (body if expected == "200" else b"")
            )
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, payload = answer.decode().partition("\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {expected}"), head
        if expected == "413":
            assert error_shape_ok(json.loads(payload), 413) and "2048" in payload
        else:
            assert len(json.loads(payload)["results"]) == 1


def test_a_compressed_body_is_refused_by_its_encoding(make_server):
    """A gzip body gets a 415 naming the encoding, not a 422 calling its bytes bad text; the
    same body uncompressed (declared `identity`, or undeclared) is labeled."""
    srv = make_server()
    body = json.dumps({"task": "tiny", "items": [{"response": "gzip"}]}).encode()
    typed = {"Content-Type": "application/json"}
    r = httpx.post(
        srv.url + "/v1/scores", content=gzip.compress(body), headers={**typed, "Content-Encoding": "gzip"}, timeout=60
    )
    assert r.status_code == 415 and error_shape_ok(r.json(), 415)
    assert r.json()["error"]["type"] == "unsupported_content_encoding" and "'gzip'" in r.json()["error"]["message"]
    for headers in ({**typed, "Content-Encoding": "identity"}, typed):
        r = httpx.post(srv.url + "/v1/scores", content=body, headers=headers, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 1
    # A stray header on a request without a body changes nothing; a refused key comes first.
    assert httpx.get(srv.url + "/readyz", headers={"Content-Encoding": "gzip"}, timeout=60).status_code == 200
    keyed = make_server(api_keys=["k1"])
    r = httpx.post(keyed.url + "/v1/scores", content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 401


def test_cors_off_unless_configured(make_server, monkeypatch):
    preflight = {
        "Origin": "https://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    off = make_server()
    r = httpx.options(off.url + "/v1/scores", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers and error_shape_ok(r.json(), 405)
    r = httpx.get(off.url + "/v1/tasks", headers={"Origin": "https://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    monkeypatch.setenv("LABELER_CORS_ORIGINS", "https://ui.example, https://admin.example")
    assert Settings().cors_origins == ["https://ui.example", "https://admin.example"]
    on = make_server(cors_origins=["https://ui.example"])
    r = httpx.options(on.url + "/v1/scores", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    r = httpx.get(on.url + "/v1/tasks", headers={"Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    # Another origin: no CORS headers, and a refused preflight in the one error shape.
    r = httpx.get(on.url + "/v1/tasks", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(on.url + "/v1/scores", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers and error_shape_ok(r.json(), 400)

    # With API keys: the preflight carries no key and still passes; the browser can read a 401.
    keyed = make_server(cors_origins=["https://ui.example"], api_keys=["k1"])
    r = httpx.options(keyed.url + "/v1/scores", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    origin = {"Origin": "https://ui.example"}
    r = httpx.get(keyed.url + "/v1/tasks", headers={**origin, "Authorization": "Bearer k1"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    r = httpx.get(keyed.url + "/v1/tasks", headers=origin)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://ui.example"
    assert error_shape_ok(r.json(), 401)
