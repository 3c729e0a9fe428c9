"""The status routes: `GET /status/health` and `GET /status/system`.

Health is "healthy" when every component is, "degraded" (still HTTP 200) when the
node is isolated from its configured peers, and "unhealthy" with HTTP 503 when the
record storage fails. A node configured without bootstrap peers is the first node of
its network, so having no peers is healthy for it.
"""

import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from voxanode import __version__
from voxanode.api.keys import NODE_KEY, ApiNode
from voxanode.api.routes import add_get
from voxanode.api.timestamps import isoformat_utc

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
BYTES_PER_MB = 1024 * 1024
BYTES_PER_GB = 1024 * 1024 * 1024
APPLICATION_COUNT_NAMES = ("total_deployed", "running", "stopped", "failed")


def add_routes(app: web.Application) -> None:
    add_get(app, "/status/health", health)
    add_get(app, "/status/system", system_status)


async def health(request: web.Request) -> web.Response:
    """Report the node's overall health and that of each component."""
    node = request.app[NODE_KEY]
    storage_ok = bool(node.storage_status().ok)
    peers_ok = node.peer_stats().connected_peers > 0 or not node.bootstrap_peers

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

    return web.json_response(
        {
            "status": status,
            "timestamp": isoformat_utc(),
            "version": __version__,
            "uptime_seconds": uptime_seconds(node),
            "components": components,
        },
        status=http_status,
    )


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


def uptime_seconds(node: ApiNode) -> int:
    """Return the whole seconds since the node started, never negative."""
    return max(0, int(time.time() - node.started_at))


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
