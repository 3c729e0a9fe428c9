"""Apps benchmark: time to 3 running replicas with voxanode, `docker run` and a swarm service.

All three systems start the same image (the local test image that
`scripts/build-test-image` builds, busybox httpd on port 8080) three times, on this
machine's Docker engine, one system after the other:

1. voxanode: a 3-node devnet on a random 127.x.y.z block (voxanode.devnet), daemon flags
   `--dev --apps-reconcile-interval-seconds 1`. A trial sends POST /apps/add_app/
   (replicas=3, port 8080) to node i and polls GET /apps/get_app_status/ on node i+1
   every POLL_INTERVAL_SECONDS from the moment the reply arrives, because the app id
   comes in that reply. It ends when 3 instances report status "running". The add_app
   response time is recorded too. The app is then stopped with force, and the next trial
   waits until `docker ps -a` lists no container with its app-id label.
2. docker run: three threads each create and start one container with the Docker SDK,
   which is what `docker run -d` does. The containers get the host settings voxanode
   uses: port 8080 published on 127.0.0.1, `no-new-privileges`, every capability
   dropped, the same memory, CPU and pids limits, and json-file logs of at most 10m.
   Each thread then inspects its container every POLL_INTERVAL_SECONDS until
   State.Running. A trial ends when all three are running.
3. docker swarm: `docker service create --detach --replicas 3 --no-resolve-image <image
   ID>` on a one-node swarm. Given an image ID, the CLI does not resolve it, and the
   engine's swarm executor skips the pull for a reference that parses as a digest
   (moby, daemon/cluster/executor/container/adapter.go). The trial ends when the service's tasks API (what `docker service ps` lists)
   shows 3 tasks running. The service publishes no port, because a swarm service
   cannot bind a published port to 127.0.0.1 alone, and `docker service create` has no
   `--security-opt`, so `no-new-privileges` is not set. When the engine is
   in no swarm, the bench runs `docker swarm init --advertise-addr 127.0.0.1 --listen-addr
   127.0.0.1:2377` just before this part and `docker swarm leave --force` right after it.
   If the init fails, the part is skipped and the reason printed. A swarm the engine was
   already in is left as it was.

Each system gets `--warmup` untimed trials first. The devnet is stopped before the
docker run part, so its daemons do not load the CPU while the baselines run. The table
shows median and p90 per system and the voxanode/docker run (target <= 1.5) and
voxanode/swarm (target < 1) ratios of the medians.

Every container and service this bench makes has a name starting with NAME_PREFIX and
the label RUN_LABEL, except voxanode's containers, which carry the nodes' node-id label.
All of them are removed on every exit path the script can catch (return, error, SIGINT,
SIGTERM), the devnet is stopped, and a swarm the bench initialised is left.
After SIGKILL nothing is cleaned up.

    python bench/apps.py [--trials 5] [--warmup 1] [--json FILE] [--keep-dir]
"""

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import docker
import docker.errors
import psutil
from docker.types import LogConfig

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from voxanode.devnet import Devnet, DevnetError, allocate_free_block, http_get_json  # noqa: E402

DEFAULT_TRIALS = 5
DEFAULT_WARMUP = 1
MAX_TRIALS = 50
REPLICAS = 3
DEVNET_SIZE = 3
TEST_IMAGE = "voxanode-test/httpd:latest"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-test-image"
CONTAINER_PORT = 8080
PUBLISH_HOST = "127.0.0.1"
MIB = 1024 * 1024
MEMORY_LIMIT_BYTES = 64 * MIB
MEMORY_LIMIT_TEXT = "64m"
CPU_LIMIT_CORES = 0.5
NANO_CPUS_PER_CORE = 1_000_000_000
# voxanode's default apps_pids_limit, so every system runs under the same pids limit.
PIDS_LIMIT = 512
LOG_MAX_SIZE = "10m"
# The benches send more requests than the default rate limits allow.
VOXANODE_ARGS = ("--dev", "--apps-reconcile-interval-seconds", "1", "--rate-limit-default", "unlimited", "--rate-limit-data", "unlimited", "--rate-limit-deployments", "unlimited")

NAME_PREFIX = "voxabench-"
RUN_LABEL = "io.voxanode.bench.run-id"
APP_LABEL = "io.voxanode.app-id"
NODE_LABEL = "io.voxanode.node-id"
SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
SWARM_ADVERTISE_ADDRESS = "127.0.0.1"
SWARM_LISTEN_ADDRESS = "127.0.0.1:2377"
SWARM_BRIDGE_NETWORK = "docker_gwbridge"

POLL_INTERVAL_SECONDS = 0.05
REMOVAL_POLL_INTERVAL_SECONDS = 0.2
BUILD_TIMEOUT_SECONDS = 300.0
DOCKER_CLI_TIMEOUT_SECONDS = 60.0
DOCKER_SDK_TIMEOUT_SECONDS = 60
ADD_APP_TIMEOUT_SECONDS = 120.0
STOP_APP_TIMEOUT_SECONDS = 60.0
STATUS_TIMEOUT_SECONDS = 10.0
RUNNING_TIMEOUT_SECONDS = 120.0
REMOVAL_TIMEOUT_SECONDS = 60.0
APPS_OFFERED_TIMEOUT_SECONDS = 60.0
DEVNET_READY_TIMEOUT_SECONDS = 90.0

DOCKER_RUN_RATIO_TARGET = 1.5
SWARM_RATIO_TARGET = 1.0
VOXANODE = "voxanode"
DOCKER_RUN = "docker run"
SWARM = "docker swarm"

logger = logging.getLogger(__name__)


class BenchError(Exception):
    """A system could not be set up, measured or cleaned up."""


class SkipSystem(BenchError):
    """A system cannot be measured on this machine. The message gives the reason."""


@dataclass
class Trial:
    """One timed start of REPLICAS instances. `seconds` is None when it timed out."""

    number: int
    warmup: bool
    seconds: float | None
    request_seconds: float | None = None
    removal_seconds: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SystemResult:
    """The trials of one system and the conditions they ran under."""

    name: str
    trials: list[Trial] = field(default_factory=list)
    skipped: str | None = None
    cpu_busy_percent: float | None = None
    other_containers_running: int | None = None
    notes: list[str] = field(default_factory=list)

    def timed(self) -> list[Trial]:
        return [trial for trial in self.trials if not trial.warmup]

    def timeouts(self) -> int:
        return sum(1 for trial in self.timed() if trial.seconds is None)

    def seconds(self) -> list[float]:
        return [trial.seconds for trial in self.timed() if trial.seconds is not None]


# --- small helpers -----------------------------------------------------------------------


def run_docker(args: Sequence[str], timeout: float = DOCKER_CLI_TIMEOUT_SECONDS, check: bool = True) -> subprocess.CompletedProcess:
    """Run the docker CLI. With `check` set, a non-zero exit raises BenchError."""
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and completed.returncode != 0:
        raise BenchError(f"`docker {' '.join(args)}` failed: {completed.stderr.strip()[-500:]}")
    return completed


def post_json(url: str, body: dict, timeout: float) -> tuple[int, Any]:
    """POST `body` as JSON and return (status, parsed reply or the text when it is not JSON)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def poll_until(condition: Callable[[], bool], started: float, timeout: float, interval: float = POLL_INTERVAL_SECONDS) -> tuple[float | None, int]:
    """Call `condition` every `interval` seconds until it is true or `timeout` passes.

    Returns the seconds from `started` to the call that returned true (None on timeout)
    and the number of calls.
    """
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        poll_started = time.monotonic()
        polls += 1
        if condition():
            return time.monotonic() - started, polls
        if poll_started >= deadline:
            return None, polls
        time.sleep(max(0.0, poll_started + interval - time.monotonic()))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while cleanup runs, then exit for one that arrived meanwhile."""
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            raise SystemExit(128 + received[0])


class MachineLoad:
    """Machine CPU use and the other containers running during one part of the bench."""

    def __init__(self, client: docker.DockerClient, is_ours: Callable[[dict], bool]) -> None:
        self.client = client
        self.is_ours = is_ours

    def __enter__(self) -> "MachineLoad":
        psutil.cpu_percent(interval=None)
        self.other_containers = sum(1 for container in self.client.api.containers() if not self.is_ours(container))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cpu_busy_percent = psutil.cpu_percent(interval=None)


# --- cleanup of everything the bench made ------------------------------------------------


class Cleanup:
    """Registry of the services, containers, devnet and swarm this run made, with their removal."""

    def __init__(self, client: docker.DockerClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.node_ids: set[str] = set()
        self.devnet: Devnet | None = None
        self.swarm_initialised = False
        self.bridge_network_existed = True
        self.errors: list[str] = []
        self.containers_removed = 0

    def is_ours(self, container: dict) -> bool:
        """Return whether a container from the engine's list was made by this run."""
        labels = container.get("Labels") or {}
        return labels.get(RUN_LABEL) == self.run_id or labels.get(NODE_LABEL) in self.node_ids

    def remove_services(self) -> None:
        completed = run_docker(["service", "ls", "-q", "--filter", f"label={RUN_LABEL}={self.run_id}"], check=False)
        services = completed.stdout.split() if completed.returncode == 0 else []
        if services:
            run_docker(["service", "rm", *services], check=False)

    def remove_containers(self) -> int:
        """Remove every container with this run's label or one of its node ids, and return the count."""
        api = self.client.api
        containers = api.containers(all=True, filters={"label": f"{RUN_LABEL}={self.run_id}"})
        for node_id in self.node_ids:
            containers += api.containers(all=True, filters={"label": f"{NODE_LABEL}={node_id}"})
        for container in containers:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container["Id"], force=True, v=True)
        return len(containers)

    def remove_leftover_containers(self) -> None:
        self.containers_removed += self.remove_containers()

    def stop_devnet(self) -> None:
        if self.devnet is not None:
            self.devnet.stop()
            self.devnet = None

    def leave_swarm(self) -> None:
        """Leave the swarm if this bench initialised it, and remove the bridge network it added."""
        if not self.swarm_initialised:
            return
        completed = run_docker(["swarm", "leave", "--force"], check=False)
        if completed.returncode != 0:
            self.errors.append(f"`docker swarm leave --force` failed: {completed.stderr.strip()}")
            if swarm_state() != "inactive":
                return
            # Something else made the engine leave the swarm, so there is nothing left to leave.
        self.swarm_initialised = False
        if not self.bridge_network_existed:
            removed = run_docker(["network", "rm", SWARM_BRIDGE_NETWORK], check=False)
            if removed.returncode != 0:
                self.errors.append(f"`docker network rm {SWARM_BRIDGE_NETWORK}` failed: {removed.stderr.strip()}")

    def run(self) -> None:
        """Run every removal step. A failed step is recorded in `errors`, and the next one still runs."""
        for step in (self.remove_services, self.stop_devnet, self.remove_leftover_containers, self.leave_swarm):
            try:
                step()
            except (BenchError, DevnetError, docker.errors.DockerException, subprocess.SubprocessError, OSError) as error:
                self.errors.append(f"{step.__name__}: {error}")


# --- voxanode ----------------------------------------------------------------------------


class VoxanodeSystem:
    """A 3-node devnet that deploys the app through its REST API."""

    def __init__(self, client: docker.DockerClient, cleanup: Cleanup, base_dir: Path) -> None:
        self.client = client
        self.cleanup = cleanup
        self.base_dir = base_dir
        self.devnet: Devnet | None = None

    def start(self) -> None:
        block = allocate_free_block(DEVNET_SIZE)
        self.devnet = Devnet(
            DEVNET_SIZE,
            self.base_dir,
            first_address=block.first_address,
            api_port=block.api_port,
            peer_port=block.peer_port,
            extra_args=VOXANODE_ARGS,
            ready_timeout=DEVNET_READY_TIMEOUT_SECONDS,
        )
        self.cleanup.devnet = self.devnet
        print(f"{VOXANODE}: starting {DEVNET_SIZE} nodes from {block.first_address}, API port {block.api_port}", flush=True)
        self.devnet.start()
        node_ids = [node.fetch_node_id() for node in self.devnet.nodes]
        if None in node_ids:
            raise BenchError(f"a node returned no node_id from /status/system: {node_ids}")
        self.cleanup.node_ids.update(node_ids)

        # Placement only picks nodes that every node lists as offering app deployment.
        offered, _ = poll_until(lambda: self._all_offer_apps(set(node_ids)), time.monotonic(), APPS_OFFERED_TIMEOUT_SECONDS, 0.5)
        if offered is None:
            raise BenchError(f"the nodes did not all list each other with capability app-deployment within {APPS_OFFERED_TIMEOUT_SECONDS:.0f} s")

    def _all_offer_apps(self, node_ids: set[str]) -> bool:
        for node in self.devnet.nodes:
            try:
                status, body = http_get_json(f"{node.api_url}/data/discover_nodes/?capability=app-deployment")
            except OSError:
                return False
            if status != 200 or not isinstance(body, dict):
                return False
            if not node_ids <= {entry.get("node_id") for entry in body.get("nodes", [])}:
                return False
        return True

    def stop(self) -> None:
        self.cleanup.stop_devnet()

    def run_trial(self, number: int, warmup: bool) -> Trial:
        entry = self.devnet.nodes[number % DEVNET_SIZE]
        observer = self.devnet.nodes[(number + 1) % DEVNET_SIZE]
        body = {
            "name": f"{NAME_PREFIX}{self.cleanup.run_id}-{number}",
            "image": TEST_IMAGE,
            "replicas": REPLICAS,
            "ports": [{"container_port": CONTAINER_PORT}],
            "resources": {"memory": MEMORY_LIMIT_TEXT, "cpu": str(CPU_LIMIT_CORES)},
        }

        started = time.monotonic()
        status, answer = post_json(f"{entry.api_url}/apps/add_app/", body, ADD_APP_TIMEOUT_SECONDS)
        request_seconds = time.monotonic() - started
        if status != 200 or not isinstance(answer, dict):
            raise BenchError(f"POST /apps/add_app/ on node {entry.index} returned {status}: {str(answer)[:500]}")
        app_id = answer["app_id"]

        status_url = f"{observer.api_url}/apps/get_app_status/?app_id={app_id}"
        seconds, polls = poll_until(lambda: self._running_instances(status_url) >= REPLICAS, started, RUNNING_TIMEOUT_SECONDS)
        if seconds is None:
            logger.warning("app %s: %d instances not running on node %d within %.0f s", app_id, REPLICAS, observer.index, RUNNING_TIMEOUT_SECONDS)

        removal_seconds = self._stop_app(entry.api_url, app_id)
        return Trial(
            number, warmup, seconds, request_seconds, removal_seconds,
            {"app_id": app_id, "polls": polls, "entry_node": entry.index, "observer_node": observer.index,
             "deployment_details": answer.get("deployment_details")},
        )

    @staticmethod
    def _running_instances(status_url: str) -> int:
        try:
            status, body = http_get_json(status_url, timeout=STATUS_TIMEOUT_SECONDS)
        except OSError:
            return 0
        if status != 200 or not isinstance(body, dict):
            return 0
        return sum(1 for instance in body.get("instances", []) if instance.get("status") == "running")

    def _stop_app(self, api_url: str, app_id: str) -> float | None:
        """Stop the app with force, wait until its containers are gone, and return that time."""
        started = time.monotonic()
        status, answer = post_json(f"{api_url}/apps/add_stop_app/", {"app_id": app_id, "force": True}, STOP_APP_TIMEOUT_SECONDS)
        if status != 200:
            raise BenchError(f"POST /apps/add_stop_app/ for {app_id} returned {status}: {str(answer)[:500]}")
        label_filter = {"label": f"{APP_LABEL}={app_id}"}
        seconds, _ = poll_until(
            lambda: not self.client.api.containers(all=True, filters=label_filter),
            started, REMOVAL_TIMEOUT_SECONDS, REMOVAL_POLL_INTERVAL_SECONDS,
        )
        if seconds is None:
            raise BenchError(f"containers of app {app_id} still exist {REMOVAL_TIMEOUT_SECONDS:.0f} s after a forced stop")
        return seconds


# --- docker run --------------------------------------------------------------------------


class DockerRunSystem:
    """Three containers created and started in parallel through the Docker SDK."""

    def __init__(self, client: docker.DockerClient, cleanup: Cleanup) -> None:
        self.client = client
        self.cleanup = cleanup
        self.pool = ThreadPoolExecutor(max_workers=REPLICAS, thread_name_prefix="docker-run")

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.pool.shutdown(wait=True)

    def run_trial(self, number: int, warmup: bool) -> Trial:
        names = [f"{NAME_PREFIX}{self.cleanup.run_id}-run-{number}-{index}" for index in range(REPLICAS)]
        started = time.monotonic()
        futures = [self.pool.submit(self._run_one, name, started) for name in names]
        running_at = [future.result(timeout=RUNNING_TIMEOUT_SECONDS + DOCKER_SDK_TIMEOUT_SECONDS) for future in futures]
        seconds = None if None in running_at else max(running_at)

        removal_started = time.monotonic()
        for name in names:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_container(name, force=True, v=True)
        return Trial(number, warmup, seconds, None, time.monotonic() - removal_started, {"per_container_seconds": running_at})

    def _run_one(self, name: str, started: float) -> float | None:
        """Create and start one container, inspect it until it runs, and return the time since `started`."""
        api = self.client.api
        host_config = api.create_host_config(
            port_bindings={f"{CONTAINER_PORT}/tcp": (PUBLISH_HOST, None)},
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"],
            pids_limit=PIDS_LIMIT,
            mem_limit=MEMORY_LIMIT_BYTES,
            memswap_limit=MEMORY_LIMIT_BYTES,
            nano_cpus=round(CPU_LIMIT_CORES * NANO_CPUS_PER_CORE),
            restart_policy={"Name": "no"},
            log_config=LogConfig(type=LogConfig.types.JSON, config={"max-size": LOG_MAX_SIZE}),
        )
        created = api.create_container(
            image=TEST_IMAGE,
            name=name,
            labels={RUN_LABEL: self.cleanup.run_id},
            ports=[(CONTAINER_PORT, "tcp")],
            host_config=host_config,
            detach=True,
        )
        api.start(created["Id"])
        seconds, _ = poll_until(
            lambda: api.inspect_container(created["Id"])["State"]["Running"], started, RUNNING_TIMEOUT_SECONDS
        )
        return seconds


# --- docker swarm ------------------------------------------------------------------------


class SwarmSystem:
    """A replicated service on a one-node swarm, created with the docker CLI."""

    def __init__(self, client: docker.DockerClient, cleanup: Cleanup, image_id: str) -> None:
        self.client = client
        self.cleanup = cleanup
        self.image_id = image_id
        self.state_before: str | None = None
        self.constraint: list[str] = []

    def start(self) -> None:
        """Join the engine to a one-node swarm, or check the swarm it is in.

        Raises SkipSystem when the swarm cannot be initialised or the engine is in a swarm
        this bench cannot place tasks on.
        """
        self.state_before = swarm_state()
        if self.state_before == "active":
            info = self.client.info()["Swarm"]
            if not info.get("ControlAvailable"):
                raise SkipSystem("the engine is a worker of an existing swarm, so it cannot create services")
            # Other nodes of that swarm must not take tasks, so every task goes to this engine.
            self.constraint = ["--constraint", f"node.id=={info['NodeID']}"]
            return
        if self.state_before != "inactive":
            raise SkipSystem(f"the engine's swarm state is {self.state_before!r}; only 'inactive' or 'active' can be used")

        networks = run_docker(["network", "ls", "--format", "{{.Name}}"]).stdout.split()
        self.cleanup.bridge_network_existed = SWARM_BRIDGE_NETWORK in networks
        self.cleanup.swarm_initialised = True
        completed = run_docker(
            ["swarm", "init", "--advertise-addr", SWARM_ADVERTISE_ADDRESS, "--listen-addr", SWARM_LISTEN_ADDRESS],
            check=False,
        )
        if completed.returncode != 0:
            # A failed init may still have changed the state, so cleanup checks and leaves.
            self.cleanup.swarm_initialised = swarm_state() != "inactive"
            raise SkipSystem(f"`docker swarm init --advertise-addr {SWARM_ADVERTISE_ADDRESS}` failed: {completed.stderr.strip()}")
        print(f"{SWARM}: swarm initialised with advertise address {SWARM_ADVERTISE_ADDRESS}", flush=True)

    def stop(self) -> None:
        self.cleanup.remove_services()
        self.cleanup.leave_swarm()

    def run_trial(self, number: int, warmup: bool) -> Trial:
        name = f"{NAME_PREFIX}{self.cleanup.run_id}-svc-{number}"
        command = [
            "service", "create", "--detach", "--quiet", "--name", name,
            "--replicas", str(REPLICAS), "--no-resolve-image",
            "--label", f"{RUN_LABEL}={self.cleanup.run_id}",
            "--container-label", f"{RUN_LABEL}={self.cleanup.run_id}",
            "--limit-memory", MEMORY_LIMIT_TEXT, "--limit-cpu", str(CPU_LIMIT_CORES),
            "--limit-pids", str(PIDS_LIMIT), "--cap-drop", "ALL",
            "--log-driver", "json-file", "--log-opt", f"max-size={LOG_MAX_SIZE}",
            # Removal kills at once, as voxanode's forced stop and `docker rm -f` do.
            "--stop-grace-period", "0s",
            *self.constraint, self.image_id,
        ]

        started = time.monotonic()
        run_docker(command)
        request_seconds = time.monotonic() - started
        seconds, polls = poll_until(lambda: self._running_tasks(name) >= REPLICAS, started, RUNNING_TIMEOUT_SECONDS)
        if seconds is None:
            logger.warning("service %s: %d tasks not running within %.0f s", name, REPLICAS, RUNNING_TIMEOUT_SECONDS)

        removal_started = time.monotonic()
        run_docker(["service", "rm", name])
        label_filter = {"label": f"{SWARM_SERVICE_LABEL}={name}"}
        removal_seconds, _ = poll_until(
            lambda: not self.client.api.containers(all=True, filters=label_filter),
            removal_started, REMOVAL_TIMEOUT_SECONDS, REMOVAL_POLL_INTERVAL_SECONDS,
        )
        if removal_seconds is None:
            raise BenchError(f"containers of service {name} still exist {REMOVAL_TIMEOUT_SECONDS:.0f} s after `docker service rm`")
        return Trial(number, warmup, seconds, request_seconds, removal_seconds, {"service": name, "polls": polls})

    def _running_tasks(self, name: str) -> int:
        tasks = self.client.api.tasks(filters={"service": name, "desired-state": "running"})
        return sum(1 for task in tasks if task["Status"]["State"] == "running")


def swarm_state() -> str:
    """Return the engine's Swarm.LocalNodeState: inactive, pending, active, error or locked."""
    return run_docker(["info", "--format", "{{.Swarm.LocalNodeState}}"]).stdout.strip()


# --- running the systems -----------------------------------------------------------------


def measure(system: Any, result: SystemResult, args: argparse.Namespace, load: MachineLoad) -> None:
    """Start `system`, run the warm-up and timed trials, and stop it on every path."""
    try:
        system.start()
        with load:
            for number in range(args.warmup + args.trials):
                trial = system.run_trial(number, warmup=number < args.warmup)
                result.trials.append(trial)
                label = "warm-up" if trial.warmup else f"trial {number - args.warmup + 1}/{args.trials}"
                seconds_text = "timeout" if trial.seconds is None else f"{trial.seconds:.3f} s"
                request_text = "" if trial.request_seconds is None else f" (request returned after {trial.request_seconds:.3f} s)"
                print(f"{result.name}: {label}: {REPLICAS} running after {seconds_text}{request_text}", flush=True)
        result.cpu_busy_percent = load.cpu_busy_percent
        result.other_containers_running = load.other_containers
    except SkipSystem as reason:
        result.skipped = str(reason)
        print(f"{result.name}: SKIPPED: {reason}", flush=True)
    finally:
        with signals_deferred():
            system.stop()


def build_test_image() -> str:
    """Run scripts/build-test-image and return the image ID it prints."""
    completed = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS, check=False)
    if completed.returncode != 0:
        raise BenchError(f"{BUILD_SCRIPT.name} failed: {completed.stderr.strip()[-1000:]}")
    lines = completed.stdout.split()
    if not lines or not lines[-1].startswith("sha256:"):
        raise BenchError(f"{BUILD_SCRIPT.name} printed no image ID: {completed.stdout!r}")
    return lines[-1]


def machine_facts(client: docker.DockerClient) -> dict[str, Any]:
    info = client.info()
    client_version = run_docker(["version", "--format", "{{.Client.Version}}"], check=False).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "docker_server": client.version()["Version"],
        "docker_client": client_version or "unknown",
        "storage_driver": info.get("Driver"),
        "cgroup": f"{info.get('CgroupDriver')} v{info.get('CgroupVersion')}",
        "load_average_1m_at_start": os.getloadavg()[0],
    }


# --- report ------------------------------------------------------------------------------


def summarize(result: SystemResult) -> dict[str, Any]:
    """Compute median, p90, min and max of the timed trials. Each is None when any trial timed out."""
    values = result.seconds()
    complete = bool(values) and result.timeouts() == 0
    requests = [trial.request_seconds for trial in result.timed() if trial.request_seconds is not None]
    return {
        "trials": len(result.timed()),
        "timeouts": result.timeouts(),
        "median": statistics.median(values) if complete else None,
        "p90": percentile(values, 0.9) if complete else None,
        "min": min(values) if complete else None,
        "max": max(values) if complete else None,
        "request_median": statistics.median(requests) if requests else None,
    }


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def format_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def verdict(value: float | None, target: float, strict: bool) -> str:
    if value is None:
        return "n/a"
    met = value < target if strict else value <= target
    return "met" if met else "NOT MET"


def print_report(results: dict[str, SystemResult], facts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the ratios, and return the summaries for the JSON file."""
    summaries = {name: summarize(result) for name, result in results.items() if not result.skipped}
    print()
    print(f"Apps benchmark: {REPLICAS} replicas of {TEST_IMAGE}, {args.trials} timed trials after {args.warmup} warm-up, "
          f"polled every {POLL_INTERVAL_SECONDS * 1000:.0f} ms")
    print(f"machine: {facts['cores']} cores, {facts['memory_gib']} GiB, {facts['machine']}, kernel {facts['kernel']}, "
          f"Python {facts['python']}, Docker engine {facts['docker_server']} (client {facts['docker_client']}), "
          f"{facts['storage_driver']}, cgroup {facts['cgroup']}")
    header = f"{'system':<14} {'median s':>9} {'p90 s':>9} {'min s':>9} {'max s':>9} {'timeouts':>9} {'request median s':>17} {'CPU busy':>9} {'other ctrs':>10}"
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        if result.skipped:
            print(f"{name:<14} SKIPPED: {result.skipped}")
            continue
        summary = summaries[name]
        cpu = "n/a" if result.cpu_busy_percent is None else f"{result.cpu_busy_percent:.0f}%"
        others = "n/a" if result.other_containers_running is None else str(result.other_containers_running)
        print(f"{name:<14} {format_seconds(summary['median']):>9} {format_seconds(summary['p90']):>9} "
              f"{format_seconds(summary['min']):>9} {format_seconds(summary['max']):>9} {summary['timeouts']:>9} "
              f"{format_seconds(summary['request_median']):>17} {cpu:>9} {others:>10}")
    print("  request: voxanode's POST /apps/add_app/ reply, swarm's `docker service create --detach` exit")

    ratios: dict[str, Any] = {}
    ours = summaries.get(VOXANODE)
    for name, target, strict in ((DOCKER_RUN, DOCKER_RUN_RATIO_TARGET, False), (SWARM, SWARM_RATIO_TARGET, True)):
        theirs = summaries.get(name)
        median_ratio = ratio(ours["median"], theirs["median"]) if ours and theirs else None
        p90_ratio = ratio(ours["p90"], theirs["p90"]) if ours and theirs else None
        judged = verdict(median_ratio, target, strict)
        ratios[name] = {"median_ratio": median_ratio, "p90_ratio": p90_ratio, "target": target, "verdict": judged}
        median_text = "n/a" if median_ratio is None else f"{median_ratio:.2f}"
        p90_text = "n/a" if p90_ratio is None else f"{p90_ratio:.2f}"
        print(f"voxanode/{name}: median ratio {median_text}, p90 ratio {p90_text} "
              f"(target {'<' if strict else '<='} {target:g}: {judged})")
    return {"summaries": summaries, "ratios": ratios}


def write_json(path: Path, results: dict[str, SystemResult], report: dict[str, Any], facts: dict[str, Any],
               args: argparse.Namespace, extra: dict[str, Any]) -> None:
    figures = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trials": args.trials, "warmup": args.warmup, "replicas": REPLICAS,
        "poll_interval_seconds": POLL_INTERVAL_SECONDS, "machine": facts, **extra, **report,
        "systems": {name: asdict(result) for name, result in results.items()},
    }
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


# --- entry point -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time 3 running replicas with voxanode, docker run and a docker swarm service.")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="timed trials per system (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed trials per system before the timed ones (default: %(default)s)")
    parser.add_argument("--only", choices=[VOXANODE, "docker-run", "swarm"], action="append",
                        help="measure only this system; may be given more than once (default: all three)")
    parser.add_argument("--json", type=Path, help="also write every trial and figure to this JSON file")
    parser.add_argument("--keep-dir", action="store_true", help="keep the devnet's data directories and logs")
    args = parser.parse_args(argv)
    if not 1 <= args.trials <= MAX_TRIALS:
        parser.error(f"--trials must be 1..{MAX_TRIALS}, got {args.trials}")
    if not 0 <= args.warmup <= 5:
        parser.error(f"--warmup must be 0..5, got {args.warmup}")
    return args


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, raise_system_exit)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C or kill -INT must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    selected = set(args.only or [VOXANODE, "docker-run", "swarm"])

    client = docker.from_env(timeout=DOCKER_SDK_TIMEOUT_SECONDS)
    run_id = secrets.token_hex(4)
    cleanup = Cleanup(client, run_id)
    base_dir = Path(tempfile.mkdtemp(prefix="voxanode-apps-bench-"))
    results: dict[str, SystemResult] = {}
    swarm_before = swarm_after = None
    started = time.monotonic()
    try:
        facts = machine_facts(client)
        image_id = build_test_image()
        print(f"run {run_id}: image {TEST_IMAGE} is {image_id[:19]}", flush=True)
        swarm_before = swarm_state()
        print(f"swarm state before: {swarm_before}", flush=True)

        parts: list[tuple[str, Callable[[], Any]]] = [
            (VOXANODE, lambda: VoxanodeSystem(client, cleanup, base_dir / "devnet")),
            (DOCKER_RUN, lambda: DockerRunSystem(client, cleanup)),
            (SWARM, lambda: SwarmSystem(client, cleanup, image_id)),
        ]
        choices = {VOXANODE: VOXANODE, DOCKER_RUN: "docker-run", SWARM: "swarm"}
        for name, make_system in parts:
            if choices[name] not in selected:
                continue
            results[name] = SystemResult(name)
            measure(make_system(), results[name], args, MachineLoad(client, cleanup.is_ours))

        swarm_after = swarm_state()
        report = print_report(results, facts, args)
        print(f"swarm state before {swarm_before}, after {swarm_after}")
        if args.json:
            write_json(args.json, results, report, facts, args,
                       {"run_id": run_id, "image_id": image_id, "swarm_state_before": swarm_before, "swarm_state_after": swarm_after})
        print(f"total time {time.monotonic() - started:.0f} s")
        return 0 if swarm_after == swarm_before else 1
    except (BenchError, DevnetError, docker.errors.DockerException, subprocess.TimeoutExpired) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; removing what the bench made", file=sys.stderr)
        return 130
    finally:
        with signals_deferred():
            cleanup.run()
            if cleanup.containers_removed:
                print(f"bench: removed {cleanup.containers_removed} leftover containers", file=sys.stderr)
            for error in cleanup.errors:
                print(f"bench: cleanup: {error}", file=sys.stderr)
            if swarm_before is not None and swarm_after is None:
                print(f"swarm state before {swarm_before}, after {swarm_state()}", file=sys.stderr)
            if args.keep_dir:
                print(f"devnet data and logs kept in {base_dir}")
            else:
                shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
