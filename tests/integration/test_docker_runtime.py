"""DockerRuntime against the real Docker engine: limits, ports, node labels, stop, images, stats, logs.

Every container runs the local image voxanode-test/httpd:latest, which the session
fixture builds once with scripts/build-test-image. No test pulls from a real registry.
Missing images have local names, and registries are loopback addresses where nothing
listens. Each test gets runtimes with node ids of its own, and the fixture removes every
container with those node ids at teardown. A Docker engine that does not respond fails
the tests instead of skipping them.

Tests that must show which engine calls were made give the runtime the Unix socket of
`EngineRequestRecorder`, a pass-through proxy to the real engine that records each
request line. Closing the recorder and starting it again stands for an engine that
stops responding and comes back, for the runtime and for the node's `LocalAgent`.
"""

import asyncio
import contextlib
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import docker
import docker.errors
import pytest

from voxanode.apps.agent import LocalAgent
from voxanode.apps.catalogue import INSTANCE_FAILED, INSTANCE_RUNNING, PHASE_DEPLOYING, STATE_ACTIVE, AppRecord, Catalogue
from voxanode.apps.runtime import (
    LABEL_APP,
    LABEL_APP_NAME,
    LABEL_INSTANCE,
    LABEL_NODE,
    LABEL_RESTART,
    ContainerInfo,
    ContainerRequest,
    DockerRuntime,
    DockerRuntimeError,
    LogLine,
    container_name,
    registry_host,
)
from voxanode.apps.spec import AppSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-test-image"
TEST_IMAGE = "voxanode-test/httpd:latest"
MISSING_IMAGE = "voxanode-test/does-not-exist:1"
HOST_IP = "127.0.0.7"
OTHER_LOOPBACK_IP = "127.0.0.1"
HTTP_PORT = 8080
START_LINE = "voxanode-test httpd starting on port 8080"
INDEX_MARKER = b"voxanode-test httpd index"
BUILD_TIMEOUT_SECONDS = 120
WAIT_SECONDS = 15.0
POLL_SECONDS = 0.1
TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
FIVE_LINES_COMMAND = ["sh", "-c", "i=0; while [ $i -lt 5 ]; do echo line$i; i=$((i+1)); sleep 0.2; done"]
ENGINE_MISSING_MESSAGE = (
    "the Docker engine does not respond ({error}); these tests need a running engine. "
    "Start dockerd (for example `systemctl start docker`, or `dockerd &` as root) and rerun."
)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client():
    """A blocking SDK client for checks and cleanup; fails the tests when no engine responds."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.fail(ENGINE_MISSING_MESSAGE.format(error=error), pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_image(docker_client) -> str:
    """Build the test image once per session and return its id."""
    result = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS, check=False
    )
    assert result.returncode == 0, f"{BUILD_SCRIPT} failed:\n{result.stderr}"
    image_id = result.stdout.strip()
    assert image_id.startswith("sha256:"), result.stdout
    return image_id


def node_container_ids(client: docker.DockerClient, node_id: str) -> list[str]:
    """Return the ids of all containers labelled with `node_id`, in any state."""
    summaries = client.api.containers(all=True, filters={"label": f"{LABEL_NODE}={node_id}"})
    return [summary["Id"] for summary in summaries]


def remove_node_containers(client: docker.DockerClient, node_id: str) -> None:
    for container_id in node_container_ids(client, node_id):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(container_id, force=True, v=True)


RuntimeFactory = Callable[..., Awaitable[DockerRuntime]]


@pytest.fixture
async def runtime_factory(docker_client, test_image) -> AsyncIterator[RuntimeFactory]:
    """Start DockerRuntimes with unique node ids; at teardown close them and remove their containers."""
    runtimes: list[DockerRuntime] = []

    async def make(*, host_ip: str = HOST_IP, node_id: str | None = None, **options) -> DockerRuntime:
        runtime = DockerRuntime(node_id or f"test-node-{uuid.uuid4().hex[:12]}", host_ip, **options)
        runtimes.append(runtime)
        assert await runtime.start(), "DockerRuntime.start() found no Docker engine"
        return runtime

    try:
        yield make
    finally:
        for runtime in runtimes:
            await runtime.close()
        for runtime in runtimes:
            remove_node_containers(docker_client, runtime.node_id)


class EngineRequestRecorder:
    """Unix socket proxy to the Docker engine that records the request line of every HTTP request.

    Set `drop_reply_to` to a path fragment to lose the engine's reply to the next request
    whose path contains it: the proxy forwards the request, then closes the client's
    connection instead of forwarding the reply.
    """

    def __init__(self, engine_socket: str, listen_path: str) -> None:
        self.engine_socket = engine_socket
        self.listen_path = listen_path
        self.request_lines: list[str] = []
        self.drop_reply_to: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def base_url(self) -> str:
        return f"unix://{self.listen_path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=self.listen_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def paths_since(self, start: int) -> list[str]:
        """Return "METHOD /path" of the requests recorded after the first `start` ones, without query strings."""
        paths = []
        for line in self.request_lines[start:]:
            method, target, _ = line.split(" ", 2)
            paths.append(f"{method} {target.split('?', 1)[0]}")
        return paths

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        engine_reader, engine_writer = await asyncio.open_unix_connection(self.engine_socket)
        drop_reply = asyncio.Event()
        to_engine = asyncio.create_task(self._forward_requests(client_reader, engine_writer, drop_reply))
        to_client = asyncio.create_task(self._forward_replies(engine_reader, client_writer, drop_reply))
        self._tasks.update((to_engine, to_client))
        try:
            await asyncio.wait({to_engine, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_engine, to_client):
                task.cancel()
                self._tasks.discard(task)
            for writer in (engine_writer, client_writer):
                writer.close()

    async def _forward_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drop_reply: asyncio.Event
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.request_lines.append(request_line)
            if self.drop_reply_to is not None and self.drop_reply_to in request_line:
                self.drop_reply_to = None
                drop_reply.set()
            writer.write(head)
            headers = head.decode("latin-1").lower()
            assert "transfer-encoding: chunked" not in headers, (
                "the recorder does not parse chunked request bodies"
            )
            length_match = re.search(r"\r\ncontent-length: *(\d+)", headers)
            if length_match:
                writer.write(await reader.readexactly(int(length_match.group(1))))
            await writer.drain()

    @staticmethod
    async def _forward_replies(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drop_reply: asyncio.Event
    ) -> None:
        while chunk := await reader.read(65536):
            if drop_reply.is_set():
                return  # the caller closes both connections
            writer.write(chunk)
            await writer.drain()


def engine_socket_path() -> str:
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert docker_host.startswith("unix://"), (
        f"the request recorder needs a Unix socket DOCKER_HOST, got {docker_host}"
    )
    return docker_host.removeprefix("unix://")


@pytest.fixture
async def engine_recorder() -> AsyncIterator[EngineRequestRecorder]:
    # Unix socket paths are limited to 108 bytes, so the socket gets a short directory.
    with tempfile.TemporaryDirectory(prefix="voxa-recorder-") as directory:
        recorder = EngineRequestRecorder(engine_socket_path(), os.path.join(directory, "docker.sock"))
        await recorder.start()
        try:
            yield recorder
        finally:
            await recorder.close()


# --- helpers -----------------------------------------------------------------------------


def make_request(name: str = "web", **fields) -> ContainerRequest:
    values = {
        "app_id": f"app-{name}",
        "app_name": name,
        "instance_id": f"inst-{uuid.uuid4().hex[:8]}",
        "image": TEST_IMAGE,
        "ports": [(HTTP_PORT, "tcp")],
    }
    values.update(fields)
    return ContainerRequest(**values)


async def wait_for_state(runtime: DockerRuntime, container_id: str, state: str) -> ContainerInfo:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        info = await runtime.inspect(container_id)
        if info.state == state or time.monotonic() > deadline:
            return info
        await asyncio.sleep(POLL_SECONDS)


async def http_get(host: str, port: int) -> tuple[int, bytes]:
    """Send GET / over HTTP/1.0 and return the status code and body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), WAIT_SECONDS)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


async def http_get_when_listening(host: str, port: int) -> tuple[int, bytes]:
    """Retry GET / until the server in the container accepts connections."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            status, body = await http_get(host, port)
        except ConnectionError:
            status, body = 0, b""
        if status or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(POLL_SECONDS)


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 where nothing listens once this returns."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def warm_up_pool(runtime: DockerRuntime, container_id: str) -> None:
    """Grow the runtime's pool to all its workers, so that thread counts change only with stream threads."""
    await asyncio.gather(*(runtime.inspect(container_id) for _ in range(4 * runtime.workers)))


def stream_threads() -> list[str]:
    return [
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith(("voxa-logs-", "voxa-events-"))
    ]


async def wait_for_thread_count(expected: int) -> int:
    deadline = time.monotonic() + WAIT_SECONDS
    while threading.active_count() != expected and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    return threading.active_count()


async def collect_lines(lines: AsyncIterator[LogLine], into: list[LogLine]) -> None:
    async for line in lines:
        into.append(line)


async def wait_for_line(lines: list[LogLine], message: str) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while not any(line.message == message for line in lines):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True


# --- running containers ------------------------------------------------------------------


async def test_run_applies_limits_and_labels(runtime_factory, docker_client):
    runtime = await runtime_factory(pids_limit=64)
    request = make_request(
        memory_bytes=64 * 1024 * 1024,
        cpu=0.5,
        environment={"GREETING": "hello"},
        capabilities=["NET_BIND_SERVICE"],
        restart="on-failure",
    )

    info = await runtime.run(request)

    assert info.state == "running"
    assert info.node_id == runtime.node_id
    assert info.app_id == request.app_id
    assert info.instance_id == request.instance_id
    assert info.exit_code is None
    assert TIMESTAMP_PATTERN.fullmatch(info.created_at)
    assert TIMESTAMP_PATTERN.fullmatch(info.started_at or "")
    assert info.finished_at is None
    attrs = docker_client.api.inspect_container(info.container_id)
    host_config = attrs["HostConfig"]
    assert host_config["Memory"] == 64 * 1024 * 1024
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["CapDrop"] == ["ALL"]
    assert [cap.removeprefix("CAP_") for cap in host_config["CapAdd"]] == ["NET_BIND_SERVICE"]
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert host_config["Privileged"] is False
    assert host_config["PidsLimit"] == 64
    assert host_config["RestartPolicy"]["Name"] == "no"
    assert host_config["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m"}}
    assert host_config["ReadonlyRootfs"] is False
    assert not host_config.get("Init")
    assert attrs["Name"] == f"/voxa-web-{request.instance_id}"
    assert attrs["Config"]["Labels"][LABEL_NODE] == runtime.node_id
    assert attrs["Config"]["Labels"][LABEL_APP] == request.app_id
    assert attrs["Config"]["Labels"][LABEL_INSTANCE] == request.instance_id
    assert attrs["Config"]["Labels"][LABEL_APP_NAME] == "web"
    assert attrs["Config"]["Labels"][LABEL_RESTART] == "on-failure"
    assert "GREETING=hello" in attrs["Config"]["Env"]


async def test_run_publishes_port_on_host_ip_only(runtime_factory, docker_client):
    runtime = await runtime_factory()

    info = await runtime.run(make_request())

    host_port = info.host_ports[f"{HTTP_PORT}/tcp"]
    attrs = docker_client.api.inspect_container(info.container_id)
    assert attrs["HostConfig"]["PortBindings"] == {f"{HTTP_PORT}/tcp": [{"HostIp": HOST_IP, "HostPort": ""}]}
    assert attrs["NetworkSettings"]["Ports"][f"{HTTP_PORT}/tcp"] == [
        {"HostIp": HOST_IP, "HostPort": str(host_port)}
    ]
    status, body = await http_get_when_listening(HOST_IP, host_port)
    assert status == 200
    assert INDEX_MARKER in body
    with pytest.raises(ConnectionRefusedError):
        await http_get(OTHER_LOOPBACK_IP, host_port)

    # The start line goes to stdout, and httpd logs the request on stderr.
    lines = [line async for line in runtime.logs(info.container_id, tail=None, follow=False)]
    assert LogLine(lines[0].timestamp, "stdout", START_LINE) == lines[0]
    assert any(line.stream == "stderr" and "response:200" in line.message for line in lines), lines


async def test_list_own_sees_only_its_node(runtime_factory):
    first = await runtime_factory()
    second = await runtime_factory()

    first_info = await first.run(make_request("alpha"))
    second_infos = [await second.run(make_request("beta")) for _ in range(2)]

    first_listed = await first.list_own()
    second_listed = await second.list_own()
    assert [info.container_id for info in first_listed] == [first_info.container_id]
    assert {info.container_id for info in second_listed} == {info.container_id for info in second_infos}
    assert {info.node_id for info in first_listed} == {first.node_id}
    assert {info.node_id for info in second_listed} == {second.node_id}
    assert first_listed[0].state == "running"


async def test_other_node_container_is_not_found(runtime_factory, docker_client):
    owner = await runtime_factory()
    other = await runtime_factory()
    info = await owner.run(make_request())

    for operation in (
        other.inspect(info.container_id),
        other.stats(info.container_id),
        other.stop(info.container_id, timeout_seconds=1, force=True),
        anext(other.logs(info.container_id, tail=None, follow=False)),
    ):
        with pytest.raises(DockerRuntimeError) as raised:
            await operation
        assert raised.value.kind == "not_found"
        assert owner.node_id in raised.value.reason

    assert docker_client.api.inspect_container(info.container_id)["State"]["Running"] is True


async def test_list_own_includes_exited_containers(runtime_factory):
    runtime = await runtime_factory()

    info = await runtime.run(make_request(command=["sh", "-c", "exit 0"]))
    await wait_for_state(runtime, info.container_id, "exited")

    listed = await runtime.list_own()
    assert [(entry.container_id, entry.state, entry.exit_code) for entry in listed] == [
        (info.container_id, "exited", 0)
    ]


async def test_run_exiting_command_reports_exit_code(runtime_factory):
    runtime = await runtime_factory()

    info = await runtime.run(make_request(command=["sh", "-c", "echo bye; exit 3"]))

    final = await wait_for_state(runtime, info.container_id, "exited")
    assert final.state == "exited"
    assert final.exit_code == 3
    assert final.oom_killed is False
    assert TIMESTAMP_PATTERN.fullmatch(final.finished_at or "")
    assert final.host_ports == {}
    lines = [line async for line in runtime.logs(info.container_id, tail=None, follow=False)]
    assert [(line.stream, line.message) for line in lines] == [("stdout", "bye")]
    assert await runtime.stats(info.container_id) is None


async def test_run_start_failure_removes_container(runtime_factory, docker_client):
    runtime = await runtime_factory()

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.run(make_request(command=["/bin/no-such-binary"]))

    assert raised.value.kind == "start_failed"
    assert "no-such-binary" in raised.value.reason
    assert node_container_ids(docker_client, runtime.node_id) == []


async def test_run_name_conflict_is_start_failure(runtime_factory, docker_client):
    runtime = await runtime_factory()
    request = make_request()
    first = await runtime.run(request)

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.run(request)

    assert raised.value.kind == "start_failed"
    assert "already in use" in raised.value.reason
    assert node_container_ids(docker_client, runtime.node_id) == [first.container_id]


async def test_run_cancelled_leaves_no_container(runtime_factory, docker_client):
    runtime = await runtime_factory()
    finished_ids = []

    # Cancel at several points, from before the create call to after the start.
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5):
        task = asyncio.create_task(runtime.run(make_request()))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            info = await task
            finished_ids.append(info.container_id)

    deadline = time.monotonic() + WAIT_SECONDS
    while (
        set(node_container_ids(docker_client, runtime.node_id)) != set(finished_ids)
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(POLL_SECONDS)
    assert set(node_container_ids(docker_client, runtime.node_id)) == set(finished_ids)


# --- stopping ----------------------------------------------------------------------------


async def test_stop_graceful_sends_sigterm_and_removes(runtime_factory, docker_client):
    runtime = await runtime_factory()
    command = ["sh", "-c", "trap 'echo got-sigterm; exit 0' TERM; echo ready; while true; do sleep 0.1; done"]
    info = await runtime.run(make_request(command=command))
    lines: list[LogLine] = []
    follower = asyncio.create_task(
        collect_lines(runtime.logs(info.container_id, tail=None, follow=True), lines)
    )
    assert await wait_for_line(lines, "ready"), lines

    started = time.monotonic()
    await runtime.stop(info.container_id, timeout_seconds=10, force=False)
    elapsed = time.monotonic() - started

    assert elapsed < 5, f"stop took {elapsed:.1f} s, so SIGTERM was not handled"
    await asyncio.wait_for(follower, WAIT_SECONDS)
    assert [line.message for line in lines] == ["ready", "got-sigterm"]
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(info.container_id)
    assert await runtime.list_own() == []


async def test_stop_graceful_kills_after_timeout(runtime_factory, docker_client):
    runtime = await runtime_factory()
    info = await runtime.run(
        make_request(command=["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    )

    started = time.monotonic()
    await runtime.stop(info.container_id, timeout_seconds=1, force=False)
    elapsed = time.monotonic() - started

    assert 1 <= elapsed < 8
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(info.container_id)


async def test_stop_force_kills_and_removes(runtime_factory, docker_client):
    runtime = await runtime_factory()
    info = await runtime.run(
        make_request(command=["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    )

    started = time.monotonic()
    await runtime.stop(info.container_id, timeout_seconds=30, force=True)
    elapsed = time.monotonic() - started

    assert elapsed < 5
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(info.container_id)
    assert node_container_ids(docker_client, runtime.node_id) == []


async def test_stop_exited_and_missing_containers(runtime_factory, docker_client):
    runtime = await runtime_factory()
    info = await runtime.run(make_request(command=["sh", "-c", "exit 0"]))
    await wait_for_state(runtime, info.container_id, "exited")

    await runtime.stop(info.container_id, timeout_seconds=1, force=True)
    await runtime.stop(info.container_id, timeout_seconds=1, force=False)
    await runtime.stop("0" * 64, timeout_seconds=1, force=True)

    assert node_container_ids(docker_client, runtime.node_id) == []
    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.inspect(info.container_id)
    assert raised.value.kind == "not_found"


# --- images ------------------------------------------------------------------------------


async def test_ensure_image_returns_local_id(runtime_factory, test_image):
    runtime = await runtime_factory()

    assert await runtime.ensure_image(TEST_IMAGE) == test_image
    assert await runtime.ensure_image(test_image) == test_image


async def test_missing_image_with_never_policy_is_not_pulled(runtime_factory, engine_recorder, docker_client):
    # No registry is allowed either, so a broken pull policy cannot send a pull to Docker Hub.
    runtime = await runtime_factory(base_url=engine_recorder.base_url, pull_policy="never")
    first_request = len(engine_recorder.request_lines)

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.run(make_request(image=MISSING_IMAGE))

    assert raised.value.kind == "image_missing"
    assert MISSING_IMAGE in raised.value.reason
    paths = engine_recorder.paths_since(first_request)
    assert paths, "the runtime did not look for the image"
    assert all(path.startswith("GET ") and path.endswith("/json") for path in paths), paths
    assert not any("/images/create" in path or "/containers/create" in path for path in paths), paths
    assert node_container_ids(docker_client, runtime.node_id) == []


async def test_run_lost_create_reply_removes_container(runtime_factory, engine_recorder, docker_client):
    runtime = await runtime_factory(base_url=engine_recorder.base_url)
    engine_recorder.drop_reply_to = "/containers/create"
    first_request = len(engine_recorder.request_lines)

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.run(make_request())

    assert raised.value.kind == "engine_unavailable"
    paths = engine_recorder.paths_since(first_request)
    assert any(path.endswith("/containers/create") for path in paths), paths
    assert any(path.startswith("GET ") and "/containers/voxa-web-inst-" in path for path in paths), paths
    assert any(path.startswith("DELETE ") and "/containers/" in path for path in paths), paths
    assert node_container_ids(docker_client, runtime.node_id) == []


@pytest.mark.parametrize("pull_policy", ["if-not-present", "always"])
async def test_registry_not_allowed_before_pull(runtime_factory, engine_recorder, pull_policy):
    image = f"127.0.0.1:{free_loopback_port()}/voxanode-test/absent:1"
    runtime = await runtime_factory(
        base_url=engine_recorder.base_url, pull_policy=pull_policy, allowed_registries=["127.0.0.2:5000"]
    )
    first_request = len(engine_recorder.request_lines)

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.ensure_image(image)

    assert raised.value.kind == "registry_not_allowed"
    assert "127.0.0.1:" in raised.value.reason
    paths = engine_recorder.paths_since(first_request)
    assert not any("/images/create" in path for path in paths), paths
    if pull_policy == "always":
        assert paths == []
    else:
        assert len(paths) == 1, paths
        assert paths[0].startswith("GET "), paths
        assert paths[0].endswith("/json"), paths


async def test_no_allowed_registry_rejects_every_pull(runtime_factory, engine_recorder):
    # A loopback registry, so that a broken check makes the engine connect only to this machine.
    image = f"127.0.0.1:{free_loopback_port()}/voxanode-test/absent:1"
    runtime = await runtime_factory(base_url=engine_recorder.base_url, pull_policy="if-not-present")
    first_request = len(engine_recorder.request_lines)

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.ensure_image(image)

    assert raised.value.kind == "registry_not_allowed"
    assert "allowed: none" in raised.value.reason
    assert not any("/images/create" in path for path in engine_recorder.paths_since(first_request))


async def test_pull_from_unreachable_registry_is_refused(runtime_factory, engine_recorder):
    registry = f"127.0.0.1:{free_loopback_port()}"
    runtime = await runtime_factory(
        base_url=engine_recorder.base_url, pull_policy="if-not-present", allowed_registries=[registry]
    )
    first_request = len(engine_recorder.request_lines)

    with pytest.raises(DockerRuntimeError) as raised:
        await runtime.ensure_image(f"{registry}/voxanode-test/absent:1")

    assert raised.value.kind == "pull_refused"
    assert registry in raised.value.reason
    assert any(
        path.startswith("POST ") and path.endswith("/images/create")
        for path in engine_recorder.paths_since(first_request)
    )


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("busybox", "docker.io"),
        ("library/busybox:1.36", "docker.io"),
        ("voxanode-test/httpd:latest", "docker.io"),
        ("docker.io/library/busybox", "docker.io"),
        ("index.docker.io/library/busybox", "docker.io"),
        ("ghcr.io/owner/app:1", "ghcr.io"),
        ("localhost/app", "localhost"),
        ("127.0.0.1:5000/app:1", "127.0.0.1:5000"),
        ("Registry.Example/app", "registry.example"),
        ("ghcr.io/owner/app@sha256:" + "a" * 64, "ghcr.io"),
    ],
)
def test_registry_host_of_reference(reference, expected):
    assert registry_host(reference) == expected


@pytest.mark.parametrize(
    ("app_name", "instance_id", "expected"),
    [
        ("web", "inst-1", "voxa-web-inst-1"),
        ("My App!", "inst-1", "voxa-My-App-inst-1"),
        ("a" * 100, "inst-1", "voxa-" + "a" * 51 + "-inst-1"),
        ("web", "i" * 70, "voxa-" + "i" * 58),
    ],
)
def test_container_name_of_instance(app_name, instance_id, expected):
    name = container_name(app_name, instance_id)

    assert name == expected
    assert len(name) <= 63


# --- stats -------------------------------------------------------------------------------


async def test_stats_of_running_container(runtime_factory):
    runtime = await runtime_factory()
    info = await runtime.run(make_request(memory_bytes=64 * 1024 * 1024))
    status, _ = await http_get_when_listening(HOST_IP, info.host_ports[f"{HTTP_PORT}/tcp"])
    assert status == 200

    stats = await runtime.stats(info.container_id)

    assert stats is not None
    assert 0 < stats.memory_mb < 64
    assert stats.cpu_percent >= 0
    assert stats.network_rx_bytes > 0
    assert stats.network_tx_bytes > 0


# --- logs --------------------------------------------------------------------------------


async def test_logs_tail_returns_last_lines(runtime_factory):
    runtime = await runtime_factory()
    info = await runtime.run(make_request(command=FIVE_LINES_COMMAND))
    await wait_for_state(runtime, info.container_id, "exited")

    last_two = [line async for line in runtime.logs(info.container_id, tail=2, follow=False)]
    everything = [line async for line in runtime.logs(info.container_id, tail=None, follow=False)]

    assert [line.message for line in last_two] == ["line3", "line4"]
    assert [line.message for line in everything] == [f"line{i}" for i in range(5)]
    assert {line.stream for line in everything} == {"stdout"}
    assert all(TIMESTAMP_PATTERN.fullmatch(line.timestamp) for line in everything), everything
    assert [line.timestamp for line in everything] == sorted(line.timestamp for line in everything)


async def test_logs_since_skips_older_lines(runtime_factory):
    runtime = await runtime_factory()
    info = await runtime.run(make_request(command=FIVE_LINES_COMMAND))
    await wait_for_state(runtime, info.container_id, "exited")
    everything = [line async for line in runtime.logs(info.container_id, tail=None, follow=False)]
    since = (
        datetime.strptime(everything[2].timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    )

    later = [line async for line in runtime.logs(info.container_id, tail=None, follow=False, since=since)]

    assert [line.message for line in later] == ["line2", "line3", "line4"]


async def test_logs_split_streams_and_replace_invalid_utf8(runtime_factory):
    runtime = await runtime_factory()
    command = ["sh", "-c", r"echo out; echo err >&2; printf '\377bad\n'; printf 'no newline'"]
    info = await runtime.run(make_request(command=command))
    await wait_for_state(runtime, info.container_id, "exited")

    lines = [line async for line in runtime.logs(info.container_id, tail=None, follow=False)]

    stdout = [line.message for line in lines if line.stream == "stdout"]
    stderr = [line.message for line in lines if line.stream == "stderr"]
    assert stdout == ["out", "\ufffdbad", "no newline"]
    assert stderr == ["err"]


async def test_logs_of_missing_container_not_found(runtime_factory):
    runtime = await runtime_factory()

    with pytest.raises(DockerRuntimeError) as raised:
        async for _ in runtime.logs("0" * 64, tail=None, follow=True):
            pass

    assert raised.value.kind == "not_found"


async def test_logs_follow_ends_when_container_exits(runtime_factory):
    runtime = await runtime_factory(workers=2)
    info = await runtime.run(make_request(command=FIVE_LINES_COMMAND))
    await warm_up_pool(runtime, info.container_id)
    threads_before = threading.active_count()

    lines: list[LogLine] = []
    await asyncio.wait_for(
        collect_lines(runtime.logs(info.container_id, tail=None, follow=True), lines), WAIT_SECONDS
    )

    assert [line.message for line in lines] == [f"line{i}" for i in range(5)]
    assert (await runtime.inspect(info.container_id)).state == "exited"
    assert stream_threads() == []
    assert await wait_for_thread_count(threads_before) == threads_before


async def test_logs_follow_aclose_frees_thread(runtime_factory):
    runtime = await runtime_factory(workers=2)
    info = await runtime.run(make_request())
    await warm_up_pool(runtime, info.container_id)
    threads_before = threading.active_count()

    lines = runtime.logs(info.container_id, tail=None, follow=True)
    first = await asyncio.wait_for(anext(lines), WAIT_SECONDS)
    assert first.message == START_LINE
    assert stream_threads() == [f"voxa-logs-{info.container_id[:12]}"]
    await lines.aclose()

    assert stream_threads() == []
    assert threading.active_count() == threads_before
    assert (await runtime.inspect(info.container_id)).state == "running"


async def test_logs_follow_cancel_frees_thread(runtime_factory):
    runtime = await runtime_factory(workers=2)
    info = await runtime.run(make_request())
    await warm_up_pool(runtime, info.container_id)
    threads_before = threading.active_count()

    lines: list[LogLine] = []
    follower = asyncio.create_task(
        collect_lines(runtime.logs(info.container_id, tail=None, follow=True), lines)
    )
    assert await wait_for_line(lines, START_LINE), lines
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower

    assert stream_threads() == []
    assert await wait_for_thread_count(threads_before) == threads_before


async def test_close_ends_open_log_stream(runtime_factory):
    runtime = await runtime_factory()
    info = await runtime.run(make_request())
    lines: list[LogLine] = []
    follower = asyncio.create_task(
        collect_lines(runtime.logs(info.container_id, tail=None, follow=True), lines)
    )
    assert await wait_for_line(lines, START_LINE), lines

    await runtime.close()

    await asyncio.wait_for(follower, WAIT_SECONDS)
    assert stream_threads() == []
    assert runtime.available is False


# --- events ------------------------------------------------------------------------------


async def test_events_report_own_containers_only(runtime_factory):
    runtime = await runtime_factory()
    other = await runtime_factory()
    subscribed_at = time.time()
    other_info = await other.run(make_request("other", command=["sh", "-c", "exit 0"]))
    await wait_for_state(other, other_info.container_id, "exited")

    events: list[dict] = []

    async def collect_until_die(container_id: str) -> None:
        async with contextlib.aclosing(runtime.events(since=subscribed_at)) as stream:
            async for event in stream:
                events.append(event)
                if event["Actor"]["ID"] == container_id and event["Action"] == "die":
                    return

    info = await runtime.run(make_request(command=["sh", "-c", "exit 4"]))
    await asyncio.wait_for(collect_until_die(info.container_id), WAIT_SECONDS)

    assert [event["Action"] for event in events] == ["start", "die"]
    assert {event["Actor"]["ID"] for event in events} == {info.container_id}
    assert events[1]["Actor"]["Attributes"]["exitCode"] == "4"
    assert events[1]["Actor"]["Attributes"][LABEL_NODE] == runtime.node_id
    assert stream_threads() == []


async def test_close_ends_event_stream(runtime_factory):
    runtime = await runtime_factory()
    events: list[dict] = []

    async def collect_all() -> None:
        async for event in runtime.events():
            events.append(event)

    collector = asyncio.create_task(collect_all())
    await asyncio.sleep(0.5)
    assert stream_threads() == [f"voxa-events-{runtime.node_id}"]

    await runtime.close()

    await asyncio.wait_for(collector, WAIT_SECONDS)
    assert events == []
    assert stream_threads() == []


# --- engine unavailable ------------------------------------------------------------------


async def test_start_without_engine_returns_false(docker_client):
    with tempfile.TemporaryDirectory(prefix="voxa-noengine-") as directory:
        runtime = DockerRuntime("test-node-noengine", HOST_IP, base_url=f"unix://{directory}/absent.sock")
        try:
            assert await runtime.start() is False
            assert runtime.available is False
            with pytest.raises(DockerRuntimeError) as raised:
                await runtime.ensure_image(TEST_IMAGE)
            assert raised.value.kind == "engine_unavailable"
        finally:
            await runtime.close()


async def test_start_pings_again_after_the_engine_was_lost(runtime_factory, engine_recorder, caplog):
    runtime = await runtime_factory(base_url=engine_recorder.base_url)
    # Closing the recorder cuts the runtime off the engine, as a stopped dockerd does.
    await engine_recorder.close()

    with caplog.at_level(logging.DEBUG, logger="voxanode.apps.runtime"):
        with pytest.raises(DockerRuntimeError) as raised:
            await runtime.list_own()
        assert raised.value.kind == "engine_unavailable"
        assert runtime.available is False
        for _ in range(3):
            assert await runtime.start() is False
        assert await runtime.ping() is False
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "lost the Docker engine" in warnings[0]
    assert runtime.unavailable_reason

    await engine_recorder.start()
    assert await runtime.start() is True
    assert runtime.available is True
    assert await runtime.list_own() == []


async def test_agent_reports_instances_failed_while_engine_lost(runtime_factory, engine_recorder, tmp_path):
    runtime = await runtime_factory(base_url=engine_recorder.base_url)
    catalogue = Catalogue(tmp_path / "apps.sqlite3")
    catalogue.open()
    report_changes = []
    agent = LocalAgent(runtime.node_id, catalogue, runtime, HOST_IP, lambda: report_changes.append(True))
    spec = AppSpec.from_dict({"name": "engine-loss", "image": TEST_IMAGE, "replicas": 1, "ports": [{"container_port": HTTP_PORT}]})
    now = time.time()
    record = AppRecord(
        app_id="app-0123456789ab", name="engine-loss", spec=spec, desired=1, state=STATE_ACTIVE,
        phase=PHASE_DEPLOYING, assignments={"inst-000000000001": runtime.node_id}, created_at=now,
        updated_at=now, version=1, writer=runtime.node_id,
    )
    try:
        catalogue.merge_app(record)
        await agent.converge()
        assert agent.report().instances["inst-000000000001"].status == INSTANCE_RUNNING

        await engine_recorder.close()
        await agent.converge()
        assert runtime.available is False
        # Until the controller reports the engine lost, a failed listing changes nothing.
        assert agent.report().instances["inst-000000000001"].status == INSTANCE_RUNNING
        await agent.engine_lost(runtime.unavailable_reason)
        lost = agent.report().instances["inst-000000000001"]
        assert (lost.status, lost.error_kind) == (INSTANCE_FAILED, "engine_unavailable")
        assert f"the Docker engine of node {runtime.node_id} is not reachable" in lost.error
        assert report_changes

        # An instance assigned while the engine is away is reported failed at once.
        grown = replace(
            record, desired=2, version=2,
            assignments={**record.assignments, "inst-000000000002": runtime.node_id},
        )
        catalogue.merge_app(grown)
        await agent.converge()
        added = agent.report().instances["inst-000000000002"]
        assert (added.status, added.error_kind) == (INSTANCE_FAILED, "engine_unavailable")

        # Here the engine itself kept running, as with live restore: the container is
        # adopted again. The instance that never started stays failed for the
        # responsible node to replace.
        await engine_recorder.start()
        assert await runtime.start() is True
        agent.engine_regained()
        await agent.converge()
        assert agent.report().instances["inst-000000000001"].status == INSTANCE_RUNNING
        assert agent.report().instances["inst-000000000002"].status == INSTANCE_FAILED
    finally:
        await agent.close()
        catalogue.close()
