"""Apps under faults on the shared network: a node with an instance is killed with SIGKILL.

The app must return to its desired replicas on the nodes still up, and once the killed
node is back there must be exactly one container per desired replica, found by the
runtime's app label. The same deployment shows that a container cannot reach the
Docker socket or gain privileges.
"""

import subprocess
import time

import pytest

from harness import FaultPlan, step
from helpers import TEST_IMAGE, api_get, api_post, wait_for

APP_LABEL = "io.voxanode.app-id"
NODE_LABEL = "io.voxanode.node-id"
REPLICAS = 2
DEPLOY_TIMEOUT_SECONDS = 60
RESCHEDULE_TIMEOUT_SECONDS = 60
CLEANUP_TIMEOUT_SECONDS = 30


def docker(*args: str) -> str:
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, f"docker {' '.join(args)} failed: {completed.stderr.strip()}"
    return completed.stdout


def containers_of(app_id: str, running_only: bool = True) -> list[str]:
    args = ["ps", "-q", "--filter", f"label={APP_LABEL}={app_id}"]
    if not running_only:
        args.insert(1, "-a")
    return docker(*args).split()


def app_status(node, app_id: str) -> dict:
    status, body, _ = api_get(node.api_url, "/apps/get_app_status/", app_id=app_id)
    assert status == 200, body
    return body


def running_on(node, app_id: str, node_ids: set[str]) -> bool | dict:
    """True when the app runs its replicas, all on `node_ids`, with that many containers."""
    body = app_status(node, app_id)
    instances = body["instances"]
    placed = {instance["node_id"] for instance in instances}
    if (
        body["replicas"]["running"] == REPLICAS
        and len(instances) == REPLICAS
        and placed <= node_ids
        and len(containers_of(app_id)) >= REPLICAS
    ):
        return True
    return body


@pytest.fixture(scope="module")
def app(chaos_network, test_image):
    node_ids = [node.fetch_node_id() for node in chaos_network.nodes]
    body = {
        "name": "chaos-web",
        "image": TEST_IMAGE,
        "replicas": REPLICAS,
        "ports": [{"container_port": 8080}],
        "resources": {"memory": "32m", "cpu": "0.2"},
    }
    status, answer, _ = api_post(chaos_network.nodes[0].api_url, "/apps/add_app/", body, timeout=120)
    assert status == 200, answer
    app_id = answer["app_id"]
    try:
        assert wait_for(lambda: running_on(chaos_network.nodes[0], app_id, set(node_ids)), DEPLOY_TIMEOUT_SECONDS) is True
        yield app_id
    finally:
        api_post(chaos_network.nodes[0].api_url, "/apps/add_stop_app/", {"app_id": app_id, "force": True}, timeout=60)
        wait_for(lambda: containers_of(app_id, running_only=False) == [], CLEANUP_TIMEOUT_SECONDS)
        for node_id in node_ids:
            leftovers = docker("ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}").split()
            if leftovers:
                docker("rm", "-f", *leftovers)


def test_container_cannot_reach_docker_or_gain_privileges(app):
    container = containers_of(app)[0]
    sockets = docker("exec", container, "sh", "-c", "ls /var/run/docker.sock /run/docker.sock 2>/dev/null; echo done")
    assert sockets.strip() == "done"
    status = docker("exec", container, "cat", "/proc/self/status")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapEff"].strip(), 16) == 0
    assert int(fields["CapPrm"].strip(), 16) == 0
    inspect = docker("inspect", "--format", "{{.HostConfig.Privileged}} {{.HostConfig.Binds}}", container).split(None, 1)
    assert inspect[0] == "false"
    assert "docker.sock" not in inspect[1]


def test_killed_node_instances_rescheduled(chaos_network, runner, report, app):
    observer = chaos_network.nodes[0]
    body = app_status(observer, app)
    ids_by_index = {node.index: node.fetch_node_id() for node in chaos_network.nodes}
    hosts = {instance["node_id"] for instance in body["instances"]}
    victim = next(index for index, node_id in ids_by_index.items() if node_id in hosts and index != 0)
    survivors = {node_id for index, node_id in ids_by_index.items() if index != victim}

    # The plan kills the victim, waits for its instance to move, then settles
    # (restarts the victim) and checks the data and membership invariants.
    rescheduled_after = []

    def wait_rescheduled() -> None:
        outcome = wait_for(lambda: running_on(observer, app, survivors), RESCHEDULE_TIMEOUT_SECONDS)
        assert outcome is True, f"instances not rescheduled: {outcome}"
        rescheduled_after.append(time.monotonic() - runner.last_fault_at)

    plan = FaultPlan("kill-app-node", (step("write", count=3), step("kill", node=victim), step("call", function=wait_rescheduled)))
    result = runner.run(plan)
    report.max_reschedule_seconds = max(report.max_reschedule_seconds, *rescheduled_after)

    assert result.crashed == {}
    assert result.views is True, result.views
    assert result.routing is True, result.routing
    assert result.lost == []
    # The restarted victim removes its stale container: one container per replica.
    assert wait_for(lambda: len(containers_of(app, running_only=False)) == REPLICAS, CLEANUP_TIMEOUT_SECONDS) is True
    final = app_status(observer, app)
    assert final["replicas"]["running"] == REPLICAS
    assert len({instance["instance_id"] for instance in final["instances"]}) == REPLICAS
