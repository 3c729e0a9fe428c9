"""Result types of the client: frozen dataclasses built from the node's JSON replies.

Each result keeps the JSON object it was built from in `raw` (fields a newer node adds
are there), and `to_dict()` returns its typed fields as JSON-ready data, with times as
ISO 8601 UTC strings. Times are parsed to timezone-aware datetimes. A time field the
node left empty, or sent in a form that does not parse, is None.

The field names follow the API, except that the `app_id`, `instance_id`, `node_id`
and `event_id` of the object itself are called `id`.
"""

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

# Subject keys of an event are its top-level `*_id` keys other than these.
EVENT_FIXED_KEYS = frozenset({"event_id", "type", "timestamp", "source_node_id", "data"})


# --- conversions ---------------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    """Parse an ISO 8601 time to an aware datetime, taking a time without offset as UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        logger.debug("time value does not parse as ISO 8601: %.40r", value)
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def format_time(moment: datetime) -> str:
    """Format a datetime as ISO 8601 in UTC with a Z suffix."""
    text = moment.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def to_jsonable(value: Any) -> Any:
    """Convert models, datetimes, lists and mappings to JSON-ready data."""
    if isinstance(value, Model):
        return value.to_dict()
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    return value


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


@dataclass(frozen=True)
class Model:
    """Base of the result types: the source JSON in `raw`, and `to_dict()`."""

    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """Return the typed fields as JSON-ready data (`raw` is left out)."""
        return {item.name: to_jsonable(getattr(self, item.name)) for item in fields(self) if item.name != "raw"}


# --- apps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class App(Model):
    """A deployed app, as the deploy reply describes it."""

    id: str
    name: str
    status: str
    nodes_deployed: int
    instances_created: int
    message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str) -> "App":
        details = _mapping(data.get("deployment_details"))
        return cls(
            id=data.get("app_id", ""),
            name=name,
            status=details.get("status", ""),
            nodes_deployed=details.get("nodes_deployed", 0),
            instances_created=details.get("instances_created", 0),
            message=data.get("message", ""),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ReplicaCounts(Model):
    """Replica counts of an app. The app list does not report `unhealthy`, so it is None there."""

    desired: int
    running: int
    healthy: int
    unhealthy: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> "ReplicaCounts":
        data = _mapping(data)
        return cls(
            desired=data.get("desired", 0),
            running=data.get("running", 0),
            healthy=data.get("healthy", 0),
            unhealthy=data.get("unhealthy"),
            raw=data,
        )


@dataclass(frozen=True)
class AppSummary(Model):
    """One app of the app list."""

    id: str
    name: str
    status: str
    replicas: ReplicaCounts
    created_at: datetime | None
    last_updated: datetime | None
    nodes: list[str]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AppSummary":
        return cls(
            id=data.get("app_id", ""),
            name=data.get("name", ""),
            status=data.get("status", ""),
            replicas=ReplicaCounts.from_json(data.get("replicas")),
            created_at=parse_time(data.get("created_at")),
            last_updated=parse_time(data.get("last_updated")),
            nodes=_list(data.get("nodes")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class AppList(Model):
    """A page of the app list. Iterating it yields the AppSummary items."""

    apps: list[AppSummary]
    total_count: int
    limit: int
    offset: int
    has_more: bool

    def __iter__(self) -> Iterator[AppSummary]:
        return iter(self.apps)

    def __len__(self) -> int:
        return len(self.apps)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AppList":
        pagination = _mapping(data.get("pagination"))
        return cls(
            apps=[AppSummary.from_json(item) for item in _list(data.get("applications"))],
            total_count=data.get("total_count", 0),
            limit=pagination.get("limit", 0),
            offset=pagination.get("offset", 0),
            has_more=bool(pagination.get("has_more", False)),
            raw=dict(data),
        )


@dataclass(frozen=True)
class PublishedPort(Model):
    """A container port and the host address and port it is published on."""

    container_port: int
    protocol: str
    host_ip: str | None
    host_port: int | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PublishedPort":
        return cls(
            container_port=data.get("container_port", 0),
            protocol=data.get("protocol", "tcp"),
            host_ip=data.get("host_ip"),
            host_port=data.get("host_port"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ResourceUsage(Model):
    """The last measured resource use of an instance."""

    cpu_percent: float
    memory_mb: float
    network_rx_bytes: int
    network_tx_bytes: int

    @classmethod
    def from_json(cls, data: Any) -> "ResourceUsage":
        data = _mapping(data)
        return cls(
            cpu_percent=data.get("cpu_percent", 0.0),
            memory_mb=data.get("memory_mb", 0.0),
            network_rx_bytes=data.get("network_rx_bytes", 0),
            network_tx_bytes=data.get("network_tx_bytes", 0),
            raw=data,
        )


@dataclass(frozen=True)
class Instance(Model):
    """One instance (container) of an app."""

    id: str
    node_id: str
    status: str
    health: str
    created_at: datetime | None
    started_at: datetime | None
    last_health_check: datetime | None
    ports: list[PublishedPort]
    error: str | None
    resource_usage: ResourceUsage

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Instance":
        return cls(
            id=data.get("instance_id", ""),
            node_id=data.get("node_id", ""),
            status=data.get("status", ""),
            health=data.get("health", ""),
            created_at=parse_time(data.get("created_at")),
            started_at=parse_time(data.get("started_at")),
            last_health_check=parse_time(data.get("last_health_check")),
            ports=[PublishedPort.from_json(item) for item in _list(data.get("ports"))],
            error=data.get("error"),
            resource_usage=ResourceUsage.from_json(data.get("resource_usage")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class AppMetrics(Model):
    """Request metrics of an app."""

    total_requests: int
    avg_response_time_ms: float
    error_rate_percent: float

    @classmethod
    def from_json(cls, data: Any) -> "AppMetrics":
        data = _mapping(data)
        return cls(
            total_requests=data.get("total_requests", 0),
            avg_response_time_ms=data.get("avg_response_time_ms", 0.0),
            error_rate_percent=data.get("error_rate_percent", 0.0),
            raw=data,
        )


@dataclass(frozen=True)
class AppStatus(Model):
    """One app in detail: its phase, health, replica counts and instances.

    `last_error` is the node's record of the last reason an instance could not run
    (`reason`, `kind`, `node_id`, `instance_id`, `at`), or None.
    """

    id: str
    name: str
    status: str
    health: str
    image: str
    replicas: ReplicaCounts
    instances: list[Instance]
    metrics: AppMetrics
    last_error: dict[str, Any] | None
    created_at: datetime | None
    last_updated: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AppStatus":
        last_error = data.get("last_error")
        return cls(
            id=data.get("app_id", ""),
            name=data.get("name", ""),
            status=data.get("status", ""),
            health=data.get("health", ""),
            image=data.get("image", ""),
            replicas=ReplicaCounts.from_json(data.get("replicas")),
            instances=[Instance.from_json(item) for item in _list(data.get("instances"))],
            metrics=AppMetrics.from_json(data.get("metrics")),
            last_error=dict(last_error) if isinstance(last_error, Mapping) else None,
            created_at=parse_time(data.get("created_at")),
            last_updated=parse_time(data.get("last_updated")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ScaleResult(Model):
    """The reply to a scale request."""

    app_id: str
    previous_replicas: int
    new_replicas: int
    scaling_status: str
    message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ScaleResult":
        return cls(
            app_id=data.get("app_id", ""),
            previous_replicas=data.get("previous_replicas", 0),
            new_replicas=data.get("new_replicas", 0),
            scaling_status=data.get("scaling_status", ""),
            message=data.get("message", ""),
            raw=dict(data),
        )


@dataclass(frozen=True)
class StopResult(Model):
    """The reply to a stop request."""

    app_id: str
    instances_stopped: int
    message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StopResult":
        return cls(
            app_id=data.get("app_id", ""),
            instances_stopped=data.get("instances_stopped", 0),
            message=data.get("message", ""),
            raw=dict(data),
        )


@dataclass(frozen=True)
class LogEntry(Model):
    """One log line of an app instance. `metadata["stream"]` is stdout or stderr."""

    timestamp: datetime | None
    level: str
    message: str
    instance_id: str
    node_id: str
    metadata: dict[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LogEntry":
        return cls(
            timestamp=parse_time(data.get("timestamp")),
            level=data.get("level", ""),
            message=data.get("message", ""),
            instance_id=data.get("instance_id", ""),
            node_id=data.get("node_id", ""),
            metadata=_mapping(data.get("metadata")),
            raw=dict(data),
        )


# --- data and nodes ------------------------------------------------------------------


@dataclass(frozen=True)
class StoreResult(Model):
    """A stored value: the nodes that acknowledged a copy, and when it expires.

    `warnings` is empty unless fewer nodes than requested stored the value.
    """

    key: str
    storage_nodes: list[str]
    expires_at: datetime | None
    warnings: list[str]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StoreResult":
        return cls(
            key=data.get("key", ""),
            storage_nodes=_list(data.get("storage_nodes")),
            expires_at=parse_time(data.get("expires_at")),
            warnings=_list(data.get("warnings")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class DataValue(Model):
    """A retrieved value with its record metadata. `source_node` is the node that stored it."""

    key: str
    value: Any
    created_at: datetime | None
    expires_at: datetime | None
    replicas: int
    source_node: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DataValue":
        metadata = _mapping(data.get("metadata"))
        return cls(
            key=data.get("key", ""),
            value=data.get("value"),
            created_at=parse_time(metadata.get("created_at")),
            expires_at=parse_time(metadata.get("expires_at")),
            replicas=metadata.get("replicas", 0),
            source_node=metadata.get("source_node", ""),
            raw=dict(data),
        )


@dataclass(frozen=True)
class NodeSummary(Model):
    """One member of a node's view of the network. `address` is its API address, HOST:PORT."""

    id: str
    address: str
    status: str
    capabilities: list[str]
    load: dict[str, Any]
    last_seen: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "NodeSummary":
        return cls(
            id=data.get("node_id", ""),
            address=data.get("address", ""),
            status=data.get("status", ""),
            capabilities=_list(data.get("capabilities")),
            load=_mapping(data.get("load")),
            last_seen=parse_time(data.get("last_seen")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class NodeList(Model):
    """The members in a node's view, after the filters. Iterating it yields NodeSummary items."""

    nodes: list[NodeSummary]
    total_nodes: int
    online_nodes: int

    def __iter__(self) -> Iterator[NodeSummary]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "NodeList":
        return cls(
            nodes=[NodeSummary.from_json(item) for item in _list(data.get("nodes"))],
            total_nodes=data.get("total_nodes", 0),
            online_nodes=data.get("online_nodes", 0),
            raw=dict(data),
        )


# --- status, info and test -----------------------------------------------------------


@dataclass(frozen=True)
class Health(Model):
    """A node's health. `components` maps api, networking, storage and registry to a state."""

    status: str
    timestamp: datetime | None
    version: str
    uptime_seconds: int
    components: dict[str, str]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Health":
        return cls(
            status=data.get("status", ""),
            timestamp=parse_time(data.get("timestamp")),
            version=data.get("version", ""),
            uptime_seconds=data.get("uptime_seconds", 0),
            components=_mapping(data.get("components")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class SystemInfo(Model):
    """The host a node runs on. `disk_usage` has total_gb, used_gb and available_gb."""

    os: str
    architecture: str
    cpu_cores: int | None
    total_memory_mb: int
    available_memory_mb: int
    disk_usage: dict[str, float]

    @classmethod
    def from_json(cls, data: Any) -> "SystemInfo":
        data = _mapping(data)
        return cls(
            os=data.get("os", ""),
            architecture=data.get("architecture", ""),
            cpu_cores=data.get("cpu_cores"),
            total_memory_mb=data.get("total_memory_mb", 0),
            available_memory_mb=data.get("available_memory_mb", 0),
            disk_usage=_mapping(data.get("disk_usage")),
            raw=data,
        )


@dataclass(frozen=True)
class NetworkInfo(Model):
    """Peer traffic counters of a node since it started."""

    connected_peers: int
    total_connections: int
    bytes_sent: int
    bytes_received: int
    datagrams_sent: int
    datagrams_received: int
    datagrams_dropped: dict[str, int]
    bytes_sent_by_method: dict[str, int]

    @classmethod
    def from_json(cls, data: Any) -> "NetworkInfo":
        data = _mapping(data)
        return cls(
            connected_peers=data.get("connected_peers", 0),
            total_connections=data.get("total_connections", 0),
            bytes_sent=data.get("bytes_sent", 0),
            bytes_received=data.get("bytes_received", 0),
            datagrams_sent=data.get("datagrams_sent", 0),
            datagrams_received=data.get("datagrams_received", 0),
            datagrams_dropped=_mapping(data.get("datagrams_dropped")),
            bytes_sent_by_method=_mapping(data.get("bytes_sent_by_method")),
            raw=data,
        )


@dataclass(frozen=True)
class ApplicationCounts(Model):
    """Apps in a node's catalogue by phase. `running` includes deploying and degraded apps."""

    total_deployed: int
    running: int
    stopped: int
    failed: int

    @classmethod
    def from_json(cls, data: Any) -> "ApplicationCounts":
        data = _mapping(data)
        return cls(
            total_deployed=data.get("total_deployed", 0),
            running=data.get("running", 0),
            stopped=data.get("stopped", 0),
            failed=data.get("failed", 0),
            raw=data,
        )


@dataclass(frozen=True)
class SystemStatus(Model):
    """A node's id, host, peer traffic and app counts."""

    node_id: str
    status: str
    version: str
    uptime_seconds: int
    system_info: SystemInfo
    network_info: NetworkInfo
    applications: ApplicationCounts

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SystemStatus":
        return cls(
            node_id=data.get("node_id", ""),
            status=data.get("status", ""),
            version=data.get("version", ""),
            uptime_seconds=data.get("uptime_seconds", 0),
            system_info=SystemInfo.from_json(data.get("system_info")),
            network_info=NetworkInfo.from_json(data.get("network_info")),
            applications=ApplicationCounts.from_json(data.get("applications")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class VersionInfo(Model):
    """A node's version and build. `features` maps a feature name to whether it is on."""

    version: str
    build_date: str
    git_commit: str
    build_environment: str
    features: dict[str, bool]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VersionInfo":
        return cls(
            version=data.get("version", ""),
            build_date=data.get("build_date", ""),
            git_commit=data.get("git_commit", ""),
            build_environment=data.get("build_environment", ""),
            features=_mapping(data.get("features")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class RequestStatistics(Model):
    """API request counters of a node and its process's resource use."""

    requests_processed: int
    average_response_time_ms: float
    error_count: int
    success_rate_percent: float
    memory_usage_mb: float
    cpu_usage_percent: float

    @classmethod
    def from_json(cls, data: Any) -> "RequestStatistics":
        data = _mapping(data)
        return cls(
            requests_processed=data.get("requests_processed", 0),
            average_response_time_ms=data.get("average_response_time_ms", 0.0),
            error_count=data.get("error_count", 0),
            success_rate_percent=data.get("success_rate_percent", 0.0),
            memory_usage_mb=data.get("memory_usage_mb", 0.0),
            cpu_usage_percent=data.get("cpu_usage_percent", 0.0),
            raw=data,
        )


@dataclass(frozen=True)
class RuntimeInfo(Model):
    """The node process: start time, uptime, Python version and process id."""

    start_time: datetime | None
    uptime_seconds: int
    python_version: str
    process_id: int

    @classmethod
    def from_json(cls, data: Any) -> "RuntimeInfo":
        data = _mapping(data)
        return cls(
            start_time=parse_time(data.get("start_time")),
            uptime_seconds=data.get("uptime_seconds", 0),
            python_version=data.get("python_version", ""),
            process_id=data.get("process_id", 0),
            raw=data,
        )


@dataclass(frozen=True)
class ProgramStats(Model):
    """Request statistics and process information of a node."""

    statistics: RequestStatistics
    runtime_info: RuntimeInfo

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ProgramStats":
        return cls(
            statistics=RequestStatistics.from_json(data.get("statistics")),
            runtime_info=RuntimeInfo.from_json(data.get("runtime_info")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class PeerPing(Model):
    """One peer pinged by the connection test. `rtt_ms` is None when it did not reply."""

    node_id: str | None
    address: str
    reachable: bool
    rtt_ms: float | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PeerPing":
        return cls(
            node_id=data.get("node_id"),
            address=data.get("address", ""),
            reachable=bool(data.get("reachable", False)),
            rtt_ms=data.get("rtt_ms"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ConnectionTest(Model):
    """The live connection check of a node.

    `network_tests` maps registry_connection, peer_connectivity and dns_resolution to
    their results.
    """

    success: bool
    response_time_ms: float
    node_id: str
    timestamp: datetime | None
    network_tests: dict[str, str]
    peers: list[PeerPing]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ConnectionTest":
        return cls(
            success=bool(data.get("success", False)),
            response_time_ms=data.get("response_time_ms", 0.0),
            node_id=data.get("node_id", ""),
            timestamp=parse_time(data.get("timestamp")),
            network_tests=_mapping(data.get("network_tests")),
            peers=[PeerPing.from_json(item) for item in _list(data.get("peers"))],
            raw=dict(data),
        )


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Event(Model):
    """One network event.

    `subject` contains the ids the event is about: `node_id` for node events, `app_id`
    for app events. `source_node_id` is the node that observed and published it.
    """

    id: str
    type: str
    timestamp: datetime | None
    source_node_id: str
    subject: dict[str, Any]
    data: dict[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Event":
        subject = {
            key: value for key, value in data.items() if key.endswith("_id") and key not in EVENT_FIXED_KEYS
        }
        return cls(
            id=data.get("event_id", ""),
            type=data.get("type", ""),
            timestamp=parse_time(data.get("timestamp")),
            source_node_id=data.get("source_node_id", ""),
            subject=subject,
            data=_mapping(data.get("data")),
            raw=dict(data),
        )
