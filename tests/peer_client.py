"""A throwaway peer for tests: sends raw and signed datagrams to a node's UDP port.

It speaks the peer protocol's signed frames with its own fresh key, so tests can
send valid requests, replay them, or send garbage, and read what comes back. It never
shows the node that it knows the node's session key, so every reply it gets is signed.
"""

import os
import socket
import time

from voxanode.identity import Identity
from voxanode.peer.framing import (
    KIND_REQUEST,
    KIND_RESPONSE,
    MSG_ID_BYTES,
    SessionKeys,
    decode_frame,
    encode_signed_frame,
)

MAX_REPLY_BYTES = 65535


class TestPeer:
    """A UDP socket on a loopback address with a peer identity of its own."""

    __test__ = False  # not a pytest test class

    def __init__(self, target: tuple[str, int], bind_host: str = "127.0.0.1"):
        self.target = target
        self.identity = Identity.generate()
        self.session_keys = SessionKeys()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind_host, 0))

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.target)

    def request_datagram(
        self, method: str, args: list, sent_ms: int | None = None, msg_id: bytes | None = None
    ) -> bytes:
        """Return a signed request datagram; `sent_ms` defaults to now."""
        return encode_signed_frame(
            self.identity,
            self.session_keys.public,
            b"",
            KIND_REQUEST,
            msg_id or os.urandom(MSG_ID_BYTES),
            sent_ms if sent_ms is not None else int(time.time() * 1000),
            method,
            args,
            65000,
        )

    def receive(self, msg_id: bytes | None = None, timeout: float = 2.0):
        """Return the next reply frame (to `msg_id` if given), or None when none comes in time.

        Replies to other requests, and requests the node sends to this peer, are skipped.
        """
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data, _ = self.sock.recvfrom(MAX_REPLY_BYTES)
            except socket.timeout:
                return None
            frame = decode_frame(data, MAX_REPLY_BYTES, lambda _sender_id: None)
            if frame.kind == KIND_RESPONSE and (msg_id is None or frame.msg_id == msg_id):
                return frame
        return None

    def call(self, method: str, args: list, timeout: float = 2.0):
        """Send a signed request and return its reply frame, or None on timeout."""
        msg_id = os.urandom(MSG_ID_BYTES)
        self.send_raw(self.request_datagram(method, args, msg_id=msg_id))
        return self.receive(msg_id, timeout)
