"""The data routes over real HTTP: store validation, partial stores, retrieve."""

import json
from datetime import datetime

import pytest

from test_api_fakes import (  # noqa: F401 - fixtures are used by name
    TEST_DEFAULT_REPLICAS,
    TEST_DEFAULT_TTL_SECONDS,
    TEST_KSIZE,
    TEST_MAX_KEY_BYTES,
    TEST_MAX_TTL_SECONDS,
    TEST_MAX_VALUE_BYTES,
    FakeNode,
    client,
    node,
    serve_api,
)
from voxanode.api.timestamps import isoformat_utc
from voxanode.dht.records import encode_value


async def post_store(client, body):
    async with client.post("/data/store/", json=body) as response:
        return response.status, await response.json()


async def test_store_reply_shape(client, node: FakeNode):
    value = {"theme": "dark", "language": "en"}
    status, reply = await post_store(
        client, {"key": "user-1", "value": value, "ttl": 120, "replicas": 2}
    )

    assert status == 200
    assert reply["success"] is True
    assert reply["key"] == "user-1"
    assert reply["storage_nodes"] == ["node-aaaaaaaaaaaa", "node-bbbbbbbbbbbb"]
    assert reply["replicas"] == {"requested": 2, "stored": 2}
    assert "warnings" not in reply

    record = node.data.records["user-1"]
    assert reply["expires_at"] == isoformat_utc(milliseconds=record.expires_ms)
    assert record.expires_ms - record.created_ms == 120_000


async def test_store_passes_compact_json(client, node: FakeNode):
    value = {"b": [1, 2.5, None, True], "a": "é"}
    await post_store(client, {"key": "k", "value": value, "ttl": 60, "replicas": 1})

    call = node.data.store_calls[0]
    assert call.value_json == encode_value(value)
    assert call.ttl_seconds == 60
    assert call.replicas == 1


async def test_store_defaults_from_settings(client, node: FakeNode):
    status, reply = await post_store(client, {"key": "k", "value": None})

    assert status == 200
    call = node.data.store_calls[0]
    assert call.ttl_seconds == TEST_DEFAULT_TTL_SECONDS
    assert call.replicas == TEST_DEFAULT_REPLICAS
    assert call.value_json == b"null"


async def test_store_slashless_path(client, node: FakeNode):
    async with client.post("/data/store", json={"key": "k", "value": 1}) as response:
        assert response.status == 200
    assert node.data.store_calls[0].key == "k"


async def test_store_partial_warns(client, node: FakeNode):
    status, reply = await post_store(client, {"key": "k", "value": 1, "replicas": 4})

    assert status == 200
    assert reply["replicas"] == {"requested": 4, "stored": 2}
    assert len(reply["warnings"]) == 1
    warning = reply["warnings"][0]
    assert warning.startswith("stored on 2 of 4 requested nodes: ")
    assert warning.count("timed out") == 2


async def test_store_no_holders_unavailable(client, node: FakeNode):
    node.data.peer_ids = []
    status, reply = await post_store(client, {"key": "k", "value": 1, "replicas": 3})

    assert status == 503
    assert reply["error"]["code"] == "SERVICE_UNAVAILABLE"
    details = reply["error"]["details"]
    assert details["requested"] == 3
    assert details["stored"] == 0
    assert len(details["errors"]) == 3


STORE_FIELD_CASES = [
    # (case id, body, field, words in the issue)
    ("key missing", {"value": 1}, "key", "required"),
    ("value missing", {"key": "k"}, "value", "required"),
    ("key not string", {"key": 5, "value": 1}, "key", "string"),
    ("key empty", {"key": "", "value": 1}, "key", "empty"),
    ("key over limit", {"key": "k" * (TEST_MAX_KEY_BYTES + 1), "value": 1}, "key", "bytes"),
    # Nine two-byte characters: under the limit in characters, over it in bytes.
    ("key multibyte over limit", {"key": "é" * 9, "value": 1}, "key", "bytes"),
    ("key lone surrogate", {"key": "\ud800", "value": 1}, "key", "surrogate"),
    ("ttl string", {"key": "k", "value": 1, "ttl": "3"}, "ttl", "integer"),
    ("ttl boolean", {"key": "k", "value": 1, "ttl": True}, "ttl", "integer"),
    ("ttl float", {"key": "k", "value": 1, "ttl": 3.0}, "ttl", "integer"),
    ("ttl null", {"key": "k", "value": 1, "ttl": None}, "ttl", "integer"),
    ("ttl zero", {"key": "k", "value": 1, "ttl": 0}, "ttl", "between 1 and"),
    ("ttl negative", {"key": "k", "value": 1, "ttl": -5}, "ttl", "between 1 and"),
    (
        "ttl over max",
        {"key": "k", "value": 1, "ttl": TEST_MAX_TTL_SECONDS + 1},
        "ttl",
        f"between 1 and {TEST_MAX_TTL_SECONDS}",
    ),
    ("ttl huge", {"key": "k", "value": 1, "ttl": 10**30}, "ttl", "between 1 and"),
    ("replicas string", {"key": "k", "value": 1, "replicas": "2"}, "replicas", "integer"),
    ("replicas boolean", {"key": "k", "value": 1, "replicas": False}, "replicas", "integer"),
    ("replicas float", {"key": "k", "value": 1, "replicas": 2.5}, "replicas", "integer"),
    ("replicas zero", {"key": "k", "value": 1, "replicas": 0}, "replicas", "between 1 and"),
    (
        "replicas over ksize",
        {"key": "k", "value": 1, "replicas": TEST_KSIZE + 1},
        "replicas",
        f"between 1 and {TEST_KSIZE}",
    ),
    ("extra field", {"key": "k", "value": 1, "owner": "me"}, "owner", "not an accepted field"),
]


@pytest.mark.parametrize(
    "body, field, issue_words",
    [case[1:] for case in STORE_FIELD_CASES],
    ids=[case[0] for case in STORE_FIELD_CASES],
)
async def test_store_rejects_invalid_field(client, node: FakeNode, body, field, issue_words):
    status, reply = await post_store(client, body)

    assert status == 400
    assert reply["error"]["code"] == "INVALID_REQUEST"
    assert reply["error"]["details"]["field"] == field
    assert issue_words in reply["error"]["details"]["issue"]
    assert node.data.store_calls == []


@pytest.mark.parametrize(
    "body",
    [
        {"key": "é" * (TEST_MAX_KEY_BYTES // 2), "value": 1},
        {"key": "k", "value": 1, "ttl": 1},
        {"key": "k", "value": 1, "ttl": TEST_MAX_TTL_SECONDS},
        {"key": "k", "value": 1, "replicas": 1},
        {"key": "k", "value": 1, "replicas": TEST_KSIZE},
    ],
    ids=["key at byte limit", "ttl 1", "ttl max", "replicas 1", "replicas ksize"],
)
async def test_store_accepts_limits(client, body):
    status, reply = await post_store(client, body)

    assert status == 200, reply
    assert reply["success"] is True


async def test_store_rejects_nan_in_value(client, node: FakeNode):
    body = b'{"key": "k", "value": {"x": NaN}}'
    async with client.post(
        "/data/store/", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        reply = await response.json()

    assert response.status == 400
    assert reply["error"]["details"]["field"] == "body"
    assert "NaN" in reply["error"]["details"]["issue"]
    assert node.data.store_calls == []


@pytest.mark.parametrize(
    "body",
    [b'{"key": "a", "key": "b", "value": 1}', b'{"key": "k", "value": {"x": 1, "x": 2}}'],
)
async def test_store_rejects_duplicate_keys(client, node: FakeNode, body):
    async with client.post(
        "/data/store/", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        reply = await response.json()

    assert response.status == 400
    assert reply["error"]["details"]["field"] == "body"
    assert "more than once" in reply["error"]["details"]["issue"]
    assert node.data.store_calls == []


async def test_store_value_at_limit(client, node: FakeNode):
    # A JSON string's text is its characters plus two quotes.
    value = "x" * (TEST_MAX_VALUE_BYTES - 2)
    status, _ = await post_store(client, {"key": "k", "value": value})

    assert status == 200
    assert len(node.data.store_calls[0].value_json) == TEST_MAX_VALUE_BYTES


async def test_store_value_over_limit(client, node: FakeNode):
    value = "x" * (TEST_MAX_VALUE_BYTES - 1)
    status, reply = await post_store(client, {"key": "k", "value": value})

    assert status == 413
    assert reply["error"]["code"] == "INVALID_REQUEST"
    assert reply["error"]["details"] == {
        "field": "value",
        "issue": f"must be at most {TEST_MAX_VALUE_BYTES} bytes of JSON",
        "limit_bytes": TEST_MAX_VALUE_BYTES,
        "size_bytes": TEST_MAX_VALUE_BYTES + 1,
    }
    assert node.data.store_calls == []


async def test_store_value_size_counts_utf8_bytes(client, node: FakeNode):
    # Each "é" is two bytes in the stored text, though one character.
    value = "é" * (TEST_MAX_VALUE_BYTES // 2)
    status, reply = await post_store(client, {"key": "k", "value": value})

    assert status == 413
    assert reply["error"]["details"]["size_bytes"] == TEST_MAX_VALUE_BYTES + 2


async def test_store_value_lone_surrogate(client, node: FakeNode):
    body = b'{"key": "k", "value": "\\udc00"}'
    async with client.post(
        "/data/store/", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        reply = await response.json()

    assert response.status == 400
    assert reply["error"]["details"]["field"] == "value"
    assert node.data.store_calls == []


async def test_retrieve_round_trip(client, node: FakeNode):
    value = {"theme": "dark", "list": [1, "é", None]}
    await post_store(client, {"key": "user-é", "value": value, "ttl": 300, "replicas": 2})

    async with client.get("/data/retrieve/", params={"key": "user-é"}) as response:
        reply = await response.json()

    assert response.status == 200
    record = node.data.records["user-é"]
    assert reply == {
        "success": True,
        "key": "user-é",
        "value": value,
        "metadata": {
            "created_at": isoformat_utc(milliseconds=record.created_ms),
            "expires_at": isoformat_utc(milliseconds=record.expires_ms),
            "replicas": 2,
            "source_node": node.node_id,
            "holders": ["node-aaaaaaaaaaaa", "node-bbbbbbbbbbbb"],
        },
    }
    created = datetime.strptime(reply["metadata"]["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    expires = datetime.strptime(reply["metadata"]["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert 299 <= (expires - created).total_seconds() <= 300


async def test_retrieve_slashless_path(client, node: FakeNode):
    await post_store(client, {"key": "k", "value": [1]})

    async with client.get("/data/retrieve", params={"key": "k"}) as response:
        reply = await response.json()

    assert response.status == 200
    assert reply["value"] == [1]


async def test_retrieve_null_value(client, node: FakeNode):
    await post_store(client, {"key": "k", "value": None})

    async with client.get("/data/retrieve/", params={"key": "k"}) as response:
        reply = await response.json()

    assert response.status == 200
    assert "value" in reply
    assert reply["value"] is None


async def test_retrieve_not_found_names_key(client):
    async with client.get("/data/retrieve/", params={"key": "absent"}) as response:
        reply = await response.json()

    assert response.status == 404
    assert reply["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert reply["error"]["details"] == {"key": "absent"}


async def test_retrieve_key_over_limit(client):
    key = "é" * 9
    async with client.get("/data/retrieve/", params={"key": key}) as response:
        reply = await response.json()

    assert response.status == 400
    assert reply["error"]["details"]["field"] == "key"
    assert "bytes" in reply["error"]["details"]["issue"]


async def test_retrieve_key_invalid_utf8_escape(client):
    async with client.get("/data/retrieve/?key=%ff") as response:
        reply = await response.json()

    assert response.status == 400
    assert reply["error"]["details"]["field"] == "key"
    assert "UTF-8" in reply["error"]["details"]["issue"]


async def test_retrieve_key_with_reserved_characters(client, node: FakeNode):
    key = "a+b&c=d/é %"
    await post_store(client, {"key": key, "value": 7})

    async with client.get("/data/retrieve/", params={"key": key}) as response:
        reply = await response.json()

    assert response.status == 200
    assert reply["key"] == key
    assert reply["value"] == 7


async def test_store_value_round_trips_unicode_json(client, node: FakeNode):
    value = {"emoji": "\U0001f600", "quote": '"', "nested": {"a": [{}]}}
    status, _ = await post_store(client, {"key": "k", "value": value})
    assert status == 200

    async with client.get("/data/retrieve/", params={"key": "k"}) as response:
        text = await response.text()

    assert json.loads(text)["value"] == value
