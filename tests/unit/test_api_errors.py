"""The API's error envelope, request ids and request statistics, over real HTTP."""

import asyncio
import json
import logging
import re

import pytest

from test_api_fakes import (  # noqa: F401 - fixtures are used by name
    TEST_MAX_BODY_BYTES,
    FakeNode,
    client,
    node,
    serve_api,
)

TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
GENERATED_ID_PATTERN = re.compile(r"req-[0-9a-f]{20}")
JSON = {"Content-Type": "application/json"}


def assert_envelope(body: dict, response_headers, code: str) -> None:
    assert body["success"] is False
    assert set(body) == {"success", "error", "timestamp", "request_id"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    assert TIMESTAMP_PATTERN.fullmatch(body["timestamp"])
    assert body["request_id"] == response_headers["X-Request-ID"]


def chunked(data: bytes, chunk_bytes: int = 1000):
    async def generate():
        for start in range(0, len(data), chunk_bytes):
            yield data[start : start + chunk_bytes]

    return generate()


ERROR_CASES = [
    # (case id, method, path, headers, body, status, code, details field)
    ("unknown route", "GET", "/no/such/route", {}, None, 404, "RESOURCE_NOT_FOUND", None),
    ("wrong method", "POST", "/status/health", JSON, b"{}", 405, "INVALID_REQUEST", None),
    ("get on store", "GET", "/data/store/", {}, None, 405, "INVALID_REQUEST", None),
    (
        "text content type",
        "POST",
        "/data/store/",
        {"Content-Type": "text/plain"},
        b'{"key": "a", "value": 1}',
        415,
        "INVALID_REQUEST",
        "Content-Type",
    ),
    (
        "form content type",
        "POST",
        "/data/store/",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"key=a&value=1",
        415,
        "INVALID_REQUEST",
        "Content-Type",
    ),
    (
        "latin-1 charset",
        "POST",
        "/data/store/",
        {"Content-Type": "application/json; charset=latin-1"},
        b'{"key": "a", "value": 1}',
        415,
        "INVALID_REQUEST",
        "Content-Type",
    ),
    (
        "body over limit",
        "POST",
        "/data/store/",
        JSON,
        b'{"key": "a", "value": "' + b"x" * TEST_MAX_BODY_BYTES + b'"}',
        413,
        "INVALID_REQUEST",
        "body",
    ),
    ("empty body", "POST", "/data/store/", JSON, b"", 400, "INVALID_REQUEST", "body"),
    ("not json", "POST", "/data/store/", JSON, b"{key: 1}", 400, "INVALID_REQUEST", "body"),
    (
        "not utf-8",
        "POST",
        "/data/store/",
        JSON,
        b'{"key": "\xff\xfe", "value": 1}',
        400,
        "INVALID_REQUEST",
        "body",
    ),
    (
        "NaN literal",
        "POST",
        "/data/store/",
        JSON,
        b'{"key": "a", "value": NaN}',
        400,
        "INVALID_REQUEST",
        "body",
    ),
    (
        "Infinity literal",
        "POST",
        "/data/store/",
        JSON,
        b'{"key": "a", "value": -Infinity}',
        400,
        "INVALID_REQUEST",
        "body",
    ),
    ("top-level array", "POST", "/data/store/", JSON, b"[1, 2]", 400, "INVALID_REQUEST", "body"),
    ("top-level string", "POST", "/data/store/", JSON, b'"a"', 400, "INVALID_REQUEST", "body"),
    (
        "deep nesting",
        "POST",
        "/data/store/",
        JSON,
        b'{"key": "a", "value": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        400,
        "INVALID_REQUEST",
        "body",
    ),
    ("missing key param", "GET", "/data/retrieve/", {}, None, 400, "INVALID_REQUEST", "key"),
    ("empty key param", "GET", "/data/retrieve/?key=", {}, None, 400, "INVALID_REQUEST", "key"),
    (
        "key param twice",
        "GET",
        "/data/retrieve/?key=a&key=b",
        {},
        None,
        400,
        "INVALID_REQUEST",
        "key",
    ),
    (
        "missing key",
        "GET",
        "/data/retrieve/?key=absent",
        {},
        None,
        404,
        "RESOURCE_NOT_FOUND",
        None,
    ),
]


@pytest.mark.parametrize(
    "method, path, headers, body, status, code, field",
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_error_envelope_cases(client, method, path, headers, body, status, code, field):
    async with client.request(method, path, headers=headers, data=body) as response:
        reply = await response.json()

        assert response.status == status
        assert response.content_type == "application/json"
        assert_envelope(reply, response.headers, code)
        if field is not None:
            assert reply["error"]["details"]["field"] == field
            assert reply["error"]["details"]["issue"]


async def test_method_not_allowed_keeps_allow_header(client):
    async with client.post("/status/health", json={}) as response:
        reply = await response.json()

    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert reply["error"]["details"]["allowed_methods"] == ["GET", "HEAD"]


async def test_body_too_large_names_limit(client):
    body = b'{"key": "a", "value": "' + b"x" * TEST_MAX_BODY_BYTES + b'"}'
    async with client.post("/data/store/", data=body, headers=JSON) as response:
        reply = await response.json()

    assert response.status == 413
    assert reply["error"]["details"]["limit_bytes"] == TEST_MAX_BODY_BYTES
    assert str(TEST_MAX_BODY_BYTES) in reply["error"]["details"]["issue"]


async def test_chunked_body_too_large(client):
    body = b'{"key": "a", "value": "' + b"x" * (2 * TEST_MAX_BODY_BYTES) + b'"}'
    async with client.post("/data/store/", data=chunked(body), headers=JSON) as response:
        reply = await response.json()

    assert response.status == 413
    assert "Content-Length" not in response.request_info.headers
    assert_envelope(reply, response.headers, "INVALID_REQUEST")
    assert reply["error"]["details"]["limit_bytes"] == TEST_MAX_BODY_BYTES


async def test_deep_nesting_issue_says_nesting(client):
    body = b'{"key": "a", "value": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    async with client.post("/data/store/", data=body, headers=JSON) as response:
        reply = await response.json()

    assert response.status == 400
    assert "nested too deeply" in reply["error"]["details"]["issue"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/status/health"),
        ("GET", "/info/version"),
        ("GET", "/no/such/route"),
        ("DELETE", "/status/health"),
        ("POST", "/data/store/"),
    ],
)
async def test_request_id_generated_on_every_response(client, method, path):
    async with client.request(method, path) as response:
        await response.read()

    assert GENERATED_ID_PATTERN.fullmatch(response.headers["X-Request-ID"])


async def test_request_ids_differ_between_requests(client):
    ids = set()
    for _ in range(5):
        async with client.get("/status/health") as response:
            ids.add(response.headers["X-Request-ID"])

    assert len(ids) == 5


@pytest.mark.parametrize("client_id", ["trace-42", "A.b_c-9", "x" * 64])
async def test_request_id_from_client_kept(client, client_id):
    async with client.get("/no/such/route", headers={"X-Request-ID": client_id}) as response:
        reply = await response.json()

    assert response.headers["X-Request-ID"] == client_id
    assert reply["request_id"] == client_id


@pytest.mark.parametrize("client_id", ["", "x" * 65, "has space", "semi;colon", "slash/id"])
async def test_request_id_from_client_replaced(client, client_id):
    async with client.get("/status/health", headers={"X-Request-ID": client_id}) as response:
        await response.read()

    assert GENERATED_ID_PATTERN.fullmatch(response.headers["X-Request-ID"])


async def test_internal_error_hides_details(client, node: FakeNode, caplog):
    node.data.store_exception = RuntimeError("database password hunter2 in /srv/secret")

    with caplog.at_level(logging.ERROR, logger="voxanode.api.middlewares"):
        async with client.post("/data/store/", json={"key": "a", "value": 1}) as response:
            reply = await response.json()
            text = await response.text()

    assert response.status == 500
    assert_envelope(reply, response.headers, "INTERNAL_ERROR")
    assert "hunter2" not in text
    assert "/srv/secret" not in text
    assert "RuntimeError" not in text
    assert reply["request_id"] in reply["error"]["message"]

    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1
    assert reply["request_id"] in logged[0].getMessage()
    assert "hunter2" in str(logged[0].exc_info[1])


async def test_internal_error_counts_as_error(client, node: FakeNode):
    node.data.store_exception = RuntimeError("boom")
    async with client.post("/data/store/", json={"key": "a", "value": 1}) as response:
        assert response.status == 500

    async with client.get("/info/program_stats") as response:
        statistics = (await response.json())["statistics"]

    assert statistics["requests_processed"] == 1
    assert statistics["error_count"] == 1


async def test_program_stats_counts_requests(client):
    for _ in range(3):
        async with client.get("/status/health") as response:
            assert response.status == 200
    for _ in range(2):
        async with client.get("/no/such/route") as response:
            assert response.status == 404

    async with client.get("/info/program_stats") as response:
        statistics = (await response.json())["statistics"]

    # The stats request itself is counted after its reply is built.
    assert statistics["requests_processed"] == 5
    assert statistics["error_count"] == 2
    assert statistics["success_rate_percent"] == 60.0
    assert statistics["average_response_time_ms"] > 0

    async with client.get("/info/program_stats") as response:
        statistics = (await response.json())["statistics"]

    assert statistics["requests_processed"] == 6
    assert statistics["error_count"] == 2


async def test_program_stats_before_any_request(client):
    async with client.get("/info/program_stats") as response:
        statistics = (await response.json())["statistics"]

    assert statistics["requests_processed"] == 0
    assert statistics["error_count"] == 0
    assert statistics["success_rate_percent"] == 100.0
    assert statistics["average_response_time_ms"] == 0.0


async def test_request_logged_at_debug(client, caplog):
    with caplog.at_level(logging.DEBUG, logger="voxanode.api.middlewares"):
        async with client.get("/no/such/route") as response:
            request_id = response.headers["X-Request-ID"]

    lines = [record.getMessage() for record in caplog.records]
    matching = [line for line in lines if request_id in line]
    assert len(matching) == 1
    assert "method=GET" in matching[0]
    assert "path=/no/such/route" in matching[0]
    assert "status=404" in matching[0]


@pytest.mark.parametrize("target", [b"/proxy/web/", b"example.com:443"])
async def test_connect_is_not_allowed(client, target):
    # A plain socket sends the request target exactly as written.
    reader, writer = await asyncio.open_connection(client._base_url.host, client._base_url.port)
    try:
        writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}

    assert lines[0].startswith("HTTP/1.1 405 ")
    assert headers["allow"] == ""
    envelope = json.loads(body)
    assert envelope["error"]["code"] == "INVALID_REQUEST"
    assert envelope["error"]["details"] == {"method": "CONNECT", "allowed_methods": []}
    assert "/proxy/APP/PATH" in envelope["error"]["message"]
    assert envelope["request_id"] == headers["x-request-id"]
