"""The test route group: `GET /test/connection`, a live check of peers and names.

The check pings up to `PING_PEER_LIMIT` known peers and resolves the configured
bootstrap host names at the same time. It succeeds when a peer replied, or when the
node has no known peers and none configured (the first node of a network).
"""

import asyncio
import logging
import socket
import time
from typing import Any

from aiohttp import web

from voxanode.api.keys import NODE_KEY, ApiNode, request_id_of
from voxanode.api.routes import add_get
from voxanode.api.timestamps import isoformat_utc

PING_PEER_LIMIT = 3

logger = logging.getLogger(__name__)


def add_routes(app: web.Application) -> None:
    add_get(app, "/test/connection", test_connection)


async def test_connection(request: web.Request) -> web.Response:
    """Ping peers, resolve bootstrap hosts and check storage; report each result."""
    started = time.perf_counter()
    node = request.app[NODE_KEY]

    pings, dns_resolution = await asyncio.gather(
        node.ping_peers(limit=PING_PEER_LIMIT),
        _resolve_bootstrap_hosts(node, request_id_of(request)),
    )
    storage_ok = bool(node.storage_status().ok)

    reachable_count = sum(1 for ping in pings if ping.reachable)
    success = reachable_count > 0 or (not pings and not node.bootstrap_peers)
    response_ms = (time.perf_counter() - started) * 1000

    return web.json_response(
        {
            "success": success,
            "response_time_ms": round(response_ms, 2),
            "node_id": node.node_id,
            "timestamp": isoformat_utc(),
            "network_tests": {
                "registry_connection": "ok" if storage_ok else "failed",
                "peer_connectivity": peer_connectivity(len(pings), reachable_count),
                "dns_resolution": dns_resolution,
            },
            "peers": [_ping_reply(ping) for ping in pings],
        }
    )


def peer_connectivity(pinged: int, reachable: int) -> str:
    """Summarize ping results as "no_peers", "ok", "degraded" or "failed"."""
    if pinged == 0:
        return "no_peers"
    if reachable == pinged:
        return "ok"
    if reachable > 0:
        return "degraded"
    return "failed"


async def _resolve_bootstrap_hosts(node: ApiNode, request_id: str) -> str:
    """Resolve each configured bootstrap host: "ok", "failed" or "not_configured"."""
    if not node.bootstrap_peers:
        return "not_configured"

    loop = asyncio.get_running_loop()
    timeout_seconds = node.settings.rpc_timeout_seconds
    hosts = sorted({(host, port) for host, port in node.bootstrap_peers})
    results = await asyncio.gather(
        *(
            asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM),
                timeout_seconds,
            )
            for host, port in hosts
        ),
        return_exceptions=True,
    )

    failed = False
    for (host, port), result in zip(hosts, results):
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation and interrupts are not resolution failures
        if isinstance(result, Exception):
            failed = True
            logger.warning(
                "bootstrap host did not resolve request_id=%s host=%s port=%d error=%r",
                request_id,
                host,
                port,
                result,
            )
    return "failed" if failed else "ok"


def _ping_reply(ping: Any) -> dict[str, Any]:
    return {
        "node_id": ping.node_id,
        "address": ping.address,
        "reachable": ping.reachable,
        "rtt_ms": round(ping.rtt_ms, 2) if ping.rtt_ms is not None else None,
    }
