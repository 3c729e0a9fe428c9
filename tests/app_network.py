"""A 3-node devnet whose nodes all offer app deployment, for the app and ingress tests.

`app_devnet` starts the network, waits until every node lists every node with the
`app-deployment` capability, and at the end stops the nodes and removes every
container they made, found by the node id label.
"""

import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

from helpers import FAST_DAEMON_ARGS, api_get, wait_for
from voxanode.devnet import Devnet, allocate_free_block

APP_ARGS = (
    "--apps-reconcile-interval-seconds", "1",
    "--apps-stats-interval-seconds", "2",
    "--apps-sync-interval-seconds", "3",
    "--apps-stop-timeout-seconds", "2",
)
SETTLE_SECONDS = 30
NODE_LABEL = "io.voxanode.node-id"
APP_LABEL = "io.voxanode.app-id"
NETWORK_SIZE = 3


def offers_apps(node, node_ids) -> bool:
    """Return whether `node` lists every node of `node_ids` as able to run apps."""
    status, body, _ = api_get(node.api_url, "/data/discover_nodes/", capability="app-deployment")
    return status == 200 and {n["node_id"] for n in body["nodes"]} >= set(node_ids)


@contextlib.contextmanager
def app_devnet(base_dir: Path) -> Iterator[Devnet]:
    """Run a 3-node app network in `base_dir` and remove its containers afterwards."""
    block = allocate_free_block(NETWORK_SIZE + 1, random.Random())
    devnet = Devnet(
        NETWORK_SIZE,
        base_dir,
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=list(FAST_DAEMON_ARGS) + list(APP_ARGS),
    )
    devnet.start()
    node_ids = [node.fetch_node_id() for node in devnet.nodes]
    try:
        assert wait_for(lambda: all(offers_apps(node, node_ids) for node in devnet.nodes), SETTLE_SECONDS) is True
        yield devnet
    finally:
        devnet.stop()
        for node_id in node_ids:
            leftovers = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}"],
                capture_output=True, text=True, timeout=60,
            ).stdout.split()
            if leftovers:
                subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True, timeout=60)
