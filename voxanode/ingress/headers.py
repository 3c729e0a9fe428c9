"""Request and response headers across the proxy: hop-by-hop removal and X-Forwarded-*.

RFC 9110 section 7.6.1 requires a proxy to remove the fields named in `Connection` and
the connection-specific fields (Connection, Proxy-Connection, Keep-Alive, TE,
Transfer-Encoding, Upgrade) before forwarding a message. `Trailer` is removed too,
because the proxy does not forward trailer fields, so announcing them would mislead.
"""

import ipaddress
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

# Lower-case names, compared against `name.lower()`.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
    }
)
# Headers that the websocket handshake of the proxy's own client sets again.
WEBSOCKET_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
FORWARDED_FOR = "X-Forwarded-For"
FORWARDED_PROTO = "X-Forwarded-Proto"
FORWARDED_HOST = "X-Forwarded-Host"


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Return the lower-case header names that the `Connection` header lists."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], also_drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Return a copy of `headers` without hop-by-hop fields and without `also_drop` names.

    Repeated fields keep their order. `also_drop` takes lower-case names.
    """
    filtered = CIMultiDict(headers)
    drop_hop_by_hop(filtered, also_drop)
    return filtered


def drop_hop_by_hop(headers: CIMultiDict[str], also_drop: Iterable[str] = ()) -> None:
    """Remove the hop-by-hop fields and the `also_drop` names from `headers` in place.

    Removing the few names that may occur costs less than copying each field.
    """
    listed = connection_listed(headers)
    for name in HOP_BY_HOP_HEADERS:
        headers.popall(name, None)
    for name in listed:
        headers.popall(name, None)
    for name in also_drop:
        headers.popall(name, None)


def add_forwarded(
    headers: CIMultiDict[str],
    client: str | None,
    scheme: str,
    host: str | None,
    trusted_peer: bool,
) -> None:
    """Append the client to X-Forwarded-For and set X-Forwarded-Proto and -Host.

    X-Forwarded-For keeps the entries the client sent, as nginx's
    `$proxy_add_x_forwarded_for` does, so the app decides which entries to trust. A
    trusted peer (a proxy in `trusted_proxies`) keeps the Proto and Host values it
    sent. From any other peer they are replaced, so that a client cannot pose as HTTPS.
    """
    if client:
        previous = ", ".join(headers.getall(FORWARDED_FOR, ()))
        headers[FORWARDED_FOR] = f"{previous}, {client}" if previous else client
    if not (trusted_peer and FORWARDED_PROTO in headers):
        headers[FORWARDED_PROTO] = scheme
    if host and not (trusted_peer and FORWARDED_HOST in headers):
        headers[FORWARDED_HOST] = host


def host_app_key(host: str) -> str | None:
    """Return the app that a Host header of the ingress port names: its first label, lower case.

    Returns None for an IP address (app names start with a letter) and an empty name.
    """
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if is_ip_literal(name):
        return None
    return name.split(".", 1)[0].lower() or None


def is_ip_literal(name: str) -> bool:
    """Return whether a Host name (port removed) is an IPv4 address or a bracketed IPv6 one."""
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
