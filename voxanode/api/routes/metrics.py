"""The metrics route: `GET /metrics`, the node's metrics in Prometheus text format 0.0.4.

It needs a token of scope read like every other GET route, unless the node runs with
`--dev`. It counts in the status rate limit category (see `voxanode.api.ratelimit`),
which is unlimited by default, so a Prometheus server that scrapes every few seconds
is not rejected. The metric families are described in `voxanode.metrics`.
"""

from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from voxanode.api.keys import NODE_KEY, STATS_KEY
from voxanode.api.routes import add_get
from voxanode.metrics import build_registry

METRICS_PATH = "/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

METRICS_REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)


def add_routes(app: web.Application) -> None:
    """Route `/metrics` and give the app its node's registry; needs NODE_KEY and STATS_KEY set."""
    app[METRICS_REGISTRY_KEY] = build_registry(app[NODE_KEY], app[STATS_KEY], app.router)
    add_get(app, METRICS_PATH, metrics)


async def metrics(request: web.Request) -> web.Response:
    """Return every metric of this node in the Prometheus text format."""
    # The collector runs here, on the event loop's thread, because it reads the
    # node's counters and its SQLite connection, which belong to that thread.
    body = generate_latest(request.app[METRICS_REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})
