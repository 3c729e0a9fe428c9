"""The API middlewares: request ids, the error envelope, and request statistics.

`MIDDLEWARES` lists them outermost first. The request id middleware gives the
request its id. The statistics middleware times the request and records the final
status. The error middleware turns every failure inside it into an error envelope,
so aiohttp's own 404, 405 and 413 replies carry the envelope too. The rate limiter
(`voxanode.api.ratelimit`) and then the bearer token check (`voxanode.api.auth`) run
inside the error middleware, so their 429, 401 and 403 replies are envelopes as well;
limits count requests with and without a valid token. The `X-Request-ID` header is added in
`on_response_prepare`, which runs for every response the app sends.

Errors that aiohttp's HTTP parser raises before routing, such as a malformed request
line, never reach the app and keep aiohttp's plain-text reply.
"""

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from voxanode.api.auth import auth_middleware
from voxanode.api.ratelimit import rate_limit_middleware
from voxanode.api.errors import ApiError, ErrorCode, error_body
from voxanode.api.json_body import body_too_large_error
from voxanode.api.keys import NODE_KEY, REQUEST_ID_KEY, STATS_KEY, request_id_of

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_PREFIX = "req-"
REQUEST_ID_RANDOM_BYTES = 8
CLIENT_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Headers of an aiohttp HTTPException that describe its plain-text body, which the
# envelope replaces. Every other header, such as Allow on a 405, is kept.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    """Return a fresh request id: `req-` and 16 random hex digits."""
    return REQUEST_ID_PREFIX + secrets.token_hex(REQUEST_ID_RANDOM_BYTES)


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Give the request an id: the client's `X-Request-ID` if well formed, else a new one."""
    client_id = request.headers.get(REQUEST_ID_HEADER, "")
    if CLIENT_REQUEST_ID_PATTERN.fullmatch(client_id):
        request[REQUEST_ID_KEY] = client_id
    else:
        request[REQUEST_ID_KEY] = new_request_id()
    return await handler(request)


async def add_request_id_header(
    request: web.Request, response: web.StreamResponse
) -> None:
    """Set `X-Request-ID` on a response just before its headers are sent."""
    response.headers[REQUEST_ID_HEADER] = request_id_of(request)


@web.middleware
async def statistics_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Count the response in the app's RequestStats and log it at DEBUG."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        logger.debug(
            "request cancelled request_id=%s method=%s path=%s",
            request_id_of(request),
            request.method,
            request.path,
        )
        raise

    response_ms = (time.perf_counter() - started) * 1000
    request.app[STATS_KEY].record(response.status, response_ms)
    logger.debug(
        "request request_id=%s method=%s path=%s status=%d ms=%.1f",
        request_id_of(request),
        request.method,
        request.path,
        response.status,
        response_ms,
    )
    return response


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Turn ApiError, aiohttp's HTTP errors and unexpected exceptions into envelopes.

    Unexpected exceptions become 500 INTERNAL_ERROR. The traceback goes to the log
    with the request id, and the reply carries only the id. Cancellation and
    aiohttp's non-error HTTP exceptions (redirects) propagate unchanged.
    """
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(request, error)
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        return error_response(request, _api_error_from_http(request, http_error))
    except asyncio.CancelledError:
        raise
    except Exception:
        request_id = request_id_of(request)
        logger.exception(
            "unhandled error request_id=%s method=%s path=%s",
            request_id,
            request.method,
            request.path,
        )
        internal = ApiError(
            500,
            ErrorCode.INTERNAL_ERROR,
            f"internal error. The node log has the details under request id {request_id}",
        )
        return error_response(request, internal)


def error_response(request: web.Request, error: ApiError) -> web.Response:
    """Return the JSON error envelope response for `error`."""
    return web.json_response(
        error_body(error, request_id_of(request)),
        status=error.status,
        headers=error.headers,
    )


def _api_error_from_http(
    request: web.Request, http_error: web.HTTPException
) -> ApiError:
    kept_headers = {
        name: value
        for name, value in http_error.headers.items()
        if name.lower() not in _BODY_HEADERS
    }

    if isinstance(http_error, web.HTTPNotFound):
        error = ApiError(
            404,
            ErrorCode.RESOURCE_NOT_FOUND,
            f"no route for {request.method} {request.path}",
            {"method": request.method, "path": request.path},
        )
    elif isinstance(http_error, web.HTTPMethodNotAllowed):
        allowed = sorted(http_error.allowed_methods)
        error = ApiError(
            405,
            ErrorCode.INVALID_REQUEST,
            f"method {request.method} is not allowed on {request.path}."
            f" Allowed methods: {', '.join(allowed)}",
            {"method": request.method, "allowed_methods": allowed},
        )
    elif isinstance(http_error, web.HTTPRequestEntityTooLarge):
        error = body_too_large_error(request.app[NODE_KEY].settings.max_body_bytes)
    else:
        error = ApiError(
            http_error.status,
            _code_for_status(http_error.status),
            _http_error_message(http_error),
        )

    error.headers = {**kept_headers, **error.headers}
    return error


def _http_error_message(http_error: web.HTTPException) -> str:
    # aiohttp's default text is "<status>: <reason>", so any other text is more specific.
    default_text = f"{http_error.status}: {http_error.reason}"
    if http_error.text and http_error.text != default_text:
        return http_error.text
    return http_error.reason


def _code_for_status(status: int) -> ErrorCode:
    codes = {
        401: ErrorCode.AUTHENTICATION_REQUIRED,
        403: ErrorCode.AUTHORIZATION_FAILED,
        404: ErrorCode.RESOURCE_NOT_FOUND,
        409: ErrorCode.RESOURCE_CONFLICT,
        429: ErrorCode.RATE_LIMIT_EXCEEDED,
        503: ErrorCode.SERVICE_UNAVAILABLE,
    }
    if status in codes:
        return codes[status]
    return ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST


MIDDLEWARES = (
    request_id_middleware,
    statistics_middleware,
    error_middleware,
    rate_limit_middleware,
    auth_middleware,
)
