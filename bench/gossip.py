"""Membership gossip benchmark: voxanode's SWIM against HashiCorp Serf agents on loopback.

For each size N (--sizes) it runs one voxanode devnet and then one Serf cluster of N
nodes, never both at once, each node on its own 127.x.y.z address, and measures:

1. join convergence: with all N nodes listing each other, one more node starts. The
   bench times its spawn until every other node lists it alive (voxanode "online", Serf
   "alive"), and the first node that lists it until the last one does;
2. failure detection: one node gets SIGKILL; the time until the first and until every
   remaining node lists it failed (voxanode "offline", Serf "failed");
3. bandwidth over two windows of --window seconds, from iptables byte counters on the
   node addresses (see TrafficAccounting); voxanode's own peer byte counters are shown
   too. The first window starts when every node lists every other node; it includes
   what a network sends just after a start, such as voxanode's first load
   announcements. The idle window starts --settle seconds after the first one ends;
   the bandwidth target applies to it;
4. RSS of each node (psutil) after the idle window.

Steps 3 and 4 run first.
Steps 1 and 2 then run --trials times on the same cluster (a new node and a different
victim each time), and the table shows the median. Member views are polled every
POLL_INTERVAL_SECONDS: voxanode through GET /data/discover_nodes/, Serf through its
RPC protocol on a kept-open connection. One `serf members` call took about 7 ms of CPU
on the 2-core test machine, so calling it for 30 agents five times a second would keep
about one core busy. `serf members -format=json` (the CLI) decides when a Serf cluster
has converged and cross-checks every timed result.

Serf runs with its default LAN profile and these flags only: -node, -bind, -advertise,
-rpc-addr (all 127.x addresses) and -join (the first agent's 127.x address). It is not
given -discover (mDNS), -retry-join, a config file or directory, event handlers or a
snapshot. When running as root, the agents run under uid/gid SERF_UID and an iptables
rule drops every packet of that uid that would leave through an interface other than lo.

Every process started here is stopped by its pid, and the iptables chain is deleted,
on every exit path the script can catch (return, error, SIGINT, SIGTERM). When the
bench itself gets SIGKILL, the kernel kills the Serf agents (setpriv --pdeathsig), but the
voxanode nodes keep running, and the next run deletes the chain left behind.

    python bench/gossip.py [--sizes 10,30] [--window 30] [--trials 5] [--only serf]
"""

import argparse
import asyncio
import atexit
import compileall
import contextlib
import ipaddress
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgpack
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import voxanode
from voxanode.devnet import (
    AddressBlock,
    Devnet,
    DevnetError,
    allocate_free_block,
    is_port_free,
    node_address,
)

DEFAULT_SIZES = "10,30"
DEFAULT_WINDOW_SECONDS = 30.0
DEFAULT_TRIALS = 5
DEFAULT_SETTLE_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.2
FULL_VIEW_POLL_INTERVAL_SECONDS = 1.0
FULL_VIEW_TIMEOUT_SECONDS = 90.0
JOIN_TIMEOUT_SECONDS = 60.0
DETECTION_TIMEOUT_SECONDS = 90.0
READY_TIMEOUT_SECONDS = 120.0
HTTP_TIMEOUT_SECONDS = 2.0
SERF_RPC_TIMEOUT_SECONDS = 2.0
SERF_CLI_TIMEOUT_SECONDS = 10.0
SERF_START_TIMEOUT_SECONDS = 10.0
SPAWN_TIMEOUT_SECONDS = 10.0
SERF_STOP_TIMEOUT_SECONDS = 5.0
DEVNET_STOP_TIMEOUT_SECONDS = 10.0
SERF_IPC_VERSION = 1
# Serf agents run under this uid and gid when the bench runs as root. No account needs
# to exist for it; the number only has to be unused by other processes on the machine.
SERF_UID = 64999
LOOPBACK_NETWORK = ipaddress.ip_network("127.0.0.0/8")
IPTABLES_CHAIN_PREFIX = "VXGOSSIP-"
IPTABLES_TIMEOUT_SECONDS = 10.0
MIB = 1024 * 1024
# Targets: voxanode/Serf time ratios at most 1, bandwidth ratio at most 2.
TIME_RATIO_TARGET = 1.0
BANDWIDTH_RATIO_TARGET = 2.0
# A time that misses its target by less than half a poll interval is reported as a tie,
# because the polling cannot resolve a difference that small.
TIE_SECONDS = POLL_INTERVAL_SECONDS / 2
# The benches send more requests than the default rate limits allow.
VOXANODE_ARGS = ("--dev", "--log-level", "INFO", "--rate-limit-default", "unlimited", "--rate-limit-data", "unlimited", "--rate-limit-deployments", "unlimited")

ALIVE = "alive"
FAILED = "failed"
VOXANODE_STATUS = {"online": ALIVE, "offline": FAILED}

logger = logging.getLogger(__name__)


class BenchError(Exception):
    """A cluster could not be set up or measured."""


# --- traffic accounting ------------------------------------------------------------------


@dataclass
class TrafficSample:
    """Byte counters of the accounting chain at one moment."""

    taken_at: float
    sent_bytes: dict[str, int]
    received_from_outside_bytes: dict[str, int]
    guard_dropped_packets: int


class TrafficAccounting:
    """Counts the bytes of every IP packet from or to the node addresses, each packet once.

    A chain of our own, jumped to from OUTPUT, holds for each node address a rule
    `-s ADDR -j RETURN`, then for each a rule `-d ADDR -j RETURN`. A locally sent packet
    traverses OUTPUT once (loopback included), and the first matching rule returns, so
    the two rule sets together count each packet once.
    The `-d` rules only see packets whose source is no node address: TCP connections
    that Serf opens without binding their source start at 127.0.0.1, so the bytes that
    the connecting agent sends are counted on the receiving agent's `-d` rule. The sum
    over all nodes is exact; the split between nodes is approximate for such streams.
    """

    def __init__(self) -> None:
        self.chain = f"{IPTABLES_CHAIN_PREFIX}{os.getpid()}"
        self.created = False
        self.guard_uid: int | None = None

    def create(self) -> None:
        """Create the chain and the jump from OUTPUT; raise BenchError when iptables fails."""
        self._remove_stale_chains()
        run_iptables(["-N", self.chain])
        self.created = True
        run_iptables(["-I", "OUTPUT", "1", "-j", self.chain])

    def add_loopback_guard(self, uid: int) -> None:
        """Drop and count every packet of `uid` that would leave through an interface other than lo."""
        run_iptables(["-I", self.chain, "1", "!", "-o", "lo", "-m", "owner", "--uid-owner", str(uid), "-j", "DROP"])
        self.guard_uid = uid

    def add_addresses(self, addresses: Sequence[str]) -> None:
        for address in addresses:
            run_iptables(["-A", self.chain, "-s", address, "-j", "RETURN"])
        for address in addresses:
            run_iptables(["-A", self.chain, "-d", address, "-j", "RETURN"])

    def sample(self) -> TrafficSample:
        """Read the byte counters of every rule in the chain."""
        output = run_iptables(["-L", self.chain, "-n", "-v", "-x"])
        sent: dict[str, int] = {}
        received: dict[str, int] = {}
        dropped = 0
        for line in output.splitlines()[2:]:
            fields = line.split()
            if len(fields) < 9:
                continue
            packets, size_bytes, target = int(fields[0]), int(fields[1]), fields[2]
            source, destination = fields[-2], fields[-1]
            if target == "DROP":
                dropped += packets
            elif destination == "0.0.0.0/0":
                sent[source] = sent.get(source, 0) + size_bytes
            elif source == "0.0.0.0/0":
                received[destination] = received.get(destination, 0) + size_bytes
        return TrafficSample(time.monotonic(), sent, received, dropped)

    def delete(self) -> None:
        """Remove the jump and the chain; safe to call twice."""
        if not self.created:
            return
        delete_chain(self.chain)
        self.created = False

    def _remove_stale_chains(self) -> None:
        # A run that was killed with SIGKILL could not delete its chain; its pid is in the name.
        listing = run_iptables(["-S"])
        for match in re.finditer(rf"^-N ({re.escape(IPTABLES_CHAIN_PREFIX)}(\d+))$", listing, re.MULTILINE):
            chain, pid = match.group(1), int(match.group(2))
            if not psutil.pid_exists(pid):
                print(f"iptables: removing chain {chain} left by an earlier run (pid {pid} is gone)", flush=True)
                delete_chain(chain)


def run_iptables(arguments: Sequence[str]) -> str:
    """Run iptables with `arguments`; return its stdout or raise BenchError naming the command."""
    command = ["iptables", "-w", *arguments]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BenchError(f"`{' '.join(command)}` failed: {error}") from error
    if completed.returncode != 0:
        raise BenchError(f"`{' '.join(command)}` failed with exit code {completed.returncode}: {completed.stderr.strip()}")
    return completed.stdout


def delete_chain(chain: str) -> None:
    """Remove every OUTPUT jump to `chain`, then flush and delete it, reporting each failed step."""
    for _ in range(10):
        try:
            run_iptables(["-D", "OUTPUT", "-j", chain])
        except BenchError:
            break
    for step in (["-F", chain], ["-X", chain]):
        try:
            run_iptables(step)
        except BenchError as error:
            print(f"iptables: cleanup step failed: {error}", file=sys.stderr, flush=True)


# --- clusters ----------------------------------------------------------------------------


class Cluster(ABC):
    """N nodes of one system on a loopback block, with the operations the measurements need."""

    name: str
    block: AddressBlock

    @abstractmethod
    def start(self) -> None:
        """Start the initial nodes and wait until each one responds."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every node this cluster started; safe to call twice."""

    @abstractmethod
    def addresses(self) -> list[str]:
        """Return every loopback address the cluster may use, added nodes included."""

    @abstractmethod
    def member_key(self, index: int) -> str:
        """Return the name under which node `index` appears in member views."""

    @abstractmethod
    def running_indices(self) -> list[int]:
        ...

    @abstractmethod
    def pid(self, index: int) -> int:
        ...

    @abstractmethod
    def kill(self, index: int) -> None:
        """Send SIGKILL to node `index` and reap it."""

    @abstractmethod
    async def spawn_node(self) -> int:
        """Start one more node joining through node 0; return its index right after the spawn."""

    @abstractmethod
    async def finish_spawn(self) -> None:
        """Wait for whatever the last spawn_node left running and raise its error."""

    @abstractmethod
    async def fetch_view(self, index: int) -> dict[str, str] | None:
        """Return node `index`'s member view as {member key: status}, or None when it did not reply."""

    async def confirm_view(self, index: int) -> dict[str, str] | None:
        """Return the member view through the system's own client; the default is fetch_view."""
        return await self.fetch_view(index)

    async def open(self) -> None:
        """Open the clients that the polling uses inside the running event loop."""

    async def close(self) -> None:
        """Close what open() opened."""

    async def peer_bytes_sent(self) -> dict[int, int] | None:
        """Return each running node's own count of peer bytes sent, when the system reports one."""
        return None


def normalize_voxanode_status(status: str) -> str:
    return VOXANODE_STATUS.get(status, status)


class VoxanodeCluster(Cluster):
    """A voxanode devnet; node views come from GET /data/discover_nodes/."""

    name = "voxanode"

    def __init__(self, size: int, capacity: int, base_dir: Path, block: AddressBlock) -> None:
        self.size = size
        self.capacity = capacity
        self.block = block
        self.devnet = Devnet(
            size,
            base_dir,
            first_address=block.first_address,
            api_port=block.api_port,
            peer_port=block.peer_port,
            extra_args=VOXANODE_ARGS,
            ready_timeout=READY_TIMEOUT_SECONDS,
        )
        self._session: aiohttp.ClientSession | None = None
        self._spawn_task: asyncio.Task | None = None

    def start(self) -> None:
        self.devnet.start()

    def stop(self) -> None:
        self.devnet.stop(timeout=DEVNET_STOP_TIMEOUT_SECONDS)

    def addresses(self) -> list[str]:
        return [node_address(self.block.first_address, index) for index in range(self.capacity)]

    def member_key(self, index: int) -> str:
        return f"{node_address(self.block.first_address, index)}:{self.block.peer_port}"

    def running_indices(self) -> list[int]:
        return [node.index for node in self.devnet.nodes if node.is_running()]

    def pid(self, index: int) -> int:
        return self.devnet.nodes[index].pid

    def kill(self, index: int) -> None:
        self.devnet.nodes[index].kill()

    async def spawn_node(self) -> int:
        if len(self.devnet.nodes) >= self.capacity:
            raise BenchError(f"{self.name}: no free address left in the block of {self.capacity}")
        index = len(self.devnet.nodes)
        # add_node blocks until the node responds to its health check, so it runs in a thread
        # while the views are polled. It appends the node object before it spawns the process.
        self._spawn_task = asyncio.create_task(asyncio.to_thread(self.devnet.add_node))
        deadline = time.monotonic() + SPAWN_TIMEOUT_SECONDS
        while len(self.devnet.nodes) <= index and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return index

    async def finish_spawn(self) -> None:
        if self._spawn_task is not None:
            task, self._spawn_task = self._spawn_task, None
            await task

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64))

    async def close(self) -> None:
        if self._spawn_task is not None:
            with contextlib.suppress(Exception):
                await self.finish_spawn()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_view(self, index: int) -> dict[str, str] | None:
        body = await self._get_json(index, "/data/discover_nodes/")
        if not isinstance(body, dict) or not isinstance(body.get("nodes"), list):
            return None
        return {entry["peer_address"]: normalize_voxanode_status(entry["status"]) for entry in body["nodes"]}

    async def peer_bytes_sent(self) -> dict[int, int] | None:
        counts = {}
        for index in self.running_indices():
            body = await self._get_json(index, "/status/system")
            try:
                counts[index] = int(body["network_info"]["bytes_sent"])
            except (TypeError, KeyError, ValueError):
                return None
        return counts

    async def _get_json(self, index: int, path: str) -> object:
        url = self.devnet.nodes[index].api_url + path
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None
                return await response.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            logger.debug("GET %s failed: %r", url, error)
            return None


class SerfRpcClient:
    """One kept-open connection to a Serf agent's RPC listener.

    Serf's RPC protocol is a stream of msgpack objects: each request is a header
    {Command, Seq} followed by a body when the command takes one; each response is a
    header {Seq, Error} followed by a body when the command returns one. The
    connection starts with a handshake that names the protocol version.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._unpacker = msgpack.Unpacker(raw=True)
        self._sequence = 0

    async def members(self) -> dict[str, str]:
        """Return {name: status} of every member the agent lists; raise OSError or BenchError."""
        if self._writer is None:
            await self._connect()
        body = await self._request("members", None, has_reply_body=True)
        return {member[b"Name"].decode(): member[b"Status"].decode() for member in body[b"Members"]}

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._unpacker = msgpack.Unpacker(raw=True)
        await self._request("handshake", {"Version": SERF_IPC_VERSION}, has_reply_body=False)

    async def _request(self, command: str, body: dict | None, has_reply_body: bool) -> dict | None:
        self._sequence += 1
        payload = msgpack.packb({"Command": command, "Seq": self._sequence})
        if body is not None:
            payload += msgpack.packb(body)
        self._writer.write(payload)
        await self._writer.drain()
        header = await self._next_object()
        if header.get(b"Seq") != self._sequence:
            raise BenchError(f"serf rpc {self.host}:{self.port}: reply to seq {header.get(b'Seq')}, expected {self._sequence}")
        error = header.get(b"Error", b"")
        if error:
            raise BenchError(f"serf rpc {self.host}:{self.port} {command} failed: {error!r}")
        return await self._next_object() if has_reply_body else None

    async def _next_object(self) -> dict:
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                pass
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError(f"serf rpc {self.host}:{self.port} closed the connection")
            self._unpacker.feed(data)


@dataclass
class SerfAgent:
    """One `serf agent` process."""

    index: int
    name: str
    address: str
    bind_port: int
    rpc_port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def bind_address(self) -> str:
        return f"{self.address}:{self.bind_port}"

    @property
    def rpc_address(self) -> str:
        return f"{self.address}:{self.rpc_port}"

    def command(self, join_address: str | None) -> list[str]:
        argv = [
            "serf", "agent",
            f"-node={self.name}",
            f"-bind={self.bind_address}",
            f"-advertise={self.bind_address}",
            f"-rpc-addr={self.rpc_address}",
        ]
        if join_address is not None:
            argv.append(f"-join={join_address}")
        return argv

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class SerfCluster(Cluster):
    """Serf agents on one loopback block; views through Serf's RPC, confirmed with `serf members`."""

    name = "serf"

    def __init__(self, size: int, capacity: int, base_dir: Path, block: AddressBlock, run_as_uid: int | None) -> None:
        self.size = size
        self.capacity = capacity
        self.block = block
        self.base_dir = base_dir
        self.run_as_uid = run_as_uid
        self.agents: list[SerfAgent] = []
        self._clients: dict[int, SerfRpcClient] = {}
        base_dir.mkdir(parents=True, exist_ok=True)
        if run_as_uid is not None:
            # The agents only write to their inherited log descriptors; the directory is their cwd.
            os.chown(base_dir, run_as_uid, run_as_uid)

    def start(self) -> None:
        first = self._launch(join_address=None)
        self._wait_rpc_ready(first)
        for _ in range(self.size - 1):
            self._launch(join_address=first.bind_address)
        for agent in self.agents:
            self._wait_rpc_ready(agent)

    def stop(self) -> None:
        for agent in self.agents:
            if agent.is_running():
                agent.process.terminate()
        deadline = time.monotonic() + SERF_STOP_TIMEOUT_SECONDS
        for agent in self.agents:
            if agent.process is None:
                continue
            try:
                agent.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"serf: agent {agent.name} (pid {agent.process.pid}) did not exit after SIGTERM; sending SIGKILL", flush=True)
                agent.process.kill()
                agent.process.wait()

    def addresses(self) -> list[str]:
        return [node_address(self.block.first_address, index) for index in range(self.capacity)]

    def member_key(self, index: int) -> str:
        return f"serf-{index}"

    def running_indices(self) -> list[int]:
        return [agent.index for agent in self.agents if agent.is_running()]

    def pid(self, index: int) -> int:
        return self.agents[index].process.pid

    def kill(self, index: int) -> None:
        process = self.agents[index].process
        process.kill()
        process.wait()

    async def spawn_node(self) -> int:
        if len(self.agents) >= self.capacity:
            raise BenchError(f"{self.name}: no free address left in the block of {self.capacity}")
        agent = self._launch(join_address=self.agents[0].bind_address)
        return agent.index

    async def finish_spawn(self) -> None:
        agent = self.agents[-1]
        if not agent.is_running():
            raise BenchError(f"serf agent {agent.name} exited with code {agent.process.returncode}; log: {agent.log_path}")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def fetch_view(self, index: int) -> dict[str, str] | None:
        agent = self.agents[index]
        client = self._clients.get(index)
        if client is None:
            client = self._clients[index] = SerfRpcClient(agent.address, agent.rpc_port)
        try:
            return await asyncio.wait_for(client.members(), SERF_RPC_TIMEOUT_SECONDS)
        except (TimeoutError, OSError, BenchError, KeyError, AttributeError, ValueError) as error:
            logger.debug("serf rpc to %s failed: %r", agent.rpc_address, error)
            await client.close()
            return None

    async def confirm_view(self, index: int) -> dict[str, str] | None:
        """Return the view as `serf members -format=json` prints it."""
        agent = self.agents[index]
        process = await asyncio.create_subprocess_exec(
            "serf", "members", f"-rpc-addr={agent.rpc_address}", "-format=json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=serf_environment(self.base_dir),
        )
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), SERF_CLI_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            return None
        if process.returncode != 0:
            return None
        try:
            return {member["name"]: member["status"] for member in json.loads(stdout)["members"]}
        except (ValueError, KeyError, TypeError):
            return None

    def _launch(self, join_address: str | None) -> SerfAgent:
        index = len(self.agents)
        address = node_address(self.block.first_address, index)
        agent = SerfAgent(
            index=index,
            name=self.member_key(index),
            address=address,
            bind_port=self.block.peer_port,
            rpc_port=self.block.api_port,
            log_path=self.base_dir / f"serf-{index}.log",
        )
        argv = agent.command(join_address)
        check_loopback_only(argv)
        argv = self._privilege_prefix() + argv
        with open(agent.log_path, "ab") as log_file:
            agent.process = subprocess.Popen(
                argv,
                cwd=self.base_dir,
                env=serf_environment(self.base_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.agents.append(agent)
        return agent

    def _privilege_prefix(self) -> list[str]:
        """Return the setpriv arguments that run an agent under run_as_uid and kill it with the bench.

        setpriv (util-linux) execs serf in place, so the pid stays the agent's. Its
        --pdeathsig makes the kernel SIGKILL the agent when the bench dies, even by SIGKILL.
        """
        if shutil.which("setpriv") is None:
            return []
        prefix = ["setpriv", "--pdeathsig", "KILL"]
        if self.run_as_uid is not None:
            uid = str(self.run_as_uid)
            prefix += ["--reuid", uid, "--regid", uid, "--clear-groups"]
        return prefix

    def _wait_rpc_ready(self, agent: SerfAgent) -> None:
        deadline = time.monotonic() + SERF_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not agent.is_running():
                raise BenchError(f"serf agent {agent.name} exited with code {agent.process.returncode}; log: {agent.log_path}")
            with contextlib.suppress(OSError), socket.create_connection((agent.address, agent.rpc_port), timeout=0.5):
                return
            time.sleep(0.05)
        raise BenchError(f"serf agent {agent.name} did not open its RPC port {agent.rpc_address} within {SERF_START_TIMEOUT_SECONDS:.0f} s")


def serf_environment(home: Path) -> dict[str, str]:
    """Build a minimal environment, so no SERF_* variable of the caller changes an agent or the CLI."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C"}


def check_loopback_only(argv: Sequence[str]) -> None:
    """Raise BenchError unless every address flag of a serf command names a 127.x address."""
    for argument in argv:
        flag, separator, value = argument.partition("=")
        if not separator or flag not in ("-bind", "-advertise", "-rpc-addr", "-join"):
            continue
        host = value.rsplit(":", 1)[0]
        if ipaddress.ip_address(host) not in LOOPBACK_NETWORK:
            raise BenchError(f"serf not started: {argument} is not a 127.0.0.0/8 address")


# --- measurements ------------------------------------------------------------------------


@dataclass
class Spread:
    """When each observer first showed a condition, in seconds after the start event."""

    seconds_by_node: dict[int, float] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)

    @property
    def first(self) -> float | None:
        return min(self.seconds_by_node.values()) if self.seconds_by_node else None

    @property
    def last(self) -> float | None:
        return None if self.missing or not self.seconds_by_node else max(self.seconds_by_node.values())


async def watch_views(
    cluster: Cluster, observers: Sequence[int], condition: Callable[[dict[str, str]], bool], started: float, timeout: float
) -> Spread:
    """Poll the observers' views every POLL_INTERVAL_SECONDS until each shows `condition`.

    A node's time is taken when its matching view arrives; observers that never show
    the condition within `timeout` are listed in `missing`.
    """
    pending = set(observers)
    spread = Spread()
    deadline = started + timeout
    while pending and time.monotonic() < deadline:
        round_started = time.monotonic()
        indices = sorted(pending)
        views = await asyncio.gather(*(cluster.fetch_view(index) for index in indices))
        received_at = time.monotonic()
        for index, view in zip(indices, views, strict=True):
            if view is not None and condition(view):
                spread.seconds_by_node[index] = received_at - started
                pending.discard(index)
        await asyncio.sleep(max(0.0, POLL_INTERVAL_SECONDS - (time.monotonic() - round_started)))
    spread.missing = sorted(pending)
    return spread


async def wait_full_view(cluster: Cluster, timeout: float) -> float:
    """Wait until every running node lists every running node alive; return the seconds waited."""
    started = time.monotonic()
    while True:
        running = cluster.running_indices()
        keys = {cluster.member_key(index) for index in running}
        views = await asyncio.gather(*(cluster.confirm_view(index) for index in running))
        lagging = [index for index, view in zip(running, views, strict=True) if view is None or any(view.get(key) != ALIVE for key in keys)]
        if not lagging:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise BenchError(f"{cluster.name}: nodes {lagging} did not list all {len(keys)} nodes alive within {timeout:.0f} s")
        await asyncio.sleep(FULL_VIEW_POLL_INTERVAL_SECONDS)


async def confirm_status(cluster: Cluster, observers: Sequence[int], key: str, expected: str) -> list[int]:
    """Return the observers whose confirm_view does not show `key` with status `expected`."""
    views = await asyncio.gather(*(cluster.confirm_view(index) for index in observers))
    return [index for index, view in zip(observers, views, strict=True) if view is None or view.get(key) != expected]


@dataclass
class JoinTrial:
    spawn_to_all: float | None
    first_to_all: float | None
    new_node_sees_all: float | None
    missing: list[int]


@dataclass
class FailureTrial:
    victim: int
    kill_to_first: float | None
    kill_to_all: float | None
    missing: list[int]


async def measure_join(cluster: Cluster) -> JoinTrial:
    """Start one node and time until every other running node lists it alive."""
    observers = cluster.running_indices()
    expected_keys = {cluster.member_key(index) for index in observers}
    started = time.monotonic()
    new_index = await cluster.spawn_node()
    key = cluster.member_key(new_index)
    others_task = asyncio.create_task(
        watch_views(cluster, observers, lambda view: view.get(key) == ALIVE, started, JOIN_TIMEOUT_SECONDS)
    )
    sees_all = await watch_views(
        cluster, [new_index], lambda view: all(view.get(k) == ALIVE for k in expected_keys), started, JOIN_TIMEOUT_SECONDS
    )
    spread = await others_task
    await cluster.finish_spawn()
    unconfirmed = await confirm_status(cluster, observers, key, ALIVE)
    if unconfirmed:
        print(f"{cluster.name}: cross-check: nodes {unconfirmed} do not list {key} alive after the join", flush=True)
    first_to_all = spread.last - spread.first if spread.last is not None else None
    return JoinTrial(spread.last, first_to_all, sees_all.last, spread.missing)


async def measure_failure(cluster: Cluster, victim: int) -> FailureTrial:
    """SIGKILL node `victim` and time until every other running node lists it failed."""
    key = cluster.member_key(victim)
    started = time.monotonic()
    cluster.kill(victim)
    observers = cluster.running_indices()
    spread = await watch_views(cluster, observers, lambda view: view.get(key) == FAILED, started, DETECTION_TIMEOUT_SECONDS)
    unconfirmed = await confirm_status(cluster, observers, key, FAILED)
    if unconfirmed:
        print(f"{cluster.name}: cross-check: nodes {unconfirmed} do not list {key} failed after the kill", flush=True)
    return FailureTrial(victim, spread.first, spread.last, spread.missing)


@dataclass
class Bandwidth:
    """Idle traffic over one window; rates are bytes per second per node."""

    method: str
    window_seconds: float
    mean_per_node: float | None = None
    max_per_node: float | None = None
    app_payload_mean_per_node: float | None = None
    guard_dropped_packets: int | None = None
    machine_cpu_percent: float | None = None


async def measure_bandwidth(cluster: Cluster, accounting: TrafficAccounting | None, window: float) -> Bandwidth:
    """Count the cluster's traffic over an idle window in which nothing queries the nodes."""
    running = cluster.running_indices()
    addresses = [node_address(cluster.block.first_address, index) for index in running]
    app_before = await cluster.peer_bytes_sent()
    app_started = time.monotonic()
    before = accounting.sample() if accounting else None
    # The machine may run other work; its CPU use over the window is shown with the result.
    psutil.cpu_percent(interval=None)
    await asyncio.sleep(window)
    machine_cpu_percent = psutil.cpu_percent(interval=None)
    after = accounting.sample() if accounting else None
    app_after = await cluster.peer_bytes_sent()
    app_elapsed = time.monotonic() - app_started

    result = Bandwidth(method="iptables" if accounting else "none", window_seconds=window, machine_cpu_percent=machine_cpu_percent)
    if before is not None and after is not None:
        elapsed = after.taken_at - before.taken_at
        per_node = {
            address: (after.sent_bytes.get(address, 0) - before.sent_bytes.get(address, 0))
            + (after.received_from_outside_bytes.get(address, 0) - before.received_from_outside_bytes.get(address, 0))
            for address in addresses
        }
        result.mean_per_node = sum(per_node.values()) / len(addresses) / elapsed
        result.max_per_node = max(per_node.values()) / elapsed
        result.window_seconds = elapsed
        result.guard_dropped_packets = after.guard_dropped_packets
    if app_before and app_after:
        sent = [app_after[index] - app_before[index] for index in running if index in app_before and index in app_after]
        result.app_payload_mean_per_node = sum(sent) / len(sent) / app_elapsed
    return result


def measure_rss(cluster: Cluster) -> tuple[float, float]:
    """Return (mean, max) RSS in MiB over the running nodes."""
    sizes = [psutil.Process(cluster.pid(index)).memory_info().rss / MIB for index in cluster.running_indices()]
    return statistics.fmean(sizes), max(sizes)


# --- one system at one size --------------------------------------------------------------


@dataclass
class SystemResult:
    """Every figure of one system at one size."""

    system: str
    size: int
    startup_seconds: float = 0.0
    full_view_seconds: float = 0.0
    joins: list[JoinTrial] = field(default_factory=list)
    failures: list[FailureTrial] = field(default_factory=list)
    bandwidth: Bandwidth | None = None
    start_bandwidth: Bandwidth | None = None
    rss_mean_mib: float = 0.0
    rss_max_mib: float = 0.0


async def measure_cluster(cluster: Cluster, result: SystemResult, args: argparse.Namespace, accounting: TrafficAccounting | None) -> None:
    """Run the phases on a started cluster: full view, idle window, RSS, then the trials."""
    await cluster.open()
    try:
        result.full_view_seconds = await wait_full_view(cluster, FULL_VIEW_TIMEOUT_SECONDS)
        print(f"{cluster.name} N={result.size}: all nodes list each other after {result.full_view_seconds:.1f} s; "
              f"a start window of {args.window:.0f} s, {args.settle:.0f} s of settling, "
              f"then an idle window of {args.window:.0f} s", flush=True)
        result.start_bandwidth = await measure_bandwidth(cluster, accounting, args.window)
        await asyncio.sleep(args.settle)

        result.bandwidth = await measure_bandwidth(cluster, accounting, args.window)
        result.rss_mean_mib, result.rss_max_mib = measure_rss(cluster)

        victims = [result.size - 1 - trial for trial in range(args.trials)]
        for trial, victim in enumerate(victims, start=1):
            join = await measure_join(cluster)
            result.joins.append(join)
            print(f"{cluster.name} N={result.size} trial {trial}: join spawn->all {format_seconds(join.spawn_to_all)}, "
                  f"first->all {format_seconds(join.first_to_all)}, new node sees all {format_seconds(join.new_node_sees_all)}"
                  + (f", never listed by {join.missing}" if join.missing else ""), flush=True)
            failure = await measure_failure(cluster, victim)
            result.failures.append(failure)
            print(f"{cluster.name} N={result.size} trial {trial}: kill node {victim}: first shows failed "
                  f"{format_seconds(failure.kill_to_first)}, all {format_seconds(failure.kill_to_all)}"
                  + (f", never by {failure.missing}" if failure.missing else ""), flush=True)
            # The next join starts from a view in which the victim is already failed everywhere.
            await asyncio.sleep(1.0)
    finally:
        await cluster.close()


def run_system(cluster: Cluster, size: int, args: argparse.Namespace, accounting: TrafficAccounting | None) -> SystemResult:
    """Start the cluster, measure it and stop it on every path."""
    result = SystemResult(cluster.name, size)
    if accounting is not None:
        accounting.add_addresses(cluster.addresses())
    started = time.monotonic()
    print(f"{cluster.name} N={size}: starting {size} nodes from {cluster.block.first_address}", flush=True)
    try:
        cluster.start()
        result.startup_seconds = time.monotonic() - started
        asyncio.run(measure_cluster(cluster, result, args, accounting))
    finally:
        cluster.stop()
    return result


# --- report ------------------------------------------------------------------------------


def format_seconds(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.2f} s"


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the trials; None when any trial timed out, so a timeout is never hidden."""
    if not values or any(value is None for value in values):
        return None
    return statistics.median(values)


@dataclass
class Row:
    label: str
    unit: str
    target_ratio: float | None
    value: Callable[[SystemResult], float | None]


ROWS = [
    Row("join: spawn -> all list it", "s", TIME_RATIO_TARGET, lambda r: median_or_none([j.spawn_to_all for j in r.joins])),
    Row("join: first -> all list it", "s", TIME_RATIO_TARGET, lambda r: median_or_none([j.first_to_all for j in r.joins])),
    Row("join: new node sees all", "s", None, lambda r: median_or_none([j.new_node_sees_all for j in r.joins])),
    Row("failure: kill -> first shows it", "s", None, lambda r: median_or_none([f.kill_to_first for f in r.failures])),
    Row("failure: kill -> all show it", "s", TIME_RATIO_TARGET, lambda r: median_or_none([f.kill_to_all for f in r.failures])),
    Row("idle bytes/s per node (mean)", "B/s", BANDWIDTH_RATIO_TARGET, lambda r: r.bandwidth.mean_per_node if r.bandwidth else None),
    Row("idle bytes/s, busiest node", "B/s", None, lambda r: r.bandwidth.max_per_node if r.bandwidth else None),
    Row("bytes/s per node, first window", "B/s", None, lambda r: r.start_bandwidth.mean_per_node if r.start_bandwidth else None),
    Row("RSS per node (mean)", "MiB", None, lambda r: r.rss_mean_mib or None),
    Row("RSS per node (max)", "MiB", None, lambda r: r.rss_max_mib or None),
]


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "B/s":
        return f"{value:.0f} {unit}"
    if unit == "s":
        return f"{value:.2f} {unit}"
    return f"{value:.1f} {unit}"


def time_or_size_ratio(row: Row, ours_value: float | None, serf_value: float | None) -> float | None:
    """Return voxanode/Serf for one row, or None when either value is missing."""
    if ours_value is None or serf_value is None:
        return None
    if row.unit == "s":
        # Times below one poll interval cannot be distinguished, so both count as at least one.
        return max(ours_value, POLL_INTERVAL_SECONDS) / max(serf_value, POLL_INTERVAL_SECONDS)
    return ours_value / serf_value if serf_value else None


def judge_target(row: Row, ours_value: float | None, serf_value: float | None, ratio: float | None) -> str:
    """Return "met", "NOT MET", or for a time just over its target a tie below the poll resolution."""
    if ratio is None:
        return "NOT MET"
    if ratio <= row.target_ratio:
        return "met"
    if row.unit == "s" and ours_value - serf_value * row.target_ratio < TIE_SECONDS:
        return f"tie (over by less than {TIE_SECONDS} s)"
    return "NOT MET"


def print_table(size: int, results: dict[str, SystemResult]) -> list[str]:
    """Print one size's table; return the targets that were not met."""
    ours, serf = results.get("voxanode"), results.get("serf")
    trials = len(ours.joins) if ours else len(serf.joins)
    print()
    print(f"N = {size} (+{trials} joined, medians of the trials)")
    header = f"{'metric':<34} {'voxanode':>12} {'serf':>12} {'vox/serf':>9}  target"
    print(header)
    print("-" * len(header))

    misses = []
    for row in ROWS:
        ours_value = row.value(ours) if ours else None
        serf_value = row.value(serf) if serf else None
        ratio = time_or_size_ratio(row, ours_value, serf_value)
        target = ""
        if row.target_ratio is not None and ours is not None and serf is not None:
            verdict = judge_target(row, ours_value, serf_value, ratio)
            target = f"<= {row.target_ratio:g}: {verdict}"
            if verdict != "met":
                misses.append(f"N={size} {row.label}: ratio {'n/a' if ratio is None else f'{ratio:.2f}'}, "
                              f"target <= {row.target_ratio:g}: {verdict}")
        ratio_text = "n/a" if ratio is None else f"{ratio:.2f}"
        print(f"{row.label:<34} {format_value(ours_value, row.unit):>12} {format_value(serf_value, row.unit):>12} {ratio_text:>9}  {target}")

    print(f"  times are medians of the trials, polled every {POLL_INTERVAL_SECONDS} s; time ratios count a time "
          f"below {POLL_INTERVAL_SECONDS} s as {POLL_INTERVAL_SECONDS} s")
    for result in (ours, serf):
        if result and result.bandwidth:
            print_bandwidth_note(result)
    return misses


def print_bandwidth_note(result: SystemResult) -> None:
    bandwidth = result.bandwidth
    extra = ""
    if bandwidth.app_payload_mean_per_node is not None:
        extra += f"; own peer counter (UDP payload only) {bandwidth.app_payload_mean_per_node:.0f} B/s per node"
    if bandwidth.guard_dropped_packets is not None and result.system == "serf":
        extra += f"; non-loopback packets dropped {bandwidth.guard_dropped_packets}"
    print(f"  {result.system}: bandwidth method {bandwidth.method}, window {bandwidth.window_seconds:.1f} s, "
          f"machine CPU busy {bandwidth.machine_cpu_percent:.0f}%{extra}")


def write_json(path: Path, all_results: dict[int, dict[str, SystemResult]], args: argparse.Namespace) -> None:
    figures = {
        "sizes": sorted(all_results), "window_seconds": args.window, "trials": args.trials,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "results": {
            str(size): {
                name: {
                    "startup_seconds": result.startup_seconds,
                    "full_view_seconds": result.full_view_seconds,
                    "joins": [vars(join) for join in result.joins],
                    "failures": [vars(failure) for failure in result.failures],
                    "bandwidth": vars(result.bandwidth) if result.bandwidth else None,
                    "start_bandwidth": vars(result.start_bandwidth) if result.start_bandwidth else None,
                    "rss_mean_mib": result.rss_mean_mib,
                    "rss_max_mib": result.rss_max_mib,
                }
                for name, result in by_system.items()
            }
            for size, by_system in all_results.items()
        },
    }
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


# --- setup -------------------------------------------------------------------------------


def find_serf(install: bool) -> tuple[str | None, str]:
    """Return (the `serf version` line, "") or (None, the reason Serf is skipped)."""
    if shutil.which("serf") is None and install:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return None, "`serf` is not on PATH and cannot be installed here (needs root and apt-get)"
        print("serf: not on PATH; running `apt-get install -y serf` (Debian's package)", flush=True)
        completed = subprocess.run(
            ["apt-get", "install", "-y", "serf"], capture_output=True, text=True, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        if completed.returncode != 0:
            return None, f"`apt-get install -y serf` failed: {completed.stderr.strip()[-300:]}"
    if shutil.which("serf") is None:
        return None, "`serf` is not on PATH; install it with `apt-get install -y serf`"
    completed = subprocess.run(["serf", "version"], capture_output=True, text=True, check=False)
    return completed.stdout.splitlines()[0] if completed.stdout else "serf (version unknown)", ""


def allocate_serf_block(size: int) -> AddressBlock:
    """Allocate a block whose peer port is free for UDP and TCP (Serf's gossip and push-pull) on every address."""
    for _ in range(20):
        block = allocate_free_block(size)
        addresses = [node_address(block.first_address, index) for index in range(size)]
        if all(is_port_free(address, block.peer_port, socket.SOCK_STREAM) for address in addresses):
            return block
    raise BenchError(f"no loopback block of {size} addresses with a port free for both TCP and UDP")


def pick_block(size: int, used_prefixes: set[str], allocate: Callable[[int], AddressBlock]) -> AddressBlock:
    """Allocate a block whose /24 prefix no earlier block of this run used."""
    for _ in range(50):
        block = allocate(size)
        prefix = block.first_address.rsplit(".", 1)[0]
        if prefix not in used_prefixes:
            used_prefixes.add(prefix)
            return block
    raise BenchError("no loopback block with an unused /24 prefix found")


def set_up_accounting(guard_uid: int | None) -> tuple[TrafficAccounting | None, str]:
    """Create the iptables chain, with the loopback guard for `guard_uid` if given.

    Returns (None, reason) when iptables cannot be used.
    """
    if os.geteuid() != 0:
        return None, "not running as root, so iptables accounting is off and bandwidth is not measured"
    accounting = TrafficAccounting()
    try:
        accounting.create()
        if guard_uid is not None:
            accounting.add_loopback_guard(guard_uid)
    except BenchError as error:
        accounting.delete()
        return None, f"iptables accounting failed ({error}), so bandwidth is not measured"
    return accounting, ""


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(size < 3 or size > 200 for size in sizes):
        raise argparse.ArgumentTypeError(f"every size must be 3..200, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark voxanode's SWIM membership against HashiCorp Serf on loopback.")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES), help="cluster sizes N, comma-separated (default: %(default)s)")
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW_SECONDS, help="idle window for the bandwidth figure, in seconds (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="joins and kills per cluster; the table shows medians (default: %(default)s)")
    parser.add_argument("--settle", type=float, default=DEFAULT_SETTLE_SECONDS, help="seconds between the first window and the idle window (default: %(default)s)")
    parser.add_argument("--only", choices=["both", "voxanode", "serf"], default="both", help="systems to measure (default: %(default)s)")
    parser.add_argument("--no-install", action="store_true", help="do not try `apt-get install -y serf` when serf is missing")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--keep-dir", action="store_true", help="keep node data directories and logs")
    args = parser.parse_args(argv)
    if not 1.0 <= args.window <= 600.0:
        parser.error(f"--window must be 1..600 seconds, got {args.window}")
    if not 1 <= args.trials <= 10:
        parser.error(f"--trials must be 1..10, got {args.trials}")
    if min(args.sizes) - 1 - args.trials < 1:
        parser.error("each size must exceed --trials + 1, so every victim is a node other than node 0")
    if not 0.0 <= args.settle <= 120.0:
        parser.error(f"--settle must be 0..120 seconds, got {args.settle}")
    return args


def stop_clusters(clusters: list[Cluster]) -> None:
    for cluster in clusters:
        cluster.stop()


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def compile_package() -> None:
    """Write the bytecode cache of the voxanode package, as an installation from a wheel has it.

    The join is timed from the spawn. With PYTHONDONTWRITEBYTECODE set and no cache,
    a node compiles its modules at every start, which costs about 50 ms here before
    its first datagram. An installed node does not spend that time.
    """
    package_dir = Path(voxanode.__file__).parent
    if not compileall.compile_dir(package_dir, quiet=1):
        raise BenchError(f"cannot compile the voxanode package in {package_dir}")
    print(f"voxanode: bytecode cache of {package_dir} is up to date", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, raise_system_exit)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C or kill -INT must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    systems = ["voxanode", "serf"] if args.only == "both" else [args.only]
    if "voxanode" in systems:
        compile_package()
    if "serf" in systems:
        serf_version, skip_reason = find_serf(install=not args.no_install)
        if serf_version is None:
            print(f"serf: SKIPPED: {skip_reason}. Only voxanode is measured, so no ratios are printed.", flush=True)
            systems.remove("serf")
        else:
            print(f"serf: using {serf_version}", flush=True)
    if not systems:
        return 1

    # The agents can run under their own uid only as root and through setpriv.
    serf_uid = SERF_UID if "serf" in systems and os.geteuid() == 0 and shutil.which("setpriv") else None
    accounting, accounting_note = set_up_accounting(serf_uid)
    if accounting is not None:
        atexit.register(accounting.delete)
    else:
        print(f"bandwidth: {accounting_note}", flush=True)
    if "serf" in systems and (serf_uid is None or accounting is None):
        print("serf: no iptables guard against non-loopback traffic; only its flags keep it on loopback", flush=True)

    base_dir = Path(tempfile.mkdtemp(prefix="voxanode-gossip-bench-"))
    os.chmod(base_dir, 0o755)
    clusters: list[Cluster] = []
    atexit.register(stop_clusters, clusters)
    all_results: dict[int, dict[str, SystemResult]] = {}
    used_prefixes: set[str] = set()
    started = time.monotonic()
    try:
        for size in args.sizes:
            capacity = size + args.trials
            for system in systems:
                if system == "voxanode":
                    block = pick_block(capacity, used_prefixes, allocate_free_block)
                    cluster: Cluster = VoxanodeCluster(size, capacity, base_dir / f"voxanode-{size}", block)
                else:
                    block = pick_block(capacity, used_prefixes, allocate_serf_block)
                    cluster = SerfCluster(size, capacity, base_dir / f"serf-{size}", block, serf_uid)
                clusters.append(cluster)
                all_results.setdefault(size, {})[system] = run_system(cluster, size, args, accounting)

        print()
        print(f"Membership gossip benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}; "
              f"views polled every {POLL_INTERVAL_SECONDS} s; {args.trials} trials per size")
        misses = []
        for size, results in all_results.items():
            misses += print_table(size, results)
        if misses:
            print("\ntargets not met or tied:")
            for miss in misses:
                print(f"  {miss}")
        if args.json:
            write_json(args.json, all_results, args)
        print(f"total time {time.monotonic() - started:.0f} s")
        return 0
    except (BenchError, DevnetError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every node", file=sys.stderr)
        return 130
    finally:
        stop_clusters(clusters)
        if accounting is not None:
            accounting.delete()
        if args.keep_dir:
            print(f"node data and logs kept in {base_dir}")
        else:
            shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
