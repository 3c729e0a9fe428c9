"""Node-to-node routes under `/internal/`, served only to requests signed by a member.

- `POST /internal/sync/push`: app records and instance reports to merge.
- `POST /internal/sync/digest`: a catalogue digest; the response carries what the
  caller lacks and lists what this node lacks.
- `POST /internal/apps/command`: a deploy, scale or stop for which this node is the
  responsible node; the response is the public API's reply or its error envelope.
- `POST /internal/instances/apply`: an app record to act on now; the reply comes after this
  node's containers match it, with this node's instance report.
- `GET /internal/instances/report`: this node's instance report, freshly collected.
- `GET /internal/instances/logs?instance_id=&tail=&follow=`: the log lines of one
  local instance as newline-delimited JSON, until the container stops.

A request without a valid signature gets 401 AUTHENTICATION_REQUIRED.
"""

import asyncio
import json
import logging

from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode, error_body, invalid_field
from voxanode.api.internal_auth import RequestVerifier, SignatureError
from voxanode.api.keys import NODE_KEY, request_id_of
from voxanode.api.response_headers import prepare_stream
from voxanode.apps.catalogue import CatalogueError

logger = logging.getLogger(__name__)

VERIFIER_KEY = web.AppKey("internal_verifier", RequestVerifier)
LOG_HANDLERS_KEY = web.AppKey("internal_log_handlers", set)


def add_routes(app: web.Application) -> None:
    node = app[NODE_KEY]

    def public_key_of(dht_id: bytes) -> bytes | None:
        if dht_id == node.identity.dht_id:
            return node.identity.public_key
        membership = node.membership
        member = membership.table.get(dht_id) if membership is not None else None
        return member.info.public_key if member is not None else None

    app[VERIFIER_KEY] = RequestVerifier(public_key_of, node.settings.clock_skew_seconds)
    app[LOG_HANDLERS_KEY] = set()
    app.on_shutdown.append(_end_log_streams)
    app.router.add_post("/internal/sync/push", sync_push)
    app.router.add_post("/internal/sync/digest", sync_digest)
    app.router.add_post("/internal/apps/command", app_command)
    app.router.add_post("/internal/instances/apply", instances_apply)
    app.router.add_get("/internal/instances/report", instances_report)
    app.router.add_get("/internal/instances/logs", instances_logs)


async def _verified(request: web.Request) -> tuple[str, bytes]:
    """Return the caller's node id and the raw body, or raise 401."""
    body = await request.read()
    try:
        caller = request.app[VERIFIER_KEY].verify(request.method, request.path_qs, request.headers, body)
    except SignatureError as error:
        logger.warning(
            "rejected node-to-node request request=%s path=%s remote=%s: %s",
            request_id_of(request), request.path, request.remote, error,
        )
        raise ApiError(
            401,
            ErrorCode.AUTHENTICATION_REQUIRED,
            "this route serves only requests signed by a member node",
            {"reason": str(error)},
            headers={"WWW-Authenticate": 'VoxaNode realm="internal"'},
        ) from error
    return caller, body


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError as error:
        raise invalid_field("body", f"is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise invalid_field("body", "must be a JSON object")
    return data


def _apps(request: web.Request):
    apps = getattr(request.app[NODE_KEY], "apps", None)
    if apps is None:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, "this node runs no app controller")
    return apps


async def sync_push(request: web.Request) -> web.Response:
    _, body = await _verified(request)
    _apps(request).merge_push(_json(body))
    return web.json_response({"success": True})


async def sync_digest(request: web.Request) -> web.Response:
    _, body = await _verified(request)
    try:
        answer = _apps(request).answer_digest(_json(body).get("digest"))
    except CatalogueError as error:
        raise invalid_field("digest", str(error)) from error
    return web.json_response(answer)


async def app_command(request: web.Request) -> web.Response:
    caller, body = await _verified(request)
    data = _json(body)
    command = data.get("command")
    origin_request = str(data.get("request_id", "-"))[:64]
    if not isinstance(command, dict):
        raise invalid_field("command", "must be an object")
    logger.info(
        "app command op=%s from node=%s request=%s", command.get("op"), caller, origin_request
    )
    apps = _apps(request)
    try:
        answer = await apps.execute(command, origin_request)
    except ApiError as error:
        # The caller replies to its user from its own catalogue next, so the record
        # travels with the error too, as for a failed deploy.
        body = error_body(error, origin_request)
        body["_sync"] = apps.sync_payload_for(error.details.get("app_id"))
        return web.json_response(body, status=error.status)
    except (CatalogueError, KeyError, TypeError, ValueError) as error:
        raise invalid_field("command", f"is malformed: {error!r}") from error
    answer["_sync"] = apps.sync_payload_for(answer.get("app_id"))
    return web.json_response(answer)


async def instances_apply(request: web.Request) -> web.Response:
    caller, body = await _verified(request)
    data = _json(body)
    try:
        answer = await _apps(request).apply_from_peer(data.get("record"))
    except CatalogueError as error:
        raise invalid_field("record", str(error)) from error
    logger.debug("applied an app record from node=%s", caller)
    return web.json_response(answer)


async def instances_report(request: web.Request) -> web.Response:
    await _verified(request)
    apps = _apps(request)
    return web.json_response(apps.own_report_payload())


async def _end_log_streams(app: web.Application) -> None:
    for task in list(app[LOG_HANDLERS_KEY]):
        task.cancel()


async def instances_logs(request: web.Request) -> web.StreamResponse:
    handlers = request.app[LOG_HANDLERS_KEY]
    task = asyncio.current_task()
    handlers.add(task)
    try:
        # On shutdown the task is cancelled: a followed stream has no end of its own.
        return await _stream_instance_logs(request)
    finally:
        handlers.discard(task)


async def _stream_instance_logs(request: web.Request) -> web.StreamResponse:
    await _verified(request)
    apps = _apps(request)
    instance_id = request.query.get("instance_id", "")
    try:
        tail = int(request.query.get("tail", "100"))
    except ValueError as error:
        raise invalid_field("tail", "must be an integer") from error
    follow = request.query.get("follow", "true") == "true"
    lines = await apps.local_log_lines(instance_id, max(0, tail), follow)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await prepare_stream(request, response)
    try:
        async for line in lines:
            await response.write(json.dumps(line).encode() + b"\n")
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        await lines.aclose()
    try:
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass
    return response
