"""The status routes: `GET /status/health` and `GET /status/system`.

Health is "healthy" when every component is, "degraded" (still HTTP 200) when the
node is isolated from its configured peers, and "unhealthy" with HTTP 503 when the
record storage fails. A node configured without bootstrap peers is the first node of
its network, so having no peers is healthy for it. Health checks the storage and the
peers at most once per `HEALTH_CHECK_INTERVAL_SECONDS` (one second), so a failed
database or a lost connection shows in health within that time.
"""

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from voxanode import __version__
from voxanode.api.json_reply import encode_json, json_body_reply
from voxanode.api.keys import NODE_KEY, ApiNode
from voxanode.api.routes import add_get
from voxanode.api.timestamps import isoformat_utc

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
BYTES_PER_MB = 1024 * 1024
BYTES_PER_GB = 1024 * 1024 * 1024
APPLICATION_COUNT_NAMES = ("total_deployed", "running", "stopped", "failed")
# Health requests within this time reuse the last storage and peer checks, so a
# health probe a few hundred times a second costs one database query a second.
HEALTH_CHECK_INTERVAL_SECONDS = 1.0


@dataclass
class HealthChecks:
    """The last storage and peer checks of the health route, and the last reply body.

    A reply depends only on the two checks, the whole-second timestamp and the
    uptime, so the body encoded for the same four values is sent again.
    """

    storage_ok: bool = False
    peers_ok: bool = False
    # time.monotonic() after which the checks run again.
    expires_at: float = 0.0
    reply_inputs: tuple[object, ...] = ()
    reply_body: bytes = b""
    reply_status: int = 200

    def refresh_if_due(self, node: ApiNode) -> None:
        """Check the record storage and the peers, at most once per interval."""
        now = time.monotonic()
        if now < self.expires_at:
            return
        self.storage_ok = bool(node.storage_status().ok)
        self.peers_ok = node.peer_stats().connected_peers > 0 or not node.bootstrap_peers
        self.expires_at = now + HEALTH_CHECK_INTERVAL_SECONDS


HEALTH_CHECKS_KEY = web.AppKey("health_checks", HealthChecks)


def add_routes(app: web.Application) -> None:
    app[HEALTH_CHECKS_KEY] = HealthChecks()
    add_get(app, "/status/health", health)
    add_get(app, "/status/system", system_status)


async def health(request: web.Request) -> web.Response:
    """Report the node's overall health and that of each component."""
    node = request.app[NODE_KEY]
    checks = request.app[HEALTH_CHECKS_KEY]
    checks.refresh_if_due(node)

    now = time.time()
    inputs = (checks.storage_ok, checks.peers_ok, isoformat_utc(now), uptime_seconds(node, now))
    if inputs != checks.reply_inputs:
        reply, checks.reply_status = health_reply(*inputs)
        checks.reply_body = encode_json(reply)
        checks.reply_inputs = inputs
    return json_body_reply(checks.reply_body, status=checks.reply_status)


def health_reply(
    storage_ok: bool, peers_ok: bool, timestamp: str, uptime: int
) -> tuple[dict[str, Any], int]:
    """Return the health reply and its HTTP status for the results of the checks."""
    components = {
        "api": HEALTHY,
        "networking": HEALTHY if peers_ok else DEGRADED,
        "storage": HEALTHY if storage_ok else UNHEALTHY,
        "registry": HEALTHY if storage_ok and peers_ok else DEGRADED,
    }
    if not storage_ok:
        status, http_status = UNHEALTHY, 503
    elif all(state == HEALTHY for state in components.values()):
        status, http_status = HEALTHY, 200
    else:
        status, http_status = DEGRADED, 200

    reply = {
        "status": status,
        "timestamp": timestamp,
        "version": __version__,
        "uptime_seconds": uptime,
        "components": components,
    }
    return reply, http_status


async def system_status(request: web.Request) -> web.Response:
    """Report the node id, host resources, peer traffic and application counts."""
    node = request.app[NODE_KEY]
    peers = node.peer_stats()
    return web.json_response(
        {
            "node_id": node.node_id,
            "status": "running",
            "version": __version__,
            "uptime_seconds": uptime_seconds(node),
            "system_info": _system_info(Path(node.settings.data_dir)),
            "network_info": {
                "connected_peers": peers.connected_peers,
                "total_connections": peers.total_connections,
                "routing_table_peers": peers.routing_table_peers,
                "bytes_sent": peers.bytes_sent,
                "bytes_received": peers.bytes_received,
                "datagrams_sent": peers.datagrams_sent,
                "datagrams_received": peers.datagrams_received,
                "datagrams_dropped": dict(peers.datagrams_dropped),
                "bytes_sent_by_method": dict(getattr(peers, "bytes_sent_by_method", {})),
            },
            "applications": _application_counts(node),
        }
    )


def uptime_seconds(node: ApiNode, now: float | None = None) -> int:
    """Return the whole seconds from the node's start to `now` (default: now), never negative."""
    if now is None:
        now = time.time()
    return max(0, int(now - node.started_at))


def _system_info(data_dir: Path) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing_ancestor(data_dir)))
    return {
        "os": platform.system(),
        "architecture": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "total_memory_mb": memory.total // BYTES_PER_MB,
        "available_memory_mb": memory.available // BYTES_PER_MB,
        "disk_usage": {
            "total_gb": round(disk.total / BYTES_PER_GB, 2),
            "used_gb": round(disk.used / BYTES_PER_GB, 2),
            "available_gb": round(disk.free / BYTES_PER_GB, 2),
        },
    }


def _existing_ancestor(path: Path) -> Path:
    """Return `path` or its nearest existing parent, whose file system it will be on."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _application_counts(node: ApiNode) -> dict[str, int]:
    # The app controller is optional: a node without one reports zeros.
    apps = getattr(node, "apps", None)
    summary = getattr(apps, "summary", None)
    counts = summary() if callable(summary) else {}
    return {name: int(counts.get(name, 0)) for name in APPLICATION_COUNT_NAMES}
