"""Response models of the public API, as msgspec Structs for the OpenAPI document.

The handlers build their replies as dicts. These Structs describe those dicts field by
field, and `voxanode.api.openapi` turns them into JSON Schema components with
`msgspec.json.schema_components`. Reply objects are closed (`forbid_unknown_fields`,
so `additionalProperties: false`), which makes the schemathesis test in
tests/integration/test_openapi.py fail when a handler sends a field that is not
documented here. Open objects, such as error details or event data, are typed
`dict[str, Any]`.

The websocket message models (`LogMessage`, `NetworkEvent`) describe the JSON text
frames of the two websocket routes. They are documentation only: the fuzz test does
not open websockets.
"""

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from voxanode.api.errors import ErrorCode
from voxanode.api.routes import apps as app_routes
from voxanode.apps.catalogue import APP_PHASES, INSTANCE_STATES
from voxanode.events import EventType
from voxanode.membership.state import MemberStatus

ISO_UTC_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
NODE_ID_PATTERN = f"^{app_routes.NODE_ID_PATTERN.pattern}$"
APP_ID_PATTERN = f"^{app_routes.APP_ID_PATTERN.pattern}$"
INSTANCE_ID_PATTERN = r"^inst-[0-9a-f]{12}$"
EVENT_ID_PATTERN = r"^evt-[0-9A-Za-z]{1,64}-[0-9]{1,20}$"

Timestamp = Annotated[
    str,
    Meta(
        pattern=ISO_UTC_PATTERN,
        description="UTC time in whole seconds, YYYY-MM-DDTHH:MM:SSZ",
        examples=["2026-01-01T12:00:00Z"],
    ),
]
NodeId = Annotated[
    str,
    Meta(
        pattern=NODE_ID_PATTERN,
        description='node id: "node-" and 12 hex digits',
        examples=["node-1a2b3c4d5e6f"],
    ),
]
AppId = Annotated[
    str,
    Meta(
        pattern=APP_ID_PATTERN,
        description='app id: "app-" and 12 hex digits',
        examples=["app-0123456789ab"],
    ),
]
InstanceId = Annotated[
    str,
    Meta(
        pattern=INSTANCE_ID_PATTERN,
        description='instance id: "inst-" and 12 hex digits',
        examples=["inst-0123456789ab"],
    ),
]
# msgspec has no Literal[True], so the constant goes in as extra JSON Schema.
SuccessTrue = Annotated[bool, Meta(extra_json_schema={"const": True})]
SuccessFlag = Annotated[bool, Meta(extra_json_schema={"const": False})]
Count = Annotated[int, Meta(ge=0)]

HealthState = Literal["healthy", "degraded", "unhealthy"]
# The Literals built from the project's own constants stay in step with them. "lost"
# is the status that app status shows for an instance whose node is gone.
AppPhase = Literal[APP_PHASES]  # type: ignore[valid-type]
AppHealth = Literal["unknown", "healthy", "degraded", "unhealthy"]
InstanceStatusName = Literal[(*INSTANCE_STATES, "lost")]  # type: ignore[valid-type]
InstanceHealth = Literal["healthy", "unhealthy", "starting", "unknown"]
MemberStatusName = Literal[tuple(status.value for status in MemberStatus)]  # type: ignore[valid-type]
EventTypeName = Literal[tuple(str(event_type) for event_type in EventType)]  # type: ignore[valid-type]


class _Reply(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of the closed reply objects."""


# -- errors -------------------------------------------------------------------------


class ErrorInfo(_Reply):
    """The failure: a code for programs, a message for people, and details."""

    code: ErrorCode
    message: str
    details: Annotated[
        dict[str, Any],
        Meta(
            description="facts about the failure. Validation errors carry `field` "
            "and `issue`"
        ),
    ]


class ErrorEnvelope(_Reply):
    """The body of every error reply, for unknown routes and wrong methods too."""

    success: SuccessFlag
    error: ErrorInfo
    timestamp: Timestamp
    request_id: Annotated[
        str,
        Meta(description="the request's id, also sent in the X-Request-ID header"),
    ]


# -- data ---------------------------------------------------------------------------


class ReplicaCounts(_Reply):
    """Copies asked for and copies made."""

    requested: Count
    stored: Count


class StoreResponse(_Reply):
    """A stored value: the nodes that hold it and when it expires."""

    success: SuccessTrue
    key: str
    storage_nodes: list[NodeId]
    expires_at: Timestamp
    replicas: ReplicaCounts
    warnings: (
        Annotated[
            list[str],
            Meta(description="present when fewer nodes than requested stored the value"),
        ]
        | UnsetType
    ) = UNSET


class RecordMetadata(_Reply):
    """When a record was written and expires, its copies and the nodes that hold it."""

    created_at: Timestamp
    expires_at: Timestamp
    replicas: Count
    source_node: Annotated[str, Meta(description="node id of the node that stored it")]
    holders: list[NodeId]


class RetrieveResponse(_Reply):
    """The newest unexpired value of a key."""

    success: SuccessTrue
    key: str
    value: Annotated[Any, Meta(description="the stored JSON value")]
    metadata: RecordMetadata


class NodeLoadInfo(_Reply):
    """The load a member last announced."""

    cpu_percent: float
    memory_percent: float
    active_apps: Count
    memory_free_mb: Count
    cpu_free_cores: float
    cpu_cores: Count


class NodeEntry(_Reply):
    """One member of this node's view of the network."""

    node_id: NodeId
    address: Annotated[str, Meta(description="API address, HOST:PORT")]
    peer_address: Annotated[str, Meta(description="UDP peer address, HOST:PORT")]
    status: MemberStatusName
    capabilities: list[str]
    load: NodeLoadInfo
    last_seen: Timestamp
    version: str
    incarnation: int
    sequence: int
    is_self: bool


class DiscoverNodesResponse(_Reply):
    """The members of this node's view, after the filters."""

    success: SuccessTrue
    nodes: list[NodeEntry]
    total_nodes: Annotated[int, Meta(ge=0, description="members listed, after the filters")]
    online_nodes: Annotated[int, Meta(ge=0, description="online members listed, after the filters")]


# -- status and info ----------------------------------------------------------------


class HealthComponents(_Reply):
    """Health of each part of the node. `registry` is the DHT."""

    api: HealthState
    networking: HealthState
    storage: HealthState
    registry: HealthState


class HealthResponse(_Reply):
    """The node's overall health and that of each component."""

    status: HealthState
    timestamp: Timestamp
    version: str
    uptime_seconds: Count
    components: HealthComponents


class DiskUsage(_Reply):
    """Disk space of the file system of the data directory, in GB (2^30 bytes)."""

    total_gb: float
    used_gb: float
    available_gb: float


class SystemInfo(_Reply):
    """The host the node runs on."""

    os: str
    architecture: str
    cpu_cores: Annotated[int | None, Meta(description="null when it cannot be read")]
    total_memory_mb: Count
    available_memory_mb: Count
    disk_usage: DiskUsage


class NetworkInfo(_Reply):
    """Peer traffic counters since the node started."""

    connected_peers: Annotated[
        int, Meta(ge=0, description="other members this node reaches now: online or suspect, not left or failed")
    ]
    total_connections: Annotated[
        int, Meta(ge=0, description="distinct peers that sent this node a datagram since it started")
    ]
    routing_table_peers: Annotated[
        int, Meta(ge=0, description="contacts in the DHT routing table, which may still hold departed nodes")
    ]
    bytes_sent: Count
    bytes_received: Count
    datagrams_sent: Count
    datagrams_received: Count
    datagrams_dropped: Annotated[
        dict[str, int], Meta(description="dropped incoming datagrams by reason")
    ]
    bytes_sent_by_method: Annotated[
        dict[str, int], Meta(description="bytes sent by peer RPC or message kind")
    ]


class ApplicationCounts(_Reply):
    """Apps in the catalogue by phase. `running` includes deploying and degraded apps."""

    total_deployed: Count
    running: Count
    stopped: Count
    failed: Count


class SystemStatusResponse(_Reply):
    """Node id, host resources, peer traffic and app counts."""

    node_id: NodeId
    status: Literal["running"]
    version: str
    uptime_seconds: Count
    system_info: SystemInfo
    network_info: NetworkInfo
    applications: ApplicationCounts


class RequestStatistics(_Reply):
    """API request counters and this process's resource use."""

    requests_processed: Count
    average_response_time_ms: float
    error_count: Count
    success_rate_percent: float
    memory_usage_mb: float
    cpu_usage_percent: Annotated[
        float, Meta(description="CPU use since the previous call, across all cores")
    ]


class RuntimeInfo(_Reply):
    """The node process."""

    start_time: Timestamp
    uptime_seconds: Count
    python_version: str
    process_id: int


class ProgramStatsResponse(_Reply):
    """Request statistics and process information."""

    statistics: RequestStatistics
    runtime_info: RuntimeInfo


class Features(_Reply):
    """Features this node offers."""

    app_deployment: bool
    dns_management: bool
    p2p_networking: bool
    registry_integration: bool


class VersionResponse(_Reply):
    """Version and build information."""

    version: str
    build_date: Annotated[str, Meta(pattern=DATE_PATTERN, description="YYYY-MM-DD")]
    git_commit: str
    build_environment: Literal["development", "production"]
    features: Features


class NetworkTests(_Reply):
    """Results of the connection checks."""

    registry_connection: Literal["ok", "failed"]
    peer_connectivity: Literal["no_peers", "ok", "degraded", "failed"]
    dns_resolution: Literal["ok", "failed", "not_configured"]


class PeerPing(_Reply):
    """One pinged peer."""

    node_id: NodeId | None
    address: str
    reachable: bool
    rtt_ms: Annotated[float | None, Meta(description="round trip time, null when unreachable")]


class ConnectionTestResponse(_Reply):
    """The live connection check."""

    success: bool
    response_time_ms: float
    node_id: NodeId
    timestamp: Timestamp
    network_tests: NetworkTests
    peers: list[PeerPing]


# -- apps ---------------------------------------------------------------------------


class DeploymentDetails(_Reply):
    """The nodes and instances of a new deployment."""

    nodes_deployed: Count
    instances_created: Count
    status: Literal["deploying"]


class DeployResponse(_Reply):
    """A deployed app."""

    success: SuccessTrue
    message: str
    app_id: AppId
    deployment_details: DeploymentDetails


class ListedReplicas(_Reply):
    """Replica counts of a listed app."""

    desired: Count
    running: Count
    healthy: Count


class AppSummary(_Reply):
    """One app in the list."""

    app_id: AppId
    name: str
    status: AppPhase
    replicas: ListedReplicas
    created_at: Timestamp
    last_updated: Timestamp
    nodes: list[NodeId]


class Pagination(_Reply):
    """The page of the list."""

    limit: Count
    offset: Count
    has_more: bool


class ListAppsResponse(_Reply):
    """A page of the app catalogue, oldest app first."""

    success: SuccessTrue
    applications: list[AppSummary]
    total_count: Count
    pagination: Pagination


class ReplicaStatus(_Reply):
    """Replica counts of one app."""

    desired: Count
    running: Count
    healthy: Count
    unhealthy: Count


class InstancePort(_Reply):
    """A container port and the host address and port it is published on."""

    container_port: int
    protocol: Literal["tcp", "udp"]
    host_ip: Annotated[
        str | None, Meta(description="address of the host the port is published on")
    ]
    host_port: int


class ResourceUsage(_Reply):
    """An instance's last measured resource use."""

    cpu_percent: float
    memory_mb: float
    network_rx_bytes: Count
    network_tx_bytes: Count


class InstanceStatus(_Reply):
    """One instance of an app."""

    instance_id: InstanceId
    node_id: NodeId
    status: InstanceStatusName
    health: InstanceHealth
    created_at: Timestamp | None
    started_at: Timestamp | None
    last_health_check: Timestamp | None
    ports: list[InstancePort]
    error: str | None
    resource_usage: ResourceUsage


class AppMetrics(_Reply):
    """Requests to the app through the ingress of every node, counted since each node's start.

    Errors are replies with status 500 or more, the proxy's own 502, 503 and 504
    included. The 95th percentile is estimated from a latency histogram.
    """

    total_requests: Count
    avg_response_time_ms: float
    error_rate_percent: float
    p95_response_time_ms: float


class AppFailureInfo(_Reply):
    """The last reason an instance could not run."""

    reason: str
    kind: str
    node_id: NodeId | None
    instance_id: InstanceId | None
    at: Timestamp


class AppStatusResponse(_Reply):
    """One app with its instances."""

    success: SuccessTrue
    app_id: AppId
    name: str
    status: AppPhase
    health: AppHealth
    image: str
    created_at: Timestamp
    last_updated: Timestamp
    replicas: ReplicaStatus
    instances: list[InstanceStatus]
    metrics: AppMetrics
    last_error: AppFailureInfo | None


class StopAppResponse(_Reply):
    """A stopped app."""

    success: SuccessTrue
    message: str
    app_id: AppId
    instances_stopped: Count


class ScaleAppResponse(_Reply):
    """A scaled app."""

    success: SuccessTrue
    message: str
    app_id: AppId
    previous_replicas: Count
    new_replicas: Count
    scaling_status: Literal["completed", "in_progress"]


# -- websocket messages ---------------------------------------------------------------


class LogMessageMetadata(_Reply):
    """The output stream of a log line."""

    stream: Literal["stdout", "stderr"]


class LogMessage(_Reply):
    """One log line, a JSON text frame of `/ws/apps/{app_id}/logs`."""

    timestamp: Annotated[
        str | None,
        Meta(description="ISO-8601 UTC time the container printed the line"),
    ]
    level: Annotated[
        Literal["error", "warning", "info", "debug"],
        Meta(
            description="the level word the line starts with, else info for stdout "
            "and error for stderr"
        ),
    ]
    message: str
    instance_id: InstanceId
    node_id: NodeId
    metadata: LogMessageMetadata


class NetworkEvent(msgspec.Struct, frozen=True):
    """One event, a JSON text frame of `/ws/network/events`.

    Besides these fields, the ids the event is about sit at the top level, named
    `*_id`: `node_id` for node events, `app_id` for app events.
    """

    event_id: Annotated[
        str,
        Meta(
            pattern=EVENT_ID_PATTERN,
            description="unique, ordered id; pass it as `since` to resume",
            examples=["evt-1a2b3c4d5e6f-1767225600000042"],
        ),
    ]
    type: EventTypeName
    timestamp: Timestamp
    source_node_id: Annotated[
        NodeId, Meta(description="the node that observed and published the event")
    ]
    data: dict[str, Any]


# The models that the OpenAPI document refers to, in the order of its components.
RESPONSE_MODELS: tuple[type[msgspec.Struct], ...] = (
    ErrorEnvelope,
    StoreResponse,
    RetrieveResponse,
    DiscoverNodesResponse,
    HealthResponse,
    SystemStatusResponse,
    ProgramStatsResponse,
    VersionResponse,
    ConnectionTestResponse,
    DeployResponse,
    ListAppsResponse,
    AppStatusResponse,
    StopAppResponse,
    ScaleAppResponse,
    LogMessage,
    NetworkEvent,
)
