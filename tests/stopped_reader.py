"""A websocket client that stops reading after its handshake, for the streams' bounds."""

import asyncio
import base64
import os
import socket
import struct

# The receive buffer of the client that stops reading; Linux raises it to its minimum.
SMALL_RECEIVE_BUFFER_BYTES = 1024
HANDSHAKE_SECONDS = 5.0
TEXT_OPCODE = 0x1
CLOSE_OPCODE = 0x8


def upgrade_headers() -> dict[str, str]:
    """Return the header fields of a websocket upgrade request, with a fresh key."""
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }


class StoppedReader:
    """A websocket client on a plain socket with a small receive buffer.

    After the handshake it reads nothing until the test calls `read_frame`, like a
    client that stopped reading.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> "StoppedReader":
        """Open a websocket to `path` on host:port and return the client once the server accepted it."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER_BYTES)
        sock.setblocking(False)
        client = cls(sock)
        try:
            await loop.sock_connect(sock, (host, port))
            headers = "".join(f"{name}: {value}\r\n" for name, value in upgrade_headers().items())
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}\r\n"
            await loop.sock_sendall(sock, request.encode())
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                while b"\r\n\r\n" not in client.buffer:
                    await client._receive()
        except BaseException:
            sock.close()
            raise
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client.buffer = bytearray(rest)
        return client

    async def read_frame(self) -> tuple[int, bytes]:
        """Return the opcode and payload of the next frame from the server."""
        header = await self._take(2)
        length = header[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._take(8))
        return header[0] & 0x0F, await self._take(length)

    async def read_until_closed(self) -> int:
        """Read until the server ends the connection; return the bytes read."""
        total = 0
        while data := await asyncio.get_running_loop().sock_recv(self.sock, 65536):
            total += len(data)
        return total

    def close(self) -> None:
        self.sock.close()

    async def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            await self._receive()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def _receive(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        assert data, "the server closed the connection"
        self.buffer += data
