"""The API application: `create_app` builds it for a node, `start_api` serves it.

The caller owns the returned runner and stops the server with `await runner.cleanup()`.
"""

import logging
import socket
from typing import Any

import psutil
from aiohttp import web

from voxanode.api.auth import AUTHENTICATOR_KEY, setup_auth
from voxanode.api.keys import NODE_KEY, PROCESS_KEY, STATS_KEY, ApiNode
from voxanode.api.middlewares import MIDDLEWARES
from voxanode.api.ratelimit import RATE_LIMITER_KEY, setup_node_rate_limits
from voxanode.ingress.front import FrontSite
from voxanode.api.routes import (
    apps,
    connectivity,
    data,
    docs,
    events,
    info,
    internal,
    metrics,
    nodes,
    proxy,
    status,
    ui,
)
from voxanode.api.stats import RequestStats
from voxanode.api.listen import KEEPALIVE_TIMEOUT_SECONDS, bind_api_sockets
from voxanode.settings import Settings, format_peer_address

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

    setup_node_rate_limits(app, node)
    for route_group in (data, nodes, status, info, connectivity, events, apps, docs, metrics, proxy, ui):
        route_group.add_routes(app)
    if getattr(node, "identity", None) is not None:
        internal.add_routes(app)
    reload_hooks = getattr(node, "reload_hooks", None)
    if reload_hooks is not None:
        reload_hooks.append(lambda settings: _reload(app, settings))
    return app


def _reload(app: web.Application, settings: Settings) -> list[str]:
    """Apply reloaded settings to the rate limiter and reread the token file."""
    app[RATE_LIMITER_KEY].reconfigure(settings)
    store = app[AUTHENTICATOR_KEY].store
    store.refresh()
    if store.last_error is not None:
        return [f"token file not used ({store.last_error}); keeping {store.active_count} active tokens"]
    return [f"token file {store.path}: {store.active_count} active tokens"]


async def start_api(node: ApiNode, sockets: list[socket.socket] | None = None) -> web.AppRunner:
    """Serve the API on `sockets`, bound and listening, and return the runner.

    Without `sockets` it binds them from `settings.api_host` and `settings.api_port`,
    raising BindError as `bind_api_sockets` does.
    """
    settings = node.settings
    if sockets is None:
        sockets = bind_api_sockets(settings)
    app = create_app(node)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        keepalive_timeout=KEEPALIVE_TIMEOUT_SECONDS,
    )
    try:
        await runner.setup()
        # App traffic takes the lean front when the node runs an app controller.
        ingress = getattr(getattr(node, "apps", None), "ingress", None)
        for sock in sockets:
            if ingress is not None:
                site: web.BaseSite = FrontSite(runner, sock, ingress, app, settings.shutdown_timeout_seconds)
            else:
                site = web.SockSite(runner, sock)
            await site.start()
    except BaseException:
        await runner.cleanup()
        for sock in sockets:
            sock.close()
        raise

    addresses = ", ".join(_format_address(address) for address in runner.addresses)
    logger.info("API listening on %s", addresses)
    return runner


def _format_address(address: Any) -> str:
    # Socket names are (host, port) for IPv4 and (host, port, flow, scope) for IPv6.
    return "http://" + format_peer_address(address[0], address[1])
