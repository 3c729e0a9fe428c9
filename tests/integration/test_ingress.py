"""App ingress on a real 3-node network with real Docker containers of the test image.

The network is shared by the tests of this module, which run in file order: an app
replies through `/proxy/` of every node and through the host-routed ingress port, HEAD
and the app's own 5xx replies pass through without ejecting instances, requests
spread over its instances (counted in each container's own access log), a container
killed with `docker kill` during a bounded loop of requests costs none of them, an
app without healthy instances gets 503, and get_app_status counts the requests sent
through every node. Every container the nodes made is removed at the end, found by
its node id label.

The test image's busybox httpd logs one `response:STATUS` line per request to stderr,
without the URL, so the spread test uses an app without a health check: then every
logged request is one the test sent.
"""

import asyncio
import hashlib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import psutil
import pytest

from app_network import APP_LABEL, app_devnet, ingress_url
from event_stream import EventStream
from helpers import (
    TEST_IMAGE,
    TEST_IMAGE_BYTES_PATH,
    TEST_IMAGE_HTTP_PORT,
    TEST_IMAGE_WEBSOCKET_PORT,
    api_get,
    api_post,
    api_request,
    counting_lines_sha256,
    wait_for,
)

RUNNING_SECONDS = 90
HTTPD = {"ports": [{"container_port": 8080}], "resources": {"memory": "64m", "cpu": "0.2"}}
INDEX_TEXT = "voxanode-test httpd index"
# busybox httpd -v logs this for each request it replied to.
ACCESS_LOG_MARK = "response:"
SPREAD_REQUESTS = 60
KILL_AT_REQUEST = 20
REQUESTS_AFTER_KILL = 300
KILL_LOOP_MAX_REQUESTS = 3000
LOG_FLUSH_SECONDS = 1.0
REQUEST_TIMEOUT_SECONDS = 10
LARGE_RESPONSE_BYTES = 50 * 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024
# Growth of the forwarding node's resident memory allowed while 50 MiB pass through
# it: well below the body, so a node that buffered the body fails the test.
MAX_RSS_GROWTH_BYTES = 20 * 1024 * 1024
RSS_SAMPLE_SECONDS = 0.02
LARGE_RESPONSE_TIMEOUT_SECONDS = 120
WEBSOCKET_CLOSE_CODE = 4321
# More requests in a row than the default ingress_circuit_failures (5) per instance of
# a 3-replica app, so that counting them as failures would open every circuit.
REQUESTS_PAST_CIRCUIT_THRESHOLD = 18


def docker(*args: str) -> str:
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, f"docker {' '.join(args)} failed: {completed.stderr.strip()}"
    return completed.stdout + completed.stderr


def containers_of(app_id: str) -> list[str]:
    return docker("ps", "-q", "--filter", f"label={APP_LABEL}={app_id}").split()


def access_log_count(container_id: str) -> int:
    """Return the requests a container's httpd logged so far."""
    return docker("logs", container_id).count(ACCESS_LOG_MARK)


@pytest.fixture(scope="module")
def network(tmp_path_factory, test_image):
    with app_devnet(tmp_path_factory.mktemp("ingress-devnet"), ingress=True) as devnet:
        yield devnet


def deploy(node, **spec) -> str:
    body = {"name": spec.pop("name"), "image": TEST_IMAGE, **HTTPD, **spec}
    status, answer, _ = api_post(node.api_url, "/apps/add_app/", body, timeout=120)
    assert status == 200, answer
    return answer["app_id"]


def app_status(node, app_id: str) -> dict:
    status, body, _ = api_get(node.api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    return body


def wait_healthy(nodes, app_id: str, replicas: int) -> dict:
    """Wait until every node's status shows `replicas` running, healthy instances."""

    def ready():
        for node in nodes:
            counts = app_status(node, app_id)["replicas"]
            if not counts["running"] == counts["healthy"] == replicas:
                return counts
        return True

    result = wait_for(ready, RUNNING_SECONDS)
    assert result is True, f"app {app_id} did not reach {replicas} healthy instances: {result}"
    return app_status(nodes[0], app_id)


def proxy_get(node, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(node.api_url + path, timeout=REQUEST_TIMEOUT_SECONDS) as reply:
            return reply.status, reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def front(network) -> str:
    """An app of 3 replicas without a health check, one on each node."""
    a, _, _ = network.nodes
    app_id = deploy(a, name="front", replicas=3)
    body = wait_healthy(network.nodes, app_id, 3)
    assert len({instance["node_id"] for instance in body["instances"]}) == 3
    return app_id


def test_app_answers_through_every_node(network, front):
    for node in network.nodes:
        for path in ("/proxy/front/", f"/proxy/{front}/index.html", "/proxy/front"):
            status, text = proxy_get(node, path)
            assert status == 200, (node.api_url, path, text)
            assert INDEX_TEXT in text

    status, text = proxy_get(network.nodes[0], "/proxy/front/missing.html")
    assert status == 404, "the app's own 404 passes through"
    assert INDEX_TEXT not in text


def raw_request(base_url: str, request: str) -> tuple[str, bytes]:
    """Send one request with `Connection: close` on a plain socket; return its head and body bytes."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_SECONDS) as sock:
        sock.sendall(request.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def metric_value(node, series: str, absent: float | None = None) -> float:
    """Return the value of one series of the node's /metrics, or `absent` when given and missing."""
    with urllib.request.urlopen(node.api_url + "/metrics", timeout=REQUEST_TIMEOUT_SECONDS) as reply:
        text = reply.read().decode()
    lines = [line for line in text.splitlines() if line.startswith(series + " ")]
    if not lines and absent is not None:
        return absent
    (line,) = lines
    return float(line.removeprefix(series + " "))


def test_head_returns_status_and_headers_only(network, front):
    """busybox httpd sends a body after its HEAD reply; the client gets the head alone."""
    c = network.nodes[2]
    status, index = proxy_get(c, "/proxy/front/index.html")
    assert status == 200
    request = "HEAD /proxy/front/index.html HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n"

    for _ in range(REQUESTS_PAST_CIRCUIT_THRESHOLD):
        head, body = raw_request(c.api_url, request)
        assert head.startswith("HTTP/1.1 200 OK\r\n"), head
        assert f"\r\nContent-Length: {len(index.encode())}" in head, head
        assert "\r\nEtag: " in head or "\r\nETag: " in head, head
        assert body == b""

    missing, body = raw_request(c.api_url, request.replace("index.html", "missing.html"))
    assert missing.startswith("HTTP/1.1 404 Not Found\r\n"), missing
    assert body == b""
    assert metric_value(c, f'voxanode_ingress_circuits{{app="{front}",state="open"}}') == 0
    assert metric_value(c, f'voxanode_ingress_upstream_failures_total{{app="{front}"}}') == 0


def test_app_5xx_keeps_instances_in_rotation(network, front):
    """busybox httpd replies 501 to DELETE: the app's error passes and no instance is ejected."""
    c = network.nodes[2]
    five_xx_series = f'voxanode_ingress_requests_total{{app="{front}",status_class="5xx"}}'
    five_xx_before = metric_value(c, five_xx_series, absent=0.0)
    for _ in range(REQUESTS_PAST_CIRCUIT_THRESHOLD):
        status, body, _ = api_request("DELETE", c.api_url, "/proxy/front/index.html")
        assert status == 501
        assert "Not Implemented" in body, "the app's own reply, not the proxy's"

    for _ in range(3):
        status, text = proxy_get(c, "/proxy/front/")
        assert status == 200, text
    assert metric_value(c, f'voxanode_ingress_circuits{{app="{front}",state="open"}}') == 0
    five_xx = metric_value(c, five_xx_series) - five_xx_before
    assert five_xx == REQUESTS_PAST_CIRCUIT_THRESHOLD, "the app's 5xx still count as errors"


def test_ingress_port_routes_by_host_name(network, front):
    a = network.nodes[0]
    base_url = ingress_url(a)

    status, body, _ = api_get(base_url, "/index.html", headers={"Host": "front.apps.example"})
    assert status == 200
    assert INDEX_TEXT in body

    # urllib sends the URL's address as Host.
    status, body, _ = api_get(base_url, "/index.html")
    assert status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"
    address = base_url.removeprefix("http://")
    assert body["error"]["message"].startswith(f"Host {address} is an IP address, but this ingress port")
    assert "send Host: APP or Host: APP.DOMAIN" in body["error"]["message"]


def test_requests_spread_over_instances(network, front):
    a, _, _ = network.nodes
    containers = containers_of(front)
    assert len(containers) == 3
    before = {container: access_log_count(container) for container in containers}

    for _ in range(SPREAD_REQUESTS):
        status, _ = proxy_get(a, "/proxy/front/")
        assert status == 200
    time.sleep(LOG_FLUSH_SECONDS)

    served = {container: access_log_count(container) - before[container] for container in containers}
    assert sum(served.values()) == SPREAD_REQUESTS, served
    # Round robin over three instances gives each a third.
    assert sorted(served.values()) == [SPREAD_REQUESTS // 3] * 3, served


def test_killed_container_loses_no_request(network, front):
    _, b, _ = network.nodes
    victim = containers_of(front)[0]
    victim_instance = docker(
        "inspect", "--format", '{{index .Config.Labels "io.voxanode.instance-id"}}', victim
    ).strip()
    statuses: list[int] = []
    killed_at: list[int] = []

    def kill():
        docker("kill", victim)
        killed_at.append(len(statuses))

    killer = threading.Thread(target=kill)
    with EventStream(b.api_url, "?types=load_rebalanced") as events:
        # The loop is bounded: it ends REQUESTS_AFTER_KILL requests after the kill
        # returned, and after KILL_LOOP_MAX_REQUESTS requests in any case.
        for index in range(KILL_LOOP_MAX_REQUESTS):
            if index == KILL_AT_REQUEST:
                killer.start()
            statuses.append(proxy_get(b, "/proxy/front/")[0])
            if killed_at and len(statuses) >= killed_at[0] + REQUESTS_AFTER_KILL:
                break
        killer.join()
        removed = events.wait_for(
            "load_rebalanced", 20, instance_id=victim_instance, reason="ingress_rotation", change="removed"
        )

    assert killed_at, "docker kill did not return"
    assert len(statuses) == killed_at[0] + REQUESTS_AFTER_KILL
    assert statuses == [200] * len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert removed is not None, "node b published no rotation change for the killed instance"
    assert removed["app_id"] == front
    # Requests did reach the dead instance and were retried on the others.
    assert upstream_failures(b, front) > 0


def upstream_failures(node, app_id: str) -> float:
    with urllib.request.urlopen(node.api_url + "/metrics", timeout=REQUEST_TIMEOUT_SECONDS) as reply:
        text = reply.read().decode()
    prefix = f'voxanode_ingress_upstream_failures_total{{app="{app_id}"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


def test_large_response_streams_through_other_node(network):
    a, b, c = network.nodes
    app_id = deploy(a, name="bulk", replicas=1)
    body = wait_healthy(network.nodes, app_id, 1)
    instance_node = body["instances"][0]["node_id"]
    proxy_node = next(node for node in (a, b, c) if node.fetch_node_id() != instance_node)
    url = f"{proxy_node.api_url}/proxy/bulk{TEST_IMAGE_BYTES_PATH}?n={LARGE_RESPONSE_BYTES}"
    process = psutil.Process(proxy_node.pid)
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample_rss():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(RSS_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    try:
        received, digest = asyncio.run(download(url))
    finally:
        done.set()
        sampler.join()

    assert received == LARGE_RESPONSE_BYTES
    assert digest == counting_lines_sha256(LARGE_RESPONSE_BYTES)
    assert peak[0] - baseline < MAX_RSS_GROWTH_BYTES, f"node RSS grew by {(peak[0] - baseline) / 2**20:.1f} MiB"


def test_client_leaving_mid_stream_is_not_an_error(network):
    """A client that stops reading and closes during a long download leaves no 500."""
    a = network.nodes[0]
    wait_healthy(network.nodes, deploy(a, name="dropper", replicas=1), 1)
    host, port = a.api_url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(f"GET /proxy/dropper{TEST_IMAGE_BYTES_PATH}?n=200000000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        # Let the node fill the socket buffers and block on writing, then leave.
        time.sleep(3)
    time.sleep(1)
    assert "unhandled error" not in a.log_tail(200)
    status, _ = proxy_get(a, "/proxy/dropper/")
    assert status == 200


async def download(url: str) -> tuple[int, str]:
    """Read a response in chunks; return its size and SHA-256."""
    digest = hashlib.sha256()
    received = 0
    timeout = aiohttp.ClientTimeout(total=LARGE_RESPONSE_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                digest.update(chunk)
                received += len(chunk)
    return received, digest.hexdigest()


def test_websocket_echo_through_proxy(network):
    a, b, _ = network.nodes
    ports = [{"container_port": TEST_IMAGE_HTTP_PORT}, {"container_port": TEST_IMAGE_WEBSOCKET_PORT}]
    app_id = deploy(a, name="echo", replicas=1, ports=ports, ingress={"port": TEST_IMAGE_WEBSOCKET_PORT})
    wait_healthy(network.nodes, app_id, 1)

    text, binary, close_code = asyncio.run(echo_through(b.api_url.replace("http://", "ws://") + "/proxy/echo/chat"))

    assert text == "hello through the proxy"
    assert binary == bytes(range(256))
    assert close_code == WEBSOCKET_CLOSE_CODE
    (container,) = containers_of(app_id)
    expected = f"closed with code {WEBSOCKET_CLOSE_CODE}"
    assert wait_for(lambda: expected in docker("logs", container), 10) is True, "the close code did not reach the app"


async def echo_through(url: str) -> tuple[str, bytes, int]:
    async with aiohttp.ClientSession() as session:
        websocket = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=10))
        await websocket.send_str("hello through the proxy")
        text = await websocket.receive(timeout=REQUEST_TIMEOUT_SECONDS)
        await websocket.send_bytes(bytes(range(256)))
        binary = await websocket.receive(timeout=REQUEST_TIMEOUT_SECONDS)
        await websocket.close(code=WEBSOCKET_CLOSE_CODE, message=b"done")
    return text.data, binary.data, websocket.close_code


def test_unhealthy_app_gets_503(network):
    a, b, c = network.nodes
    check = {"type": "http", "path": "/no-such-page", "interval_seconds": 1, "timeout_seconds": 0.5, "retries": 1}
    app_id = deploy(a, name="sick", replicas=2, health_check=check)

    def unhealthy():
        counts = app_status(b, app_id)["replicas"]
        return (counts["running"] == counts["unhealthy"] == 2) or counts

    assert wait_for(unhealthy, RUNNING_SECONDS) is True

    for node in (a, b, c):
        status, body, headers = api_get(node.api_url, "/proxy/sick/")
        assert status == 503, body
        assert body["success"] is False
        assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert headers["Retry-After"] == "2"

    metrics = app_status(c, app_id)["metrics"]
    assert metrics["total_requests"] == 3
    assert metrics["error_rate_percent"] == 100.0

    status, body, _ = api_post(a.api_url, "/apps/add_stop_app/", {"app_id": app_id, "force": True}, timeout=60)
    assert status == 200, body

    def stopped_reply():
        reply = api_get(b.api_url, "/proxy/sick/")
        return reply.body["error"]["details"].get("app_status") == "stopped" or reply

    assert wait_for(stopped_reply, 10) is True
    status, body, headers = api_get(b.api_url, "/proxy/sick/")
    assert status == 503
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert body["error"]["message"].startswith("app sick is stopped")
    assert "try again" not in body["error"]["message"]
    assert "Retry-After" not in headers

    status, body, _ = api_get(b.api_url, "/proxy/never-deployed/")
    assert status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"


def test_status_metrics_count_requests_of_every_node(network):
    a, b, c = network.nodes
    app_id = deploy(a, name="counted", replicas=2)
    wait_healthy(network.nodes, app_id, 2)
    sent = {a: 7, b: 11, c: 13}

    for node, count in sent.items():
        for _ in range(count):
            status, _ = proxy_get(node, "/proxy/counted/index.html")
            assert status == 200
    status, _, _ = api_request("POST", c.api_url, "/proxy/counted/form", body={"x": 1})
    assert status in (404, 405, 501), "busybox httpd answers a POST to a file with a 4xx or 501"
    total = sum(sent.values()) + 1
    error_rate = 100.0 / total if status >= 500 else 0.0

    for node in network.nodes:
        metrics = app_status(node, app_id)["metrics"]
        assert metrics["total_requests"] == total, (node.api_url, metrics)
        assert metrics["error_rate_percent"] == pytest.approx(error_rate, abs=0.001)
        assert metrics["avg_response_time_ms"] > 0
        assert metrics["p95_response_time_ms"] > 0

    with urllib.request.urlopen(a.api_url + "/metrics", timeout=REQUEST_TIMEOUT_SECONDS) as reply:
        text = reply.read().decode()
    line = f'voxanode_ingress_requests_total{{app="{app_id}",status_class="2xx"}} {float(sent[a])}'
    assert line in text
    api_routes = {
        line.split('route="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("voxanode_http_request")
    }
    assert api_routes, "the API's own requests are counted"
    assert not any(route.startswith("/proxy/") for route in api_routes), api_routes
    assert f'voxanode_ingress_request_duration_seconds_count{{app="{app_id}"}} {float(sent[a])}' in text
