"""The data routes: `POST /data/store/` and `GET /data/retrieve/?key=`.

A store that reaches fewer nodes than requested still succeeds. Its reply carries
`warnings` with the per-node errors, or says that no other nodes were found. A store
that no node acknowledged is a 503.
"""

import functools
import logging
from typing import Any
from urllib.parse import parse_qs

import msgspec
from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode, invalid_field
from voxanode.api.json_body import read_json_object
from voxanode.api.json_reply import json_reply
from voxanode.api.keys import NODE_KEY, request_id_of
from voxanode.api.routes import add_get, add_post
from voxanode.api.schemas import encode_store_value, key_issue, parse_store_request
from voxanode.api.timestamps import isoformat_utc
from voxanode.dht.records import dht_key_for
from voxanode.dht.service import NoHoldersError, StoreResult

STORE_PATH = "/data/store/"
RETRIEVE_PATH = "/data/retrieve/"
KEY_HASH_LOG_HEX_DIGITS = 12
# Retrieve queries up to this length are parsed once and kept, at most QUERY_CACHE_SIZE
# of them: at most about 0.5 MB of query text.
MAX_CACHED_QUERY_CHARS = 512
QUERY_CACHE_SIZE = 1024

logger = logging.getLogger(__name__)


def add_routes(app: web.Application) -> None:
    add_post(app, STORE_PATH, store_data)
    add_get(app, RETRIEVE_PATH, retrieve_data)


async def store_data(request: web.Request) -> web.Response:
    """Validate the body, store the value on `replicas` nodes and report the holders."""
    node = request.app[NODE_KEY]
    settings = node.settings

    body = await read_json_object(request)
    store_request = parse_store_request(body, settings)
    value_json = encode_store_value(store_request.value, settings.max_value_bytes)

    try:
        result = await node.data.store(
            store_request.key,
            value_json,
            ttl_seconds=store_request.ttl,
            replicas=store_request.replicas,
        )
    except NoHoldersError as error:
        logger.warning(
            "store failed on every node request_id=%s key=%s requested=%d errors=%d",
            request_id_of(request),
            _key_hash(store_request.key),
            store_request.replicas,
            len(error.errors),
        )
        raise ApiError(
            503,
            ErrorCode.SERVICE_UNAVAILABLE,
            "no node stored the value. Retry when peers are reachable",
            {
                "requested": store_request.replicas,
                "stored": 0,
                "errors": list(error.errors),
            },
        ) from error

    return json_reply(_store_reply(result))


async def retrieve_data(request: web.Request) -> web.Response:
    """Return the newest unexpired value of `key` with its record metadata."""
    node = request.app[NODE_KEY]
    key = _query_key(request, node.settings.max_key_bytes)

    result = await node.data.retrieve(key)
    if result is None:
        raise ApiError(
            404,
            ErrorCode.RESOURCE_NOT_FOUND,
            "no value is stored under this key, or it has expired",
            {"key": key},
        )

    record = result.record
    return json_reply(
        {
            "success": True,
            "key": record.key,
            # The stored value is compact JSON text, checked when the record was
            # accepted, so it goes into the reply without a decode and encode.
            "value": msgspec.Raw(record.value_json),
            "metadata": {
                "created_at": isoformat_utc(milliseconds=record.created_ms),
                "expires_at": isoformat_utc(milliseconds=record.expires_ms),
                "replicas": record.replicas,
                "source_node": record.publisher_node_id,
                "holders": list(result.holders),
            },
        }
    )


def _store_reply(result: StoreResult) -> dict[str, Any]:
    holders = list(result.holders)
    reply: dict[str, Any] = {
        "success": True,
        "key": result.key,
        "storage_nodes": holders,
        "expires_at": isoformat_utc(milliseconds=result.expires_ms),
        "replicas": {"requested": result.requested, "stored": len(holders)},
    }
    # The data service logs partial stores, so this only reports them to the client.
    if len(holders) < result.requested:
        warning = f"stored on {len(holders)} of {result.requested} requested nodes"
        if result.errors:
            warning += ": " + "; ".join(result.errors)
        else:
            # The data service reports no errors when it ran out of nodes to try.
            warning += ": no other nodes were found to hold a copy"
        reply["warnings"] = [warning]
    return reply


def _query_key(request: web.Request, max_key_bytes: int) -> str:
    try:
        keys = _key_parameters(request.rel_url.raw_query_string)
    except UnicodeDecodeError as error:
        raise invalid_field(
            "key", "must be percent-encoded UTF-8 in the query string"
        ) from error
    if not keys:
        raise invalid_field("key", "is required as a query parameter")
    if len(keys) > 1:
        raise invalid_field("key", "must be given once")
    issue = key_issue(keys[0], max_key_bytes)
    if issue is not None:
        raise invalid_field("key", issue)
    return keys[0]


def _key_parameters(raw_query: str) -> tuple[str, ...]:
    """Return the values of every `key` parameter of a raw query string, in order.

    Raises UnicodeDecodeError for an escape that is not UTF-8. The raw query is
    decoded here because request.query replaces invalid UTF-8 escapes such as %ff
    with U+FFFD, which would look up a different key.
    """
    # Clients read the same keys again and again, so short queries are parsed once.
    if len(raw_query) <= MAX_CACHED_QUERY_CHARS:
        return _cached_key_parameters(raw_query)
    return _parse_key_parameters(raw_query)


def _parse_key_parameters(raw_query: str) -> tuple[str, ...]:
    parameters = parse_qs(raw_query, keep_blank_values=True, errors="strict")
    return tuple(parameters.get("key", ()))


# lru_cache does not keep a call that raised, so an invalid query is parsed each time.
_cached_key_parameters = functools.lru_cache(maxsize=QUERY_CACHE_SIZE)(_parse_key_parameters)


def _key_hash(key: str) -> str:
    """Return a short hex prefix of the key's DHT hash, which logs show instead of keys."""
    return dht_key_for(key).hex()[:KEY_HASH_LOG_HEX_DIGITS]
