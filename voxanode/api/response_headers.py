"""Headers that every API response carries: X-Request-ID, and X-RateLimit-* when limited.

`api_middleware` sets them on each response that a handler returns, before aiohttp
sends it. A handler that streams its response (websockets, log streams, proxied app
traffic) sends the headers itself, from inside the handler, so it must prepare the
response with `prepare_stream`, which sets them first. Setting them here rather than
in an `on_response_prepare` hook spares every request the hook's dispatch.
"""

from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from voxanode.api.keys import REQUEST_ID_KEY

REQUEST_ID_HEADER = "X-Request-ID"
LIMIT_HEADER = "X-RateLimit-Limit"
REMAINING_HEADER = "X-RateLimit-Remaining"
RESET_HEADER = "X-RateLimit-Reset"

# The RateLimitState of a request in a limited category, or None, stored by the rate
# limit middleware (see voxanode.api.ratelimit).
# TODO(aiohttp>=3.14 required): use web.RequestKey unconditionally, as for the request id.
RATE_LIMIT_STATE_KEY: Any = (
    web.RequestKey("rate_limit_state", object)
    if hasattr(web, "RequestKey")
    else "rate_limit_state"
)


def add_api_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Set the request id and, for a rate-limited request, its budget on `response`."""
    headers = response.headers
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    state = request.get(RATE_LIMIT_STATE_KEY)
    if state is not None:
        headers[LIMIT_HEADER] = str(state.limit.amount)
        headers[REMAINING_HEADER] = str(state.remaining)
        headers[RESET_HEADER] = str(state.reset_epoch_seconds)


async def prepare_stream(
    request: web.Request, response: web.StreamResponse
) -> AbstractStreamWriter | None:
    """Set the API headers on a streamed or websocket response, then send its headers.

    Returns what `response.prepare` returns: the connection's writer, whose `drain()`
    waits while the transport's write buffer is above its high-water mark.
    """
    add_api_headers(request, response)
    return await response.prepare(request)
