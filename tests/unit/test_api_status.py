"""The status, info and test routes over real HTTP, with node state set per test."""

import asyncio
import os
import platform
import re
from datetime import date

import pytest

import voxanode
from test_api_fakes import (  # noqa: F401 - fixtures are used by name
    FakeNode,
    FakePingResult,
    FakeStorageStatus,
    client,
    node,
    serve_api,
)
from voxanode.api.routes.connectivity import peer_connectivity
from voxanode.tokens import Scope, create_token, token_file_path

TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


async def get_json(client, path):
    async with client.get(path) as response:
        return response.status, await response.json()


class FakeApps:
    def summary(self):
        return {"total_deployed": 4, "running": 2, "stopped": 1, "failed": 1}


HEALTH_CASES = [
    # (case id, bootstrap peers, connected peers, storage ok,
    #  http status, status, networking, storage, registry)
    ("lone first node", (), 0, True, 200, "healthy", "healthy", "healthy", "healthy"),
    ("joined node", (("127.0.0.1", 9001),), 2, True, 200, "healthy", "healthy", "healthy", "healthy"),
    (
        "isolated node",
        (("127.0.0.1", 9001),),
        0,
        True,
        200,
        "degraded",
        "degraded",
        "healthy",
        "degraded",
    ),
    ("storage down", (), 0, False, 503, "unhealthy", "healthy", "unhealthy", "degraded"),
    (
        "storage down isolated",
        (("127.0.0.1", 9001),),
        0,
        False,
        503,
        "unhealthy",
        "degraded",
        "unhealthy",
        "degraded",
    ),
]


@pytest.mark.parametrize(
    "bootstrap, connected, storage_ok, http_status, status, networking, storage, registry",
    [case[1:] for case in HEALTH_CASES],
    ids=[case[0] for case in HEALTH_CASES],
)
async def test_health_cases(
    client,
    node: FakeNode,
    bootstrap,
    connected,
    storage_ok,
    http_status,
    status,
    networking,
    storage,
    registry,
):
    node.bootstrap_peers = bootstrap
    node.connected_peers = connected
    node.storage = FakeStorageStatus(ok=storage_ok, records=0, detail="disk I/O error")

    code, reply = await get_json(client, "/status/health")

    assert code == http_status
    assert reply["status"] == status
    assert reply["components"] == {
        "api": "healthy",
        "networking": networking,
        "storage": storage,
        "registry": registry,
    }


async def test_health_checks_storage_once_per_interval(client, node: FakeNode, monkeypatch):
    monkeypatch.setattr("voxanode.api.routes.status.HEALTH_CHECK_INTERVAL_SECONDS", 0.3)
    code, _ = await get_json(client, "/status/health")
    assert code == 200

    node.storage = FakeStorageStatus(ok=False, records=0, detail="disk I/O error")
    code, _ = await get_json(client, "/status/health")
    assert code == 200, "checked the storage again within the interval"

    await asyncio.sleep(0.35)
    code, reply = await get_json(client, "/status/health")
    assert code == 503
    assert reply["components"]["storage"] == "unhealthy"


async def test_health_reply_fields(client, node: FakeNode):
    node.started_at -= 42.7
    _, reply = await get_json(client, "/status/health")

    assert set(reply) == {"status", "timestamp", "version", "uptime_seconds", "components"}
    assert reply["version"] == voxanode.__version__
    assert TIMESTAMP_PATTERN.fullmatch(reply["timestamp"])
    assert reply["uptime_seconds"] in (42, 43)


async def test_health_slash_twin(client):
    code, reply = await get_json(client, "/status/health/")

    assert code == 200
    assert reply["status"] == "healthy"


async def test_system_status_values(client, node: FakeNode):
    node.connected_peers = 3
    code, reply = await get_json(client, "/status/system")

    assert code == 200
    assert reply["node_id"] == node.node_id
    assert reply["status"] == "running"
    assert reply["version"] == voxanode.__version__
    assert reply["network_info"] == {
        "connected_peers": 3,
        "total_connections": 4,
        "routing_table_peers": 0,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "datagrams_sent": 10,
        "datagrams_received": 20,
        "datagrams_dropped": {"bad_signature": 2},
        "bytes_sent_by_method": {"ping": 600, "find_node": 400},
    }
    assert reply["applications"] == {
        "total_deployed": 0,
        "running": 0,
        "stopped": 0,
        "failed": 0,
    }

    system = reply["system_info"]
    assert system["os"] == platform.system()
    assert system["architecture"] == platform.machine()
    assert system["cpu_cores"] == os.cpu_count()
    assert 0 < system["available_memory_mb"] <= system["total_memory_mb"]
    disk = system["disk_usage"]
    assert disk["total_gb"] > 0
    assert 0 <= disk["used_gb"] <= disk["total_gb"]
    assert 0 <= disk["available_gb"] <= disk["total_gb"]


async def test_system_status_missing_data_dir(client, node: FakeNode):
    # The data directory is not created in these tests, so the disk of its parent is used.
    assert not node.settings.data_dir.exists()

    code, reply = await get_json(client, "/status/system")

    assert code == 200
    assert reply["system_info"]["disk_usage"]["total_gb"] > 0


async def test_system_status_counts_apps(client, node: FakeNode):
    node.apps = FakeApps()
    _, reply = await get_json(client, "/status/system")

    assert reply["applications"] == FakeApps().summary()


async def test_program_stats_runtime_info(client, node: FakeNode):
    code, reply = await get_json(client, "/info/program_stats")

    assert code == 200
    runtime = reply["runtime_info"]
    assert runtime["process_id"] == os.getpid()
    assert runtime["python_version"] == platform.python_version()
    assert TIMESTAMP_PATTERN.fullmatch(runtime["start_time"])
    assert runtime["uptime_seconds"] >= 0
    statistics = reply["statistics"]
    assert statistics["memory_usage_mb"] > 0
    assert statistics["cpu_usage_percent"] >= 0


async def test_version_production_defaults(serve_api, tmp_path):
    node = FakeNode(tmp_path, dev=False)
    token, _ = create_token(token_file_path(tmp_path), "reader", Scope.READ)
    client = await serve_api(node)

    async with client.get("/info/version", headers={"Authorization": f"Bearer {token}"}) as response:
        code, reply = response.status, await response.json()

    assert code == 200
    assert reply["version"] == voxanode.__version__
    assert reply["git_commit"] == "unknown"
    assert reply["build_environment"] == "production"
    assert reply["features"] == {
        "app_deployment": False,
        "dns_management": False,
        "p2p_networking": True,
        "registry_integration": True,
    }
    modified = os.stat(voxanode.__file__).st_mtime
    assert date.fromisoformat(reply["build_date"]).toordinal() in range(
        date.fromtimestamp(modified).toordinal() - 1,
        date.fromtimestamp(modified).toordinal() + 2,
    )


async def test_version_development_with_commit(serve_api, tmp_path):
    node = FakeNode(tmp_path, dev=True, git_commit="abc123def456")
    node.apps = FakeApps()
    client = await serve_api(node)

    _, reply = await get_json(client, "/info/version")

    assert reply["git_commit"] == "abc123def456"
    assert reply["build_environment"] == "development"
    assert reply["features"]["app_deployment"] is True


@pytest.mark.parametrize(
    "pinged, reachable, expected",
    [(0, 0, "no_peers"), (3, 3, "ok"), (3, 1, "degraded"), (2, 0, "failed")],
)
def test_peer_connectivity_summary(pinged, reachable, expected):
    assert peer_connectivity(pinged, reachable) == expected


def ping(index: int, reachable: bool) -> FakePingResult:
    return FakePingResult(
        node_id=f"node-{index:012x}",
        address=f"127.0.0.{index}:9999",
        reachable=reachable,
        rtt_ms=1.23456 if reachable else None,
    )


CONNECTION_CASES = [
    # (case id, bootstrap peers, ping results, success, peer_connectivity, dns_resolution)
    ("lone first node", (), [], True, "no_peers", "not_configured"),
    ("isolated node", (("127.0.0.1", 9001),), [], False, "no_peers", "ok"),
    ("all answer", (("localhost", 9001),), [ping(1, True), ping(2, True)], True, "ok", "ok"),
    ("some answer", (), [ping(1, True), ping(2, False)], True, "degraded", "not_configured"),
    ("none answer", (("127.0.0.1", 9001),), [ping(1, False)], False, "failed", "ok"),
    # A label over 63 characters fails IDNA encoding before any DNS query is sent.
    ("bad bootstrap name", (("é" * 64, 9001),), [ping(1, True)], True, "ok", "failed"),
]


@pytest.mark.parametrize(
    "bootstrap, pings, success, connectivity, dns",
    [case[1:] for case in CONNECTION_CASES],
    ids=[case[0] for case in CONNECTION_CASES],
)
async def test_connection_cases(client, node: FakeNode, bootstrap, pings, success, connectivity, dns):
    node.bootstrap_peers = bootstrap
    node.pings = pings

    code, reply = await get_json(client, "/test/connection")

    assert code == 200
    assert reply["success"] is success
    assert reply["network_tests"] == {
        "registry_connection": "ok",
        "peer_connectivity": connectivity,
        "dns_resolution": dns,
    }
    assert len(reply["peers"]) == len(pings)


async def test_connection_reply_fields(client, node: FakeNode):
    node.pings = [ping(1, True), ping(2, False)]

    _, reply = await get_json(client, "/test/connection")

    assert node.ping_limits == [3]
    assert reply["node_id"] == node.node_id
    assert TIMESTAMP_PATTERN.fullmatch(reply["timestamp"])
    assert reply["response_time_ms"] >= 0
    assert reply["peers"] == [
        {"node_id": "node-000000000001", "address": "127.0.0.1:9999", "reachable": True, "rtt_ms": 1.23},
        {"node_id": "node-000000000002", "address": "127.0.0.2:9999", "reachable": False, "rtt_ms": None},
    ]


async def test_connection_storage_failed(client, node: FakeNode):
    node.storage = FakeStorageStatus(ok=False, records=0, detail="database is locked")

    _, reply = await get_json(client, "/test/connection")

    assert reply["network_tests"]["registry_connection"] == "failed"
