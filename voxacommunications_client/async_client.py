"""AsyncVoxaClient: the asyncio client of a voxanode node's REST and websocket API.

This is the one implementation of every call; `VoxaClient` runs it on a private event
loop. The routes are grouped as on the node: `apps`, `data`, `nodes`, `status`, `info`,
`test`, and `events()` for the network event stream.
"""

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from voxacommunications_client._transport import MessageStream, Transport
from voxacommunications_client.errors import DeploymentFailed, WaitTimeout
from voxacommunications_client.models import (
    App,
    AppList,
    AppStatus,
    ConnectionTest,
    DataValue,
    Event,
    Health,
    LogEntry,
    NodeList,
    ProgramStats,
    ScaleResult,
    StopResult,
    StoreResult,
    SystemStatus,
    VersionInfo,
)

DEFAULT_URL = "http://127.0.0.1:9999"
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_SECONDS = 0.5
DEFAULT_MAX_BACKOFF_SECONDS = 8.0
DEFAULT_LIST_LIMIT = 50
DEFAULT_LOG_TAIL_LINES = 100
DEFAULT_WAIT_TIMEOUT_SECONDS = 120.0
DEFAULT_POLL_INTERVAL_SECONDS = 0.5
APP_RUNNING = "running"
APP_FAILED = "failed"
APP_STOPPED = "stopped"

logger = logging.getLogger(__name__)


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


class AsyncApps:
    """App routes: deploy, list, status, scale, stop, logs, and waiting for an app to run."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def deploy(
        self,
        name: str,
        image: str,
        replicas: int = 1,
        *,
        resources: Mapping[str, str] | None = None,
        environment: Mapping[str, str] | None = None,
        ports: Sequence[Mapping[str, Any]] | None = None,
        health_check: Mapping[str, Any] | None = None,
        restart: str | None = None,
        command: Sequence[str] | None = None,
    ) -> App:
        """Deploy an app. The node replies once its instances are started.

        `resources` is {"memory": "64m", "cpu": "0.5"} and `ports` a list of
        {"container_port", "protocol"}. Options left as None are not sent.
        """
        spec = {"name": name, "image": image, "replicas": replicas}
        spec.update(
            _without_none(
                {
                    "resources": None if resources is None else dict(resources),
                    "environment": None if environment is None else dict(environment),
                    "ports": None if ports is None else [dict(port) for port in ports],
                    "health_check": None if health_check is None else dict(health_check),
                    "restart": restart,
                    "command": None if command is None else list(command),
                }
            )
        )
        body = await self._transport.request("POST", "/apps/add_app/", json_body=spec)
        return App.from_json(body, name)

    async def list(
        self,
        *,
        status: str | None = None,
        node_id: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        offset: int = 0,
    ) -> AppList:
        """Return one page of the app list, oldest app first, filtered by phase or node."""
        params = {"status": status, "node_id": node_id, "limit": limit, "offset": offset}
        return AppList.from_json(await self._transport.request("GET", "/apps/list_apps/", params=params))

    async def get_status(self, app_id: str) -> AppStatus:
        """Return one app with its replica counts and instances."""
        body = await self._transport.request("GET", "/apps/get_app_status/", params={"app_id": app_id})
        return AppStatus.from_json(body)

    async def scale(self, app_id: str, replicas: int) -> ScaleResult:
        """Set the number of replicas of an app (0 is allowed)."""
        body = await self._transport.request(
            "POST", "/apps/add_scale_app/", json_body={"app_id": app_id, "replicas": replicas}
        )
        return ScaleResult.from_json(body)

    async def stop(self, app_id: str, *, force: bool = False) -> StopResult:
        """Stop an app and remove its containers. With `force` they are killed at once."""
        body = await self._transport.request(
            "POST", "/apps/add_stop_app/", json_body={"app_id": app_id, "force": force}
        )
        return StopResult.from_json(body)

    def logs(self, app_id: str, *, follow: bool = True, tail: int = DEFAULT_LOG_TAIL_LINES) -> MessageStream[LogEntry]:
        """Return an async iterator over the log lines of every instance of an app.

        It starts with up to `tail` lines of history per instance. With `follow` it then
        goes on with new lines and ends when the app stops. Without, it ends after the
        history. Use `async with` (or `aclose()`) to close the websocket when done early.
        """
        params = {"tail": tail, "follow": "true" if follow else "false"}
        return self._transport.stream(f"/ws/apps/{app_id}/logs", params, LogEntry.from_json)

    async def wait_until_running(
        self,
        app_id: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT_SECONDS,
        poll_interval: float = DEFAULT_POLL_INTERVAL_SECONDS,
        on_progress: Callable[[AppStatus], None] | None = None,
    ) -> AppStatus:
        """Poll the app's status until it is running, and return that status.

        `on_progress` is called with every status read. Raises DeploymentFailed when the
        app is failed, and WaitTimeout when it is stopped or not running after `timeout`
        seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.get_status(app_id)
            if on_progress is not None:
                on_progress(status)
            if status.status == APP_RUNNING:
                return status
            if status.status == APP_FAILED:
                raise _failed_app_error(status)
            if status.status == APP_STOPPED:
                raise WaitTimeout(f"app {app_id} is stopped, so it will not reach running", last_status=status)
            if loop.time() + poll_interval > deadline:
                raise WaitTimeout(
                    f"app {app_id} was not running after {timeout:g} s: status {status.status}, "
                    f"{status.replicas.running} of {status.replicas.desired} replicas running",
                    last_status=status,
                )
            await asyncio.sleep(poll_interval)


def _failed_app_error(status: AppStatus) -> DeploymentFailed:
    reason = (status.last_error or {}).get("reason") or "no reason recorded"
    return DeploymentFailed(
        f"app {status.id} failed: {reason}",
        code="DEPLOYMENT_FAILED",
        details={"app_id": status.id, **(status.last_error or {})},
    )


class AsyncData:
    """Data routes: store and retrieve JSON values in the network."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def store(self, key: str, value: Any, *, ttl: int | None = None, replicas: int | None = None) -> StoreResult:
        """Store a JSON value under `key` for `ttl` seconds on `replicas` nodes (node defaults when None)."""
        body = {"key": key, "value": value, **_without_none({"ttl": ttl, "replicas": replicas})}
        return StoreResult.from_json(await self._transport.request("POST", "/data/store/", json_body=body))

    async def retrieve(self, key: str) -> DataValue:
        """Return the newest unexpired value of `key`, or raise NotFound when there is none."""
        return DataValue.from_json(await self._transport.request("GET", "/data/retrieve/", params={"key": key}))


class AsyncNodes:
    """The discovery route: the members in a node's view of the network."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def discover(self, *, status: str | None = None, capability: str | None = None) -> NodeList:
        """Return the node's view of the network, filtered by member status or capability."""
        params = {"status": status, "capability": capability}
        return NodeList.from_json(await self._transport.request("GET", "/data/discover_nodes/", params=params))


class AsyncStatus:
    """Status routes: health and system status."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def health(self) -> Health:
        return Health.from_json(await self._transport.request("GET", "/status/health"))

    async def system(self) -> SystemStatus:
        return SystemStatus.from_json(await self._transport.request("GET", "/status/system"))


class AsyncInfo:
    """Info routes: version and program statistics."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def version(self) -> VersionInfo:
        return VersionInfo.from_json(await self._transport.request("GET", "/info/version"))

    async def program_stats(self) -> ProgramStats:
        return ProgramStats.from_json(await self._transport.request("GET", "/info/program_stats"))


class AsyncTest:
    """The test route: the node's live connection check."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def connection(self) -> ConnectionTest:
        return ConnectionTest.from_json(await self._transport.request("GET", "/test/connection"))


class AsyncVoxaClient:
    """Client of one node's API, for asyncio code. Use `async with`, or call `close()`.

    Its HTTP session is made on the first call and belongs to that call's event loop,
    so one client serves one event loop.

    `token` is the bearer token for nodes that run without --dev. `timeout` bounds each
    attempt of a request in seconds. `retries`, `backoff` and `max_backoff` set the
    retries of failed requests, as the `_transport` module describes.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_SECONDS,
        max_backoff: float = DEFAULT_MAX_BACKOFF_SECONDS,
    ) -> None:
        self._transport = Transport(
            url, token=token, timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff
        )
        self.apps = AsyncApps(self._transport)
        self.data = AsyncData(self._transport)
        self.nodes = AsyncNodes(self._transport)
        self.status = AsyncStatus(self._transport)
        self.info = AsyncInfo(self._transport)
        self.test = AsyncTest(self._transport)

    @property
    def url(self) -> str:
        """The node's base URL."""
        return self._transport.base_url

    def authenticate(self, token: str | None) -> None:
        """Set the bearer token sent with every later request (None sends none)."""
        self._transport.token = token

    def events(self, *, types: str | Iterable[str] | None = None, since: str | None = None) -> MessageStream[Event]:
        """Return an async iterator over the node's network events as they happen.

        `types` limits the stream to those event types. `since`, an event id, first
        replays the events after it. Use `async with` (or `aclose()`) to close the
        websocket when done.
        """
        if types is not None and not isinstance(types, str):
            types = ",".join(types)
        return self._transport.stream("/ws/network/events", {"types": types, "since": since}, Event.from_json)

    async def close(self) -> None:
        """Close the HTTP session and every open stream. Safe to call twice."""
        await self._transport.close()

    async def __aenter__(self) -> "AsyncVoxaClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
