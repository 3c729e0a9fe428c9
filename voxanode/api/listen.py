"""The node's listening sockets: the peer UDP socket and the API's TCP sockets.

The node binds the peer socket first and the API sockets right after it, so that a
port in use stops the start before the node joins the network. It hands the API
sockets to the aiohttp server once its modules are imported. Binding here, rather
than in the event loop's endpoint calls, gives the same OSError with its errno on the
standard loop and on uvloop, which wraps bind errors in one without an errno.
"""

import errno
import socket

from voxanode.settings import BindError, Settings

API_LISTEN_BACKLOG = 128
# Seconds after which an idle keep-alive connection of the API port or the ingress port
# closes, whether aiohttp or the lean front of app traffic serves it.
KEEPALIVE_TIMEOUT_SECONDS = 75.0
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def bind_api_sockets(settings: Settings) -> list[socket.socket]:
    """Bind the API's listening sockets, one per address that `api_host` resolves to.

    This is what the aiohttp site would do on start, done early so that a port in use
    stops the node before it joins. Raises BindError for "api_host" when the name does
    not resolve and for "api_port" when an address is in use, not local or not allowed.
    """
    return bind_stream_sockets(settings.api_host, settings.api_port, "api_port")


def bind_stream_sockets(host: str, port: int, port_setting: str) -> list[socket.socket]:
    """Bind listening TCP sockets on every address of `host`, as `bind_api_sockets` does.

    Raises BindError for "api_host" when the name does not resolve and for
    `port_setting` when an address is in use, not local or not allowed.
    """
    infos = _resolve("api_host", host, port, socket.SOCK_STREAM)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(API_LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        if error.errno in BIND_ERRNOS:
            raise BindError(port_setting, host, port, error) from error
        raise
    return sockets


def bind_peer_socket(settings: Settings) -> socket.socket:
    """Bind the peer UDP socket on `peer_host` and `peer_port`, non-blocking.

    Raises BindError for "peer_host" when the name does not resolve and for
    "peer_port" when the address is in use, not local or not allowed.
    """
    host, port = settings.peer_host, settings.peer_port
    infos = _resolve("peer_host", host, port, socket.SOCK_DGRAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        if error.errno in BIND_ERRNOS:
            raise BindError("peer_port", host, port, error) from error
        raise
    return sock


def _resolve(host_setting: str, host: str, port: int, socket_type: int) -> list[tuple]:
    """Return the addresses to bind for `host`, or raise BindError naming `host_setting`."""
    try:
        return socket.getaddrinfo(host or None, port, type=socket_type, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise BindError(host_setting, host, port, error) from error
