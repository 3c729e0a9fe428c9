"""Ingress benchmark: app traffic through a node's `/proxy/` against the container's own port.

Starts a one-node voxanode network (voxanode.devnet) and deploys the local test image
(`scripts/build-test-image`, busybox httpd) with 1 replica. wrk then loads, with the
same threads, connections and duration, two URLs that serve the same file:

- `proxy`: `http://NODE/proxy/bench-web/index.html`, through the node's ingress;
- `direct`: the published port of one of the app's containers, as its status shows it.

The targets take turns within a round and the order flips every round. Then the app
is scaled to 3 replicas on the same node and the rounds run again; `direct` still
hits one container. The report gives, per scenario and target, the median over the
rounds of requests per second and of wrk's p50 and p99 latency, the node's CPU time
per request and the CPU cores busy with other work. It ends with the ratios
proxy/direct and a throughput target of at least 0.5. The load average and any running pytest are
recorded at the start and the end.

wrk sends `Authorization: Bearer ...` (bench/api.py's wrk runner does), which the
proxy passes on and busybox httpd ignores. busybox httpd closes the connection after
each reply, so both paths open one TCP connection to the container per request. wrk
keeps its connections to the node open.

Both paths reach the container through its published port. By default the engine
serves each published port with a `docker-proxy` process, which costs CPU per
connection on both paths. An engine started with `--userland-proxy=false` lets the
kernel forward the port instead. The report names which of the two the engine does.

The node and wrk are stopped by pid on every exit path that runs Python code (any but
SIGKILL). The app's containers are removed with `docker rm -f` by the node's label.

Every run starts once the TIME_WAIT sockets of earlier runs are gone (see
TIME_WAIT_SETTLE_LIMIT), so a full run takes about 15 minutes.

    python bench/ingress.py [--duration 5] [--connections 32] [--threads 1] [--rounds 3] [--json FILE]

Needs `wrk` on PATH (Debian package `wrk`) and a Docker engine with the test image.
"""

import argparse
import atexit
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for path in (str(REPO_ROOT), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

from api import (  # noqa: E402  (bench/api.py, the API benchmark)
    WRK_RESULT_PREFIX,
    WRK_SCRIPT,
    BenchError,
    BenchProcesses,
    MachineState,
    Series,
    http_request,
    parse_wrk_args,
    raise_system_exit,
    run_wrk,
)
from voxanode.devnet import Devnet, DevnetError, allocate_free_block  # noqa: E402

THROUGHPUT_RATIO_TARGET = 0.5
APP_NAME = "bench-web"
TEST_IMAGE = "voxanode-test/httpd:latest"
CONTAINER_PORT = 8080
PAGE_PATH = "/index.html"
PAGE_TEXT = "voxanode-test httpd index"
# Sent as the bearer token by bench/api.py's wrk runner; the app ignores it.
APP_TOKEN = "bench-app-traffic"
NODE_LABEL = "io.voxanode.node-id"
VOXANODE_ARGS = ("--dev", "--log-level", "WARNING", "--apps-reconcile-interval-seconds", "1")
READY_TIMEOUT_SECONDS = 90.0
POLL_SECONDS = 0.5
SCENARIO_REPLICAS = (1, 3)
# Every request opens and closes a TCP connection (busybox httpd closes after each
# reply), so each run leaves one socket in TIME_WAIT per request for 60 s, and this
# machine has 28,232 ephemeral ports. In one test a direct run fell from 2,880 to
# 2,080 requests a second while about 28,000 sockets waited, as Linux's search for a
# free local port grew longer. Each run therefore starts once
# fewer than TIME_WAIT_SETTLE_LIMIT sockets wait, and lasts 5 s by default, so that
# one run at about 3,500 requests a second stays well inside the port range.
DEFAULT_DURATION_SECONDS = 5
TIME_WAIT_SETTLE_LIMIT = 3000
TIME_WAIT_SETTLE_TIMEOUT_SECONDS = 75.0
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_STATE_TIME_WAIT = "06"
DOCKER_TIMEOUT_SECONDS = 60

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One URL under load. `pid` is the node's, whose CPU time is measured for both URLs."""

    server: str
    route: str
    url: str
    pid: int


def api_json(method: str, url: str, payload: object = None) -> dict:
    reply = http_request(method, url, payload=payload)
    try:
        body = json.loads(reply.body)
    except ValueError as error:
        raise BenchError(f"{method} {url} returned HTTP {reply.status} without JSON") from error
    if reply.status != 200:
        raise BenchError(f"{method} {url} returned HTTP {reply.status}: {reply.body[:300]!r}")
    return body


def wait_instances(api_url: str, app_id: str, replicas: int) -> dict:
    """Wait until the app has `replicas` running, healthy instances and return its status."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        status = api_json("GET", f"{api_url}/apps/get_app_status/?app_id={app_id}")
        counts = status["replicas"]
        if counts["running"] == counts["healthy"] == replicas:
            return status
        if time.monotonic() >= deadline:
            raise BenchError(f"app {app_id} has {counts} after {READY_TIMEOUT_SECONDS:.0f} s, not {replicas} healthy")
        time.sleep(POLL_SECONDS)


def wait_capability(api_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        nodes = api_json("GET", f"{api_url}/data/discover_nodes/?capability=app-deployment")["nodes"]
        if nodes:
            return
        if time.monotonic() >= deadline:
            raise BenchError("the node does not offer app deployment: is the Docker engine running?")
        time.sleep(POLL_SECONDS)


def direct_url(status: dict) -> str:
    """Return the URL of the page on the first instance's published port."""
    instance = status["instances"][0]
    (port,) = [p for p in instance["ports"] if p["container_port"] == CONTAINER_PORT]
    return f"http://{port['host_ip']}:{port['host_port']}{PAGE_PATH}"


def userland_proxy_pid(url: str) -> int | None:
    """Return the pid of the engine's `docker-proxy` that serves the published port of `url`, or None.

    The engine runs one such process per published port unless it was started with
    `--userland-proxy=false`, in which case the kernel forwards the port itself.
    """
    port = str(urlsplit(url).port)
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] != "docker-proxy" or "-host-port" not in cmdline:
            continue
        position = cmdline.index("-host-port") + 1
        if position < len(cmdline) and cmdline[position] == port:
            return process.info["pid"]
    return None


def check_page(url: str) -> None:
    reply = http_request("GET", url)
    if reply.status != 200 or PAGE_TEXT not in reply.body.decode("utf-8", "replace"):
        raise BenchError(f"GET {url} returned HTTP {reply.status}, not the test page")


def remove_containers(node_id: str | None) -> None:
    if node_id is None:
        return
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={NODE_LABEL}={node_id}"],
        capture_output=True, text=True, timeout=DOCKER_TIMEOUT_SECONDS,
    )
    containers = listed.stdout.split()
    if containers:
        subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, timeout=DOCKER_TIMEOUT_SECONDS)


def time_wait_sockets() -> int:
    """Return how many TCP sockets of this network namespace are in TIME_WAIT."""
    count = 0
    for table in TCP_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        count += sum(1 for line in lines if line.split()[3] == TCP_STATE_TIME_WAIT)
    return count


def settle_connections() -> int:
    """Wait until fewer than TIME_WAIT_SETTLE_LIMIT sockets are in TIME_WAIT; return the count at the end."""
    deadline = time.monotonic() + TIME_WAIT_SETTLE_TIMEOUT_SECONDS
    waiting = time_wait_sockets()
    while waiting >= TIME_WAIT_SETTLE_LIMIT and time.monotonic() < deadline:
        time.sleep(1.0)
        waiting = time_wait_sockets()
    return waiting


def run_settled(url: str, args: argparse.Namespace, duration: int, pid: int, script_path: Path,
                processes: BenchProcesses):
    """Run wrk once the sockets of earlier runs have left TIME_WAIT, and print how many remained."""
    started = time.monotonic()
    waiting = settle_connections()
    print(f"  waited {time.monotonic() - started:.0f} s: {waiting} sockets in TIME_WAIT", flush=True)
    return run_wrk(url, APP_TOKEN, args, duration, pid, script_path, processes)


def measure(targets: list[Target], label: str, args: argparse.Namespace, script_path: Path,
            processes: BenchProcesses) -> list[Series]:
    """Warm both targets up, then run the rounds, flipping their order every round."""
    for target in targets:
        warm = run_settled(target.url, args, args.warmup, target.pid, script_path, processes)
        print(f"{label} warm-up {target.server:<7} {warm.requests_per_second:>8.0f} req/s, {warm.errors} errors",
              flush=True)
    series = [Series(target) for target in targets]
    for round_index in range(args.rounds):
        ordered = series if round_index % 2 == 0 else list(reversed(series))
        for one in ordered:
            run = run_settled(one.target.url, args, args.duration, one.target.pid, script_path, processes)
            one.runs.append(run)
            print(f"{label} round {round_index + 1}/{args.rounds} {one.target.server:<7} "
                  f"{run.requests_per_second:>8.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                  f"node {run.server_cpu_us_per_request:5.0f} us CPU/req  other load {run.other_cpu_cores:.2f} cores  "
                  f"{run.errors} errors", flush=True)
    return series


def ratio_figures(series: list[Series]) -> dict[str, float]:
    proxy, direct = series
    return {
        name: proxy.median(name) / direct.median(name)
        for name in ("requests_per_second", "p50_ms", "p99_ms")
    }


def engine_proxy_text(userland_proxy: bool) -> str:
    if userland_proxy:
        return "published ports served by docker-proxy (the engine's userland proxy)"
    return "published ports forwarded by the kernel (engine started with --userland-proxy=false)"


def print_report(results: dict[str, list[Series]], args: argparse.Namespace,
                 before: MachineState, after: MachineState, userland_proxy: bool) -> None:
    print()
    print(f"Ingress benchmark: wrk {args.threads} thread(s), {args.connections} connections, {args.rounds} rounds of "
          f"{args.duration} s per target; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.machine()}")
    print(f"machine at start: {before.describe()}; at end: {after.describe()}")
    print(f"engine: {engine_proxy_text(userland_proxy)}")
    header = (f"{'scenario':<10} {'target':<7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'node us/req':>11} "
              f"{'other cores':>11} {'errors':>6}  req/s per round")
    print(header)
    print("-" * len(header))
    for label, series in results.items():
        for one in series:
            per_round = ", ".join(f"{run.requests_per_second:.0f}" for run in one.runs)
            print(f"{label:<10} {one.target.server:<7} {one.median('requests_per_second'):>8.0f} "
                  f"{one.median('p50_ms'):>7.2f} {one.median('p99_ms'):>7.2f} "
                  f"{one.median('server_cpu_us_per_request'):>11.0f} {one.median('other_cpu_cores'):>11.2f} "
                  f"{one.errors:>6}  {per_round}")
    print()
    print(f"ratios proxy/direct (medians; throughput target >= {THROUGHPUT_RATIO_TARGET})")
    print(f"{'scenario':<10} {'req/s':>7} {'p50':>7} {'p99':>7}  target")
    for label, series in results.items():
        figures = ratio_figures(series)
        verdict = "met" if figures["requests_per_second"] >= THROUGHPUT_RATIO_TARGET else "NOT met"
        print(f"{label:<10} {figures['requests_per_second']:>7.2f} {figures['p50_ms']:>7.2f} "
              f"{figures['p99_ms']:>7.2f}  {verdict}")
    if userland_proxy:
        print("note: docker-proxy serves the published ports, and on the proxied path it took more CPU per request")
        print("than the node in earlier runs; with the engine started with --userland-proxy=false the ratios were")
        print("higher (bench/RESULTS.md, \"Where the machine's time goes, and the engine's userland proxy\")")


def write_json(path: Path, results: dict[str, list[Series]], args: argparse.Namespace,
               before: MachineState, after: MachineState, userland_proxy: bool) -> None:
    figures = {
        "duration_seconds": args.duration, "connections": args.connections, "threads": args.threads,
        "rounds": args.rounds, "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine_before": asdict(before), "machine_after": asdict(after),
        "engine_userland_proxy": userland_proxy,
        "scenarios": {
            label: {
                "targets": [
                    {
                        "target": one.target.server,
                        "median": {name: one.median(name) for name in
                                   ("requests_per_second", "p50_ms", "p99_ms", "server_cpu_us_per_request",
                                    "other_cpu_cores")},
                        "errors": one.errors,
                        "rounds": [run.to_json() for run in one.runs],
                    }
                    for one in series
                ],
                "ratios_proxy_over_direct": ratio_figures(series),
            }
            for label, series in results.items()
        },
        "throughput_ratio_target": THROUGHPUT_RATIO_TARGET,
    }
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def run_bench(args: argparse.Namespace, base_dir: Path, processes: BenchProcesses, node_ids: list[str]) -> int:
    block = allocate_free_block(1)
    print(f"voxanode: starting one node on {block.first_address}:{block.api_port}", flush=True)
    devnet = Devnet(1, base_dir / "voxanode", first_address=block.first_address, api_port=block.api_port,
                    peer_port=block.peer_port, extra_args=VOXANODE_ARGS, ready_timeout=READY_TIMEOUT_SECONDS)
    processes.devnet = devnet
    devnet.start()
    node = devnet.nodes[0]
    node_ids.append(node.fetch_node_id())
    wait_capability(node.api_url)

    spec = {"name": APP_NAME, "image": TEST_IMAGE, "replicas": 1, "ports": [{"container_port": CONTAINER_PORT}]}
    app_id = api_json("POST", f"{node.api_url}/apps/add_app/", spec)["app_id"]
    script_path = base_dir / "report.lua"
    script_path.write_text(WRK_SCRIPT.replace("%(prefix)s", WRK_RESULT_PREFIX), encoding="utf-8")

    before = MachineState.now()
    print(f"machine: {before.describe()}", flush=True)
    results: dict[str, list[Series]] = {}
    userland_proxy = False
    for replicas in SCENARIO_REPLICAS:
        if replicas != 1:
            api_json("POST", f"{node.api_url}/apps/add_scale_app/", {"app_id": app_id, "replicas": replicas})
        status = wait_instances(node.api_url, app_id, replicas)
        targets = [
            Target("proxy", f"{replicas} replica", f"{node.api_url}/proxy/{APP_NAME}{PAGE_PATH}", node.pid),
            Target("direct", f"{replicas} replica", direct_url(status), node.pid),
        ]
        for target in targets:
            check_page(target.url)
        if replicas == 1:
            userland_proxy = userland_proxy_pid(targets[1].url) is not None
            print(f"engine: {engine_proxy_text(userland_proxy)}", flush=True)
        label = f"{replicas} replica" + ("s" if replicas > 1 else "")
        results[label] = measure(targets, label, args, script_path, processes)
    after = MachineState.now()

    print_report(results, args, before, after, userland_proxy)
    if args.json:
        write_json(args.json, results, args, before, after, userland_proxy)
    failed = [one for series in results.values() for one in series if one.errors]
    for one in failed:
        print(f"bench: error: {one.errors} failed requests on {one.target.server} {one.target.route}",
              file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_wrk_args(
        argv,
        "Measure app traffic through a voxanode node's /proxy/ against the container's port, with wrk.",
        "measured rounds per scenario; the report shows their medians",
        default_duration=DEFAULT_DURATION_SECONDS,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if shutil.which("wrk") is None:
        print("bench: error: wrk is not on PATH; install it with `apt-get install -y wrk`", file=sys.stderr)
        return 1

    base_dir = Path(tempfile.mkdtemp(prefix="voxanode-bench-ingress-"))
    processes = BenchProcesses()
    node_ids: list[str] = []
    atexit.register(processes.stop_all)
    signal.signal(signal.SIGTERM, raise_system_exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_bench(args, base_dir, processes, node_ids)
    except (BenchError, DevnetError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()
        for node_id in node_ids:
            remove_containers(node_id)
        if args.keep_dir:
            print(f"node data and logs kept in {base_dir}")
        else:
            shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
