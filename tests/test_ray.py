"""The labeler as a Ray Serve application on a real two-node Ray cluster on loopback
(tests/fixtures/ray.py), deployed from docker/ray-serve.yaml with Ray's `serve` CLI: the
embedded model on CPU, a real redis-server, the real client over HTTP and through a
deployment handle. The RayService manifest is checked against KubeRay's CRD schema."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
import yaml
from labeler_client import Client, LabelerClientError, Preference, Retry, Score

from labeler import PairItem, ScoreItem
from service.cache import CACHE_PREFIX
from tests.fixtures.load import error_shape_ok
from tests.fixtures.ray import API_KEY, NODE_ENV, ROOT, ROUTE_PREFIX, SERVE_CONFIG, TEST_SETTINGS, ServeApp
from tests.fixtures.wait import wait_for

# Ray's own modules use pydantic's deprecated Field arguments.
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::pydantic.PydanticDeprecatedSince20")]

RAY_SERVICE = ROOT / "docker" / "ray-service.yaml"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
SCORE_ITEMS = [{"context": "2+2?", "response": "4"}, {"context": "Name a fruit.", "response": "A chair."}]
PAIR_ITEMS = [{"context": "2+2?", "response_a": "4", "response_b": "5"}]
TOL = 1e-4


def close(a: float | None, b: float | None) -> bool:
    return a == b if a is None or b is None else abs(a - b) <= TOL


def same_scores(got: list[Any], want: list[Any]) -> bool:
    return len(got) == len(want) and all(
        close(g.reward, w.reward)
        and close(g.expected, w.expected)
        and all(close(x, y) for x, y in zip(g.distribution, w.distribution, strict=True))
        for g, w in zip(got, want, strict=True)
    )


# -- the application on the cluster ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_app(ray_cluster, ray_driver, redis_server, ray_figures) -> ServeApp:
    """The application with 2 fixed replicas of the embedded model (each on its own node)."""
    app = ServeApp(ray_cluster, redis_server.url)
    t0 = time.monotonic()
    app.deploy({"num_replicas": 2})
    app.wait_replicas(2)
    ray_figures.record(
        "ray cluster",
        nodes=ray_cluster.nodes,
        cluster_start_s=ray_cluster.start_s,
        ray_start_commands=ray_cluster.start_tries,
        deploy_to_2_running_s=time.monotonic() - t0,
        replica_start_s=" ".join(f"{s:.1f}" for s in app.replica_start_s()),
        cluster_rss_gib=ray_cluster.rss() / 1024**3,
    )
    return app


@pytest.mark.model
def test_http_results_equal_the_labeler_in_process(serve_app, labeler):
    with Client(serve_app.url, api_key=API_KEY) as client:
        scores = client.scores(SCORE_ITEMS, "tiny", cache=False)
        prefs = client.preferences(PAIR_ITEMS, "tiny", cache=False)
        assert {t.name for t in client.tasks()} >= {"tiny", "general"}
        assert client.health().model == labeler.model_id
    assert same_scores(scores, labeler.scores([ScoreItem(**it) for it in SCORE_ITEMS], "tiny"))
    ref = labeler.preferences([PairItem(**it) for it in PAIR_ITEMS], "tiny")
    for got, want in zip(prefs, ref, strict=True):
        assert close(got.p_a, want.p_a) and close(got.p_a_ab, want.p_a_ab) and close(got.p_a_ba, want.p_a_ba)
        assert got.consistent == want.consistent and got.cached is False


def requests_to_compare() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx options): answers, errors, auth and limits (built anew for each
    server: a streamed body is read once)."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ok = {"task": "tiny", "items": [{"context": "c", "response": "r"}]}

    def chunks():  # no Content-Length: the body limit holds for streamed bodies too
        yield b'{"task": "tiny", "items": [{"response": "'
        yield b"z" * 5000
        yield b'"}]}'

    return [
        ("GET", "/healthz", {}),
        ("GET", "/v1/tasks", {}),
        ("GET", "/v1/tasks", {"headers": {"Authorization": "Bearer wrong"}}),
        ("GET", "/v1/tasks", {"headers": auth}),
        ("POST", "/v1/scores", {"json": ok}),
        ("POST", "/v1/scores", {"json": {**ok, "items": ok["items"] * 9}, "headers": auth}),
        ("POST", "/v1/scores", {"json": {**ok, "task": "nope"}, "headers": auth}),
        ("POST", "/v1/scores", {"json": {**ok, "samples": 99}, "headers": auth}),
        ("POST", "/v1/scores", {"json": {"task": "tiny", "items": [{"respons": "typo"}]}, "headers": auth}),
        ("POST", "/v1/scores", {"content": b"{not json", "headers": auth}),
        ("POST", "/v1/scores", {"json": {**ok, "items": [{"response": "y" * 5000}]}, "headers": auth}),
        ("POST", "/v1/scores", {"content": chunks(), "headers": {**auth, "content-type": "application/json"}}),
        ("POST", "/get_reward", {"json": {"query": ["Q: 2+2? A: 4"], "prompts": ["Q: 2+2?"]}, "headers": auth}),
        ("GET", "/nope", {}),
    ]


@pytest.mark.model
def test_same_app_same_answers_errors_auth_limits_and_openapi(serve_app, make_server):
    """Every request gets the same status, body and headers that matter from the Serve
    application as from the app under uvicorn with the same settings."""
    local = make_server(api_keys=[API_KEY], max_items=int(TEST_SETTINGS["LABELER_MAX_ITEMS"]), max_body_bytes=4096)
    statuses: Counter[int] = Counter()
    for (method, path, ray_options), (_, _, local_options) in zip(
        requests_to_compare(), requests_to_compare(), strict=True
    ):
        ray_answer = httpx.request(method, serve_app.url + path, timeout=120, **ray_options)
        local_answer = httpx.request(method, local.url + path, timeout=120, **local_options)
        assert ray_answer.status_code == local_answer.status_code, (path, ray_answer.text, local_answer.text)
        assert ray_answer.json() == local_answer.json(), (path, ray_answer.text, local_answer.text)
        for header in ("www-authenticate", "retry-after", "content-type"):
            assert ray_answer.headers.get(header) == local_answer.headers.get(header), (path, header)
        statuses[ray_answer.status_code] += 1
    assert set(statuses) == {200, 401, 404, 413, 422}, statuses
    # The same OpenAPI document; mounted under the route prefix, it names that as its server.
    ray_spec = httpx.get(serve_app.url + "/openapi.json").json()
    assert ray_spec.pop("servers") == [{"url": ROUTE_PREFIX}]
    assert ray_spec == httpx.get(local.url + "/openapi.json").json()
    assert httpx.get(serve_app.url + "/docs").status_code == 200


@pytest.mark.model
def test_a_repeat_is_a_cache_hit_on_another_replica(serve_app, labeler, redis_server):
    """The first request computes on one replica; repeats are cache hits, also on the other
    replica (found from the replicas' request logs): the cache is the shared Redis."""
    items = [{"context": "Shared cache?", "response": f"Yes, {time.time_ns()}."}]
    body = {"task": "tiny", "items": items}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    first = httpx.post(serve_app.url + "/v1/scores", json=body, headers=auth, timeout=120)
    assert first.status_code == 200 and first.json()["usage"]["computed"] == 1
    computed_on = serve_app.replica_of(first.headers["x-request-id"])
    keys = [CACHE_PREFIX + k for k in labeler.spec("score", "tiny").keys([ScoreItem(**it) for it in items])]
    assert redis.Redis.from_url(redis_server.url).exists(*keys) == len(keys)
    hits_by_replica: Counter[str] = Counter()
    for _ in range(30):  # the router picks a replica; bounded until the other one answered
        again = httpx.post(serve_app.url + "/v1/scores", json=body, headers=auth, timeout=120)
        assert again.status_code == 200 and again.json()["usage"]["cached"] == 1
        assert again.json()["results"][0]["distribution"] == first.json()["results"][0]["distribution"]
        hits_by_replica[serve_app.replica_of(again.headers["x-request-id"])] += 1
        if set(hits_by_replica) - {computed_on}:
            break
    assert set(hits_by_replica) - {computed_on}, f"no repeat reached the other replica: {hits_by_replica}"


@pytest.fixture(scope="module")
def reward_worker(ray_driver):
    """A Ray task as a trainer's reward worker runs it: the client with a ServeTransport."""
    import ray

    @ray.remote(num_cpus=0)
    def work(items: list[dict[str, str]], pairs: list[dict[str, str]]) -> dict[str, Any]:
        from labeler_client import AsyncClient, Client, LabelerClientError
        from labeler_client.ray import AsyncServeTransport, ServeTransport

        def error(call) -> tuple[str, int, str, str | None]:
            try:
                call()
            except LabelerClientError as e:
                return type(e).__name__, e.status, e.type, e.param
            raise AssertionError("no error")

        with Client("http://labeler", api_key=API_KEY, transport=ServeTransport()) as client:
            scores = [s.model_dump() for s in client.scores(items, "tiny", cache=False)]
            prefs = [p.model_dump() for p in client.preferences(pairs, "tiny", cache=False)]
            errors = [
                error(lambda: client.scores(items, "nope")),
                error(lambda: client.scores(items, "tiny", samples=2)),  # samples > 1 needs cot
            ]
            # Over LABELER_MAX_ITEMS in one batch: refused for its size, sent again in halves.
            over = [s.reward for s in client.scores(items * 5, "tiny")]
        with Client("http://labeler", transport=ServeTransport()) as anonymous:
            errors.append(error(anonymous.tasks))

        async def async_scores() -> list[dict[str, Any]]:
            async with AsyncClient("http://labeler", api_key=API_KEY, transport=AsyncServeTransport()) as aclient:
                return [s.model_dump() for s in await aclient.scores(items, "tiny", cache=False)]

        async def sync_scores_in_a_loop() -> list[dict[str, Any]]:  # a notebook cell, an async actor
            with Client("http://labeler", api_key=API_KEY, transport=ServeTransport()) as client:
                return [s.model_dump() for s in client.scores(items, "tiny", cache=False)]

        return {
            "scores": scores,
            "prefs": prefs,
            "errors": errors,
            "over": over,
            "async_scores": asyncio.run(async_scores()),
            "sync_in_loop": asyncio.run(sync_scores_in_a_loop()),
        }

    return work


def test_an_application_not_deployed_is_a_retried_request_error(serve_app):
    """Ray's handle look-up raises KeyError for an application not deployed (yet, or by that
    name): the client reads it as a connection failure, retried, then a RequestError that
    names the application; with on_error="none" the items are None, as for any outage."""
    from labeler_client import RequestError, Retry
    from labeler_client.ray import ServeTransport

    retry = Retry(max_retries=1, backoff=0.0)
    with Client("http://labeler", transport=ServeTransport(app_name="no-such-app"), retry=retry) as client:
        with pytest.raises(RequestError, match="no-such-app"):
            client.scores(SCORE_ITEMS, "tiny")
        assert client.scores(SCORE_ITEMS, "tiny", on_error="none") == [None] * len(SCORE_ITEMS)


class SlowIngress:
    """An ingress that answers each request after a second: what the handle transport calls."""

    async def forward(self, method: str, url: str, headers: list, body: bytes) -> tuple[int, list, bytes]:
        await asyncio.sleep(1.0)
        return 200, [(b"content-type", b"application/json")], b"{}"


def test_serve_back_pressure_is_a_503_to_retry_not_a_ray_error(ray_driver):
    """More calls than a deployment takes and queues (here 1 and 1): Serve's router refuses
    the rest with BackPressureError, which it raises again when the refused call is
    cancelled; the transports answer each such call with a 503 to retry, as over HTTP,
    never with the raw Ray exception (which no client retries or catches)."""
    from labeler_client.ray import AsyncServeTransport, ServeTransport
    from ray import serve

    app = serve.deployment(max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0})(
        SlowIngress
    )
    serve.run(app.bind(), name="backpressure", route_prefix=None)
    try:
        request = httpx.Request("POST", "http://labeler/v1/scores", content=b"{}")
        sync = ServeTransport(app_name="backpressure", deployment="SlowIngress")
        statuses: list[int | str] = []

        def call() -> None:
            try:
                statuses.append(sync.handle_request(request).status_code)
            except Exception as error:  # noqa: BLE001 - what the transport let through, counted
                statuses.append(type(error).__name__)

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

        async def calls() -> list[int | str]:
            transport = AsyncServeTransport(app_name="backpressure", deployment="SlowIngress")
            answers = await asyncio.gather(
                *(transport.handle_async_request(request) for _ in range(5)), return_exceptions=True
            )
            return [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]

        statuses += asyncio.run(calls())
    finally:
        serve.delete("backpressure")
    assert set(statuses) == {200, 503}, statuses  # some answered, the rest refused by Serve
    assert statuses.count(200) >= 2 and statuses.count(503) >= 2, statuses


@pytest.mark.model
def test_handle_path_returns_what_http_returns(serve_app, reward_worker):
    """Through a deployment handle from a task in the cluster: the same values and the
    same errors as the client over HTTP; the sync client too from a thread that runs an
    event loop, where Ray refuses to block."""
    import ray

    got = ray.get(reward_worker.remote(SCORE_ITEMS, PAIR_ITEMS), timeout=300)
    with Client(serve_app.url, api_key=API_KEY) as client:
        http_scores = client.scores(SCORE_ITEMS, "tiny", cache=False)
        http_prefs = client.preferences(PAIR_ITEMS, "tiny", cache=False)
        http_errors = []
        http_over = [s.reward for s in client.scores(SCORE_ITEMS * 5, "tiny")]
        for call in (lambda: client.scores(SCORE_ITEMS, "nope"), lambda: client.scores(SCORE_ITEMS, "tiny", samples=2)):
            with pytest.raises(LabelerClientError) as e:
                call()
            http_errors.append((type(e.value).__name__, e.value.status, e.value.type, e.value.param))
    with Client(serve_app.url) as anonymous, pytest.raises(LabelerClientError) as e:
        anonymous.tasks()
    http_errors.append((type(e.value).__name__, e.value.status, e.value.type, e.value.param))

    assert same_scores([Score(**s) for s in got["scores"]], http_scores)
    assert same_scores([Score(**s) for s in got["async_scores"]], http_scores)
    assert same_scores([Score(**s) for s in got["sync_in_loop"]], http_scores)
    for g, w in zip([Preference(**p) for p in got["prefs"]], http_prefs, strict=True):
        assert close(g.p_a, w.p_a) and close(g.p_a_ba, w.p_a_ba)
    assert [tuple(e) for e in got["errors"]] == http_errors
    assert len(got["over"]) == len(SCORE_ITEMS) * 5 and all(
        close(g, w) for g, w in zip(got["over"], http_over, strict=True)
    )
    expected = [("InvalidRequest", 422), ("InvalidRequest", 422), ("AuthenticationError", 401)]
    assert [e[:2] for e in http_errors] == expected


@pytest.mark.model
def test_verl_reward_function_through_the_serve_app(serve_app):
    """labeler_client.verl loaded from its file, as verl loads a custom reward function, and
    run as Ray tasks (Ray copies such a module's functions by value): with `serve_app` in
    its keyword arguments it reaches the application through a deployment handle, and its
    rewards, one by one and batched, are those of the HTTP client."""
    import importlib.util

    import labeler_client
    import ray

    spec = importlib.util.spec_from_file_location("custom_module", Path(labeler_client.__file__).parent / "verl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    score, batch = (ray.remote(num_cpus=0)(f) for f in (module.compute_score, module.compute_score_batch))
    kwargs = {"task": "tiny", "serve_app": "labeler", "api_key": API_KEY}
    extras = [{"prompt": it["context"]} for it in SCORE_ITEMS]
    responses = [it["response"] for it in SCORE_ITEMS]
    calls = [score.remote("src", r, None, e, **kwargs) for r, e in zip(responses, extras, strict=True)]
    one_by_one = ray.get(calls, timeout=300)
    batched = ray.get(batch.remote(["src"] * len(responses), responses, None, extras, **kwargs), timeout=300)
    with Client(serve_app.url, api_key=API_KEY) as client:
        want = client.rewards([it["context"] for it in SCORE_ITEMS], responses, "tiny")
    assert len(one_by_one) == len(batched) == len(want) == len(SCORE_ITEMS)
    assert all(close(g, w) for g, w in zip(one_by_one, want, strict=True))
    assert all(close(g, w) for g, w in zip(batched, want, strict=True))


class Load:
    """Bounded load from `threads` real clients (retries on), each sending one-item score
    requests with cache=false until `stop()` or `per_thread` calls; counts calls and results,
    and notes when each call ended (`ended`, monotonic)."""

    def __init__(self, url: str, threads: int, per_thread: int, tag: str) -> None:
        self.url, self.per_thread, self.tag = url, per_thread, tag
        self.calls: Counter[str] = Counter()
        self.ended: list[float] = []
        self.results: list[Any] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with Client(self.url, api_key=API_KEY, retry=Retry(max_retries=8, max_backoff=4)) as client:
            for n in range(self.per_thread):
                if self._stop.is_set():
                    return
                item = {"context": f"{self.tag} {i}-{n}", "response": "A fairly short answer to judge."}
                try:
                    result = client.scores([item], "tiny", cache=False)
                except LabelerClientError as error:
                    with self._lock:
                        self.calls[f"{type(error).__name__} {getattr(error, 'status', '')}".strip()] += 1
                        self.failures.append(str(error))
                        self.ended.append(time.monotonic())
                    continue
                with self._lock:
                    self.calls["ok"] += 1
                    self.results.extend(result)
                    self.ended.append(time.monotonic())

    @property
    def done(self) -> int:
        return sum(self.calls.values())

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop sending and wait for the calls in flight."""
        self._stop.set()
        self.join()

    def join(self) -> None:
        """Wait until every thread has made its calls (or was stopped)."""
        for t in self._threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in self._threads)


@pytest.mark.model
def test_a_replica_killed_under_load_fails_no_call(serve_app, ray_figures):
    """One replica's actor is killed while 4 clients keep labeling: every call succeeds and
    Serve starts a new replica in its place. A request cut on the lost replica comes back as
    a 502 that the client retries; whether the kill cut one depends on its timing, so the
    figure `cut_and_retried` counts them rather than this test requiring one (the 502 itself
    is checked by test_replica_lost_middleware_answers_502_only_when_nothing_was_answered)."""
    import ray

    before = serve_app.replica_actors()
    assert len(before) == 2
    load = Load(serve_app.url, threads=4, per_thread=15, tag="kill").start()
    wait_for(lambda: load.done >= 8, 300, "8 calls of the load before the kill", interval=0.1)
    victim_id = sorted(before)[0]
    ray.kill(before[victim_id], no_restart=True)
    killed_at = time.monotonic()
    done_at_kill = load.done
    # The kill landed under load: calls were left to make (and, 4 threads, in flight).
    assert done_at_kill < 4 * 15, done_at_kill
    load.join()
    assert load.calls == Counter({"ok": 4 * 15}), (load.calls, load.failures[:3])
    # ... and the load went on past it: every call not counted at the kill ended after it.
    assert sum(t >= killed_at for t in load.ended) >= 4 * 15 - done_at_kill >= 1
    assert len(load.results) == 4 * 15
    assert all(abs(sum(r.distribution) - 1) < 1e-6 and -1 <= r.reward <= 1 for r in load.results)
    serve_app.wait_replicas(2)
    after = set(serve_app.replica_actors())
    assert victim_id not in after and len(after - set(before)) == 1
    proxy_log = "".join(serve_app.cluster.serve_logs("proxy_*.log").values())
    # A request cut on the dead replica: the client gets ReplicaLost's 502, but the proxy's
    # access line says 500. Ray's proxy (serve/_private/proxy.py, proxy_request) logs the
    # status it settled on itself: for the replica's RayActorError that is 500 (http_util.
    # get_http_response_status), with no answer sent (send_http_response_on_exception sends
    # none but for 408, 429 and 503); the middleware, outside the proxy's ASGI app, only then
    # answers 502. Every call succeeded (asserted above), so no app answered a 500: each
    # "/v1/scores 500" line is a request cut by the kill, answered 502 and retried.
    ray_figures.record(
        "ray replica killed",
        calls=load.done,
        failed=load.done - load.calls["ok"],
        cut_and_retried=len([line for line in proxy_log.splitlines() if "/v1/scores 500" in line]),
        replaced_within_s=time.monotonic() - killed_at,
    )


@pytest.mark.model
def test_autoscaling_follows_the_load(serve_app, ray_figures):
    """Autoscaling on ongoing requests (bounds 1..2): idle it goes down to 1 replica; under
    load up to 2; idle again back to 1. Observed through Serve's own status."""
    serve_app.deploy(
        {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 1,
                "downscale_delay_s": 5,
                "look_back_period_s": 12,
            }
        }
    )
    idle_down_s = serve_app.wait_replicas(1, timeout=300)
    load = Load(serve_app.url, threads=6, per_thread=400, tag="autoscale").start()
    try:
        up_s = serve_app.wait_replicas(2, timeout=600)
    finally:
        load.stop()
    assert load.calls["ok"] == load.done, load.calls
    down_s = serve_app.wait_replicas(1, timeout=300)
    ray_figures.record(
        "ray autoscaling 1..2",
        idle_2_to_1_s=idle_down_s,
        load_1_to_2_s=up_s,
        calls_under_load=load.done,
        idle_again_2_to_1_s=down_s,
    )


# -- configuration files ----------------------------------------------------------------------------------
def strict_unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of `doc` that `schema` does not declare (what `kubectl apply --validate=strict`
    refuses; JSON Schema alone lets them through)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(doc, dict) and "properties" in schema:
        out = []
        for key, value in doc.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += strict_unknown_fields(value, schema["properties"][key], f"{path}.{key}")
        return out
    if isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [
            e for k, v in doc.items() for e in strict_unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
        ]
    if isinstance(doc, list) and "items" in schema:
        return [e for i, v in enumerate(doc) for e in strict_unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def test_rayservice_manifest_validates_against_the_kuberay_crd():
    import ray
    from ray.serve.schema import ServeDeploySchema

    from service import ray_serve

    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    manifest = yaml.safe_load(RAY_SERVICE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == (f"{crd['spec']['group']}/v1", crd["spec"]["names"]["kind"])
    jsonschema.Draft7Validator(schema).validate(manifest)
    assert strict_unknown_fields(manifest, schema) == []
    # The checks bite: a wrong type and an unknown field are found.
    broken = yaml.safe_load(RAY_SERVICE.read_text())
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)
    assert strict_unknown_fields(broken, schema) == [".spec.rayClusterConfig.headGroupSpec.rayStartParam"]

    # The embedded Serve config is Serve's own format, for the application this repository ships.
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    shipped = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,), (shipped_app,) = serve_config.applications, shipped.applications
    assert (app.name, app.import_path, app.route_prefix) == (shipped_app.name, shipped_app.import_path, "/")
    assert app.name == ray_serve.APP_NAME and app.deployments[0].name == ray_serve.DEPLOYMENT_NAME
    assert app.runtime_env["env_vars"]["LABELER_ENGINE"] == "vllm"
    assert app.deployments[0].ray_actor_options.num_gpus == 1

    # GPU workers, the cluster's Ray version, the proxy callback and spread routing on every node.
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]
    ]
    for c in containers:
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "service.ray_serve:proxy_middlewares"
        assert env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] == "0"  # as the test cluster runs
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Kubernetes gives a pod it stops the time a replica takes to finish its requests.
    drain = ray_serve.LabelerDeployment._deployment_config.graceful_shutdown_timeout_s
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    # The image the manifest names is the one docker/Dockerfile.ray builds, with this Ray.
    dockerfile = (ROOT / "docker" / "Dockerfile.ray").read_text()
    assert f'"ray[serve]=={ray.__version__}"' in dockerfile
    assert {c["image"] for c in containers} == {re.search(r"-t (\S+) \.", dockerfile).group(1)}
    vllm_tag = re.search(r"-t (\S+) \.", (ROOT / "docker" / "Dockerfile.vllm").read_text()).group(1)
    assert f"ARG BASE_IMAGE={vllm_tag}" in dockerfile


def test_shipped_serve_config_builds_the_application():
    """docker/ray-serve.yaml is valid Serve config, its import path is this application, and
    the client's handle names and the proxy callback match the module's."""
    import labeler_client.ray as client_ray
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from service import ray_serve

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    assert import_attr(app.import_path) is ray_serve.app
    assert (app.name, app.deployments[0].name) == (client_ray.APP_NAME, client_ray.DEPLOYMENT_NAME)
    assert (ray_serve.APP_NAME, ray_serve.DEPLOYMENT_NAME) == (client_ray.APP_NAME, client_ray.DEPLOYMENT_NAME)
    assert app.deployments[0].autoscaling_config["min_replicas"] >= 1
    middlewares = import_attr(NODE_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"])()
    assert [m.cls for m in middlewares] == [ray_serve.ReplicaLost]


async def test_replica_lost_middleware_answers_502_only_when_nothing_was_answered():
    """The proxy middleware on its own: an app that returns or fails without answering (the
    proxy giving up on a dead replica) becomes a 502 in the error shape; answers pass."""
    from service.ray_serve import ReplicaLost

    async def silent(scope, receive, send):
        return None

    async def failing(scope, receive, send):
        raise RuntimeError("replica died")

    async def answering(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"from the app"})

    async def call(app) -> tuple[int, bytes, dict[bytes, bytes]]:
        sent: list[dict[str, Any]] = []

        async def send(message):
            sent.append(message)

        await ReplicaLost(app)({"type": "http", "path": "/v1/scores"}, None, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), dict(sent[0]["headers"])

    for app in (silent, failing):
        status, body, headers = await call(app)
        assert status == 502 and headers[b"retry-after"] == b"1"
        assert error_shape_ok(json.loads(body), 502)
    assert (await call(answering))[:2] == (500, b"from the app")
