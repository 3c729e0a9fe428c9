"""Reading a request body as a JSON object, with the content type and size checks.

Every failure becomes an `ApiError`. A content type other than `application/json`, or
a charset other than UTF-8, is a 415. A body over `settings.max_body_bytes` (the app's
`client_max_size`) is a 413. A body that is not UTF-8, not JSON, uses the
non-standard NaN/Infinity literals, nests too deeply or is not an object at the top
level is a 400 with field "body", and so is a body that its Content-Encoding does not
decode or that ends early because the client closed the connection.
"""

import json
from typing import Any, NoReturn

from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode, invalid_field
from voxanode.api.keys import NODE_KEY

JSON_CONTENT_TYPE = "application/json"
UTF8_CHARSET_NAMES = frozenset({"utf-8", "utf8"})
BODY_FIELD = "body"


def body_too_large_error(limit_bytes: int) -> ApiError:
    """Build the 413 error for a request body over `limit_bytes`."""
    return invalid_field(
        BODY_FIELD,
        f"must be at most {limit_bytes} bytes",
        status=413,
        limit_bytes=limit_bytes,
    )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """Check the content type, read the body and return it parsed as a JSON object."""
    _check_json_content_type(request)

    # A declared length over the limit is rejected before reading any of the body.
    # Chunked bodies are cut off by request.read(), which raises
    # HTTPRequestEntityTooLarge once client_max_size is passed.
    limit_bytes = request.app[NODE_KEY].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit_bytes:
        raise body_too_large_error(limit_bytes)

    return decode_json_object(await _read_body(request))


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.RequestPayloadError as error:
        # aiohttp raises this for a body that its Content-Encoding (gzip, deflate)
        # does not decode. The parser's own error carries the reason.
        reason = getattr(error.__cause__, "message", "") or "it is malformed"
        raise invalid_field(BODY_FIELD, f"could not be read: {reason}") from error
    except ConnectionResetError as error:
        # The client closed the connection before the whole body arrived. No reply
        # reaches it, and the request counts as a client error, not a server error.
        raise invalid_field(
            BODY_FIELD, "ended early: the client closed the connection"
        ) from error


def decode_json_object(body: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON text whose top-level value must be an object."""
    if not body:
        raise invalid_field(BODY_FIELD, "is empty, but a JSON object is required")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise invalid_field(
            BODY_FIELD, f"must be UTF-8 text, but has an invalid byte at offset {error.start}"
        ) from error

    try:
        data = json.loads(
            text,
            parse_constant=_reject_non_finite_literal,
            object_pairs_hook=_object_without_duplicate_keys,
        )
    except RecursionError as error:
        raise invalid_field(
            BODY_FIELD, "is nested too deeply to parse as JSON"
        ) from error
    except ValueError as error:
        # json.JSONDecodeError, the NaN/Infinity rejection below, and the int digit
        # limit of Python 3.11 are all ValueErrors.
        raise invalid_field(BODY_FIELD, f"is not valid JSON: {error}") from error

    if not isinstance(data, dict):
        raise invalid_field(
            BODY_FIELD, f"must be a JSON object, not {json_type_name(data)}"
        )
    return data


def _check_json_content_type(request: web.Request) -> None:
    content_type = request.content_type
    if content_type != JSON_CONTENT_TYPE:
        raise ApiError(
            415,
            ErrorCode.INVALID_REQUEST,
            f"Content-Type must be {JSON_CONTENT_TYPE}, got {content_type}",
            {
                "field": "Content-Type",
                "issue": f"must be {JSON_CONTENT_TYPE}",
                "received": content_type,
            },
        )
    charset = request.charset
    if charset is not None and charset.lower() not in UTF8_CHARSET_NAMES:
        raise ApiError(
            415,
            ErrorCode.INVALID_REQUEST,
            f"Content-Type charset must be utf-8, got {charset}",
            {"field": "Content-Type", "issue": "charset must be utf-8"},
        )


def _reject_non_finite_literal(literal: str) -> NoReturn:
    raise ValueError(f"{literal} is not a JSON number")


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys without a word; a request whose
    # fields contradict each other is rejected instead.
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {json.dumps(key)} appears more than once in one object")
            seen.add(key)
    return data


def json_type_name(value: Any) -> str:
    """Name the JSON type of a decoded value for error messages: "a string", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__