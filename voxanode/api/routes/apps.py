"""The app routes: deploy, list, status, stop, scale, and the logs websocket.

Every node serves every route. Changes go to the app's responsible node (see
`voxanode.apps.controller`). List and status read this node's catalogue, and status
first fetches fresh instance figures from the nodes running the app.

`WebSocket /ws/apps/{app_id}/logs` merges the log lines of every instance of the app,
wherever it runs, as JSON text frames: `timestamp`, `level`, `message`,
`instance_id`, `node_id` and `metadata.stream`. Query parameters: `tail=N` (lines of
history per instance first, default 100, 0 for none) and `follow=false` (send the
history of all instances merged in time order, and close with 1000 instead of
following). A followed stream also picks up
instances started later (scaling, replacements) and closes with 1000 when the app
stops. A client that reads too slowly for its queue is closed with 4008. `level` is
the level word a line starts with (error, warn, info, debug), else "info" for stdout
and "error" for stderr.
"""

import asyncio
import json
import logging
import re
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractStreamWriter

from voxanode.api.errors import ApiError, ErrorCode, invalid_field
from voxanode.api.json_body import read_json_object
from voxanode.api.keys import NODE_KEY, request_id_of
from voxanode.api.response_headers import prepare_stream
from voxanode.api.routes import add_get, add_post
from voxanode.api.routes.events import abort_connection, bound_unsent_data
from voxanode.apps.catalogue import APP_PHASES, STATE_ACTIVE
from voxanode.apps.peer_calls import PeerCallError
from voxanode.apps.spec import SpecLimits, check_scale_replicas, parse_app_spec

ADD_APP_PATH = "/apps/add_app/"
LIST_APPS_PATH = "/apps/list_apps/"
APP_STATUS_PATH = "/apps/get_app_status/"
STOP_APP_PATH = "/apps/add_stop_app/"
SCALE_APP_PATH = "/apps/add_scale_app/"
LOGS_PATH = "/ws/apps/{app_id}/logs"

APP_ID_PATTERN = re.compile(r"app-[0-9a-f]{12}")
NODE_ID_PATTERN = re.compile(r"node-[0-9a-f]{12}")
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500
DEFAULT_LOG_TAIL = 100
MAX_LOG_TAIL = 10_000
LOG_CLIENT_QUEUE_LINES = 2000
# Seconds a log stream waits for its close handshake before it resets the connection.
LOG_CLOSE_TIMEOUT_SECONDS = 5.0
# Most lines of history one follow=false request collects before sorting them.
MAX_HISTORY_LINES = 200_000
LOG_SOURCE_POLL_SECONDS = 1.0
LOG_HEARTBEAT_SECONDS = 20.0
SLOW_CLIENT_CLOSE_CODE = 4008
LEVEL_PATTERN = re.compile(r"^\W{0,2}(?P<level>error|err|warning|warn|info|debug|fatal|critical)\b", re.I)
LEVEL_NAMES = {"err": "error", "warn": "warning", "fatal": "error", "critical": "error"}

logger = logging.getLogger(__name__)


LOG_STREAMS_KEY = web.AppKey("app_log_streams", set)


def add_routes(app: web.Application) -> None:
    app[LOG_STREAMS_KEY] = set()
    app.on_shutdown.append(close_log_streams)
    add_post(app, ADD_APP_PATH, add_app)
    add_get(app, LIST_APPS_PATH, list_apps)
    add_get(app, APP_STATUS_PATH, get_app_status)
    add_post(app, STOP_APP_PATH, stop_app)
    add_post(app, SCALE_APP_PATH, scale_app)
    app.router.add_get(LOGS_PATH, app_logs)


def _controller(request: web.Request):
    apps = getattr(request.app[NODE_KEY], "apps", None)
    if apps is None:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, "this node runs no app controller")
    return apps


def spec_limits(settings: Any) -> SpecLimits:
    return SpecLimits(
        max_replicas=settings.apps_max_replicas,
        allowed_capabilities=frozenset(settings.apps_allowed_capabilities),
    )


def _app_id(value: Any, field: str = "app_id") -> str:
    if not isinstance(value, str):
        raise invalid_field(field, 'must be an app id string such as "app-0123456789ab"')
    if not APP_ID_PATTERN.fullmatch(value):
        raise invalid_field(field, 'must be an app id: "app-" and 12 hex digits')
    return value


def _check_fields(body: dict, accepted: tuple[str, ...]) -> None:
    for name in body:
        if name not in accepted:
            raise invalid_field(name, f"is not an accepted field (accepted: {', '.join(accepted)})")
    for name in accepted[:1]:
        if name not in body:
            raise invalid_field(name, "is required")


async def add_app(request: web.Request) -> web.Response:
    """Validate the app spec and deploy it through the app's responsible node."""
    controller = _controller(request)
    body = await read_json_object(request)
    spec = parse_app_spec(body, spec_limits(request.app[NODE_KEY].settings))
    answer = await controller.deploy(spec, request_id_of(request))
    return web.json_response(answer)


async def list_apps(request: web.Request) -> web.Response:
    controller = _controller(request)
    query = request.query
    status = query.get("status")
    if status is not None and status not in APP_PHASES:
        raise invalid_field("status", f"must be one of {', '.join(APP_PHASES)}")
    node_id = query.get("node_id")
    if node_id is not None and not NODE_ID_PATTERN.fullmatch(node_id):
        raise invalid_field("node_id", 'must be a node id: "node-" and 12 hex digits')
    limit = _int_query(query.get("limit"), "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
    offset = _int_query(query.get("offset"), "offset", 0, 0, 1_000_000)
    return web.json_response(controller.list_apps(status, node_id, limit, offset))


def _int_query(raw: str | None, field: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
        raise invalid_field(field, f"must be an integer from {low} to {high}")
    return int(raw)


async def get_app_status(request: web.Request) -> web.Response:
    controller = _controller(request)
    raw = request.query.get("app_id")
    if raw is None:
        raise invalid_field("app_id", "is required as a query parameter")
    return web.json_response(await controller.app_status(_app_id(raw)))


async def stop_app(request: web.Request) -> web.Response:
    controller = _controller(request)
    body = await read_json_object(request)
    _check_fields(body, ("app_id", "force"))
    app_id = _app_id(body["app_id"])
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise invalid_field("force", "must be true or false")
    return web.json_response(await controller.stop_app(app_id, force, request_id_of(request)))


async def scale_app(request: web.Request) -> web.Response:
    controller = _controller(request)
    settings = request.app[NODE_KEY].settings
    body = await read_json_object(request)
    _check_fields(body, ("app_id", "replicas"))
    app_id = _app_id(body["app_id"])
    if "replicas" not in body:
        raise invalid_field("replicas", "is required")
    replicas = check_scale_replicas(body["replicas"], spec_limits(settings))
    return web.json_response(await controller.scale(app_id, replicas, request_id_of(request)))


# -- logs -------------------------------------------------------------------------------


def log_message(line: dict, instance_id: str, node_id: str) -> dict:
    """Shape one container log line as a logs websocket message."""
    text = str(line.get("message", ""))
    stream = line.get("stream", "stdout")
    match = LEVEL_PATTERN.match(text)
    if match is not None:
        word = match["level"].lower()
        level = LEVEL_NAMES.get(word, word)
    else:
        level = "error" if stream == "stderr" else "info"
    return {
        "timestamp": line.get("timestamp"),
        "level": level,
        "message": text,
        "instance_id": instance_id,
        "node_id": node_id,
        "metadata": {"stream": stream},
    }


def _bool_query(raw: str | None, field: str, default: bool) -> bool:
    if raw is None:
        return default
    word = raw.lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise invalid_field(field, "must be true or false")


async def app_logs(request: web.Request) -> web.StreamResponse:
    """Merge the log lines of every instance of an app into one websocket."""
    controller = _controller(request)
    app_id = _app_id(request.match_info["app_id"])
    tail = _int_query(request.query.get("tail"), "tail", DEFAULT_LOG_TAIL, 0, MAX_LOG_TAIL)
    follow = _bool_query(request.query.get("follow"), "follow", True)
    controller.log_sources(app_id)  # 404 for an unknown app, before the upgrade
    websocket = web.WebSocketResponse(heartbeat=LOG_HEARTBEAT_SECONDS, max_msg_size=4096)
    if not websocket.can_prepare(request).ok:
        raise invalid_field("upgrade", "this route needs a websocket upgrade request", status=400)
    # The same bounds as the event stream: a client that stops reading fills the
    # queue of LOG_CLIENT_QUEUE_LINES instead of the node's memory, and gets 4008.
    bound_unsent_data(request)
    writer = await prepare_stream(request, websocket)
    assert writer is not None, "a prepared websocket has a writer"
    request_id = request_id_of(request)
    logger.info("log stream opened request=%s app=%s tail=%d follow=%s", request_id, app_id, tail, follow)
    stream = _LogStream(controller, app_id, tail, follow, request_id)
    streams = request.app[LOG_STREAMS_KEY]
    streams.add(stream)
    try:
        code, reason = await stream.run(websocket, writer, request.transport)
    finally:
        streams.discard(stream)
    if not websocket.closed:
        try:
            await asyncio.wait_for(websocket.close(code=code, message=reason.encode()), LOG_CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            # A client that does not read keeps the close frame behind the unsent lines.
            abort_connection(request)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            # Not this handler's cancellation, so a wait inside aiohttp's close was cancelled.
            logger.warning(
                "closing log stream failed, resetting the connection request=%s app=%s code=%s", request_id, app_id, code
            )
            abort_connection(request)
    logger.info("log stream closed request=%s app=%s code=%s reason=%s", request_id, app_id, code, reason)
    return websocket


async def close_log_streams(app: web.Application) -> None:
    """End every open logs websocket with 1001, as the app's on_shutdown step."""
    for stream in list(app[LOG_STREAMS_KEY]):
        stream.shutting_down.set()


class _LogStream:
    """Producers (one per instance) feed a bounded queue that one sender drains."""

    def __init__(self, controller, app_id: str, tail: int, follow: bool, request_id: str):
        self.controller = controller
        self.app_id = app_id
        self.tail = tail
        self.follow = follow
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue(LOG_CLIENT_QUEUE_LINES)
        self.producers: dict[str, asyncio.Task] = {}
        self.overflowed = asyncio.Event()
        self.shutting_down = asyncio.Event()
        self.history: list[dict] = []

    async def run(
        self, websocket: web.WebSocketResponse, writer: AbstractStreamWriter, transport: asyncio.Transport | None
    ) -> tuple[int, str]:
        sender = asyncio.create_task(self._send(websocket, writer, transport))
        reader = asyncio.create_task(self._read(websocket))
        watcher = asyncio.create_task(self._watch())
        overflow = asyncio.create_task(self.overflowed.wait())
        shutdown = asyncio.create_task(self.shutting_down.wait())
        try:
            done, _ = await asyncio.wait(
                {sender, reader, watcher, overflow, shutdown}, return_when=asyncio.FIRST_COMPLETED
            )
            if shutdown in done:
                return WSCloseCode.GOING_AWAY, "node shutting down"
            if overflow in done:
                return SLOW_CLIENT_CLOSE_CODE, "client too slow for the log stream"
            if watcher in done and not watcher.cancelled() and watcher.exception() is None:
                # Every source ended or the app stopped: send what is queued, then close.
                await self.queue.put(None)
                await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
                return WSCloseCode.OK, watcher.result()
            return WSCloseCode.OK, "closed"
        finally:
            tasks = (sender, reader, watcher, overflow, shutdown, *self.producers.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(
        self, websocket: web.WebSocketResponse, writer: AbstractStreamWriter, transport: asyncio.Transport | None
    ) -> None:
        while True:
            message = await self.queue.get()
            if message is None:
                return
            await websocket.send_str(json.dumps(message))
            # send_str waits for the transport only after 256 KiB of output (aiohttp
            # 3.14), so without this wait lines would pile up in the write buffer.
            if transport is not None and transport.get_write_buffer_size():
                # aiohttp 3.14 shares one drain future per connection. The shield keeps
                # a cancellation of this task from cancelling it under the later close.
                await asyncio.shield(writer.drain())

    async def _read(self, websocket: web.WebSocketResponse) -> None:
        async for _ in websocket:
            pass

    async def _watch(self) -> str:
        """Start a producer for every instance; end when the stream has nothing left."""
        first = True
        while True:
            record = self.controller.catalogue.apps.get(self.app_id)
            if record is None or record.state != STATE_ACTIVE:
                if self.follow or not self.producers:
                    await self._drain_producers()
                    return "app stopped"
            try:
                sources = self.controller.log_sources(self.app_id)
            except ApiError:
                sources = []
            for instance_id, node_id, address in sources:
                if instance_id not in self.producers:
                    tail = self.tail if first or not self.follow else MAX_LOG_TAIL
                    self.producers[instance_id] = asyncio.create_task(
                        self._produce(instance_id, node_id, address, tail)
                    )
            first = False
            if not self.follow:
                await self._drain_producers()
                # History from all instances goes out merged in time order.
                self.history.sort(key=lambda message: message.get("timestamp") or "")
                for message in self.history:
                    await self.queue.put(message)
                return "end of logs"
            await asyncio.sleep(LOG_SOURCE_POLL_SECONDS)

    async def _drain_producers(self) -> None:
        if self.producers:
            await asyncio.gather(*self.producers.values(), return_exceptions=True)

    def _offer(self, message: dict) -> None:
        if not self.follow:
            if len(self.history) >= MAX_HISTORY_LINES:
                self.overflowed.set()
                return
            self.history.append(message)
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed.set()

    async def _produce(self, instance_id: str, node_id: str, address, tail: int) -> None:
        try:
            if address is None:
                lines = await self.controller.local_log_lines(instance_id, tail, self.follow)
                async for line in lines:
                    self._offer(log_message(line, instance_id, node_id))
            else:
                path = (
                    f"/internal/instances/logs?instance_id={instance_id}&tail={tail}"
                    f"&follow={'true' if self.follow else 'false'}"
                )
                async for line in self.controller.calls.stream_lines(node_id, address, path):
                    if isinstance(line, dict):
                        self._offer(log_message(line, instance_id, node_id))
        except PeerCallError as error:
            logger.warning(
                "log source failed request=%s app=%s instance=%s node=%s: %s",
                self.request_id, self.app_id, instance_id, node_id, error.reason,
            )
        except ApiError as error:
            # A 404 is an instance without a container yet; a 503 is an engine that failed.
            logger.log(
                logging.WARNING if error.status >= 500 else logging.DEBUG,
                "log source failed request=%s app=%s instance=%s node=%s: %s",
                self.request_id, self.app_id, instance_id, node_id, error.message,
            )
