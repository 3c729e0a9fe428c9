"""The ingress of one node: forwards app traffic to healthy instances, wherever they run.

`Ingress.handle` serves the `/proxy/{app}/...` routes and the host-routed listener of
`ingress_port`, and `Ingress.forward_plain` the plain GET and HEAD requests that the
lean front of those ports parses itself (see `voxanode.ingress.front`). It finds the
app by name or id in the catalogue, picks an instance from the app's `Rotation` (see
`voxanode.ingress.balancer`), and forwards the request to the instance's published
port (the `host_ip` and host port of its report) with `UpstreamClient` (see
`voxanode.ingress.upstream`), which keeps idle keep-alive connections per instance.
Bodies stream both ways in chunks, so memory stays bounded whatever their size.
Hop-by-hop headers are dropped and X-Forwarded-For, -Proto and -Host added (see
`voxanode.ingress.headers`). The reply to a HEAD ends at its header section, because
some servers send a body after it. A websocket upgrade goes through aiohttp's client
instead, and is proxied frame by frame.

A rotation is built on an app's first request to this node. It is rebuilt when the
controller reports a change of the catalogue, an instance report or membership,
and each instance that enters or leaves it is published as a `load_rebalanced`
event with reason `ingress_rotation`.

A connection that fails before any response byte is retried on another instance for
idempotent methods, up to `ingress_retries` times. A request with a body is retried
only when its connection was never made, because otherwise its body has been read.
A client that goes away while its request body is forwarded gets nothing more: the
attempt counts neither way for the instance's breaker, and the request is counted
with status 499.

What counts toward an instance's circuit breaker, as Envoy's outlier detection
separates gateway failures from other 5xx replies:

- failures: a connection that fails, times out or is reset before or during the
  reply, a reply to any method but HEAD that is not valid HTTP, and a 502, 503 or
  504 reply (the instance, or a gateway inside it, says it cannot serve);
- successes: every other reply, 500 and the other 5xx included. Such a reply is the
  app's own result for one request, often of one broken path, and it shows that the
  instance is reachable, so it passes to the client and never ejects the instance;
- neither: a reply to HEAD that is not valid HTTP, one cut off within its header
  section included, because a quirk of an instance's HEAD handling is no sign of a
  failing instance. The client gets 502.

When every instance of an app has an open circuit, the instances whose circuit
opened on a 502, 503 or 504 reply take traffic again, so that the client gets the
app's own reply. This is a narrower panic routing than Envoy's, which by default sends
traffic to every host once fewer than 50% are healthy: instances that failed on
connections or timeouts stay out for their cool-down. All 5xx replies count as
errors in the app's traffic counters either way.

Replies made by the proxy itself are error envelopes: 404 for an unknown app, 503
SERVICE_UNAVAILABLE when no instance can take the request (with `Retry-After` only
while no instance is healthy yet or circuits cool down, not for a stopped app), 502
NETWORK_ERROR when the instance's connection failed, 504 NETWORK_ERROR when it sent
nothing in `ingress_read_timeout_seconds`.
"""

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import HttpVersion11 as HTTP_1_1
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.keys import request_id_of
from voxanode.api.ratelimit import RATE_LIMITER_KEY
from voxanode.api.response_headers import REQUEST_ID_HEADER, prepare_stream
from voxanode.apps.catalogue import (
    HEALTH_HEALTHY,
    HEALTH_UNHEALTHY,
    INSTANCE_RUNNING,
    STATE_ACTIVE,
    STATE_STOPPED,
    AppRecord,
)
from voxanode.ingress.balancer import (
    IDEMPOTENT_METHODS,
    Backend,
    CircuitState,
    Rotation,
    Target,
)
from voxanode.ingress.front import BODILESS_STATUSES, FrontSite, http_date, reply_head
from voxanode.ingress.headers import WEBSOCKET_HANDSHAKE_HEADERS, add_forwarded, drop_hop_by_hop, end_to_end
from voxanode.ingress.traffic import AppTraffic, TrafficError, TrafficSnapshot, merge_traffic, status_metrics
from voxanode.ingress.upstream import (
    HEAD_METHOD,
    UpstreamBodyError,
    UpstreamClient,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
)
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
# Headers aiohttp's client would otherwise add to every websocket handshake.
SKIPPED_CLIENT_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
EVENT_REASON = "ingress_rotation"
# How long the host-routed listener waits for replies under way when it closes.
HOST_SHUTDOWN_SECONDS = 2.0
# Request headers that the proxy handles itself: aiohttp's server sends the interim
# "100 Continue" to the client, so the instance must not be asked for another.
REQUEST_ONLY_HEADERS = frozenset({"expect"})
# A HEAD is forwarded without a body, so a Content-Length of the client's must not
# make the instance wait for one.
HEAD_DROPPED_HEADERS = REQUEST_ONLY_HEADERS | {"content-length"}
# Replies of an instance that count as circuit breaker failures: the instance, or a
# gateway inside it, cannot serve. Other 5xx replies are the app's own errors.
GATEWAY_FAILURE_STATUSES = frozenset({502, 503, 504})


class _ConnectFailed(Exception):
    """A forwarded attempt that got no usable reply.

    `retryable` is whether another attempt may follow. `breaker_failure` is whether it
    counts toward the instance's circuit breaker: False for a reply to HEAD that is not
    valid HTTP, because a quirk of the instance's HEAD handling is no sign of a failing
    instance.
    """

    def __init__(
        self,
        backend: Backend,
        error: BaseException,
        retryable: bool,
        timed_out: bool,
        breaker_failure: bool = True,
    ):
        super().__init__(str(error))
        self.backend = backend
        self.error = error
        self.retryable = retryable
        self.timed_out = timed_out
        self.breaker_failure = breaker_failure


class _RelayedResponse(web.StreamResponse):
    """A streamed reply whose headers aiohttp keeps until the first body write or the end.

    aiohttp 3.14 sends a StreamResponse's headers in `prepare()`, in a send of their
    own, unless the class sets `_send_headers_immediately` to False, as `web.Response`
    does. A version without that attribute sends them in `prepare()`, which is correct too.
    """

    _send_headers_immediately = False


class Ingress:
    """App traffic through this node: rotations, the forwarding clients and the counters."""

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
        self._upstream = UpstreamClient(
            connect_timeout=self.settings.ingress_connect_timeout_seconds,
            read_timeout=self.settings.ingress_read_timeout_seconds,
        )
        # aiohttp's client, for websocket upgrades only, made on the first one.
        self._websocket_session: aiohttp.ClientSession | None = None
        self._websockets: set[web.WebSocketResponse] = set()
        self._host_runner: web.AppRunner | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the listener of `ingress_port`, when it is set."""
        if self.settings.ingress_port:
            await self._start_host_listener()

    async def stop(self) -> None:
        """Close the host-routed listener and the forwarding clients. Safe to call twice."""
        runner, self._host_runner = self._host_runner, None
        if runner is not None:
            await self.close_websockets()
            await runner.cleanup()
        await self._upstream.close()
        session, self._websocket_session = self._websocket_session, None
        if session is not None:
            await session.close()

    def _websocket_client(self) -> aiohttp.ClientSession:
        if self._websocket_session is None or self._websocket_session.closed:
            # No cookie jar: cookies of one client's reply must never reach another
            # client's request. No decompression: bodies pass through as sent.
            self._websocket_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=SKIPPED_CLIENT_HEADERS,
                trust_env=False,
            )
        return self._websocket_session

    async def _start_host_listener(self) -> None:
        # Imported here: the API modules import this package's callers.
        from voxanode.api.keys import NODE_KEY, STATS_KEY
        from voxanode.api.listen import KEEPALIVE_TIMEOUT_SECONDS, bind_stream_sockets
        from voxanode.api.middlewares import build_api_middleware
        from voxanode.api.ratelimit import (
            UNMATCHED_CATEGORY_KEY,
            RateLimitCategory,
            count_request,
            setup_node_rate_limits,
        )
        from voxanode.api.routes.proxy import HOST_ROUTE, proxy_by_host
        from voxanode.api.stats import RequestStats

        app = web.Application(middlewares=(build_api_middleware((count_request,)),))
        app[NODE_KEY] = self.controller.node
        app[STATS_KEY] = RequestStats()
        setup_node_rate_limits(app, self.controller.node)
        # A request that not even the catch-all route matches (CONNECT) is app traffic too.
        app[UNMATCHED_CATEGORY_KEY] = RateLimitCategory.INGRESS
        app.router.add_route("*", HOST_ROUTE, proxy_by_host)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=HOST_SHUTDOWN_SECONDS,
            keepalive_timeout=KEEPALIVE_TIMEOUT_SECONDS,
        )
        await runner.setup()
        host, port = self.settings.api_host, self.settings.ingress_port
        sockets: list = []
        try:
            sockets = bind_stream_sockets(host, port, "ingress_port")
            for sock in sockets:
                await FrontSite(runner, sock, self, app, HOST_SHUTDOWN_SECONDS, host_routed=True).start()
        except OSError:
            await runner.cleanup()
            for sock in sockets:
                sock.close()
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

    def _lookup(self, app_key: str) -> tuple[AppRecord, AppTraffic]:
        """Return the app that `app_key` names and its traffic counters, made on first use."""
        if self._stale:
            self.refresh()
        record = self._resolve(app_key)
        traffic = self.traffic.get(record.app_id)
        if traffic is None:
            traffic = self.traffic[record.app_id] = AppTraffic()
        return record, traffic

    # -- forwarding -----------------------------------------------------------------------

    async def handle(self, request: web.Request, app_key: str, path_qs: str) -> web.StreamResponse:
        """Forward one request to an instance of the app `app_key` (name or id)."""
        started = time.perf_counter()
        record, traffic = self._lookup(app_key)
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

    async def forward_plain(self, client: Any, request: Any) -> int:
        """Forward a request of the lean path (`voxanode.ingress.front`) and write its reply.

        `request` is a `PlainRequest`: GET or HEAD, without a body. `client` is its
        connection, with `write`, `drain`, `abort` and the API's rate `limiter`.
        Returns the instance's status. Raises ApiError, before any byte of a reply is
        written, for a reply that the proxy makes itself.
        """
        started = time.perf_counter()
        record, traffic = self._lookup(request.app_key)
        status = CLIENT_CLOSED_STATUS
        try:
            rotation = self._rotation_of(record)
            # The parsed headers belong to this request alone, so they are edited in place.
            headers = request.headers
            drop_hop_by_hop(headers, HEAD_DROPPED_HEADERS)
            _add_forwarded_for(headers, request.client, "http", client.limiter)
            backend, upstream = await self._attempts(
                rotation, record, request.method, request.path_qs, headers, None, traffic, request.request_id
            )
            status = upstream.status
            await self._relay_plain(client, request, rotation, backend, upstream)
            return status
        except ApiError as error:
            status = error.status
            raise
        finally:
            traffic.record(status, (time.perf_counter() - started) * 1000)

    async def _relay_plain(
        self, client: Any, request: Any, rotation: Rotation, backend: Backend, upstream: UpstreamResponse
    ) -> None:
        """Write the instance's reply to a lean path client, then release the backend."""
        headers = upstream.headers
        drop_hop_by_hop(headers)
        headers[REQUEST_ID_HEADER] = request.request_id
        if "Date" not in headers:
            headers["Date"] = http_date.now()
        if not request.keep_alive:
            headers["Connection"] = "close"
        self._record_reply(rotation, backend, upstream.status)
        status = upstream.status
        try:
            if request.method == HEAD_METHOD or status in BODILESS_STATUSES or status < 200:
                client.write(reply_head(status, upstream.reason, headers))
                return
            body = upstream.take_complete_body()
            if body is not None:
                # The whole body has arrived, so it goes out with the headers in one send.
                headers["Content-Length"] = str(len(body))
                client.write(reply_head(status, upstream.reason, headers) + body)
                return
            sized = "Content-Length" in headers
            if not sized:
                headers["Transfer-Encoding"] = "chunked"
            client.write(reply_head(status, upstream.reason, headers))
            async for chunk in upstream.iter_chunks():
                if not chunk:
                    continue
                client.write(chunk if sized else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await client.drain()
            if not sized:
                client.write(b"0\r\n\r\n")
        except (ConnectionError, asyncio.CancelledError):
            upstream.close()
            raise
        except UpstreamBodyError as error:
            logger.warning(
                "instance failed mid-response app=%s instance=%s request=%s: %s",
                rotation.app_id, backend.instance_id, request.request_id, error,
            )
            self._failed(rotation, backend)
            client.abort()
            raise ConnectionResetError("the instance failed mid-response") from error
        finally:
            backend.in_flight -= 1
            upstream.release()

    def _request_headers(self, request: web.Request, drop: frozenset[str] = frozenset()):
        headers = end_to_end(request.headers, drop)
        _add_forwarded_for(headers, request.remote, request.scheme, request.app.get(RATE_LIMITER_KEY))
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
        """Return the 503 for an app that no instance can serve now.

        Only a state that passes by itself (no healthy instance yet, circuits cooling
        down) gets `Retry-After` and the advice to try again. A stopped, failed or
        portless app, or one scaled to 0, stays so until its user acts.
        """
        details = {
            "app_id": record.app_id,
            # The app's status as get_app_status shows it: stopped once scaled to 0.
            "app_status": record.phase,
            "instances_in_rotation": len(rotation.backends),
        }
        if record.state == STATE_STOPPED:
            message = (
                f"app {record.name} is stopped, so it takes no traffic;"
                " deploy it again with POST /apps/add_app/ to serve it"
            )
        elif record.state != STATE_ACTIVE:
            # The other inactive state, failed: the deployment could not start on any node.
            message = (
                f"app {record.name} could not start on any node and runs no instance;"
                f" GET /apps/get_app_status/?app_id={record.app_id} shows why,"
                " and POST /apps/add_app/ deploys it again"
            )
        elif ingress_port_of(record) is None:
            message = (
                f"app {record.name} publishes no TCP port, so it cannot take HTTP traffic;"
                " deploy it again with a `ports` entry through POST /apps/add_app/ to serve it"
            )
        elif record.desired == 0:
            message = (
                f"app {record.name} is scaled to 0 replicas;"
                " scale it up with POST /apps/add_scale_app/ to serve it"
            )
        else:
            failing = self._failing_health_checks(record)
            if rotation.backends:
                reason = (
                    f"every instance of app {record.name} failed its last connections"
                    " and waits out its circuit breaker cool-down"
                )
            elif failing:
                reason = (
                    f"{failing} running instance(s) of app {record.name} fail their health check;"
                    f" GET /apps/get_app_status/?app_id={record.app_id} and the app's logs show why"
                )
            else:
                reason = f"app {record.name} has no running, healthy instance on an online node yet"
            return ApiError(
                503, ErrorCode.SERVICE_UNAVAILABLE, f"{reason}; try again shortly", details,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        return ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, message, details)

    def _failing_health_checks(self, record: AppRecord) -> int:
        """Return how many of the app's running instances were last found unhealthy."""
        failing = 0
        for instance_id, node_id in record.assignments.items():
            state = self.controller.instance_state(instance_id, node_id)
            if state is not None and state.status == INSTANCE_RUNNING and state.health == HEALTH_UNHEALTHY:
                failing += 1
        return failing

    async def _forward(
        self, request: web.Request, record: AppRecord, path_qs: str, traffic: AppTraffic
    ) -> web.StreamResponse:
        rotation = self._rotation_of(record)
        method = request.method
        is_head = method == HEAD_METHOD
        # A HEAD goes without a body: its content has no defined meaning (RFC 9110 9.3.2).
        body = request.content if request.body_exists and not is_head else None
        headers = self._request_headers(request, HEAD_DROPPED_HEADERS if is_head else REQUEST_ONLY_HEADERS)
        try:
            backend, upstream = await self._attempts(
                rotation, record, method, path_qs, headers, body, traffic, request_id_of(request)
            )
        except ConnectionError:
            # The client's request body raised it because the client went away,
            # so no reply can reach it. aiohttp drops a reply to a closed connection.
            return web.Response(status=CLIENT_CLOSED_STATUS)
        return await self._relay(request, rotation, backend, upstream)

    async def _attempts(
        self,
        rotation: Rotation,
        record: AppRecord,
        method: str,
        path_qs: str,
        headers,
        body,
        traffic: AppTraffic,
        request_id: str | None,
    ) -> tuple[Backend, UpstreamResponse]:
        """Send the request to instances of the rotation until one replies; return it.

        Raises ApiError when none did, and ConnectionError when the client's request
        body failed because the client went away.
        """
        retries_left = self.settings.ingress_retries if method in IDEMPOTENT_METHODS else 0
        tried: tuple[Backend, ...] = ()
        last: _ConnectFailed | None = None
        while True:
            backend = self._pick(rotation, record, tried, last)
            try:
                return backend, await self._send(backend, method, path_qs, headers, body)
            except _ConnectFailed as failure:
                traffic.upstream_failures += 1
                if failure.breaker_failure:
                    self._failed(rotation, backend)
                else:
                    backend.breaker.abandon()
                last = failure
                tried += (backend,)
                if failure.retryable and retries_left > 0:
                    retries_left -= 1
                    logger.debug(
                        "retrying on another instance app=%s instance=%s request=%s after %s",
                        record.app_id, backend.instance_id, request_id, type(failure.error).__name__,
                    )
                    continue
                logger.debug(
                    "forwarding failed app=%s instance=%s request=%s: %s",
                    record.app_id, backend.instance_id, request_id, failure.error,
                )
                raise _upstream_error(record, failure) from failure.error
            except ConnectionError as error:
                logger.debug(
                    "client went away during its request body app=%s instance=%s request=%s: %r",
                    record.app_id, backend.instance_id, request_id, error,
                )
                raise

    async def _send(self, backend: Backend, method: str, path_qs: str, headers, body) -> UpstreamResponse:
        """Send one attempt and return the instance's response, headers read.

        Raises _ConnectFailed when the instance gave no usable reply. An exception of
        the client's request body propagates unchanged, and the attempt counts neither
        way for the instance's breaker.
        """
        backend.breaker.acquire()
        backend.in_flight += 1
        sent = time.perf_counter()
        target = backend.target
        try:
            upstream = await self._upstream.request(target.host, target.port, method, path_qs, headers, body)
        except UpstreamError as error:
            backend.in_flight -= 1
            raise _attempt_failed(backend, method, body is not None, error) from error
        except BaseException:
            backend.in_flight -= 1
            backend.breaker.abandon()
            raise
        backend.observe_latency((time.perf_counter() - sent) * 1000)
        return upstream

    async def _relay(
        self, request: web.Request, rotation: Rotation, backend: Backend, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        """Stream the instance's response to the client, then release the backend."""
        response = _RelayedResponse(status=upstream.status, reason=upstream.reason)
        headers = response.headers
        headers.extend(upstream.headers)
        drop_hop_by_hop(headers)
        if request.version < HTTP_1_1 and "Content-Length" not in headers:
            # An HTTP/1.0 client cannot take a chunked body, so the close ends it.
            response.force_close()
        self._record_reply(rotation, backend, upstream.status)
        try:
            await prepare_stream(request, response)
            body = upstream.take_complete_body()
            if body is not None:
                # The whole body has arrived, so it goes out with the headers in one send.
                await response.write_eof(body)
            else:
                # Send the headers now, because the body may take long to follow.
                await response.write(b"")
                async for chunk in upstream.iter_chunks():
                    await response.write(chunk)
                await response.write_eof()
        except ConnectionError:
            # The client went away: aiohttp raises ConnectionResetError, or a plain
            # ConnectionError("Connection lost") from drain(), and the client's request
            # body raises ConnectionResetError. The instance's connection is dropped here.
            upstream.close()
        except UpstreamBodyError as error:
            # The instance failed mid-body: cut the client's connection, so that it
            # cannot take the truncated body for a complete one.
            logger.warning(
                "instance failed mid-response app=%s instance=%s request=%s: %s",
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

    def _record_reply(self, rotation: Rotation, backend: Backend, status: int) -> None:
        """Feed an instance's reply to its circuit breaker: only 502, 503 and 504 fail."""
        if status in GATEWAY_FAILURE_STATUSES:
            self._failed(rotation, backend, reply=True)
        else:
            self._succeeded(rotation, backend)

    def _succeeded(self, rotation: Rotation, backend: Backend) -> None:
        if backend.breaker.succeeded():
            self._publish(rotation.app_id, backend.target, "circuit_closed")

    def _failed(self, rotation: Rotation, backend: Backend, reply: bool = False) -> None:
        if backend.breaker.failed(reply):
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
                upstream = await self._websocket_client().ws_connect(
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
                self._record_reply(rotation, backend, error.status)
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
            await prepare_stream(request, server)
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


def _add_forwarded_for(headers: CIMultiDict[str], client: str | None, scheme: str, limiter: Any) -> None:
    """Add the X-Forwarded-* headers for `client`, which `limiter` may know as a trusted proxy."""
    trusted = False
    if limiter is not None and client:
        client, trusted = limiter.peer_of(client)
    add_forwarded(headers, client, scheme, headers.get("Host"), trusted)


def _attempt_failed(backend: Backend, method: str, has_body: bool, error: UpstreamError) -> _ConnectFailed:
    """Classify an attempt that got no usable reply, for the retries and the circuit breaker."""
    if isinstance(error, UpstreamConnectError):
        # Nothing was sent, so even a body is still unread. A connect timeout is a
        # failed connection (502), not a slow reply (504).
        return _ConnectFailed(backend, error, retryable=True, timed_out=False)
    if isinstance(error, UpstreamClosedError):
        # The instance may have seen the request, and a streamed body has been read.
        return _ConnectFailed(backend, error, retryable=not has_body, timed_out=False)
    if isinstance(error, UpstreamProtocolError):
        return _ConnectFailed(
            backend, error, retryable=False, timed_out=False, breaker_failure=method != HEAD_METHOD
        )
    # UpstreamTimeoutError: the app may still be working on the request.
    return _ConnectFailed(backend, error, retryable=False, timed_out=error.timed_out)


def _upstream_error(record: AppRecord, failure: _ConnectFailed) -> ApiError:
    details = {"app_id": record.app_id, "instance_id": failure.backend.instance_id}
    error = failure.error
    if failure.timed_out:
        return ApiError(
            504, ErrorCode.NETWORK_ERROR,
            f"an instance of app {record.name} sent no response in time",
            details,
        )
    if isinstance(error, UpstreamProtocolError):
        return ApiError(
            502, ErrorCode.NETWORK_ERROR,
            f"an instance of app {record.name} sent a reply that is not valid HTTP: {error}",
            details,
        )
    # The upstream client's messages never name the instance's address. aiohttp's
    # messages (of websocket handshakes) do, so only their type is shown.
    reason = str(error) if isinstance(error, UpstreamError) else type(error).__name__
    return ApiError(
        502, ErrorCode.NETWORK_ERROR,
        f"forwarding to an instance of app {record.name} failed: {reason}",
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
