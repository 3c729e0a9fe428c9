"""GET /metrics of real daemons: data, gossip and member figures, then a real app.

The first test stores and reads values on a three-node devnet and checks that the
scraped counters show those requests, the DHT RPCs behind them, the records held, the
membership messages and the members online. The second deploys the local test image
on one node and checks the instance counts and the Docker call latencies. The third
starts a node without --dev and scrapes it with and without a read token. The scrapes
are parsed with prometheus_client's text parser, as a Prometheus server reads them.
"""

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from helpers import api_get, api_post, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES = 3
KEYS = ("metrics-a", "metrics-b", "metrics-c")
SETTLE_SECONDS = 30
APP_READY_SECONDS = 60
APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "1",
    "--apps-stop-timeout-seconds", "2",
)
NODE_LABEL = "io.voxanode.node-id"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"
# The node checks its token file at most once a second; the rest is slack.
TOKEN_FILE_CHECK_WAIT_SECONDS = 3.0


def scrape(node) -> dict[tuple[str, tuple], float]:
    """Return every sample of the node's /metrics as {(name, sorted labels): value}."""
    status, text, headers = api_get(node.api_url, "/metrics")
    assert status == 200, text
    assert headers["Content-Type"].startswith(PROMETHEUS_CONTENT_TYPE)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """Return the sample with exactly these labels, or 0.0 when the node has none."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Return the sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(
        sample_value
        for (sample_name, sample_labels), sample_value in samples.items()
        if sample_name == name and wanted <= set(sample_labels)
    )


def members_online(node, count: int):
    samples = scrape(node)
    online = value(samples, "voxanode_members", state="online")
    return True if online == count else f"{online} members online"


def probes_exchanged(node):
    samples = scrape(node)
    sent = value(samples, "voxanode_gossip_messages_sent_total", kind="ping")
    received = value(samples, "voxanode_gossip_messages_received_total", kind="ping")
    return True if sent > 0 and received > 0 else f"probes sent={sent} received={received}"


def test_metrics_show_data_requests_rpcs_and_gossip(devnet_factory):
    devnet = devnet_factory(NODES)
    writer, reader = devnet.nodes[0], devnet.nodes[-1]
    assert wait_for(lambda: members_online(writer, NODES), SETTLE_SECONDS) is True
    # Each node probes one member per probe interval, so the first probes take a moment.
    for node in (writer, reader):
        assert wait_for(lambda: probes_exchanged(node), SETTLE_SECONDS) is True

    for key in KEYS:
        status, body, _ = api_post(
            writer.api_url, "/data/store/", {"key": key, "value": {"k": key}, "replicas": NODES}
        )
        assert status == 200, body
        assert body["replicas"]["stored"] == NODES, body
    for key in KEYS:
        status, body, _ = api_get(reader.api_url, "/data/retrieve/", key=key)
        assert status == 200, body
    status, body, _ = api_get(reader.api_url, "/data/retrieve/", key="metrics-absent")
    assert status == 404, body
    status, body, _ = api_get(reader.api_url, "/no/such/route")
    assert status == 404, body

    written = scrape(writer)
    read = scrape(reader)

    # API requests by route, method and status, with their latency histogram.
    requests = "voxanode_http_requests_total"
    assert value(written, requests, route="/data/store/", method="POST", status="200") == len(KEYS)
    assert value(read, requests, route="/data/retrieve/", method="GET", status="200") == len(KEYS)
    assert value(read, requests, route="/data/retrieve/", method="GET", status="404") == 1
    assert value(read, requests, route="unmatched", method="GET", status="404") == 1
    latency = "voxanode_http_request_duration_seconds"
    assert value(written, latency + "_count", route="/data/store/") == len(KEYS)
    assert value(written, latency + "_bucket", route="/data/store/", le="+Inf") == len(KEYS)
    assert value(written, latency + "_sum", route="/data/store/") > 0

    # The DHT requests behind the stores and reads.
    assert value(written, "voxanode_dht_rpcs_sent_total", method="store") >= len(KEYS)
    assert value(read, "voxanode_dht_rpcs_received_total", method="store") >= len(KEYS)
    assert value(read, "voxanode_dht_rpcs_sent_total", method="find_value") > 0
    assert value(written, "voxanode_dht_rpcs_received_total", method="find_value") > 0
    assert total(written, "voxanode_dht_rpcs_sent_total") > 0
    assert value(written, "voxanode_dht_routing_table_peers") == NODES - 1

    # Each of the three nodes stores a copy of every key.
    for samples in (written, read):
        assert value(samples, "voxanode_dht_records") == len(KEYS)

    # Membership: probes both ways and every member online.
    for samples in (written, read):
        assert value(samples, "voxanode_gossip_messages_sent_total", kind="ping") > 0
        assert value(samples, "voxanode_gossip_messages_received_total", kind="ping") > 0
        assert value(samples, "voxanode_members", state="online") == NODES
        assert value(samples, "voxanode_members", state="offline") == 0
    assert total(written, "voxanode_peer_datagrams_received_total") > 0

    # The process collector and the node's identity.
    assert value(written, "process_resident_memory_bytes") > 0
    assert total(written, "voxanode_node_info", node_id=writer.fetch_node_id()) == 1


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)


def remove_node_containers(node_id: str) -> None:
    leftovers = docker("ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}").stdout.split()
    if leftovers:
        docker("rm", "-f", *leftovers)


def offers_apps(node, node_id: str) -> bool:
    status, body, _ = api_get(node.api_url, "/data/discover_nodes/", capability="app-deployment")
    return status == 200 and node_id in {entry["node_id"] for entry in body["nodes"]}


def test_metrics_show_app_instances_and_docker_calls(devnet_factory, test_image):
    devnet = devnet_factory(1, extra_args=APP_ARGS)
    node = devnet.nodes[0]
    node_id = node.fetch_node_id()
    assert wait_for(lambda: offers_apps(node, node_id), SETTLE_SECONDS) is True

    try:
        status, deployed, _ = api_post(
            node.api_url,
            "/apps/add_app/",
            {
                "name": "metrics-web",
                "image": test_image,
                "replicas": 1,
                "ports": [{"container_port": 8080}],
                "resources": {"memory": "64m", "cpu": 0.2},
            },
            timeout=120,
        )
        assert status == 200, deployed

        def running():
            # The app's phase becomes running with the instance report that follows the
            # container's start, so the two gauges can differ for a moment.
            samples = scrape(node)
            local = value(samples, "voxanode_app_instances", state="running")
            phase_running = value(samples, "voxanode_catalogue_apps", phase="running")
            if local == 1 and phase_running == 1:
                return True
            return f"{local} instances running, {phase_running} apps in phase running"

        assert wait_for(running, APP_READY_SECONDS) is True
        samples = scrape(node)

        assert value(samples, "voxanode_catalogue_app_instances", state="running") == 1
        assert value(samples, "voxanode_app_instances", state="failed") == 0
        assert value(samples, "voxanode_catalogue_apps", phase="running") == 1
        assert value(samples, "voxanode_docker_engine_available") == 1
        calls = "voxanode_docker_call_duration_seconds"
        assert value(samples, calls + "_count", operation="create_and_start") >= 1
        assert value(samples, calls + "_sum", operation="create_and_start") > 0
        assert value(samples, calls + "_count", operation="connect") == 1
        assert total(samples, calls + "_count") > value(samples, calls + "_count", operation="create_and_start")

        status, stopped, _ = api_post(
            node.api_url, "/apps/add_stop_app/", {"app_id": deployed["app_id"], "force": True}, timeout=60
        )
        assert status == 200, stopped

        def stopped_in_catalogue():
            samples = scrape(node)
            phases = {phase: value(samples, "voxanode_catalogue_apps", phase=phase) for phase in ("running", "stopped")}
            return True if phases == {"running": 0, "stopped": 1} else phases

        assert wait_for(stopped_in_catalogue, APP_READY_SECONDS) is True
    finally:
        remove_node_containers(node_id)


def create_read_token(node) -> str:
    """Create a read token with the real `voxanode token` command; return the token."""
    environ = {name: text for name, text in os.environ.items() if not name.startswith("VOXA_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    completed = subprocess.run(
        [sys.executable, "-m", "voxanode", "token", "create", "--scope", "read",
         "--name", "prometheus", "--data-dir", str(node.data_dir)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.splitlines()[-1]


def test_metrics_need_a_token_without_dev(devnet_factory):
    devnet = devnet_factory(1, extra_args=("--no-dev",))
    node = devnet.nodes[0]

    status, body, headers = api_get(node.api_url, "/metrics")
    assert status == 401, body
    assert body["error"]["code"] == "AUTHENTICATION_REQUIRED"
    assert headers["WWW-Authenticate"].startswith("Bearer")

    token = create_read_token(node)
    # The node reads its token file at most once a second.
    authorized = {"Authorization": f"Bearer {token}"}
    assert wait_for(
        lambda: api_get(node.api_url, "/metrics", headers=authorized).status == 200,
        TOKEN_FILE_CHECK_WAIT_SECONDS,
    ) is True
    status, text, headers = api_get(node.api_url, "/metrics", headers=authorized)
    assert status == 200, text
    assert headers["Content-Type"].startswith(PROMETHEUS_CONTENT_TYPE)
    families = {family.name for family in text_string_to_metric_families(text)}
    assert "voxanode_http_requests" in families
    # The status category is unlimited by default, so a scrape carries no rate limit.
    assert "X-RateLimit-Limit" not in headers
