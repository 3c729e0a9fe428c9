"""voxacommunications_client against real node processes: every call, sync and async.

Most tests share one 3-node network with the local Docker test image and run in
file order on it. Each deploys apps under its own names. Tests of authentication,
rate limits, retries and unreachable nodes start small networks of their own with
the flags they need, through the `devnet_factory` fixture. Every container the
nodes made is removed at the end, found by its node id label.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST_DAEMON_ARGS, TEST_IMAGE, api_post, wait_for
from voxacommunications_client import (
    AsyncVoxaClient,
    AuthenticationRequired,
    AuthorizationFailed,
    Conflict,
    DeploymentFailed,
    InvalidRequest,
    NetworkError,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    VoxaClient,
    WaitTimeout,
)
from voxacommunications_client.models import Event, LogEntry, PeerPing
from voxanode.devnet import Devnet, allocate_free_block
from voxanode.identity import Identity

REPO_DIR = Path(__file__).resolve().parents[2]
MISSING_IMAGE = "voxanode-test/not-built-anywhere:1"
APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "2",
    "--apps-sync-interval-seconds", "3",
    "--apps-stop-timeout-seconds", "2",
)
HTTPD = {"ports": [{"container_port": 8080}], "resources": {"memory": "64m", "cpu": "0.2"}}
NODE_LABEL = "io.voxanode.node-id"
SETTLE_SECONDS = 30
RUNNING_SECONDS = 60.0
STREAM_SECONDS = 60
COMMAND_TIMEOUT_SECONDS = 60
APP_ID_PATTERN = re.compile(r"app-[0-9a-f]{12}")
NODE_ID_PATTERN = re.compile(r"node-[0-9a-f]{12}")
# A node refuses a deploy it cannot forward to the responsible node with this Retry-After.
UNREACHABLE_RESPONSIBLE_RETRY_AFTER_SECONDS = 5


def marker_command(marker: str) -> list[str]:
    """Return a container command that prints `marker` a second after start, then serves pages."""
    return ["sh", "-c", f"sleep 1; echo {marker}; exec httpd -f -v -p 8080 -h /www"]


def docker(*args: str) -> str:
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    assert completed.returncode == 0, f"docker {' '.join(args)} failed: {completed.stderr.strip()}"
    return completed.stdout


def remove_containers(data_dirs: list[Path]) -> None:
    """Remove every container of the nodes with these data directories, by node id label."""
    for data_dir in data_dirs:
        node_id = Identity.load_or_create(data_dir).node_id
        leftovers = docker("ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}").split()
        if leftovers:
            docker("rm", "-f", *leftovers)




def log_stream_closed(node, app_id: str) -> bool:
    """Return whether the node's log records the end of a logs websocket of `app_id`."""
    lines = node.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return any("log stream closed" in line and f"app={app_id}" in line for line in lines)


def offers_apps(client: VoxaClient, node_ids: set[str]) -> bool:
    listed = client.nodes.discover(capability="app-deployment")
    return {node.id for node in listed} >= node_ids


@pytest.fixture(scope="module")
def network(tmp_path_factory, test_image):
    block = allocate_free_block(4, random.Random())
    devnet = Devnet(
        3,
        tmp_path_factory.mktemp("client-devnet"),
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=[*FAST_DAEMON_ARGS, *APP_ARGS],
    )
    devnet.start()
    try:
        node_ids = {node.fetch_node_id() for node in devnet.nodes}
        with VoxaClient(devnet.nodes[0].api_url) as client:
            assert wait_for(lambda: offers_apps(client, node_ids), SETTLE_SECONDS) is True
        yield devnet
    finally:
        devnet.stop()
        remove_containers([node.data_dir for node in devnet.nodes])


@pytest.fixture
def client(network):
    with VoxaClient(network.nodes[0].api_url, retries=1, backoff=0.1) as voxa:
        yield voxa


# --- sync client on the shared network --------------------------------------------------


def test_sync_status_info_and_connection(network, client):
    health = client.status.health()
    assert health.status == "healthy"
    assert set(health.components) == {"api", "networking", "storage", "registry"}
    assert health.timestamp.tzinfo is not None

    system = client.status.system()
    assert system.node_id == network.nodes[0].fetch_node_id()
    assert system.system_info.total_memory_mb > 0
    assert system.network_info.connected_peers >= 2
    assert system.applications.total_deployed >= 0

    version = client.info.version()
    assert version.version == health.version
    assert version.features["app_deployment"] is True

    stats = client.info.program_stats()
    assert stats.statistics.requests_processed > 0
    assert stats.runtime_info.start_time.tzinfo is not None

    check = client.test.connection()
    assert check.success is True
    assert check.node_id == system.node_id
    assert check.peers and all(isinstance(peer, PeerPing) for peer in check.peers)
    assert check.network_tests["peer_connectivity"] in ("ok", "degraded")

    for result in (health, system, version, stats, check):
        json.dumps(result.to_dict())
    assert health.to_dict()["timestamp"].endswith("Z")
    assert system.raw["node_id"] == system.node_id


def test_sync_discover_nodes_with_filters(network, client):
    node_ids = {node.fetch_node_id() for node in network.nodes}

    listed = client.nodes.discover()
    assert {node.id for node in listed} == node_ids
    assert listed.total_nodes == 3
    assert listed.online_nodes == 3
    assert all(node.last_seen.tzinfo is not None for node in listed)
    addresses = {f"{node.api_host}:{node.api_port}" for node in network.nodes}
    assert {node.address for node in listed} == addresses

    with_apps = client.nodes.discover(status="online", capability="app-deployment")
    assert len(with_apps) == 3
    assert all("app-deployment" in node.capabilities for node in with_apps)
    assert len(client.nodes.discover(status="offline")) == 0


def test_sync_store_and_retrieve_across_nodes(network, client):
    key = f"sync-settings-{random.randrange(10**9)}"
    before = time.time()
    stored = client.data.store(key, {"theme": "dark", "n": [1, 2]}, ttl=600, replicas=3)
    assert stored.key == key
    assert len(stored.storage_nodes) == 3
    assert stored.warnings == []
    assert abs(stored.expires_at.timestamp() - (before + 600)) < 5

    with VoxaClient(network.nodes[2].api_url) as other:
        value = other.data.retrieve(key)
    assert value.value == {"theme": "dark", "n": [1, 2]}
    assert value.replicas == 3
    assert value.source_node == network.nodes[0].fetch_node_id()
    assert value.created_at.timestamp() <= time.time() + 1
    assert value.expires_at == stored.expires_at


def test_sync_errors_typed_by_code(client):
    with pytest.raises(InvalidRequest) as bad_name:
        client.apps.deploy("Bad_Name", TEST_IMAGE)
    assert bad_name.value.status == 400
    assert bad_name.value.code == "INVALID_REQUEST"
    assert bad_name.value.field == "name"
    assert bad_name.value.issue
    assert bad_name.value.request_id

    with pytest.raises(InvalidRequest) as bad_replicas:
        client.data.store("some-key", 1, replicas=0)
    assert bad_replicas.value.field == "replicas"

    with pytest.raises(NotFound) as no_app:
        client.apps.get_status("app-000000000000")
    assert no_app.value.status == 404
    assert no_app.value.code == "RESOURCE_NOT_FOUND"

    with pytest.raises(NotFound):
        client.data.retrieve(f"never-stored-{random.randrange(10**9)}")
    with pytest.raises(NotFound) as no_logs:
        client.apps.logs("app-000000000000")
    assert no_logs.value.status == 404
    # A refused websocket upgrade still brings the node's message and details.
    assert "app-000000000000" in no_logs.value.message
    with pytest.raises(InvalidRequest) as bad_type:
        client.events(types=["no_such_event"])
    assert bad_type.value.status == 400
    assert bad_type.value.field == "types"
    assert "no_such_event" in bad_type.value.message


@pytest.mark.timeout(120)
def test_sync_deploy_events_list_conflict(network, client):
    with client.events(types=["app_deployed"]) as events:
        app = client.apps.deploy("sync-web", TEST_IMAGE, 2, **HTTPD)
        assert APP_ID_PATTERN.fullmatch(app.id)
        assert app.name == "sync-web"
        assert app.status == "deploying"
        assert app.instances_created == 2
        assert app.nodes_deployed == 2
        deployed = next(event for event in events if event.subject.get("app_id") == app.id)
    assert isinstance(deployed, Event)
    assert deployed.type == "app_deployed"
    assert deployed.data["name"] == "sync-web"
    assert NODE_ID_PATTERN.fullmatch(deployed.source_node_id)
    assert deployed.timestamp.tzinfo is not None

    seen = []
    running = client.apps.wait_until_running(
        app.id, timeout=RUNNING_SECONDS, poll_interval=0.2, on_progress=seen.append
    )
    assert running.status == "running"
    assert running.replicas.running == running.replicas.desired == 2
    assert seen[-1] is running
    instance = running.instances[0]
    assert instance.ports[0].container_port == 8080
    assert instance.ports[0].host_port
    assert instance.started_at.tzinfo is not None

    listed = client.apps.list(status="running")
    (summary,) = [entry for entry in listed if entry.id == app.id]
    assert summary.name == "sync-web"
    assert summary.replicas.desired == 2
    assert summary.replicas.unhealthy is None
    assert len(summary.nodes) == 2
    assert listed.limit == 50
    assert listed.offset == 0
    assert client.apps.list(limit=1).has_more is (client.apps.list().total_count > 1)

    with VoxaClient(network.nodes[1].api_url) as other:
        status = other.apps.get_status(app.id)
    assert {i.id for i in status.instances} == {i.id for i in running.instances}
    assert status.image == TEST_IMAGE

    with pytest.raises(Conflict) as conflict:
        client.apps.deploy("sync-web", TEST_IMAGE)
    assert conflict.value.status == 409
    client.apps.stop(app.id, force=True)


@pytest.mark.timeout(120)
def test_sync_logs_closed_on_break(network, client):
    marker = f"sync-marker-{random.randrange(10**9)}"
    app = client.apps.deploy("sync-talker", TEST_IMAGE, 2, command=marker_command(marker), **HTTPD)

    marked: dict[str, LogEntry] = {}
    for entry in client.apps.logs(app.id, tail=10):
        if marker in entry.message:
            marked[entry.instance_id] = entry
        if len(marked) == 2:
            break
    # Breaking out dropped the only reference to the stream, which closes its websocket.
    assert wait_for(lambda: log_stream_closed(network.nodes[0], app.id), 10) is True

    status = client.apps.wait_until_running(app.id, timeout=RUNNING_SECONDS)
    assert set(marked) == {i.id for i in status.instances}
    assert {entry.node_id for entry in marked.values()} == {i.node_id for i in status.instances}
    assert all(entry.level == "info" for entry in marked.values())
    assert all(entry.metadata["stream"] == "stdout" for entry in marked.values())
    assert all(entry.timestamp.tzinfo is not None for entry in marked.values())

    history = list(client.apps.logs(app.id, follow=False, tail=1))
    assert sorted(entry.instance_id for entry in history) == sorted(marked)
    assert all(marker in entry.message for entry in history)
    client.apps.stop(app.id, force=True)


@pytest.mark.timeout(120)
def test_sync_scale_then_stop(client):
    app = client.apps.deploy("sync-scaled", TEST_IMAGE, 1, **HTTPD)
    client.apps.wait_until_running(app.id, timeout=RUNNING_SECONDS)

    scaled = client.apps.scale(app.id, 2)
    assert scaled.app_id == app.id
    assert scaled.previous_replicas == 1
    assert scaled.new_replicas == 2
    assert scaled.scaling_status in ("completed", "in_progress")
    status = client.apps.wait_until_running(app.id, timeout=RUNNING_SECONDS)
    assert status.replicas.running == 2

    stopped = client.apps.stop(app.id, force=True)
    assert stopped.app_id == app.id
    assert stopped.instances_stopped == 2
    assert client.apps.get_status(app.id).status == "stopped"
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as gave_up:
        client.apps.wait_until_running(app.id, timeout=30)
    assert time.monotonic() - started < 5
    assert gave_up.value.last_status.status == "stopped"


@pytest.mark.timeout(120)
def test_sync_wait_until_running_times_out(client):
    failing_check = {"type": "http", "path": "/missing", "interval_seconds": 1, "timeout_seconds": 0.5, "retries": 1}
    app = client.apps.deploy("sync-unhealthy", TEST_IMAGE, 1, health_check=failing_check, **HTTPD)
    seen = []
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as gave_up:
        client.apps.wait_until_running(app.id, timeout=2, poll_interval=0.5, on_progress=seen.append)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 10
    assert gave_up.value.last_status.status == "deploying"
    assert len(seen) >= 3
    client.apps.stop(app.id, force=True)


def test_sync_missing_image_raises_deployment_failed(client):
    with pytest.raises(DeploymentFailed) as failed:
        client.apps.deploy("sync-ghost", MISSING_IMAGE)
    assert failed.value.status == 422
    assert failed.value.code == "DEPLOYMENT_FAILED"
    app_id = failed.value.details["app_id"]

    with pytest.raises(DeploymentFailed) as waited:
        client.apps.wait_until_running(app_id, timeout=30)
    assert waited.value.status is None
    assert waited.value.details["app_id"] == app_id
    assert waited.value.details["kind"] == "image_missing"
    client.apps.stop(app_id, force=True)


# --- async client on the shared network -------------------------------------------------


async def test_async_status_info_nodes_and_data(network):
    async with AsyncVoxaClient(network.nodes[1].api_url) as client:
        health = await client.status.health()
        system = await client.status.system()
        version = await client.info.version()
        stats = await client.info.program_stats()
        check = await client.test.connection()
        listed = await client.nodes.discover(capability="app-deployment")

        key = f"async-key-{random.randrange(10**9)}"
        stored = await client.data.store(key, ["a", 1], ttl=120)
        value = await client.data.retrieve(key)
        with pytest.raises(NotFound):
            await client.data.retrieve(key + "-missing")

    assert health.status == "healthy"
    assert system.node_id == network.nodes[1].fetch_node_id()
    assert version.build_environment == "development"
    assert stats.runtime_info.process_id == network.nodes[1].pid
    assert check.success is True
    assert check.node_id == system.node_id
    assert listed.total_nodes == 3
    assert stored.storage_nodes
    assert value.value == ["a", 1]
    assert value.source_node == system.node_id


@pytest.mark.timeout(150)
async def test_async_app_lifecycle(network):
    marker = f"async-marker-{random.randrange(10**9)}"
    async with AsyncVoxaClient(network.nodes[2].api_url, retries=1, backoff=0.1) as client:
        async with asyncio.timeout(STREAM_SECONDS):
            async with client.events(types="app_deployed") as events:
                app = await client.apps.deploy("async-talker", TEST_IMAGE, 2, command=marker_command(marker), **HTTPD)
                async for event in events:
                    if event.subject.get("app_id") == app.id:
                        break
        assert event.type == "app_deployed"

        seen = []
        running = await client.apps.wait_until_running(app.id, timeout=RUNNING_SECONDS, on_progress=seen.append)
        assert running.replicas.running == 2
        assert seen[-1] is running
        listed = await client.apps.list(node_id=running.instances[0].node_id)
        assert app.id in [entry.id for entry in listed]
        status = await client.apps.get_status(app.id)
        assert status.name == "async-talker"

        marked = set()
        async with asyncio.timeout(STREAM_SECONDS):
            async with client.apps.logs(app.id, tail=10) as logs:
                async for entry in logs:
                    if marker in entry.message:
                        marked.add(entry.instance_id)
                    if len(marked) == 2:
                        break
        assert marked == {i.id for i in status.instances}

        scaled = await client.apps.scale(app.id, 3)
        assert (scaled.previous_replicas, scaled.new_replicas) == (2, 3)
        assert (await client.apps.wait_until_running(app.id, timeout=RUNNING_SECONDS)).replicas.running == 3

        with pytest.raises(Conflict):
            await client.apps.deploy("async-talker", TEST_IMAGE)
        with pytest.raises(InvalidRequest) as bad_port:
            await client.apps.deploy("async-bad", TEST_IMAGE, ports=[{"container_port": 70000}])
        assert bad_port.value.field == "ports[0].container_port"
        with pytest.raises(DeploymentFailed):
            await client.apps.deploy("async-ghost", MISSING_IMAGE)

        stopped = await client.apps.stop(app.id, force=True)
        assert stopped.instances_stopped == 3
        with pytest.raises(WaitTimeout):
            await client.apps.wait_until_running(app.id, timeout=10)


# --- authentication, rate limits, retries and unreachable nodes ----------------------------


def create_token(node, scope: str, name: str) -> str:
    """Create a token with `voxanode token create` in the node's data directory, and return it."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    environ["PYTHONPATH"] = str(REPO_DIR)
    completed = subprocess.run(
        [sys.executable, "-m", "voxanode", "token", "create", "--scope", scope, "--name", name,
         "--data-dir", str(node.data_dir)],
        env=environ, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.splitlines()[-1]


async def test_auth_errors_follow_token_scope(devnet_factory):
    node = devnet_factory(1, extra_args=["--no-dev"]).nodes[0]
    reader = create_token(node, "read", "client-reader")
    writer = create_token(node, "write", "client-writer")

    with VoxaClient(node.api_url) as client:
        assert client.status.health().status == "healthy"
        with pytest.raises(AuthenticationRequired) as anonymous:
            client.status.system()
        assert anonymous.value.status == 401
        with pytest.raises(AuthenticationRequired):
            client.events()

        client.authenticate(token=reader)
        assert NODE_ID_PATTERN.fullmatch(client.status.system().node_id)
        with client.events(types=["node_joined"]):
            pass
        with pytest.raises(AuthorizationFailed) as read_only:
            client.data.store("auth-key", {"n": 1}, replicas=1)
        assert read_only.value.status == 403
        assert read_only.value.code == "AUTHORIZATION_FAILED"

        client.authenticate(token=writer)
        assert client.data.store("auth-key", {"n": 1}, replicas=1).key == "auth-key"

    async with AsyncVoxaClient(node.api_url, token=reader) as async_client:
        assert (await async_client.data.retrieve("auth-key")).value == {"n": 1}
        with pytest.raises(AuthorizationFailed):
            await async_client.data.store("auth-key", 2)
        async_client.authenticate(None)
        with pytest.raises(AuthenticationRequired):
            await async_client.info.version()


async def test_rate_limited_carries_retry_after(devnet_factory):
    node = devnet_factory(1, extra_args=["--rate-limit-default", "3/minute"]).nodes[0]
    with VoxaClient(node.api_url, retries=0) as client:
        for _ in range(3):
            client.info.version()
        with pytest.raises(RateLimited) as limited:
            client.info.version()
    assert limited.value.status == 429
    assert limited.value.code == "RATE_LIMIT_EXCEEDED"
    assert 0 < limited.value.retry_after <= 60

    async with AsyncVoxaClient(node.api_url, retries=0) as async_client:
        with pytest.raises(RateLimited) as async_limited:
            await async_client.apps.list()
    assert 0 < async_limited.value.retry_after <= 60


def test_get_retry_honours_retry_after(devnet_factory, caplog):
    node = devnet_factory(1, extra_args=["--rate-limit-default", "2/5seconds"]).nodes[0]
    with VoxaClient(node.api_url, retries=0) as once:
        once.info.version()
        once.info.version()
        with pytest.raises(RateLimited):
            once.info.version()

    caplog.set_level(logging.INFO, logger="voxacommunications_client")
    with VoxaClient(node.api_url, retries=3, backoff=0.01, max_backoff=0.02) as client:
        started = time.monotonic()
        assert client.info.version().version
        elapsed = time.monotonic() - started

    messages = [record.getMessage() for record in caplog.records]
    retries = [message for message in messages if message.startswith("retrying GET")]
    assert retries, "the client did not retry the rate-limited GET"
    delays = [float(re.search(r" in ([0-9.]+) s ", message).group(1)) for message in retries]
    assert all("RATE_LIMIT_EXCEEDED" in message for message in retries)
    # The waits come from Retry-After (whole seconds), not from the 0.02 s backoff cap.
    assert all(delay >= 1 for delay in delays)
    assert elapsed >= sum(delays)


def responsible_node_index(devnet, name: str) -> int:
    """Return the index of the node responsible for app `name`: XOR-closest DHT id to SHA-1(name)."""
    target = int.from_bytes(hashlib.sha1(name.encode()).digest(), "big")
    distances = [int.from_bytes(Identity.load_or_create(node.data_dir).dht_id, "big") ^ target for node in devnet.nodes]
    return distances.index(min(distances))


@pytest.mark.timeout(120)
def test_post_add_app_not_retried_on_503(devnet_factory, test_image):
    devnet = devnet_factory(2, extra_args=list(APP_ARGS))
    entry, responsible = devnet.nodes
    try:
        node_ids = {node.fetch_node_id() for node in devnet.nodes}
        with VoxaClient(entry.api_url) as probe:
            assert wait_for(lambda: offers_apps(probe, node_ids), SETTLE_SECONDS) is True
        name = next(f"orphan-{n}" for n in range(1000) if responsible_node_index(devnet, f"orphan-{n}") == 1)

        # The deployments budget goes down by one per POST /apps/add_app/ the node receives.
        first = api_post(entry.api_url, "/apps/add_app/", {})
        responsible.kill()
        started = time.monotonic()
        with VoxaClient(entry.api_url, retries=3, backoff=0.01) as client:
            with pytest.raises(ServiceUnavailable) as unavailable:
                client.apps.deploy(name, TEST_IMAGE)
        elapsed = time.monotonic() - started
        last = api_post(entry.api_url, "/apps/add_app/", {})
    finally:
        remove_containers([node.data_dir for node in devnet.nodes])

    assert unavailable.value.status == 503
    assert unavailable.value.retry_after == UNREACHABLE_RESPONSIBLE_RETRY_AFTER_SECONDS
    assert elapsed < UNREACHABLE_RESPONSIBLE_RETRY_AFTER_SECONDS
    remaining_before = int(first.headers["X-RateLimit-Remaining"])
    remaining_after = int(last.headers["X-RateLimit-Remaining"])
    assert remaining_before - remaining_after == 2, "the client sent the failed POST more than once"


async def test_unreachable_and_frozen_nodes(devnet_factory):
    block = allocate_free_block(1, random.Random())
    nowhere = f"http://{block.first_address}:{block.api_port}"
    with VoxaClient(nowhere, retries=1, backoff=0.05) as client:
        with pytest.raises(NetworkError) as unreachable:
            client.status.health()
        with pytest.raises(NetworkError):
            client.events()
    assert not isinstance(unreachable.value, RequestTimeout)
    assert unreachable.value.url == nowhere + "/status/health"
    assert unreachable.value.status is None
    async with AsyncVoxaClient(nowhere, retries=0) as async_client:
        with pytest.raises(NetworkError):
            await async_client.data.store("k", 1)

    node = devnet_factory(1).nodes[0]
    node.freeze()
    try:
        with VoxaClient(node.api_url, timeout=0.5, retries=0) as client:
            started = time.monotonic()
            with pytest.raises(RequestTimeout) as frozen:
                client.info.version()
            assert time.monotonic() - started < 3
        async with AsyncVoxaClient(node.api_url, timeout=0.5, retries=0) as async_client:
            with pytest.raises(RequestTimeout):
                await async_client.apps.list()
    finally:
        node.thaw()
    assert isinstance(frozen.value, NetworkError)
    assert frozen.value.code == "REQUEST_TIMEOUT"
