"""Readiness and state messages to the service manager, as systemd's `sd_notify` sends them.

When systemd starts the daemon with `Type=notify`, it sets `NOTIFY_SOCKET` to a
datagram socket (a path, or an abstract name written with a leading `@`). The daemon
sends `READY=1` once its API and peer socket are up, `RELOADING=1` and then `READY=1`
around a reload, and `STOPPING=1` when it begins to shut down. Without the variable
every call does nothing, so the daemon behaves the same outside systemd.
"""

import logging
import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET_VARIABLE = "NOTIFY_SOCKET"

logger = logging.getLogger(__name__)


def _socket_address(text: str) -> str | bytes | None:
    if text.startswith("@"):
        return b"\0" + text[1:].encode()
    if text.startswith("/"):
        return text
    return None


class ServiceNotifier:
    """Sends state lines such as `READY=1` to the socket named by `NOTIFY_SOCKET`."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        text = (os.environ if environ is None else environ).get(NOTIFY_SOCKET_VARIABLE, "")
        self.address = _socket_address(text) if text else None
        if text and self.address is None:
            logger.warning(
                "%s=%s is neither a path nor an @abstract name; no state will be sent",
                NOTIFY_SOCKET_VARIABLE,
                text,
            )
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd 253 and later want the monotonic time of the reload request with it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=leaving the network and shutting down")

    def send(self, *lines: str) -> bool:
        """Send `lines` as one datagram and return whether it was sent.

        A socket error is logged (the first time only) and returns False.
        """
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as error:
            if not self._failure_logged:
                self._failure_logged = True
                logger.warning("cannot notify the service manager (%s): %s", lines[0], error)
            return False
        logger.debug("notified the service manager: %s", lines[0])
        return True
