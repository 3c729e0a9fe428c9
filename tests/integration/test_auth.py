"""Bearer token authentication on real daemons, started without --dev.

The module shares one two-node network whose nodes run with `--no-dev` after the fast
test flags (the later flag wins) and log at DEBUG, so the log check at the end reads
every line the nodes wrote. Tokens are created and revoked with the real
`voxanode token` command against the nodes' data directories while the nodes run.
The tests run in file order; each creates the tokens it needs.
"""

import asyncio
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from helpers import FAST_DAEMON_ARGS, api_get, api_post, api_request, wait_for
from voxanode.api.internal_auth import sign_request
from voxanode.devnet import Devnet, allocate_free_block
from voxanode.identity import Identity

REPO_ROOT = Path(__file__).resolve().parents[2]
SECURED_ARGS = ("--no-dev", "--log-level", "DEBUG")
APP_ARGS = (
    "--apps-reconcile-interval-seconds",
    "1",
    "--apps-sync-interval-seconds",
    "3",
    "--apps-stop-timeout-seconds",
    "2",
)
HTTPD = {"ports": [{"container_port": 8080}], "resources": {"memory": "64m", "cpu": "0.2"}}
NODE_LABEL = "io.voxanode.node-id"
APP_RUNNING_SECONDS = 60
COMMAND_TIMEOUT_SECONDS = 60
CONVERGE_SECONDS = 30
# The node checks the token file at most once a second while known tokens arrive; the
# rest is slack for a busy machine.
TOKEN_FILE_CHECK_WAIT_SECONDS = 3.0
BEARER_CHALLENGE = 'Bearer realm="voxanode"'
INVALID_TOKEN_CHALLENGE = 'Bearer realm="voxanode", error="invalid_token"'


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    completed = subprocess.run(
        ["docker", "info"], capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
    )
    return completed.returncode == 0


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    block = allocate_free_block(3, random.Random())
    devnet = Devnet(
        2,
        tmp_path_factory.mktemp("auth-devnet"),
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=[*FAST_DAEMON_ARGS, *APP_ARGS, *SECURED_ARGS],
    )
    devnet.start()
    try:
        yield devnet
    finally:
        devnet.stop()
        remove_containers(devnet)


def remove_containers(devnet: Devnet) -> None:
    """Remove every container the nodes made, found by the node id label."""
    if not docker_available():
        return
    for node in devnet.nodes:
        node_id = Identity.load_or_create(node.data_dir).node_id
        listed = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        leftovers = listed.stdout.split()
        if leftovers:
            subprocess.run(
                ["docker", "rm", "-f", *leftovers],
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )


@pytest.fixture(scope="module")
def issued_tokens() -> list[str]:
    """Every token the module created, for the log check at the end."""
    return []


def token_command(node, *args: str) -> subprocess.CompletedProcess:
    """Run `voxanode token ARGS` against the node's data directory."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "voxanode", "token", *args, "--data-dir", str(node.data_dir)]
    return subprocess.run(
        command,
        cwd=node.data_dir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def create_token(node, issued_tokens: list[str], scope: str, name: str) -> str:
    completed = token_command(node, "create", "--scope", scope, "--name", name)
    assert completed.returncode == 0, completed.stderr
    token = completed.stdout.splitlines()[-1]
    issued_tokens.append(token)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def store(node, key: str, token: str | None = None, replicas: int = 2):
    headers = bearer(token) if token else None
    body = {"key": key, "value": {"n": 1}, "ttl": 600, "replicas": replicas}
    return api_post(node.api_url, "/data/store/", body, headers=headers)


def assert_unauthenticated(reply, challenge: str) -> None:
    status, body, headers = reply
    assert status == 401, body
    assert body["success"] is False
    assert body["error"]["code"] == "AUTHENTICATION_REQUIRED"
    assert "voxanode token create" in body["error"]["message"]
    assert body["request_id"] == headers["X-Request-ID"]
    assert headers["WWW-Authenticate"] == challenge




def test_start_warns_without_tokens(network):
    for node in network.nodes:
        log = node.log_path.read_text(encoding="utf-8")
        warnings = [line for line in log.splitlines() if " WARNING voxanode.daemon " in line]
        assert len(warnings) == 1, warnings
        assert "no active token" in warnings[0]
        assert "voxanode token create" in warnings[0]
        assert "authentication is off" not in log


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/status/health", "/status/health/"])
def test_health_open_without_token(network, method, path):
    status, _, _ = api_request(method, network.nodes[0].api_url, path)

    assert status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/status/system"),
        ("HEAD", "/status/system"),
        ("GET", "/info/version"),
        ("GET", "/data/discover_nodes/"),
        ("GET", "/data/retrieve/?key=k"),
        ("POST", "/data/store/"),
        ("GET", "/apps/list_apps/"),
        ("POST", "/status/health"),
        ("GET", "/no/such/route"),
    ],
)
def test_missing_token_rejected(network, method, path):
    reply = api_request(
        method, network.nodes[0].api_url, path, body={} if method == "POST" else None
    )

    if method == "HEAD":
        # A HEAD reply has no body, so only the status and the challenge can be checked.
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == BEARER_CHALLENGE
        return
    assert_unauthenticated(reply, BEARER_CHALLENGE)


@pytest.mark.parametrize(
    "path",
    [
        "/internal/no-such-route",
        "/internal/../status/system",
        "/internal/%2e%2e/status/system",
        "/internal/sync/push",
        "/status/health/../system",
        "/STATUS/HEALTH",
    ],
)
def test_lookalike_open_paths_need_token(network, path):
    node = network.nodes[0]
    connection = http.client.HTTPConnection(node.api_host, node.api_port, timeout=10)
    try:
        # http.client sends the path as given, without removing dot segments.
        connection.request("GET", path)
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 401, body
    assert body["error"]["code"] == "AUTHENTICATION_REQUIRED"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer voxa_" + "A" * 43,
        "Bearer not-a-token",
        "Bearer",
        "bearer voxa_" + "B" * 43,
    ],
)
def test_wrong_token_rejected(network, header):
    reply = api_get(network.nodes[0].api_url, "/status/system", headers={"Authorization": header})

    assert_unauthenticated(reply, INVALID_TOKEN_CHALLENGE)


def test_other_scheme_rejected(network):
    reply = api_get(
        network.nodes[0].api_url, "/status/system", headers={"Authorization": "Basic dXNlcjpwYXNz"}
    )

    assert_unauthenticated(reply, BEARER_CHALLENGE)


def test_read_token_reads_but_cannot_write(network, issued_tokens):
    node = network.nodes[0]
    token = create_token(node, issued_tokens, "read", "reader")

    status, body, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
    assert status == 200, body
    head_status, _, _ = api_request("HEAD", node.api_url, "/status/system", headers=bearer(token))
    assert head_status == 200
    missing_status, missing, _ = api_get(
        node.api_url, "/data/retrieve/", headers=bearer(token), key="absent"
    )
    assert missing_status == 404, missing

    status, body, _ = store(node, "read-scope", token)
    assert status == 403, body
    assert body["error"]["code"] == "AUTHORIZATION_FAILED"
    assert body["error"]["details"]["required_scope"] == "write"
    assert body["error"]["details"]["token_scope"] == "read"
    assert "scope write" in body["error"]["message"]
    assert "voxanode token create --scope write" in body["error"]["message"]


def test_write_token_stores_and_reads(network, issued_tokens):
    node = network.nodes[0]
    token = create_token(node, issued_tokens, "write", "writer")

    status, body, _ = store(node, "write-scope", token)
    assert status == 200, body
    status, body, _ = api_get(
        node.api_url, "/data/retrieve/", headers=bearer(token), key="write-scope"
    )
    assert status == 200, body
    assert body["value"] == {"n": 1}


def test_admin_token_allowed_everything(network, issued_tokens):
    node = network.nodes[0]
    token = create_token(node, issued_tokens, "admin", "operator")

    status, body, _ = store(node, "admin-scope", token)
    assert status == 200, body
    status, body, _ = api_get(node.api_url, "/info/program_stats", headers=bearer(token))
    assert status == 200, body


def test_tokens_are_per_node(network, issued_tokens):
    first, second = network.nodes
    token = create_token(first, issued_tokens, "read", "first-only")

    reply = api_get(second.api_url, "/status/system", headers=bearer(token))

    assert_unauthenticated(reply, INVALID_TOKEN_CHALLENGE)


def test_revocation_takes_effect_within_second(network, issued_tokens):
    node = network.nodes[0]
    token = create_token(node, issued_tokens, "read", "short-lived")
    status, _, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
    assert status == 200

    completed = token_command(node, "revoke", "short-lived")
    assert completed.returncode == 0, completed.stderr

    def token_rejected() -> bool | int:
        status, _, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
        return True if status == 401 else status

    assert wait_for(token_rejected, TOKEN_FILE_CHECK_WAIT_SECONDS, interval=0.1) is True
    reply = api_get(node.api_url, "/status/system", headers=bearer(token))
    assert_unauthenticated(reply, INVALID_TOKEN_CHALLENGE)
    log = node.log_path.read_text(encoding="utf-8")
    assert "rejected revoked token token_id=" in log


def test_websocket_needs_read_token(network, issued_tokens):
    node = network.nodes[0]
    token = create_token(node, issued_tokens, "read", "event-reader")
    url = node.api_url.replace("http://", "ws://") + "/ws/network/events"

    async def connect(headers: dict[str, str]) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(
                    url, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=5)
                ):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert asyncio.run(asyncio.wait_for(connect({}), 30)) == 401
    assert asyncio.run(asyncio.wait_for(connect(bearer(token)), 30)) == 101


def test_broken_token_file_keeps_tokens(network, issued_tokens):
    node = network.nodes[1]
    token = create_token(node, issued_tokens, "read", "survivor")
    token_path = node.data_dir / "tokens.json"
    good = token_path.read_text(encoding="utf-8")
    # One request makes the node read the file with the new token.
    status, body, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
    assert status == 200, body
    statuses = []

    def broken_file_read() -> bool:
        status, _, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
        statuses.append(status)
        return " ERROR voxanode.tokens " in node.log_path.read_text(encoding="utf-8")

    try:
        token_path.write_text('{"schema_version": 1, "tokens": [', encoding="utf-8")
        # The node checks the file at most once a second, so it may take that long
        # to notice the broken file. Requests go on meanwhile and after.
        assert wait_for(broken_file_read, TOKEN_FILE_CHECK_WAIT_SECONDS, interval=0.1) is True
        for _ in range(3):
            broken_file_read()
    finally:
        token_path.write_text(good, encoding="utf-8")

    assert set(statuses) == {200}, statuses
    log = node.log_path.read_text(encoding="utf-8")
    errors = [line for line in log.splitlines() if " ERROR voxanode.tokens " in line]
    assert len(errors) == 1, errors
    assert "invalid token file" in errors[0]
    assert "keeping the 1 active tokens read before" in errors[0]
    assert token not in errors[0]


def test_network_works_between_secured_nodes(network, issued_tokens):
    first, second = network.nodes
    writer = create_token(first, issued_tokens, "write", "network-writer")
    reader = create_token(second, issued_tokens, "read", "network-reader")

    def both_online():
        status, body, _ = api_get(
            second.api_url, "/data/discover_nodes/", headers=bearer(reader), status="online"
        )
        return (status == 200 and body["online_nodes"] == 2) or body

    assert wait_for(both_online, CONVERGE_SECONDS) is True
    status, body, _ = store(first, "across-nodes", writer, replicas=2)
    assert status == 200, body
    assert len(body["storage_nodes"]) == 2
    status, body, _ = api_get(
        second.api_url, "/data/retrieve/", headers=bearer(reader), key="across-nodes"
    )
    assert status == 200, body
    assert body["value"] == {"n": 1}


def node_id_of(node, token: str) -> str:
    status, body, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
    assert status == 200, body
    return body["node_id"]


def signed_get(node, identity: Identity, path: str):
    headers = sign_request(identity, "GET", path, b"")
    request = urllib.request.Request(node.api_url + path, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_internal_routes_skip_bearer_check(network):
    first, second = network.nodes
    member = Identity.load_or_create(second.data_dir)

    status, body, _ = signed_get(first, member, "/internal/instances/report")
    assert status == 200, body
    assert "reports" in body

    # The internal route checks the signature itself and sends its own challenge.
    status, body, headers = signed_get(first, Identity.generate(), "/internal/instances/report")
    assert status == 401, body
    assert headers["WWW-Authenticate"] == 'VoxaNode realm="internal"'
    assert "not a known member" in body["error"]["details"]["reason"]


def test_app_deploy_across_secured_nodes(network, issued_tokens, test_image):
    first, second = network.nodes
    writer = create_token(first, issued_tokens, "write", "app-writer")
    reader = create_token(second, issued_tokens, "read", "app-reader")
    node_ids = {node_id_of(node, reader if node is second else writer) for node in network.nodes}

    def both_offer_apps():
        status, body, _ = api_get(
            second.api_url,
            "/data/discover_nodes/",
            headers=bearer(reader),
            capability="app-deployment",
        )
        return (status == 200 and {entry["node_id"] for entry in body["nodes"]} == node_ids) or body

    assert wait_for(both_offer_apps, CONVERGE_SECONDS) is True

    # Placing one replica on each node makes the first node call the second one's
    # /internal/ routes, and the record reaches the second node by catalogue sync.
    body = {"name": "secured-web", "image": test_image, "replicas": 2, **HTTPD}
    status, answer, _ = api_post(
        first.api_url, "/apps/add_app/", body, headers=bearer(writer), timeout=120
    )
    assert status == 200, answer
    app_id = answer["app_id"]

    def running_on_both():
        status, body, _ = api_get(
            second.api_url, "/apps/get_app_status/", headers=bearer(reader), app_id=app_id
        )
        if status != 200:
            return body
        nodes = {instance["node_id"] for instance in body["instances"]}
        return (body["replicas"]["running"] == 2 and nodes == node_ids) or body

    assert wait_for(running_on_both, APP_RUNNING_SECONDS) is True
    status, answer, _ = api_post(
        first.api_url,
        "/apps/add_stop_app/",
        {"app_id": app_id, "force": True},
        headers=bearer(writer),
        timeout=60,
    )
    assert status == 200, answer


def test_tokens_never_logged(network, issued_tokens):
    assert len(issued_tokens) >= 8
    for node in network.nodes:
        log = node.log_path.read_text(encoding="utf-8")
        assert "DEBUG voxanode.api.auth" in log
        for token in issued_tokens:
            assert token not in log
            assert token[len("voxa_") :] not in log
        assert "Bearer voxa_" not in log
        assert "Authorization" not in log


def test_dev_mode_opens_everything(devnet_factory):
    devnet = devnet_factory(1)
    node = devnet.nodes[0]

    status, body, _ = api_get(node.api_url, "/status/system")
    assert status == 200, body
    status, body, _ = store(node, "dev-mode", replicas=1)
    assert status == 200, body
    log = node.log_path.read_text(encoding="utf-8")
    warnings = [line for line in log.splitlines() if " WARNING voxanode.daemon " in line]
    assert len(warnings) == 1
    assert "authentication is off" in warnings[0]


def test_start_logs_active_token_count(devnet_factory, issued_tokens):
    devnet = devnet_factory(1, extra_args=SECURED_ARGS, start=False)
    node = devnet.nodes[0]
    node.prepare_data_dir()
    token = create_token(node, issued_tokens, "read", "before-start")
    devnet.start()

    status, body, _ = api_get(node.api_url, "/status/system", headers=bearer(token))
    assert status == 200, body
    log = node.log_path.read_text(encoding="utf-8")
    assert "API authentication is on: 1 active tokens in " in log
    assert " WARNING voxanode.daemon " not in log
