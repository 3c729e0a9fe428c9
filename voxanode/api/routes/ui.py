"""The web dashboard: `GET /ui/`, its redirect from `/ui`, and its files under `/ui/static/`.

The page, its style sheet and its script are files of the package in
`voxanode/api/static/ui`, served from a fixed list, so no other file can be requested.
They contain no data and need no token (`voxanode.api.auth` leaves these routes open).
The script reads everything from this node's REST API and websockets, sending the
token that the user enters, which the browser keeps in sessionStorage.

The page loads nothing from other hosts: its Content-Security-Policy allows scripts,
styles, images and connections to this node only, and no inline script or style.
"""

import asyncio
from pathlib import Path

from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.routes import add_get

UI_PATH = "/ui/"
UI_REDIRECT_PATH = "/ui"
UI_STATIC_PREFIX = "/ui/static/"
UI_ASSET_PATH = UI_STATIC_PREFIX + "{name}"
UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"
UI_PAGE_FILE = "index.html"

# Asset name in the URL -> Content-Type. Each name is also the file name in UI_DIR.
UI_ASSETS: dict[str, str] = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}

# 'self' in connect-src also allows ws:// to this host and port (CSP Level 3), which
# the event and log websockets need.
UI_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
UI_PAGE_HEADERS = {
    "Content-Security-Policy": UI_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_routes(app: web.Application) -> None:
    # The page has one URL, /ui/, so /ui redirects there instead of being add_get's
    # slash twin of the page.
    app.router.add_get(UI_PATH, dashboard_page)
    app.router.add_get(UI_REDIRECT_PATH, redirect_to_dashboard)
    add_get(app, UI_ASSET_PATH, dashboard_asset)


async def dashboard_page(request: web.Request) -> web.Response:
    """Return the dashboard's HTML page."""
    body = await asyncio.to_thread((UI_DIR / UI_PAGE_FILE).read_bytes)
    return web.Response(
        body=body, content_type="text/html", charset="utf-8", headers=UI_PAGE_HEADERS
    )


async def redirect_to_dashboard(request: web.Request) -> web.StreamResponse:
    """Redirect `/ui` to `/ui/`."""
    raise web.HTTPMovedPermanently(UI_PATH)


async def dashboard_asset(request: web.Request) -> web.Response:
    """Return one file of UI_ASSETS, or 304 when the client's copy has the same ETag."""
    name = request.match_info["name"]
    content_type = UI_ASSETS.get(name)
    if content_type is None:
        raise ApiError(
            404,
            ErrorCode.RESOURCE_NOT_FOUND,
            f"no dashboard asset is named {name!r}",
            {"name": name, "available": sorted(UI_ASSETS)},
        )
    path = UI_DIR / name

    file_status = await asyncio.to_thread(path.stat)
    etag = f'"{file_status.st_size:x}-{file_status.st_mtime_ns:x}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    client_etags = {
        entry.strip().removeprefix("W/")
        for entry in request.headers.get("If-None-Match", "").split(",")
    }
    if etag in client_etags or "*" in client_etags:
        return web.Response(status=304, headers=headers)

    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(
        body=body, content_type=content_type, charset="utf-8", headers=headers
    )
