"""The OpenAPI 3.1 document of the public API, built by `build_openapi(settings)`.

Every public route of `voxanode.api.routes` is listed in `OPERATIONS`, with its
parameters, request body, reply and the error statuses it can return. Bodies are JSON
Schema components made by `msgspec.json.schema_components` from the Structs that the
handlers use to validate requests (`StoreBody`, `AppBody` and its nested Structs) and
from the reply models in `voxanode.api.responses`. The upper limits that depend on
the node settings (TTL, replicas, key length) are written into those schemas from the
settings passed in, so the document matches the node that serves it.

Every error reply is the envelope `ErrorEnvelope`. Bearer authentication is one
global security requirement, lifted for the paths that `voxanode.api.auth` leaves
open. The `/internal/` routes are node-to-node and are not part of the document.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta

import voxanode
from voxanode.api.auth import OPEN_PATHS, WEBSOCKET_TOKEN_PARAMETER
from voxanode.api.ratelimit import DATA_PREFIX, STATUS_PATHS, STATUS_PREFIX
from voxanode.api.responses import (
    APP_ID_PATTERN,
    EVENT_ID_PATTERN,
    NODE_ID_PATTERN,
    RESPONSE_MODELS,
    AppId,
)
from voxanode.api.routes.apps import (
    ADD_APP_PATH,
    DEFAULT_LIST_LIMIT,
    DEFAULT_LOG_TAIL,
    MAX_LIST_LIMIT,
    MAX_LOG_TAIL,
)
from voxanode.api.routes.metrics import METRICS_PATH
from voxanode.api.routes.proxy import (
    PROXY_APP_PATH,
    PROXY_METHODS,
    PROXY_PATH_TEMPLATE,
    PROXY_PREFIX,
)
from voxanode.api.routes.nodes import MAX_CAPABILITY_CHARS, STATUS_NAMES
from voxanode.api.routes.ui import UI_ASSET_PATH, UI_ASSETS, UI_PATH
from voxanode.api.schemas import MIN_REPLICAS, MIN_TTL_SECONDS, StoreBody
from voxanode.apps.catalogue import APP_PHASES
from voxanode.apps.spec import DEFAULT_REPLICAS, MIN_DEPLOY_REPLICAS, AppBody
from voxanode.events import EventType
from voxanode.settings import format_rate_limit

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/{name}"
JSON_MEDIA_TYPE = "application/json"
HTML_MEDIA_TYPE = "text/html"
# The Prometheus text exposition format, version 0.0.4.
PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4"
BEARER_SCHEME_NAME = "bearerAuth"
REQUEST_ID_HEADER = "X-Request-ID"
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
DOCS_ASSET_PATH = "/docs/static/{name}"
# The largest `offset` that GET /apps/list_apps/ accepts.
MAX_LIST_OFFSET = 1_000_000

# The reason for each error status, where an operation gives no reason of its own.
ERROR_DESCRIPTIONS = {
    400: "INVALID_REQUEST: a parameter or the body is invalid. `details.field` names "
    "it and `details.issue` says what is accepted",
    401: "AUTHENTICATION_REQUIRED: the bearer token is missing, unknown or revoked",
    403: "AUTHORIZATION_FAILED: the token's scope does not allow this method",
    404: "RESOURCE_NOT_FOUND",
    409: "RESOURCE_CONFLICT",
    410: "RESOURCE_NOT_FOUND: the resource existed but is gone",
    413: "INVALID_REQUEST: the body is larger than the node's max_body_bytes, or the "
    "value larger than max_value_bytes",
    415: "INVALID_REQUEST: the Content-Type is not application/json with UTF-8",
    422: "DEPLOYMENT_FAILED",
    500: "INTERNAL_ERROR: an unexpected failure. The node log has the details under "
    "the request id",
    503: "SERVICE_UNAVAILABLE",
}
BODY_ERRORS = {413: ERROR_DESCRIPTIONS[413], 415: ERROR_DESCRIPTIONS[415]}
NO_CONTROLLER = "SERVICE_UNAVAILABLE: this node runs no app controller"
FORWARD_FAILED = (
    "SERVICE_UNAVAILABLE: the node responsible for the app did not reply (with "
    "`Retry-After`), or this node runs no app controller"
)
NO_ROOM = "DEPLOYMENT_FAILED: no node has the free memory and CPU for the replicas"


# The bodies of stop and scale. Their handlers check these fields one by one, so these
# Structs only describe the accepted bodies.
class StopAppBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a stop request."""

    app_id: AppId
    force: Annotated[
        bool,
        Meta(
            description="true kills the containers at once; false stops them with "
            "SIGTERM, then SIGKILL after the stop timeout"
        ),
    ] = False


class ScaleAppBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a scale request."""

    app_id: AppId
    replicas: Annotated[
        int,
        Meta(ge=0, description="number of instances, 0 to the node's apps_max_replicas"),
    ]


REQUEST_MODELS: tuple[type[msgspec.Struct], ...] = (
    StoreBody,
    AppBody,
    StopAppBody,
    ScaleAppBody,
)


@dataclass(frozen=True)
class Operation:
    """One public route and method, with what the document states about it."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    description: str
    # Component name of the 200 reply, None for the websocket and docs routes.
    reply: str | None
    # Error statuses with the reason each happens here, or "" for the reason in
    # ERROR_DESCRIPTIONS. 401, 403 (methods other than GET), 429 and 500 are added
    # by _responses where they apply.
    errors: dict[int, str] = field(default_factory=dict)
    parameters: tuple[dict[str, Any], ...] = ()
    # Component name of the JSON request body.
    body: str | None = None
    # Component name of the websocket's text frames. The route replies with 101.
    websocket_message: str | None = None
    # Replies that are not the envelope or the 200 model, by status code.
    extra_responses: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Media type of the 200 reply, for routes that do not reply with JSON.
    reply_media_type: str = JSON_MEDIA_TYPE


def _schema_ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMA_REF.format(name=name)}


def _query(
    name: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _enum(values: Any) -> dict[str, Any]:
    return {"type": "string", "enum": [str(value) for value in values]}


APP_ID_SCHEMA = {"type": "string", "pattern": APP_ID_PATTERN}
WEBSOCKET_UPGRADE_HEADERS = (
    "Open it with a websocket client, which sends `Connection: Upgrade`, "
    "`Upgrade: websocket`, `Sec-WebSocket-Version: 13` and `Sec-WebSocket-Key`."
)
# Browsers cannot set headers on a websocket, so the upgrade request may carry the
# bearer token in the query string instead (voxanode.api.auth).
WEBSOCKET_TOKEN_QUERY = _query(
    WEBSOCKET_TOKEN_PARAMETER,
    {"type": "string"},
    "the bearer token, for clients such as browsers that cannot send an "
    "Authorization header with the upgrade request; ignored when the header is sent",
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/data/store/",
        "storeData",
        "data",
        "Store a value",
        "Store a JSON value under a key on `replicas` nodes for `ttl` seconds. A store "
        "that reaches fewer nodes than requested still succeeds and carries "
        "`warnings`.",
        "StoreResponse",
        errors={
            400: "",
            **BODY_ERRORS,
            503: "SERVICE_UNAVAILABLE: no node stored the value",
        },
        body="StoreBody",
    ),
    Operation(
        "get",
        "/data/retrieve/",
        "retrieveData",
        "data",
        "Retrieve a value",
        "Return the newest unexpired value of a key in the network, with its record "
        "metadata.",
        "RetrieveResponse",
        errors={
            400: "",
            404: "RESOURCE_NOT_FOUND: no value is stored under the key, or it expired",
        },
        parameters=(
            _query(
                "key",
                {"type": "string", "minLength": 1},
                "the key, percent-encoded UTF-8, given once",
                required=True,
            ),
        ),
    ),
    Operation(
        "get",
        "/data/discover_nodes/",
        "discoverNodes",
        "nodes",
        "List the known nodes",
        "Return every member of this node's view of the network, itself included, with "
        "the load each last announced.",
        "DiscoverNodesResponse",
        errors={400: ""},
        parameters=(
            _query(
                "status",
                _enum(STATUS_NAMES),
                "only members with this status",
            ),
            _query(
                "capability",
                {"type": "string", "minLength": 1, "maxLength": MAX_CAPABILITY_CHARS},
                "only members offering this capability, such as app-deployment; case does not matter",
            ),
        ),
    ),
    Operation(
        "get",
        "/status/health",
        "getHealth",
        "status",
        "Node health",
        "Report the node's health and that of each component. A node isolated from "
        "its configured peers is degraded, still with 200. Needs no token.",
        "HealthResponse",
        extra_responses={
            503: {
                "description": "The record storage fails: the node is unhealthy. The "
                "body is the health report, not the error envelope.",
                "content": {JSON_MEDIA_TYPE: {"schema": _schema_ref("HealthResponse")}},
            }
        },
    ),
    Operation(
        "get",
        "/status/system",
        "getSystemStatus",
        "status",
        "System status",
        "Report the node id, host resources, peer traffic and app counts.",
        "SystemStatusResponse",
    ),
    Operation(
        "get",
        METRICS_PATH,
        "getMetrics",
        "status",
        "Prometheus metrics",
        "Report the node's metrics in the Prometheus text format 0.0.4: API requests "
        "and latencies by route, DHT requests and gossip messages by method, records "
        "held, members and app instances by state, Docker call latencies, dropped "
        "datagrams and process figures. Counts in the status rate limit category.",
        None,
        reply_media_type=PROMETHEUS_MEDIA_TYPE,
    ),
    Operation(
        "get",
        "/info/program_stats",
        "getProgramStats",
        "info",
        "Program statistics",
        "Report the API's request counters and the node process's memory and CPU use.",
        "ProgramStatsResponse",
    ),
    Operation(
        "get",
        "/info/version",
        "getVersion",
        "info",
        "Version",
        "Report the version, build date, git commit, environment and features.",
        "VersionResponse",
    ),
    Operation(
        "get",
        "/test/connection",
        "testConnection",
        "test",
        "Test the connection to peers",
        "Ping up to three known peers, resolve the bootstrap host names and check the "
        "record storage. `success` is true when a peer replied, or when the node has "
        "no peers and none configured.",
        "ConnectionTestResponse",
    ),
    Operation(
        "post",
        "/apps/add_app/",
        "addApp",
        "apps",
        "Deploy an app",
        "Validate the app spec and deploy it through the node responsible for the "
        "app's name. Images are used as the node's docker_pull_policy allows.",
        "DeployResponse",
        errors={
            400: "",
            **BODY_ERRORS,
            409: "RESOURCE_CONFLICT: an active app already has this name",
            422: "DEPLOYMENT_FAILED: no instance could start, for example because the "
            "image is not present and may not be pulled",
            503: f"{FORWARD_FAILED}. {NO_ROOM}",
        },
        body="AppBody",
    ),
    Operation(
        "get",
        "/apps/list_apps/",
        "listApps",
        "apps",
        "List apps",
        "Return a page of the app catalogue, oldest app first.",
        "ListAppsResponse",
        errors={400: "", 503: NO_CONTROLLER},
        parameters=(
            _query("status", _enum(APP_PHASES), "only apps in this phase"),
            _query(
                "node_id",
                {"type": "string", "pattern": NODE_ID_PATTERN},
                "only apps with an instance on this node",
            ),
            _query(
                "limit",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIST_LIMIT,
                    "default": DEFAULT_LIST_LIMIT,
                },
                "apps per page",
            ),
            _query(
                "offset",
                {"type": "integer", "minimum": 0, "maximum": MAX_LIST_OFFSET, "default": 0},
                "apps to skip",
            ),
        ),
    ),
    Operation(
        "get",
        "/apps/get_app_status/",
        "getAppStatus",
        "apps",
        "App status",
        "Return one app with each instance's node, ports, health and resource use, "
        "fetched fresh from the nodes that run them.",
        "AppStatusResponse",
        errors={400: "", 404: "RESOURCE_NOT_FOUND: no app has this id", 503: NO_CONTROLLER},
        parameters=(_query("app_id", APP_ID_SCHEMA, "the app's id", required=True),),
    ),
    Operation(
        "post",
        "/apps/add_stop_app/",
        "stopApp",
        "apps",
        "Stop an app",
        "Stop every instance of the app and remove its containers.",
        "StopAppResponse",
        errors={
            400: "",
            **BODY_ERRORS,
            404: "RESOURCE_NOT_FOUND: no app has this id",
            409: "RESOURCE_CONFLICT: the app is already stopped",
            503: FORWARD_FAILED,
        },
        body="StopAppBody",
    ),
    Operation(
        "post",
        "/apps/add_scale_app/",
        "scaleApp",
        "apps",
        "Scale an app",
        "Set the number of instances of an active app. 0 keeps the app but runs no "
        "instance.",
        "ScaleAppResponse",
        errors={
            400: "",
            **BODY_ERRORS,
            404: "RESOURCE_NOT_FOUND: no app has this id",
            409: "RESOURCE_CONFLICT: the app is stopped or failed; deploy it again",
            503: f"{FORWARD_FAILED}. {NO_ROOM}",
        },
        body="ScaleAppBody",
    ),
    Operation(
        "get",
        "/ws/network/events",
        "streamNetworkEvents",
        "events",
        "Network events (websocket)",
        "A websocket of node and app events, one `NetworkEvent` JSON text frame each. "
        f"{WEBSOCKET_UPGRADE_HEADERS} The server ignores frames from the client. It "
        "closes with 1001 when the node shuts down, 1009 for a client frame over 4096 "
        "bytes, 1011 when sending fails, and 4008 when the client reads too slowly; "
        "such a client may reconnect with `since`.",
        None,
        errors={
            400: "INVALID_REQUEST: no websocket upgrade headers, a malformed `since` or "
            "an unknown event type",
            404: "RESOURCE_NOT_FOUND: this node never published the `since` event",
            410: "RESOURCE_NOT_FOUND: the `since` event is no longer buffered",
            503: "SERVICE_UNAVAILABLE: the node is shutting down",
        },
        parameters=(
            _query(
                "since",
                {"type": "string", "pattern": EVENT_ID_PATTERN},
                "replay the buffered events after this event id first, then send live "
                "events with no gap",
            ),
            {
                "name": "types",
                "in": "query",
                "required": False,
                "description": "only events of these types, comma-separated; the "
                "parameter may also be repeated",
                "style": "form",
                "explode": False,
                "schema": {
                    "type": "array",
                    "minItems": 1,
                    "items": _enum(EventType),
                },
            },
            WEBSOCKET_TOKEN_QUERY,
        ),
        websocket_message="NetworkEvent",
    ),
    Operation(
        "get",
        "/ws/apps/{app_id}/logs",
        "streamAppLogs",
        "apps",
        "App logs (websocket)",
        "A websocket of the log lines of every instance of the app, wherever it runs, "
        f"one `LogMessage` JSON text frame each. {WEBSOCKET_UPGRADE_HEADERS} A followed "
        "stream picks up instances started later and closes with 1000 when the app "
        "stops. A client that reads too slowly is closed with 4008.",
        None,
        errors={
            400: "INVALID_REQUEST: a malformed app id, `tail` or `follow`, or no "
            "websocket upgrade headers",
            404: "RESOURCE_NOT_FOUND: no app has this id",
            503: NO_CONTROLLER,
        },
        parameters=(
            {
                "name": "app_id",
                "in": "path",
                "required": True,
                "description": "the app's id",
                "schema": APP_ID_SCHEMA,
            },
            _query(
                "tail",
                {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_LOG_TAIL,
                    "default": DEFAULT_LOG_TAIL,
                },
                "lines of history per instance to send first; 0 for none",
            ),
            _query(
                "follow",
                {"type": "boolean", "default": True},
                "false sends the history and closes with 1000. Also accepts 1, 0, yes "
                "and no",
            ),
            WEBSOCKET_TOKEN_QUERY,
        ),
        websocket_message="LogMessage",
    ),
    Operation(
        "get",
        "/openapi.json",
        "getOpenApi",
        "docs",
        "This OpenAPI document",
        "The OpenAPI 3.1 document of the public API, with this node's limits.",
        "OpenApiDocument",
    ),
    Operation(
        "get",
        "/docs",
        "getSwaggerUi",
        "docs",
        "Interactive API documentation",
        "Swagger UI for this document, served by the node with no external requests.",
        None,
        reply_media_type=HTML_MEDIA_TYPE,
    ),
    Operation(
        "get",
        "/redoc",
        "getRedoc",
        "docs",
        "API reference",
        "ReDoc for this document, served by the node with no external requests.",
        None,
        reply_media_type=HTML_MEDIA_TYPE,
    ),
    Operation(
        "get",
        DOCS_ASSET_PATH,
        "getDocsAsset",
        "docs",
        "Documentation asset",
        "A script or style sheet of the documentation pages.",
        None,
        errors={404: "RESOURCE_NOT_FOUND: no asset has this name"},
        extra_responses={
            304: {"description": "Not Modified: `If-None-Match` lists the asset's ETag"}
        },
        parameters=(
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": "file name of the asset",
                "schema": {"type": "string", "minLength": 1},
            },
        ),
        reply_media_type="*/*",
    ),
    Operation(
        "get",
        UI_PATH,
        "getDashboard",
        "docs",
        "Web dashboard",
        "The node's web dashboard: members, apps and their instances, the event feed "
        "and app logs, with deploy, scale and stop. The page and its files need no "
        "token; its script asks for one when the API replies 401 and sends it with "
        "every request. `/ui` redirects here.",
        None,
        reply_media_type=HTML_MEDIA_TYPE,
    ),
    Operation(
        "get",
        UI_ASSET_PATH,
        "getDashboardAsset",
        "docs",
        "Dashboard asset",
        "The style sheet or script of the web dashboard.",
        None,
        errors={404: "RESOURCE_NOT_FOUND: no asset has this name"},
        extra_responses={
            304: {"description": "Not Modified: `If-None-Match` lists the asset's ETag"}
        },
        parameters=(
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": "file name of the asset",
                "schema": {"type": "string", "enum": sorted(UI_ASSETS)},
            },
        ),
        reply_media_type="*/*",
    ),
)


PROXY_DESCRIPTION = (
    "App traffic: the request goes to a running, healthy instance of the app named by "
    "`app` (its name or id), with the rest of the path and the query string unchanged, "
    "and the instance's reply comes back as it is: any status, headers and body. "
    "Hop-by-hop headers are dropped and `X-Forwarded-For`, `X-Forwarded-Proto` and "
    "`X-Forwarded-Host` added. Needs no token: an Authorization header goes to the app. "
    "A websocket upgrade on GET is proxied too. Counts in the ingress rate limit category."
)
PROXY_ERRORS = {
    404: "RESOURCE_NOT_FOUND: no app has this name or id",
    502: "NETWORK_ERROR: the connection to the instance failed, its reply to HEAD was "
    "not valid HTTP, or it refused a websocket upgrade",
    503: "SERVICE_UNAVAILABLE: no running, healthy instance can take the request yet "
    "(with `Retry-After`), the app is stopped, failed, scaled to 0 or publishes no TCP "
    "port (without `Retry-After`), or this node runs no app controller",
    504: "NETWORK_ERROR: the instance sent nothing within the node's "
    "ingress_read_timeout_seconds",
}
PROXY_PARAMETERS = {
    "app": {
        "name": "app",
        "in": "path",
        "required": True,
        "description": "the app's name or id",
        "schema": {"type": "string", "minLength": 1},
    },
    "path": {
        "name": "path",
        "in": "path",
        "required": True,
        "description": "the path sent to the instance, after its leading slash",
        "schema": {"type": "string"},
    },
}
PROXY_APP_REPLY = {"default": {"description": "The app's own reply, whatever its status."}}


def _proxy_operations() -> tuple[Operation, ...]:
    """Return the free-form operations of the proxy routes, one per path and method."""
    operations = []
    for path, parameters in (
        (PROXY_APP_PATH, (PROXY_PARAMETERS["app"],)),
        (PROXY_PATH_TEMPLATE, (PROXY_PARAMETERS["app"], PROXY_PARAMETERS["path"])),
    ):
        suffix = "Path" if path == PROXY_PATH_TEMPLATE else "Root"
        for method in PROXY_METHODS:
            operations.append(
                Operation(
                    method.lower(),
                    path,
                    f"proxy{method.capitalize()}{suffix}",
                    "ingress",
                    f"App traffic ({method})",
                    PROXY_DESCRIPTION,
                    None,
                    errors=dict(PROXY_ERRORS),
                    parameters=parameters,
                    extra_responses=dict(PROXY_APP_REPLY),
                    reply_media_type="*/*",
                )
            )
    return tuple(operations)


OPERATIONS += _proxy_operations()


def build_openapi(settings: Any, asset_names: Iterable[str] = ()) -> dict[str, Any]:
    """Return the OpenAPI document as a JSON-ready dict, with the limits of `settings`.

    `asset_names` are the file names that `/docs/static/{name}` serves.
    """
    _, schemas = msgspec.json.schema_components(
        REQUEST_MODELS + RESPONSE_MODELS, ref_template=SCHEMA_REF
    )
    _apply_setting_limits(schemas, settings)
    schemas["OpenApiDocument"] = {
        "title": "OpenApiDocument",
        "description": "An OpenAPI 3.1 document",
        "type": "object",
        "required": ["openapi", "info", "paths"],
        "properties": {"openapi": {"type": "string", "pattern": r"^3\.1\.[0-9]+$"}},
    }

    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method] = _operation_object(
            operation, _rate_limit(operation, settings)
        )
    names = sorted(asset_names)
    if names:
        asset_parameter = paths[DOCS_ASSET_PATH]["get"]["parameters"][0]
        asset_parameter["schema"] = {"type": "string", "enum": names}

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "voxanode API",
            "version": voxanode.__version__,
            "description": INFO_DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": TAGS,
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "headers": _header_components(),
            "securitySchemes": {
                BEARER_SCHEME_NAME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from the node's token file, created with "
                    "`voxanode token create`. GET needs scope read, other methods scope "
                    "write (admin includes write). A node started with --dev needs "
                    "no token.",
                }
            },
        },
        "security": [{BEARER_SCHEME_NAME: []}],
    }


INFO_DESCRIPTION = """\
The REST API of a voxanode node: data storage in the DHT, node discovery, status,
apps and two websockets. Any node serves every route.

Every error reply is the envelope `{"success": false, "error": {"code", "message",
"details"}, "timestamp", "request_id"}`, also for unknown paths (404) and wrong
methods (405, with the `Allow` header). Every reply carries `X-Request-ID`: the
client's own `X-Request-ID` when it is 1 to 64 characters of `A-Z a-z 0-9 . _ -`,
else a new id.

Integer fields take JSON numbers written without a fraction or exponent: `3.0` and
`3e0` are rejected with 400, although JSON Schema counts them as integers.

Requests need `Authorization: Bearer TOKEN` unless the node runs with `--dev`;
`/status/health` and the app traffic routes under `/proxy/` never need one.

Each client address has a request budget per window for deployments, for `/data/`
routes, for `/status/` routes and `/metrics`, for app traffic under `/proxy/`, and
for all other routes, set by the
node's `rate_limit_*` settings. Replies to a limited route carry `X-RateLimit-Limit`,
`X-RateLimit-Remaining` and `X-RateLimit-Reset`, and a request over the budget gets
429 with `Retry-After`. The operations of limited routes list the 429 reply.
"""

TAGS = [
    {"name": "data", "description": "Values stored in the DHT"},
    {"name": "nodes", "description": "The members of the network"},
    {"name": "status", "description": "Health and system status"},
    {"name": "info", "description": "Program statistics and version"},
    {"name": "test", "description": "Live connection checks"},
    {"name": "apps", "description": "Containers deployed across the network"},
    {"name": "events", "description": "The network event stream"},
    {"name": "docs", "description": "This document and its viewers"},
    {"name": "ingress", "description": "App traffic to the instances of an app"},
]


def _apply_setting_limits(schemas: dict[str, Any], settings: Any) -> None:
    """Write the limits that come from the node settings into the body schemas."""
    store = schemas["StoreBody"]["properties"]
    store["key"]["maxLength"] = settings.max_key_bytes
    store["ttl"].update(
        minimum=MIN_TTL_SECONDS,
        maximum=settings.max_ttl_seconds,
        default=settings.default_ttl_seconds,
    )
    store["replicas"].update(
        minimum=MIN_REPLICAS, maximum=settings.ksize, default=settings.default_replicas
    )

    max_app_replicas = settings.apps_max_replicas
    schemas["AppBody"]["properties"]["replicas"].update(
        minimum=MIN_DEPLOY_REPLICAS, maximum=max_app_replicas, default=DEFAULT_REPLICAS
    )
    schemas["ScaleAppBody"]["properties"]["replicas"]["maximum"] = max_app_replicas


def _rate_limit(operation: Operation, settings: Any) -> Any:
    """Return the rate limit of the operation's category, or None when it has none.

    These are the categories of `voxanode.api.ratelimit.request_category`, decided by
    the route template and method.
    """
    if operation.path.startswith(STATUS_PREFIX) or operation.path in STATUS_PATHS:
        return settings.rate_limit_status
    if operation.path.startswith(PROXY_PREFIX):
        return settings.rate_limit_ingress
    if operation.path.startswith(DATA_PREFIX):
        return settings.rate_limit_data
    if operation.method == "post" and operation.path == ADD_APP_PATH:
        return settings.rate_limit_deployments
    return settings.rate_limit_default


def _operation_object(operation: Operation, rate_limit: Any) -> dict[str, Any]:
    public = operation.path in OPEN_PATHS or operation.path.startswith(PROXY_PREFIX)
    document: dict[str, Any] = {
        "operationId": operation.operation_id,
        "tags": [operation.tag],
        "summary": operation.summary,
        "description": operation.description,
    }
    if operation.parameters:
        document["parameters"] = list(operation.parameters)
    if operation.body is not None:
        document["requestBody"] = {
            "required": True,
            "content": {JSON_MEDIA_TYPE: {"schema": _schema_ref(operation.body)}},
        }
    document["responses"] = _responses(operation, public, rate_limit)
    if public:
        document["security"] = []
    if operation.websocket_message is not None:
        document["x-websocket-message"] = _schema_ref(operation.websocket_message)
    return document


def _responses(operation: Operation, public: bool, rate_limit: Any) -> dict[str, Any]:
    rate_limited = rate_limit is not None
    responses: dict[str, Any] = {}

    if operation.websocket_message is not None:
        responses["101"] = {
            "description": "Switching Protocols: the websocket is open. Each text "
            f"frame is one `{operation.websocket_message}` JSON object.",
            "headers": _reply_headers(rate_limited),
        }
    else:
        content_schema: dict[str, Any] = (
            _schema_ref(operation.reply) if operation.reply else {"type": "string"}
        )
        responses["200"] = {
            "description": "OK",
            "headers": _reply_headers(rate_limited),
            "content": {operation.reply_media_type: {"schema": content_schema}},
        }

    errors = dict(operation.errors)
    if not public:
        errors.setdefault(401, "")
        if operation.method != "get":
            errors.setdefault(403, "")
    if rate_limited:
        errors.setdefault(
            429,
            f"RATE_LIMIT_EXCEEDED: this node allows {format_rate_limit(rate_limit)} "
            "such requests per client address. Retry after `Retry-After` seconds",
        )
    errors.setdefault(500, "")

    for status in sorted(errors):
        responses[str(status)] = _error_response(
            status, errors[status] or ERROR_DESCRIPTIONS[status], rate_limited
        )
    for status, response in operation.extra_responses.items():
        responses[str(status)] = {**response, "headers": _reply_headers(rate_limited)}
    return dict(sorted(responses.items()))


def _error_response(status: int, description: str, rate_limited: bool) -> dict[str, Any]:
    headers = _reply_headers(rate_limited)
    if status == 401:
        headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
    if status == 429:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return {
        "description": description,
        "headers": headers,
        "content": {JSON_MEDIA_TYPE: {"schema": _schema_ref("ErrorEnvelope")}},
    }


def _reply_headers(rate_limited: bool) -> dict[str, Any]:
    names = (REQUEST_ID_HEADER, *RATE_LIMIT_HEADERS) if rate_limited else (REQUEST_ID_HEADER,)
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _header_components() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    return {
        REQUEST_ID_HEADER: {
            "description": "the request's id, as in the error envelope's request_id",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        },
        "X-RateLimit-Limit": {
            "description": "requests that this client may send to the route's category "
            "in one window",
            "required": False,
            "schema": count,
        },
        "X-RateLimit-Remaining": {
            "description": "requests left in the current window, after this one",
            "required": False,
            "schema": count,
        },
        "X-RateLimit-Reset": {
            "description": "Unix time in whole seconds when the current window ends",
            "required": False,
            "schema": count,
        },
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "required": True,
            "schema": count,
        },
        "WWW-Authenticate": {
            "description": 'the bearer challenge, such as `Bearer realm="voxanode"`',
            "required": True,
            "schema": {"type": "string"},
        },
    }
