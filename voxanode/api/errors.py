"""API error codes, the `ApiError` that handlers raise, and the error envelope body.

The error middleware turns every `ApiError` into this JSON body:
`{"success": false, "error": {"code", "message", "details"}, "timestamp", "request_id"}`.
"""

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from voxanode.api.timestamps import isoformat_utc


class ErrorCode(StrEnum):
    """The `error.code` values that clients branch on."""

    INVALID_REQUEST = "INVALID_REQUEST"
    AUTHENTICATION_REQUIRED = "AUTHENTICATION_REQUIRED"
    AUTHORIZATION_FAILED = "AUTHORIZATION_FAILED"
    RESOURCE_NOT_FOUND = "RESOURCE_NOT_FOUND"
    RESOURCE_CONFLICT = "RESOURCE_CONFLICT"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    NETWORK_ERROR = "NETWORK_ERROR"
    DEPLOYMENT_FAILED = "DEPLOYMENT_FAILED"


class ApiError(Exception):
    """A failed request, with the HTTP status and the envelope's code, message, details.

    `headers` are added to the error response, for example `Retry-After`.
    """

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        details: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.headers: dict[str, str] = dict(headers or {})


def invalid_field(
    field: str, issue: str, *, status: int = 400, **extra_details: Any
) -> ApiError:
    """Build the INVALID_REQUEST error for one bad input field.

    The message repeats field and issue, so a client that shows only the message
    still shows the user what to fix.
    """
    details = {"field": field, "issue": issue, **extra_details}
    return ApiError(
        status, ErrorCode.INVALID_REQUEST, f"invalid {field}: {issue}", details
    )


def error_body(error: ApiError, request_id: str) -> dict[str, Any]:
    """Return the error envelope for `error` as a JSON-ready dict."""
    return {
        "success": False,
        "error": {
            "code": str(error.code),
            "message": error.message,
            "details": error.details,
        },
        "timestamp": isoformat_utc(),
        "request_id": request_id,
    }
