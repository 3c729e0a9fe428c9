"""App and request keys of the API, and `ApiNode`, the node interface of its handlers."""

from typing import Any, Protocol

import psutil
from aiohttp import web

from voxanode.api.stats import RequestStats


class ApiNode(Protocol):
    """The parts of the running node that the API handlers read and call.

    `data.store`, `data.retrieve`, `peer_stats()`, `ping_peers()` and
    `storage_status()` return the node's result objects, which the handlers read by
    attribute name. An `apps` attribute (the app controller, with `summary()`) is
    optional and read with getattr.
    """

    settings: Any
    node_id: str
    started_at: float
    data: Any
    membership: Any
    events: Any
    bootstrap_peers: tuple[tuple[str, int], ...]

    def peer_stats(self) -> Any: ...

    async def ping_peers(self, limit: int = 3) -> list[Any]: ...

    def storage_status(self) -> Any: ...


NODE_KEY = web.AppKey("node", ApiNode)
STATS_KEY = web.AppKey("request_stats", RequestStats)
# The server's own process, kept so that cpu_percent() measures between two calls.
PROCESS_KEY = web.AppKey("process", psutil.Process)

# TODO(aiohttp>=3.14 required): use web.RequestKey unconditionally. Older versions
# have no RequestKey and take plain string keys without a warning.
REQUEST_ID_KEY: Any = (
    web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
)


def request_id_of(request: web.BaseRequest) -> str:
    """Return the id the request id middleware gave this request, or "-" before it ran."""
    return request.get(REQUEST_ID_KEY, "-")
