"""Unit tests of the ingress's upstream HTTP/1.1 client against real servers on 127.0.0.1.

Most servers here are plain asyncio servers written in the test, so that each one
can send exactly the bytes of a broken or unusual instance. aiohttp's server
cross-checks the request framing that the client writes.
"""

import asyncio
import hashlib
import re
import socket
import tracemalloc

import pytest
import aiohttp
from aiohttp import web

from voxanode.ingress.upstream import (
    BODY_BUFFER_HIGH_WATER,
    UpstreamBodyError,
    UpstreamClient,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

HOST = "127.0.0.1"
BIG_BODY_BYTES = 50 * 1024 * 1024
BIG_CHUNK_BYTES = 64 * 1024
# Python objects that one streamed reply may keep alive at its peak, far below the
# 50 MiB that buffering it would take.
STREAM_PEAK_LIMIT_BYTES = 8 * 1024 * 1024
UPLOAD_BYTES = 32 * 1024 * 1024
OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- servers ------------------------------------------------------------------------------


class RawServer:
    """A TCP server on 127.0.0.1 that runs `handler(server, reader, writer)` per connection.

    It counts connections and records each request that `read_request` reads.
    """

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.open_connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def start(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, and end the handlers still running by aborting their connections."""
        self.server.close()
        handlers = list(self.open_connections)
        for writer in self.open_connections.values():
            writer.transport.abort()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        self.open_connections[handler] = writer
        try:
            await self.handler(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            del self.open_connections[handler]
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        """Read one request: its head, then a body framed by Content-Length or chunked."""
        head = await reader.readuntil(b"\r\n\r\n")
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
        body = b""
        if fields.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                if size == 0:
                    break
        elif b"content-length" in fields:
            body = await reader.readexactly(int(fields[b"content-length"]))
        self.requests.append((head, body))
        return head, body


def replying(*replies: bytes, hold_open: bool = False):
    """Return a handler that reads one request per reply and sends it, then closes.

    With `hold_open`, the connection stays open after the last reply until the client closes it.
    """

    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await server.read_request(reader)
            writer.write(reply)
            await writer.drain()
        if hold_open:
            await reader.read()

    return handler


async def keep_alive(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reply to every request on the connection with a 2-byte body, keeping it open."""
    while True:
        head, _ = await server.read_request(reader)
        path = head.split(b" ")[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path))
        await writer.drain()


@pytest.fixture
async def raw_server():
    servers: list[RawServer] = []

    async def start(handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def client():
    upstream = UpstreamClient(connect_timeout=2.0, read_timeout=2.0, max_idle_per_origin=4, idle_timeout=10.0)
    yield upstream
    await upstream.close()


async def echo_handler(request: web.Request) -> web.StreamResponse:
    """Reply with the request's method, framing and body, chunked when the query has `chunked`."""
    body = await request.read()
    response = web.StreamResponse(headers={"X-Method": request.method})
    response.headers["X-Request-Framing"] = (
        "chunked" if request.headers.get("Transfer-Encoding") == "chunked"
        else f"length {request.headers.get('Content-Length')}"
    )
    response.headers["X-Host"] = request.headers.get("Host", "")
    if "chunked" in request.query:
        response.enable_chunked_encoding()
    else:
        response.content_length = len(body)
    await response.prepare(request)
    for start in range(0, len(body), 1000):
        await response.write(body[start:start + 1000])
    await response.write_eof()
    return response


@pytest.fixture
async def aiohttp_server():
    app = web.Application(client_max_size=UPLOAD_BYTES)
    app.router.add_route("*", "/{tail:.*}", echo_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


async def body_stream(*parts: bytes):
    for part in parts:
        await asyncio.sleep(0)
        yield part


def assert_no_address(error: Exception, port: int) -> None:
    assert HOST not in str(error)
    assert str(port) not in str(error)


# --- requests and framing -----------------------------------------------------------------


async def test_get_reads_status_headers_and_body(client, aiohttp_server):
    response = await client.request(HOST, aiohttp_server, "GET", "/a?b=1", [("X-Custom", "1")])

    assert (response.status, response.reason, response.version) == (200, "OK", (1, 1))
    assert response.headers["X-Method"] == "GET"
    assert response.headers["x-request-framing"] == "length None"
    assert response.headers["X-Host"] == f"{HOST}:{aiohttp_server}"
    assert await response.read() == b""


async def test_request_bytes_written(client, raw_server):
    server = await raw_server(replying(OK_REPLY))

    response = await client.request(HOST, server.port, "POST", "/up", [("Host", "app.example"), ("X-A", "1")], b"hello")

    assert await response.read() == b"ok"
    assert server.requests == [
        (b"POST /up HTTP/1.1\r\nHost: app.example\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n", b"hello")
    ]


async def test_caller_framing_fields_replaced(client, raw_server):
    server = await raw_server(replying(OK_REPLY, OK_REPLY))
    stale = [("Content-Length", "99"), ("Transfer-Encoding", "chunked")]

    first = await client.request(HOST, server.port, "PUT", "/", stale, b"abc")
    await first.read()
    second = await client.request(HOST, server.port, "POST", "/", stale)
    await second.read()

    heads = [head for head, _ in server.requests]
    assert heads[0].endswith(b"\r\nContent-Length: 3\r\n\r\n")
    assert b"Transfer-Encoding" not in heads[0]
    assert heads[1].endswith(b"\r\nContent-Length: 0\r\n\r\n")


async def test_streamed_body_sent_chunked(client, raw_server):
    server = await raw_server(replying(OK_REPLY))

    response = await client.request(HOST, server.port, "POST", "/", [], body_stream(b"ab", b"", b"cde"))

    assert await response.read() == b"ok"
    head, body = server.requests[0]
    assert head.endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert body == b"abcde"


async def test_streamed_body_with_declared_length(client, aiohttp_server):
    response = await client.request(
        HOST, aiohttp_server, "PUT", "/", [("Content-Length", "6")], body_stream(b"abc", b"def")
    )

    assert response.headers["X-Request-Framing"] == "length 6"
    assert await response.read() == b"abcdef"


async def test_streamed_body_shorter_than_declared(client, raw_server):
    server = await raw_server(replying(OK_REPLY))

    with pytest.raises(ValueError, match="ended after 3 of the 6 bytes"):
        await client.request(HOST, server.port, "PUT", "/", [("Content-Length", "6")], body_stream(b"abc"))

    assert client.idle_connections(HOST, server.port) == 0


async def test_chunked_both_ways_with_aiohttp(client, aiohttp_server):
    parts = [bytes([n]) * (7000 + n) for n in range(20)]

    response = await client.request(HOST, aiohttp_server, "POST", "/?chunked", [], body_stream(*parts))

    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.headers["X-Request-Framing"] == "chunked"
    assert await response.read() == b"".join(parts)


async def test_aiohttp_request_content_forwarded(client, raw_server):
    upstream = await raw_server(replying(OK_REPLY))

    async def relay(request: web.Request) -> web.Response:
        response = await client.request(HOST, upstream.port, request.method, "/", [], request.content)
        return web.Response(status=response.status, body=await response.read())

    app = web.Application()
    app.router.add_post("/", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    try:
        url = f"http://{HOST}:{runner.addresses[0][1]}/"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=body_stream(b"line one\n", b"line two\n" * 5000)) as reply:
                assert reply.status == 200
                assert await reply.read() == b"ok"
    finally:
        await runner.cleanup()

    # The handler passed aiohttp's StreamReader itself as the body.
    assert upstream.requests[0][1] == b"line one\n" + b"line two\n" * 5000


async def test_chunked_reply_decoded(client, raw_server):
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n5 \r\ndefgh\r\n0\r\nX-Trailer: 1\r\n\r\n"
    server = await raw_server(replying(reply, OK_REPLY))

    first = await client.request(HOST, server.port, "GET", "/")
    body = await first.read()
    second = await client.request(HOST, server.port, "GET", "/")

    assert body == b"abcdefgh"
    assert await second.read() == b"ok"
    assert server.connections == 1


async def test_reply_body_until_close(client, raw_server):
    server = await raw_server(replying(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall of it"))

    response = await client.request(HOST, server.port, "GET", "/")

    assert await response.read() == b"all of it"
    assert client.idle_connections(HOST, server.port) == 0


async def test_header_injection_rejected(client, raw_server):
    server = await raw_server(replying(OK_REPLY))

    with pytest.raises(ValueError, match="CR or LF"):
        await client.request(HOST, server.port, "GET", "/", [("X-A", "1\r\nX-Injected: 1")])

    assert server.connections == 0


# --- replies without a body -----------------------------------------------------------------


async def test_head_reply_body_ignored(client, raw_server):
    # busybox httpd replies to HEAD as to GET, body included.
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/html\r\n\r\n<html></html>"
    server = await raw_server(replying(reply, hold_open=True))

    response = await client.request(HOST, server.port, "HEAD", "/")

    assert response.status == 200
    assert response.headers["Content-Length"] == "11"
    assert await response.read() == b""
    assert server.requests[0][0] == f"HEAD / HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nConnection: close\r\n\r\n".encode()
    assert client.idle_connections(HOST, server.port) == 0


@pytest.mark.parametrize("status", [204, 304])
async def test_reply_without_body_status(client, raw_server, status):
    reply = b"HTTP/1.1 %d Nothing\r\nContent-Length: 100\r\nETag: \"v1\"\r\n\r\n" % status
    server = await raw_server(replying(reply, OK_REPLY))

    first = await client.request(HOST, server.port, "GET", "/")
    second = await client.request(HOST, server.port, "GET", "/")

    assert first.status == status
    assert first.headers["ETag"] == '"v1"'
    assert await first.read() == b""
    assert await second.read() == b"ok"
    assert server.connections == 1


async def test_interim_replies_skipped(client, raw_server):
    reply = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    server = await raw_server(replying(reply))

    response = await client.request(HOST, server.port, "POST", "/", [], b"x")

    assert (response.status, response.reason) == (201, "Created")
    assert "Link" not in response.headers
    assert await response.read() == b"done"


async def test_repeated_fields_kept_in_order(client, raw_server):
    reply = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-B: 1\r\nset-cookie: b=2; Path=/\r\n"
        b"Set-Cookie: c=3 \r\nContent-Length: 0\r\n\r\n"
    )
    server = await raw_server(replying(reply))

    response = await client.request(HOST, server.port, "GET", "/")

    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2; Path=/", "c=3"]
    assert list(response.headers.items())[:4] == [
        ("Set-Cookie", "a=1"), ("X-B", "1"), ("set-cookie", "b=2; Path=/"), ("Set-Cookie", "c=3")
    ]


async def test_bare_lf_reply_accepted(client, raw_server):
    server = await raw_server(replying(b"HTTP/1.0 200\nX-A:  spaced \nContent-Length: 2\n\nok"))

    response = await client.request(HOST, server.port, "GET", "/")

    assert (response.status, response.reason, response.version) == (200, "", (1, 0))
    assert response.headers["X-A"] == "spaced"
    assert await response.read() == b"ok"


async def test_take_complete_body_of_arrived_reply(client, raw_server):
    server = await raw_server(keep_alive)

    response = await client.request(HOST, server.port, "GET", "/abc")
    await asyncio.sleep(0.05)
    body = response.take_complete_body()

    assert body == b"/abc"
    assert client.idle_connections(HOST, server.port) == 1
    assert response.take_complete_body() == b""


async def test_take_complete_body_leaves_incomplete_reply(client, raw_server):
    release = asyncio.Event()

    async def slow_body(server, reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        await release.wait()
        writer.write(b"def")
        await reader.read()

    server = await raw_server(slow_body)
    response = await client.request(HOST, server.port, "GET", "/")
    await asyncio.sleep(0.05)

    assert response.take_complete_body() is None
    release.set()
    assert await response.read() == b"abcdef"


# --- streaming and flow control ---------------------------------------------------------------


class BulkProtocol(asyncio.Protocol):
    """Serve one reply of BIG_BODY_BYTES, counting how often the transport paused writing."""

    def __init__(self):
        self.transport = None
        self.pauses = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.writer: asyncio.Task | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.writer is None and b"\r\n\r\n" in data:
            self.writer = asyncio.get_running_loop().create_task(self._write_body())

    def pause_writing(self):
        self.pauses += 1
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def connection_lost(self, exc):
        self.can_write.set()

    async def _write_body(self):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BODY_BYTES)
        chunk = bytes(range(256)) * (BIG_CHUNK_BYTES // 256)
        for _ in range(BIG_BODY_BYTES // BIG_CHUNK_BYTES):
            await self.can_write.wait()
            if self.transport.is_closing():
                return
            self.transport.write(chunk)


async def test_big_reply_streams_in_bounded_memory(client):
    protocols: list[BulkProtocol] = []

    def factory():
        protocols.append(BulkProtocol())
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(factory, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    expected = hashlib.sha256((bytes(range(256)) * (BIG_CHUNK_BYTES // 256)) * (BIG_BODY_BYTES // BIG_CHUNK_BYTES))
    digest = hashlib.sha256()
    received = 0
    tracemalloc.start()
    try:
        response = await client.request(HOST, port, "GET", "/big")
        # A slow consumer: the client's buffer fills and the server has to wait.
        await asyncio.sleep(0.3)
        async for chunk in response.iter_chunks():
            assert len(chunk) <= 2 * BODY_BUFFER_HIGH_WATER
            received += len(chunk)
            digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.close()
        await server.wait_closed()

    assert received == BIG_BODY_BYTES
    assert digest.digest() == expected.digest()
    assert protocols[0].pauses >= 1
    assert peak < STREAM_PEAK_LIMIT_BYTES
    assert client.idle_connections(HOST, port) == 1


async def test_upload_waits_for_slow_server(client, raw_server):
    produced = 0
    server_started = asyncio.Event()
    produced_before_read: list[int] = []

    async def upload():
        nonlocal produced
        chunk = b"u" * BIG_CHUNK_BYTES
        for _ in range(UPLOAD_BYTES // BIG_CHUNK_BYTES):
            produced += len(chunk)
            yield chunk

    async def slow_reader(server, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)
        produced_before_read.append(produced)
        server_started.set()
        assert b"Transfer-Encoding: chunked" in head
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            total += len(await reader.readexactly(size + 2)) - 2
            if size == 0:
                break
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(total)), total))
        await writer.drain()

    server = await raw_server(slow_reader)

    response = await client.request(HOST, server.port, "POST", "/", [], upload())

    assert await response.read() == str(UPLOAD_BYTES).encode()
    # Socket buffers take some megabytes, and the rest waited for the server to read.
    assert produced_before_read[0] < UPLOAD_BYTES // 2


async def test_early_reply_stops_upload(client, raw_server):
    async def endless():
        while True:
            await asyncio.sleep(0.01)
            yield b"x" * 1000

    async def reject_early(server, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await reader.read()

    server = await raw_server(reject_early)

    response = await client.request(HOST, server.port, "POST", "/", [], endless())

    assert response.status == 413
    assert await response.read() == b"big"
    assert client.idle_connections(HOST, server.port) == 0


async def test_body_stream_error_propagates(client, raw_server):
    async def failing():
        yield b"part"
        raise ConnectionResetError("client went away")

    server = await raw_server(replying(OK_REPLY, hold_open=True))

    with pytest.raises(ConnectionResetError, match="client went away"):
        await client.request(HOST, server.port, "POST", "/", [], failing())

    assert client.idle_connections(HOST, server.port) == 0


# --- keep-alive --------------------------------------------------------------------------------


async def test_keep_alive_reuses_connection(client, raw_server):
    server = await raw_server(keep_alive)

    bodies = []
    for n in range(5):
        response = await client.request(HOST, server.port, "GET", f"/{n}")
        bodies.append(await response.read())

    assert bodies == [f"/{n}".encode() for n in range(5)]
    assert server.connections == 1
    assert client.idle_connections(HOST, server.port) == 1


async def test_pool_keeps_at_most_max_idle(raw_server):
    server = await raw_server(keep_alive)
    client = UpstreamClient(connect_timeout=2.0, read_timeout=2.0, max_idle_per_origin=2, idle_timeout=10.0)
    try:
        responses = await asyncio.gather(*(client.request(HOST, server.port, "GET", "/") for _ in range(4)))
        for response in responses:
            await response.read()

        assert server.connections == 4
        assert client.idle_connections(HOST, server.port) == 2
    finally:
        await client.close()


async def test_unread_body_not_pooled(client, raw_server):
    server = await raw_server(keep_alive)

    response = await client.request(HOST, server.port, "GET", "/unread")
    response.release()
    again = await client.request(HOST, server.port, "GET", "/")

    assert await again.read() == b"/"
    assert server.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
    ],
)
async def test_connection_not_pooled_when_reply_forbids(client, raw_server, reply):
    server = await raw_server(replying(reply, hold_open=True))

    response = await client.request(HOST, server.port, "GET", "/")

    assert await response.read() == b"ok"
    assert client.idle_connections(HOST, server.port) == 0


async def test_idle_connection_closed_by_server_dropped(client, raw_server):
    server = await raw_server(replying(OK_REPLY))

    first = await client.request(HOST, server.port, "GET", "/")
    await first.read()
    for _ in range(50):
        if client.idle_connections(HOST, server.port) == 0:
            break
        await asyncio.sleep(0.01)
    pooled_after_close = client.idle_connections(HOST, server.port)
    second = await client.request(HOST, server.port, "GET", "/")

    assert pooled_after_close == 0
    assert await second.read() == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("POST", b"payload")])
async def test_stale_pooled_connection_retried(client, raw_server, method, body):
    async def close_on_second_request(server, reader, writer):
        await server.read_request(reader)
        writer.write(OK_REPLY)
        await writer.drain()
        # The next request on this connection meets a server that closes instead.
        await reader.readuntil(b"\r\n\r\n")

    server = await raw_server(close_on_second_request)

    first = await client.request(HOST, server.port, method, "/", [], body)
    await first.read()
    second = await client.request(HOST, server.port, method, "/", [], body)

    assert await second.read() == b"ok"
    assert server.connections == 2
    assert [request_body for _, request_body in server.requests] == [body or b""] * 2


async def test_stale_pooled_connection_stream_not_retried(client, raw_server):
    async def close_on_second_request(server, reader, writer):
        await server.read_request(reader)
        writer.write(OK_REPLY)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

    server = await raw_server(close_on_second_request)

    first = await client.request(HOST, server.port, "GET", "/")
    await first.read()
    with pytest.raises(UpstreamClosedError) as raised:
        await client.request(HOST, server.port, "POST", "/", [], body_stream(b"once"))

    assert server.connections == 1
    assert_no_address(raised.value, server.port)


async def test_idle_timeout_closes_pooled_connection(raw_server):
    server = await raw_server(keep_alive)
    client = UpstreamClient(connect_timeout=2.0, read_timeout=2.0, max_idle_per_origin=4, idle_timeout=0.1)
    try:
        response = await client.request(HOST, server.port, "GET", "/")
        await response.read()
        assert client.idle_connections(HOST, server.port) == 1
        await asyncio.sleep(0.3)

        assert client.idle_connections(HOST, server.port) == 0
    finally:
        await client.close()


# --- failures ------------------------------------------------------------------------------------


async def test_connect_refused(client):
    port = closed_port()

    with pytest.raises(UpstreamConnectError) as raised:
        await client.request(HOST, port, "POST", "/", [], b"body")

    assert str(raised.value) == "connecting failed: Connection refused"
    assert raised.value.body_sent is False
    assert raised.value.timed_out is False
    assert_no_address(raised.value, port)


async def test_connect_timeout():
    # A listener that never accepts and whose backlog is full drops further SYNs.
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    client = UpstreamClient(connect_timeout=0.3, read_timeout=1.0, max_idle_per_origin=4, idle_timeout=10.0)
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((HOST, port))
            fillers.append(filler)
        await asyncio.sleep(0.05)

        with pytest.raises(UpstreamConnectError) as raised:
            await client.request(HOST, port, "GET", "/")

        assert raised.value.timed_out is True
        assert str(raised.value) == "connecting timed out after 0.3s"
    finally:
        await client.close()
        for filler in fillers:
            filler.close()
        listener.close()


async def test_read_timeout_before_reply(raw_server):
    server = await raw_server(replying(b"", hold_open=True))
    client = UpstreamClient(connect_timeout=1.0, read_timeout=0.2, max_idle_per_origin=4, idle_timeout=10.0)
    try:
        with pytest.raises(UpstreamTimeoutError) as raised:
            await client.request(HOST, server.port, "POST", "/", [], b"body")
    finally:
        await client.close()

    assert str(raised.value) == "the instance sent no response within 0.2s"
    assert raised.value.body_sent is True
    assert raised.value.timed_out is True


async def test_read_timeout_mid_body(raw_server):
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    server = await raw_server(replying(reply, hold_open=True))
    client = UpstreamClient(connect_timeout=1.0, read_timeout=0.2, max_idle_per_origin=4, idle_timeout=10.0)
    received = []
    try:
        response = await client.request(HOST, server.port, "GET", "/")
        with pytest.raises(UpstreamBodyError) as raised:
            async for chunk in response.iter_chunks():
                received.append(chunk)
    finally:
        await client.close()

    assert received == [b"abc"]
    assert raised.value.timed_out is True


async def test_slow_consumer_not_timed_out(raw_server):
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * BODY_BUFFER_HIGH_WATER)
    reply += b"z" * (4 * BODY_BUFFER_HIGH_WATER)
    server = await raw_server(replying(reply, hold_open=True))
    client = UpstreamClient(connect_timeout=1.0, read_timeout=0.2, max_idle_per_origin=4, idle_timeout=10.0)
    try:
        response = await client.request(HOST, server.port, "GET", "/")
        # Waiting on the consumer with reading paused is not the instance's delay.
        await asyncio.sleep(0.5)
        body = await response.read()
    finally:
        await client.close()

    assert len(body) == 4 * BODY_BUFFER_HIGH_WATER


async def test_slow_request_stream_not_timed_out(raw_server):
    async def slow_parts():
        for _ in range(5):
            await asyncio.sleep(0.18)
            yield b"part"

    async def reply_late(server, reader, writer):
        await server.read_request(reader)
        await asyncio.sleep(0.25)
        writer.write(OK_REPLY)
        await writer.drain()

    server = await raw_server(reply_late)
    client = UpstreamClient(connect_timeout=1.0, read_timeout=0.5, max_idle_per_origin=4, idle_timeout=10.0)
    try:
        # The stream takes 0.9 s, more than read_timeout, but only its caller waits on
        # it. It ends shortly before the timeout check at 1.0 s, and the reply follows
        # 0.25 s after it, within read_timeout of the stream's end.
        response = await client.request(HOST, server.port, "POST", "/", [], slow_parts())
        body = await response.read()
    finally:
        await client.close()

    assert body == b"ok"
    assert server.requests[0][1] == b"part" * 5


async def test_cancelled_request_closes_connection(client, raw_server):
    closed = asyncio.Event()

    async def never_reply(server, reader, writer):
        await server.read_request(reader)
        await reader.read()
        closed.set()

    server = await raw_server(never_reply)
    request = asyncio.ensure_future(client.request(HOST, server.port, "GET", "/"))
    while not server.requests:
        await asyncio.sleep(0.01)

    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request

    await asyncio.wait_for(closed.wait(), 1.0)
    assert client.idle_connections(HOST, server.port) == 0


async def test_closed_before_reply(client, raw_server):
    async def close_after_request(server, reader, writer):
        await server.read_request(reader)

    server = await raw_server(close_after_request)

    with pytest.raises(UpstreamClosedError) as raised:
        await client.request(HOST, server.port, "GET", "/")

    assert str(raised.value) == "the instance closed the connection before sending a response"
    assert raised.value.body_sent is False
    assert server.connections == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTX/1.1 200 OK\r\n\r\n", "not valid HTTP/1.1"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not valid HTTP/1.1"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "HTTP version 2.0"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", "closed the connection within"),
        (b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n", "not valid HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "not valid"),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", "longer than 8190 bytes"),
        (b"HTTP/1.1 200 " + b"r" * 9000 + b"\r\n\r\n", "status line is longer than 8190"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 129 + b"\r\n", "more than 128 header fields"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", "(101)"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 11, "more than 10 interim"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "status code 99 is below 100"),
    ],
)
async def test_malformed_reply_rejected(client, raw_server, reply, message):
    server = await raw_server(replying(reply))

    with pytest.raises(UpstreamProtocolError, match=re.escape(message)) as raised:
        await client.request(HOST, server.port, "GET", "/")

    assert_no_address(raised.value, server.port)


async def test_oversized_header_section_rejected(client, raw_server):
    # 9 fields of 8000 bytes: each line is within its limit, the section is not.
    fields = b"".join(b"X-%d: " % n + b"a" * 8000 + b"\r\n" for n in range(9))
    server = await raw_server(replying(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n"))

    with pytest.raises(UpstreamProtocolError, match="header section is longer than 65536 bytes"):
        await client.request(HOST, server.port, "GET", "/")


@pytest.mark.parametrize(
    ("reply", "received"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n8\r\nwor", b"hellowor"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", b"partial"),
    ],
)
async def test_truncated_body_raises_after_data(client, raw_server, reply, received):
    server = await raw_server(replying(reply))
    chunks = []

    response = await client.request(HOST, server.port, "GET", "/")
    with pytest.raises(UpstreamBodyError) as raised:
        async for chunk in response.iter_chunks():
            chunks.append(chunk)

    assert b"".join(chunks) == received
    assert str(raised.value) == "the instance closed the connection before the end of the response body"
    assert raised.value.timed_out is False
    assert client.idle_connections(HOST, server.port) == 0


async def test_malformed_chunk_size_raises_body_error(client, raw_server):
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"
    server = await raw_server(replying(reply, hold_open=True))

    response = await client.request(HOST, server.port, "GET", "/")
    with pytest.raises(UpstreamBodyError, match="response body is malformed") as raised:
        await response.read()

    assert_no_address(raised.value, server.port)


async def test_closed_client_rejects_requests(raw_server):
    server = await raw_server(keep_alive)
    client = UpstreamClient(connect_timeout=1.0, read_timeout=1.0, max_idle_per_origin=4, idle_timeout=10.0)
    response = await client.request(HOST, server.port, "GET", "/")
    await response.read()

    await client.close()

    assert client.idle_connections(HOST, server.port) == 0
    with pytest.raises(RuntimeError, match="closed"):
        await client.request(HOST, server.port, "GET", "/")
