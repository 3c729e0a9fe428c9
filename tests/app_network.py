"""A 3-node devnet whose nodes all offer app deployment, for the app and ingress tests.

`app_devnet` starts the network, waits until every node lists every node with the
`app-deployment` capability, and at the end stops the nodes and removes every
container they made, found by the node id label. With `ingress=True` every node also
serves the host-routed ingress (`--ingress-port`) on its API address, at the port
that `ingress_url` names.
"""

import contextlib
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from helpers import FAST_DAEMON_ARGS, api_get, wait_for
from voxanode.devnet import AddressBlock, Devnet, allocate_free_block, is_port_free, node_address

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
# The ingress port of a network started with ingress=True is its API port plus this.
INGRESS_PORT_OFFSET = 1
FREE_BLOCK_ATTEMPTS = 20


def offers_apps(node, node_ids) -> bool:
    """Return whether `node` lists every node of `node_ids` as able to run apps."""
    status, body, _ = api_get(node.api_url, "/data/discover_nodes/", capability="app-deployment")
    return status == 200 and {n["node_id"] for n in body["nodes"]} >= set(node_ids)


def ingress_url(node) -> str:
    """Return the base URL of a node's host-routed ingress in a network started with ingress=True."""
    return f"http://{node.api_host}:{node.api_port + INGRESS_PORT_OFFSET}"


def free_block(ingress: bool) -> AddressBlock:
    """Return a free address block; with `ingress`, one whose ingress port is free too."""
    rng = random.Random()
    for _ in range(FREE_BLOCK_ATTEMPTS):
        block = allocate_free_block(NETWORK_SIZE + 1, rng)
        addresses = [node_address(block.first_address, index) for index in range(NETWORK_SIZE)]
        ingress_port = block.api_port + INGRESS_PORT_OFFSET
        if not ingress or all(is_port_free(address, ingress_port, socket.SOCK_STREAM) for address in addresses):
            return block
    raise RuntimeError(f"no address block with a free ingress port found in {FREE_BLOCK_ATTEMPTS} attempts")


@contextlib.contextmanager
def app_devnet(base_dir: Path, ingress: bool = False) -> Iterator[Devnet]:
    """Run a 3-node app network in `base_dir` and remove its containers afterwards."""
    block = free_block(ingress)
    extra_args = list(FAST_DAEMON_ARGS) + list(APP_ARGS)
    if ingress:
        extra_args += ["--ingress-port", str(block.api_port + INGRESS_PORT_OFFSET)]
    devnet = Devnet(
        NETWORK_SIZE,
        base_dir,
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=extra_args,
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
