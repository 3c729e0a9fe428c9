"""The API route groups, one module each, and the helper that registers their paths."""

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def slash_variants(path: str) -> tuple[str, str]:
    """Return `path` and its twin with the trailing slash added or removed."""
    twin = path.rstrip("/") if path.endswith("/") else path + "/"
    return (path, twin)


def add_get(app: web.Application, path: str, handler: Handler) -> None:
    """Route GET and HEAD of `path` and of its slash twin to `handler`."""
    for variant in slash_variants(path):
        app.router.add_get(variant, handler)


def add_post(app: web.Application, path: str, handler: Handler) -> None:
    """Route POST of `path` and of its slash twin to `handler`."""
    for variant in slash_variants(path):
        app.router.add_post(variant, handler)
