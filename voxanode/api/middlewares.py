"""The API middleware: request ids, the error envelope, and request statistics.

`MIDDLEWARES` is the API app's one middleware, built by `build_api_middleware`. It
gives the request its id, runs the request checks, turns every failure inside it
into an error envelope, so aiohttp's own 404, 405 and 413 replies carry the envelope
too, and then times the request and records the final status. The checks are plain
functions called in order, not middlewares of their own, because each aiohttp
middleware adds a call layer to every request: the API app runs the rate limiter
(`voxanode.api.ratelimit.count_request`) and then the bearer token check
(`voxanode.api.auth.check_token`), so their 429, 401 and 403 replies are envelopes as
well; limits count requests with and without a valid token. The middleware sets the `X-Request-ID` and
`X-RateLimit-*` headers on every response a handler returns; handlers that stream
prepare their responses with `prepare_stream`, which sets them (see
`voxanode.api.response_headers`).

Errors that aiohttp's HTTP parser raises before routing, such as a malformed request
line, never reach the app and keep aiohttp's plain-text reply.
"""

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from voxanode.api.auth import check_token
from voxanode.api.ratelimit import count_request
from voxanode.api.errors import ApiError, ErrorCode, error_body
from voxanode.api.json_body import body_too_large_error
from voxanode.api.json_reply import json_reply
from voxanode.api.keys import NODE_KEY, REQUEST_ID_KEY, STATS_KEY, request_id_of
from voxanode.api.response_headers import REQUEST_ID_HEADER, add_api_headers
from voxanode.api.routes.proxy import APP_TRAFFIC_ROUTES
from voxanode.api.stats import route_of

REQUEST_ID_PREFIX = "req-"
# A generated id is the prefix, 12 random hex digits drawn once per process, and a
# counter of 8 hex digits.
REQUEST_ID_PROCESS_RANDOM_BYTES = 6
REQUEST_ID_COUNTER_LIMIT = 16**8
CLIENT_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Headers of an aiohttp HTTPException that describe its plain-text body, which the
# envelope replaces. Every other header, such as Allow on a 405, is kept.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
CONNECT_METHOD = "CONNECT"

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
# A request check returns nothing when the request may go on and raises an ApiError
# (or aiohttp's HTTP error) when it may not.
RequestCheck = Callable[[web.Request], None]


class RequestIdGenerator:
    """Request ids of this process: `req-`, a random process part and a counter.

    The ids of one process never repeat: when the counter reaches its limit of
    2**32 ids, a new random process part is drawn. The 48 random bits make it
    unlikely, not impossible, that two runs of a node share a process part.
    """

    def __init__(self) -> None:
        self._start_series()

    def _start_series(self) -> None:
        self._prefix = REQUEST_ID_PREFIX + secrets.token_hex(REQUEST_ID_PROCESS_RANDOM_BYTES)
        self._counter = itertools.count()

    def next_id(self) -> str:
        """Return an id that this generator has not returned before."""
        number = next(self._counter)
        if number >= REQUEST_ID_COUNTER_LIMIT:
            self._start_series()
            number = next(self._counter)
        return f"{self._prefix}{number:08x}"


_request_ids = RequestIdGenerator()


def new_request_id() -> str:
    """Return a fresh request id: `req-` and 20 hex digits, unique in this process."""
    return _request_ids.next_id()


def build_api_middleware(checks: Sequence[RequestCheck] = ()) -> Middleware:
    """Return the API middleware that runs `checks` in order before the handler."""
    checks = tuple(checks)

    @web.middleware
    async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Give the request an id, run the checks and the handler, render failures as envelopes.

        The id is the client's `X-Request-ID` if well formed, else a new one.
        ApiError, aiohttp's HTTP errors and unexpected exceptions become error envelopes.
        Unexpected exceptions become 500 INTERNAL_ERROR: the traceback goes to the log
        with the request id, and the reply carries only the id. Cancellation and
        aiohttp's non-error HTTP exceptions (redirects) propagate unchanged and are not
        counted. Every other response is counted and gets the API headers.
        """
        client_id = request.headers.get(REQUEST_ID_HEADER)
        if client_id and CLIENT_REQUEST_ID_PATTERN.fullmatch(client_id):
            request[REQUEST_ID_KEY] = client_id
        else:
            request[REQUEST_ID_KEY] = _request_ids.next_id()

        started = time.perf_counter()
        try:
            for check in checks:
                check(request)
            response = await handler(request)
        except ApiError as error:
            response = error_response(request, error)
        except web.HTTPException as http_error:
            if http_error.status < 400:
                add_api_headers(request, http_error)
                raise
            response = error_response(request, _api_error_from_http(request, http_error))
        except asyncio.CancelledError:
            logger.debug(
                "request cancelled request_id=%s method=%s path=%s",
                request_id_of(request),
                request.method,
                request.path,
            )
            raise
        except Exception:
            response = _internal_error_response(request)

        if not response.prepared:
            add_api_headers(request, response)
        _record_response(request, response.status, started)
        return response

    return api_middleware


def _record_response(request: web.Request, status: int, started: float) -> None:
    """Count one API response in the app's RequestStats and log it at DEBUG.

    Responses of the app traffic routes are not counted: the ingress counts them per
    app (`voxanode_ingress_*`), and an app's own errors and latency are not the API's.
    """
    response_ms = (time.perf_counter() - started) * 1000
    route = route_of(request)
    if route not in APP_TRAFFIC_ROUTES:
        request.app[STATS_KEY].record(status, response_ms, route, request.method)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "request request_id=%s method=%s path=%s status=%d ms=%.1f",
            request_id_of(request),
            request.method,
            request.path,
            status,
            response_ms,
        )


def _internal_error_response(request: web.Request) -> web.Response:
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
    return json_reply(
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

    if isinstance(http_error, web.HTTPNotFound) and request.method == CONNECT_METHOD:
        # aiohttp reads a CONNECT target as an authority, so no route ever matches it.
        error = ApiError(
            405,
            ErrorCode.INVALID_REQUEST,
            "method CONNECT is not allowed: a node is not a forward proxy."
            " Send app traffic to /proxy/APP/PATH, or to the ingress port with Host: APP",
            {"method": request.method, "allowed_methods": []},
            # An empty Allow: no resource of the node takes CONNECT.
            headers={"Allow": ""},
        )
    elif isinstance(http_error, web.HTTPNotFound):
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


MIDDLEWARES = (build_api_middleware((count_request, check_token)),)
