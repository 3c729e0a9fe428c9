"""A network key on real nodes: keyed networks work, outsiders cannot join, keys rotate.

Every test starts real daemon processes through the devnet harness. Keys reach the
nodes the three ways a user can give them: the --network-key flag, the
VOXA_NETWORK_KEY variable, and each node's settings file.
"""

import base64
import hashlib
import json
import os
import time

import pytest

from helpers import api_get, api_post

WAIT_TIMEOUT_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.2
# Join retries run every second in the fast test settings, so an outsider has tried
# several times once every member counted this many of its datagrams.
OUTSIDER_ATTEMPTS = 3


def new_key() -> bytes:
    return os.urandom(32)


def as_base64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def fingerprint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def write_keys(node, primary: bytes | None, accepted: tuple[bytes, ...] = ()) -> None:
    """Write the node's settings file with its network keys, read at its next start."""
    node.data_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "network_key": as_base64(primary) if primary is not None else None,
        "network_keys_accepted": [as_base64(key) for key in accepted],
    }
    (node.data_dir / "settings.json").write_text(json.dumps(document), encoding="utf-8")


def network_info(node) -> dict:
    status, body, _ = api_get(node.api_url, "/status/system")
    assert status == 200, body
    return body["network_info"]


def connected_peers(node) -> int:
    return network_info(node)["connected_peers"]


def drops(node, reason: str) -> int:
    return network_info(node)["datagrams_dropped"].get(reason, 0)


def wait_until(condition, description: str, timeout: float = WAIT_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {description}")
        time.sleep(POLL_INTERVAL_SECONDS)


def wait_fully_connected(nodes) -> None:
    expected = len(nodes) - 1
    for node in nodes:
        wait_until(
            lambda node=node: connected_peers(node) == expected,
            f"node {node.index} has {expected} connected peers",
        )


def store(node, key: str, value, replicas: int = 3):
    return api_post(node.api_url, "/data/store/", {"key": key, "value": value, "ttl": 600, "replicas": replicas})


def retrieve(node, key: str):
    return api_get(node.api_url, "/data/retrieve/", key=key)


def assert_store_and_retrieve(writer, reader, key: str, replicas: int = 3) -> None:
    value = {"key": key, "written_by": writer.index}
    status, body, _ = store(writer, key, value, replicas)
    assert status == 200, body
    assert body["replicas"] == {"requested": replicas, "stored": replicas}, body

    status, body, _ = retrieve(reader, key)
    assert status == 200, body
    assert body["value"] == value


def log_text(node) -> str:
    return node.log_path.read_text(encoding="utf-8", errors="replace")


# A keyed network


def test_keyed_nodes_form_network(devnet_factory):
    key = new_key()
    network = devnet_factory(3, extra_args=["--network-key", key.hex()])
    first, middle, last = network.nodes

    wait_fully_connected(network.nodes)
    assert_store_and_retrieve(first, last, "keyed-value")
    assert_store_and_retrieve(last, middle, "keyed-value-2")

    for node in network.nodes:
        assert drops(node, "unsealed") == 0
        log = log_text(node)
        sealed_lines = [line for line in log.splitlines() if "peer datagrams are sealed" in line]
        assert len(sealed_lines) == 1, log
        assert f"fingerprint={fingerprint(key)} also_accepted=none" in sealed_lines[0]
        assert " INFO " in sealed_lines[0]
        assert "no network_key is set" not in log
        assert key.hex() not in log
        assert as_base64(key) not in log


# Outsiders


@pytest.mark.parametrize("outsider_key", ["wrong key", "no key"])
def test_outsider_is_never_admitted(devnet_factory, outsider_key):
    key = new_key()
    # Node 3 bootstraps from all three members, so each of them hears from it.
    network = devnet_factory(4, start=False, bootstrap_count=3)
    members, outsider = network.nodes[:3], network.nodes[3]
    for node in members:
        write_keys(node, key)
    if outsider_key == "wrong key":
        outsider.env = {"VOXA_NETWORK_KEY": as_base64(new_key())}
    network.start()

    wait_fully_connected(members)
    for node in members:
        wait_until(
            lambda node=node: drops(node, "unsealed") >= OUTSIDER_ATTEMPTS,
            f"member {node.index} dropped {OUTSIDER_ATTEMPTS} datagrams of the outsider",
        )
    assert connected_peers(outsider) == 0
    for node in members:
        assert connected_peers(node) == 2

    # A store through the outsider stays on the outsider.
    status, body, _ = store(outsider, "outsider-value", {"from": "outsider"})
    assert status == 200, body
    assert body["replicas"] == {"requested": 3, "stored": 1}
    assert body["storage_nodes"] == [outsider.fetch_node_id()]
    assert body["warnings"]
    status, body, _ = retrieve(members[0], "outsider-value")
    assert status == 404, body

    # A store through a member reaches the members only.
    assert_store_and_retrieve(members[0], members[2], "member-value")
    status, body, _ = retrieve(outsider, "member-value")
    assert status == 404, body

    assert connected_peers(outsider) == 0
    assert network_info(outsider)["total_connections"] == 0
    for node in members:
        assert connected_peers(node) == 2
    if outsider_key == "no key":
        assert "no network_key is set" in log_text(outsider)


def test_keyed_node_cannot_join_open_network(devnet_factory):
    key = new_key()
    network = devnet_factory(4, start=False, bootstrap_count=3)
    members, outsider = network.nodes[:3], network.nodes[3]
    write_keys(outsider, key)
    network.start()

    wait_fully_connected(members)
    for node in members:
        # A sealed datagram does not start with a frame magic.
        wait_until(
            lambda node=node: drops(node, "bad_magic") >= OUTSIDER_ATTEMPTS,
            f"member {node.index} dropped {OUTSIDER_ATTEMPTS} datagrams of the keyed node",
        )
    assert connected_peers(outsider) == 0
    for node in members:
        assert connected_peers(node) == 2
    assert_store_and_retrieve(members[1], members[0], "open-value")

    # Each open node warns once at start that any host can join.
    for node in members:
        open_lines = [line for line in log_text(node).splitlines() if "no network_key is set" in line]
        assert len(open_lines) == 1
        assert " WARNING " in open_lines[0]
        assert f"udp={node.peer_address}" in open_lines[0]
    assert f"fingerprint={fingerprint(key)}" in log_text(outsider)


# Rotation


def test_key_rotation_keeps_network_connected(devnet_factory):
    old_key, new_key_ = new_key(), new_key()
    network = devnet_factory(3, start=False)
    nodes = network.nodes
    for node in nodes:
        write_keys(node, old_key)
    network.start()
    wait_fully_connected(nodes)
    assert_store_and_retrieve(nodes[0], nodes[2], "before-rotation")

    # Each step restarts the nodes one by one, so old and new settings meet.
    steps = [
        ("accept-new", old_key, (new_key_,)),
        ("seal-new", new_key_, (old_key,)),
        ("drop-old", new_key_, ()),
    ]
    for step, primary, accepted in steps:
        for node in nodes:
            # Every pair of nodes shared a key since this node last started.
            assert drops(node, "unsealed") == 0, (step, node.index)
            write_keys(node, primary, accepted)
            node.restart()
            node.wait_ready()

            wait_fully_connected(nodes)
            neighbor = nodes[(node.index + 1) % len(nodes)]
            assert_store_and_retrieve(node, neighbor, f"{step}-node-{node.index}")
            status, body, _ = retrieve(node, "before-rotation")
            assert status == 200, (step, node.index, body)

    for node in nodes:
        assert drops(node, "unsealed") == 0
        log = log_text(node)
        assert f"fingerprint={fingerprint(new_key_)} also_accepted=none" in log
        assert as_base64(old_key) not in log
        assert as_base64(new_key_) not in log
