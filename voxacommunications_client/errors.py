"""Exceptions of the client: one base class, one class per API error code, network failures.

Every error the node returns has the JSON envelope
`{"success": false, "error": {"code", "message", "details"}, "timestamp", "request_id"}`.
`error_from_response` turns such a reply into the ApiError subclass of its code. When
the body is not an envelope, it uses the HTTP status instead. That happens with a
proxy's error page, and with a rejected websocket upgrade, whose body aiohttp drops.
"""

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

# Codes of errors raised by the client itself, not sent by a node.
CLIENT_ERROR = "CLIENT_ERROR"
INVALID_RESPONSE = "INVALID_RESPONSE"
NETWORK_ERROR = "NETWORK_ERROR"
REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
STREAM_CLOSED = "STREAM_CLOSED"
WAIT_TIMEOUT = "WAIT_TIMEOUT"

REQUEST_ID_HEADER = "X-Request-ID"
RETRY_AFTER_HEADER = "Retry-After"


class VoxaError(Exception):
    """Base class of every error this package raises.

    `code` is the API error code (such as RESOURCE_NOT_FOUND) or one of the client's
    own codes above. `status` is the HTTP status, or None when no reply arrived.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = CLIENT_ERROR,
        details: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.request_id = request_id
        self.status = status

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request_id {self.request_id})"
        return self.message


class ApiError(VoxaError):
    """An error reply of the node."""


class InvalidRequest(ApiError):
    """INVALID_REQUEST: a parameter or the body was rejected (400, 405, 413, 415).

    `field` and `issue` name the rejected input and the problem, when the node sends them.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        field = self.details.get("field")
        issue = self.details.get("issue")
        self.field: str | None = field if isinstance(field, str) else None
        self.issue: str | None = issue if isinstance(issue, str) else None


class AuthenticationRequired(ApiError):
    """AUTHENTICATION_REQUIRED (401): the bearer token is missing, unknown or revoked."""


class AuthorizationFailed(ApiError):
    """AUTHORIZATION_FAILED (403): the token's scope does not allow the request."""


class NotFound(ApiError):
    """RESOURCE_NOT_FOUND (404, or 410 for an event id no longer buffered)."""


class Conflict(ApiError):
    """RESOURCE_CONFLICT (409), such as an active app of the same name."""


class RateLimited(ApiError):
    """RATE_LIMIT_EXCEEDED (429). `retry_after` is the wait in seconds the node asked for."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailable(ApiError):
    """SERVICE_UNAVAILABLE (503). `retry_after` is the wait in seconds the node asked for."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class DeploymentFailed(ApiError):
    """DEPLOYMENT_FAILED (422 or 503), or an app that wait_until_running found failed."""


class InternalError(ApiError):
    """INTERNAL_ERROR (500), or another 5xx reply without a known code."""


class NetworkError(VoxaError):
    """No reply: the connection could not be made or broke, or a stream ended abnormally.

    `url` is the URL that was requested.
    """

    def __init__(self, message: str, *, url: str, code: str = NETWORK_ERROR, **kwargs: Any) -> None:
        super().__init__(message, code=code, **kwargs)
        self.url = url


class RequestTimeout(NetworkError):
    """No complete reply arrived within the client's timeout."""

    def __init__(self, message: str, *, url: str, **kwargs: Any) -> None:
        super().__init__(message, url=url, code=REQUEST_TIMEOUT, **kwargs)


class WaitTimeout(VoxaError):
    """wait_until_running gave up. `last_status` is the last AppStatus it read, if any."""

    def __init__(self, message: str, *, last_status: Any = None, **kwargs: Any) -> None:
        super().__init__(message, code=WAIT_TIMEOUT, **kwargs)
        self.last_status = last_status


ERROR_CLASSES_BY_CODE: dict[str, type[ApiError]] = {
    "INVALID_REQUEST": InvalidRequest,
    "AUTHENTICATION_REQUIRED": AuthenticationRequired,
    "AUTHORIZATION_FAILED": AuthorizationFailed,
    "RESOURCE_NOT_FOUND": NotFound,
    "RESOURCE_CONFLICT": Conflict,
    "RATE_LIMIT_EXCEEDED": RateLimited,
    "SERVICE_UNAVAILABLE": ServiceUnavailable,
    "DEPLOYMENT_FAILED": DeploymentFailed,
    "INTERNAL_ERROR": InternalError,
}

# The code a node sends with each status, for replies that carry no envelope.
CODES_BY_STATUS: dict[int, str] = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_REQUIRED",
    403: "AUTHORIZATION_FAILED",
    404: "RESOURCE_NOT_FOUND",
    405: "INVALID_REQUEST",
    409: "RESOURCE_CONFLICT",
    410: "RESOURCE_NOT_FOUND",
    413: "INVALID_REQUEST",
    415: "INVALID_REQUEST",
    422: "DEPLOYMENT_FAILED",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return the seconds of a Retry-After header value (delta seconds or an HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds)


def code_for_status(status: int) -> str:
    """Return the API error code a node uses for `status`."""
    if status in CODES_BY_STATUS:
        return CODES_BY_STATUS[status]
    return "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST"


def error_from_response(status: int, body: Any, headers: Mapping[str, str], description: str) -> ApiError:
    """Build the ApiError subclass for an error reply.

    `body` is the parsed JSON body or None. `description` (such as "GET /apps/list_apps/")
    goes into the message when the body is not an envelope.
    """
    envelope = body.get("error") if isinstance(body, Mapping) else None
    request_id = headers.get(REQUEST_ID_HEADER)
    if isinstance(envelope, Mapping) and isinstance(envelope.get("code"), str):
        code = envelope["code"]
        message = str(envelope.get("message") or f"{description} failed with HTTP {status}")
        details = envelope.get("details")
        details = details if isinstance(details, Mapping) else {}
        if isinstance(body.get("request_id"), str):
            request_id = body["request_id"]
    else:
        code = code_for_status(status)
        message = f"{description} failed with HTTP {status} and no error details from the node"
        details = {}

    error_class = ERROR_CLASSES_BY_CODE.get(code)
    if error_class is None:
        error_class = ERROR_CLASSES_BY_CODE.get(code_for_status(status), ApiError)
    arguments: dict[str, Any] = {"code": code, "details": details, "request_id": request_id, "status": status}
    if issubclass(error_class, (RateLimited, ServiceUnavailable)):
        retry_after = parse_retry_after(headers.get(RETRY_AFTER_HEADER))
        if retry_after is None and isinstance(details.get("retry_after_seconds"), (int, float)):
            retry_after = float(details["retry_after_seconds"])
        arguments["retry_after"] = retry_after
    return error_class(message, **arguments)
