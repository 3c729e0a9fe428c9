"""A lean HTTP/1.1 client for the requests that the ingress forwards to app instances.

`UpstreamClient.request` sends one request and returns an `UpstreamResponse` once the
final reply's header section has arrived. The body then streams through
`UpstreamResponse.iter_chunks()`, or comes in one piece from `take_complete_body()`
once all of it has arrived. Each connection is an asyncio `Protocol` whose bytes
go straight into httptools' C parser (llhttp), which also decodes a chunked body.

Flow control works both ways. Reading from the instance pauses while more than
`BODY_BUFFER_HIGH_WATER` body bytes wait for the consumer, and resumes when the
consumer takes them. A streamed request body waits whenever the transport's write
buffer is above its high-water mark.

A connection goes back to an idle pool of its (host, port) only when the reply allowed
it (HTTP/1.1, no `Connection: close`, a body of known length), the request was sent in
full and the body was read to its end. Servers that close every connection (busybox
httpd does) leave nothing to pool. A pooled connection that turns out closed before any
response byte arrives is retried once on a new connection when the request body can be
sent again (none, or bytes). The request never reached the app in that case.

A reply to HEAD ends at its header section, and its connection is closed after it.
Some servers send a body anyway (busybox httpd 1.35 replies to HEAD as to GET), and
httptools gives no offset at which a next reply would start. Interim 1xx replies are
skipped. A 101 reply raises `UpstreamProtocolError`, because this client does not
switch protocols: websockets stay on aiohttp's client.

The limits of a header section are aiohttp's defaults: lines of at most 8190 bytes,
at most 128 fields, and at most 64 KiB for the header sections of one exchange
(interim replies included).

Error messages never contain the instance's address, because the proxy passes them to
its clients. Log lines do.
"""

import asyncio
import collections
import logging
import os
import re
import socket
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import httptools
from multidict import CIMultiDict

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 8190
MAX_FIELDS = 128
MAX_HEADER_SECTION_BYTES = 64 * 1024
# Interim 1xx replies accepted before the final one, as a guard against an endless series.
MAX_INTERIM_REPLIES = 10
# Reading from the instance pauses while more body bytes than this wait for the
# consumer. One read adds at most 256 KiB (asyncio's read size in Python 3.11), so
# the buffer stays below twice this.
BODY_BUFFER_HIGH_WATER = 256 * 1024
# A bytes body up to this size goes out in the same write as the request head.
COALESCED_BODY_BYTES = 64 * 1024
HEAD_METHOD = "HEAD"
# RFC 9110 section 5.6.2: a method is a token.
TOKEN_PATTERN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
MIN_STATUS = 100
SWITCHING_PROTOCOLS = 101
# Methods whose request carries `Content-Length: 0` when there is no body, as
# aiohttp's client does, because servers may reply 411 to them without one.
EMPTY_BODY_LENGTH_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Framing fields of the caller's headers that this client sets itself.
FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding"})
HTTP_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
LAST_CHUNK = b"0\r\n\r\n"
# Below the 5 s keep-alive timeout of uvicorn's and Node.js's HTTP servers, so that the
# client usually closes an idle connection before the server does.
DEFAULT_IDLE_TIMEOUT_SECONDS = 4.0
CRLF = b"\r\n"


class UpstreamError(Exception):
    """A request to an instance that failed.

    `body_sent` is whether any byte of the request body went to the connection: a
    request whose body is a stream cannot be sent again then. The message names the
    cause without the instance's address.
    """

    timed_out = False

    def __init__(self, message: str, *, body_sent: bool = False):
        super().__init__(message)
        self.body_sent = body_sent


class UpstreamConnectError(UpstreamError):
    """The connection could not be made (refused, unreachable, timed out): nothing was sent.

    Any request may go to another instance. `timed_out` is True for a connection that
    took longer than `connect_timeout`.
    """

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message, body_sent=False)
        self.timed_out = timed_out


class UpstreamTimeoutError(UpstreamError):
    """The request went out, but the reply's header section did not arrive within `read_timeout`.

    The app may still be working on the request, so it is not sent again.
    """

    timed_out = True


class UpstreamClosedError(UpstreamError):
    """The instance closed or reset the connection before the first response byte.

    The app may have seen the request, so only an idempotent request may go to another
    instance. When a pooled connection closed and the body could be sent again, the
    client already retried once on a new connection, and this error is of that attempt.
    """


class UpstreamProtocolError(UpstreamError):
    """The reply before the end of its header section is not valid HTTP/1.x, or exceeds a limit.

    A 101 reply, and a connection closed within the header section, count here too.
    """


class UpstreamBodyError(UpstreamError):
    """The reply failed after its header section: closed, reset, timed out or malformed body framing.

    Part of the body may have been passed on already, so the proxy cuts its client's
    connection. `timed_out` is True when no body byte arrived within `read_timeout`.
    """

    def __init__(self, message: str, *, body_sent: bool, timed_out: bool = False):
        super().__init__(message, body_sent=body_sent)
        self.timed_out = timed_out


class _StopParsing(Exception):
    """Raised from a parser callback to end `feed_data` early. `problem` is a protocol error, or None."""

    def __init__(self, problem: str | None = None):
        super().__init__(problem)
        self.problem = problem


class UpstreamResponse:
    """The final reply of an instance: status line and header fields, with the body still to read.

    `headers` keeps repeated fields in their order. `version` is (1, 1) or (1, 0).
    Call `release()` when done with it, or `close()` to drop the connection.
    """

    __slots__ = ("status", "reason", "headers", "version", "_connection")

    def __init__(
        self, connection: "_Connection", status: int, reason: str, headers: CIMultiDict[str], version: tuple[int, int]
    ):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self._connection: _Connection | None = connection

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives, transfer coding removed, then release the connection.

        Raises UpstreamBodyError when the reply fails after its header section, once
        every byte that arrived before the failure has been yielded.
        """
        connection = self._connection
        if connection is None:
            return
        while True:
            chunk = connection.take_body()
            if chunk:
                yield chunk
            elif connection.message_complete:
                self.release()
                return
            else:
                await connection.wait_for_body()

    async def read(self) -> bytes:
        """Read the whole body into memory and return it, for small replies."""
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def take_complete_body(self) -> bytes | None:
        """Return the whole body and release the connection when all of it has arrived, else None.

        Nothing is taken from an incomplete body, so `iter_chunks()` still yields all of it.
        """
        connection = self._connection
        if connection is None:
            return b""
        if not connection.message_complete:
            return None
        body = connection.take_body()
        self.release()
        return body

    def release(self) -> None:
        """Return the connection to its pool when the body was read in full, else close it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish_exchange()

    def close(self) -> None:
        """Drop the connection, whatever is left of the body."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()

    async def __aenter__(self) -> "UpstreamResponse":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.release()


class UpstreamClient:
    """HTTP/1.1 requests to app instances over pooled keep-alive connections.

    `connect_timeout` bounds connecting. `read_timeout` bounds each wait for the
    instance: for the next response byte, or for it to take more of a streamed
    request body. Time spent waiting on the caller (its request body stream, or
    consuming the reply while the buffer is full) does not count. Each (host, port)
    keeps at most `max_idle_per_origin` idle connections, each for at most
    `idle_timeout` seconds. A client serves one event loop: that of its first request.
    """

    def __init__(
        self,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_idle_per_origin: int = 32,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
    ):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self.closed = False
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        # The event loop of the first request, which every later request must share.
        # Kept because asyncio.get_running_loop() makes a getpid system call each time.
        self._loop: asyncio.AbstractEventLoop | None = None

    def idle_connections(self, host: str, port: int) -> int:
        """Return how many idle connections to host:port the pool contains."""
        return len(self._idle.get((host, port), ()))

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] | Any = (),
        body: bytes | AsyncIterable[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send `method target` to host:port and return the final reply, its header section read.

        `headers` is a list of (name, value) pairs or a multidict, hop-by-hop fields
        already removed. The client adds `Host` when it is missing and sets the
        framing itself: `Content-Length` for a bytes body, `Transfer-Encoding: chunked`
        for a stream, nothing for no body (but `Content-Length: 0` for POST, PUT and
        PATCH). A stream keeps the caller's `Content-Length` when there is one, and
        must then yield exactly that many bytes. A stream is any async iterable of
        bytes. An aiohttp `StreamReader` is read with `iter_any()`, because iterating
        it directly yields lines.

        Raises an `UpstreamError` subclass. An exception of the body stream, or a
        ValueError for invalid arguments, propagates as it is.
        """
        if self.closed:
            raise RuntimeError("the upstream client is closed")
        stream, declared_length = _stream_of(body, headers)
        head = _request_head(
            host, port, method, target, headers,
            body if stream is None else None, stream is not None, declared_length,
            close=method == HEAD_METHOD or self.max_idle_per_origin <= 0,
        )
        payload = body if stream is None and body else None
        connection = self._pop_idle(host, port)
        if connection is not None:
            try:
                return await connection.exchange(method, head, payload, stream, declared_length)
            except UpstreamClosedError:
                # A stream may have been read from, so it cannot be sent again.
                if stream is not None:
                    raise
                logger.debug(
                    "pooled connection to %s:%d closed before a reply to %s %s; retrying on a new connection",
                    host, port, method, target,
                )
        connection = await self._connect(host, port)
        return await connection.exchange(method, head, payload, stream, declared_length)

    async def close(self) -> None:
        """Close every idle connection. Connections in use close when their reply is released."""
        self.closed = True
        pools, self._idle = self._idle, {}
        for pool in pools.values():
            for connection in pool:
                connection.abort()

    async def _connect(self, host: str, port: int) -> "_Connection":
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # What asyncio.timeout does, without its calls of get_running_loop(): a timer
        # cancels this task, and the cancellation it caused becomes a timeout.
        task = asyncio.current_task(loop)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_later(self.connect_timeout, expire)
        try:
            _, connection = await loop.create_connection(lambda: _Connection(self, loop, host, port), host, port)
        except asyncio.CancelledError as error:
            if not expired or task.uncancel() > 0:
                raise
            logger.debug("connecting to %s:%d timed out after %ss", host, port, self.connect_timeout)
            raise UpstreamConnectError(f"connecting timed out after {self.connect_timeout}s", timed_out=True) from error
        except OSError as error:
            logger.debug("connecting to %s:%d failed: %s", host, port, error)
            # asyncio's message names the address, so only the error code's text is kept.
            if isinstance(error, socket.gaierror):
                reason = error.strerror
            else:
                reason = os.strerror(error.errno) if error.errno else type(error).__name__
            raise UpstreamConnectError(f"connecting failed: {reason}") from error
        finally:
            timer.cancel()
        if expired:
            # The timer fired after the connection was made: withdraw its cancellation.
            task.uncancel()
        return connection

    def _pop_idle(self, host: str, port: int) -> "_Connection | None":
        pool = self._idle.get((host, port))
        while pool:
            connection = pool.pop()
            if connection.take_from_pool():
                return connection
        return None

    def _park(self, connection: "_Connection") -> bool:
        """Put a finished connection in its idle pool, or return False when it must close instead."""
        if self.closed or self.max_idle_per_origin <= 0:
            return False
        pool = self._idle.setdefault(connection.origin, [])
        if len(pool) >= self.max_idle_per_origin:
            return False
        pool.append(connection)
        return True

    def _forget(self, connection: "_Connection") -> None:
        pool = self._idle.get(connection.origin)
        if pool is not None and connection in pool:
            pool.remove(connection)


class _Connection(asyncio.Protocol):
    """One connection to an instance and the state of the exchange running on it."""

    def __init__(self, client: UpstreamClient, loop: asyncio.AbstractEventLoop, host: str, port: int):
        self.client = client
        self.origin = (host, port)
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # The leniencies of aiohttp's response parser (3.14) that keep the field
        # checks: a bare LF ends a line, and spaces may follow a chunk size.
        self.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True)
        self.closed = False
        self.idle = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.drain_waiter: asyncio.Future | None = None
        self.reading_paused = False
        self.exchanges = 0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.method = ""
        self.active = False
        self.head_waiter: asyncio.Future | None = None
        self.body_waiter: asyncio.Future | None = None
        self.failure: BaseException | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.got_bytes = False
        # Bytes received before the final header section ended, and the bytes of the
        # header fields parsed in that time.
        self.head_bytes = 0
        self.field_bytes = 0
        self.interim_replies = 0
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.headers_complete = False
        self.message_complete = False
        self.until_eof = False
        self.keep_alive = False
        self.discard_input = False
        self.request_sent = False
        self.body_sent = False
        self.sender: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_progress = 0.0

    # -- asyncio protocol callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:
            if self.idle:
                logger.debug("idle connection to %s:%d received unexpected bytes; closing it", *self.origin)
            self.abort()
            return
        self.got_bytes = True
        self.last_progress = self.loop.time()
        if self.discard_input:
            return
        if not self.headers_complete:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Not reached while on_headers_complete rejects 101, the only status that upgrades.
            self._protocol_failed("the instance switched protocols, which this client does not support")
            return
        except httptools.HttpParserError as error:
            self._parse_failed(error)
            return
        if not self.headers_complete and self.head_bytes > MAX_HEADER_SECTION_BYTES:
            self._protocol_failed(f"the reply's header section is longer than {MAX_HEADER_SECTION_BYTES} bytes")

    def eof_received(self) -> bool:
        # Returning False lets the transport close, and connection_lost settles the exchange.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle:
            self.idle = False
            self._cancel_idle_timer()
            self.client._forget(self)
        self._wake_drain(exc)
        if not self.active or self.failure is not None:
            return
        if self.headers_complete:
            if self.message_complete:
                return
            if self.until_eof and exc is None:
                self.message_complete = True
                self._wake_body()
                return
            detail = "reset the connection" if exc is not None else "closed the connection"
            self._fail(UpstreamBodyError(f"the instance {detail} before the end of the response body", body_sent=self.body_sent))
        elif self.got_bytes:
            self._fail(UpstreamProtocolError(
                "the instance closed the connection within the response's header section", body_sent=self.body_sent
            ))
        else:
            detail = "reset the connection" if exc is not None else "closed the connection"
            self._fail(UpstreamClosedError(f"the instance {detail} before sending a response", body_sent=self.body_sent))
        logger.debug(
            "connection to %s:%d lost during %s after %d exchanges: %r", *self.origin, self.method, self.exchanges, exc
        )

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_progress = self.loop.time()
        self._wake_drain(None)

    # -- httptools parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.message_complete:
            # Bytes after a complete reply mean the connection cannot carry another exchange.
            raise _StopParsing()
        self.reason = b""
        self.fields = []

    def on_status(self, status: bytes) -> None:
        self.reason += status
        if len(self.reason) > MAX_LINE_BYTES:
            raise _StopParsing(f"the reply's status line is longer than {MAX_LINE_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        line_bytes = len(name) + len(value) + 2
        if line_bytes > MAX_LINE_BYTES:
            raise _StopParsing(f"a header field line of the reply is longer than {MAX_LINE_BYTES} bytes")
        fields = self.fields
        if len(fields) >= MAX_FIELDS:
            raise _StopParsing(f"the reply has more than {MAX_FIELDS} header fields")
        # Counted as parsed, because a whole header section may arrive in one read.
        self.field_bytes += line_bytes + 2
        if self.field_bytes > MAX_HEADER_SECTION_BYTES:
            raise _StopParsing(f"the reply's header section is longer than {MAX_HEADER_SECTION_BYTES} bytes")
        fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        version = HTTP_VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _StopParsing(f"the reply's HTTP version {parser.get_http_version()} is not supported")
        if status < MIN_STATUS:
            # llhttp takes any three digits, but RFC 9110 section 15 defines 100 to 599.
            raise _StopParsing(f"the reply's status code {status} is below {MIN_STATUS}")
        if status == SWITCHING_PROTOCOLS:
            raise _StopParsing("the instance switched protocols (101), which this client does not support")
        if status < 200:
            self.interim_replies += 1
            if self.interim_replies > MAX_INTERIM_REPLIES:
                raise _StopParsing(f"the reply has more than {MAX_INTERIM_REPLIES} interim 1xx replies")
            return

        headers = CIMultiDict(
            # llhttp strips the whitespace before a field value, not after it.
            [(name.decode("latin-1"), value.rstrip(b" \t").decode("utf-8", "surrogateescape")) for name, value in self.fields]
        )
        self.fields = []
        self.headers_complete = True
        is_head = self.method == HEAD_METHOD
        self.until_eof = not is_head and status not in (204, 304) and _framed_until_eof(headers)
        self.keep_alive = version == (1, 1) and not is_head and parser.should_keep_alive()

        response = UpstreamResponse(
            self, status, self.reason.decode("utf-8", "surrogateescape").strip(" \t"), headers, version
        )
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if is_head:
            # Whatever follows a reply to HEAD is never read.
            self.message_complete = True
            raise _StopParsing()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > BODY_BUFFER_HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.headers_complete:
            self.message_complete = True
            self._wake_body()

    # -- one exchange ------------------------------------------------------------------------

    async def exchange(
        self,
        method: str,
        head: bytes,
        payload: bytes | None,
        stream: AsyncIterable[bytes] | None,
        declared_length: int | None,
    ) -> UpstreamResponse:
        """Send one request on this connection and return the reply once its header section is read."""
        if self.exchanges:
            # A new connection starts with the state that __init__ set.
            self._reset_exchange()
        self.active = True
        self.exchanges += 1
        self.method = method
        self.head_waiter = self.loop.create_future()
        self.last_progress = self.loop.time()
        self.timer = self.loop.call_at(self.last_progress + self.client.read_timeout, self._check_timeout)

        transport = self.transport
        try:
            if stream is None:
                if payload is None:
                    transport.write(head)
                elif len(payload) <= COALESCED_BODY_BYTES:
                    transport.write(head + payload)
                else:
                    transport.write(head)
                    transport.write(payload)
                self.body_sent = payload is not None
                self.request_sent = True
            else:
                transport.write(head)
                self.sender = self.loop.create_task(self._send_stream(stream, declared_length))
            response = await self.head_waiter
        except BaseException:
            self.abort()
            raise

        if self.message_complete and not self.chunks:
            # No body to read (HEAD, 204, 304, an empty body): the exchange ends here.
            response.release()
        return response

    async def _send_stream(self, stream: AsyncIterable[bytes], declared_length: int | None) -> None:
        """Write a streamed request body, chunked unless its length was declared."""
        transport = self.transport
        sent = 0
        try:
            async for chunk in stream:
                if self.closed or self.failure is not None:
                    return
                # The wait for the caller's stream is not the instance's delay.
                self.last_progress = self.loop.time()
                if not chunk:
                    continue
                sent += len(chunk)
                if declared_length is None:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                elif sent > declared_length:
                    raise ValueError(f"the request body is longer than its Content-Length of {declared_length} bytes")
                else:
                    transport.write(chunk)
                self.body_sent = True
                if self.write_paused:
                    await self._drain()
            if self.closed or self.failure is not None:
                return
            if declared_length is None:
                transport.write(LAST_CHUNK)
            elif sent != declared_length:
                raise ValueError(
                    f"the request body ended after {sent} of the {declared_length} bytes of its Content-Length"
                )
            self.request_sent = True
            self.last_progress = self.loop.time()
        except asyncio.CancelledError:
            raise
        except _ConnectionGone:
            return
        except BaseException as error:
            logger.debug("request body stream to %s:%d failed: %r", *self.origin, error)
            self._fail(error)
            self.abort()

    async def _drain(self) -> None:
        if self.closed:
            raise _ConnectionGone()
        self.drain_waiter = self.loop.create_future()
        try:
            await self.drain_waiter
        finally:
            self.drain_waiter = None

    def _wake_drain(self, exc: Exception | None) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            if self.closed:
                waiter.set_exception(_ConnectionGone())
            else:
                waiter.set_result(None)

    def take_body(self) -> bytes:
        """Return the buffered body bytes (b"" when none) and resume reading when it was paused."""
        chunks = self.chunks
        if not chunks:
            return b""
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused:
            self.reading_paused = False
            self.last_progress = self.loop.time()
            if not self.closed:
                self.transport.resume_reading()
        return chunk

    async def wait_for_body(self) -> None:
        """Wait for more body bytes or the end of the body, or raise the exchange's failure."""
        if self.failure is not None:
            raise self.failure
        self.body_waiter = self.loop.create_future()
        try:
            await self.body_waiter
        finally:
            self.body_waiter = None

    def _wake_body(self) -> None:
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish_exchange(self) -> None:
        """End the exchange, and park the connection when it can carry another one, else close it."""
        if not self.active:
            return
        reusable = (
            self.keep_alive
            and self.message_complete
            and not self.chunks
            and self.request_sent
            and self.failure is None
            and not self.closed
        )
        self._end_exchange()
        if reusable and self.client._park(self):
            self.idle = True
            self.idle_handle = self.loop.call_later(self.client.idle_timeout, self._expire)
        else:
            self.abort()

    def take_from_pool(self) -> bool:
        """Leave the idle pool, or return False when the connection closed meanwhile."""
        self.idle = False
        self._cancel_idle_timer()
        if self.closed or self.transport.is_closing():
            self.abort()
            return False
        return True

    def abort(self) -> None:
        """Close the connection at once, ending any exchange on it."""
        if self.active:
            self._end_exchange()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def _end_exchange(self) -> None:
        if not self.message_complete:
            # Wakes a reader of the body in another task.
            self._fail(UpstreamBodyError("the reply was closed before its end", body_sent=self.body_sent))
        self.active = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sender = self.sender
        if sender is not None and not sender.done():
            sender.cancel()
        self.sender = None

    def _expire(self) -> None:
        self.idle_handle = None
        logger.debug("closing the connection to %s:%d after %ss idle", *self.origin, self.client.idle_timeout)
        self.client._forget(self)
        self.idle = False
        self.abort()

    def _cancel_idle_timer(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None

    def _check_timeout(self) -> None:
        """Fail the exchange when the instance made no progress for `read_timeout` seconds."""
        self.timer = None
        if not self.active or self.failure is not None or self.message_complete:
            return
        now = self.loop.time()
        if self.reading_paused or (self.sender is not None and not self.request_sent and not self.write_paused):
            # Waiting on the caller (its body stream, or its reading of the reply).
            self.last_progress = now
        read_timeout = self.client.read_timeout
        deadline = self.last_progress + read_timeout
        if now < deadline:
            self.timer = self.loop.call_at(deadline, self._check_timeout)
            return
        logger.debug("no bytes from %s:%d within %ss during %s", *self.origin, read_timeout, self.method)
        if self.headers_complete:
            error: UpstreamError = UpstreamBodyError(
                f"the instance sent no body bytes within {read_timeout}s", body_sent=self.body_sent, timed_out=True
            )
        else:
            error = UpstreamTimeoutError(f"the instance sent no response within {read_timeout}s", body_sent=self.body_sent)
        self._fail(error)
        self.closed = True
        self.transport.abort()

    def _parse_failed(self, error: httptools.HttpParserError) -> None:
        context = error.__context__
        if isinstance(context, _StopParsing):
            if context.problem is None:
                # A reply to HEAD ended, or bytes followed a complete reply.
                self.discard_input = True
                self.keep_alive = False
                return
            self._protocol_failed(context.problem)
            return
        if self.message_complete:
            self.discard_input = True
            self.keep_alive = False
            return
        self._protocol_failed(f"the reply is not valid HTTP/1.1: {error}")

    def _protocol_failed(self, message: str) -> None:
        logger.debug("invalid reply from %s:%d to %s: %s", *self.origin, self.method, message)
        if self.headers_complete:
            self._fail(UpstreamBodyError(f"the response body is malformed: {message}", body_sent=self.body_sent))
        else:
            self._fail(UpstreamProtocolError(message, body_sent=self.body_sent))
        self.discard_input = True
        self.closed = True
        self.transport.abort()

    def _fail(self, error: BaseException) -> None:
        """Record the exchange's first failure and wake the waiting caller."""
        if self.failure is not None:
            return
        self.failure = error
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake_body()


class _ConnectionGone(Exception):
    """The connection closed while a request body was being written. The reply side reports why."""


def _stream_of(body: Any, headers: Any) -> tuple[AsyncIterable[bytes] | None, int | None]:
    """Return the body's stream (None for bytes or no body) and the Content-Length that it declares."""
    if body is None or isinstance(body, (bytes, bytearray, memoryview)):
        return None, None
    iter_any = getattr(body, "iter_any", None)
    stream = iter_any() if callable(iter_any) else body
    if not hasattr(stream, "__aiter__"):
        raise TypeError(f"a request body must be bytes or an async iterable of bytes, not {type(body).__name__}")
    values = [value for name, value in _pairs(headers) if name.lower() == "content-length"]
    if not values:
        return stream, None
    if len(set(values)) != 1 or not values[0].strip().isdigit():
        raise ValueError(f"invalid Content-Length {values!r} for a streamed request body")
    return stream, int(values[0])


def _pairs(headers: Any) -> Iterable[tuple[str, str]]:
    items = getattr(headers, "items", None)
    return items() if callable(items) else headers


def _request_head(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: Any,
    payload: bytes | None,
    streamed: bool,
    declared_length: int | None,
    close: bool,
) -> bytes:
    """Return the request line and header section, with `Host` and the framing fields set."""
    if not TOKEN_PATTERN.fullmatch(method) or not target or " " in target:
        raise ValueError(f"invalid request line {method!r} {target!r}")

    parts = [method, " ", target, " HTTP/1.1\r\n"]
    lines = 1
    has_host = False
    for name, value in _pairs(headers):
        lowered = name.lower()
        if lowered in FRAMING_FIELDS or (close and lowered == "connection"):
            continue
        if lowered == "host":
            has_host = True
        parts += (name, ": ", value, "\r\n")
        lines += 1

    if not has_host:
        authority = f"[{host}]" if ":" in host else host
        parts.append(f"Host: {authority}\r\n" if port == 80 else f"Host: {authority}:{port}\r\n")
        lines += 1
    if streamed:
        parts.append("Transfer-Encoding: chunked\r\n" if declared_length is None else f"Content-Length: {declared_length}\r\n")
        lines += 1
    elif payload is not None:
        parts.append(f"Content-Length: {len(payload)}\r\n")
        lines += 1
    elif method in EMPTY_BODY_LENGTH_METHODS:
        parts.append("Content-Length: 0\r\n")
        lines += 1
    if close:
        parts.append("Connection: close\r\n")
        lines += 1
    parts.append("\r\n")

    text = "".join(parts)
    # Each line adds one CRLF. Any other CR or LF would split a field (header injection).
    if text.count("\n") != lines + 1 or text.count("\r") != lines + 1:
        raise ValueError("a request header name or value contains CR or LF")
    # aiohttp's server decodes header bytes with surrogateescape, so this encoding restores them.
    return text.encode("utf-8", "surrogateescape")


def _framed_until_eof(headers: CIMultiDict[str]) -> bool:
    """Return whether a reply's body runs to the end of the connection (RFC 9112 section 6.3)."""
    codings = headers.getall("Transfer-Encoding", ())
    if codings:
        return codings[-1].rsplit(",", 1)[-1].strip().lower() != "chunked"
    return "Content-Length" not in headers
