"""The documentation routes: `GET /openapi.json`, `GET /docs`, `GET /redoc` and assets.

`/openapi.json` is the OpenAPI 3.1 document of `voxanode.api.openapi`, built once when
the app is created, from the node's settings. `/docs` is Swagger UI and `/redoc` is
ReDoc, both vendored in `voxanode/api/static` and served under `/docs/static/NAME`
from a fixed list of files, so no other file of the package can be requested.

The pages load nothing from other hosts. Their Content-Security-Policy limits
scripts, styles, images, fonts and fetches to this node, which also stops the images
that the ReDoc bundle links from its CDN. Swagger UI's validator badge, which would
send the document to validator.swagger.io, is turned off in its start script.
"""

import asyncio
from pathlib import Path

import msgspec
from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.keys import NODE_KEY
from voxanode.api.openapi import build_openapi
from voxanode.api.routes import add_get

OPENAPI_PATH = "/openapi.json"
SWAGGER_UI_PATH = "/docs"
REDOC_PATH = "/redoc"
STATIC_PREFIX = "/docs/static/"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Asset name in the URL -> (file under STATIC_DIR, Content-Type).
ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css"),
    "swagger-ui-init.js": ("swagger-ui-init.js", "text/javascript"),
    "redoc.standalone.js": ("redoc/redoc.standalone.js", "text/javascript"),
    "redoc-init.js": ("redoc-init.js", "text/javascript"),
}

# Only this node may serve what the pages load. ReDoc's styled components add inline
# styles and its search index runs in a blob: worker.
PAGE_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

OPENAPI_BODY_KEY = web.AppKey("openapi_body", bytes)

SWAGGER_UI_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>voxanode API - Swagger UI</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{STATIC_PREFIX}swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{OPENAPI_PATH}"></div>
<script src="{STATIC_PREFIX}swagger-ui-bundle.js"></script>
<script src="{STATIC_PREFIX}swagger-ui-init.js"></script>
</body>
</html>
"""

# ReDoc's usual page loads Montserrat and Roboto from Google Fonts. This one uses
# fonts the system has instead.
REDOC_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>voxanode API - ReDoc</title>
<link rel="icon" href="data:,">
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<div id="redoc" data-openapi-url="{OPENAPI_PATH}"></div>
<script src="{STATIC_PREFIX}redoc.standalone.js"></script>
<script src="{STATIC_PREFIX}redoc-init.js"></script>
</body>
</html>
"""


def add_routes(app: web.Application) -> None:
    settings = app[NODE_KEY].settings
    app[OPENAPI_BODY_KEY] = msgspec.json.encode(build_openapi(settings, ASSETS))
    add_get(app, OPENAPI_PATH, openapi_document)
    add_get(app, SWAGGER_UI_PATH, swagger_ui)
    add_get(app, REDOC_PATH, redoc)
    app.router.add_get(STATIC_PREFIX + "{name}", docs_asset)


async def openapi_document(request: web.Request) -> web.Response:
    """Return the OpenAPI document of this node's API."""
    return web.Response(
        body=request.app[OPENAPI_BODY_KEY],
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )


async def swagger_ui(request: web.Request) -> web.Response:
    """Return the Swagger UI page for /openapi.json."""
    return _page(SWAGGER_UI_PAGE)


async def redoc(request: web.Request) -> web.Response:
    """Return the ReDoc page for /openapi.json."""
    return _page(REDOC_PAGE)


async def docs_asset(request: web.Request) -> web.Response:
    """Return one file of ASSETS, or 304 when the client's copy has the same ETag.

    Range requests get the whole file, which HTTP allows. aiohttp's FileResponse is not
    used because it replies to an unsatisfiable range with a bare 416 instead of the
    error envelope.
    """
    name = request.match_info["name"]
    asset = ASSETS.get(name)
    if asset is None:
        raise ApiError(
            404,
            ErrorCode.RESOURCE_NOT_FOUND,
            f"no documentation asset is named {name!r}",
            {"name": name, "available": sorted(ASSETS)},
        )
    relative_path, content_type = asset
    path = STATIC_DIR / relative_path

    file_status = await asyncio.to_thread(path.stat)
    etag = f'"{file_status.st_size:x}-{file_status.st_mtime_ns:x}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    client_etags = _listed_etags(request.headers.get("If-None-Match", ""))
    if etag in client_etags or "*" in client_etags:
        return web.Response(status=304, headers=headers)

    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(
        body=body, content_type=content_type, charset="utf-8", headers=headers
    )


def _listed_etags(header: str) -> set[str]:
    return {entry.strip().removeprefix("W/") for entry in header.split(",")}


def _page(html: str) -> web.Response:
    return web.Response(
        text=html, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )
