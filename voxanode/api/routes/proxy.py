"""The app traffic routes: `/proxy/{app}` and `/proxy/{app}/{path}` on the API port.

`{app}` is an app's name or id. The rest of the path and the query string go to a
healthy instance of the app unchanged (see `voxanode.ingress.proxy`). These routes
need no API token, because they carry the app's own traffic, and count in the
`ingress` rate limit category. Every method that aiohttp's HTTP parser accepts is
forwarded, as on the ingress port. The OpenAPI document lists GET, HEAD, POST, PUT,
PATCH, DELETE, OPTIONS and TRACE, because OpenAPI names no other methods. A catch-all
route takes the rest, such as PROPFIND.

The host-routed listener of the `ingress_port` setting serves one catch-all route,
`HOST_ROUTE_TEMPLATE`, and takes the app from the Host header instead.
"""

from urllib.parse import unquote

from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.keys import NODE_KEY
from voxanode.ingress.headers import host_app_key, is_ip_literal

PROXY_PREFIX = "/proxy/"
PROXY_APP_PATH = "/proxy/{app}"
PROXY_PATH = "/proxy/{app}/{path:.*}"
# The canonical form of PROXY_PATH, as route labels and the OpenAPI document name it.
PROXY_PATH_TEMPLATE = "/proxy/{app}/{path}"
# The methods that the OpenAPI document lists. GET routes also serve HEAD.
PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
HOST_ROUTE = "/{ingress_path:.*}"
HOST_ROUTE_TEMPLATE = "/{ingress_path}"
# The route templates of app traffic, which the API's request statistics leave out.
APP_TRAFFIC_ROUTES = frozenset({PROXY_APP_PATH, PROXY_PATH_TEMPLATE, HOST_ROUTE_TEMPLATE})
HOST_ROUTING_HINT = (
    "this ingress port selects the app by the name that starts the Host header:"
    " send Host: APP or Host: APP.DOMAIN"
)


def add_routes(app: web.Application) -> None:
    for path in (PROXY_APP_PATH, PROXY_PATH):
        for method in PROXY_METHODS:
            if method == "GET":
                app.router.add_get(path, proxy)
            else:
                app.router.add_route(method, path, proxy)
        # Registered last, so it takes only the methods that the routes above do not.
        app.router.add_route("*", path, proxy)
    app.on_shutdown.append(close_websockets)


def _ingress(app: web.Application):
    apps = getattr(app[NODE_KEY], "apps", None)
    ingress = getattr(apps, "ingress", None)
    if ingress is None:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, "this node runs no app controller")
    return ingress


async def proxy(request: web.Request) -> web.StreamResponse:
    """Forward the request to an instance of the app that the path names."""
    url = request.rel_url
    # The raw path keeps the client's percent-encoding for the instance.
    app_part, _, remainder = url.raw_path[len(PROXY_PREFIX):].partition("/")
    path_qs = "/" + remainder
    if url.raw_query_string:
        path_qs += "?" + url.raw_query_string
    return await _ingress(request.app).handle(request, unquote(app_part), path_qs)


async def proxy_by_host(request: web.Request) -> web.StreamResponse:
    """Forward a request of the ingress port to the app that the Host header names."""
    host = request.headers.get("Host", "")
    app_key = host_app_key(host)
    if app_key is None:
        if is_ip_literal(host.rsplit(":", 1)[0] if not host.endswith("]") else host):
            # App names start with a letter, so an address never names an app.
            raise ApiError(
                404, ErrorCode.RESOURCE_NOT_FOUND,
                f"Host {host} is an IP address, but {HOST_ROUTING_HINT},"
                f" as in curl -H 'Host: web' http://{host}/",
                {"field": "Host", "host": host},
            )
        raise ApiError(
            404, ErrorCode.RESOURCE_NOT_FOUND,
            f"the Host header names no app, but {HOST_ROUTING_HINT}",
            {"field": "Host", "host": host},
        )
    url = request.rel_url
    path_qs = url.raw_path
    if url.raw_query_string:
        path_qs += "?" + url.raw_query_string
    return await _ingress(request.app).handle(request, app_key, path_qs)


async def close_websockets(app: web.Application) -> None:
    """Close the proxied websockets with 1001, as the app's on_shutdown step."""
    apps = getattr(app[NODE_KEY], "apps", None)
    ingress = getattr(apps, "ingress", None)
    if ingress is not None:
        await ingress.close_websockets()
