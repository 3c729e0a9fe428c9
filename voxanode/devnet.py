"""Local multi-node network of voxanode daemons on loopback addresses.

This module owns the devnet: N daemon processes on one machine, node i on its own
loopback address (first address + i) with the same API (TCP) and peer (UDP) port,
each with its own data directory and log file. It is used three ways:

- as a library (`Devnet`, `DevNode`) by the test fixtures and the benchmarks;
- as a command, `python -m voxanode.devnet start|stop|status` (or `scripts/devnet`);
- through the state file `<base_dir>/devnet.json`, which lets `stop` and `status`
  in another process find the node processes that `start` launched.

Only processes whose /proc/<pid>/cmdline still equals the command line recorded in
the state file are ever signalled, so a reused pid is never hit.
"""

import argparse
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

DEFAULT_FIRST_ADDRESS = "127.0.0.2"
DEFAULT_PORT = 9999
DEFAULT_SIZE = 5
DEFAULT_BASE_DIR = "./devnet"
DEFAULT_READY_TIMEOUT_SECONDS = 60.0
DEFAULT_STOP_TIMEOUT_SECONDS = 10.0
HEALTH_PATH = "/status/health"
SYSTEM_PATH = "/status/system"
HEALTH_POLL_INTERVAL_SECONDS = 0.2
HTTP_TIMEOUT_SECONDS = 2.0
EXIT_POLL_INTERVAL_SECONDS = 0.05
# Extra wait for a `start` command that is stopping its nodes itself: its own
# SIGTERM-to-SIGKILL timeout plus the time to reap them and print their exit codes.
CONTROLLER_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 40
LOG_TAIL_MAX_BYTES = 64 * 1024
STATE_FILE_NAME = "devnet.json"
STATE_SCHEMA_VERSION = 1
LOOPBACK_NETWORK = ipaddress.ip_network("127.0.0.0/8")
# Ports for test blocks stay below Linux's default ephemeral range (32768-60999),
# so an outgoing connection can never be holding the port a test node needs.
FREE_PORT_MIN = 20000
FREE_PORT_MAX = 32000
FREE_BLOCK_ATTEMPTS = 50

# The directory that contains the `voxanode` package this module was imported from.
# It goes first on the nodes' PYTHONPATH, so they run the same code as the harness,
# also from a checkout that was never installed.
PACKAGE_PARENT_DIR = Path(__file__).resolve().parent.parent


class DevnetError(Exception):
    """Base error of the devnet harness."""


class AddressError(DevnetError):
    """A node address is invalid or falls outside 127.0.0.0/8."""


class NodeNotReadyError(DevnetError):
    """A node exited, or did not respond to GET /status/health with 200 in time."""

    def __init__(self, message: str, index: int, log_tail: str) -> None:
        super().__init__(f"{message}\n--- last lines of node {index} log ---\n{log_tail}")
        self.index = index
        self.log_tail = log_tail


class StateFileError(DevnetError):
    """The devnet state file is missing, unreadable or of another schema."""


class DevnetRunningError(DevnetError):
    """A devnet recorded in the state file still has live processes."""


# --- addresses and ports -------------------------------------------------------------


def node_address(first_address: str, index: int) -> str:
    """Return the loopback address of node `index`: first_address + index.

    The addition carries across octets (127.0.0.255 + 1 is 127.0.1.0). Raises
    AddressError when the address is not IPv4 or leaves 127.0.0.0/8.
    """
    try:
        first = ipaddress.IPv4Address(first_address)
    except ipaddress.AddressValueError as exc:
        raise AddressError(f"invalid IPv4 address {first_address!r}: {exc}") from exc
    if index < 0:
        raise AddressError(f"node index must be >= 0, got {index}")
    if first not in LOOPBACK_NETWORK:
        raise AddressError(f"first address {first} is outside {LOOPBACK_NETWORK}; use a 127.x.y.z address")
    try:
        address = first + index
    except ipaddress.AddressValueError as exc:
        raise AddressError(f"address {first} + {index} overflows IPv4") from exc
    if address not in LOOPBACK_NETWORK:
        raise AddressError(
            f"node {index} would get {address}, outside {LOOPBACK_NETWORK}; choose a lower first address"
        )
    return str(address)


def parse_host_port(text: str) -> tuple[str, int]:
    """Split "host:port" into (host, port); raise ValueError on bad input."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def is_port_free(host: str, port: int, kind: int) -> bool:
    """Return whether `port` on `host` can be bound now for `kind` (SOCK_STREAM or SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class AddressBlock:
    """A run of loopback addresses with one API (TCP) and one peer (UDP) port free on each."""

    first_address: str
    api_port: int
    peer_port: int


def allocate_free_block(size: int, rng: random.Random | None = None, attempts: int = FREE_BLOCK_ATTEMPTS) -> AddressBlock:
    """Pick a random block 127.A.B.1.. (A in 10..250) whose ports are free on all `size` addresses.

    The second octet starts at 10, so a block never overlaps a devnet on the default
    127.0.0.2+. The ports are bind-tested on every address and released again, so a
    process started later could still take them; with random blocks that is unlikely.
    """
    if not 1 <= size <= 250:
        raise DevnetError(f"block size must be 1..250, got {size}")
    rng = rng or random.Random()
    for _ in range(attempts):
        first_address = f"127.{rng.randint(10, 250)}.{rng.randint(1, 200)}.1"
        api_port = rng.randint(FREE_PORT_MIN, FREE_PORT_MAX)
        peer_port = rng.randint(FREE_PORT_MIN, FREE_PORT_MAX)
        addresses = [node_address(first_address, index) for index in range(size)]
        if all(
            is_port_free(address, api_port, socket.SOCK_STREAM) and is_port_free(address, peer_port, socket.SOCK_DGRAM)
            for address in addresses
        ):
            return AddressBlock(first_address, api_port, peer_port)
    raise DevnetError(f"no free address block of {size} found in {attempts} attempts")


# --- small helpers -------------------------------------------------------------------


def http_get_json(url: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> tuple[int, Any]:
    """GET `url` and return (status, parsed JSON body or None).

    Raises OSError when the server is unreachable or its reply is not valid HTTP.
    """
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except http.client.HTTPException as exc:
        # A half-started server may close the connection or send a broken status line.
        raise ConnectionError(f"invalid HTTP reply from {url}: {exc!r}") from exc
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of a log file, or a note when it does not exist."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - LOG_TAIL_MAX_BYTES))
            data = log_file.read()
    except FileNotFoundError:
        return f"(no log file at {path})"
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def read_cmdline(pid: int) -> list[str] | None:
    """Return the argv of a live process from /proc, or None when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not raw:
        # A zombie (exited, not yet reaped) has an empty cmdline.
        return None
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0")[:-1]]


def process_matches(pid: int, argv: Sequence[str]) -> bool:
    """Return whether `pid` is alive and still runs exactly `argv`."""
    return pid != os.getpid() and read_cmdline(pid) == list(argv)


def node_environment(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Build the environment of a node process.

    VOXA_* variables of the caller are dropped, so the flags the harness passes decide
    each node's settings. PYTHONUNBUFFERED keeps the log file current.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    python_path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PACKAGE_PARENT_DIR) + (os.pathsep + python_path if python_path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def write_json_atomically(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# --- one node ------------------------------------------------------------------------


class DevNode:
    """One daemon process of a devnet, with its addresses, data directory and log file."""

    def __init__(
        self,
        index: int,
        api_host: str,
        api_port: int,
        peer_host: str,
        peer_port: int,
        data_dir: Path,
        bootstrap: Sequence[str] = (),
        base_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.index = index
        self.api_host = api_host
        self.api_port = api_port
        self.peer_host = peer_host
        self.peer_port = peer_port
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir / "node.log"
        self.bootstrap = list(bootstrap)
        self.base_args = list(base_args)
        self.env = env
        self.process: subprocess.Popen | None = None
        self.argv: list[str] = []
        self.frozen = False
        self._last_extra_args: list[str] = []
        # Called after every spawn; a Devnet uses it to keep its state file current.
        self.on_started: Callable[[], None] | None = None

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"DevNode(index={self.index}, api={self.api_url}, peer={self.peer_address}, pid={pid})"

    @property
    def api_url(self) -> str:
        """Base URL of the node's REST API, e.g. http://127.0.0.2:9999."""
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def peer_address(self) -> str:
        """The node's UDP peer address as HOST:PORT, the form --bootstrap takes."""
        return f"{self.peer_host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """Process id of the current (or last) process, None before the first start."""
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        """Exit code of the last process, None while it runs or before the first start."""
        return self.process.poll() if self.process else None

    def command(self, extra_args: Sequence[str] = ()) -> list[str]:
        """Build the argv that starts this node."""
        argv = [
            sys.executable, "-m", "voxanode",
            "--config", str(self.data_dir / "settings.json"),
            "--data-dir", str(self.data_dir),
            "--api-host", self.api_host,
            "--api-port", str(self.api_port),
            "--peer-host", self.peer_host,
            "--peer-port", str(self.peer_port),
            "--bootstrap-file", str(self.data_dir / "bootstrap_peers.json"),
        ]
        for peer in self.bootstrap:
            argv += ["--bootstrap", peer]
        return argv + self.base_args + list(extra_args)

    def prepare_data_dir(self) -> None:
        """Create the data directory with an empty settings file and the bootstrap list.

        The daemon reads config/settings.json and bootstrap_peers.json relative to its
        working directory unless flags name other files, so each node gets its own files and
        runs with its data directory as working directory.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        settings_path = self.data_dir / "settings.json"
        if not settings_path.exists():
            settings_path.write_text("{}\n", encoding="utf-8")
        write_json_atomically(self.data_dir / "bootstrap_peers.json", self.bootstrap)

    def start(self, extra_args: Sequence[str] = ()) -> None:
        """Start the process (stdout and stderr appended to the log); does not wait for readiness."""
        if self.is_running():
            raise DevnetError(f"node {self.index} is already running as pid {self.pid}")
        self.prepare_data_dir()
        self._last_extra_args = list(extra_args)
        self.argv = self.command(extra_args)
        with open(self.log_path, "ab") as log_file:
            # A session of its own keeps a Ctrl-C in the controlling terminal away from
            # the nodes, so the harness decides how they stop.
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.data_dir,
                env=node_environment(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.frozen = False
        logger.info("node %d started: pid=%d api=%s peer=%s", self.index, self.process.pid, self.api_url, self.peer_address)
        if self.on_started is not None:
            self.on_started()

    def is_running(self) -> bool:
        """Return whether the process has been started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> bool:
        """Send `signum` to the running process; return False when it is not running."""
        if not self.is_running():
            return False
        self.process.send_signal(signum)
        return True

    def terminate(self) -> None:
        """Send SIGTERM (and SIGCONT to a frozen node, so it can act on it)."""
        if self.send_signal(signal.SIGTERM) and self.frozen:
            self.send_signal(signal.SIGCONT)
            self.frozen = False

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the process to exit; return its code or None."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> int | None:
        """Stop gracefully: SIGTERM, wait `timeout` seconds, then SIGKILL. Return the exit code.

        Returns None when the node was never started.
        """
        if self.process is None:
            return None
        if self.is_running():
            self.terminate()
            if self.wait_exit(timeout) is None:
                logger.warning("node %d (pid %d) did not exit %.1f s after SIGTERM; sending SIGKILL", self.index, self.pid, timeout)
                return self.kill()
        code = self.process.returncode
        logger.info("node %d stopped: pid=%d exit_code=%s", self.index, self.pid, code)
        return code

    def kill(self) -> int | None:
        """Send SIGKILL and wait for the process; return its exit code (-9 when it was running)."""
        if self.process is None:
            return None
        self.send_signal(signal.SIGKILL)
        self.frozen = False
        return self.process.wait()

    def freeze(self) -> None:
        """Suspend the process with SIGSTOP, so it stops responding without exiting."""
        if not self.send_signal(signal.SIGSTOP):
            raise DevnetError(f"node {self.index} is not running, cannot freeze it")
        self.frozen = True

    def thaw(self) -> None:
        """Resume a frozen process with SIGCONT."""
        if not self.send_signal(signal.SIGCONT):
            raise DevnetError(f"node {self.index} is not running, cannot thaw it")
        self.frozen = False

    def restart(self, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> int | None:
        """Stop the node and start it again with the same arguments; return the old exit code."""
        code = self.stop(timeout)
        self.start(self._last_extra_args)
        return code

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_SECONDS) -> None:
        """Poll GET /status/health until it returns 200.

        Raises NodeNotReadyError, with the tail of the node's log, when the process
        exits or `timeout` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        last_error = "no reply yet"
        while True:
            if not self.is_running():
                code = self.returncode if self.process else None
                raise NodeNotReadyError(
                    f"node {self.index} exited with code {code} before responding to GET {HEALTH_PATH} at {self.api_url}",
                    self.index,
                    self.log_tail(),
                )
            try:
                status, _ = http_get_json(self.api_url + HEALTH_PATH, timeout=min(HTTP_TIMEOUT_SECONDS, timeout))
            except OSError as exc:
                last_error = str(exc)
            else:
                if status == 200:
                    return
                last_error = f"HTTP {status}"
            if time.monotonic() >= deadline:
                raise NodeNotReadyError(
                    f"node {self.index} did not respond to GET {HEALTH_PATH} at {self.api_url} with 200 within "
                    f"{timeout:.0f} s (last result: {last_error})",
                    self.index,
                    self.log_tail(),
                )
            time.sleep(HEALTH_POLL_INTERVAL_SECONDS)

    def fetch_node_id(self) -> str | None:
        """Return `node_id` from GET /status/system, or None when the node does not return one."""
        try:
            status, body = http_get_json(self.api_url + SYSTEM_PATH)
        except OSError:
            return None
        if status != 200 or not isinstance(body, dict):
            return None
        node_id = body.get("node_id")
        return str(node_id) if node_id is not None else None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines of the node's log."""
        return read_log_tail(self.log_path, lines)

    def state(self) -> dict[str, Any]:
        """Describe the node for the state file."""
        return {
            "index": self.index,
            "pid": self.pid,
            "argv": self.argv,
            "api_url": self.api_url,
            "peer_address": self.peer_address,
            "data_dir": str(self.data_dir),
            "log_path": str(self.log_path),
        }


# --- the network ---------------------------------------------------------------------


class Devnet:
    """N nodes on consecutive loopback addresses, node 0 being everyone's bootstrap peer.

    Node i listens on first_address + i with the same API and peer port as the others,
    keeps its data in base_dir/node-i and logs to base_dir/node-i/node.log. Nodes after
    node 0 bootstrap from the first `bootstrap_count` nodes before them. Use it as a
    context manager, or call start() and stop(); stop() may be called more than once.
    """

    node_class: type[DevNode] = DevNode

    def __init__(
        self,
        size: int,
        base_dir: Path | str,
        first_address: str = DEFAULT_FIRST_ADDRESS,
        api_port: int = DEFAULT_PORT,
        peer_port: int = DEFAULT_PORT,
        extra_args: Sequence[str] = (),
        bootstrap_count: int = 1,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_SECONDS,
        env: dict[str, str] | None = None,
    ) -> None:
        if size < 1:
            raise DevnetError(f"devnet size must be >= 1, got {size}")
        if bootstrap_count < 1:
            raise DevnetError(f"bootstrap_count must be >= 1, got {bootstrap_count}")
        # Check the whole range up front, so a bad size fails before any process starts.
        node_address(first_address, size - 1)
        self.base_dir = Path(base_dir).resolve()
        self.first_address = first_address
        self.api_port = api_port
        self.peer_port = peer_port
        self.extra_args = list(extra_args)
        self.bootstrap_count = bootstrap_count
        self.ready_timeout = ready_timeout
        self.env = env
        self.nodes: list[DevNode] = []
        self.exit_codes: dict[int, int | None] = {}
        self.started = False
        # Set by the `start` command, so that `stop` in another shell signals it too.
        self.controller: dict[str, Any] | None = None
        for _ in range(size):
            self._create_node()

    @property
    def state_path(self) -> Path:
        """Path of the state file that `scripts/devnet stop` and `status` read."""
        return self.base_dir / STATE_FILE_NAME

    def __enter__(self) -> "Devnet":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _create_node(self) -> DevNode:
        index = len(self.nodes)
        address = node_address(self.first_address, index)
        bootstrap = [node.peer_address for node in self.nodes[: self.bootstrap_count]]
        node = self.node_class(
            index=index,
            api_host=address,
            api_port=self.api_port,
            peer_host=address,
            peer_port=self.peer_port,
            data_dir=self.base_dir / f"node-{index}",
            bootstrap=bootstrap,
            base_args=self.extra_args,
            env=self.env,
        )
        node.on_started = self._record_node_started
        self.nodes.append(node)
        return node

    def _record_node_started(self) -> None:
        # Restarts and added nodes change pids, so the file is rewritten on every spawn.
        if self.started:
            self.write_state()

    def start(self) -> None:
        """Start node 0, wait until it is ready, then start the others together and wait for all.

        If any node fails to come up, every started node is stopped and the
        NodeNotReadyError propagates.
        """
        if self.started:
            raise DevnetError(f"devnet in {self.base_dir} is already started")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        ensure_no_live_devnet(self.base_dir)
        self.started = True
        self.exit_codes = {}
        try:
            first, rest = self.nodes[0], self.nodes[1:]
            first.start()
            first.wait_ready(self.ready_timeout)
            for node in rest:
                node.start()
            deadline = time.monotonic() + self.ready_timeout
            for node in rest:
                node.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        logger.info("devnet ready: %d nodes from %s in %s", len(self.nodes), self.first_address, self.base_dir)

    def add_node(self, extra_args: Sequence[str] = ()) -> DevNode:
        """Append a node on the next address; start it and wait for it when the devnet runs."""
        node = self._create_node()
        if self.started:
            node.start(extra_args)
            node.wait_ready(self.ready_timeout)
        return node

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> dict[int, int | None]:
        """Stop every node (SIGTERM to all, then SIGKILL to those still running after `timeout`).

        Returns {node index: exit code}, None for nodes never started. Safe to call
        twice, and removes the state file.
        """
        for node in self.nodes:
            node.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.is_running() and node.wait_exit(max(0.0, deadline - time.monotonic())) is None:
                logger.warning("node %d (pid %d) did not exit %.1f s after SIGTERM; sending SIGKILL", node.index, node.pid, timeout)
                node.kill()
            self.exit_codes[node.index] = node.returncode
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        if self.started:
            logger.info("devnet stopped: exit codes %s", self.exit_codes)
        self.started = False
        return dict(self.exit_codes)

    def write_state(self) -> None:
        """Write base_dir/devnet.json with every started node's pid, argv, URL and addresses."""
        state = {
            "schema_version": STATE_SCHEMA_VERSION,
            "controller": self.controller,
            "nodes": [node.state() for node in self.nodes if node.process is not None],
        }
        write_json_atomically(self.state_path, state)

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the log tail of every node, each under a header line."""
        parts = [f"--- node {node.index} ({node.api_url}) {node.log_path} ---\n{node.log_tail(lines)}" for node in self.nodes]
        return "\n".join(parts)


# --- the state file, for other processes ---------------------------------------------


def read_state(base_dir: Path | str) -> dict[str, Any]:
    """Load base_dir/devnet.json; raise StateFileError when it is missing or not ours."""
    path = Path(base_dir).resolve() / STATE_FILE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StateFileError(f"no devnet state file at {path}; is a devnet running with --dir {base_dir}?") from exc
    except ValueError as exc:
        raise StateFileError(f"state file {path} is not valid JSON: {exc}") from exc
    if not isinstance(state, dict) or state.get("schema_version") != STATE_SCHEMA_VERSION:
        raise StateFileError(f"state file {path} has an unknown schema; expected schema_version {STATE_SCHEMA_VERSION}")
    return state


def live_node_pids(state: dict[str, Any]) -> list[int]:
    """Return the pids of the state's nodes that still run their recorded command line."""
    return [node["pid"] for node in state.get("nodes", []) if node.get("pid") and process_matches(node["pid"], node.get("argv", []))]


def ensure_no_live_devnet(base_dir: Path) -> None:
    """Raise DevnetRunningError when base_dir's state file lists live processes; drop a stale file."""
    try:
        state = read_state(base_dir)
    except StateFileError:
        return
    pids = live_node_pids(state)
    if pids:
        raise DevnetRunningError(
            f"a devnet in {base_dir} is still running (pids {pids}); stop it with `scripts/devnet stop --dir {base_dir}`"
        )
    (Path(base_dir) / STATE_FILE_NAME).unlink(missing_ok=True)


def signal_pid(pid: int, signum: int) -> None:
    """Send `signum` to `pid`, ignoring a process that exited since it was checked."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def wait_pids_gone(pids: Iterable[int], argv_by_pid: dict[int, list[str]], timeout: float) -> list[int]:
    """Wait until no pid runs its recorded argv any more; return those still running at the timeout."""
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while remaining:
        remaining = [pid for pid in remaining if process_matches(pid, argv_by_pid[pid])]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(EXIT_POLL_INTERVAL_SECONDS)
    return remaining


def stop_from_state(base_dir: Path | str, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> dict[int, str]:
    """Stop the devnet recorded in base_dir/devnet.json from any process.

    When the `start` command that launched the nodes still runs, it gets the SIGTERM and
    stops its own nodes, so it can collect and print their exit codes. Otherwise every
    node whose /proc/<pid>/cmdline still equals its recorded argv gets SIGTERM. Nodes
    still running after the grace time get SIGKILL, and the state file is removed.
    Returns {node index: "stopped" | "killed" | "not running"}.
    """
    path = Path(base_dir).resolve() / STATE_FILE_NAME
    state = read_state(base_dir)
    nodes = [node for node in state.get("nodes", []) if node.get("pid")]
    argv_by_pid = {node["pid"]: node.get("argv", []) for node in nodes}
    index_by_pid = {node["pid"]: node["index"] for node in nodes}
    controller = state.get("controller") or {}
    controller_pid = controller.get("pid")
    controller_live = bool(controller_pid) and process_matches(controller_pid, controller.get("argv", []))

    live = [pid for pid in argv_by_pid if process_matches(pid, argv_by_pid[pid])]
    outcome = {node["index"]: "stopped" if node["pid"] in live else "not running" for node in nodes}
    for pid in live:
        # SIGCONT lets a frozen node act on its SIGTERM.
        signal_pid(pid, signal.SIGCONT)
    if controller_live:
        # Signalling the nodes as well would send each a second SIGTERM while it shuts down.
        signal_pid(controller_pid, signal.SIGTERM)
        grace_seconds = timeout + CONTROLLER_GRACE_SECONDS
    else:
        for pid in live:
            signal_pid(pid, signal.SIGTERM)
        grace_seconds = timeout

    for pid in wait_pids_gone(live, argv_by_pid, grace_seconds):
        signal_pid(pid, signal.SIGKILL)
        outcome[index_by_pid[pid]] = "killed"
        logger.warning("node %d (pid %d) did not exit %.1f s after SIGTERM; sent SIGKILL", index_by_pid[pid], pid, grace_seconds)
    wait_pids_gone(live, argv_by_pid, timeout)

    # The controller removes the state file itself once it has collected the exit codes.
    if controller_live:
        wait_pids_gone([controller_pid], {controller_pid: controller.get("argv", [])}, CONTROLLER_GRACE_SECONDS)
    path.unlink(missing_ok=True)
    return outcome


# --- command line --------------------------------------------------------------------


class StopRequested(Exception):
    """Raised from the signal handler of `start` on SIGINT or SIGTERM."""


def _raise_stop_requested(signum: int, frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def _ignore_repeated_signal(signum: int, frame: object) -> None:
    print(f"devnet: {signal.Signals(signum).name} received while stopping; still stopping", file=sys.stderr, flush=True)


def format_table(rows: list[list[str]]) -> str:
    """Format rows (first row is the header) as left-aligned columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def build_cli_devnet(args: argparse.Namespace, daemon_args: list[str]) -> Devnet:
    """Build the Devnet that `start` runs: every daemon gets --dev plus the arguments after `--`."""
    base_dir = Path(args.dir).resolve()
    if args.clean:
        ensure_no_live_devnet(base_dir)
        for node_dir in base_dir.glob("node-*"):
            if node_dir.is_dir():
                shutil.rmtree(node_dir)
    devnet = Devnet(
        args.nodes,
        base_dir,
        first_address=args.first_address,
        api_port=args.api_port,
        peer_port=args.peer_port,
        extra_args=["--dev", *daemon_args],
        bootstrap_count=args.bootstrap_count,
        ready_timeout=args.ready_timeout,
    )
    devnet.controller = {"pid": os.getpid(), "argv": read_cmdline(os.getpid())}
    return devnet


def print_node_table(devnet: Devnet) -> None:
    rows = [["node", "node_id", "api_url", "peer_address", "pid"]]
    for node in devnet.nodes:
        rows.append([str(node.index), node.fetch_node_id() or "?", node.api_url, node.peer_address, str(node.pid)])
    print(format_table(rows), flush=True)


def watch_nodes(devnet: Devnet, exited: set[int]) -> None:
    """Report each node that exits on its own, until a StopRequested interrupts the loop."""
    while True:
        time.sleep(1.0)
        for node in devnet.nodes:
            if node.index not in exited and not node.is_running():
                exited.add(node.index)
                print(f"devnet: node {node.index} exited unexpectedly with code {node.returncode}; log: {node.log_path}", flush=True)


def run_start(args: argparse.Namespace, daemon_args: list[str]) -> int:
    """Start a devnet, print its nodes, wait for SIGINT or SIGTERM, then stop it.

    Returns 0 when every node started and later exited with code 0.
    """
    devnet = build_cli_devnet(args, daemon_args)
    signal.signal(signal.SIGINT, _raise_stop_requested)
    signal.signal(signal.SIGTERM, _raise_stop_requested)
    exited: set[int] = set()
    start_failed = False

    try:
        print(f"devnet: starting {args.nodes} nodes in {devnet.base_dir}", flush=True)
        devnet.start()
        print_node_table(devnet)
        print(f"devnet: ready; logs in {devnet.base_dir}/node-*/node.log; stop with Ctrl-C or `scripts/devnet stop --dir {args.dir}`", flush=True)
        watch_nodes(devnet, exited)
    except StopRequested as request:
        print(f"devnet: {request} received, stopping {len(devnet.nodes)} nodes", flush=True)
    except NodeNotReadyError as exc:
        start_failed = True
        print(f"devnet: error: {exc}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, _ignore_repeated_signal)
        signal.signal(signal.SIGTERM, _ignore_repeated_signal)
        exit_codes = devnet.stop()

    for index, code in sorted(exit_codes.items()):
        print(f"devnet: node {index} exit code {code}", flush=True)
    clean_exit = all(code == 0 for code in exit_codes.values())
    return 0 if clean_exit and not start_failed and not exited else 1


def run_stop(args: argparse.Namespace) -> int:
    """Stop the devnet recorded in --dir from another process."""
    outcome = stop_from_state(args.dir, timeout=args.timeout)
    for index, result in sorted(outcome.items()):
        print(f"devnet: node {index} {result}")
    return 0 if all(result != "killed" for result in outcome.values()) else 1


def run_status(args: argparse.Namespace) -> int:
    """Print each recorded node, whether its process runs and what /status/health returns."""
    state = read_state(args.dir)
    rows = [["node", "pid", "process", "health", "api_url", "peer_address"]]
    healthy = True
    for node in state.get("nodes", []):
        running = bool(node.get("pid")) and process_matches(node["pid"], node.get("argv", []))
        try:
            status, body = http_get_json(node["api_url"] + HEALTH_PATH)
            health = str(body.get("status")) if status == 200 and isinstance(body, dict) else f"HTTP {status}"
        except OSError as exc:
            health = f"no reply ({exc.__class__.__name__})"
            status = None
        healthy = healthy and running and status == 200
        rows.append([str(node["index"]), str(node.get("pid")), "running" if running else "gone", health, node["api_url"], node["peer_address"]])
    print(format_table(rows))
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `python -m voxanode.devnet`."""
    parser = argparse.ArgumentParser(
        prog="devnet",
        description="Run a local network of voxanode daemons on consecutive loopback addresses.",
        epilog="Arguments after `--` on the start command are passed to every daemon, e.g. `-- --log-level DEBUG`.",
    )
    parser.add_argument("--log-level", default="WARNING", help="log level of the harness itself (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="start N nodes and stay in the foreground until Ctrl-C or SIGTERM")
    start.add_argument("-n", "--nodes", type=int, default=DEFAULT_SIZE, help="number of nodes (default: %(default)s)")
    start.add_argument("--dir", default=DEFAULT_BASE_DIR, help="base directory for node data, logs and the state file (default: %(default)s)")
    start.add_argument("--first-address", default=DEFAULT_FIRST_ADDRESS, help="loopback address of node 0; node i gets this + i (default: %(default)s)")
    start.add_argument("--api-port", type=int, default=DEFAULT_PORT, help="TCP port of every node's API (default: %(default)s)")
    start.add_argument("--peer-port", type=int, default=DEFAULT_PORT, help="UDP port of every node's peer protocol (default: %(default)s)")
    start.add_argument("--bootstrap-count", type=int, default=1, help="how many of the first nodes later nodes bootstrap from (default: %(default)s)")
    start.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_SECONDS, help="seconds to wait for each node's health check (default: %(default)s)")
    start.add_argument("--clean", action="store_true", help="delete the node directories under --dir first (identities, data and logs)")

    stop = commands.add_parser("stop", help="stop the devnet running from --dir")
    stop.add_argument("--dir", default=DEFAULT_BASE_DIR, help="base directory of the running devnet (default: %(default)s)")
    stop.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT_SECONDS, help="seconds to wait after SIGTERM before SIGKILL (default: %(default)s)")

    status = commands.add_parser("status", help="list the nodes of the devnet in --dir and whether their health check responds")
    status.add_argument("--dir", default=DEFAULT_BASE_DIR, help="base directory of the devnet (default: %(default)s)")
    return parser


def split_daemon_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv at the first `--` into (devnet arguments, daemon arguments)."""
    argv = list(argv)
    if "--" in argv:
        position = argv.index("--")
        return argv[:position], argv[position + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m voxanode.devnet`; returns the exit code."""
    own_args, daemon_args = split_daemon_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own_args)
    if daemon_args and args.command != "start":
        parser.error("arguments after `--` are only accepted by the start command")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "start":
            if args.nodes < 1:
                parser.error(f"--nodes must be >= 1, got {args.nodes}")
            return run_start(args, daemon_args)
        if args.command == "stop":
            return run_stop(args)
        return run_status(args)
    except DevnetError as exc:
        print(f"devnet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
