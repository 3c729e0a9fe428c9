"""DHT benchmark: voxanode against a bare kademlia network, measured in one run.

Starts N voxanode nodes (voxanode.devnet, default ksize, replicas=3 on every store) and
N baseline nodes (bench/bare_kademlia_node.py: kademlia.network.Server with ksize 3,
so a value sits on 3 of the N nodes and most gets leave the node asked) on two
separate random loopback blocks. After a warm-up it runs, for each network in turn:

- REQUESTS stores of small JSON values, each through a random node's REST API, and
  REQUESTS retrieves of those keys, each through a random other node, sequentially;
- the same again with CONCURRENCY requests in flight;

and prints per-request latency (p50, p99), throughput (requests per second), the
voxanode/bare ratios, and the idle RSS of a voxanode node after the warm-up against
the 50 MiB target. Every node process is stopped on every exit path.

    python bench/dht.py [--nodes 10] [--requests 300] [--concurrency 8] [--only bare]
"""

import argparse
import asyncio
import atexit
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import aiohttp
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from voxanode.devnet import AddressBlock, DevNode, Devnet, DevnetError, allocate_free_block  # noqa: E402

DEFAULT_NODES = 10
DEFAULT_REQUESTS = 300
DEFAULT_CONCURRENCY = 8
WARMUP_REQUESTS = 30
IDLE_SECONDS = 5.0
RSS_TARGET_MIB = 50
REPLICAS = 3
TTL_SECONDS = 3600
BARE_KSIZE = 3
REQUEST_TIMEOUT_SECONDS = 30.0
READY_TIMEOUT_SECONDS = 90.0
VALUE_PAYLOAD_CHARS = 64
MIB = 1024 * 1024
BARE_NODE_SCRIPT = BENCH_DIR / "bare_kademlia_node.py"
# The benches send more requests than the default rate limits allow.
VOXANODE_ARGS = ("--dev", "--log-level", "WARNING", "--rate-limit-default", "unlimited", "--rate-limit-data", "unlimited", "--rate-limit-deployments", "unlimited")


class BareKademliaNode(DevNode):
    """A devnet node that runs the baseline wrapper instead of the voxanode daemon."""

    def command(self, extra_args: Sequence[str] = ()) -> list[str]:
        argv = [
            sys.executable, str(BARE_NODE_SCRIPT),
            "--api-host", self.api_host, "--api-port", str(self.api_port),
            "--peer-host", self.peer_host, "--peer-port", str(self.peer_port),
            "--ksize", str(BARE_KSIZE),
        ]
        for peer in self.bootstrap:
            argv += ["--bootstrap", peer]
        return argv + list(extra_args)


class BareKademliaDevnet(Devnet):
    node_class = BareKademliaNode


@dataclass
class PhaseResult:
    """Latencies and failures of one phase (one operation and mode) on one network."""

    latencies_seconds: list[float] = field(default_factory=list)
    failures: int = 0
    elapsed_seconds: float = 0.0
    first_failure: str = ""

    @property
    def total(self) -> int:
        return len(self.latencies_seconds)

    def percentile_ms(self, percent: int) -> float:
        if len(self.latencies_seconds) < 2:
            return self.latencies_seconds[0] * 1000 if self.latencies_seconds else float("nan")
        return statistics.quantiles(self.latencies_seconds, n=100, method="inclusive")[percent - 1] * 1000

    @property
    def throughput(self) -> float:
        return self.total / self.elapsed_seconds if self.elapsed_seconds else float("nan")


@dataclass
class Network:
    """One network under test and the keys stored into it so far."""

    name: str
    devnet: Devnet
    stored: dict[str, tuple[int, object]] = field(default_factory=dict)
    results: dict[str, PhaseResult] = field(default_factory=dict)


# --- requests ------------------------------------------------------------------------


def make_value(sequence: int) -> dict:
    return {"n": sequence, "payload": "v" * VALUE_PAYLOAD_CHARS}


def parse_reply(text: str) -> object:
    """Return the parsed JSON reply, or the text itself when it is not JSON (e.g. a bare 500 page)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


async def store_once(session: aiohttp.ClientSession, network: Network, key: str, value: object) -> str | None:
    """Store `value` under `key` through a random node; return None on success, else the reason."""
    node_index = random.randrange(len(network.devnet.nodes))
    url = network.devnet.nodes[node_index].api_url + "/data/store/"
    body = {"key": key, "value": value, "replicas": REPLICAS, "ttl": TTL_SECONDS}
    async with session.post(url, json=body) as response:
        reply = parse_reply(await response.text())
    if response.status != 200 or not isinstance(reply, dict) or reply.get("success") is not True:
        return f"store {key} via node {node_index}: HTTP {response.status} {str(reply)[:200]}"
    network.stored[key] = (node_index, value)
    return None


async def retrieve_once(session: aiohttp.ClientSession, network: Network, key: str) -> str | None:
    """Retrieve `key` through a node other than the one that stored it; check the value."""
    stored_by, expected = network.stored[key]
    choices = [index for index in range(len(network.devnet.nodes)) if index != stored_by] or [stored_by]
    node_index = random.choice(choices)
    url = network.devnet.nodes[node_index].api_url + "/data/retrieve/"
    async with session.get(url, params={"key": key}) as response:
        reply = parse_reply(await response.text())
    if response.status != 200 or not isinstance(reply, dict) or reply.get("value") != expected:
        return f"retrieve {key} via node {node_index}: HTTP {response.status} {str(reply)[:200]}"
    return None


async def timed(operation: Callable[[], Awaitable[str | None]], result: PhaseResult) -> None:
    started = time.perf_counter()
    try:
        failure = await operation()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        failure = f"{exc.__class__.__name__}: {exc}"
    result.latencies_seconds.append(time.perf_counter() - started)
    if failure:
        result.failures += 1
        result.first_failure = result.first_failure or failure


async def run_phase(operations: list[Callable[[], Awaitable[str | None]]], concurrency: int) -> PhaseResult:
    """Run the operations with at most `concurrency` in flight (1 means one after another)."""
    result = PhaseResult()
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(operation: Callable[[], Awaitable[str | None]]) -> None:
        async with semaphore:
            await timed(operation, result)

    started = time.perf_counter()
    if concurrency == 1:
        for operation in operations:
            await timed(operation, result)
    else:
        await asyncio.gather(*(bounded(operation) for operation in operations))
    result.elapsed_seconds = time.perf_counter() - started
    return result


def store_operations(session: aiohttp.ClientSession, network: Network, prefix: str, count: int) -> list[Callable[[], Awaitable[str | None]]]:
    keys = [f"{prefix}-{sequence}" for sequence in range(count)]
    return [lambda key=key, sequence=sequence: store_once(session, network, key, make_value(sequence)) for sequence, key in enumerate(keys)]


def retrieve_operations(session: aiohttp.ClientSession, network: Network, prefix: str) -> list[Callable[[], Awaitable[str | None]]]:
    keys = [key for key in network.stored if key.startswith(prefix + "-")]
    random.shuffle(keys)
    return [lambda key=key: retrieve_once(session, network, key) for key in keys]


# --- the run ----------------------------------------------------------------------------


async def warm_up(networks: list[Network]) -> None:
    """Store and retrieve a few keys on every network, unmeasured."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for network in networks:
            prefix = f"warmup-{uuid.uuid4().hex[:8]}"
            stores = await run_phase(store_operations(session, network, prefix, WARMUP_REQUESTS), 1)
            retrieves = await run_phase(retrieve_operations(session, network, prefix), 1)
            print(f"{network.name}: warm-up: {stores.failures} of {stores.total} stores and "
                  f"{retrieves.failures} of {retrieves.total} retrieves failed", flush=True)
            if stores.first_failure or retrieves.first_failure:
                print(f"{network.name}: first warm-up failure: {stores.first_failure or retrieves.first_failure}", flush=True)


async def measure(networks: list[Network], requests: int, concurrency: int) -> None:
    """Run each phase on each network in turn, so slow drift of the machine hits both alike."""
    run_id = uuid.uuid4().hex[:8]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=max(concurrency * 2, 16))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # (label, requests in flight, operation, key group): each retrieve phase reads the
        # keys that the store phase of its group wrote.
        phases = [
            ("store sequential", 1, "store", "sequential"),
            ("retrieve sequential", 1, "retrieve", "sequential"),
            (f"store concurrency {concurrency}", concurrency, "store", "concurrent"),
            (f"retrieve concurrency {concurrency}", concurrency, "retrieve", "concurrent"),
        ]
        for phase, phase_concurrency, operation, group in phases:
            for network in networks:
                prefix = f"{run_id}-{group}"
                if operation == "store":
                    operations = store_operations(session, network, prefix, requests)
                else:
                    operations = retrieve_operations(session, network, prefix)
                result = await run_phase(operations, phase_concurrency)
                network.results[phase] = result
                print(f"{network.name}: {phase}: {result.total - result.failures}/{result.total} ok in {result.elapsed_seconds:.1f} s", flush=True)


async def warm_up_and_measure(networks: list[Network], args: argparse.Namespace, rss: dict[str, tuple[int, int]]) -> None:
    """Warm up, let every node sit idle, read the RSS, then run the measured phases."""
    await warm_up(networks)
    await asyncio.sleep(IDLE_SECONDS)
    for network in networks:
        rss[network.name] = idle_rss(network)
    await measure(networks, args.requests, args.concurrency)


def idle_rss(network: Network) -> tuple[int, int]:
    """Return (RSS of node 1, or node 0 when alone; max RSS over all nodes) in bytes."""
    sizes = [psutil.Process(node.pid).memory_info().rss for node in network.devnet.nodes]
    return sizes[min(1, len(sizes) - 1)], max(sizes)


def print_report(networks: list[Network], rss: dict[str, tuple[int, int]], args: argparse.Namespace) -> None:
    print()
    print(f"DHT benchmark: {args.nodes} nodes per network, {args.requests} requests per phase, "
          f"concurrency {args.concurrency}; {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}")
    header = f"{'network':<10} {'phase':<24} {'ok/total':>10} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}"
    print(header)
    print("-" * len(header))
    phases = list(networks[0].results)
    for phase in phases:
        for network in networks:
            result = network.results[phase]
            ok = f"{result.total - result.failures}/{result.total}"
            print(f"{network.name:<10} {phase:<24} {ok:>10} {result.percentile_ms(50):>9.2f} {result.percentile_ms(99):>9.2f} {result.throughput:>9.1f}")
    for network in networks:
        for phase, result in network.results.items():
            if result.first_failure:
                print(f"{network.name}: first failure in {phase}: {result.first_failure}")

    by_name = {network.name: network for network in networks}
    if "voxanode" in by_name and "bare" in by_name:
        print()
        print("ratios voxanode/bare (latency > 1 or throughput < 1 means voxanode is slower)")
        print(f"{'phase':<24} {'p50':>7} {'p99':>7} {'req/s':>7}")
        for phase in phases:
            ours, bare = by_name["voxanode"].results[phase], by_name["bare"].results[phase]
            print(f"{phase:<24} {ours.percentile_ms(50) / bare.percentile_ms(50):>7.2f} "
                  f"{ours.percentile_ms(99) / bare.percentile_ms(99):>7.2f} {ours.throughput / bare.throughput:>7.2f}")

    print()
    for name, (one, largest) in rss.items():
        verdict = ""
        if name == "voxanode":
            verdict = "  within" if one <= RSS_TARGET_MIB * MIB else "  OVER"
            verdict += f" the {RSS_TARGET_MIB} MiB target"
        print(f"idle RSS {name}: one node {one / MIB:.1f} MiB (max over nodes {largest / MIB:.1f} MiB){verdict}")


def pick_blocks(count: int, size: int) -> list[AddressBlock]:
    """Allocate `count` free loopback blocks whose /24 prefixes differ."""
    blocks: list[AddressBlock] = []
    while len(blocks) < count:
        block = allocate_free_block(size)
        if all(block.first_address.rsplit(".", 1)[0] != other.first_address.rsplit(".", 1)[0] for other in blocks):
            blocks.append(block)
    return blocks


def build_networks(args: argparse.Namespace, base_dir: Path) -> list[Network]:
    kinds = ["voxanode", "bare"] if args.only == "both" else [args.only]
    networks = []
    for kind, block in zip(kinds, pick_blocks(len(kinds), args.nodes), strict=True):
        devnet_class, extra_args = (Devnet, VOXANODE_ARGS) if kind == "voxanode" else (BareKademliaDevnet, ())
        devnet = devnet_class(
            args.nodes,
            base_dir / kind,
            first_address=block.first_address,
            api_port=block.api_port,
            peer_port=block.peer_port,
            extra_args=extra_args,
            ready_timeout=READY_TIMEOUT_SECONDS,
        )
        networks.append(Network(kind, devnet))
    return networks


def stop_all(networks: list[Network]) -> None:
    for network in networks:
        network.devnet.stop(timeout=10)


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark voxanode's DHT against a bare kademlia network on loopback.")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="nodes per network (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="stores, and retrieves, per phase (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight in the concurrent phases (default: %(default)s)")
    parser.add_argument("--only", choices=["both", "voxanode", "bare"], default="both", help="networks to measure (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-dir", action="store_true", help="keep the node data directories and logs")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.requests < 2 or args.concurrency < 1:
        parser.error("--nodes and --requests must be >= 2, --concurrency >= 1")
    return args


def write_json(path: Path, networks: list[Network], rss: dict[str, tuple[int, int]], args: argparse.Namespace) -> None:
    figures = {
        "nodes": args.nodes, "requests": args.requests, "concurrency": args.concurrency,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "networks": {
            network.name: {
                phase: {"ok": result.total - result.failures, "total": result.total, "p50_ms": result.percentile_ms(50),
                        "p99_ms": result.percentile_ms(99), "requests_per_second": result.throughput}
                for phase, result in network.results.items()
            }
            for network in networks
        },
        "idle_rss_bytes": {name: {"one_node": one, "max": largest} for name, (one, largest) in rss.items()},
    }
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base_dir = Path(tempfile.mkdtemp(prefix="voxanode-bench-"))
    networks = build_networks(args, base_dir)
    atexit.register(stop_all, networks)
    signal.signal(signal.SIGTERM, raise_system_exit)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C or kill -INT must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        for network in networks:
            print(f"{network.name}: starting {args.nodes} nodes from {network.devnet.first_address}", flush=True)
            network.devnet.start()

        rss: dict[str, tuple[int, int]] = {}
        asyncio.run(warm_up_and_measure(networks, args, rss))
        print_report(networks, rss, args)
        if args.json:
            write_json(args.json, networks, rss, args)
        print(f"total time {time.monotonic() - started:.0f} s")
        return 0
    except DevnetError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every node", file=sys.stderr)
        return 130
    finally:
        stop_all(networks)
        if args.keep_dir:
            print(f"node data and logs kept in {base_dir}")
        else:
            shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
