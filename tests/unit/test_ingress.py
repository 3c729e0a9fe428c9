"""Unit tests of app ingress: balancing, circuit breakers, headers, counters, the proxy.

The proxy tests serve the real API app (`create_app`, authentication on) in this
process and forward to real aiohttp servers on 127.0.0.1 that stand in for app
instances. A stand-in controller supplies the catalogue record and the instance
states that the node's reports would hold.
"""

import asyncio
import dataclasses
import json
import socket
import time
import tracemalloc
from types import SimpleNamespace

import aiohttp
import limits
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from voxanode.api import app as app_module
from voxanode.api.app import start_api
from voxanode.api.errors import ApiError
from voxanode.api.keys import STATS_KEY
from voxanode.apps.catalogue import (
    HEALTH_HEALTHY,
    HEALTH_STARTING,
    HEALTH_UNHEALTHY,
    INSTANCE_RUNNING,
    PHASE_RUNNING,
    PHASE_STOPPED,
    STATE_ACTIVE,
    STATE_FAILED,
    STATE_STOPPED,
    AppRecord,
    Catalogue,
    InstanceState,
)
from voxanode.apps.spec import INGRESS_STRATEGIES, AppSpec, SpecLimits, parse_app_spec
from voxanode.events import EventBus
from voxanode.ingress import front as front_module
from voxanode.ingress.front import parse_plain_request
from voxanode.ingress.balancer import (
    STRATEGIES,
    Backend,
    CircuitBreaker,
    CircuitState,
    Rotation,
    Target,
)
from voxanode.ingress.headers import add_forwarded, end_to_end
from voxanode.ingress.proxy import Ingress
from voxanode.ingress.traffic import (
    BUCKET_COUNT,
    AppTraffic,
    TrafficError,
    TrafficSnapshot,
    merge_traffic,
    percentile_ms,
    status_metrics,
)
from voxanode.membership.state import MemberStatus
from voxanode.metrics import build_registry, ingress_families
from voxanode.settings import INGRESS_STRATEGIES as SETTING_STRATEGIES
from voxanode.settings import Settings

NODE_ID = "node-aaaaaaaaaaaa"
OTHER_NODE_ID = "node-bbbbbbbbbbbb"
APP_ID = "app-0123456789ab"
APP_NAME = "web"
CONTAINER_PORT = 8080
BIG_BODY_BYTES = 50 * 1024 * 1024
BIG_CHUNK_BYTES = 64 * 1024
# Python objects that one streamed response may keep alive at its peak, far below the
# 50 MiB that buffering it would take.
STREAM_PEAK_LIMIT_BYTES = 8 * 1024 * 1024
UPLOAD_BYTES = 20 * 1024 * 1024
SLOW_BODY_SECONDS = 1.0
CHUNKED_PARTS = (b"first part, ", b"second part, ", b"last part")


# --- the balancer ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def targets(count: int) -> list[Target]:
    return [Target(f"inst-{i:012x}", NODE_ID, "127.0.0.1", 10000 + i) for i in range(count)]


def test_strategy_names_agree_everywhere():
    assert STRATEGIES == INGRESS_STRATEGIES == SETTING_STRATEGIES


def test_round_robin_takes_turns():
    rotation = Rotation(APP_ID, "round_robin", 5, 10.0)
    rotation.update(targets(3))

    picked = [rotation.pick().instance_id for _ in range(9)]

    assert [picked.count(t.instance_id) for t in targets(3)] == [3, 3, 3]
    assert picked[:3] != [picked[0]] * 3


def test_least_connections_prefers_idle_backend():
    rotation = Rotation(APP_ID, "least_connections", 5, 10.0)
    rotation.update(targets(3))
    busy, idle, busier = rotation.backends
    busy.in_flight, idle.in_flight, busier.in_flight = 2, 0, 5

    assert {rotation.pick().instance_id for _ in range(5)} == {idle.instance_id}


def test_least_connections_spreads_ties():
    rotation = Rotation(APP_ID, "least_connections", 5, 10.0)
    rotation.update(targets(2))

    assert {rotation.pick().instance_id for _ in range(4)} == {t.instance_id for t in targets(2)}


def test_latency_prefers_fast_backend():
    rotation = Rotation(APP_ID, "latency", 5, 10.0)
    rotation.update(targets(2))
    slow, fast = rotation.backends
    for _ in range(5):
        slow.observe_latency(80.0)
        fast.observe_latency(5.0)

    assert {rotation.pick().instance_id for _ in range(5)} == {fast.instance_id}


def test_latency_weighs_requests_in_flight():
    rotation = Rotation(APP_ID, "latency", 5, 10.0)
    rotation.update(targets(2))
    first, second = rotation.backends
    first.observe_latency(10.0)
    second.observe_latency(15.0)
    first.in_flight = 3

    assert rotation.pick() is second


def test_latency_ewma_follows_samples():
    backend = Backend(targets(1)[0], CircuitBreaker(5, 10.0))
    backend.observe_latency(100.0)
    backend.observe_latency(0.0)

    assert backend.ewma_ms == pytest.approx(70.0)


def test_pick_skips_excluded_and_empty():
    rotation = Rotation(APP_ID, "round_robin", 5, 10.0)
    assert rotation.pick() is None
    rotation.update(targets(2))
    first, second = rotation.backends

    assert rotation.pick(exclude=(first,)) is second
    assert rotation.pick(exclude=(first, second)) is None


def test_rotation_update_reports_changes_and_keeps_state():
    rotation = Rotation(APP_ID, "round_robin", 5, 10.0)
    added, removed = rotation.update(targets(2))
    assert (len(added), removed) == (2, [])
    kept = rotation.backends[0]
    kept.ewma_ms = 12.0
    moved = dataclasses.replace(targets(2)[1], port=20000)

    added, removed = rotation.update([targets(2)[0], moved])

    assert added == [moved]
    assert removed == [targets(2)[1]]
    assert rotation.backends[0] is kept
    assert kept.ewma_ms == 12.0


def test_rotation_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        Rotation(APP_ID, "random", 5, 10.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_panic_picks_circuits_opened_on_reply(strategy):
    rotation = Rotation(APP_ID, strategy, 1, 60.0)
    rotation.update(targets(3))
    refused, replied, closed = rotation.backends
    refused.breaker.failed(reply=False)
    replied.breaker.failed(reply=True)

    assert {rotation.pick().instance_id for _ in range(6)} == {closed.instance_id}
    closed.breaker.failed(reply=False)
    assert {rotation.pick().instance_id for _ in range(6)} == {replied.instance_id}
    assert rotation.pick(exclude=(replied,)) is None


def test_panic_success_closes_circuit():
    rotation = Rotation(APP_ID, "round_robin", 1, 60.0)
    rotation.update(targets(1))
    (backend,) = rotation.backends
    backend.breaker.failed(reply=True)

    picked = rotation.pick()
    picked.breaker.acquire()

    assert picked is backend
    assert backend.breaker.succeeded() is True
    assert backend.breaker.state is CircuitState.CLOSED


# --- the circuit breaker ---------------------------------------------------------------


def test_circuit_opens_after_threshold():
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock)

    assert [breaker.failed() for _ in range(3)] == [False, False, True]
    assert breaker.state is CircuitState.OPEN
    assert breaker.allows() is False


def test_circuit_success_resets_failure_count():
    breaker = CircuitBreaker(2, 10.0, FakeClock())
    breaker.failed()
    breaker.succeeded()

    assert breaker.failed() is False
    assert breaker.state is CircuitState.CLOSED


def test_circuit_half_open_allows_one_trial():
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    breaker.failed()
    clock.now += 10.0

    assert breaker.allows() is True
    breaker.acquire()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allows() is False


def test_circuit_trial_success_closes():
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    breaker.failed()
    clock.now += 11.0
    breaker.acquire()

    assert breaker.succeeded() is True
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allows() is True


def test_circuit_trial_failure_reopens_for_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    breaker.failed()
    clock.now += 11.0
    breaker.acquire()

    assert breaker.failed() is True
    assert breaker.state is CircuitState.OPEN
    assert breaker.allows() is False
    clock.now += 10.0
    assert breaker.allows() is True


def test_circuit_abandoned_trial_allows_another():
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    breaker.failed()
    clock.now += 10.0
    breaker.acquire()
    breaker.abandon()

    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allows() is True


def test_open_circuit_leaves_pick():
    rotation = Rotation(APP_ID, "round_robin", 1, 10.0)
    rotation.update(targets(2))
    broken, healthy = rotation.backends
    broken.breaker.failed()

    assert {rotation.pick().instance_id for _ in range(4)} == {healthy.instance_id}


# --- headers ------------------------------------------------------------------------------


def test_hop_by_hop_headers_dropped():
    headers = CIMultiDict(
        [
            ("Connection", "keep-alive, X-Private"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"),
            ("Trailer", "Expires"),
            ("X-Private", "1"),
            ("Accept", "text/html"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Authorization", "Bearer app-token"),
        ]
    )

    kept = end_to_end(headers)

    assert list(kept.items()) == [
        ("Accept", "text/html"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Authorization", "Bearer app-token"),
    ]


def test_end_to_end_drops_extra_names():
    headers = CIMultiDict([("Sec-WebSocket-Key", "abc"), ("Origin", "x")])

    assert list(end_to_end(headers, {"sec-websocket-key"}).items()) == [("Origin", "x")]


def test_forwarded_headers_added():
    headers = CIMultiDict([("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https")])

    add_forwarded(headers, "127.0.0.5", "http", "web.example:80", trusted_peer=False)

    assert headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.5"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "web.example:80"


def test_forwarded_headers_of_trusted_proxy_kept():
    headers = CIMultiDict([("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "public.example")])

    add_forwarded(headers, "10.1.1.1", "http", "inner:9999", trusted_peer=True)

    assert headers["X-Forwarded-For"] == "10.1.1.1"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"] == "public.example"


# --- counters and their merge --------------------------------------------------------------


def test_traffic_records_errors_and_classes():
    traffic = AppTraffic()
    for status, ms in ((200, 3.0), (404, 1.0), (502, 40.0), (503, 0.5)):
        traffic.record(status, ms)

    assert traffic.requests == 4
    assert traffic.errors == 2
    assert traffic.status_classes == {"2xx": 1, "4xx": 1, "5xx": 2}
    assert traffic.total_ms == pytest.approx(44.5)
    assert sum(traffic.bucket_counts) == 4


def test_traffic_merge_sums_nodes():
    first, second = AppTraffic(), AppTraffic()
    first.record(200, 10.0)
    first.upstream_failures = 2
    second.record(500, 30.0)
    second.record(200, 20.0)

    merged = merge_traffic([first, second])

    assert merged.requests == 3
    assert merged.errors == 1
    assert merged.total_ms == pytest.approx(60.0)
    assert merged.upstream_failures == 2
    assert merged.status_classes == {"2xx": 2, "5xx": 1}
    assert first.requests == 1, "merging must not change its inputs"


def test_status_metrics_of_merged_counters():
    traffic = AppTraffic()
    for _ in range(99):
        traffic.record(200, 2.0)
    traffic.record(503, 2.0)

    metrics = status_metrics(traffic)

    assert metrics["total_requests"] == 100
    assert metrics["avg_response_time_ms"] == pytest.approx(2.0)
    assert metrics["error_rate_percent"] == pytest.approx(1.0)
    assert 1.0 < metrics["p95_response_time_ms"] <= 2.5


def test_status_metrics_without_requests():
    assert status_metrics(AppTraffic()) == {
        "total_requests": 0,
        "avg_response_time_ms": 0.0,
        "error_rate_percent": 0.0,
        "p95_response_time_ms": 0.0,
    }


@pytest.mark.parametrize(
    "samples, low, high",
    [
        ([0.5] * 100, 0.0, 1.0),
        ([0.5] * 90 + [300.0] * 10, 250.0, 500.0),
        ([20000.0] * 3, 10000.0, 10000.0),
    ],
    ids=["first bucket", "tail bucket", "beyond last bound"],
)
def test_percentile_reads_histogram(samples, low, high):
    traffic = AppTraffic()
    for ms in samples:
        traffic.record(200, ms)

    assert low <= percentile_ms(traffic) <= high


def test_snapshot_round_trip():
    traffic = AppTraffic()
    traffic.record(200, 4.0)
    snapshot = TrafficSnapshot(NODE_ID, 1234.5, {APP_ID: traffic})

    copy = TrafficSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict())))

    assert copy.node_id == NODE_ID
    assert copy.started_at == 1234.5
    assert copy.apps[APP_ID] == traffic


@pytest.mark.parametrize(
    "change",
    [
        {"requests": -1},
        {"requests": True},
        {"buckets": [0] * (BUCKET_COUNT - 1)},
        {"status_classes": {"9xx": 1}},
        {"total_ms": "3"},
    ],
    ids=["negative", "boolean", "short buckets", "unknown class", "text time"],
)
def test_malformed_peer_traffic_rejected(change):
    data = {**AppTraffic().to_dict(), **change}

    with pytest.raises(TrafficError):
        AppTraffic.from_dict(data)


# --- the spec field ----------------------------------------------------------------------------


SPEC_LIMITS = SpecLimits()
BASE_SPEC = {"name": APP_NAME, "image": "nginx:1.27", "ports": [{"container_port": 80}, {"container_port": 81}]}


def test_spec_ingress_round_trips():
    spec = parse_app_spec({**BASE_SPEC, "ingress": {"strategy": "latency", "port": 81}}, SPEC_LIMITS)

    assert spec.ingress.strategy == "latency"
    assert spec.ingress.port == 81
    assert AppSpec.from_dict(spec.to_dict()) == spec


def test_spec_without_ingress_unchanged():
    spec = parse_app_spec(BASE_SPEC, SPEC_LIMITS)

    assert spec.ingress is None
    assert "ingress" not in spec.to_dict()


@pytest.mark.parametrize(
    "ingress, field",
    [
        ({"strategy": "random"}, "ingress.strategy"),
        ({"port": 9000}, "ingress.port"),
        ({"port": "80"}, "ingress.port"),
        ({"weights": [1]}, "ingress.weights"),
        ("round_robin", "ingress"),
    ],
    ids=["strategy", "unlisted port", "port text", "unknown field", "not an object"],
)
def test_spec_ingress_rejects_invalid(ingress, field):
    with pytest.raises(ApiError) as caught:
        parse_app_spec({**BASE_SPEC, "ingress": ingress}, SPEC_LIMITS)

    assert caught.value.status == 400
    assert caught.value.details["field"] == field


# --- the proxy, in process -----------------------------------------------------------------


class StandInController:
    """The parts of AppController that the Ingress reads: catalogue, states, members."""

    def __init__(self, settings: Settings, node, tmp_path):
        self.settings = settings
        self.node_id = NODE_ID
        self.node = node
        self.catalogue = Catalogue(tmp_path / "apps.sqlite3")
        self.states: dict[str, InstanceState] = {}
        self.member_view: dict = {}

    def members(self) -> dict:
        return self.member_view

    def instance_state(self, instance_id: str, node_id: str) -> InstanceState | None:
        return self.states.get(instance_id)


class Upstream:
    """A real HTTP server that plays one app instance."""

    def __init__(self, name: str):
        self.name = name
        self.requests: list[dict] = []
        self.close_codes: list[int | None] = []
        self.runner: web.AppRunner | None = None
        self.port = 0
        # The status of the echo route's replies.
        self.echo_status = 200

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/big", self.big)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/ws", self.websocket)
        app.router.add_route("GET", "/fail", self.fail)
        app.router.add_get("/gateway", self.gateway)
        app.router.add_get("/cut", self.cut)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "server": self.name,
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": list(request.headers.items()),
            "body_bytes": len(body),
            "client_port": request.transport.get_extra_info("peername")[1],
        }
        self.requests.append(seen)
        return web.json_response(
            seen,
            status=self.echo_status,
            headers={"X-Up": "1", "Keep-Alive": "timeout=5", "Trailer": "X-Sum"},
        )

    async def fail(self, request: web.Request) -> web.Response:
        self.requests.append({"server": self.name, "method": "GET", "path_qs": "/fail"})
        return web.Response(status=500, text="broken")

    async def gateway(self, request: web.Request) -> web.Response:
        self.requests.append({"server": self.name, "method": "GET", "path_qs": "/gateway"})
        return web.Response(status=503, text=f"{self.name} overloaded")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        """Send part of a chunked body, then drop the connection."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"z" * BIG_CHUNK_BYTES)
        await asyncio.sleep(0.05)
        request.transport.abort()
        return response

    async def slow(self, request: web.Request) -> web.StreamResponse:
        """Send the headers, then the 4-byte body after SLOW_BODY_SECONDS."""
        response = web.StreamResponse(headers={"Content-Length": "4"})
        await response.prepare(request)
        await asyncio.sleep(SLOW_BODY_SECONDS)
        await response.write(b"late")
        await response.write_eof()
        return response

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        """Send CHUNKED_PARTS as a chunked body, with no Content-Length."""
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in CHUNKED_PARTS:
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(BIG_BODY_BYTES)})
        await response.prepare(request)
        chunk = b"x" * BIG_CHUNK_BYTES
        for _ in range(BIG_BODY_BYTES // BIG_CHUNK_BYTES):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.json_response({"received": received})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                if message.data == "close":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str(f"{self.name}:{message.data}")
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        self.close_codes.append(ws.close_code)
        return ws


class RawServer:
    """A TCP server on 127.0.0.1 that sends fixed bytes after each request head, then closes."""

    def __init__(self, reply: bytes, hold_open: bool = False):
        self.reply = reply
        # Keep each connection open after the reply, sending nothing more.
        self.hold_open = hold_open
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(self.reply)
            await writer.drain()
            if self.hold_open:
                await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# busybox httpd 1.35 replies to HEAD as to GET: headers, `Connection: close`, then the body.
BODY_AFTER_HEAD_REPLY = (
    b"HTTP/1.1 200 OK\r\nDate: Sat, 05 Dec 2026 04:17:46 GMT\r\nConnection: close\r\n"
    b"Content-type: text/html\r\nETag: \"0-7b\"\r\nContent-Length: 11\r\n\r\nhello world"
)


@pytest.fixture
async def raw_server():
    servers: list[RawServer] = []

    async def start(reply: bytes, hold_open: bool = False) -> RawServer:
        server = RawServer(reply, hold_open)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def wait_until(condition, timeout: float = 5.0) -> None:
    """Poll `condition` every 10 ms until it is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.01)


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ProxyHarness:
    """The API of one node with a real Ingress, and its app's instances."""

    def __init__(self, tmp_path, **settings):
        self.settings = dataclasses.replace(
            Settings(data_dir=tmp_path / "data", dev=False, api_host="127.0.0.1", api_port=0),
            **settings,
        )
        self.events = EventBus(NODE_ID)
        self.node = SimpleNamespace(settings=self.settings, node_id=NODE_ID, events=self.events)
        self.controller = StandInController(self.settings, self.node, tmp_path)
        self.ingress = Ingress(self.controller)
        self.node.apps = SimpleNamespace(ingress=self.ingress)
        self.runner = None
        self.base_url = ""
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.ingress.start()
        self.runner = await start_api(self.node)
        host, port = self.runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        self.session = aiohttp.ClientSession()

    async def stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()
        await self.ingress.stop()

    def deploy(self, ports: list[int], *, state: str = STATE_ACTIVE, ingress: dict | None = None) -> None:
        """Put the app in the catalogue with one running, healthy instance per port."""
        body = {"name": APP_NAME, "image": "nginx:1.27", "ports": [{"container_port": CONTAINER_PORT}]}
        if ingress is not None:
            body["ingress"] = ingress
        spec = parse_app_spec(body, SPEC_LIMITS)
        instance_ids = [f"inst-{index:012x}" for index in range(len(ports))]
        record = AppRecord(
            app_id=APP_ID, name=APP_NAME, spec=spec, desired=len(ports), state=state,
            phase=PHASE_RUNNING if state == STATE_ACTIVE else PHASE_STOPPED,
            assignments={instance_id: NODE_ID for instance_id in instance_ids},
            created_at=time.time(), updated_at=time.time(), version=1, writer=NODE_ID,
        )
        self.controller.catalogue.merge_app(record)
        for instance_id, port in zip(instance_ids, ports):
            self.set_state(instance_id, port)
        self.ingress.view_changed()

    def set_state(self, instance_id: str, port: int, health: str = HEALTH_HEALTHY, node_id: str = NODE_ID) -> None:
        self.controller.states[instance_id] = InstanceState(
            instance_id=instance_id, app_id=APP_ID, node_id=node_id, status=INSTANCE_RUNNING,
            health=health, created_at=time.time(), host_ip="127.0.0.1",
            host_ports={f"{CONTAINER_PORT}/tcp": port},
        )

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture
async def upstreams():
    servers = [Upstream(f"u{index}") for index in range(3)]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


@pytest.fixture
async def harness(tmp_path):
    built: list[ProxyHarness] = []

    async def build(**settings) -> ProxyHarness:
        proxy = ProxyHarness(tmp_path, **settings)
        await proxy.start()
        built.append(proxy)
        return proxy

    yield build
    for proxy in built:
        await proxy.stop()


async def test_proxy_forwards_request_without_token(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    headers = {
        "Authorization": "Bearer app-own-token",
        "Connection": "X-Private",
        "X-Private": "secret",
        "Keep-Alive": "timeout=1",
        "X-Forwarded-For": "10.9.9.9",
        "X-Custom": "kept",
    }

    # encoded=True: the client sends the path and query as written.
    url = URL(proxy.url("/proxy/web/a/b%20c?x=1&y=%2F"), encoded=True)
    async with proxy.session.put(url, data=b"12345", headers=headers) as response:
        seen = await response.json()
        reply_headers = response.headers

    assert response.status == 200
    assert seen["method"] == "PUT"
    assert seen["path_qs"] == "/a/b%20c?x=1&y=%2F"
    assert seen["body_bytes"] == 5
    sent = CIMultiDict(seen["headers"])
    assert sent["Authorization"] == "Bearer app-own-token"
    assert sent["X-Custom"] == "kept"
    assert "X-Private" not in sent
    assert "Keep-Alive" not in sent
    assert sent["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"] == proxy.base_url.removeprefix("http://")
    assert reply_headers["X-Up"] == "1"
    assert "Keep-Alive" not in reply_headers
    assert "Trailer" not in reply_headers


async def test_proxy_forwards_extension_methods(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    for method in ("PROPFIND", "MKCOL", "PURGE"):
        async with proxy.session.request(method, proxy.url("/proxy/web/dav/x"), data=b"<propfind/>") as response:
            assert response.status == 200, await response.text()
            seen = await response.json()
        assert (seen["method"], seen["path_qs"], seen["body_bytes"]) == (method, "/dav/x", 11)
    # The app's root path takes them too.
    async with proxy.session.request("PROPFIND", proxy.url("/proxy/web")) as response:
        assert response.status == 200
        assert (await response.json())["method"] == "PROPFIND"


async def test_proxy_head_and_expect_continue(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    async with proxy.session.head(proxy.url("/proxy/web/page")) as head:
        assert head.status == 200
        assert await head.read() == b""
    async with proxy.session.post(proxy.url("/proxy/web/form"), data=b"abc", expect100=True) as response:
        seen = await response.json()

    assert response.status == 200
    assert seen["body_bytes"] == 3
    assert "Expect" not in CIMultiDict(seen["headers"])


async def test_proxy_head_ignores_body_after_headers(harness, raw_server):
    """A HEAD reply followed by a body, as busybox httpd sends it, passes without the body."""
    server = await raw_server(BODY_AFTER_HEAD_REPLY)
    proxy = await harness(ingress_circuit_failures=5)
    proxy.deploy([server.port])

    for _ in range(6):
        async with proxy.session.head(proxy.url("/proxy/web/index.html?v=1")) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "11"
            assert response.headers["ETag"] == '"0-7b"'
            assert await response.read() == b""

    sent = server.requests[0].decode()
    assert sent.startswith("HEAD /index.html?v=1 HTTP/1.1\r\n")
    assert f"Host: {proxy.base_url.removeprefix('http://')}\r\n" in sent
    assert "Connection: close\r\n" in sent
    assert "X-Forwarded-For: 127.0.0.1\r\n" in sent
    assert proxy.ingress.traffic[APP_ID].upstream_failures == 0
    states = {state: count for _, state, count in proxy.ingress.circuit_states()}
    assert states["closed"] == 1


@pytest.mark.parametrize(
    "reply",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo Colon\r\n\r\n",
    ],
)
async def test_proxy_head_malformed_reply_spares_breaker(harness, raw_server, reply):
    server = await raw_server(reply)
    proxy = await harness(ingress_circuit_failures=1)
    proxy.deploy([server.port])

    for _ in range(3):
        async with proxy.session.head(proxy.url("/proxy/web/")) as response:
            assert response.status == 502

    assert len(server.requests) == 3
    states = {state: count for _, state, count in proxy.ingress.circuit_states()}
    assert states["closed"] == 1
    assert proxy.ingress.traffic[APP_ID].errors == 3


@pytest.mark.parametrize(
    ("reply", "status", "reason", "fields"),
    [
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
            204, "No Content", ["1"],
        ),
        (b"HTTP/1.0 200\nX-A:  spaced \nx-a:again\n\n", 200, "", ["spaced", "again"]),
        (b"HTTP/1.1 404 Not Found\r\n\r\n<html>body</html>", 404, "Not Found", []),
    ],
)
async def test_proxy_head_relays_reply_head(harness, raw_server, reply, status, reason, fields):
    server = await raw_server(reply)
    proxy = await harness()
    proxy.deploy([server.port])

    async with proxy.session.head(proxy.url("/proxy/web/a?b=1")) as response:
        body = await response.read()

    assert (response.status, response.reason) == (status, reason)
    assert response.headers.getall("X-A", []) == fields
    assert "Link" not in response.headers
    assert body == b""
    sent = server.requests[0].decode()
    assert sent.startswith("HEAD /a?b=1 HTTP/1.1\r\n")
    assert sent.endswith("\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(
    ("reply", "breaker_failure"),
    [
        # Closed before any response byte: the instance failed.
        (b"", True),
        # The rest is not valid HTTP, which spares the breaker for a HEAD.
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", False),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 129 + b"\r\n", False),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", False),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 11, False),
        (b"HTTP/2 200\r\n\r\n", False),
        (b"HTTP/1.1 099 Low\r\n\r\n", False),
    ],
)
async def test_proxy_head_bad_reply_is_502(harness, raw_server, reply, breaker_failure):
    server = await raw_server(reply)
    proxy = await harness(ingress_circuit_failures=1, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([server.port])

    async with proxy.session.head(proxy.url("/proxy/web/")) as first:
        assert first.status == 502
    async with proxy.session.head(proxy.url("/proxy/web/")) as second:
        assert second.status == (503 if breaker_failure else 502)

    assert circuit_counts(proxy)["open"] == (1 if breaker_failure else 0)
    assert len(server.requests) == (1 if breaker_failure else 2)
    assert proxy.ingress.traffic[APP_ID].upstream_failures == len(server.requests)


async def test_proxy_head_connect_and_read_failures(harness, raw_server):
    silent = await raw_server(b"", hold_open=True)
    proxy = await harness(ingress_read_timeout_seconds=0.2, ingress_circuit_failures=100)

    proxy.deploy([closed_port()])
    async with proxy.session.head(proxy.url("/proxy/web/")) as refused:
        assert refused.status == 502
    proxy.set_state("inst-000000000000", silent.port)
    proxy.ingress.view_changed()
    async with proxy.session.head(proxy.url("/proxy/web/")) as timed_out:
        assert timed_out.status == 504

    assert len(silent.requests) == 1
    assert proxy.ingress.traffic[APP_ID].upstream_failures == 2
    assert proxy.ingress.traffic[APP_ID].status_classes == {"5xx": 2}


async def test_proxy_root_path_and_app_id(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    async with proxy.session.get(proxy.url(f"/proxy/{APP_ID}")) as response:
        seen = await response.json()

    assert response.status == 200
    assert seen["path_qs"] == "/"


async def test_proxy_unknown_app_is_404(harness, upstreams):
    proxy = await harness()

    async with proxy.session.get(proxy.url("/proxy/nothing/x")) as response:
        body = await response.json()

    assert response.status == 404
    assert body["success"] is False
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"


@pytest.mark.parametrize(
    "health, message",
    [
        (HEALTH_STARTING, "app web has no running, healthy instance on an online node yet; try again shortly"),
        (
            HEALTH_UNHEALTHY,
            f"1 running instance(s) of app web fail their health check; GET /apps/get_app_status/?app_id={APP_ID}"
            " and the app's logs show why; try again shortly",
        ),
    ],
)
async def test_proxy_without_instances_is_503(harness, upstreams, health, message):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    proxy.set_state("inst-000000000000", upstreams[0].port, health=health)
    proxy.ingress.view_changed()

    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        body = await response.json()

    assert response.status == 503
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "2"
    assert body["error"]["message"] == message
    assert upstreams[0].requests == []
    assert proxy.ingress.traffic[APP_ID].errors == 1


async def test_proxy_stopped_app_is_503(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port], state=STATE_STOPPED)

    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        body = await response.json()

    assert response.status == 503
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert body["error"]["message"] == (
        "app web is stopped, so it takes no traffic; deploy it again with POST /apps/add_app/ to serve it"
    )
    assert body["error"]["details"]["app_status"] == "stopped"
    assert "Retry-After" not in response.headers


async def test_proxy_failed_app_no_retry(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port], state=STATE_FAILED)

    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        body = await response.json()

    assert response.status == 503
    assert body["error"]["message"].startswith("app web could not start on any node")
    assert f"GET /apps/get_app_status/?app_id={APP_ID}" in body["error"]["message"]
    assert "Retry-After" not in response.headers


async def test_proxy_scaled_to_zero_no_retry(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    record = proxy.controller.catalogue.apps[APP_ID]
    proxy.controller.catalogue.apps[APP_ID] = dataclasses.replace(
        record, desired=0, assignments={}, phase=PHASE_STOPPED
    )
    proxy.ingress.view_changed()

    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        body = await response.json()

    assert response.status == 503
    assert "scaled to 0 replicas" in body["error"]["message"]
    # The same word as get_app_status shows, though the app's lifecycle state stays active.
    assert body["error"]["details"]["app_status"] == "stopped"
    assert "Retry-After" not in response.headers


async def test_proxy_round_robin_spreads(harness, upstreams):
    proxy = await harness()
    proxy.deploy([server.port for server in upstreams])

    for _ in range(30):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            assert response.status == 200

    assert [len(server.requests) for server in upstreams] == [10, 10, 10]


async def test_proxy_suspect_node_leaves_rotation(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port, upstreams[1].port])
    proxy.controller.catalogue.apps[APP_ID] = dataclasses.replace(
        proxy.controller.catalogue.apps[APP_ID],
        assignments={"inst-000000000000": NODE_ID, "inst-000000000001": OTHER_NODE_ID},
    )
    proxy.set_state("inst-000000000001", upstreams[1].port, node_id=OTHER_NODE_ID)
    proxy.controller.member_view[OTHER_NODE_ID] = SimpleNamespace(
        status=MemberStatus.SUSPECT, info=SimpleNamespace(api_address=("127.0.0.1", 1))
    )
    proxy.ingress.view_changed()

    for _ in range(6):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            assert response.status == 200

    assert len(upstreams[0].requests) == 6
    assert upstreams[1].requests == []


async def test_proxy_retries_get_on_refused_connection(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=100)
    proxy.deploy([closed_port(), upstreams[0].port, closed_port()])

    statuses = []
    for _ in range(12):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            statuses.append(response.status)

    assert statuses == [200] * 12
    assert len(upstreams[0].requests) == 12
    assert proxy.ingress.traffic[APP_ID].upstream_failures > 0
    assert proxy.ingress.traffic[APP_ID].errors == 0


async def test_proxy_retries_put_with_body_on_refused_connection(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=100)
    proxy.deploy([closed_port(), upstreams[0].port])

    for _ in range(4):
        async with proxy.session.put(proxy.url("/proxy/web/item"), data=b"0123456789") as response:
            seen = await response.json()
            assert response.status == 200
            assert seen["body_bytes"] == 10

    assert len(upstreams[0].requests) == 4


async def test_proxy_never_retries_post(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=100)
    proxy.deploy([closed_port(), upstreams[0].port])

    statuses = []
    for _ in range(6):
        async with proxy.session.post(proxy.url("/proxy/web/form"), data=b"a=1") as response:
            statuses.append(response.status)
            body = await response.json()
            if response.status != 200:
                assert body["error"]["code"] == "NETWORK_ERROR"

    assert statuses.count(502) == 3
    assert statuses.count(200) == 3
    assert len(upstreams[0].requests) == 3
    assert proxy.ingress.traffic[APP_ID].errors == 3


async def test_proxy_circuit_opens_and_publishes(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=2, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([closed_port(), upstreams[0].port])

    for _ in range(10):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            assert response.status == 200

    traffic = proxy.ingress.traffic[APP_ID]
    assert traffic.upstream_failures == 2, "the open circuit keeps requests off the dead instance"
    states = {state: count for app_id, state, count in proxy.ingress.circuit_states()}
    assert states["open"] == 1
    opened = [
        event for event in proxy.events.recent()
        if event.type == "load_rebalanced" and event.data.get("change") == "circuit_opened"
    ]
    assert len(opened) == 1
    assert opened[0].subject == {"app_id": APP_ID, "instance_id": "inst-000000000000"}


async def test_proxy_counts_instance_5xx_as_errors(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=100)
    proxy.deploy([upstreams[0].port])

    async with proxy.session.get(proxy.url("/proxy/web/fail")) as response:
        assert response.status == 500
        assert await response.text() == "broken"

    assert proxy.ingress.traffic[APP_ID].errors == 1
    assert proxy.ingress.status_metrics(APP_ID)["error_rate_percent"] == 100.0


def circuit_counts(proxy: "ProxyHarness") -> dict[str, int]:
    return {state: count for _, state, count in proxy.ingress.circuit_states()}


async def test_proxy_app_500_never_opens_circuit(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=2, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([upstreams[0].port])

    for _ in range(6):
        async with proxy.session.get(proxy.url("/proxy/web/fail")) as response:
            assert response.status == 500
            assert await response.text() == "broken"
    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        assert response.status == 200

    assert circuit_counts(proxy) == {"closed": 1, "open": 0, "half_open": 0}
    assert proxy.ingress.traffic[APP_ID].errors == 6
    assert proxy.ingress.status_metrics(APP_ID)["error_rate_percent"] == pytest.approx(600 / 7, abs=0.001)


async def test_proxy_gateway_replies_open_circuit(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=2, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([upstreams[0].port, upstreams[1].port])
    upstreams[0].echo_status = 503

    statuses = []
    for _ in range(8):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            statuses.append(response.status)

    assert statuses.count(503) == 2
    assert len(upstreams[0].requests) == 2, "the open circuit keeps requests off the instance"
    assert len(upstreams[1].requests) == 6
    assert circuit_counts(proxy) == {"closed": 1, "open": 1, "half_open": 0}


async def test_proxy_panic_passes_app_gateway_reply(harness, upstreams):
    """With every circuit opened by 503 replies, the app's own 503 still reaches the client."""
    proxy = await harness(ingress_circuit_failures=2, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([upstreams[0].port, upstreams[1].port])

    for _ in range(4):
        async with proxy.session.get(proxy.url("/proxy/web/gateway")) as response:
            assert response.status == 503
    assert circuit_counts(proxy)["open"] == 2

    async with proxy.session.get(proxy.url("/proxy/web/gateway")) as response:
        assert response.status == 503
        assert (await response.text()).endswith(" overloaded")
        assert "Retry-After" not in response.headers
    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        assert response.status == 200

    assert circuit_counts(proxy) == {"closed": 1, "open": 1, "half_open": 0}


async def test_proxy_dead_instances_get_503_with_retry(harness):
    proxy = await harness(ingress_circuit_failures=1, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([closed_port(), closed_port()])

    async with proxy.session.get(proxy.url("/proxy/web/")) as failed:
        failed_body = await failed.json()
    async with proxy.session.get(proxy.url("/proxy/web/")) as unavailable:
        unavailable_body = await unavailable.json()

    assert failed.status == 502
    assert failed_body["error"]["code"] == "NETWORK_ERROR"
    assert unavailable.status == 503
    assert unavailable.headers["Retry-After"] == "2"
    assert unavailable_body["error"]["message"].endswith("circuit breaker cool-down; try again shortly")
    assert circuit_counts(proxy)["open"] == 2


async def test_rotation_change_publishes_event(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port, upstreams[1].port])
    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        assert response.status == 200
    published_before = len(proxy.events.recent())

    proxy.set_state("inst-000000000001", upstreams[1].port, health=HEALTH_UNHEALTHY)
    proxy.ingress.view_changed()
    await asyncio.sleep(0)

    (event,) = proxy.events.recent()[published_before:]
    assert event.type == "load_rebalanced"
    assert event.subject == {"app_id": APP_ID, "instance_id": "inst-000000000001"}
    assert event.data["reason"] == "ingress_rotation"
    assert event.data["change"] == "removed"


async def test_proxy_streams_large_response(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    tracemalloc.start()
    try:
        received = 0
        async with proxy.session.get(proxy.url("/proxy/web/big")) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(BIG_BODY_BYTES)
            async for chunk in response.content.iter_chunked(BIG_CHUNK_BYTES):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert received == BIG_BODY_BYTES
    assert peak < STREAM_PEAK_LIMIT_BYTES


async def test_proxy_sends_headers_before_slow_body(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    started = time.monotonic()
    async with proxy.session.get(proxy.url("/proxy/web/slow")) as response:
        headers_seconds = time.monotonic() - started
        body = await response.read()
    body_seconds = time.monotonic() - started

    assert response.status == 200
    assert headers_seconds < SLOW_BODY_SECONDS / 2
    assert body == b"late"
    assert body_seconds >= SLOW_BODY_SECONDS


async def test_proxy_cuts_client_when_instance_fails_mid_body(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    with pytest.raises(aiohttp.ClientPayloadError):
        async with proxy.session.get(proxy.url("/proxy/web/cut")) as response:
            assert response.status == 200
            await response.read()

    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        assert response.status == 200


async def test_proxy_streams_upload_beyond_api_body_limit(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    assert UPLOAD_BYTES > proxy.settings.max_body_bytes

    async def body():
        chunk = b"y" * BIG_CHUNK_BYTES
        for _ in range(UPLOAD_BYTES // BIG_CHUNK_BYTES):
            yield chunk

    async with proxy.session.post(proxy.url("/proxy/web/upload"), data=body()) as response:
        answer = await response.json()

    assert response.status == 200
    assert answer == {"received": UPLOAD_BYTES}


async def test_proxy_reuses_instance_connections(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    for _ in range(5):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            assert response.status == 200
    pooled = proxy.ingress._upstream.idle_connections("127.0.0.1", upstreams[0].port)
    await proxy.ingress.stop()

    assert len({seen["client_port"] for seen in upstreams[0].requests}) == 1
    assert pooled == 1
    assert proxy.ingress._upstream.idle_connections("127.0.0.1", upstreams[0].port) == 0


async def test_proxy_client_leaving_upload_is_499(harness, upstreams, caplog):
    """A client that closes in the middle of its request body costs the instance nothing."""
    proxy = await harness(ingress_circuit_failures=1)
    proxy.deploy([upstreams[0].port])
    host, port = proxy.base_url.removeprefix("http://").split(":")

    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /proxy/web/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"u" * 1000)
    await writer.drain()
    rotations = proxy.ingress.rotations
    await wait_until(lambda: APP_ID in rotations and rotations[APP_ID].backends[0].in_flight == 1)
    writer.transport.abort()
    await wait_until(lambda: proxy.ingress.traffic[APP_ID].requests)
    traffic = proxy.ingress.traffic[APP_ID]

    assert traffic.status_classes == {"4xx": 1}
    assert traffic.upstream_failures == 0
    assert circuit_counts(proxy)["closed"] == 1
    assert "unhandled error" not in caplog.text
    async with proxy.session.get(proxy.url("/proxy/web/")) as response:
        assert response.status == 200


async def test_proxy_websocket_echo_and_close(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    async with proxy.session.ws_connect(proxy.url("/proxy/web/ws")) as ws:
        await ws.send_str("hello")
        reply = await ws.receive(timeout=5)
        await ws.send_bytes(b"\x00\x01")
        binary = await ws.receive(timeout=5)
        await ws.send_str("close")
        closing = await ws.receive(timeout=5)

    assert reply.data == "u0:hello"
    assert binary.data == b"\x00\x01"
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == 4001
    assert proxy.ingress.traffic[APP_ID].status_classes == {"1xx": 1}


async def test_proxy_websocket_client_close_reaches_app(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    ws = await proxy.session.ws_connect(proxy.url("/proxy/web/ws"))
    await ws.send_str("one")
    echo = await ws.receive(timeout=5)
    closed = await ws.close(code=4321, message=b"done")

    assert echo.data == "u0:one"
    assert closed is True
    # aiohttp's server replies to a close frame with 1000, and the proxy passes it on.
    assert ws.close_code == 1000
    assert upstreams[0].close_codes == [4321]


async def test_ingress_port_routes_by_host(harness, upstreams):
    port = closed_port()
    proxy = await harness(ingress_port=port)
    proxy.deploy([upstreams[0].port])

    async with proxy.session.get(
        f"http://127.0.0.1:{port}/page?q=1", headers={"Host": "web.apps.example:8000"}
    ) as response:
        seen = await response.json()
    async with proxy.session.get(
        f"http://127.0.0.1:{port}/", headers={"Host": "other.example"}
    ) as missing:
        body = await missing.json()

    assert response.status == 200
    assert seen["path_qs"] == "/page?q=1"
    assert missing.status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "[::1]:{port}", "[::1]"])
async def test_ingress_port_ip_host_explains_routing(harness, upstreams, host):
    port = closed_port()
    proxy = await harness(ingress_port=port)
    proxy.deploy([upstreams[0].port])
    host = host.format(port=port)

    async with proxy.session.get(f"http://127.0.0.1:{port}/", headers={"Host": host}) as response:
        body = await response.json()

    assert response.status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert body["error"]["message"] == (
        f"Host {host} is an IP address, but this ingress port selects the app by the name that"
        f" starts the Host header: send Host: APP or Host: APP.DOMAIN, as in curl -H 'Host: web' http://{host}/"
    )
    assert body["error"]["details"] == {"field": "Host", "host": host}
    assert upstreams[0].requests == []


async def test_peer_counters_merge_into_status(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    for _ in range(3):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            assert response.status == 200
    peer = AppTraffic()
    for _ in range(5):
        peer.record(200, 1.0)
    old = TrafficSnapshot(OTHER_NODE_ID, 50.0, {APP_ID: AppTraffic(requests=100, total_ms=1.0)})
    proxy.ingress.remember_peer(TrafficSnapshot(OTHER_NODE_ID, 100.0, {APP_ID: peer}).to_dict())
    proxy.ingress.remember_peer(old.to_dict())
    proxy.ingress.remember_peer({"node_id": OTHER_NODE_ID, "apps": "bad"})

    assert proxy.ingress.status_metrics(APP_ID)["total_requests"] == 8


async def test_proxy_traffic_left_out_of_api_request_metrics(harness, upstreams):
    """App traffic adds no label values to the API's request metrics, whatever its paths."""
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    for index in range(20):
        async with proxy.session.get(proxy.url(f"/proxy/web/page-{index}?q={index}")) as response:
            assert response.status == 200
    for path in ("/proxy/web/fail", "/proxy/web", "/proxy/unknown-app/x"):
        async with proxy.session.get(proxy.url(path)) as response:
            assert response.status in (200, 404, 500)
    async with proxy.session.head(proxy.url("/proxy/web/")) as response:
        assert response.status == 200
    async with proxy.session.get(proxy.url("/no-such-route")) as response:
        assert response.status == 401, "an API request without a token"

    stats = proxy.runner.app[STATS_KEY]
    registry = build_registry(SimpleNamespace(node_id=NODE_ID), stats, proxy.runner.app.router)
    families = {family.name: family for family in registry.collect()}

    routes = {sample.labels["route"] for sample in families["voxanode_http_requests"].samples}
    assert routes == {"unmatched"}
    histogram_routes = {
        sample.labels["route"] for sample in families["voxanode_http_request_duration_seconds"].samples
    }
    assert histogram_routes == {"unmatched"}
    assert stats.requests == 1
    assert proxy.ingress.traffic[APP_ID].requests == 23


async def test_metrics_families_of_ingress(harness, upstreams):
    proxy = await harness(ingress_circuit_failures=1, ingress_circuit_cooldown_seconds=60.0)
    proxy.deploy([closed_port(), upstreams[0].port])
    for _ in range(3):
        async with proxy.session.get(proxy.url("/proxy/web/")) as response:
            assert response.status == 200

    families = {family.name: family for family in ingress_families(proxy.ingress)}

    requests = {tuple(sample.labels.values()): sample.value for sample in families["voxanode_ingress_requests"].samples}
    assert requests == {(APP_ID, "2xx"): 3.0}
    failures = [s.value for s in families["voxanode_ingress_upstream_failures"].samples]
    assert failures == [1.0]
    durations = families["voxanode_ingress_request_duration_seconds"].samples
    count = [s.value for s in durations if s.name.endswith("_count")]
    assert count == [3.0]
    circuits = {s.labels["state"]: s.value for s in families["voxanode_ingress_circuits"].samples}
    assert circuits == {"closed": 1.0, "open": 1.0, "half_open": 0.0}


# --- the lean front of the API port ---------------------------------------------------


@pytest.mark.parametrize(
    ("head", "app_key", "path_qs"),
    [
        (b"GET /proxy/web/a/b%20c?x=1 HTTP/1.1\r\nHost: n", "web", "/a/b%20c?x=1"),
        (b"HEAD /proxy/web HTTP/1.1\r\nHost: n", "web", "/"),
        (b"GET /proxy/web?q=2 HTTP/1.1", "web", "/?q=2"),
        (b"GET /proxy/app-0123456789ab/ HTTP/1.1\r\nContent-Length: 0", "app-0123456789ab", "/"),
        (b"GET /proxy/w%65b/x HTTP/1.1\r\nX-A:  spaced \t", "web", "/x"),
    ],
)
def test_front_parses_plain_request(head, app_key, path_qs):
    request = parse_plain_request(head, "127.0.0.1")

    assert (request.app_key, request.path_qs, request.keep_alive) == (app_key, path_qs, True)
    assert request.request_id.startswith("req-")


@pytest.mark.parametrize(
    "head",
    [
        b"POST /proxy/web/ HTTP/1.1",
        b"get /proxy/web/ HTTP/1.1",
        b"GET /proxy/web/ HTTP/1.0",
        b"GET http://n/proxy/web/ HTTP/1.1",
        b"GET /status/health/ HTTP/1.1",
        b"GET /proxy/ HTTP/1.1",
        b"GET /proxy/web/../status/ HTTP/1.1",
        b"GET /proxy/web/./x HTTP/1.1",
        b"GET /proxy/web/x#frag HTTP/1.1",
        b"GET /proxy/web/  HTTP/1.1",
        b"GET /proxy/web/ HTTP/1.1\r\nContent-Length: 3",
        b"GET /proxy/web/ HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /proxy/web/ HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade",
        b"GET /proxy/web/ HTTP/1.1\r\nExpect: 100-continue",
        b"GET /proxy/web/ HTTP/1.1\r\nX-A: 1\r\n folded",
        b"GET /proxy/web/ HTTP/1.1\r\nBad Name: 1",
        b"GET /proxy/web/ HTTP/1.1\r\nX-A: a\x00b",
        b"GET /proxy/web/ HTTP/1.1\r\nHost: a\r\nHost: b",
        b"GET /proxy/web/ HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0",
        b"GET /proxy/web/ HTTP/1.1\r\nX-Long: " + b"a" * 8190,
        b"GET /proxy/web/" + b"a" * 8190 + b" HTTP/1.1",
        b"GET /proxy/web/ HTTP/1.1" + b"\r\nX-Many: 1" * 101,
    ],
)
def test_front_leaves_other_requests_to_aiohttp(head):
    assert parse_plain_request(head, "127.0.0.1") is None


def test_front_request_id_and_connection_close():
    valid_id = parse_plain_request(b"GET /proxy/web/ HTTP/1.1\r\nX-Request-ID: mine-1\r\nConnection: close", None)
    invalid_id = parse_plain_request(b"GET /proxy/web/ HTTP/1.1\r\nX-Request-ID: not valid!", None)

    assert valid_id.request_id == "mine-1"
    assert valid_id.keep_alive is False
    assert invalid_id.request_id.startswith("req-")


@pytest.mark.parametrize(
    ("host", "app_key"),
    [("web", "web"), ("Web.example.org:8080", "web"), ("127.0.0.1:80", None), ("[::1]", None), (".x", None)],
)
def test_front_host_routed_app(host, app_key):
    request = parse_plain_request(b"GET /a?b HTTP/1.1\r\nHost: " + host.encode(), None, host_routed=True)

    assert (request.app_key if request else None) == app_key
    if request is not None:
        assert request.path_qs == "/a?b"


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, CIMultiDict, bytes]:
    """Read one HTTP/1.1 reply: status, headers and the body, sized or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = CIMultiDict(line.split(": ", 1) for line in lines[1:] if line)
    if headers.get("Transfer-Encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            body = body[:-2]
            if size == 0:
                return status, headers, body
    return status, headers, await reader.readexactly(int(headers.get("Content-Length", "0")))


async def open_raw(
    proxy: "ProxyHarness", port: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to the proxy's API port, or to `port` on the same address."""
    host, api_port = proxy.runner.addresses[0][:2]
    return await asyncio.open_connection(host, port or api_port)


async def reply_head_for(proxy: "ProxyHarness", request: bytes, port: int | None = None) -> bytes:
    """Send raw request bytes on a new connection and return the reply's header section."""
    reader, writer = await open_raw(proxy, port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    writer.close()
    return head


async def test_front_serves_pipelined_requests_in_order(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    writer.write(
        b"GET /proxy/web/one HTTP/1.1\r\nHost: n\r\nX-Request-ID: first\r\n\r\n"
        b"HEAD /proxy/web/two HTTP/1.1\r\nHost: n\r\n\r\n"
        b"GET /proxy/web/three HTTP/1.1\r\nHost: n\r\n\r\n"
    )
    first = await read_reply(reader)
    head = await reader.readuntil(b"\r\n\r\n")
    third = await read_reply(reader)
    writer.close()

    assert first[0] == 200
    assert first[1]["X-Request-ID"] == "first"
    assert json.loads(first[2])["path_qs"] == "/one"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(third[2])["path_qs"] == "/three"
    assert [seen["path_qs"] for seen in upstreams[0].requests] == ["/one", "/two", "/three"]
    sent = CIMultiDict(upstreams[0].requests[0]["headers"])
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["X-Forwarded-Host"] == "n"
    assert proxy.ingress.traffic[APP_ID].requests == 3


async def test_front_hands_connection_to_api_mid_stream(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    writer.write(
        b"GET /proxy/web/one HTTP/1.1\r\nHost: n\r\n\r\n"
        b"GET /no/such/route HTTP/1.1\r\nHost: n\r\n\r\n"
        b"POST /proxy/web/two HTTP/1.1\r\nHost: n\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /proxy/web/three HTTP/1.1\r\nHost: n\r\n\r\n"
    )
    replies = [await read_reply(reader) for _ in range(4)]
    writer.close()

    # aiohttp and the API middleware serve the API route: without a token it gets 401.
    assert [status for status, _, _ in replies] == [200, 401, 200, 200]
    assert json.loads(replies[1][2])["success"] is False
    assert [(seen["method"], seen["path_qs"]) for seen in upstreams[0].requests] == [
        ("GET", "/one"), ("POST", "/two"), ("GET", "/three"),
    ]
    assert upstreams[0].requests[1]["body_bytes"] == 3


async def test_front_leaves_bare_lf_head_to_aiohttp(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    head = await reply_head_for(proxy, b"GET /proxy/web/lf HTTP/1.1\nHost: n\n\n")

    # aiohttp's parser decides: it serves the request or rejects it, and never waits.
    assert head.split(b" ")[1] in (b"200", b"400")


async def test_front_relays_chunked_reply(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    writer.write(b"GET /proxy/web/chunked HTTP/1.1\r\nHost: n\r\n\r\n")
    status, headers, body = await read_reply(reader)
    writer.write(b"GET /proxy/web/after HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n")
    after = await read_reply(reader)
    closed = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()

    assert (status, headers["Transfer-Encoding"], body) == (200, "chunked", b"".join(CHUNKED_PARTS))
    assert "Content-Length" not in headers
    assert after[0] == 200
    assert after[1]["Connection"] == "close"
    assert closed == b""


async def test_front_error_envelope_on_lean_path(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    writer.write(b"GET /proxy/nothing/x HTTP/1.1\r\nHost: n\r\nX-Request-ID: r-404\r\n\r\n")
    status, headers, body = await read_reply(reader)
    writer.write(b"GET /proxy/web/x HTTP/1.1\r\nHost: n\r\n\r\n")
    after = await read_reply(reader)
    writer.close()

    envelope = json.loads(body)
    assert status == 404
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["X-Request-ID"] == envelope["request_id"] == "r-404"
    assert envelope["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert after[0] == 200


async def test_front_rate_limited_ingress_takes_api_stack(harness, upstreams):
    proxy = await harness(rate_limit_ingress=limits.parse("2/minute"))
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    replies = []
    for _ in range(3):
        writer.write(b"GET /proxy/web/x HTTP/1.1\r\nHost: n\r\n\r\n")
        replies.append(await read_reply(reader))
    writer.close()

    assert [status for status, _, _ in replies] == [200, 200, 429]
    assert [headers["X-RateLimit-Remaining"] for _, headers, _ in replies] == ["1", "0", "0"]
    assert json.loads(replies[2][2])["error"]["code"] == "RATE_LIMIT_EXCEEDED"


async def test_front_client_leaving_releases_instance(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    writer.write(b"GET /proxy/web/big HTTP/1.1\r\nHost: n\r\n\r\n")
    await reader.readexactly(256 * 1024)
    writer.transport.abort()
    backend = proxy.ingress.rotations[APP_ID].backends[0]

    await wait_until(lambda: backend.in_flight == 0)
    assert proxy.ingress.traffic[APP_ID].requests == 1
    async with proxy.session.get(proxy.url("/proxy/web/again")) as response:
        assert response.status == 200


async def test_front_closes_idle_connection_on_stop(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)
    writer.write(b"GET /proxy/web/x HTTP/1.1\r\nHost: n\r\n\r\n")
    assert (await read_reply(reader))[0] == 200

    started = time.monotonic()
    await proxy.runner.cleanup()

    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    assert time.monotonic() - started < 2.0
    writer.close()
    proxy.runner = await start_api(proxy.node)


async def test_front_idle_time_restarts_with_each_request(harness, upstreams, monkeypatch):
    monkeypatch.setattr(front_module, "KEEPALIVE_TIMEOUT_SECONDS", 0.6)
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    started = time.monotonic()
    for _ in range(3):
        # Each request comes before the idle time ends, and starts it again.
        writer.write(b"GET /proxy/web/x HTTP/1.1\r\nHost: n\r\n\r\n")
        assert (await read_reply(reader))[0] == 200
        await asyncio.sleep(0.4)
    last_reply = time.monotonic() - 0.4
    assert last_reply - started > 0.6

    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    idle = time.monotonic() - last_reply
    writer.close()
    assert 0.5 < idle < 2.0


NON_ASCII_FIELDS = b"X-Text: caf\xc3\xa9\r\nX-Euro: \xe2\x82\xac\r\nX-Raw: \xe9\xff\r\n"


async def test_front_passes_non_ascii_header_bytes(harness, raw_server):
    server = await raw_server(b"HTTP/1.1 200 OK\r\n" + NON_ASCII_FIELDS + b"Content-Length: 2\r\n\r\nok")
    proxy = await harness()
    proxy.deploy([server.port])
    reader, writer = await open_raw(proxy)

    writer.write(b"GET /proxy/web/x HTTP/1.1\r\nHost: n\r\n" + NON_ASCII_FIELDS + b"\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    body = await reader.readexactly(2)
    writer.close()

    # Request and reply header bytes arrive as sent, whether they are valid UTF-8 or not.
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert NON_ASCII_FIELDS in head
    assert body == b"ok"
    assert NON_ASCII_FIELDS in server.requests[0]
    assert proxy.ingress.traffic[APP_ID].requests == 1


async def test_api_port_closes_idle_aiohttp_connection(harness, upstreams, monkeypatch):
    """A connection that aiohttp serves has the lean path's idle limit too."""
    proxy = await harness()
    await proxy.runner.cleanup()
    monkeypatch.setattr(app_module, "KEEPALIVE_TIMEOUT_SECONDS", 0.5)
    proxy.runner = await start_api(proxy.node)
    reader, writer = await open_raw(proxy)

    # An API route, asked without a token.
    writer.write(b"GET /info/program_stats HTTP/1.1\r\nHost: n\r\n\r\n")
    assert (await read_reply(reader))[0] == 401
    replied = time.monotonic()

    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    idle = time.monotonic() - replied
    writer.close()
    assert 0.4 < idle < 3.0


async def test_front_duplicate_host_gets_aiohttp_400(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])

    head = await reply_head_for(proxy, b"GET /proxy/web/x HTTP/1.1\r\nHost: first\r\nHost: second\r\n\r\n")

    assert head.split(b" ")[1] == b"400"
    assert upstreams[0].requests == []


async def test_proxy_http10_keep_alive_ends_unsized_body(harness, upstreams):
    proxy = await harness()
    proxy.deploy([upstreams[0].port])
    reader, writer = await open_raw(proxy)

    writer.write(b"GET /proxy/web/chunked HTTP/1.0\r\nHost: n\r\nConnection: keep-alive\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200"
    assert body == b"".join(CHUNKED_PARTS)


async def test_ingress_port_shares_rate_limit_budget(harness, upstreams):
    port = closed_port()
    proxy = await harness(ingress_port=port, rate_limit_ingress=limits.parse("2/minute"))
    proxy.deploy([upstreams[0].port])

    async with proxy.session.get(proxy.url("/proxy/web/x")) as first:
        assert first.status == 200
    host_url = f"http://127.0.0.1:{port}/x"
    async with proxy.session.get(host_url, headers={"Host": "web"}) as second:
        remaining = second.headers["X-RateLimit-Remaining"]
    async with proxy.session.get(host_url, headers={"Host": "web"}) as third:
        body = await third.json()

    assert remaining == "0"
    assert third.status == 429
    assert body["error"]["code"] == "RATE_LIMIT_EXCEEDED"


async def test_ingress_port_connect_spends_ingress_budget(harness, upstreams):
    port = closed_port()
    proxy = await harness(ingress_port=port, rate_limit_ingress=limits.parse("2/minute"))
    proxy.deploy([upstreams[0].port])

    request = b"CONNECT example.com:443 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    head = (await reply_head_for(proxy, request, port)).decode("latin-1")
    async with proxy.session.get(proxy.url("/proxy/web/x")) as second:
        remaining = second.headers["X-RateLimit-Remaining"]

    assert head.startswith("HTTP/1.1 405 ")
    assert "X-RateLimit-Limit: 2" in head
    assert remaining == "0"
