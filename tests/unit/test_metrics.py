"""Metrics: RequestStats counting, the node collector over real peer sockets, GET /metrics.

The collector tests encode with prometheus_client's `generate_latest` and parse the text
back with its parser, so they check the text format a Prometheus server reads. The
peer test runs two real PeerProtocols with real data services on 127.0.0.1 and one
plain UDP socket that never replies.
"""

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace

import limits
import pytest
from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from test_api_fakes import FakeNode, client, node, serve_api  # noqa: F401 - fixtures
from voxanode.api.stats import (
    LATENCY_BUCKET_BOUNDS_MS,
    OTHER_METHOD,
    UNMATCHED_ROUTE,
    RequestStats,
)
from voxanode.dht.service import DataLimits, DataService
from voxanode.dht.store import DATABASE_FILE_NAME, RecordStore
from voxanode.identity import Identity
from voxanode.metrics import build_registry
from voxanode.peer.protocol import PeerProtocol, PeerRequestError

RPC_TIMEOUT_SECONDS = 0.3
MAX_VALUE_BYTES = 1024
MAX_KEY_BYTES = 64


def parse_metrics(text: str) -> dict:
    """Return the parsed metric families by name (counters without `_total`)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families: dict, family_name: str, sample_name: str, **labels: str) -> float:
    """Return the value of the one sample with this name and these labels, or 0.0."""
    matches = [
        sample.value
        for sample in families[family_name].samples
        if sample.name == sample_name and sample.labels == labels
    ]
    assert len(matches) <= 1, (sample_name, labels, matches)
    return matches[0] if matches else 0.0


def scrape(node, stats: RequestStats | None = None, router=None) -> dict:
    # A UrlDispatcher without named routes is falsy, so None is checked explicitly.
    stats = RequestStats() if stats is None else stats
    router = web.UrlDispatcher() if router is None else router
    registry = build_registry(node, stats, router)
    return parse_metrics(generate_latest(registry).decode("utf-8"))


# --- RequestStats -----------------------------------------------------------------------


def test_request_stats_counts_by_route_method_status():
    stats = RequestStats()
    responses = [
        (200, "/data/retrieve/", "GET"),
        (200, "/data/retrieve/", "GET"),
        (404, "/data/retrieve/", "GET"),
        (201, "/data/store/", "POST"),
        (404, UNMATCHED_ROUTE, "GET"),
    ]
    for status, route, method in responses:
        stats.record(status, 3.0, route, method)

    assert stats.responses == {
        ("/data/retrieve/", "GET", 200): 2,
        ("/data/retrieve/", "GET", 404): 1,
        ("/data/store/", "POST", 201): 1,
        (UNMATCHED_ROUTE, "GET", 404): 1,
    }
    assert stats.requests == 5
    assert stats.errors == 2


def test_request_stats_unknown_method_is_other():
    stats = RequestStats()
    stats.record(404, 1.0, UNMATCHED_ROUTE, "BREW")
    stats.record(404, 1.0, UNMATCHED_ROUTE, "PROPFIND")

    assert stats.responses == {(UNMATCHED_ROUTE, OTHER_METHOD, 404): 2}


@pytest.mark.parametrize(
    ("response_ms", "bucket"),
    [
        (0.0, 0),
        (1.0, 0),
        (1.01, 1),
        (LATENCY_BUCKET_BOUNDS_MS[-1], len(LATENCY_BUCKET_BOUNDS_MS) - 1),
        (LATENCY_BUCKET_BOUNDS_MS[-1] + 0.1, len(LATENCY_BUCKET_BOUNDS_MS)),
    ],
)
def test_request_stats_latency_bucket(response_ms, bucket):
    stats = RequestStats()
    stats.record(200, response_ms, "/status/health", "GET")

    counts = stats.latencies["/status/health"].bucket_counts
    assert counts[bucket] == 1
    assert sum(counts) == 1
    assert stats.latencies["/status/health"].total_ms == response_ms


# --- the collector ----------------------------------------------------------------------


def test_collector_merges_slash_twins_into_first_route():
    router = web.UrlDispatcher()

    async def handler(request):
        return web.Response()

    router.add_get("/data/retrieve/", handler)
    router.add_get("/data/retrieve", handler)
    router.add_get("/status/health", handler)
    router.add_get("/status/health/", handler)
    stats = RequestStats()
    stats.record(200, 2.0, "/data/retrieve/", "GET")
    stats.record(200, 30.0, "/data/retrieve", "GET")
    stats.record(200, 1.0, "/status/health/", "GET")

    families = scrape(SimpleNamespace(node_id="node-000000000001"), stats, router)

    requests = families["voxanode_http_requests"]
    assert requests.type == "counter"
    assert sample_value(
        families, "voxanode_http_requests", "voxanode_http_requests_total",
        route="/data/retrieve/", method="GET", status="200",
    ) == 2
    assert sample_value(
        families, "voxanode_http_requests", "voxanode_http_requests_total",
        route="/status/health", method="GET", status="200",
    ) == 1
    routes = {sample.labels["route"] for sample in requests.samples}
    assert routes == {"/data/retrieve/", "/status/health"}

    latency = "voxanode_http_request_duration_seconds"
    assert families[latency].type == "histogram"
    assert sample_value(families, latency, latency + "_count", route="/data/retrieve/") == 2
    assert sample_value(families, latency, latency + "_sum", route="/data/retrieve/") == pytest.approx(0.032)
    # 2 ms is at or below the 2.5 ms bound, 30 ms is not.
    assert sample_value(families, latency, latency + "_bucket", route="/data/retrieve/", le="0.0025") == 1
    assert sample_value(families, latency, latency + "_bucket", route="/data/retrieve/", le="0.05") == 2
    assert sample_value(families, latency, latency + "_bucket", route="/data/retrieve/", le="+Inf") == 2


def test_collector_skips_parts_the_node_lacks():
    families = scrape(SimpleNamespace(node_id="node-000000000002", data=object()))

    assert sample_value(
        families, "voxanode_node_info", "voxanode_node_info",
        node_id="node-000000000002", version=families["voxanode_node_info"].samples[0].labels["version"],
    ) == 1
    assert "voxanode_dht_rpcs_sent" not in families
    assert "voxanode_members" not in families
    assert "voxanode_dht_records" not in families
    # The process collector runs in every registry.
    assert "process_resident_memory_bytes" in families


def test_collector_registries_are_separate_per_node():
    first = RequestStats()
    first.record(200, 1.0, "/status/health", "GET")

    families_first = scrape(SimpleNamespace(node_id="node-000000000003"), first)
    families_second = scrape(SimpleNamespace(node_id="node-000000000004"), RequestStats())

    assert len(families_first["voxanode_http_requests"].samples) == 1
    assert families_second["voxanode_http_requests"].samples == []


# --- peer RPC counters over real sockets ------------------------------------------------


class PeerNode:
    """A real record store, data service and peer protocol bound to 127.0.0.1."""

    def __init__(self, data_dir: Path):
        self.identity = Identity.generate()
        self.node_id = self.identity.node_id
        self.store = RecordStore(
            data_dir / DATABASE_FILE_NAME,
            max_value_bytes=MAX_VALUE_BYTES,
            max_key_bytes=MAX_KEY_BYTES,
            max_replicas=3,
        )
        self.data = DataService(
            self.identity,
            self.store,
            DataLimits(
                max_value_bytes=MAX_VALUE_BYTES,
                max_key_bytes=MAX_KEY_BYTES,
                ksize=3,
                alpha=3,
                default_replicas=2,
                clock_skew_seconds=30.0,
            ),
        )
        self.protocol: PeerProtocol | None = None

    async def start(self) -> tuple[str, int]:
        self.store.open()
        loop = asyncio.get_running_loop()
        _, self.protocol = await loop.create_datagram_endpoint(
            lambda: PeerProtocol(
                self.identity,
                self.data,
                ksize=3,
                max_datagram_bytes=8192,
                rpc_timeout_seconds=RPC_TIMEOUT_SECONDS,
                clock_skew_seconds=30.0,
                max_record_bytes=MAX_VALUE_BYTES + MAX_KEY_BYTES + 1024,
            ),
            local_addr=("127.0.0.1", 0),
        )
        self.data.attach(self.protocol)
        return self.protocol.transport.get_extra_info("sockname")[:2]

    async def stop(self) -> None:
        if self.protocol is not None:
            await self.data.close()
            await self.protocol.close()
        self.store.close()


def reject_request(sender, sender_id, *args):
    raise PeerRequestError("this test method rejects every request")


async def test_peer_rpc_outcomes_are_counted(tmp_path):
    caller = PeerNode(tmp_path / "caller")
    callee = PeerNode(tmp_path / "callee")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        await caller.start()
        callee_address = await callee.start()
        callee.protocol.register_handler("swim_ping", lambda sender, sender_id, updates: [])
        callee.protocol.register_handler("reject_all", reject_request)

        assert (await caller.protocol.call(callee_address, "ping", []))[0] is True
        assert (await caller.protocol.call(callee_address, "ping", []))[0] is True
        assert (await caller.protocol.call(callee_address, "swim_ping", [[]]))[0] is True
        assert (await caller.protocol.call(callee_address, "reject_all", []))[0] is False
        timed_out = await caller.protocol.call(silent.getsockname(), "find_node", [b"\x00" * 20])
        assert timed_out == (False, None, None)

        caller_families = scrape(caller)
        callee_families = scrape(callee)
    finally:
        silent.close()
        await caller.stop()
        await callee.stop()

    def rpcs(families, outcome, method):
        name = f"voxanode_dht_rpcs_{outcome}"
        return sample_value(families, name, name + "_total", method=method)

    def gossip(families, outcome, kind):
        name = f"voxanode_gossip_messages_{outcome}"
        return sample_value(families, name, name + "_total", kind=kind)

    assert rpcs(caller_families, "sent", "ping") == 2
    assert rpcs(caller_families, "sent", "reject_all") == 1
    assert rpcs(caller_families, "sent", "find_node") == 1
    assert rpcs(caller_families, "failed", "reject_all") == 1
    assert rpcs(caller_families, "failed", "ping") == 0
    assert rpcs(caller_families, "timed_out", "find_node") == 1
    assert gossip(caller_families, "sent", "ping") == 1
    assert rpcs(caller_families, "sent", "swim_ping") == 0

    assert rpcs(callee_families, "received", "ping") == 2
    assert rpcs(callee_families, "received", "reject_all") == 1
    assert gossip(callee_families, "received", "ping") == 1
    assert sample_value(
        callee_families, "voxanode_peer_datagrams_received", "voxanode_peer_datagrams_received_total"
    ) == 4
    assert sample_value(
        callee_families, "voxanode_dht_routing_table_peers", "voxanode_dht_routing_table_peers"
    ) == 1
    # A real store and data service: no records yet, no republish round run.
    assert sample_value(callee_families, "voxanode_dht_records", "voxanode_dht_records") == 0
    assert sample_value(
        callee_families, "voxanode_dht_republish_rounds", "voxanode_dht_republish_rounds_total"
    ) == 0


async def test_peer_datagram_drops_are_counted_by_reason(tmp_path):
    node = PeerNode(tmp_path / "node")
    try:
        await node.start()
        node.protocol.datagram_received(b"not a frame at all", ("127.0.0.1", 9))
        node.protocol.datagram_received(b"", ("127.0.0.1", 9))
        families = scrape(node)
    finally:
        await node.stop()

    name = "voxanode_peer_datagrams_dropped"
    reasons = {sample.labels["reason"]: sample.value for sample in families[name].samples}
    assert sum(reasons.values()) == 2
    assert set(reasons) <= {"truncated", "bad_magic"}, reasons


# --- GET /metrics over HTTP -------------------------------------------------------------


async def test_metrics_route_serves_text_format(client):  # noqa: F811 - fixture
    await (await client.get("/status/health")).read()
    await (await client.get("/status/health/")).read()
    await (await client.get("/no/such/route")).read()
    await (await client.request("PROPFIND", "/no/such/route")).read()

    response = await client.get("/metrics")
    text = await response.text()

    assert response.status == 200, text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = parse_metrics(text)
    requests = "voxanode_http_requests"
    assert sample_value(
        families, requests, requests + "_total", route="/status/health", method="GET", status="200"
    ) == 2
    assert sample_value(
        families, requests, requests + "_total", route=UNMATCHED_ROUTE, method="GET", status="404"
    ) == 1
    assert sample_value(
        families, requests, requests + "_total", route=UNMATCHED_ROUTE, method=OTHER_METHOD, status="404"
    ) == 1
    for name, family in families.items():
        if name.startswith("voxanode_"):
            assert family.documentation, f"{name} has no HELP text"

    # The scrape itself is counted once its response is sent.
    again = parse_metrics(await (await client.get("/metrics/")).text())
    assert sample_value(
        again, requests, requests + "_total", route="/metrics", method="GET", status="200"
    ) == 1


async def test_metrics_route_head_has_no_body(client):  # noqa: F811 - fixture
    response = await client.head("/metrics")

    assert response.status == 200
    assert await response.read() == b""


async def test_metrics_route_counts_in_status_rate_limit(tmp_path, serve_api):  # noqa: F811 - fixture
    limited = FakeNode(
        tmp_path / "limited",
        rate_limit_status=limits.parse("2/minute"),
        rate_limit_default=limits.parse("100/minute"),
    )
    session = await serve_api(limited)

    replies = []
    for _ in range(3):
        response = await session.get("/metrics")
        await response.read()
        replies.append(response)

    assert [reply.status for reply in replies] == [200, 200, 429]
    assert replies[0].headers["X-RateLimit-Limit"] == "2"
    assert replies[2].headers["Retry-After"]
