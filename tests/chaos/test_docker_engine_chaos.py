"""Apps when the Docker engine under two nodes stops and starts again.

Nodes 3 and 4 of the shared network are restarted with DOCKER_HOST set to a Docker
engine of the test's own (`docker_engine.PrivateDockerd`), while nodes 0 to 2 keep the
machine's shared engine, which never restarts. An app with one instance per node runs
on both engines. The plan stops the private engine with SIGTERM (live restore is off,
so its containers die with it) and checks, while it is down:

- nodes 3 and 4 withdraw the app-deployment capability, and node 0 learns it by gossip;
- their instances move to nodes 0 to 2, and the app's last error is the engine loss
  or the containers' exit, whichever the node saw first;
- the API of node 3 still serves app requests: status, list, a scale it forwards,
  and the logs websocket, which ends normally.

Then it starts the engine on the same data root and checks that nodes 3 and 4 offer
app deployment again and remove the containers that died with the engine. When the
app grows, they take the new instances, and both engines together run one container
per desired instance. No response of nodes 3 and 4 may be a 500, and the data and
membership invariants of every plan hold.
"""

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from docker_engine import PrivateDockerd
from harness import FaultPlan, step
from helpers import TEST_IMAGE, api_get, api_post, wait_for
from invariants import views_converged
from voxanode.api.internal_auth import sign_request
from voxanode.identity import Identity

APP_LABEL = "io.voxanode.app-id"
NODE_LABEL = "io.voxanode.node-id"
CAPABILITY = "app-deployment"
ENGINE_NODES = (3, 4)
APP_NAME = "engine-web"
DEPLOY_TIMEOUT_SECONDS = 60
CAPABILITY_TIMEOUT_SECONDS = 30
RESCHEDULE_TIMEOUT_SECONDS = 60
RECOVERY_TIMEOUT_SECONDS = 60
CLEANUP_TIMEOUT_SECONDS = 30
SETTLE_TIMEOUT_SECONDS = 45
LOGS_TIMEOUT_SECONDS = 30
POLL_SECONDS = 0.25


def shared_containers(app_id: str, running_only: bool = False) -> list[str]:
    """Return the ids of the app's containers in the machine's shared engine."""
    args = ["docker", "ps", "-q", "--no-trunc", "--filter", f"label={APP_LABEL}={app_id}"]
    if not running_only:
        args.insert(2, "-a")
    completed = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.split()


def app_status(node, app_id: str) -> dict:
    status, body, _ = api_get(node.api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    return body


def deploy_node_ids(observer) -> set[str]:
    """Return the node ids that `observer` lists with the app-deployment capability."""
    status, body, _ = api_get(observer.api_url, "/data/discover_nodes/", capability=CAPABILITY)
    assert status == 200, body
    return {entry["node_id"] for entry in body["nodes"]}


def http_responses(node) -> dict[str, float]:
    """Return {status code: count} of the API responses the node counted since it started."""
    status, body, _ = api_get(node.api_url, "/metrics")
    assert status == 200, body
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "voxanode_http_requests_total":
                code = sample.labels["status"]
                counts[code] = counts.get(code, 0) + sample.value
    return counts


def engine_available_gauge(node) -> float:
    status, body, _ = api_get(node.api_url, "/metrics")
    assert status == 200, body
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "voxanode_docker_engine_available":
                return sample.value
    raise AssertionError(f"node {node.index} exports no voxanode_docker_engine_available")


def history_over_websocket(node, app_id: str) -> tuple[list[dict], int | None]:
    """Read the app's log history through `node` with follow=false; return the lines and close code."""

    async def read() -> tuple[list[dict], int | None]:
        url = f"ws://{node.api_host}:{node.api_port}/ws/apps/{app_id}/logs?tail=1&follow=false"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as websocket:
                lines = [json.loads(m.data) async for m in websocket if m.type == aiohttp.WSMsgType.TEXT]
                return lines, websocket.close_code

    return asyncio.run(asyncio.wait_for(read(), LOGS_TIMEOUT_SECONDS))


def signed_get(node, identity: Identity, path: str) -> tuple[int, object]:
    """GET an internal route of `node`, signed with `identity`; return the status and the parsed body."""
    request = urllib.request.Request(node.api_url + path, headers=sign_request(identity, "GET", path, b""), method="GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw[:500]


def placement(body: dict) -> dict[str, int]:
    """Return {node id: instances} of an app status."""
    counts: dict[str, int] = {}
    for instance in body["instances"]:
        counts[instance["node_id"]] = counts.get(instance["node_id"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def private_engine(test_image):
    engine = PrivateDockerd()
    try:
        engine.start()
        engine.load_image(TEST_IMAGE)
        yield engine
    finally:
        engine.remove()


@pytest.fixture(scope="module")
def engine_nodes(chaos_network, runner, private_engine):
    """Nodes 3 and 4 on the private engine; back on the shared engine at the end."""
    nodes = chaos_network.nodes
    all_ids = {node.fetch_node_id() for node in nodes}
    try:
        codes = {index: runner.restart_node(index, {"DOCKER_HOST": private_engine.docker_host}) for index in ENGINE_NODES}
        runner.docker_engine = private_engine
        assert codes == {index: 0 for index in ENGINE_NODES}, f"exit codes of the stopped nodes: {codes}"
        assert wait_for(lambda: deploy_node_ids(nodes[0]) == all_ids or deploy_node_ids(nodes[0]), SETTLE_TIMEOUT_SECONDS) is True
        yield {nodes[index].fetch_node_id() for index in ENGINE_NODES}
    finally:
        runner.docker_engine = None
        for index in ENGINE_NODES:
            runner.restart_node(index, None)
        # The next module starts from five nodes that list each other and offer apps.
        wait_for(lambda: views_converged(nodes, all_ids), SETTLE_TIMEOUT_SECONDS)
        wait_for(lambda: deploy_node_ids(nodes[0]) == all_ids, SETTLE_TIMEOUT_SECONDS)


@pytest.fixture(scope="module")
def app(chaos_network, private_engine, engine_nodes):
    """An app with one instance on each of the five nodes, on both engines."""
    nodes = chaos_network.nodes
    node_ids = [node.fetch_node_id() for node in nodes]
    body = {
        "name": APP_NAME,
        "image": TEST_IMAGE,
        "replicas": len(nodes),
        "ports": [{"container_port": 8080}],
        "resources": {"memory": "32m", "cpu": "0.2"},
    }
    status, answer, _ = api_post(nodes[0].api_url, "/apps/add_app/", body, timeout=120)
    assert status == 200, answer
    app_id = answer["app_id"]

    def everywhere() -> bool | dict:
        status_body = app_status(nodes[0], app_id)
        on_private = private_engine.containers(f"{APP_LABEL}={app_id}", running_only=True)
        if (
            status_body["replicas"]["running"] == len(nodes)
            and placement(status_body) == {node_id: 1 for node_id in node_ids}
            and len(on_private) == len(ENGINE_NODES)
        ):
            return True
        return status_body

    try:
        assert wait_for(everywhere, DEPLOY_TIMEOUT_SECONDS) is True
        yield app_id
    finally:
        api_post(nodes[0].api_url, "/apps/add_stop_app/", {"app_id": app_id, "force": True}, timeout=60)
        wait_for(lambda: shared_containers(app_id) == [], CLEANUP_TIMEOUT_SECONDS)
        if private_engine.running:
            wait_for(lambda: private_engine.containers(f"{APP_LABEL}={app_id}") == [], CLEANUP_TIMEOUT_SECONDS)
            leftovers = private_engine.containers(f"{APP_LABEL}={app_id}")
            if leftovers:
                private_engine.docker("rm", "-f", *leftovers)
        for node_id in node_ids:
            subprocess.run(
                ["sh", "-c", f"docker ps -aq --filter label={NODE_LABEL}={node_id} | xargs -r docker rm -f"],
                capture_output=True, timeout=60,
            )


def test_engine_restart_app_recovers(chaos_network, runner, report, private_engine, engine_nodes, app):
    nodes = chaos_network.nodes
    observer, engine_node = nodes[0], nodes[ENGINE_NODES[0]]
    all_ids = {node.fetch_node_id() for node in nodes}
    shared_ids = all_ids - engine_nodes
    times: dict[str, float] = {}
    failure_kinds: set[str] = set()
    desired = {"count": len(nodes)}
    # An instance whose container dies with the engine; node 0 signs internal calls.
    engine_node_id = engine_node.fetch_node_id()
    lost_instance = next(
        instance["instance_id"] for instance in app_status(observer, app)["instances"]
        if instance["node_id"] == engine_node_id
    )
    member_identity = Identity.load(observer.data_dir)

    def runs_on(node_ids: set[str], engine_up: bool):
        """True when the app runs its desired replicas, all on `node_ids`, one container each."""

        def check() -> bool | dict:
            body = app_status(observer, app)
            containers = shared_containers(app)
            running = shared_containers(app, running_only=True)
            if engine_up:
                containers += private_engine.containers(f"{APP_LABEL}={app}")
                running += private_engine.containers(f"{APP_LABEL}={app}", running_only=True)
            expected_count = desired["count"]
            if (
                body["replicas"]["desired"] == expected_count
                and body["replicas"]["running"] == expected_count
                and len(body["instances"]) == expected_count
                and set(placement(body)) <= node_ids
                and len(containers) == expected_count
                and len(running) == expected_count
            ):
                return True
            return {"status": body, "containers": len(containers), "running": len(running)}

        return check

    def while_engine_down() -> None:
        outcome = wait_for(
            lambda: deploy_node_ids(observer).isdisjoint(engine_nodes) or deploy_node_ids(observer),
            CAPABILITY_TIMEOUT_SECONDS, POLL_SECONDS,
        )
        assert outcome is True, f"nodes still listed with {CAPABILITY}: {outcome}"
        times["capability withdrawn"] = time.monotonic() - runner.last_fault_at
        assert engine_available_gauge(engine_node) == 0

        # Another node asking node 3 for the logs of its instance gets a clear error.
        status, body = signed_get(
            engine_node, member_identity, f"/internal/instances/logs?instance_id={lost_instance}&tail=1&follow=false"
        )
        assert status == 503, body
        assert body["error"]["code"] == "SERVICE_UNAVAILABLE", body

        # Node 3 serves app requests without its engine: reads, and a scale that the
        # node responsible for the app places on nodes 0 to 2.
        status, body, _ = api_get(engine_node.api_url, "/apps/list_apps/")
        assert status == 200, body
        desired["count"] += 1
        status, body, _ = api_post(
            engine_node.api_url, "/apps/add_scale_app/", {"app_id": app, "replicas": desired["count"]}, timeout=60
        )
        assert status == 200, body

        outcome = wait_for(runs_on(shared_ids, engine_up=False), RESCHEDULE_TIMEOUT_SECONDS, POLL_SECONDS)
        assert outcome is True, f"instances not moved to nodes 0 to 2: {outcome}"
        times["instances moved"] = time.monotonic() - runner.last_fault_at
        # dockerd stops its containers (10 s) before it stops responding, so a node finds
        # either its containers exited (killed, code 137) or its engine gone first.
        last_error = app_status(engine_node, app)["last_error"]
        assert last_error is not None and last_error["kind"] in ("engine_unavailable", "exited"), last_error
        assert last_error["node_id"] in engine_nodes, last_error
        failure_kinds.add(last_error["kind"])

        # The logs of the instances on nodes 0 to 2 arrive, and the stream ends normally.
        lines, close_code = history_over_websocket(engine_node, app)
        assert close_code == 1000
        assert {line["node_id"] for line in lines} <= shared_ids
        assert len(lines) == desired["count"]

    def after_engine_start() -> None:
        started = time.monotonic()
        # Every node must see the offer: the scale below is placed by the responsible
        # node, which may be any of them.
        outcome = wait_for(
            lambda: all(deploy_node_ids(node) >= engine_nodes for node in nodes)
            or {node.index: sorted(deploy_node_ids(node)) for node in nodes},
            CAPABILITY_TIMEOUT_SECONDS, POLL_SECONDS,
        )
        assert outcome is True, f"nodes 3 and 4 do not offer {CAPABILITY} again: {outcome}"
        times["capability back"] = time.monotonic() - started
        # The containers that died with the engine belong to instances that moved.
        outcome = wait_for(
            lambda: private_engine.containers(f"{APP_LABEL}={app}") == [] or private_engine.containers(f"{APP_LABEL}={app}"),
            CLEANUP_TIMEOUT_SECONDS, POLL_SECONDS,
        )
        assert outcome is True, f"dead containers left on the restarted engine: {outcome}"
        times["dead containers removed"] = time.monotonic() - started

        # Growing by two places the new instances on the two nodes without any.
        desired["count"] += 2
        status, body, _ = api_post(
            nodes[ENGINE_NODES[1]].api_url, "/apps/add_scale_app/", {"app_id": app, "replicas": desired["count"]},
            timeout=60,
        )
        assert status == 200, body
        outcome = wait_for(runs_on(all_ids, engine_up=True), RECOVERY_TIMEOUT_SECONDS, POLL_SECONDS)
        assert outcome is True, f"app not back at its replicas: {outcome}"
        counts = placement(app_status(observer, app))
        assert {node_id: counts.get(node_id, 0) for node_id in engine_nodes} == {node_id: 1 for node_id in engine_nodes}
        assert len(private_engine.containers(f"{APP_LABEL}={app}", running_only=True)) == len(ENGINE_NODES)
        times["app running on both engines"] = time.monotonic() - started

    plan = FaultPlan(
        "docker-engine-restart",
        (
            step("write", count=3),
            step("engine_stop"),
            step("call", function=while_engine_down),
            step("write", count=3),
            step("engine_start"),
            step("call", function=after_engine_start),
        ),
    )
    result = runner.run(plan)
    # Kept apart from the node-kill figure: this one includes the 10 s dockerd takes
    # to stop its containers.
    report.notes.append(
        "docker engine restart (2 of 5 nodes): "
        + ", ".join(f"{name} after {seconds:.1f} s" for name, seconds in times.items())
        + f"; the first two from the SIGTERM, the others from the engine's restart; last failure kind {sorted(failure_kinds)}"
    )

    assert result.crashed == {}, f"nodes exited: {result.crashed}"
    assert result.views is True, result.views
    assert result.routing is True, result.routing
    assert result.lost == [], result.lost
    assert result.expired_served == []
    assert result.under_replicated == [], result.under_replicated
    assert engine_available_gauge(engine_node) == 1
    for index in ENGINE_NODES:
        responses = http_responses(nodes[index])
        assert responses.get("500", 0) == 0, f"node {index} answered with 500: {responses}"
