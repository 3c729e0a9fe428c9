"""Apps on a real 3-node network with real Docker containers of the local test image.

The network is shared by the tests of this module, which run in file order: deploy,
serve, scale, stop, replace a killed container, logs, bad specs, a missing image,
a daemon restart, and last a node killed with SIGKILL. Every container the nodes made
is removed at the end, found by its node id label.
"""

import asyncio
import contextlib
import json
import random
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from app_network import APP_LABEL, app_devnet
from event_stream import EventStream
from helpers import TEST_IMAGE, api_get, api_post, wait_for
from stopped_reader import StoppedReader

# SWIM needs a probe round, the suspicion timeout and dissemination to call a killed
# node dead; the responsible node then replaces its instances.
NODE_DEATH_SECONDS = 45


def docker(*args: str) -> str:
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, f"docker {' '.join(args)} failed: {completed.stderr.strip()}"
    return completed.stdout


def containers_of(app_id: str, running_only: bool = True) -> list[str]:
    args = ["ps", "-q", "--filter", f"label={APP_LABEL}={app_id}"]
    if not running_only:
        args.insert(1, "-a")
    return docker(*args).split()




@pytest.fixture(scope="module")
def network(tmp_path_factory, test_image):
    with app_devnet(tmp_path_factory.mktemp("apps-devnet")) as devnet:
        yield devnet


def deploy(node, **spec) -> dict:
    body = {"name": spec.pop("name"), "image": spec.pop("image", TEST_IMAGE), **spec}
    status, answer, _ = api_post(node.api_url, "/apps/add_app/", body, timeout=120)
    assert status == 200, answer
    return answer


def app_status(node, app_id: str) -> dict:
    status, body, _ = api_get(node.api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    return body


def wait_running(node, app_id: str, replicas: int, timeout: float = 60) -> dict:
    def ready():
        body = app_status(node, app_id)
        counts = body["replicas"]
        if body["status"] == "running" and counts["running"] == replicas == counts["healthy"] and len(body["instances"]) == replicas:
            return True
        return body

    result = wait_for(ready, timeout)
    assert result is True, f"app did not reach {replicas} running instances: {json.dumps(result, indent=1)}"
    return app_status(node, app_id)


def stop(node, app_id: str, force: bool = False) -> dict:
    status, body, _ = api_post(node.api_url, "/apps/add_stop_app/", {"app_id": app_id, "force": force}, timeout=60)
    assert status == 200, body
    return body


def node_address(network, node_id: str) -> str:
    for node in network.nodes:
        if node.fetch_node_id() == node_id:
            return node.api_host
    raise AssertionError(f"no node {node_id}")


HTTPD = {"ports": [{"container_port": 8080}], "resources": {"memory": "64m", "cpu": "0.2"}}
# How long a log stream of a client that stopped reading may take to end: filling the
# buffers and the queue, then the 5 s close timeout.
LOG_CLOSE_WAIT_SECONDS = 20


def test_deploy_spreads_instances_and_serves_pages(network):
    a, b, c = network.nodes
    with EventStream(b.api_url, "?types=app_deployed") as events:
        answer = deploy(a, name="web", replicas=3, **HTTPD)
        app_id = answer["app_id"]
        assert answer["deployment_details"]["instances_created"] == 3
        assert answer["deployment_details"]["nodes_deployed"] == 3
        body = wait_running(c, app_id, 3)
        assert events.wait_for("app_deployed", 20, app_id=app_id) is not None
    assert len({i["node_id"] for i in body["instances"]}) == 3
    assert len(containers_of(app_id)) == 3

    status, listing, _ = api_get(c.api_url, "/apps/list_apps/")
    assert status == 200
    (entry,) = [app for app in listing["applications"] if app["app_id"] == app_id]
    assert entry["name"] == "web"
    assert entry["replicas"] == {"desired": 3, "running": 3, "healthy": 3}
    assert len(entry["nodes"]) == 3

    instance = body["instances"][0]
    (port,) = instance["ports"]
    host = node_address(network, instance["node_id"])
    with urllib.request.urlopen(f"http://{host}:{port['host_port']}/", timeout=10) as page:
        assert b"voxanode test image" in page.read()

    # The same app again by name is a conflict, whichever node is asked.
    status, conflict, _ = api_post(c.api_url, "/apps/add_app/", {"name": "web", "image": TEST_IMAGE})
    assert status == 409
    assert conflict["error"]["code"] == "RESOURCE_CONFLICT"

    stop(c, app_id)
    assert wait_for(lambda: containers_of(app_id, running_only=False) == [], 30) is True


def test_scale_then_stop_removes_containers(network):
    a, b, c = network.nodes
    app_id = deploy(b, name="scaled", replicas=2, **HTTPD)["app_id"]
    wait_running(a, app_id, 2)

    status, body, _ = api_post(c.api_url, "/apps/add_scale_app/", {"app_id": app_id, "replicas": 5}, timeout=60)
    assert status == 200, body
    assert body["previous_replicas"] == 2
    assert body["new_replicas"] == 5
    wait_running(a, app_id, 5)
    assert len(containers_of(app_id)) == 5

    status, body, _ = api_post(a.api_url, "/apps/add_scale_app/", {"app_id": app_id, "replicas": 1}, timeout=60)
    assert status == 200, body
    wait_running(c, app_id, 1)
    assert wait_for(lambda: len(containers_of(app_id, running_only=False)) == 1, 30) is True

    answer = stop(a, app_id, force=True)
    assert answer["instances_stopped"] == 1
    assert wait_for(lambda: containers_of(app_id, running_only=False) == [], 30) is True
    assert app_status(b, app_id)["status"] == "stopped"
    status, listing, _ = api_get(b.api_url, "/apps/list_apps/", status="stopped")
    assert app_id in [app["app_id"] for app in listing["applications"]]


def test_container_killed_by_hand_is_replaced(network):
    a, b, _ = network.nodes
    app_id = deploy(a, name="phoenix", replicas=2, **HTTPD)["app_id"]
    before = wait_running(b, app_id, 2)
    victim = before["instances"][0]["instance_id"]
    (container,) = docker("ps", "-q", "--filter", f"label=io.voxanode.instance-id={victim}").split()
    docker("kill", container)

    def replaced():
        body = app_status(b, app_id)
        ids = {i["instance_id"] for i in body["instances"]}
        return (victim not in ids and body["replicas"]["running"] == 2) or body

    assert wait_for(replaced, 60) is True
    assert wait_for(lambda: len(containers_of(app_id, running_only=False)) == 2, 30) is True
    stop(a, app_id, force=True)


def test_status_shows_health_and_usage(network):
    a, b, _ = network.nodes
    checked = {"type": "http", "path": "/", "interval_seconds": 1, "timeout_seconds": 0.5, "retries": 2}
    good = deploy(a, name="checked", replicas=2, health_check=checked, **HTTPD)["app_id"]
    body = wait_running(b, good, 2)
    assert all(i["last_health_check"] is not None for i in body["instances"])

    def measured():
        instances = app_status(b, good)["instances"]
        return all(i["resource_usage"]["memory_mb"] > 0 for i in instances) or instances

    assert wait_for(measured, 20) is True

    broken = deploy(a, name="broken-check", replicas=1, health_check={**checked, "path": "/missing"}, **HTTPD)["app_id"]

    def unhealthy():
        status = app_status(b, broken)
        return (status["replicas"]["unhealthy"] == 1 and status["health"] == "unhealthy") or status

    assert wait_for(unhealthy, 30) is True
    assert app_status(a, broken)["status"] == "deploying"
    stop(a, good, force=True)
    stop(a, broken, force=True)


def test_app_fails_when_container_exits_at_once(network):
    a, b, _ = network.nodes
    body = {"name": "quitter", "image": TEST_IMAGE, "command": ["sh", "-c", "echo bye; exit 3"]}
    with EventStream(b.api_url, "?types=app_failed") as events:
        status, answer, _ = api_post(a.api_url, "/apps/add_app/", body, timeout=120)
        # The exit is seen at once when the container is gone before the start call
        # returns, else by the retries that follow.
        if status == 422:
            assert answer["error"]["code"] == "DEPLOYMENT_FAILED"
            assert "exited with code 3" in answer["error"]["message"]
            app_id = answer["error"]["details"]["app_id"]
        else:
            assert status == 200, answer
            app_id = answer["app_id"]
        failed = events.wait_for("app_failed", 60, app_id=app_id)
    assert failed is not None, "no app_failed event"
    assert "exited with code 3" in failed["data"]["reason"]
    status = app_status(a, app_id)
    assert status["status"] == "failed"
    assert "exited with code 3" in status["last_error"]["reason"]
    stop(a, app_id, force=True)
    assert wait_for(lambda: containers_of(app_id, running_only=False) == [], 30) is True


def test_restart_policy_keeps_clean_exit(network):
    a, b, _ = network.nodes
    job = deploy(a, name="one-shot", restart="on-failure", command=["sh", "-c", "sleep 1; echo done"])["app_id"]

    def finished():
        status = app_status(b, job)
        return status["status"] == "stopped" or status

    assert wait_for(finished, 30) is True
    (instance,) = app_status(b, job)["instances"]
    assert "exited with code 0" in instance["error"]
    time.sleep(3)
    # Still the same instance: a clean exit is not replaced under on-failure.
    assert [i["instance_id"] for i in app_status(a, job)["instances"]] == [instance["instance_id"]]
    stop(a, job, force=True)


def test_logs_stream_lines_the_containers_print(network):
    a, b, c = network.nodes
    marker = f"hello-{random.randrange(10**9)}"
    # Each instance prints the marker a second after it starts, so the follower below
    # is connected by then, and then serves pages as usual.
    command = ["sh", "-c", f"sleep 1; echo {marker}; exec httpd -f -v -p 8080 -h /www"]
    app_id = deploy(a, name="talker", replicas=2, command=command, **HTTPD)["app_id"]

    async def follow() -> list[dict]:
        received = []
        url = f"ws://{c.api_host}:{c.api_port}/ws/apps/{app_id}/logs?tail=10"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as websocket:
                async for message in websocket:
                    received.append(json.loads(message.data))
                    if len({m["instance_id"] for m in received if marker in m["message"]}) == 2:
                        break
        return received

    received = asyncio.run(asyncio.wait_for(follow(), 60))
    body = wait_running(a, app_id, 2)
    with_marker = [m for m in received if marker in m["message"]]
    assert {m["instance_id"] for m in with_marker} == {i["instance_id"] for i in body["instances"]}
    assert {m["node_id"] for m in with_marker} == {i["node_id"] for i in body["instances"]}
    for message in received:
        assert set(message) == {"timestamp", "level", "message", "instance_id", "node_id", "metadata"}
        assert message["metadata"]["stream"] in ("stdout", "stderr")
    assert all(m["level"] == "info" for m in with_marker)
    assert all(m["metadata"]["stream"] == "stdout" for m in with_marker)

    async def history() -> tuple[list[dict], int]:
        url = f"ws://{b.api_host}:{b.api_port}/ws/apps/{app_id}/logs?tail=1&follow=false"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as websocket:
                messages = [json.loads(m.data) async for m in websocket if m.type == aiohttp.WSMsgType.TEXT]
                return messages, websocket.close_code

    messages, code = asyncio.run(asyncio.wait_for(history(), 30))
    assert code == 1000
    # One line of history from each instance: the marker, the last line either printed.
    assert sorted(m["instance_id"] for m in messages) == sorted(i["instance_id"] for i in body["instances"])
    assert all(marker in m["message"] for m in messages)
    stop(a, app_id, force=True)


def test_logs_stopped_reader_closed_4008(network):
    a = network.nodes[0]
    line = "flood " + "x" * 60
    command = ["sh", "-c", f"while true; do echo {line}; done"]
    app_id = deploy(a, name="flood", replicas=1, command=command, resources={"memory": "64m", "cpu": "0.5"})["app_id"]
    (instance,) = wait_running(a, app_id, 1)["instances"]
    (node,) = [node for node in network.nodes if node.fetch_node_id() == instance["node_id"]]
    closed = re.compile(rf"log stream closed request=\S+ app={app_id} code=4008 reason=client too slow")

    async def stop_reading() -> None:
        stopped = await StoppedReader.connect(node.api_host, node.api_port, f"/ws/apps/{app_id}/logs?tail=0")
        try:
            # The container prints thousands of lines a second, so the node's buffers
            # and then its queue of 2000 lines fill while this client reads nothing.
            # The node sends 4008, waits 5 s for the close handshake, then resets.
            async with asyncio.timeout(LOG_CLOSE_WAIT_SECONDS):
                while not closed.search(node.log_path.read_text(encoding="utf-8")):
                    await asyncio.sleep(0.2)
            # The connection is gone: only what the client's own buffer held arrives.
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    await stopped.read_until_closed()
        finally:
            stopped.close()

    asyncio.run(stop_reading())
    stop(a, app_id, force=True)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "Bad_Name", "image": TEST_IMAGE}, "name"),
        ({"name": "ok", "image": "UPPER/case"}, "image"),
        ({"name": "ok", "image": TEST_IMAGE, "replicas": 0}, "replicas"),
        ({"name": "ok", "image": TEST_IMAGE, "resources": {"memory": "lots"}}, "resources.memory"),
        ({"name": "ok", "image": TEST_IMAGE, "resources": {"cpu": "-1"}}, "resources.cpu"),
        ({"name": "ok", "image": TEST_IMAGE, "environment": {"1BAD": "x"}}, "environment.1BAD"),
        ({"name": "ok", "image": TEST_IMAGE, "ports": [{"container_port": 70000}]}, "ports[0].container_port"),
        ({"name": "ok", "image": TEST_IMAGE, "ports": [{"container_port": 80, "protocol": "sctp"}]}, "ports[0].protocol"),
        ({"name": "ok", "image": TEST_IMAGE, "surprise": 1}, "surprise"),
    ],
)
def test_bad_spec_is_rejected_naming_the_field(network, body, field):
    status, answer, _ = api_post(network.nodes[1].api_url, "/apps/add_app/", body)
    assert status == 400, answer
    assert answer["error"]["code"] == "INVALID_REQUEST"
    assert answer["error"]["details"]["field"] == field


def test_bad_app_ids_and_unknown_apps(network):
    url = network.nodes[0].api_url
    status, body, _ = api_get(url, "/apps/get_app_status/", app_id="nope")
    assert status == 400
    assert body["error"]["details"]["field"] == "app_id"
    status, body, _ = api_get(url, "/apps/get_app_status/", app_id="app-000000000000")
    assert status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"
    status, body, _ = api_post(url, "/apps/add_scale_app/", {"app_id": "app-000000000000", "replicas": 2})
    assert status == 404
    status, body, _ = api_post(url, "/apps/add_stop_app/", {"app_id": "app-000000000000", "force": "yes"})
    assert status == 400
    assert body["error"]["details"]["field"] == "force"


def test_missing_image_fails_the_deployment_without_pulling(network):
    with EventStream(network.nodes[0].api_url, "?types=app_failed") as events:
        status, body, _ = api_post(
            network.nodes[2].api_url,
            "/apps/add_app/",
            {"name": "ghost", "image": "voxanode-test/not-built-anywhere:1", "replicas": 2},
            timeout=60,
        )
        assert status == 422, body
        assert body["error"]["code"] == "DEPLOYMENT_FAILED"
        assert "image" in body["error"]["message"]
        app_id = body["error"]["details"]["app_id"]
        failed = events.wait_for("app_failed", 20, app_id=app_id)
        assert failed is not None
        assert failed["data"]["kind"] == "image_missing"
    assert app_status(network.nodes[0], app_id)["status"] == "failed"
    assert containers_of(app_id, running_only=False) == []


def test_app_that_fits_nowhere_is_not_deployed(network):
    status, body, _ = api_post(
        network.nodes[0].api_url,
        "/apps/add_app/",
        {"name": "huge", "image": TEST_IMAGE, "resources": {"memory": "900g"}},
    )
    assert status == 503, body
    assert body["error"]["code"] == "DEPLOYMENT_FAILED"
    assert body["error"]["details"]["memory_asked_mb"] == 900 * 1024
    status, listing, _ = api_get(network.nodes[1].api_url, "/apps/list_apps/")
    assert "huge" not in [app["name"] for app in listing["applications"]]


def test_internal_routes_reject_unsigned_calls(network):
    from voxanode.api.internal_auth import sign_request
    from voxanode.identity import Identity

    url = network.nodes[0].api_url
    command = {"command": {"op": "stop", "app_id": "app-000000000000"}, "request_id": "x"}
    status, body, headers = api_post(url, "/internal/apps/command", command)
    assert status == 401
    assert body["error"]["code"] == "AUTHENTICATION_REQUIRED"
    assert "WWW-Authenticate" in headers

    # A key that no member announced is refused like no signature at all.
    stranger = Identity.generate()
    payload = json.dumps(command).encode()
    signed = sign_request(stranger, "POST", "/internal/apps/command", payload)
    request = urllib.request.Request(
        url + "/internal/apps/command", data=payload, method="POST",
        headers={**signed, "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    assert "not a known member" in json.loads(refused.value.read())["error"]["details"]["reason"]


def test_restarted_daemon_adopts_its_containers(network):
    a, b, c = network.nodes
    app_id = deploy(a, name="steady", replicas=3, **HTTPD)["app_id"]
    before = wait_running(b, app_id, 3)
    assert c.fetch_node_id() in {i["node_id"] for i in before["instances"]}
    c.send_signal(signal.SIGKILL)
    c.wait_exit(10)
    c.start()
    c.wait_ready()
    after = wait_running(a, app_id, 3)
    assert {i["instance_id"] for i in after["instances"]} == {i["instance_id"] for i in before["instances"]}
    time.sleep(3)
    assert len(containers_of(app_id, running_only=False)) == 3
    stop(a, app_id, force=True)


def test_first_node_rejoins_after_being_declared_failed(network):
    # The first node of the devnet has no bootstrap peer: once the others have given
    # it up, it finds them only through the peers it saved while they joined it.
    first, b, c = network.nodes
    first_id = first.fetch_node_id()
    app_id = deploy(b, name="regroup", replicas=3, **HTTPD)["app_id"]
    wait_running(c, app_id, 3)
    first.send_signal(signal.SIGKILL)
    first.wait_exit(10)

    def given_up():
        status, body, _ = api_get(b.api_url, "/data/discover_nodes/")
        return {n["node_id"]: n["status"] for n in body["nodes"]}.get(first_id) == "offline"

    assert wait_for(given_up, NODE_DEATH_SECONDS) is True
    first.start()
    first.wait_ready()

    def rejoined():
        views = [api_get(node.api_url, "/data/discover_nodes/").body for node in network.nodes]
        return all(view["online_nodes"] == 3 for view in views) or views

    assert wait_for(rejoined, 30) is True
    wait_running(first, app_id, 3)
    # The restarted node removes the containers whose instances moved away meanwhile.
    assert wait_for(lambda: len(containers_of(app_id, running_only=False)) == 3, 30) is True
    stop(b, app_id, force=True)


def test_killed_node_instances_move_elsewhere(network):
    a, b, c = network.nodes
    app_id = deploy(a, name="survivor", replicas=3, **HTTPD)["app_id"]
    wait_running(a, app_id, 3)
    victim_id = c.fetch_node_id()
    with EventStream(b.api_url, "?types=load_rebalanced") as events:
        c.send_signal(signal.SIGKILL)
        c.wait_exit(10)
        started = time.monotonic()

        def moved():
            body = app_status(a, app_id)
            nodes = {i["node_id"] for i in body["instances"]}
            return (victim_id not in nodes and body["replicas"]["running"] == 3) or body

        assert wait_for(moved, NODE_DEATH_SECONDS) is True
        rebalanced = events.wait_for("load_rebalanced", 10, app_id=app_id)
        assert rebalanced is not None
        assert rebalanced["data"]["instances_replaced"] == 1
    elapsed = time.monotonic() - started
    assert elapsed < NODE_DEATH_SECONDS
    status, body, _ = api_get(b.api_url, "/apps/get_app_status/", app_id=app_id)
    assert {i["node_id"] for i in body["instances"]} <= {a.fetch_node_id(), b.fetch_node_id()}
    stop(b, app_id, force=True)
