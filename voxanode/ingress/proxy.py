"""The ingress of one node: forwards app traffic to healthy instances, wherever they run.

`Ingress.handle` serves the `/proxy/{app}/...` routes and the host-routed listener of
`ingress_port`. It finds the app by name or id in the catalogue, picks an instance
from the app's `Rotation` (see `voxanode.ingress.balancer`), and forwards the request
with aiohttp's client to the instance's published port: the `host_ip` and host port
of its report. Bodies stream both ways in chunks, so memory stays bounded whatever
their size. Hop-by-hop headers are dropped and X-Forwarded-For, -Proto and -Host
added (see `voxanode.ingress.headers`). A websocket upgrade is proxied frame by frame.

A rotation is built on an app's first request to this node. It is rebuilt when the
controller reports a change of the catalogue, an instance report or membership,
and each instance that enters or leaves it is published as a `load_rebalanced`
event with reason `ingress_rotation`.

A connection that fails before any response byte is retried on another instance for
idempotent methods, up to `ingress_retries` times. A request with a body is retried
only when its connection was never made, because otherwise its body has been read. Failures
and 5xx replies feed each instance's circuit breaker.

Replies made by the proxy itself are error envelopes: 404 for an unknown app, 503
SERVICE_UNAVAILABLE when no instance can take the request, 502 NETWORK_ERROR when the
instance's connection failed, 504 NETWORK_ERROR when it sent nothing in
`ingress_read_timeout_seconds`.
"""

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.keys import request_id_of
from voxanode.api.ratelimit import RATE_LIMITER_KEY
from voxanode.apps.catalogue import HEALTH_HEALTHY, INSTANCE_RUNNING, STATE_ACTIVE, AppRecord
from voxanode.ingress.balancer import (
    IDEMPOTENT_METHODS,
    Backend,
    CircuitState,
    Rotation,
    Target,
)
from voxanode.ingress.headers import WEBSOCKET_HANDSHAKE_HEADERS, add_forwarded, end_to_end
from voxanode.ingress.traffic import AppTraffic, TrafficError, TrafficSnapshot, merge_traffic, status_metrics
from voxanode.membership.state import MemberStatus

logger = logging.getLogger(__name__)

APP_ID_PATTERN = re.compile(r"app-[0-9a-f]{12}")
# Status recorded for a request whose client went away before the reply was sent.
CLIENT_CLOSED_STATUS = 499
RETRY_AFTER_SECONDS = "2"
SWITCHING_PROTOCOLS_STATUS = 101
WEBSOCKET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
WEBSOCKET_HEARTBEAT_SECONDS = 30.0
WEBSOCKET_CLOSE_TIMEOUT_SECONDS = 5.0
# Close codes that RFC 6455 section 7.4.1 reserves for reporting, never for a close frame.
UNSENDABLE_CLOSE_CODES = frozenset({1005, 1006, 1015})
# Headers the proxy's client would otherwise add to every forwarded request.
SKIPPED_CLIENT_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
EVENT_REASON = "ingress_rotation"
# Request headers that the proxy handles itself: aiohttp's server sends the interim
# "100 Continue" to the client, so the instance must not be asked for another.
REQUEST_ONLY_HEADERS = frozenset({"expect"})


class _ConnectFailed(Exception):
    """A forwarded attempt that got no response byte. `retryable` is whether another may follow."""

    def __init__(self, backend: Backend, error: BaseException, retryable: bool, timed_out: bool):
        super().__init__(str(error))
        self.backend = backend
        self.error = error
        self.retryable = retryable
        self.timed_out = timed_out


class Ingress:
    """App traffic through this node: rotations, the forwarding client and the counters."""

    def __init__(self, controller: Any):
        self.controller = controller
        self.settings = controller.settings
        self.node_id: str = controller.node_id
        self.started_at = time.time()
        # Counters of the requests this node forwarded, by app id, since its start.
        self.traffic: dict[str, AppTraffic] = {}
        # The latest counters of each other node, as get_app_status fetched them.
        self.peer_traffic: dict[str, TrafficSnapshot] = {}
        self.rotations: dict[str, Rotation] = {}
        self._names: dict[str, str] = {}
        self._stale = True
        self._refresh_scheduled = False
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.settings.ingress_connect_timeout_seconds,
            sock_read=self.settings.ingress_read_timeout_seconds,
        )
        self._websockets: set[web.WebSocketResponse] = set()
        self._host_runner: web.AppRunner | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the forwarding client and, when `ingress_port` is set, its listener."""
        self._client()
        if self.settings.ingress_port:
            await self._start_host_listener()

    async def stop(self) -> None:
        """Close the host-routed listener and the client. Safe to call twice."""
        runner, self._host_runner = self._host_runner, None
        if runner is not None:
            await self.close_websockets()
            await runner.cleanup()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookie jar: cookies of one client's reply must never reach another
            # client's request. No decompression: bodies pass through as sent.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=SKIPPED_CLIENT_HEADERS,
                trust_env=False,
            )
        return self._session

    async def _start_host_listener(self) -> None:
        # Imported here: the API modules import this package's callers.
        from voxanode.api.keys import NODE_KEY, STATS_KEY
        from voxanode.api.middlewares import add_request_id_header, api_middleware
        from voxanode.api.ratelimit import rate_limit_middleware, setup_rate_limits
        from voxanode.api.routes.proxy import HOST_ROUTE, proxy_by_host
        from voxanode.api.stats import RequestStats

        app = web.Application(middlewares=(api_middleware, rate_limit_middleware))
        app[NODE_KEY] = self.controller.node
        app[STATS_KEY] = RequestStats()
        setup_rate_limits(app, self.settings)
        app.on_response_prepare.append(add_request_id_header)
        app.router.add_route("*", HOST_ROUTE, proxy_by_host)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        host, port = self.settings.api_host, self.settings.ingress_port
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._host_runner = runner
        logger.info("app ingress listening on http://%s:%d node=%s", host, port, self.node_id)

    async def close_websockets(self) -> None:
        """Close every proxied websocket with 1001 (going away)."""
        sockets = list(self._websockets)
        if sockets:
            await asyncio.gather(
                *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down") for ws in sockets),
                return_exceptions=True,
            )

    # -- the view of instances ------------------------------------------------------------

    def view_changed(self) -> None:
        """Note that the catalogue, a report or membership changed; rebuild soon."""
        self._stale = True
        if not self._refresh_scheduled:
            self._refresh_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.refresh)
            except RuntimeError:
                # No running loop (a synchronous caller): the next request rebuilds.
                self._refresh_scheduled = False

    def refresh(self) -> None:
        """Rebuild the app names and every rotation from the catalogue and membership."""
        self._refresh_scheduled = False
        if not self._stale:
            return
        self._stale = False
        self._names = self._name_index()
        if not self.rotations:
            return
        members = self.controller.members()
        for app_id, rotation in list(self.rotations.items()):
            record = self.controller.catalogue.apps.get(app_id)
            targets = self._targets(record, members) if record is not None else []
            added, removed = rotation.update(targets)
            for target in removed:
                self._publish(app_id, target, "removed")
            for target in added:
                self._publish(app_id, target, "added")
            if record is None:
                del self.rotations[app_id]

    def _name_index(self) -> dict[str, str]:
        """Map each app name to its active app, else to its latest updated record."""
        index: dict[str, AppRecord] = {}
        for record in self.controller.catalogue.apps.values():
            held = index.get(record.name)
            if held is None or _preferred(record, held):
                index[record.name] = record
        return {name: record.app_id for name, record in index.items()}

    def _targets(self, record: AppRecord, members: dict) -> list[Target]:
        """Return where the app's running, healthy instances on online nodes take traffic."""
        if record.state != STATE_ACTIVE:
            return []
        port = ingress_port_of(record)
        if port is None:
            return []
        port_key = f"{port}/tcp"
        targets = []
        for instance_id, node_id in record.assignments.items():
            member = members.get(node_id)
            if node_id != self.node_id and (member is None or member.status != MemberStatus.ONLINE):
                continue
            state = self.controller.instance_state(instance_id, node_id)
            if state is None or state.status != INSTANCE_RUNNING or state.health != HEALTH_HEALTHY:
                continue
            host_port = state.host_ports.get(port_key)
            if host_port is None:
                continue
            host = state.host_ip
            if not host or _unspecified(host):
                # Published on every address: reach it on the node's API address.
                host = member.info.api_address[0] if member is not None else "127.0.0.1"
            targets.append(Target(instance_id, node_id, host, host_port))
        return targets

    def _rotation_of(self, record: AppRecord) -> Rotation:
        rotation = self.rotations.get(record.app_id)
        if rotation is None:
            settings = self.settings
            rotation = Rotation(
                record.app_id,
                strategy_of(record, settings.ingress_strategy),
                settings.ingress_circuit_failures,
                settings.ingress_circuit_cooldown_seconds,
            )
            rotation.update(self._targets(record, self.controller.members()))
            self.rotations[record.app_id] = rotation
        return rotation

    def _publish(self, app_id: str, target: Target, change: str) -> None:
        logger.info(
            "ingress rotation %s app=%s instance=%s instance_node=%s node=%s",
            change, app_id, target.instance_id, target.node_id, self.node_id,
        )
        events = getattr(self.controller.node, "events", None)
        if events is not None:
            events.publish(
                "load_rebalanced",
                {"app_id": app_id, "instance_id": target.instance_id},
                {"reason": EVENT_REASON, "change": change, "instance_node_id": target.node_id},
            )

    def _resolve(self, app_key: str) -> AppRecord:
        apps = self.controller.catalogue.apps
        record = apps.get(app_key) if APP_ID_PATTERN.fullmatch(app_key) else None
        if record is None:
            app_id = self._names.get(app_key)
            record = apps.get(app_id) if app_id is not None else None
        if record is None:
            raise ApiError(
                404, ErrorCode.RESOURCE_NOT_FOUND, f"no app with name or id {app_key}",
                {"field": "app", "app": app_key},
            )
        return record

    # -- forwarding -----------------------------------------------------------------------

    async def handle(self, request: web.Request, app_key: str, path_qs: str) -> web.StreamResponse:
        """Forward one request to an instance of the app `app_key` (name or id)."""
        started = time.perf_counter()
        if self._stale:
            self.refresh()
        record = self._resolve(app_key)
        traffic = self.traffic.get(record.app_id)
        if traffic is None:
            traffic = self.traffic[record.app_id] = AppTraffic()
        if _is_websocket_upgrade(request):
            # Counted at the upgrade, because the session may last for hours.
            try:
                return await self._forward_websocket(request, record, path_qs, traffic, started)
            except ApiError as error:
                traffic.record(error.status, (time.perf_counter() - started) * 1000)
                raise
        status = CLIENT_CLOSED_STATUS
        try:
            response = await self._forward(request, record, path_qs, traffic)
            status = response.status
            return response
        except ApiError as error:
            status = error.status
            raise
        finally:
            traffic.record(status, (time.perf_counter() - started) * 1000)

    def _request_headers(self, request: web.Request, drop: frozenset[str] = frozenset()):
        headers = end_to_end(request.headers, drop)
        limiter = request.app.get(RATE_LIMITER_KEY)
        trusted = False
        client = request.remote
        if limiter is not None and client:
            client, trusted = limiter.peer_of(client)
        add_forwarded(headers, client, request.scheme, request.headers.get("Host"), trusted)
        return headers

    def _pick(
        self, rotation: Rotation, record: AppRecord, tried: tuple[Backend, ...], last: _ConnectFailed | None
    ) -> Backend:
        """Return the next backend to try, or raise 502 after a failed attempt, else 503."""
        backend = rotation.pick(tried)
        if backend is not None:
            return backend
        if last is not None:
            raise _upstream_error(record, last)
        raise self._unavailable(record, rotation)

    def _unavailable(self, record: AppRecord, rotation: Rotation) -> ApiError:
        if record.state != STATE_ACTIVE:
            reason = f"app {record.name} is {record.state}"
        elif ingress_port_of(record) is None:
            reason = f"app {record.name} publishes no TCP port"
        elif rotation.backends:
            reason = f"every instance of app {record.name} has an open circuit after failures"
        else:
            reason = f"app {record.name} has no running, healthy instance on an online node"
        return ApiError(
            503, ErrorCode.SERVICE_UNAVAILABLE, f"{reason}; try again shortly",
            {"app_id": record.app_id, "instances_in_rotation": len(rotation.backends)},
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )

    async def _forward(
        self, request: web.Request, record: AppRecord, path_qs: str, traffic: AppTraffic
    ) -> web.StreamResponse:
        rotation = self._rotation_of(record)
        method = request.method
        has_body = request.body_exists
        retries_left = self.settings.ingress_retries if method in IDEMPOTENT_METHODS else 0
        headers = self._request_headers(request, REQUEST_ONLY_HEADERS)
        tried: tuple[Backend, ...] = ()
        last: _ConnectFailed | None = None
        while True:
            backend = self._pick(rotation, record, tried, last)
            try:
                upstream = await self._send(backend, method, path_qs, headers, request.content if has_body else None)
            except _ConnectFailed as failure:
                traffic.upstream_failures += 1
                self._failed(rotation, backend)
                last = failure
                tried += (backend,)
                if failure.retryable and retries_left > 0:
                    retries_left -= 1
                    logger.debug(
                        "retrying on another instance app=%s instance=%s request=%s after %s",
                        record.app_id, backend.instance_id, request_id_of(request),
                        type(failure.error).__name__,
                    )
                    continue
                raise _upstream_error(record, failure) from failure.error
            return await self._relay(request, rotation, backend, upstream)

    async def _send(self, backend: Backend, method: str, path_qs: str, headers, body) -> aiohttp.ClientResponse:
        """Send one attempt and return the instance's response, headers read."""
        backend.breaker.acquire()
        backend.in_flight += 1
        sent = time.perf_counter()
        try:
            upstream = await self._client().request(
                method,
                URL(backend.base_url + path_qs, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._timeout,
                compress=None,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            backend.in_flight -= 1
            raise _ConnectFailed(backend, error, retryable=True, timed_out=False) from error
        except aiohttp.ServerTimeoutError as error:
            backend.in_flight -= 1
            raise _ConnectFailed(backend, error, retryable=False, timed_out=True) from error
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            # Reset before any response byte: safe to repeat only without a body.
            backend.in_flight -= 1
            raise _ConnectFailed(backend, error, retryable=body is None, timed_out=False) from error
        except aiohttp.ClientError as error:
            backend.in_flight -= 1
            raise _ConnectFailed(backend, error, retryable=False, timed_out=False) from error
        except BaseException:
            backend.in_flight -= 1
            backend.breaker.abandon()
            raise
        backend.observe_latency((time.perf_counter() - sent) * 1000)
        return upstream

    async def _relay(
        self, request: web.Request, rotation: Rotation, backend: Backend, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the instance's response to the client, then release the backend."""
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=end_to_end(upstream.headers)
        )
        if upstream.status >= 500:
            self._failed(rotation, backend)
        else:
            self._succeeded(rotation, backend)
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client went away: aiohttp raises ConnectionResetError, or a plain
            # ConnectionError("Connection lost") from drain(). The instance's
            # connection is dropped here.
            upstream.close()
        except (aiohttp.ClientError, TimeoutError) as error:
            # The instance failed mid-body: cut the client's connection, so that it
            # cannot take the truncated body for a complete one.
            logger.warning(
                "instance failed mid-response app=%s instance=%s request=%s: %r",
                rotation.app_id, backend.instance_id, request_id_of(request), error,
            )
            self._failed(rotation, backend)
            response.force_close()
            if request.transport is not None:
                request.transport.abort()
        finally:
            backend.in_flight -= 1
            upstream.release()
        return response

    def _succeeded(self, rotation: Rotation, backend: Backend) -> None:
        if backend.breaker.succeeded():
            self._publish(rotation.app_id, backend.target, "circuit_closed")

    def _failed(self, rotation: Rotation, backend: Backend) -> None:
        if backend.breaker.failed():
            logger.warning(
                "circuit opened app=%s instance=%s for %.0fs node=%s",
                rotation.app_id, backend.instance_id, backend.breaker.cooldown_seconds, self.node_id,
            )
            self._publish(rotation.app_id, backend.target, "circuit_opened")

    # -- websockets ---------------------------------------------------------------------

    async def _forward_websocket(
        self, request: web.Request, record: AppRecord, path_qs: str, traffic: AppTraffic, started: float
    ) -> web.StreamResponse:
        rotation = self._rotation_of(record)
        headers = self._request_headers(request, WEBSOCKET_HANDSHAKE_HEADERS | REQUEST_ONLY_HEADERS)
        protocols = [
            item.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", ())
            for item in value.split(",")
            if item.strip()
        ]
        retries_left = self.settings.ingress_retries
        tried: tuple[Backend, ...] = ()
        last: _ConnectFailed | None = None
        while True:
            backend = self._pick(rotation, record, tried, last)
            backend.breaker.acquire()
            try:
                upstream = await self._client().ws_connect(
                    URL(backend.base_url + path_qs, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WEBSOCKET_CLOSE_TIMEOUT_SECONDS),
                    max_msg_size=WEBSOCKET_MAX_MESSAGE_BYTES,
                    autoclose=False,
                    autoping=True,
                    heartbeat=WEBSOCKET_HEARTBEAT_SECONDS,
                )
            except aiohttp.WSServerHandshakeError as error:
                if error.status >= 500:
                    self._failed(rotation, backend)
                else:
                    self._succeeded(rotation, backend)
                raise ApiError(
                    502, ErrorCode.NETWORK_ERROR,
                    f"an instance of app {record.name} refused the websocket upgrade with HTTP {error.status}",
                    {"app_id": record.app_id, "instance_id": backend.instance_id, "upstream_status": error.status},
                ) from error
            except (aiohttp.ClientError, TimeoutError) as error:
                traffic.upstream_failures += 1
                self._failed(rotation, backend)
                last = _ConnectFailed(backend, error, retryable=True, timed_out=isinstance(error, TimeoutError))
                tried += (backend,)
                if retries_left > 0:
                    retries_left -= 1
                    continue
                raise _upstream_error(record, last) from error
            except BaseException:
                backend.breaker.abandon()
                raise
            self._succeeded(rotation, backend)
            break

        server = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=WEBSOCKET_MAX_MESSAGE_BYTES,
            heartbeat=WEBSOCKET_HEARTBEAT_SECONDS,
            autoclose=False,
        )
        backend.in_flight += 1
        self._websockets.add(server)
        try:
            await server.prepare(request)
            traffic.record(SWITCHING_PROTOCOLS_STATUS, (time.perf_counter() - started) * 1000)
            await _pump_both_ways(server, upstream)
        finally:
            self._websockets.discard(server)
            backend.in_flight -= 1
            if not upstream.closed:
                await upstream.close()
        return server

    # -- counters -----------------------------------------------------------------------

    def snapshot(self) -> TrafficSnapshot:
        """Return this node's counters of every app it routed, for peers."""
        return TrafficSnapshot(self.node_id, self.started_at, self.traffic)

    def remember_peer(self, data: Any) -> None:
        """Keep a peer's counters, unless they are older than the ones held."""
        try:
            snapshot = TrafficSnapshot.from_dict(data)
        except TrafficError as error:
            logger.warning("ignoring malformed ingress counters from a peer: %s", error)
            return
        if snapshot.node_id == self.node_id:
            return
        held = self.peer_traffic.get(snapshot.node_id)
        if held is None or snapshot.started_at >= held.started_at:
            self.peer_traffic[snapshot.node_id] = snapshot

    def app_traffic(self, app_id: str) -> AppTraffic:
        """Return the app's counters summed over this node and the peers last heard."""
        parts = [self.traffic[app_id]] if app_id in self.traffic else []
        parts.extend(s.apps[app_id] for s in self.peer_traffic.values() if app_id in s.apps)
        return merge_traffic(parts)

    def status_metrics(self, app_id: str) -> dict[str, Any]:
        return status_metrics(self.app_traffic(app_id))

    def circuit_states(self) -> Iterator[tuple[str, str, int]]:
        """Yield (app id, circuit state, backends in it) for every rotation."""
        for app_id, rotation in self.rotations.items():
            counts = {state: 0 for state in CircuitState}
            for backend in rotation.backends:
                counts[backend.breaker.state] += 1
            for state, count in counts.items():
                yield app_id, state.value, count


async def _pump_both_ways(server: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Copy frames both ways until one side closes, then close the other with its code.

    Both sides run without autoclose, so the close handshake goes through the proxy:
    the side that did not start it gets the initiator's code and reason, and its reply
    code goes back to the initiator.
    """
    to_upstream = asyncio.ensure_future(_pump(server, upstream))
    to_client = asyncio.ensure_future(_pump(upstream, server))
    pumps = {to_upstream, to_client}
    try:
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finished = to_upstream if to_upstream in done else to_client
        initiator, other = (server, upstream) if finished is to_upstream else (upstream, server)
        reason = finished.result() if finished.exception() is None else b""
        code = initiator.close_code or WSCloseCode.GOING_AWAY
        # Closing `other` also ends the pump that waits on it.
        await _close_quietly(other, code, reason)
        if pending:
            await asyncio.wait(pending, timeout=WEBSOCKET_CLOSE_TIMEOUT_SECONDS)
        await _close_quietly(initiator, other.close_code or code, reason)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _close_quietly(websocket, code: int, reason: bytes) -> None:
    """Close one side of a proxied websocket; a peer that is already gone is no error."""
    if code in UNSENDABLE_CLOSE_CODES:
        code = WSCloseCode.GOING_AWAY
    try:
        await asyncio.wait_for(websocket.close(code=code, message=reason), WEBSOCKET_CLOSE_TIMEOUT_SECONDS)
    except (TimeoutError, ConnectionError):
        pass


async def _pump(source, sink) -> bytes:
    """Copy data frames from `source` to `sink`; return the close reason when `source` ends."""
    while True:
        message = await source.receive()
        kind = message.type
        if kind is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif kind is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif kind is WSMsgType.CLOSE:
            return (message.extra or "").encode()
        elif kind in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return b""


def _upstream_error(record: AppRecord, failure: _ConnectFailed) -> ApiError:
    details = {"app_id": record.app_id, "instance_id": failure.backend.instance_id}
    if failure.timed_out:
        return ApiError(
            504, ErrorCode.NETWORK_ERROR,
            f"an instance of app {record.name} sent no response in time",
            details,
        )
    return ApiError(
        502, ErrorCode.NETWORK_ERROR,
        f"the connection to an instance of app {record.name} failed: {type(failure.error).__name__}",
        details,
    )


def _is_websocket_upgrade(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def _preferred(record: AppRecord, held: AppRecord) -> bool:
    active, held_active = record.state == STATE_ACTIVE, held.state == STATE_ACTIVE
    if active != held_active:
        return active
    return record.updated_at > held.updated_at


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def ingress_port_of(record: AppRecord) -> int | None:
    """Return the container port that takes the app's traffic, or None without a TCP port."""
    ingress = record.spec.ingress
    if ingress is not None and ingress.port is not None:
        return ingress.port
    for port in record.spec.ports:
        if port.protocol == "tcp":
            return port.container_port
    return None


def strategy_of(record: AppRecord, default: str) -> str:
    """Return the balancing strategy of the app's spec, or the node's default."""
    ingress = record.spec.ingress
    if ingress is not None and ingress.strategy is not None:
        return ingress.strategy
    return default
