"""The app test image itself: its default command, the streamed bytes CGI script and the WebSocket echo server.

The module starts one container of the image that scripts/build-test-image makes, with
its default command and both ports published on 127.0.0.1 only, and talks to it over
HTTP and WebSocket with aiohttp. The container is removed by id at teardown. App proxy
tests rely on what these tests check: a 50 MiB response streamed without a length, and
a WebSocket echo that keeps several messages and connections apart.
"""

import asyncio
import contextlib
import hashlib
import os
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

import aiohttp
import docker
import docker.errors
import pytest

from helpers import (
    TEST_IMAGE,
    TEST_IMAGE_BYTES_PATH,
    TEST_IMAGE_HTTP_PORT,
    TEST_IMAGE_WEBSOCKET_PORT,
    counting_lines,
    counting_lines_sha256,
)

PUBLISH_IP = "127.0.0.1"
NOBODY_NAMES = {"nobody", "65534"}
HTTP_START_LINE = f"voxanode-test httpd starting on port {TEST_IMAGE_HTTP_PORT}"
WEBSOCKET_START_LINE = f"voxanode-test websocket echo starting on port {TEST_IMAGE_WEBSOCKET_PORT}"
LARGE_RESPONSE_BYTES = 50 * 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024
READY_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.1
REQUEST_TIMEOUT_SECONDS = 60.0
RECEIVE_TIMEOUT_SECONDS = 15.0
# Payload sizes on both sides of the 7-bit and 16-bit WebSocket length encodings.
TEXT_SIZES = (0, 1, 125, 126, 127, 65535, 65536)
CLIENT_CLOSE_CODE = 4000
PROTOCOL_ERROR_CLOSE_CODE = 1002
# A sample key and its accept value, base64(sha1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")).
SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
SAMPLE_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK_KEY = bytes([0x37, 0xFA, 0x21, 0x3D])
OPCODE_CONTINUATION = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
FIN_BIT = 0x80


class RunningImage(NamedTuple):
    """A started container of the test image and its published addresses."""

    container_id: str
    http_url: str
    websocket_url: str


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    """Return a blocking Docker SDK client, or fail the tests when the Docker engine does not respond."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.fail(f"the Docker engine does not respond ({error}); start dockerd and rerun", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def running_image(docker_client, test_image) -> Iterator[RunningImage]:
    """Start the test image with its default command and its ports on 127.0.0.1, and remove it at teardown."""
    container = docker_client.containers.create(
        test_image,
        ports={
            f"{TEST_IMAGE_HTTP_PORT}/tcp": (PUBLISH_IP, None),
            f"{TEST_IMAGE_WEBSOCKET_PORT}/tcp": (PUBLISH_IP, None),
        },
        labels={"io.voxanode.test": "test_test_image"},
    )
    try:
        container.start()
        container.reload()
        ports = container.attrs["NetworkSettings"]["Ports"]
        http_port = ports[f"{TEST_IMAGE_HTTP_PORT}/tcp"][0]["HostPort"]
        websocket_port = ports[f"{TEST_IMAGE_WEBSOCKET_PORT}/tcp"][0]["HostPort"]
        running = RunningImage(
            container.id, f"http://{PUBLISH_IP}:{http_port}", f"ws://{PUBLISH_IP}:{websocket_port}"
        )
        asyncio.run(wait_until_serving(running))
        yield running
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(container.id, force=True, v=True)


async def wait_until_serving(running: RunningImage) -> None:
    """Wait until httpd returns the index and the echo server completes a handshake."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last_error: Exception | None = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(running.http_url + "/") as response:
                    assert response.status == 200
                async with session.ws_connect(running.websocket_url + "/ready") as websocket:
                    await websocket.close()
                return
            except (aiohttp.ClientError, AssertionError) as error:
                last_error = error
                await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"the test image did not serve within {READY_TIMEOUT_SECONDS} s: {last_error!r}")


def container_logs(client: docker.DockerClient, container_id: str, *, stdout: bool, stderr: bool) -> list[str]:
    raw = client.api.logs(container_id, stdout=stdout, stderr=stderr)
    return raw.decode("utf-8", errors="replace").splitlines()


def wait_for_log_line(client: docker.DockerClient, container_id: str, fragment: str) -> list[str]:
    """Return the stderr lines once one contains `fragment`, or the last lines after the timeout."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT_SECONDS
    while True:
        lines = container_logs(client, container_id, stdout=False, stderr=True)
        if any(fragment in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(POLL_SECONDS)


# --- default command ---------------------------------------------------------------------


def test_default_command_logs_start_lines_as_nobody(docker_client, running_image):
    stdout_lines = container_logs(docker_client, running_image.container_id, stdout=True, stderr=False)
    assert stdout_lines[:2] == [HTTP_START_LINE, WEBSOCKET_START_LINE]

    top = docker_client.api.top(running_image.container_id, ps_args="-o pid,user,args")
    user_column = top["Titles"].index("USER")
    command_column = top["Titles"].index("COMMAND")
    users = {process[user_column] for process in top["Processes"]}
    commands = [process[command_column] for process in top["Processes"]]
    assert users <= NOBODY_NAMES, top
    assert any(command.startswith("httpd -f -v") for command in commands), commands
    assert any(command.startswith(f"nc -ll -p {TEST_IMAGE_WEBSOCKET_PORT}") for command in commands), commands


async def test_httpd_request_logged_on_stderr(docker_client, running_image):
    async with aiohttp.ClientSession() as session:
        async with session.get(running_image.http_url + "/index.html") as response:
            assert response.status == 200

    lines = wait_for_log_line(docker_client, running_image.container_id, "response:200")
    assert any("response:200" in line for line in lines), lines


# --- streamed bytes ----------------------------------------------------------------------


async def test_bytes_streams_50_mib_without_length(running_image):
    digest = hashlib.sha256()
    received_bytes = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    url = f"{running_image.http_url}{TEST_IMAGE_BYTES_PATH}?n={LARGE_RESPONSE_BYTES}"

    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert "Content-Length" not in response.headers
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                digest.update(chunk)
                received_bytes += len(chunk)

    assert received_bytes == LARGE_RESPONSE_BYTES
    assert digest.hexdigest() == counting_lines_sha256(LARGE_RESPONSE_BYTES)


@pytest.mark.parametrize(
    ("size_bytes", "expected"),
    [
        (0, b""),
        (1, b"0"),
        (16, b"000000000000000\n"),
        (40, b"000000000000000\n000000000000001\n00000000"),
    ],
)
async def test_bytes_small_counts_exact(running_image, size_bytes, expected):
    url = f"{running_image.http_url}{TEST_IMAGE_BYTES_PATH}?n={size_bytes}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            body = await response.read()

    assert response.status == 200
    assert body == expected
    assert b"".join(counting_lines(size_bytes)) == expected


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", "missing query parameter n"),
        ("?n=", "missing query parameter n"),
        ("?n=abc", "n must be a decimal number"),
        ("?n=-1", "n must be a decimal number"),
        ("?n=1073741825", "n must be at most 1073741824 bytes"),
        ("?n=99999999999999999999", "n must be at most 1073741824 bytes"),
    ],
)
async def test_bytes_rejects_invalid_count(running_image, query, reason):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running_image.http_url}{TEST_IMAGE_BYTES_PATH}{query}") as response:
            body = await response.text()

    assert response.status == 400
    assert reason in body


# --- WebSocket echo ----------------------------------------------------------------------


async def echo_once(websocket: aiohttp.ClientWebSocketResponse, message: str | bytes) -> aiohttp.WSMessage:
    if isinstance(message, str):
        await websocket.send_str(message)
    else:
        await websocket.send_bytes(message)
    return await websocket.receive(timeout=RECEIVE_TIMEOUT_SECONDS)


async def test_websocket_echoes_text_and_binary(running_image):
    texts = ["héllo"] + [("abcdefgh" * (size // 8 + 1))[:size] for size in TEXT_SIZES]
    binaries = [bytes(range(256)), os.urandom(70_000), b""]

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(running_image.websocket_url + "/echo") as websocket:
            for text in texts:
                reply = await echo_once(websocket, text)
                assert reply.type == aiohttp.WSMsgType.TEXT, (len(text), reply)
                assert reply.data == text, len(text)
            for binary in binaries:
                reply = await echo_once(websocket, binary)
                assert reply.type == aiohttp.WSMsgType.BINARY, (len(binary), reply)
                assert reply.data == binary, len(binary)


async def test_websocket_two_connections_at_once(running_image):
    message_count = 10

    async def exchange(websocket: aiohttp.ClientWebSocketResponse, name: str) -> list[str]:
        replies = []
        for number in range(message_count):
            reply = await echo_once(websocket, f"{name}-{number}")
            replies.append(reply.data)
        return replies

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(running_image.websocket_url + "/first") as first:
            async with session.ws_connect(running_image.websocket_url + "/second") as second:
                # Both connections are open, and each one replies while the other waits for its echo.
                await first.send_str("first-waiting")
                assert (await echo_once(second, "second-alone")).data == "second-alone"
                assert (await first.receive(timeout=RECEIVE_TIMEOUT_SECONDS)).data == "first-waiting"

                first_replies, second_replies = await asyncio.gather(exchange(first, "first"), exchange(second, "second"))

    assert first_replies == [f"first-{number}" for number in range(message_count)]
    assert second_replies == [f"second-{number}" for number in range(message_count)]


async def test_websocket_ping_gets_pong(running_image):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(running_image.websocket_url + "/", autoping=False) as websocket:
            await websocket.ping(b"are you there")
            reply = await websocket.receive(timeout=RECEIVE_TIMEOUT_SECONDS)

    assert reply.type == aiohttp.WSMsgType.PONG
    assert reply.data == b"are you there"


async def test_websocket_close_echoes_code(docker_client, running_image):
    async with aiohttp.ClientSession() as session:
        websocket = await session.ws_connect(running_image.websocket_url + "/closing")
        reply = await echo_once(websocket, "before close")
        closed = await websocket.close(code=CLIENT_CLOSE_CODE, message=b"done")

    assert reply.data == "before close"
    assert closed is True
    assert websocket.closed
    assert websocket.close_code == CLIENT_CLOSE_CODE
    expected_line = f"closed with code {CLIENT_CLOSE_CODE} after 2 frames"
    lines = wait_for_log_line(docker_client, running_image.container_id, expected_line)
    assert any(expected_line in line for line in lines), lines


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 400),
        ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}, 400),
        (
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "8",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
            426,
        ),
    ],
)
async def test_websocket_rejects_bad_handshake(running_image, headers, status):
    http_url = running_image.websocket_url.replace("ws://", "http://", 1)
    async with aiohttp.ClientSession() as session:
        async with session.get(http_url + "/echo", headers=headers) as response:
            await response.read()

    assert response.status == status


# --- WebSocket frames on a raw connection ------------------------------------------------


def client_frame(first_byte: int, payload: bytes, *, masked: bool = True) -> bytes:
    """Encode a client frame with a payload under 126 bytes, masked with MASK_KEY when `masked` is true."""
    if not masked:
        return bytes([first_byte, len(payload)]) + payload
    masked_payload = bytes(byte ^ MASK_KEY[index % 4] for index, byte in enumerate(payload))
    return bytes([first_byte, 0x80 | len(payload)]) + MASK_KEY + masked_payload


async def open_raw_websocket(websocket_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection to the echo server and complete the handshake by hand."""
    host, port = websocket_url.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "GET /raw HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {SAMPLE_KEY}\r\n\r\n"
        ).encode()
    )
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECEIVE_TIMEOUT_SECONDS)
    assert response.startswith(b"HTTP/1.1 101 "), response
    assert f"Sec-WebSocket-Accept: {SAMPLE_ACCEPT}\r\n".encode() in response, response
    return reader, writer


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one unmasked server frame with a payload under 126 bytes and return its first byte and payload."""
    first_byte, length = await asyncio.wait_for(reader.readexactly(2), RECEIVE_TIMEOUT_SECONDS)
    assert length < 126, length
    payload = await asyncio.wait_for(reader.readexactly(length), RECEIVE_TIMEOUT_SECONDS)
    return first_byte, payload


async def test_websocket_fragments_echoed_one_by_one(running_image):
    reader, writer = await open_raw_websocket(running_image.websocket_url)
    try:
        writer.write(client_frame(OPCODE_TEXT, b"frag"))
        writer.write(client_frame(OPCODE_CONTINUATION, b"men"))
        writer.write(client_frame(FIN_BIT | OPCODE_CONTINUATION, b"ted"))
        writer.write(client_frame(FIN_BIT | OPCODE_CLOSE, struct.pack(">H", 1000)))
        frames = [await read_server_frame(reader) for _ in range(4)]
        end = await asyncio.wait_for(reader.read(), RECEIVE_TIMEOUT_SECONDS)
    finally:
        writer.close()

    assert frames == [
        (OPCODE_TEXT, b"frag"),
        (OPCODE_CONTINUATION, b"men"),
        (FIN_BIT | OPCODE_CONTINUATION, b"ted"),
        (FIN_BIT | OPCODE_CLOSE, struct.pack(">H", 1000)),
    ]
    assert end == b""


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(client_frame(FIN_BIT | OPCODE_BINARY, b"ab", masked=False), id="unmasked"),
        pytest.param(client_frame(FIN_BIT | OPCODE_CONTINUATION, b"ab"), id="stray-continuation"),
        pytest.param(client_frame(FIN_BIT | 0x3, b"ab"), id="unknown-opcode"),
        pytest.param(client_frame(FIN_BIT | 0x40 | OPCODE_TEXT, b"ab"), id="rsv-bit"),
    ],
)
async def test_websocket_protocol_error_closes_1002(running_image, frame):
    reader, writer = await open_raw_websocket(running_image.websocket_url)
    try:
        writer.write(frame)
        first_byte, payload = await read_server_frame(reader)
    finally:
        writer.close()

    assert first_byte == FIN_BIT | OPCODE_CLOSE
    assert payload == struct.pack(">H", PROTOCOL_ERROR_CLOSE_CODE)
