"""The API application: `create_app` builds it for a node, `start_api` serves it.

The caller owns the returned runner and stops the server with `await runner.cleanup()`.
"""

import errno
import logging
import socket
from typing import Any

import psutil
from aiohttp import web

from voxanode.api.auth import setup_auth
from voxanode.api.keys import NODE_KEY, PROCESS_KEY, STATS_KEY, ApiNode
from voxanode.api.middlewares import MIDDLEWARES, add_request_id_header
from voxanode.api.ratelimit import setup_rate_limits
from voxanode.api.routes import apps, connectivity, data, docs, events, info, internal, nodes, status
from voxanode.api.stats import RequestStats
from voxanode.settings import BindError, format_peer_address

# Bind failures that mean the configured address or port cannot be used, as opposed
# to a bug or a resource shortage.
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

logger = logging.getLogger(__name__)


def create_app(node: ApiNode) -> web.Application:
    """Build the aiohttp application serving the public routes and the node-to-node ones."""
    app = web.Application(
        middlewares=MIDDLEWARES, client_max_size=node.settings.max_body_bytes
    )
    app[NODE_KEY] = node
    app[STATS_KEY] = RequestStats()
    setup_auth(app, node.settings)

    # The first cpu_percent() call only starts the measurement and returns 0.0, so it
    # is made here and every later call measures from the call before it.
    process = psutil.Process()
    process.cpu_percent(None)
    app[PROCESS_KEY] = process

    app.on_response_prepare.append(add_request_id_header)
    setup_rate_limits(app, node.settings)
    for route_group in (data, nodes, status, info, connectivity, events, apps, docs):
        route_group.add_routes(app)
    if getattr(node, "identity", None) is not None:
        internal.add_routes(app)
    return app


async def start_api(node: ApiNode) -> web.AppRunner:
    """Serve the API on `settings.api_host`:`settings.api_port` and return the runner.

    Raises BindError for "api_port" when the address is in use, not local or not
    permitted, and for "api_host" when the host name does not resolve.
    """
    settings = node.settings
    host, port = settings.api_host, settings.api_port

    runner = web.AppRunner(
        create_app(node),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_seconds,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        if isinstance(error, socket.gaierror):
            raise BindError("api_host", host, port, error) from error
        if error.errno in BIND_ERRNOS:
            raise BindError("api_port", host, port, error) from error
        raise

    addresses = ", ".join(_format_address(address) for address in runner.addresses)
    logger.info("API listening on %s", addresses)
    return runner


def _format_address(address: Any) -> str:
    # Socket names are (host, port) for IPv4 and (host, port, flow, scope) for IPv6.
    return "http://" + format_peer_address(address[0], address[1])
