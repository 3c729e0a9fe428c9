"""Docker runtime of a node: the containers that run its app instances.

`DockerRuntime` owns every call this node makes to the Docker Engine. The `docker` SDK
is blocking, so each call runs in a bounded ThreadPoolExecutor through
`loop.run_in_executor`, and no SDK call runs on the event loop's thread. Log and event
streams can stay open for hours, so each of them gets a thread of its own instead of a
pool worker. The thread hands items to the event loop through a bounded queue and ends
when the consumer stops iterating.

Several nodes can share one engine. Every container carries the labels LABEL_NODE,
LABEL_APP, LABEL_INSTANCE and LABEL_APP_NAME, and a runtime lists, inspects, stops and
streams only containers with its own node id. Containers run unprivileged with all capabilities dropped except the
requested ones, `no-new-privileges`, a pids limit, no restart policy (the app
controller replaces crashed instances itself) and ports published on the node's host
address only, on host ports that Docker chooses.

Images are pulled only as the pull policy allows, and only from allowed registries. The
registry check runs before any engine call that could pull.
"""

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import re
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker.types import CancellableStream, LogConfig
from prometheus_client import Histogram

LABEL_NODE = "io.voxanode.node-id"
LABEL_APP = "io.voxanode.app-id"
LABEL_INSTANCE = "io.voxanode.instance-id"
LABEL_APP_NAME = "io.voxanode.app-name"
# The restart setting of the app spec, recorded for the controller. Docker's own restart
# policy is always "no".
LABEL_RESTART = "io.voxanode.restart"

PULL_POLICIES = ("never", "if-not-present", "always")
RESTART_SETTINGS = ("always", "on-failure", "never")
PORT_PROTOCOLS = ("tcp", "udp")
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

DEFAULT_WORKERS = 4
DEFAULT_PIDS_LIMIT = 256
DEFAULT_MAX_STREAMS = 64
API_TIMEOUT_SECONDS = 60
CLOSE_TIMEOUT_SECONDS = 30.0
STREAM_CLOSE_TIMEOUT_SECONDS = 5.0
# The stream thread signals its exit as its last step, so joining it only waits for the return.
STREAM_JOIN_SECONDS = 1.0
NANO_CPUS_PER_CORE = 1_000_000_000
BYTES_PER_MEBIBYTE = 1024 * 1024
LOG_MAX_SIZE = "10m"
MAX_CONTAINER_NAME_CHARS = 63
MAX_REASON_CHARS = 300
# Log lines buffered between a stream thread and its consumer before the thread waits.
LOG_QUEUE_LINES = 1000
EVENT_QUEUE_SIZE = 256
# Docker's log copier (moby daemon/logger/copier.go, defaultBufSize) splits lines above
# 16 KiB into partial messages. They are joined up to this size, and anything beyond it
# is sent as a further LogLine.
MAX_LOG_LINE_BYTES = 256 * 1024
# A frame of the multiplexed log stream is one log message plus its timestamp.
MAX_LOG_FRAME_BYTES = 1024 * 1024
STREAM_HEADER_BYTES = 8
STREAM_TYPES = {1: "stdout", 2: "stderr"}
STREAM_TYPE_SYSTEM_ERROR = 3
EVENT_ACTIONS = ("start", "die", "oom", "health_status")
# Docker reports times that never happened (a container never started) as year 1.
ZERO_TIME_PREFIX = "0001-01-01T"
TIMESTAMP_PATTERN = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")
NAME_UNSAFE_PATTERN = re.compile(r"[^a-zA-Z0-9_.-]+")
# Upper bounds of the Docker call latency buckets: from an inspect of a few
# milliseconds to an image pull of minutes.
DOCKER_CALL_BUCKETS_SECONDS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class ErrorKind(StrEnum):
    """Condition behind a DockerRuntimeError. The values are the strings in `.kind`."""

    IMAGE_MISSING = "image_missing"
    PULL_REFUSED = "pull_refused"
    REGISTRY_NOT_ALLOWED = "registry_not_allowed"
    START_FAILED = "start_failed"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    NOT_FOUND = "not_found"
    # Any other error the engine returned, for example while stopping or inspecting.
    ENGINE_ERROR = "engine_error"
    # More log or event streams are open than the runtime's max_streams.
    TOO_MANY_STREAMS = "too_many_streams"


class DockerRuntimeError(Exception):
    """A Docker operation failed. `kind` is an ErrorKind value, `reason` Docker's short message."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class ContainerRequest:
    """One app instance to start. `cpu` is in cores and `memory_bytes` in bytes; None means no limit.

    `ports` lists (container port, "tcp" or "udp"). `restart` is the app's restart
    setting ("always", "on-failure" or "never"). It is only recorded in a label, because
    the controller replaces crashed instances itself.
    """

    app_id: str
    app_name: str
    instance_id: str
    image: str
    memory_bytes: int | None = None
    cpu: float | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    ports: Sequence[tuple[int, str]] = ()
    command: Sequence[str] | None = None
    capabilities: Sequence[str] = ()
    restart: str = "never"

    def __post_init__(self) -> None:
        for name in ("app_id", "app_name", "instance_id", "image"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if self.cpu is not None and not self.cpu > 0:
            raise ValueError(f"cpu must be a positive number of cores, got {self.cpu}")
        for port, protocol in self.ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"container port must be in 1..65535, got {port}")
            if protocol not in PORT_PROTOCOLS:
                raise ValueError(f"port protocol must be tcp or udp, got {protocol!r}")
        if self.restart not in RESTART_SETTINGS:
            raise ValueError(f"restart must be one of {', '.join(RESTART_SETTINGS)}, got {self.restart!r}")


@dataclass(frozen=True)
class ContainerInfo:
    """State of one container, from `docker inspect`.

    `state` is Docker's State.Status (created, running, paused, restarting, removing,
    exited or dead). `exit_code` is set only for exited and dead containers. Times are
    ISO-8601 UTC with microseconds, and None for a start or finish that never happened.
    `host_ports` maps "8080/tcp" to the published host port while the container runs.
    """

    container_id: str
    app_id: str
    instance_id: str
    node_id: str
    state: str
    exit_code: int | None
    error: str | None
    started_at: str | None
    finished_at: str | None
    created_at: str
    oom_killed: bool
    host_ports: dict[str, int]
    health: str | None


@dataclass(frozen=True)
class ContainerStats:
    """One resource sample of a running container, computed as `docker stats` does.

    `cpu_percent` is relative to one core (two busy cores give 200). `memory_mb` is the
    usage in mebibytes without the inactive page cache. The network counters are totals
    over all interfaces since the container started.
    """

    cpu_percent: float
    memory_mb: float
    network_rx_bytes: int
    network_tx_bytes: int


@dataclass(frozen=True)
class LogLine:
    """One line a container printed, without its newline. `timestamp` is ISO-8601 UTC."""

    timestamp: str
    stream: str
    message: str


# --- pure helpers ----------------------------------------------------------------------


def registry_host(reference: str) -> str:
    """Return the registry host of an image reference; Docker Hub is "docker.io".

    Follows Docker's rule: the part before the first "/" names a registry when it
    contains "." or ":", is "localhost", or has upper-case letters.
    """
    name = reference.split("@", 1)[0]
    first, slash, _ = name.partition("/")
    if not slash:
        return DOCKER_HUB
    if "." in first or ":" in first or first == "localhost" or first.lower() != first:
        host = first.lower()
        return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host
    return DOCKER_HUB


def normalize_registry(host: str) -> str:
    """Return `host` in the form registry_host() returns, so aliases of Docker Hub compare equal."""
    host = host.strip().lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def split_reference(reference: str) -> tuple[str, str]:
    """Split an image reference into repository and tag or digest; the tag defaults to "latest"."""
    repository, tag = docker.utils.parse_repository_tag(reference)
    return repository, tag or "latest"


def container_name(app_name: str, instance_id: str) -> str:
    """Return `voxa-<app name>-<instance id>`, at most 63 characters, valid as a Docker name.

    Characters Docker rejects become "-". The app name is shortened first, so the
    instance id, which makes the name unique, stays whole when it fits.
    """
    safe_app = NAME_UNSAFE_PATTERN.sub("-", app_name).strip("-._") or "app"
    safe_instance = NAME_UNSAFE_PATTERN.sub("-", instance_id).strip("-._") or "instance"
    room_for_app = MAX_CONTAINER_NAME_CHARS - len("voxa--") - len(safe_instance)
    if room_for_app < 1:
        return f"voxa-{safe_instance}"[:MAX_CONTAINER_NAME_CHARS]
    return f"voxa-{safe_app[:room_for_app]}-{safe_instance}"


def normalize_timestamp(value: str | None) -> str | None:
    """Convert a Docker RFC 3339 time to `YYYY-MM-DDTHH:MM:SS.ffffffZ`; None for Docker's zero time."""
    if not value or value.startswith(ZERO_TIME_PREFIX):
        return None
    match = TIMESTAMP_PATTERN.fullmatch(value.strip())
    if match is None:
        return value
    seconds, fraction, offset = match.groups()
    micros = (fraction or "").ljust(6, "0")[:6]
    if offset == "Z":
        return f"{seconds}.{micros}Z"
    moment = datetime.fromisoformat(f"{seconds}.{micros}{offset}").astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_host_ports(ports: Mapping[str, Any] | None) -> dict[str, int]:
    """Map "8080/tcp" to its host port from NetworkSettings.Ports; unpublished ports are left out."""
    host_ports: dict[str, int] = {}
    for container_port, bindings in (ports or {}).items():
        for binding in bindings or ():
            host_port = binding.get("HostPort")
            if host_port:
                host_ports[container_port] = int(host_port)
                break
    return host_ports


def parse_container_info(attrs: Mapping[str, Any]) -> ContainerInfo:
    """Build a ContainerInfo from the output of `docker inspect` for one container."""
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    state = attrs.get("State") or {}
    status = state.get("Status", "unknown")
    exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
    network_settings = attrs.get("NetworkSettings") or {}
    return ContainerInfo(
        container_id=attrs["Id"],
        app_id=labels.get(LABEL_APP, ""),
        instance_id=labels.get(LABEL_INSTANCE, ""),
        node_id=labels.get(LABEL_NODE, ""),
        state=status,
        exit_code=exit_code,
        error=state.get("Error") or None,
        started_at=normalize_timestamp(state.get("StartedAt")),
        finished_at=normalize_timestamp(state.get("FinishedAt")),
        created_at=normalize_timestamp(attrs.get("Created")) or "",
        oom_killed=bool(state.get("OOMKilled", False)),
        host_ports=parse_host_ports(network_settings.get("Ports")),
        health=(state.get("Health") or {}).get("Status") or None,
    )


def compute_stats(raw: Mapping[str, Any]) -> ContainerStats | None:
    """Compute a ContainerStats from one Docker stats sample; None when the sample is empty.

    CPU and memory follow the docker CLI (cli/command/container/stats_helpers.go): the CPU
    share is the container's usage delta over the host's delta, times the online CPUs.
    Memory leaves out inactive page cache.
    """
    if str(raw.get("read", "")).startswith(ZERO_TIME_PREFIX):
        return None
    cpu_stats = raw.get("cpu_stats") or {}
    precpu_stats = raw.get("precpu_stats") or {}
    cpu_usage = cpu_stats.get("cpu_usage") or {}
    cpu_delta = cpu_usage.get("total_usage", 0) - (precpu_stats.get("cpu_usage") or {}).get("total_usage", 0)
    system_delta = cpu_stats.get("system_cpu_usage", 0) - precpu_stats.get("system_cpu_usage", 0)
    online_cpus = cpu_stats.get("online_cpus") or len(cpu_usage.get("percpu_usage") or ()) or 1
    cpu_percent = 0.0
    if cpu_delta > 0 and system_delta > 0:
        cpu_percent = cpu_delta / system_delta * online_cpus * 100.0

    memory = raw.get("memory_stats") or {}
    details = memory.get("stats") or {}
    # cgroup v1 reports total_inactive_file, cgroup v2 inactive_file.
    inactive_file = details.get("total_inactive_file", details.get("inactive_file", 0))
    usage = memory.get("usage", 0)
    memory_bytes = usage - inactive_file if inactive_file < usage else usage

    networks = (raw.get("networks") or {}).values()
    return ContainerStats(
        cpu_percent=cpu_percent,
        memory_mb=memory_bytes / BYTES_PER_MEBIBYTE,
        network_rx_bytes=sum(int(counters.get("rx_bytes", 0)) for counters in networks),
        network_tx_bytes=sum(int(counters.get("tx_bytes", 0)) for counters in networks),
    )


def short_reason(error: BaseException) -> str:
    """Return Docker's message for `error` on one line, cut to MAX_REASON_CHARS."""
    if isinstance(error, docker.errors.APIError) and error.explanation:
        text = str(error.explanation)
    else:
        text = str(error) or type(error).__name__
    text = " ".join(text.split())
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3] + "..."
    return text


def translate_error(error: BaseException, default_kind: ErrorKind) -> DockerRuntimeError:
    """Map an SDK or transport exception to a DockerRuntimeError; other API errors get `default_kind`."""
    if isinstance(error, DockerRuntimeError):
        return error
    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return DockerRuntimeError(ErrorKind.ENGINE_UNAVAILABLE, short_reason(error))
    if isinstance(error, docker.errors.ImageNotFound):
        return DockerRuntimeError(ErrorKind.IMAGE_MISSING, short_reason(error))
    if isinstance(error, docker.errors.NotFound):
        return DockerRuntimeError(ErrorKind.NOT_FOUND, short_reason(error))
    return DockerRuntimeError(default_kind, short_reason(error))


# --- log stream decoding ---------------------------------------------------------------


class LogLineAssembler:
    """Turns frames of a `docker logs --timestamps` stream into LogLines, one per line.

    Each frame is one log message and starts with its timestamp. Docker splits long lines
    into partial messages without a trailing newline, so a partial message is kept until
    the rest of its line arrives, and the line carries the timestamp of its first part.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[str, bytearray]] = {}

    def add_frame(self, stream: str, payload: bytes) -> list[LogLine]:
        """Return the lines that `payload` completes on `stream`."""
        raw_timestamp, _, text = payload.partition(b" ")
        timestamp = normalize_timestamp(raw_timestamp.decode("ascii", "replace")) or ""
        pending = self._pending.pop(stream, None)
        if pending is None:
            line_timestamp, buffer = timestamp, bytearray(text)
        else:
            line_timestamp, buffer = pending
            buffer += text

        *complete, rest = bytes(buffer).split(b"\n")
        lines = [self._line(line_timestamp, stream, raw) for raw in complete]
        if complete:
            line_timestamp = timestamp
        while len(rest) >= MAX_LOG_LINE_BYTES:
            lines.append(self._line(line_timestamp, stream, rest[:MAX_LOG_LINE_BYTES]))
            rest = rest[MAX_LOG_LINE_BYTES:]
        if rest:
            self._pending[stream] = (line_timestamp, bytearray(rest))
        return lines

    def flush(self) -> list[LogLine]:
        """Return the unfinished lines of every stream, at the end of the log stream."""
        lines = [
            self._line(timestamp, stream, bytes(buffer))
            for stream, (timestamp, buffer) in self._pending.items()
        ]
        self._pending.clear()
        return lines

    @staticmethod
    def _line(timestamp: str, stream: str, raw: bytes) -> LogLine:
        return LogLine(timestamp=timestamp, stream=stream, message=raw.decode("utf-8", errors="replace"))


def read_exactly(raw: Any, size: int) -> bytes:
    """Read `size` bytes from a urllib3 response; fewer only at the end of the stream."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = raw.read(size - len(chunks))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


def iter_log_lines(raw: Any, container_id: str) -> Iterator[LogLine]:
    """Decode the multiplexed log stream of a container without a TTY into LogLines.

    Each frame has an 8-byte header: the stream type (1 stdout, 2 stderr, 3 an error of
    the daemon) and the payload length as a big-endian uint32.
    """
    assembler = LogLineAssembler()
    while True:
        header = read_exactly(raw, STREAM_HEADER_BYTES)
        if len(header) < STREAM_HEADER_BYTES:
            break
        stream_type, length = struct.unpack(">BxxxL", header)
        if length > MAX_LOG_FRAME_BYTES:
            raise DockerRuntimeError(
                ErrorKind.ENGINE_ERROR,
                f"log frame of {length} bytes from container {container_id[:12]} exceeds {MAX_LOG_FRAME_BYTES}",
            )
        payload = read_exactly(raw, length)
        if stream_type == STREAM_TYPE_SYSTEM_ERROR:
            message = payload.decode("utf-8", errors="replace").strip()
            raise DockerRuntimeError(ErrorKind.ENGINE_ERROR, f"reading logs failed: {message}")
        stream = STREAM_TYPES.get(stream_type)
        if stream is not None:
            yield from assembler.add_frame(stream, payload)
        if len(payload) < length:
            break
    yield from assembler.flush()


# --- stream threads --------------------------------------------------------------------


class _StreamEnd:
    """Marker that a stream thread has no more items."""


STREAM_END = _StreamEnd()


class StreamPump:
    """Runs a blocking stream in its own thread and hands its items to the event loop.

    `open_stream` runs in the thread and returns a docker CancellableStream. At most
    `capacity` items wait in the queue, and the thread blocks until the consumer takes
    one. `close()` shuts the stream's socket, which wakes a thread blocked in a read, and
    waits for the thread to end.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        open_stream: Callable[[], CancellableStream],
        *,
        name: str,
        capacity: int,
    ) -> None:
        self.name = name
        self._loop = loop
        self._open_stream = open_stream
        # The queue itself is unbounded, and the `_free_slots` semaphore bounds it.
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._free_slots = threading.Semaphore(capacity)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stream: CancellableStream | None = None
        self._finished = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def get(self) -> Any:
        """Return the next item, STREAM_END after the last one, or the exception that ended the stream."""
        item = await self._queue.get()
        if item is not STREAM_END and not isinstance(item, BaseException):
            self._free_slots.release()
        return item

    async def close(self) -> None:
        """Stop the thread and close the HTTP stream. Calling it twice is safe."""
        self._stopping.set()
        # One extra slot wakes a thread that waits for room in the queue.
        self._free_slots.release()
        with self._lock:
            stream = self._stream
        if stream is not None:
            close_stream_quietly(stream, self.name)
        try:
            await asyncio.wait_for(self._finished.wait(), STREAM_CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            logger.warning(
                "stream thread %s did not end within %.0f s", self.name, STREAM_CLOSE_TIMEOUT_SECONDS
            )
            return
        self._thread.join(STREAM_JOIN_SECONDS)

    def _run(self) -> None:
        outcome: Any = STREAM_END
        stream: CancellableStream | None = None
        try:
            stream = self._open_stream()
            with self._lock:
                self._stream = stream
            if not self._stopping.is_set():
                for item in stream:
                    self._free_slots.acquire()
                    if self._stopping.is_set():
                        break
                    self._deliver(item)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            if not self._stopping.is_set():
                outcome = error
        finally:
            if stream is not None:
                close_stream_quietly(stream, self.name)
            self._deliver(outcome)
            self._deliver_finished()

    def _deliver(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            # The event loop is closed, so no consumer is left to read the stream.
            self._stopping.set()

    def _deliver_finished(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._finished.set)
        except RuntimeError:
            pass


def close_stream_quietly(stream: CancellableStream, name: str) -> None:
    """Close a docker stream; errors of a socket that is already closed are only logged at DEBUG."""
    try:
        stream.close()
    except (OSError, docker.errors.DockerException, AttributeError) as error:
        logger.debug("closing stream %s: %s", name, error)


# --- the runtime -----------------------------------------------------------------------


class DockerRuntime:
    """Starts, lists, inspects, stops and streams the containers of one node.

    Call `await start()` first. It returns False when no engine responds, and every other
    method then raises DockerRuntimeError(kind="engine_unavailable"). A call that cannot
    reach the engine makes `available` False until a later call, such as `ping()`,
    reaches it. `pull_policy` is
    "never", "if-not-present" or "always". `allowed_registries` lists registry hosts
    ("docker.io" for Docker Hub) that pulls may use. An empty list allows none.
    `workers` bounds the threads running SDK calls, and `max_streams` bounds the open
    log and event streams, each of which holds one thread.
    """

    def __init__(
        self,
        node_id: str,
        host_ip: str,
        *,
        pull_policy: str = "never",
        allowed_registries: Sequence[str] = (),
        pids_limit: int = DEFAULT_PIDS_LIMIT,
        workers: int = DEFAULT_WORKERS,
        base_url: str | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if pull_policy not in PULL_POLICIES:
            raise ValueError(f"pull_policy must be one of {', '.join(PULL_POLICIES)}, got {pull_policy!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if pids_limit < 1:
            raise ValueError(f"pids_limit must be at least 1, got {pids_limit}")
        self.node_id = node_id
        self.host_ip = host_ip
        self.pull_policy = pull_policy
        self.set_allowed_registries(allowed_registries)
        self.pids_limit = pids_limit
        self.base_url = base_url
        self.max_streams = max_streams
        self.workers = workers
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"voxa-docker-{node_id}"
        )
        self._client: docker.DockerClient | None = None
        self._engine_reachable = False
        # Docker's message for the last failure to reach the engine.
        self.unavailable_reason = "not connected yet"
        # Whether that failure was logged at warning level; repeats go to debug level.
        self._unreachable_logged = False
        self._closed = False
        self._calls: set[asyncio.Future[Any]] = set()
        self._pumps: set[StreamPump] = set()
        # Time of each SDK call in a pool thread, by operation, failed calls included.
        # It belongs to no registry: the node's metrics collector reads it.
        self.call_durations = Histogram(
            "voxanode_docker_call_duration_seconds",
            "Time of each Docker SDK call that the node's app runtime made, measured in"
            " the worker thread (waiting for a free worker excluded), by operation.",
            ["operation"],
            registry=None,
            buckets=DOCKER_CALL_BUCKETS_SECONDS,
        )

    def set_allowed_registries(self, hosts: Sequence[str]) -> None:
        """Replace the registries that images may be pulled from, as on a reload."""
        self.allowed_registries = frozenset(normalize_registry(host) for host in hosts)

    @property
    def available(self) -> bool:
        """Whether the engine responded to the last call and the runtime is open."""
        return self._client is not None and self._engine_reachable and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    # --- lifecycle ---

    async def start(self) -> bool:
        """Connect to the engine and ping it. Returns False, and logs why, when none responds.

        Called again once connected, it only pings the engine, so a caller can tell
        when an engine that stopped responding is back. The first failure after a
        success is logged as a warning and the repeats at debug level.
        """
        if self._closed:
            raise RuntimeError("DockerRuntime.start() called after close()")
        if self._client is not None:
            return await self.ping()
        try:
            self._client = await self._submit(self._connect)
        except (docker.errors.DockerException, requests.RequestException) as error:
            self._note_unreachable(short_reason(error))
            return False
        self._engine_reachable = True
        self._unreachable_logged = False
        logger.info(
            "Docker runtime of node %s connected to %s",
            self.node_id,
            self.base_url or "the DOCKER_HOST default",
        )
        return True

    async def ping(self) -> bool:
        """Ping the engine and return whether it responded; `available` follows the result."""
        try:
            client = self._require_client()
            await self._call(self._ping, client, default_kind=ErrorKind.ENGINE_UNAVAILABLE)
        except DockerRuntimeError:
            return False
        return True

    @staticmethod
    def _ping(client: docker.DockerClient) -> None:
        client.ping()

    def _note_unreachable(self, reason: str) -> None:
        self.unavailable_reason = reason
        self._engine_reachable = False
        level = logging.DEBUG if self._unreachable_logged else logging.WARNING
        self._unreachable_logged = True
        logger.log(
            level,
            "Docker engine not reachable for node %s at %s: %s",
            self.node_id,
            self.base_url or "the DOCKER_HOST default",
            reason,
        )

    def _note_reachable(self) -> None:
        if not self._engine_reachable and self._client is not None:
            logger.info("Docker engine of node %s responds again", self.node_id)
        self._engine_reachable = True
        self._unreachable_logged = False

    async def close(self) -> None:
        """Close every open stream, wait for running calls, then release the pool and the client.

        Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        for pump in list(self._pumps):
            await pump.close()
        if self._calls:
            _, pending = await asyncio.wait(set(self._calls), timeout=CLOSE_TIMEOUT_SECONDS)
            if pending:
                logger.warning("node %s: %d Docker calls still running at close", self.node_id, len(pending))
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
        logger.info("Docker runtime of node %s closed", self.node_id)

    def _connect(self) -> docker.DockerClient:
        # The SDK uses one HTTP connection per concurrent call, and each open stream keeps one.
        pool_size = self.workers + self.max_streams
        if self.base_url:
            client = docker.DockerClient(
                base_url=self.base_url, timeout=API_TIMEOUT_SECONDS, max_pool_size=pool_size
            )
        else:
            client = docker.from_env(timeout=API_TIMEOUT_SECONDS, max_pool_size=pool_size)
        try:
            client.ping()
        except Exception:
            client.close()
            raise
        return client

    # --- images ---

    async def ensure_image(self, image: str) -> str:
        """Return the id of `image`, pulling it only as the pull policy and allowed registries permit."""
        client = self._require_client()
        if self.pull_policy == "always":
            self._check_registry_allowed(image)
            await self._call(self._pull, client, image, default_kind=ErrorKind.PULL_REFUSED)
            return await self._call(
                self._local_image_id, client, image, default_kind=ErrorKind.IMAGE_MISSING, missing_ok=False
            )

        image_id = await self._call(self._local_image_id, client, image, default_kind=ErrorKind.IMAGE_MISSING)
        if image_id is not None:
            return image_id
        if self.pull_policy == "never":
            raise DockerRuntimeError(
                ErrorKind.IMAGE_MISSING,
                f"image {image} is not present on this node and the pull policy is never; "
                "load it with docker load or docker import, or allow pulls",
            )
        self._check_registry_allowed(image)
        await self._call(self._pull, client, image, default_kind=ErrorKind.PULL_REFUSED)
        return await self._call(
            self._local_image_id, client, image, default_kind=ErrorKind.IMAGE_MISSING, missing_ok=False
        )

    def _check_registry_allowed(self, image: str) -> None:
        if image.startswith("sha256:"):
            raise DockerRuntimeError(
                ErrorKind.IMAGE_MISSING, f"image id {image[:19]} is not present and cannot be pulled"
            )
        registry = registry_host(image)
        if registry not in self.allowed_registries:
            allowed = ", ".join(sorted(self.allowed_registries)) or "none"
            raise DockerRuntimeError(
                ErrorKind.REGISTRY_NOT_ALLOWED,
                f"registry {registry} of image {image} is not allowed (allowed: {allowed})",
            )

    @staticmethod
    def _local_image_id(client: docker.DockerClient, image: str, *, missing_ok: bool = True) -> str | None:
        try:
            return client.api.inspect_image(image)["Id"]
        except docker.errors.NotFound:
            if missing_ok:
                return None
            raise DockerRuntimeError(ErrorKind.IMAGE_MISSING, f"image {image} is not present after the pull")

    def _pull(self, client: docker.DockerClient, image: str) -> None:
        repository, tag = split_reference(image)
        logger.info("node %s pulling image %s from %s", self.node_id, image, registry_host(image))
        try:
            for message in client.api.pull(repository, tag=tag, stream=True, decode=True):
                if "error" in message:
                    raise DockerRuntimeError(
                        ErrorKind.PULL_REFUSED, short_reason(Exception(message["error"]))
                    )
        except docker.errors.APIError as error:
            # A 404 from the registry is a refused pull, not a missing local image.
            raise DockerRuntimeError(ErrorKind.PULL_REFUSED, short_reason(error)) from error

    # --- containers ---

    async def run(self, request: ContainerRequest) -> ContainerInfo:
        """Create and start the container of `request`; return its state right after the start.

        Raises image_missing, pull_refused or registry_not_allowed from ensure_image, and
        start_failed when Docker rejects the container. A container that was created but
        did not start is removed. When the caller is cancelled, the container is removed
        as soon as the running SDK call returns, so no half-created container stays.
        """
        client = self._require_client()
        await self.ensure_image(request.image)

        abandoned = threading.Event()
        future = self._submit(self._create_and_start, client, request, abandoned)
        try:
            attrs = await asyncio.shield(future)
        except asyncio.CancelledError:
            abandoned.set()
            future.add_done_callback(functools.partial(self._remove_abandoned, client, request))
            raise
        except Exception as error:
            raise self._translate(error, ErrorKind.START_FAILED) from error
        self._note_reachable()
        info = parse_container_info(attrs)
        logger.info(
            "node %s started container %s for app %s instance %s, ports %s",
            self.node_id,
            info.container_id[:12],
            request.app_id,
            request.instance_id,
            info.host_ports,
        )
        return info

    def _create_and_start(
        self, client: docker.DockerClient, request: ContainerRequest, abandoned: threading.Event
    ) -> dict | None:
        api = client.api
        name = container_name(request.app_name, request.instance_id)
        try:
            created = api.create_container(
                image=request.image,
                command=list(request.command) if request.command is not None else None,
                name=name,
                environment=dict(request.environment),
                labels=self._labels(request),
                ports=[(port, protocol) for port, protocol in request.ports],
                host_config=api.create_host_config(**self._host_config_options(request)),
                detach=True,
            )
        except (requests.ConnectionError, requests.Timeout):
            # The engine may have created the container before the reply was lost.
            self._remove_unstarted_by_name(client, name, request)
            raise
        container_id = created["Id"]
        for warning in created.get("Warnings") or ():
            logger.warning(
                "node %s container %s: Docker warning: %s", self.node_id, container_id[:12], warning
            )

        try:
            if not abandoned.is_set():
                api.start(container_id)
            if not abandoned.is_set():
                return api.inspect_container(container_id)
        except BaseException as error:
            logger.warning(
                "node %s container %s for instance %s did not start: %s",
                self.node_id,
                container_id[:12],
                request.instance_id,
                short_reason(error),
            )
            self._remove_quietly(client, container_id, request)
            raise
        logger.info("node %s removing container %s: its start was cancelled", self.node_id, container_id[:12])
        self._remove_quietly(client, container_id, request)
        return None

    def _labels(self, request: ContainerRequest) -> dict[str, str]:
        return {
            LABEL_NODE: self.node_id,
            LABEL_APP: request.app_id,
            LABEL_INSTANCE: request.instance_id,
            LABEL_APP_NAME: request.app_name,
            LABEL_RESTART: request.restart,
        }

    def _host_config_options(self, request: ContainerRequest) -> dict[str, Any]:
        options: dict[str, Any] = {
            "port_bindings": {f"{port}/{protocol}": (self.host_ip, None) for port, protocol in request.ports},
            "privileged": False,
            "security_opt": ["no-new-privileges"],
            "cap_drop": ["ALL"],
            "cap_add": list(request.capabilities),
            "pids_limit": self.pids_limit,
            "restart_policy": {"Name": "no"},
            "log_config": LogConfig(type=LogConfig.types.JSON, config={"max-size": LOG_MAX_SIZE}),
            "read_only": False,
            "init": False,
        }
        if request.memory_bytes is not None:
            options["mem_limit"] = request.memory_bytes
            # Equal to the memory limit, so the container cannot use swap beyond it.
            options["memswap_limit"] = request.memory_bytes
        if request.cpu is not None:
            options["nano_cpus"] = round(request.cpu * NANO_CPUS_PER_CORE)
        return options

    def _remove_abandoned(
        self, client: docker.DockerClient, request: ContainerRequest, future: asyncio.Future
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        attrs = future.result()
        if attrs is None:
            return
        logger.info("node %s removing container %s of a cancelled start", self.node_id, attrs["Id"][:12])
        try:
            self._submit(self._remove_quietly, client, attrs["Id"], request)
        except RuntimeError:
            # The pool is shut down, so remove the container from this thread.
            self._remove_quietly(client, attrs["Id"], request)

    def _remove_unstarted_by_name(
        self, client: docker.DockerClient, name: str, request: ContainerRequest
    ) -> None:
        """Remove the container `name` if it is this instance's and was never started."""
        try:
            attrs = client.api.inspect_container(name)
        except docker.errors.NotFound:
            return
        except Exception as error:  # noqa: BLE001 - the create error matters more, so this one is only logged
            logger.error(
                "node %s could not check for container %s of instance %s: %s",
                self.node_id,
                name,
                request.instance_id,
                short_reason(error),
            )
            return
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        ours = labels.get(LABEL_NODE) == self.node_id and labels.get(LABEL_INSTANCE) == request.instance_id
        if ours and (attrs.get("State") or {}).get("Status") == "created":
            self._remove_quietly(client, attrs["Id"], request)

    def _remove_quietly(self, client: docker.DockerClient, container: str, request: ContainerRequest) -> None:
        try:
            client.api.remove_container(container, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except Exception as error:  # noqa: BLE001 - the original error matters more, so this one is only logged
            logger.error(
                "node %s could not remove container %s of instance %s: %s",
                self.node_id,
                container[:12],
                request.instance_id,
                short_reason(error),
            )

    async def list_own(self) -> list[ContainerInfo]:
        """Return every container labelled with this node's id, in all states."""
        client = self._require_client()
        attrs_list = await self._call(self._inspect_own, client, default_kind=ErrorKind.ENGINE_ERROR)
        return [parse_container_info(attrs) for attrs in attrs_list]

    def _inspect_own(self, client: docker.DockerClient) -> list[dict]:
        summaries = client.api.containers(all=True, filters={"label": f"{LABEL_NODE}={self.node_id}"})
        attrs_list = []
        for summary in summaries:
            try:
                attrs_list.append(client.api.inspect_container(summary["Id"]))
            except docker.errors.NotFound:
                continue  # removed between the list and the inspect
        return attrs_list

    async def inspect(self, container_id: str) -> ContainerInfo:
        """Return the state of one container of this node.

        Raises kind "not_found" when the container does not exist or belongs to another node.
        """
        client = self._require_client()
        attrs = await self._call(
            self._inspect_own_container, client, container_id, default_kind=ErrorKind.ENGINE_ERROR
        )
        return parse_container_info(attrs)

    def _inspect_own_container(self, client: docker.DockerClient, container_id: str) -> dict:
        """Inspect a container; raise kind "not_found" when another node's label is on it.

        Several nodes share one engine, so an id from a caller is checked before any change.
        """
        attrs = client.api.inspect_container(container_id)
        owner = ((attrs.get("Config") or {}).get("Labels") or {}).get(LABEL_NODE)
        if owner != self.node_id:
            raise DockerRuntimeError(
                ErrorKind.NOT_FOUND,
                f"container {container_id[:12]} belongs to node {owner or 'none'}, not to node {self.node_id}",
            )
        return attrs

    async def stop(self, container_id: str, *, timeout_seconds: float, force: bool) -> None:
        """Stop and remove a container with its anonymous volumes. A missing container is no error.

        Without `force`, Docker sends SIGTERM and kills the container after
        `timeout_seconds`, rounded up to whole seconds. With `force` it is killed at once.
        A container of another node is left alone and raises kind "not_found".
        """
        client = self._require_client()
        await self._call(
            self._stop_and_remove,
            client,
            container_id,
            timeout_seconds,
            force,
            default_kind=ErrorKind.ENGINE_ERROR,
        )

    def _stop_and_remove(
        self, client: docker.DockerClient, container_id: str, timeout_seconds: float, force: bool
    ) -> None:
        api = client.api
        try:
            container_id = self._inspect_own_container(client, container_id)["Id"]
        except docker.errors.NotFound:
            logger.debug("node %s: container %s to stop is already gone", self.node_id, container_id[:12])
            return
        try:
            if force:
                api.kill(container_id)
            else:
                api.stop(container_id, timeout=max(0, math.ceil(timeout_seconds)))
        except docker.errors.NotFound:
            logger.debug("node %s: container %s to stop is already gone", self.node_id, container_id[:12])
            return
        except docker.errors.APIError as error:
            # 409: the container is not running, or its removal is already in progress.
            if error.status_code != 409:
                raise
        try:
            api.remove_container(container_id, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as error:
            if error.status_code != 409:
                raise
        logger.info(
            "node %s removed container %s (%s)",
            self.node_id,
            container_id[:12],
            "killed" if force else "stopped",
        )

    async def stats(self, container_id: str) -> ContainerStats | None:
        """Return one resource sample, or None when the container is not running.

        Docker takes two samples about a second apart to compute the CPU share, so a
        call takes about a second of one pool worker.
        """
        client = self._require_client()
        return await self._call(self._sample_stats, client, container_id, default_kind=ErrorKind.ENGINE_ERROR)

    def _sample_stats(self, client: docker.DockerClient, container_id: str) -> ContainerStats | None:
        state = self._inspect_own_container(client, container_id).get("State") or {}
        if not state.get("Running"):
            return None
        return compute_stats(client.api.stats(container_id, stream=False))

    # --- streams ---

    async def logs(
        self, container_id: str, *, tail: int | None, follow: bool, since: float | None = None
    ) -> AsyncIterator[LogLine]:
        """Yield the lines a container printed on stdout and stderr, oldest first.

        `tail` limits the output to the last lines (None for all), `since` is a Unix
        time. With `follow`, the iterator waits for new lines and ends when the container
        stops. Closing the iterator (aclose(), or cancelling its consumer) closes the
        HTTP stream and ends its thread. A consumer that leaves `async for` early should
        iterate inside `contextlib.aclosing(...)`, because Python closes an abandoned
        async generator only when it is garbage-collected.
        """
        client = self._require_client()
        attrs = await self._call(
            self._inspect_own_container, client, container_id, default_kind=ErrorKind.ENGINE_ERROR
        )
        if (attrs.get("Config") or {}).get("Tty"):
            # Containers of this runtime never have a TTY, and with one the log stream is not multiplexed.
            raise DockerRuntimeError(
                ErrorKind.ENGINE_ERROR,
                f"container {container_id[:12]} has a TTY; its logs cannot be split into stdout and stderr",
            )

        params: dict[str, Any] = {
            "stdout": 1,
            "stderr": 1,
            "timestamps": 1,
            "follow": 1 if follow else 0,
            "tail": "all" if tail is None else max(0, int(tail)),
        }
        if since is not None:
            params["since"] = f"{since:.9f}"
        open_stream = functools.partial(self._open_log_stream, client, attrs["Id"], params, follow)
        # aclosing: closing this generator must close the inner one now, not when it is collected.
        stream = self._iterate_stream(open_stream, f"voxa-logs-{attrs['Id'][:12]}", LOG_QUEUE_LINES)
        async with contextlib.aclosing(stream) as lines:
            async for line in lines:
                yield line

    @staticmethod
    def _open_log_stream(
        client: docker.DockerClient, container_id: str, params: dict[str, Any], follow: bool
    ) -> CancellableStream:
        # NOTE: the SDK's public logs() drops the stream type of each frame, so this calls the
        # same endpoint through the SDK's private request helpers and decodes the frames here.
        api = client.api
        url = api._url("/containers/{0}/logs", container_id)
        timeout = None if follow else API_TIMEOUT_SECONDS
        response = api._get(url, params=params, stream=True, timeout=timeout)
        api._raise_for_status(response)
        return CancellableStream(iter_log_lines(response.raw, container_id), response)

    async def events(self, *, since: float | None = None) -> AsyncIterator[dict]:
        """Yield Docker's container events (start, die, oom, health_status) for this node's containers.

        Each item is the event as Docker sends it, decoded from JSON. With `since`, a Unix
        time, the engine first replays the events after that time that it still keeps, so
        a subscriber opened after an action does not miss it. The iterator ends when the
        runtime closes or the iterator is closed, as for logs().
        """
        client = self._require_client()
        filters = {
            "type": ["container"],
            "label": [f"{LABEL_NODE}={self.node_id}"],
            "event": list(EVENT_ACTIONS),
        }
        since_param = None if since is None else f"{since:.9f}"
        open_stream = functools.partial(client.api.events, since=since_param, filters=filters, decode=True)
        stream = self._iterate_stream(open_stream, f"voxa-events-{self.node_id}", EVENT_QUEUE_SIZE)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                yield event

    async def _iterate_stream(
        self, open_stream: Callable[[], CancellableStream], name: str, capacity: int
    ) -> AsyncIterator[Any]:
        if self._closed:
            return
        if len(self._pumps) >= self.max_streams:
            raise DockerRuntimeError(
                ErrorKind.TOO_MANY_STREAMS,
                f"{len(self._pumps)} streams are open, the maximum is {self.max_streams}",
            )
        pump = StreamPump(asyncio.get_running_loop(), open_stream, name=name, capacity=capacity)
        self._pumps.add(pump)
        pump.start()
        logger.debug("node %s opened stream %s", self.node_id, name)
        try:
            while True:
                item = await pump.get()
                if item is STREAM_END:
                    return
                if isinstance(item, BaseException):
                    raise self._translate(item, ErrorKind.ENGINE_ERROR) from item
                yield item
        finally:
            self._pumps.discard(pump)
            await pump.close()
            logger.debug("node %s closed stream %s", self.node_id, name)

    # --- calls into the pool ---

    def _require_client(self) -> docker.DockerClient:
        if self._closed:
            raise DockerRuntimeError(ErrorKind.ENGINE_UNAVAILABLE, "the Docker runtime is closed")
        if self._client is None:
            raise DockerRuntimeError(
                ErrorKind.ENGINE_UNAVAILABLE, "not connected to a Docker engine; start() did not succeed"
            )
        return self._client

    def _submit(self, function: Callable[..., Result], *args: Any, **kwargs: Any) -> asyncio.Future[Result]:
        loop = asyncio.get_running_loop()
        # The operation label is the method's name without its underscore, such as
        # "create_and_start" or "sample_stats".
        operation = function.__name__.lstrip("_")
        future = loop.run_in_executor(
            self._pool, functools.partial(self._timed_call, operation, function, args, kwargs)
        )
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        return future

    def _timed_call(
        self,
        operation: str,
        function: Callable[..., Result],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Result:
        # Runs in a pool thread; Histogram.observe takes its own lock.
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.call_durations.labels(operation).observe(time.perf_counter() - started)

    async def _call(
        self, function: Callable[..., Result], *args: Any, default_kind: ErrorKind, **kwargs: Any
    ) -> Result:
        """Run a blocking SDK call in the pool; its errors become DockerRuntimeError."""
        try:
            result = await self._submit(function, *args, **kwargs)
        except Exception as error:
            raise self._translate(error, default_kind) from error
        self._note_reachable()
        return result

    def _translate(self, error: BaseException, default_kind: ErrorKind) -> DockerRuntimeError:
        runtime_error = translate_error(error, default_kind)
        if runtime_error.kind == ErrorKind.ENGINE_UNAVAILABLE:
            if self._engine_reachable:
                logger.warning("node %s lost the Docker engine: %s", self.node_id, runtime_error.reason)
                self._unreachable_logged = True
            self._note_unreachable(runtime_error.reason)
        return runtime_error
