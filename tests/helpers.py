"""Small blocking JSON-over-HTTP client for tests that talk to node APIs.

`api_get` and `api_post` return an ApiResponse that unpacks as (status, body, headers).
HTTP error statuses are returned, not raised, so tests can assert on 4xx/5xx replies.
The body is the parsed JSON, or the text when the reply is not JSON.
"""

import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator, Mapping, NamedTuple

DEFAULT_TIMEOUT_SECONDS = 10.0
# The image scripts/build-test-image makes from busybox-static, for the app tests.
TEST_IMAGE = "voxanode-test/httpd:latest"
# What the test image serves: busybox httpd on the HTTP port, where GET
# TEST_IMAGE_BYTES_PATH?n=N streams the first N bytes of the counting lines, and a
# WebSocket echo server on any path of the WebSocket port.
TEST_IMAGE_HTTP_PORT = 8080
TEST_IMAGE_WEBSOCKET_PORT = 8081
TEST_IMAGE_BYTES_PATH = "/cgi-bin/bytes"
COUNTING_LINE_DIGITS = 15
COUNTING_LINES_PER_CHUNK = 65536
# Daemon flags for tests: no authentication, intervals short enough that republish,
# sweeps, join retries and routing refreshes happen within a test's time, and API rate
# limits so high that no test is throttled. Flags given after these override them.
FAST_DAEMON_ARGS = (
    "--dev",
    "--republish-interval-seconds", "2",
    "--rpc-timeout-seconds", "1",
    "--sweep-interval-seconds", "1",
    "--join-retry-seconds", "1",
    "--refresh-interval-seconds", "5",
    "--rate-limit-default", "100000/minute",
    "--rate-limit-deployments", "100000/minute",
    "--rate-limit-data", "100000/minute",
)


class ApiResponse(NamedTuple):
    """Status code, parsed body and headers of one API reply."""

    status: int
    body: Any
    headers: Mapping[str, str]


def build_url(base_url: str, path: str, params: Mapping[str, Any] | None = None) -> str:
    """Join a base URL, a path and query parameters (None values are left out)."""
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    query = {name: value for name, value in (params or {}).items() if value is not None}
    if query:
        url += "?" + urllib.parse.urlencode(query, doseq=True)
    return url


def api_request(
    method: str,
    base_url: str,
    path: str,
    body: Any = None,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> ApiResponse:
    """Send one request; a non-None `body` is sent as JSON."""
    data = None
    request_headers = {"Accept": "application/json", **(headers or {})}
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        request_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(build_url(base_url, path, params), data=data, headers=request_headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, reply_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, reply_headers = exc.code, exc.read(), exc.headers
    text = raw.decode("utf-8", errors="replace")
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text
    # The headers stay an http.client.HTTPMessage, whose lookups ignore case.
    return ApiResponse(status, parsed, reply_headers)


def api_get(base_url: str, path: str, *, headers: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS, **params: Any) -> ApiResponse:
    """GET `path` with `params` as the query string."""
    return api_request("GET", base_url, path, params=params, headers=headers, timeout=timeout)


def api_post(base_url: str, path: str, body: Any, *, headers: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> ApiResponse:
    """POST `body` as JSON to `path`."""
    return api_request("POST", base_url, path, body=body, headers=headers, timeout=timeout)


def wait_for(condition, timeout: float, interval: float = 0.5):
    """Call `condition` until it returns True or `timeout` seconds pass.

    Returns True, or the last value the condition returned, for the failure message.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last is True:
            return True
        time.sleep(interval)
    return last


def counting_lines(size_bytes: int) -> Iterator[bytes]:
    """Yield, in chunks, the `size_bytes` bytes that the test image's bytes CGI script sends.

    Line i (from 0) is i in decimal with leading zeros to 15 digits, then a newline, so
    every line is 16 bytes. The content is those lines cut after `size_bytes` bytes.
    """
    line_bytes = COUNTING_LINE_DIGITS + 1
    full_lines, rest_bytes = divmod(size_bytes, line_bytes)
    line_format = b"%0" + str(COUNTING_LINE_DIGITS).encode() + b"d\n"
    for first in range(0, full_lines, COUNTING_LINES_PER_CHUNK):
        last = min(first + COUNTING_LINES_PER_CHUNK, full_lines)
        yield b"".join(line_format % number for number in range(first, last))
    if rest_bytes:
        yield (line_format % full_lines)[:rest_bytes]


def counting_lines_sha256(size_bytes: int) -> str:
    """Return the hex SHA-256 of `counting_lines(size_bytes)`."""
    digest = hashlib.sha256()
    for chunk in counting_lines(size_bytes):
        digest.update(chunk)
    return digest.hexdigest()
