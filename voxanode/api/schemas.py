"""Request schemas of the data routes, validated with msgspec in strict mode.

`StoreBody` is the JSON body of `POST /data/store/`, and `msgspec.json.schema(StoreBody)`
is its JSON Schema. Strict conversion keeps JSON types apart: "3", true and 3.0 are
not integers. The upper limits (key bytes, TTL, replicas) and the defaults are not
part of the type, because they come from the node settings passed to
`parse_store_request`, so they follow the running configuration.
"""

import re
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from voxanode.api.errors import ApiError, invalid_field
from voxanode.api.json_body import BODY_FIELD
from voxanode.dht.records import encode_value

MIN_KEY_CHARACTERS = 1
MIN_TTL_SECONDS = 1
MIN_REPLICAS = 1

# msgspec.ValidationError carries only a message, so the field is read from its text.
# These are msgspec's message shapes for a top-level object, checked with msgspec 0.23.
_MISSING_FIELD_MESSAGE = re.compile(r"Object missing required field `(?P<field>.*)`")
_UNKNOWN_FIELD_MESSAGE = re.compile(r"Object contains unknown field `(?P<field>.*)`")
_FIELD_PATH_SUFFIX = re.compile(r" - at `\$\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)`$")


# The docstring and the field descriptions are copied into the JSON Schema. The upper
# limits depend on the node settings, so parse_store_request checks them after
# conversion, and the descriptions name the settings.
class StoreBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a store request."""

    key: Annotated[
        str,
        Meta(
            min_length=MIN_KEY_CHARACTERS,
            description="user key, at most the node's max_key_bytes bytes of UTF-8",
        ),
    ]
    value: Annotated[
        Any,
        Meta(
            description="any JSON value, at most the node's max_value_bytes bytes "
            "as compact JSON"
        ),
    ]
    ttl: (
        Annotated[
            int,
            Meta(
                ge=MIN_TTL_SECONDS,
                description="lifetime in seconds, at most the node's max_ttl_seconds. "
                "Defaults to the node's default_ttl_seconds",
            ),
        ]
        | UnsetType
    ) = UNSET
    replicas: (
        Annotated[
            int,
            Meta(
                ge=MIN_REPLICAS,
                description="number of nodes to store copies on, at most the node's "
                "ksize. Defaults to the node's default_replicas",
            ),
        ]
        | UnsetType
    ) = UNSET


class StoreRequest(msgspec.Struct, frozen=True):
    """A validated store body, with `ttl` (seconds) and `replicas` taken from the
    settings' `default_ttl_seconds` and `default_replicas` when the body left them out."""

    key: str
    value: Any
    ttl: int
    replicas: int


ACCEPTED_STORE_FIELDS = tuple(
    field.encode_name for field in msgspec.structs.fields(StoreBody)
)


def key_issue(key: str, max_key_bytes: int) -> str | None:
    """Return what is wrong with a data key, or None when it is valid.

    A key is 1 to `max_key_bytes` bytes long in UTF-8. A key with lone surrogates
    (possible through JSON `\\ud800` escapes) has no UTF-8 form and is invalid.
    """
    try:
        size_bytes = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode text without lone surrogates"
    if size_bytes == 0:
        return "must not be empty"
    if size_bytes > max_key_bytes:
        return f"must be at most {max_key_bytes} bytes of UTF-8, got {size_bytes}"
    return None


def parse_store_request(data: dict[str, Any], settings: Any) -> StoreRequest:
    """Validate a parsed store body against the settings' limits and fill in defaults.

    An explicit null for `ttl` or `replicas` is rejected rather than read as the
    default. Raises ApiError 400 naming the first invalid field and its issue.
    """
    try:
        body = msgspec.convert(data, StoreBody, strict=True)
    except msgspec.ValidationError as error:
        raise _conversion_error(error, data, settings) from error

    ttl = settings.default_ttl_seconds if body.ttl is UNSET else body.ttl
    replicas = settings.default_replicas if body.replicas is UNSET else body.replicas

    issue = key_issue(body.key, settings.max_key_bytes)
    if issue is not None:
        raise invalid_field("key", issue)
    if not MIN_TTL_SECONDS <= ttl <= settings.max_ttl_seconds:
        raise invalid_field("ttl", _ttl_issue(settings))
    if not MIN_REPLICAS <= replicas <= settings.ksize:
        raise invalid_field("replicas", _replicas_issue(settings))

    return StoreRequest(key=body.key, value=body.value, ttl=ttl, replicas=replicas)


def encode_store_value(value: Any, max_value_bytes: int) -> bytes:
    """Return the value as the compact JSON text that is stored and size-checked.

    Raises ApiError 413 when the text is over `max_value_bytes`, and 400 when the
    value has no UTF-8 JSON form (lone surrogates in a string) or nests too deeply.
    """
    try:
        value_json = encode_value(value)
    except RecursionError as error:
        raise invalid_field("value", "is nested too deeply") from error
    except ValueError as error:
        # UnicodeEncodeError is a ValueError. NaN cannot arrive here because the body
        # parser rejects the literal.
        raise invalid_field("value", f"has no JSON form: {error}") from error

    if len(value_json) > max_value_bytes:
        raise invalid_field(
            "value",
            f"must be at most {max_value_bytes} bytes of JSON",
            status=413,
            limit_bytes=max_value_bytes,
            size_bytes=len(value_json),
        )
    return value_json


def _ttl_issue(settings: Any) -> str:
    return (
        f"must be an integer number of seconds between {MIN_TTL_SECONDS} and "
        f"{settings.max_ttl_seconds}, or left out for the default of "
        f"{settings.default_ttl_seconds}"
    )


def _replicas_issue(settings: Any) -> str:
    return (
        f"must be an integer number of nodes between {MIN_REPLICAS} and "
        f"{settings.ksize}, or left out for the default of {settings.default_replicas}"
    )


def _conversion_error(
    error: msgspec.ValidationError, data: dict[str, Any], settings: Any
) -> ApiError:
    """Build the 400 error for the field that msgspec names in `error`."""
    message = str(error)

    missing = _MISSING_FIELD_MESSAGE.fullmatch(message)
    if missing is not None:
        return invalid_field(missing["field"], "is required")

    unknown = _UNKNOWN_FIELD_MESSAGE.fullmatch(message)
    if unknown is not None:
        accepted = ", ".join(ACCEPTED_STORE_FIELDS)
        return invalid_field(
            unknown["field"], f"is not an accepted field (accepted: {accepted})"
        )

    # A wrong JSON type or a failed Meta constraint on one field. The issue is the
    # field's whole rule, so it does not depend on which of the two failed.
    located = _FIELD_PATH_SUFFIX.search(message)
    field = located["field"] if located is not None else None
    if field == "key":
        key = data.get("key")
        if not isinstance(key, str):
            return invalid_field("key", "must be a string")
        return invalid_field(
            "key", key_issue(key, settings.max_key_bytes) or "must not be empty"
        )
    if field == "ttl":
        return invalid_field("ttl", _ttl_issue(settings))
    if field == "replicas":
        return invalid_field("replicas", _replicas_issue(settings))

    # NOTE: a message shape not matched above (a msgspec release that rewords its
    # errors) is passed on whole, so the client still learns what failed.
    return invalid_field(BODY_FIELD, f"is invalid: {message}")
