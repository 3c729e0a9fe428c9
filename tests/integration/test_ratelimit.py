"""API rate limits of a real daemon, driven past each limit over HTTP from loopback.

Each test starts one node with small limits given as flags after the fast test flags,
so they override the high limits there. Requests come from chosen 127.x source
addresses, because each client address has its own budget.
"""

import http.client
import json
import time
import urllib.parse
from typing import Any

import pytest

from helpers import ApiResponse

CLIENT_ADDRESS = "127.0.0.1"
OTHER_CLIENT_ADDRESS = "127.0.0.77"
HTTP_TIMEOUT_SECONDS = 10.0
DEFAULT_LIMIT = 5
DATA_LIMIT = 8
DEPLOYMENT_LIMIT = 2
RESET_LIMIT = 3
RESET_WINDOW_SECONDS = 5
SMALL_LIMIT_ARGS = (
    "--rate-limit-default", f"{DEFAULT_LIMIT}/minute",
    "--rate-limit-data", f"{DATA_LIMIT}/minute",
    "--rate-limit-deployments", f"{DEPLOYMENT_LIMIT}/minute",
)


def call(
    node, method: str, path: str, body: Any = None, *, source: str = CLIENT_ADDRESS
) -> ApiResponse:
    """Send one request to the node's API from `source`; a non-None `body` is sent as JSON."""
    url = urllib.parse.urlsplit(node.api_url)
    connection = http.client.HTTPConnection(
        url.hostname, url.port, timeout=HTTP_TIMEOUT_SECONDS, source_address=(source, 0)
    )
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        return ApiResponse(response.status, json.loads(raw), response.headers)
    finally:
        connection.close()


def rate_headers(headers) -> tuple[int, int, int]:
    """Return the X-RateLimit Limit, Remaining and Reset values."""
    return (
        int(headers["X-RateLimit-Limit"]),
        int(headers["X-RateLimit-Remaining"]),
        int(headers["X-RateLimit-Reset"]),
    )


def spend(node, path: str, count: int, *, source: str = CLIENT_ADDRESS) -> list[int]:
    """GET `path` `count` times, expecting 2xx-4xx below 429, and return the Remaining values."""
    remaining = []
    for _ in range(count):
        status, body, headers = call(node, "GET", path, source=source)
        assert status != 429, body
        remaining.append(rate_headers(headers)[1])
    return remaining


def assert_rate_limited(response: ApiResponse, category: str, limit_text: str) -> int:
    """Check a 429 reply and return its Retry-After seconds."""
    status, body, headers = response
    assert status == 429, body
    assert body["success"] is False
    assert body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert body["error"]["details"]["category"] == category
    assert body["error"]["details"]["limit"] == limit_text
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1
    assert body["error"]["details"]["retry_after_seconds"] == retry_after
    assert rate_headers(headers)[1] == 0
    return retry_after


@pytest.fixture
def node(devnet_factory):
    return devnet_factory(1, extra_args=SMALL_LIMIT_ARGS).nodes[0]


def test_default_limit_counts_down_then_rejects(node):
    started = time.time()

    seen = []
    for _ in range(DEFAULT_LIMIT):
        status, body, headers = call(node, "GET", "/info/version")
        assert status == 200, body
        seen.append(rate_headers(headers))

    assert [limit for limit, _, _ in seen] == [DEFAULT_LIMIT] * DEFAULT_LIMIT
    assert [remaining for _, remaining, _ in seen] == [4, 3, 2, 1, 0]
    reset = seen[0][2]
    assert all(entry[2] == reset for entry in seen)
    assert started < reset <= started + 60 + 1

    rejected = call(node, "GET", "/info/version")
    retry_after = assert_rate_limited(rejected, "default", "5/minute")
    assert retry_after <= 60
    assert rate_headers(rejected.headers) == (DEFAULT_LIMIT, 0, reset)
    assert rejected.body["request_id"] == rejected.headers["X-Request-ID"]


def test_errors_count_in_default(node):
    not_found = call(node, "GET", "/no/such/route")
    wrong_method = call(node, "DELETE", "/info/version")

    assert not_found.status == 404
    assert rate_headers(not_found.headers)[:2] == (DEFAULT_LIMIT, 4)
    assert wrong_method.status == 405
    assert rate_headers(wrong_method.headers)[:2] == (DEFAULT_LIMIT, 3)


def test_data_limit_separate_from_default(node):
    spend(node, "/info/version", DEFAULT_LIMIT)

    stored = call(node, "POST", "/data/store/", {"key": "rate-limit-key", "value": 1, "replicas": 1})
    assert stored.status == 200, stored.body
    assert rate_headers(stored.headers)[:2] == (DATA_LIMIT, DATA_LIMIT - 1)
    remaining = spend(node, "/data/retrieve/?key=rate-limit-key", DATA_LIMIT - 1)
    assert remaining == list(range(DATA_LIMIT - 2, -1, -1))

    rejected = call(node, "GET", "/data/retrieve/?key=rate-limit-key")
    assert_rate_limited(rejected, "data", "8/minute")


def test_status_routes_never_limited(node):
    spend(node, "/info/version", DEFAULT_LIMIT)

    for path in ["/status/health", "/status/system"] * 15:
        status, body, headers = call(node, "GET", path)
        assert status == 200, body
        assert "X-RateLimit-Limit" not in headers
        assert "X-RateLimit-Remaining" not in headers


def test_other_client_address_has_own_budget(node):
    spend(node, "/info/version", DEFAULT_LIMIT, source=CLIENT_ADDRESS)
    assert call(node, "GET", "/info/version", source=CLIENT_ADDRESS).status == 429

    remaining = spend(node, "/info/version", DEFAULT_LIMIT, source=OTHER_CLIENT_ADDRESS)

    assert remaining == [4, 3, 2, 1, 0]
    rejected = call(node, "GET", "/info/version", source=OTHER_CLIENT_ADDRESS)
    assert_rate_limited(rejected, "default", "5/minute")


def test_deployments_count_failed_validation(node):
    # Every deployment request counts, also one whose app spec is rejected.
    for expected_remaining in [1, 0]:
        status, body, headers = call(node, "POST", "/apps/add_app/", {"name": ""})
        assert status == 400, body
        assert body["error"]["code"] == "INVALID_REQUEST"
        assert rate_headers(headers)[:2] == (DEPLOYMENT_LIMIT, expected_remaining)

    rejected = call(node, "POST", "/apps/add_app/", {"name": ""})
    assert_rate_limited(rejected, "deployments", "2/minute")

    listed = call(node, "GET", "/apps/list_apps/")
    assert listed.status == 200, listed.body
    assert rate_headers(listed.headers)[:2] == (DEFAULT_LIMIT, DEFAULT_LIMIT - 1)


def test_window_resets(devnet_factory):
    window_args = ("--rate-limit-default", f"{RESET_LIMIT}/{RESET_WINDOW_SECONDS}seconds")
    node = devnet_factory(1, extra_args=window_args).nodes[0]

    remaining = spend(node, "/info/version", RESET_LIMIT)
    assert remaining == [2, 1, 0]
    rejected = call(node, "GET", "/info/version")
    retry_after = assert_rate_limited(rejected, "default", "3/5 seconds")
    assert retry_after <= RESET_WINDOW_SECONDS
    reset = rate_headers(rejected.headers)[2]

    time.sleep(max(0.0, reset - time.time()) + 0.1)
    status, body, headers = call(node, "GET", "/info/version")

    assert status == 200, body
    limit, remaining_after_reset, new_reset = rate_headers(headers)
    assert (limit, remaining_after_reset) == (RESET_LIMIT, RESET_LIMIT - 1)
    assert new_reset > reset
