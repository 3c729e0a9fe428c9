"""The info routes: `GET /info/program_stats` and `GET /info/version`."""

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

import voxanode
from voxanode.api.keys import NODE_KEY, PROCESS_KEY, STATS_KEY
from voxanode.api.routes import add_get
from voxanode.api.routes.status import BYTES_PER_MB, uptime_seconds
from voxanode.api.timestamps import isoformat_utc
from voxanode.settings import UNKNOWN_GIT_COMMIT


def add_routes(app: web.Application) -> None:
    add_get(app, "/info/program_stats", program_stats)
    add_get(app, "/info/version", version)


def package_build_date() -> str:
    """Return the modification date (UTC) of the installed package as `YYYY-MM-DD`.

    The date of `voxanode/__init__.py` is when the package was installed or built,
    or last edited in a source checkout.
    """
    modified = Path(voxanode.__file__).stat().st_mtime
    return datetime.fromtimestamp(modified, timezone.utc).date().isoformat()


async def program_stats(request: web.Request) -> web.Response:
    """Report the API's request counters and this process's memory and CPU use."""
    node = request.app[NODE_KEY]
    stats = request.app[STATS_KEY]
    process = request.app[PROCESS_KEY]
    return web.json_response(
        {
            "statistics": {
                "requests_processed": stats.requests,
                "average_response_time_ms": round(stats.average_response_ms, 2),
                "error_count": stats.errors,
                "success_rate_percent": round(stats.success_rate_percent, 2),
                "memory_usage_mb": round(process.memory_info().rss / BYTES_PER_MB, 1),
                # CPU use since the previous call, across all cores (may pass 100).
                "cpu_usage_percent": process.cpu_percent(None),
            },
            "runtime_info": {
                "start_time": isoformat_utc(node.started_at),
                "uptime_seconds": uptime_seconds(node),
                "python_version": platform.python_version(),
                "process_id": os.getpid(),
            },
        }
    )


async def version(request: web.Request) -> web.Response:
    """Report the version, build date, commit, environment and enabled features."""
    node = request.app[NODE_KEY]
    settings = node.settings
    return web.json_response(
        {
            "version": voxanode.__version__,
            "build_date": package_build_date(),
            "git_commit": settings.git_commit or UNKNOWN_GIT_COMMIT,
            "build_environment": "development" if settings.dev else "production",
            "features": {
                "app_deployment": getattr(node, "apps", None) is not None,
                "dns_management": False,
                "p2p_networking": True,
                "registry_integration": True,
            },
        }
    )
