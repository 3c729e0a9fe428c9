"""Data stored through one node's REST API, retrieved through others, on real nodes.

Every test starts real daemon processes on their own loopback addresses with the
devnet harness, using short republish and timeout intervals.
"""

import sqlite3
import time

import pytest

from helpers import api_get, api_post
from voxanode.dht.records import dht_key_for

NODES = 5
# Republish runs every 2 s in the fast test settings and an RPC times out after 1 s,
# so a lost copy is back within about two rounds. The bound leaves room for a slow
# machine.
REREPLICATION_BOUND_SECONDS = 20
MAX_VALUE_BYTES = 65536


@pytest.fixture
def network(devnet_factory):
    return devnet_factory(NODES)


def store(node, key, value, ttl=600, replicas=3):
    return api_post(node.api_url, "/data/store/", {"key": key, "value": value, "ttl": ttl, "replicas": replicas})


def retrieve(node, key):
    return api_get(node.api_url, "/data/retrieve/", key=key)


def holds_record(node, key) -> bool:
    """Read the node's own SQLite file: does it hold an unexpired copy of `key`?"""
    path = node.data_dir / "records.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM records WHERE dht_key = ? AND expires_ms > ?",
            (dht_key_for(key), int(time.time() * 1000)),
        ).fetchone()
    return row[0] == 1


def node_by_id(network, node_id):
    for node in network.nodes:
        if node.fetch_node_id() == node_id:
            return node
    raise AssertionError(f"no node has id {node_id}")


def test_store_on_first_retrieve_on_last(network):
    first, last = network.nodes[0], network.nodes[-1]
    value = {"theme": "dark", "language": "en", "nested": [1, 2.5, None, True, "é"]}

    status, body, headers = store(first, "user-settings-123", value)
    assert status == 200, body
    assert body["success"] is True
    assert len(body["storage_nodes"]) == 3
    assert len(set(body["storage_nodes"])) == 3
    assert body["replicas"] == {"requested": 3, "stored": 3}
    assert "warnings" not in body
    assert headers["X-Request-ID"]

    status, body, _ = retrieve(last, "user-settings-123")
    assert status == 200, body
    assert body["value"] == value
    assert body["metadata"]["replicas"] == 3
    assert body["metadata"]["source_node"] == first.fetch_node_id()


def test_holder_killed_record_survives_and_rereplicates(network):
    status, body, _ = store(network.nodes[0], "survivor", {"n": 1})
    assert status == 200, body
    holders = [node_by_id(network, node_id) for node_id in body["storage_nodes"]]
    victim = next(node for node in holders if node is not network.nodes[0]) if len(holders) > 1 else holders[0]
    victim.kill()
    reader = next(node for node in network.nodes if node is not victim and node not in holders[:1])

    status, body, _ = retrieve(reader, "survivor")
    assert status == 200, body
    assert body["value"] == {"n": 1}

    # Count copies straight from each live node's database, so read repair by a
    # retrieve cannot stand in for the republish loop.
    live = [node for node in network.nodes if node is not victim]
    deadline = time.monotonic() + REREPLICATION_BOUND_SECONDS
    copies = 0
    while time.monotonic() < deadline:
        copies = sum(holds_record(node, "survivor") for node in live)
        if copies >= 3:
            break
        time.sleep(0.5)
    assert copies >= 3, f"only {copies} live copies after {REREPLICATION_BOUND_SECONDS} s"


def test_restarted_node_keeps_its_records(network):
    status, body, _ = store(network.nodes[1], "persistent", {"kept": True})
    assert status == 200, body
    holder = node_by_id(network, body["storage_nodes"][0])

    assert holder.restart() == 0
    holder.wait_ready()
    assert holds_record(holder, "persistent")
    status, body, _ = retrieve(holder, "persistent")
    assert status == 200, body
    assert body["value"] == {"kept": True}

    # Peers still hold session keys of the holder's previous run; storing on every
    # node makes them renew those sessions with the restarted holder.
    others = [node for node in network.nodes if node is not holder]
    status, body, _ = store(others[0], "after-restart", {"v": 1}, replicas=NODES)
    assert status == 200, body
    assert body["replicas"] == {"requested": NODES, "stored": NODES}


def test_value_at_limit_round_trips(network):
    # Compact JSON of {"blob":"xx..."} is 11 bytes plus the string.
    value = {"blob": "x" * (MAX_VALUE_BYTES - 11)}
    status, body, _ = store(network.nodes[0], "big", value)
    assert status == 200, body
    assert len(body["storage_nodes"]) == 3

    status, body, _ = retrieve(network.nodes[4], "big")
    assert status == 200, body
    assert body["value"] == value


def test_value_over_limit_is_413(network):
    value = {"blob": "x" * (65 * 1024)}
    status, body, _ = store(network.nodes[0], "too-big", value)
    assert status == 413
    assert body["success"] is False
    assert body["error"]["code"] == "INVALID_REQUEST"
    assert body["error"]["details"]["field"] == "value"
    assert str(MAX_VALUE_BYTES) in body["error"]["details"]["issue"]
    assert retrieve(network.nodes[1], "too-big").status == 404


def test_updated_key_is_newest_everywhere(network):
    assert store(network.nodes[0], "counter", {"v": 1}).status == 200
    time.sleep(0.01)
    assert store(network.nodes[3], "counter", {"v": 2}).status == 200
    for node in network.nodes:
        status, body, _ = retrieve(node, "counter")
        assert status == 200, body
        assert body["value"] == {"v": 2}, node


def test_expired_key_is_404_everywhere(network):
    status, body, _ = store(network.nodes[2], "short-lived", {"v": 1}, ttl=1)
    assert status == 200, body
    assert retrieve(network.nodes[0], "short-lived").status == 200
    time.sleep(2.2)
    for node in network.nodes:
        status, body, _ = retrieve(node, "short-lived")
        assert status == 404, (node, body)
        assert body["error"]["code"] == "RESOURCE_NOT_FOUND"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"key": "", "value": 1}, "key"),
        ({"key": "k" * 513, "value": 1}, "key"),
        ({"key": "k", "value": 1, "ttl": 0}, "ttl"),
        ({"key": "k", "value": 1, "ttl": -5}, "ttl"),
        ({"key": "k", "value": 1, "ttl": 10**9}, "ttl"),
        ({"key": "k", "value": 1, "replicas": 0}, "replicas"),
        ({"key": "k", "value": 1, "replicas": 21}, "replicas"),
        ({"key": "k", "value": 1, "replicas": "3"}, "replicas"),
        ({"value": 1}, "key"),
        ({"key": "k"}, "value"),
    ],
)
def test_store_rejects_bad_input(devnet_factory, body, field):
    node = devnet_factory(1).nodes[0]
    status, reply, headers = api_post(node.api_url, "/data/store/", body)
    assert status == 400, reply
    assert reply["error"]["code"] == "INVALID_REQUEST"
    assert reply["error"]["details"]["field"] == field
    assert reply["request_id"] == headers["X-Request-ID"]


def test_store_reports_fewer_holders_honestly(devnet_factory):
    network = devnet_factory(2)
    status, body, _ = store(network.nodes[0], "few", {"v": 1}, replicas=3)
    assert status == 200, body
    assert body["replicas"] == {"requested": 3, "stored": 2}
    assert len(body["storage_nodes"]) == 2
    assert body["warnings"]
