"""A lean front for the API port: serves plain proxied requests itself, the rest through aiohttp.

aiohttp's web application costs a request its router, middleware chain and request
and response objects. App traffic pays that on top of the forwarding itself, so a
`/proxy/` request through aiohttp takes about a quarter more CPU of the node's event
loop than the forwarding alone. `FrontProtocol` serves the simplest and most common
app requests without it: a GET or HEAD to `/proxy/{app}/...` over HTTP/1.1, with no
body, no upgrade and no `Expect`, while the `ingress` rate limit category has no
limit. It parses the header section, hands it to `Ingress.forward_plain` and writes
the reply, keeping the connection alive between requests.

The first request that does not qualify hands the connection to aiohttp's
`RequestHandler`, with every byte that has arrived since the end of the last reply
served here. aiohttp then serves that request and the rest of the connection as on
any API connection. A header section that is malformed, too large or unusual in any way
(folded lines, a target with dot segments, control characters) goes to aiohttp as
well, so its validation and error replies stay the only ones of the API port.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from voxanode.api.errors import ApiError, error_body
from voxanode.api.json_reply import encode_json
from voxanode.api.listen import KEEPALIVE_TIMEOUT_SECONDS
from voxanode.api.middlewares import CLIENT_REQUEST_ID_PATTERN, REQUEST_ID_HEADER, new_request_id
from voxanode.api.ratelimit import RATE_LIMITER_KEY, ApiRateLimiter, RateLimitCategory
from voxanode.api.routes.proxy import PROXY_PREFIX as PROXY_PREFIX_TEXT
from voxanode.ingress.headers import host_app_key

if TYPE_CHECKING:
    from voxanode.ingress.proxy import Ingress

logger = logging.getLogger(__name__)

PROXY_PREFIX = PROXY_PREFIX_TEXT.encode("ascii")
PLAIN_METHODS = (b"GET", b"HEAD")
HEAD_END = b"\r\n\r\n"
BARE_LF = re.compile(rb"(?<!\r)\n")
# A header section beyond these sizes goes to aiohttp, whose limits (8190 bytes a
# line) then decide about it. The lean path takes only heads of common size.
MAX_HEAD_BYTES = 16 * 1024
MAX_LINE_BYTES = 8190
MAX_HEADER_FIELDS = 100
# Headers that a request may carry once: aiohttp rejects a duplicate Host with 400.
SINGLE_HEADERS = frozenset({"host", "content-length"})
# Bytes buffered from a client, beyond the request served now, before reading pauses.
MAX_BUFFERED_BYTES = 64 * 1024
# Header names that make a request leave the lean path: a body, an upgrade, an
# interim reply or framing that aiohttp handles.
NOT_PLAIN_HEADERS = frozenset({"transfer-encoding", "upgrade", "expect"})
# Header names that parse_plain_request checks beyond the field syntax.
SPECIAL_HEADERS = NOT_PLAIN_HEADERS | SINGLE_HEADERS | {"connection"}
# A request target the lean path takes: visible ASCII, no fragment, no dot segment.
PLAIN_TARGET = re.compile(rb"/proxy/[!$-.0-9;=@-Z_a-z~:+,'*()%&]+(?:[/?][!-\"$-~]*)?")
HOST_ROUTED_TARGET = re.compile(rb"/[!-\"$-~]*")
DOT_SEGMENT = re.compile(rb"/\.\.?(?:[/?]|$)")
# The field lines of a header section, separated by CRLF. Names are tokens (RFC 9110
# section 5.6.2), and values contain visible ASCII, spaces, tabs and bytes from 0x80 up.
_FIELD_LINE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*"
FIELD_LINES = re.compile(_FIELD_LINE + rb"(?:\r\n" + _FIELD_LINE + rb")*")
# Statuses whose reply has no body, whatever its headers state.
BODILESS_STATUSES = frozenset({204, 304})
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class PlainRequest:
    """One request of the lean path, as parsed from its header section."""

    __slots__ = ("method", "app_key", "path_qs", "headers", "client", "request_id", "keep_alive")

    def __init__(
        self,
        method: str,
        app_key: str,
        path_qs: str,
        headers: CIMultiDict[str],
        client: str | None,
        keep_alive: bool,
    ):
        self.method = method
        self.app_key = app_key
        self.path_qs = path_qs
        self.headers = headers
        self.client = client
        sent_id = headers.get(REQUEST_ID_HEADER)
        if sent_id and CLIENT_REQUEST_ID_PATTERN.fullmatch(sent_id):
            self.request_id = sent_id
        else:
            self.request_id = new_request_id()
        self.keep_alive = keep_alive


def parse_plain_request(head: bytes, client: str | None, host_routed: bool = False) -> PlainRequest | None:
    """Return the request that the header section `head` (without its blank line) holds.

    The app is the first path segment after `/proxy/`, or with `host_routed` the name
    that starts the Host header, and the path is the rest. Returns None when the
    request does not qualify for the lean path, malformed or not.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if len(lines[0]) > MAX_LINE_BYTES or method not in PLAIN_METHODS or version != b"HTTP/1.1" or DOT_SEGMENT.search(target):
        return None
    if not (HOST_ROUTED_TARGET if host_routed else PLAIN_TARGET).fullmatch(target):
        return None
    if len(lines) > MAX_HEADER_FIELDS + 1 or max(map(len, lines)) > MAX_LINE_BYTES:
        return None
    # One regular expression checks the names and values of all field lines.
    if len(lines) > 1 and not FIELD_LINES.fullmatch(head, len(lines[0]) + 2):
        return None
    fields: list[tuple[str, str]] = []
    seen: set[str] = set()
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        text_name = name.decode("ascii")
        # aiohttp's server decodes values the same way, and the upstream client's
        # encoding restores the bytes that the client sent.
        text_value = value.strip(b" \t").decode("utf-8", "surrogateescape")
        lower = text_name.lower()
        if lower in SPECIAL_HEADERS:
            if lower in NOT_PLAIN_HEADERS:
                return None
            if lower in SINGLE_HEADERS:
                if lower in seen:
                    return None
                seen.add(lower)
            if lower == "content-length":
                if text_value != "0":
                    return None
            elif lower == "connection":
                tokens = {token.strip().lower() for token in text_value.split(",")}
                if "upgrade" in tokens:
                    return None
                if "close" in tokens:
                    keep_alive = False
        fields.append((text_name, text_value))
    headers: CIMultiDict[str] = CIMultiDict(fields)

    path_qs = target.decode("ascii")
    if host_routed:
        app_key = host_app_key(headers.get("Host", ""))
        if not app_key:
            return None
    else:
        raw_path, question, query = path_qs.partition("?")
        app_part, _, remainder = raw_path[len(PROXY_PREFIX):].partition("/")
        path_qs = "/" + remainder + (question + query if query else "")
        app_key = unquote(app_part)
    return PlainRequest(method.decode("ascii"), app_key, path_qs, headers, client, keep_alive)


class _HttpDate:
    """The Date header value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True)
        return self._value


http_date = _HttpDate()


def reply_head(status: int, reason: str, headers: CIMultiDict[str]) -> bytes:
    """Serialize a status line and header section, ending with the blank line."""
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    # The upstream client decodes the instance's header bytes with UTF-8 and surrogate
    # escapes, so this encoding restores them, whether they are valid UTF-8 or not.
    return f"HTTP/1.1 {status} {reason}\r\n{fields}\r\n".encode("utf-8", "surrogateescape")


def error_reply(request: PlainRequest, error: ApiError) -> bytes:
    """Return the whole reply for an error of the lean path: the standard envelope."""
    body = encode_json(error_body(error, request.request_id))
    headers: CIMultiDict[str] = CIMultiDict(error.headers or {})
    headers["Content-Type"] = JSON_CONTENT_TYPE
    headers[REQUEST_ID_HEADER] = request.request_id
    headers["Content-Length"] = str(len(body))
    headers["Date"] = http_date.now()
    if not request.keep_alive:
        headers["Connection"] = "close"
    reason = http.HTTPStatus(error.status).phrase
    return reply_head(error.status, reason, headers) + (b"" if request.method == "HEAD" else body)


class Front:
    """The state that the lean connections of one API listener share."""

    def __init__(
        self,
        ingress: Ingress,
        app: web.Application,
        server: Callable[[], asyncio.Protocol],
        host_routed: bool = False,
    ):
        self.ingress = ingress
        self.app = app
        self.server = server
        self.host_routed = host_routed
        # How the buffered bytes of a request of the lean path can start.
        prefix = b" /" if host_routed else b" " + PROXY_PREFIX
        self.starts = tuple(method + prefix for method in PLAIN_METHODS)
        self.connections: set[FrontProtocol] = set()
        self.closing = False

    def plain_allowed(self) -> bool:
        """Return whether app traffic may take the lean path: only while it has no rate limit."""
        limiter = self.app.get(RATE_LIMITER_KEY)
        return limiter is None or limiter.limit_for(RateLimitCategory.INGRESS) is None

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    async def close(self, timeout: float) -> None:
        """Close idle connections now, and busy ones after their reply or `timeout`."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()


class FrontProtocol(asyncio.Protocol):
    """One client connection of the API port, served here until a request needs aiohttp."""

    def __init__(self, front: Front):
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        self._buffer = bytearray()
        self._task: asyncio.Task | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._lost = False
        self._close_when_idle = False

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, (tuple, list)) and peer else None
        self._front.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next_request()
        elif len(self._buffer) > MAX_BUFFERED_BYTES and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self._task is None:
            self._close()
        # The transport stays open for the reply under way, and closes after it.
        self._close_when_idle = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._front.connections.discard(self)
        self._cancel_idle_timer()
        if self._task is not None:
            self._task.cancel()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- what the ingress writes through ------------------------------------------------

    @property
    def limiter(self) -> ApiRateLimiter | None:
        """The API's rate limiter, whose trusted proxies X-Forwarded-For honours."""
        return self._front.app.get(RATE_LIMITER_KEY)

    def write(self, data: bytes) -> None:
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the client's write buffer is above its high-water mark."""
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        if self._writing_paused:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close_when_idle(self) -> None:
        self._close_when_idle = True
        if self._task is None:
            self._close()

    # -- the request cycle -----------------------------------------------------------------

    def _next_request(self) -> None:
        """Serve the buffered request, if its header section is complete, or hand over."""
        buffer = self._buffer
        if not buffer:
            return
        front = self._front
        if not front.plain_allowed() or not _may_start(buffer, front.starts):
            self._hand_over()
            return
        end = buffer.find(HEAD_END)
        if end < 0:
            # aiohttp decides about a head that ends its lines with a bare LF.
            if len(buffer) > MAX_HEAD_BYTES or BARE_LF.search(buffer):
                self._hand_over()
            return
        if end > MAX_HEAD_BYTES:
            self._hand_over()
            return
        request = parse_plain_request(bytes(buffer[:end]), self._client, front.host_routed)
        if request is None:
            self._hand_over()
            return
        del buffer[: end + len(HEAD_END)]
        self._task = self._loop.create_task(self._serve(request))

    async def _serve(self, request: PlainRequest) -> None:
        started = time.perf_counter()
        try:
            try:
                status = await self._front.ingress.forward_plain(self, request)
            except ApiError as error:
                status = error.status
                self.write(error_reply(request, error))
        except (ConnectionError, asyncio.CancelledError) as error:
            # The client went away or the instance failed mid-reply, and the ingress
            # has released the instance either way.
            logger.debug(
                "reply ended early request_id=%s app=%s node=%s: %r",
                request.request_id, request.app_key, self._front.ingress.node_id, error,
            )
            self._task = None
            self._close()
            return
        except Exception:
            logger.exception(
                "lean proxy path failed request_id=%s app=%s node=%s",
                request.request_id, request.app_key, self._front.ingress.node_id,
            )
            self._task = None
            self.abort()
            return
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request request_id=%s method=%s app=%s path=%s status=%d ms=%.1f node=%s",
                request.request_id, request.method, request.app_key,
                request.path_qs.partition("?")[0], status,
                (time.perf_counter() - started) * 1000, self._front.ingress.node_id,
            )
        self._task = None
        if not request.keep_alive or self._close_when_idle or self._front.closing:
            self._close()
            return
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
        self._arm_idle_timer()
        self._next_request()

    def _hand_over(self) -> None:
        """Give the connection, and the bytes not yet served, to aiohttp's RequestHandler."""
        transport = self._transport
        self._front.connections.discard(self)
        self._cancel_idle_timer()
        handler = self._front.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._writing_paused:
            handler.pause_writing()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            handler.data_received(data)

    def _close(self) -> None:
        self._front.connections.discard(self)
        self._cancel_idle_timer()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _arm_idle_timer(self) -> None:
        """Start the idle time now, with one timer per connection that checks it when it fires."""
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            deadline = self._idle_since + KEEPALIVE_TIMEOUT_SECONDS
            self._idle_timer = self._loop.call_at(deadline, self._idle_expired)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._task is not None:
            # A request is in progress, and its end starts the idle time again.
            return
        deadline = self._idle_since + KEEPALIVE_TIMEOUT_SECONDS
        if deadline > self._loop.time():
            self._idle_timer = self._loop.call_at(deadline, self._idle_expired)
        else:
            self._close()


def _may_start(buffer: bytearray, starts: tuple[bytes, ...]) -> bool:
    """Return whether the buffered bytes can still start a request of the lean path."""
    for start in starts:
        size = min(len(buffer), len(start))
        if buffer[:size] == start[:size]:
            return True
    return False


class FrontSite(web.SockSite):
    """An aiohttp site on a bound socket whose connections start at a `Front`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        ingress: Ingress,
        app: web.Application,
        shutdown_timeout: float,
        host_routed: bool = False,
    ):
        super().__init__(runner, sock)
        self._front: Front | None = None
        self._ingress = ingress
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._host_routed = host_routed

    async def start(self) -> None:
        # BaseSite.start registers the site with its runner. SockSite.start is skipped,
        # because it would serve the socket with aiohttp's own protocol.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._front = Front(self._ingress, self._app, server, self._host_routed)
        self._server = await asyncio.get_running_loop().create_server(
            self._front, sock=self._sock, backlog=self._backlog
        )

    async def stop(self) -> None:
        await super().stop()
        if self._front is not None:
            await self._front.close(self._shutdown_timeout)

