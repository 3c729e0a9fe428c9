"""API benchmark: one voxanode node's REST API against a bare aiohttp app, measured with wrk.

Starts a one-node voxanode network (voxanode.devnet) with authentication on (no
`--dev`) and rate limits so high that no request is ever rejected, and creates a read
and a write token with `voxanode token create`. It stores one small value with
replicas 1 through `POST /data/store/`, so that the node stores it itself, and keeps
one reply of `GET /status/health` and one of `GET /data/retrieve/?key=K`. A second
process, started from this file with `--serve-bare`, serves those two replies byte for
byte from a plain aiohttp app without middlewares on another loopback address.
Both servers run on the same event loop implementation, `--event-loop` (uvloop, the
node's default, or asyncio), so the ratio measures what the node adds, not the loop.

wrk then loads each route of each server with the same threads, connections and
duration, in `--rounds` rounds. The servers take turns within a round, and the order
flips every round. Every request carries the read token, which the bare app ignores.
The report gives, per route and server, the median over the rounds of requests per
second and of wrk's p50 and p99 latency, the server's CPU time per request, and the
ratios voxanode/bare, with a throughput target of at least 0.7.

`GET /status/health` needs no token, and `/status/` routes have no rate limit by
default, so on the node a health request passes the auth and rate limit middlewares
without a token check or a count; a retrieve request gets both.

Every process the bench starts (the node, the bare app, wrk, the token commands) is
stopped by its pid on every exit path that Python sees: a normal end, an error,
SIGINT and SIGTERM. The bare app also exits when its parent does.
NOTE: after a SIGKILL of the bench the node keeps running; stop it by the pid that
`pgrep -f voxanode-bench-api` shows.

    python bench/api.py [--duration 10] [--connections 32] [--threads 1] [--rounds 3]
                        [--event-loop uvloop|asyncio] [--json FILE]

Needs `wrk` on PATH (Debian package `wrk`).
"""

import argparse
import asyncio
import atexit
import json
import logging
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import psutil
from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from voxanode.devnet import (  # noqa: E402
    AddressBlock,
    Devnet,
    DevnetError,
    allocate_free_block,
    node_environment,
)
from voxanode.settings import EVENT_LOOPS, SPECS_BY_NAME  # noqa: E402

DEFAULT_DURATION_SECONDS = 10
DEFAULT_CONNECTIONS = 32
DEFAULT_THREADS = 1
DEFAULT_ROUNDS = 3
DEFAULT_WARMUP_SECONDS = 2
THROUGHPUT_RATIO_TARGET = 0.7
# High enough that a 2-core machine never reaches it in a minute, so the limiter
# counts every request but rejects none.
RATE_LIMIT = "100000000/minute"
VOXANODE_ARGS = (
    "--log-level", "WARNING",
    "--rate-limit-default", RATE_LIMIT,
    "--rate-limit-data", RATE_LIMIT,
)
# Both servers run on the node's default event loop unless --event-loop says otherwise.
DEFAULT_EVENT_LOOP = str(SPECS_BY_NAME["event_loop"].default)
NO_MIDDLEWARE_LAUNCHER = Path(__file__).resolve().parent / "node_without_api_middleware.py"
READ_TOKEN_NAME = "bench"
WRITE_TOKEN_NAME = "bench-write"
HEALTH_PATH = "/status/health"
RETRIEVE_PATH = "/data/retrieve/"
STORE_PATH = "/data/store/"
BENCH_VALUE = {"service": "bench", "replicas": 1, "payload": "v" * 64}
TTL_SECONDS = 3600
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
RATE_LIMIT_HEADER = "X-RateLimit-Limit"

READY_TIMEOUT_SECONDS = 60.0
READY_POLL_INTERVAL_SECONDS = 0.1
HTTP_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
TOKEN_COMMAND_TIMEOUT_SECONDS = 60.0
# wrk's own timeout per request. A slower reply counts as a timeout error.
WRK_REQUEST_TIMEOUT_SECONDS = 5
# Time past the load duration after which a wrk process is killed.
WRK_GRACE_SECONDS = 30.0
PARENT_CHECK_INTERVAL_SECONDS = 1.0
WRK_RESULT_PREFIX = "WRK_JSON "
SERVE_BARE_FLAG = "--serve-bare"

# Printed by wrk's `done` hook: counts, and latencies in microseconds.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format(
    "%s{\\"requests\\": %.0f, \\"duration_us\\": %.0f, \\"bytes\\": %.0f, "
    .. "\\"errors_connect\\": %.0f, \\"errors_read\\": %.0f, \\"errors_write\\": %.0f, "
    .. "\\"errors_status\\": %.0f, \\"errors_timeout\\": %.0f, "
    .. "\\"p50_us\\": %.0f, \\"p99_us\\": %.0f, \\"mean_us\\": %.1f, \\"max_us\\": %.0f}\\n",
    "%(prefix)s", summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""

logger = logging.getLogger(__name__)


class BenchError(Exception):
    """A step of the benchmark failed. The message names the step and the reason."""


# --- the bare app --------------------------------------------------------------------


@dataclass(frozen=True)
class CannedReply:
    """One reply of a voxanode route, kept to be served again byte for byte."""

    status: int
    body: str


def build_bare_app(replies: dict[str, CannedReply]) -> web.Application:
    """Return an aiohttp app without middlewares that serves each path's canned reply."""
    app = web.Application()
    for path, reply in replies.items():
        body = reply.body.encode("utf-8")

        async def handler(request: web.Request, body: bytes = body, status: int = reply.status) -> web.Response:
            return web.Response(body=body, status=status, headers={"Content-Type": JSON_CONTENT_TYPE})

        app.router.add_get(path, handler)
    return app


async def stop_when_orphaned(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context that ends the process once the bench that started it is gone."""
    parent_pid = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(PARENT_CHECK_INTERVAL_SECONDS)
        logger.warning("bare app: parent %d exited; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    task = asyncio.create_task(watch_parent())
    yield
    task.cancel()


def serve_bare(argv: Sequence[str]) -> int:
    """Run the bare app: `--serve-bare HOST PORT REPLIES_FILE`."""
    parser = argparse.ArgumentParser(prog="bench/api.py --serve-bare")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("replies_file", type=Path)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP)
    args = parser.parse_args(argv)

    document = json.loads(args.replies_file.read_text(encoding="utf-8"))
    replies = {path: CannedReply(**reply) for path, reply in document.items()}
    app = build_bare_app(replies)
    app.cleanup_ctx.append(stop_when_orphaned)
    loop = None
    if args.event_loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)
    return 0


# --- processes -----------------------------------------------------------------------


@dataclass
class BenchProcesses:
    """Every process the bench starts, so that each exit path can stop them by pid."""

    devnet: Devnet | None = None
    bare: subprocess.Popen | None = None
    wrk: subprocess.Popen | None = None

    def stop_all(self) -> None:
        """Stop wrk, the bare app and the node. Safe to call more than once."""
        if self.wrk is not None:
            stop_process(self.wrk, "wrk", timeout=1.0)
            self.wrk = None
        if self.bare is not None:
            stop_process(self.bare, "bare app", timeout=STOP_TIMEOUT_SECONDS)
            self.bare = None
        if self.devnet is not None:
            self.devnet.stop(timeout=STOP_TIMEOUT_SECONDS)
            self.devnet = None


def stop_process(process: subprocess.Popen, name: str, timeout: float) -> int:
    """SIGTERM `process`, SIGKILL it after `timeout` seconds, and return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not exit %.0f s after SIGTERM; sending SIGKILL", name, process.pid, timeout)
            process.kill()
            process.wait()
    return process.returncode


def run_command(argv: Sequence[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a short command to its end and raise BenchError when it fails."""
    try:
        completed = subprocess.run(
            list(argv), cwd=cwd, env=node_environment(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        # subprocess.run kills the command and waits for it before raising.
        raise BenchError(f"`{' '.join(argv[:4])} ...` timed out after {timeout:.0f} s") from error
    if completed.returncode != 0:
        raise BenchError(f"`{' '.join(argv[:4])} ...` exited with {completed.returncode}: {completed.stderr.strip()}")
    return completed


# --- HTTP ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    """Status, headers and raw body of one HTTP reply."""

    status: int
    headers: dict[str, str]
    body: bytes


def http_request(method: str, url: str, token: str | None = None, payload: object = None) -> HttpReply:
    """Send one request with urllib and return the reply, error statuses included."""
    headers = {"Accept": "application/json"}
    data = None
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if payload is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return HttpReply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return HttpReply(error.code, dict(error.headers), error.read())


def wait_ready(url: str, process: subprocess.Popen, name: str) -> None:
    """Poll `url` until it returns 200; raise BenchError when `process` exits or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            raise BenchError(f"{name} (pid {process.pid}) exited with {process.returncode} before {url} responded")
        try:
            if http_request("GET", url).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise BenchError(f"{name} did not respond to {url} with 200 within {READY_TIMEOUT_SECONDS:.0f} s")
        time.sleep(READY_POLL_INTERVAL_SECONDS)


# --- setup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens the bench created on the node."""

    read: str
    write: str


def voxanode_command() -> list[str]:
    """Return the argv prefix of the `voxanode` command installed next to this Python."""
    script = Path(sys.executable).parent / "voxanode"
    return [str(script)] if script.exists() else [sys.executable, "-m", "voxanode"]


def create_token(data_dir: Path, scope: str, name: str) -> str:
    """Create a token with `voxanode token create` and return it (the last line of stdout)."""
    argv = [
        *voxanode_command(), "token", "create", "--scope", scope, "--name", name,
        "--data-dir", str(data_dir), "--config", str(data_dir / "settings.json"),
    ]
    completed = run_command(argv, TOKEN_COMMAND_TIMEOUT_SECONDS, cwd=data_dir)
    lines = completed.stdout.strip().splitlines()
    if not lines:
        raise BenchError(f"`voxanode token create --scope {scope}` printed no token")
    return lines[-1].strip()


def start_voxanode(block: AddressBlock, base_dir: Path, processes: BenchProcesses,
                   event_loop: str = DEFAULT_EVENT_LOOP, without_middleware: bool = False) -> tuple[Devnet, Tokens]:
    """Create the tokens, then start the one-node devnet and wait until it is ready.

    With `without_middleware` the node starts through NO_MIDDLEWARE_LAUNCHER, which
    removes the API middleware before the daemon runs.
    """
    devnet = Devnet(
        1,
        base_dir / "voxanode",
        first_address=block.first_address,
        api_port=block.api_port,
        peer_port=block.peer_port,
        extra_args=(*VOXANODE_ARGS, "--event-loop", event_loop),
        ready_timeout=READY_TIMEOUT_SECONDS,
    )
    node = devnet.nodes[0]
    if without_middleware:
        full_command = node.command
        # The devnet's argv starts with `python -m voxanode`; the launcher takes the same options.
        node.command = lambda extra_args=(): [sys.executable, str(NO_MIDDLEWARE_LAUNCHER), *full_command(extra_args)[3:]]
    node.prepare_data_dir()
    tokens = Tokens(
        read=create_token(node.data_dir, "read", READ_TOKEN_NAME),
        write=create_token(node.data_dir, "write", WRITE_TOKEN_NAME),
    )
    processes.devnet = devnet
    devnet.start()
    return devnet, tokens


def store_bench_key(api_url: str, tokens: Tokens) -> str:
    """Store the bench value under a fresh key with replicas 1 and return the key."""
    key = f"bench-api-{uuid.uuid4().hex[:12]}"
    payload = {"key": key, "value": BENCH_VALUE, "ttl": TTL_SECONDS, "replicas": 1}
    reply = http_request("POST", api_url + STORE_PATH, tokens.write, payload)
    body = json.loads(reply.body) if reply.body else None
    if reply.status != 200 or not isinstance(body, dict) or body.get("success") is not True:
        raise BenchError(f"store of {key} failed: HTTP {reply.status} {reply.body[:300]!r}")
    stored = body.get("replicas", {}).get("stored")
    if stored != 1:
        raise BenchError(f"store of {key} reports {stored} copies instead of 1: {reply.body[:300]!r}")
    return key


def retrieve_url(api_url: str, key: str) -> str:
    return f"{api_url}{RETRIEVE_PATH}?{urllib.parse.urlencode({'key': key})}"


def capture_replies(api_url: str, key: str, tokens: Tokens) -> dict[str, CannedReply]:
    """Fetch one reply of each measured route, check it, and return them by path."""
    health = http_request("GET", api_url + HEALTH_PATH, tokens.read)
    if health.status != 200:
        raise BenchError(f"GET {HEALTH_PATH} returned HTTP {health.status}: {health.body[:300]!r}")
    retrieved = http_request("GET", retrieve_url(api_url, key), tokens.read)
    body = json.loads(retrieved.body) if retrieved.body else None
    if retrieved.status != 200 or not isinstance(body, dict) or body.get("value") != BENCH_VALUE:
        raise BenchError(f"GET {RETRIEVE_PATH} of {key} returned HTTP {retrieved.status}: {retrieved.body[:300]!r}")
    return {
        HEALTH_PATH: CannedReply(health.status, health.body.decode("utf-8")),
        RETRIEVE_PATH: CannedReply(retrieved.status, retrieved.body.decode("utf-8")),
    }


def check_protections(api_url: str, key: str, tokens: Tokens) -> None:
    """Check that the node rejects a retrieve without a token and counts one with it."""
    anonymous = http_request("GET", retrieve_url(api_url, key))
    if anonymous.status != 401:
        raise BenchError(f"a retrieve without a token got HTTP {anonymous.status}, not 401: is authentication off?")
    limited = http_request("GET", retrieve_url(api_url, key), tokens.read)
    if RATE_LIMIT_HEADER not in limited.headers:
        raise BenchError(f"a retrieve reply carries no {RATE_LIMIT_HEADER}: is the data rate limit off?")


def start_bare(block: AddressBlock, replies: dict[str, CannedReply], base_dir: Path, processes: BenchProcesses,
               event_loop: str) -> str:
    """Write the canned replies, start the bare app on its own address, and return its URL."""
    replies_file = base_dir / "bare-replies.json"
    replies_file.write_text(json.dumps({path: asdict(reply) for path, reply in replies.items()}), encoding="utf-8")
    argv = [sys.executable, str(Path(__file__).resolve()), SERVE_BARE_FLAG,
            block.first_address, str(block.api_port), str(replies_file), "--event-loop", event_loop]
    with open(base_dir / "bare.log", "ab") as log_file:
        processes.bare = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{block.first_address}:{block.api_port}"
    wait_ready(url + HEALTH_PATH, processes.bare, "bare app")
    return url


def check_bare_replies(bare_url: str, key: str, replies: dict[str, CannedReply]) -> None:
    """Check that the bare app returns the canned bodies unchanged."""
    for path, url in ((HEALTH_PATH, bare_url + HEALTH_PATH), (RETRIEVE_PATH, retrieve_url(bare_url, key))):
        reply = http_request("GET", url)
        if reply.status != replies[path].status or reply.body.decode("utf-8") != replies[path].body:
            raise BenchError(f"the bare app's reply to {path} differs from voxanode's: HTTP {reply.status}")


# --- wrk -----------------------------------------------------------------------------


@dataclass
class WrkRun:
    """One wrk run against one URL, with the server's and the machine's CPU use during it."""

    requests: int
    duration_seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu_seconds: float
    wrk_cpu_seconds: float
    machine_busy_cpu_seconds: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.duration_seconds

    @property
    def server_cpu_us_per_request(self) -> float:
        return self.server_cpu_seconds / self.requests * 1e6 if self.requests else float("nan")

    @property
    def other_cpu_cores(self) -> float:
        """CPU cores busy with other work than the server and wrk, on average over the run."""
        other = self.machine_busy_cpu_seconds - self.server_cpu_seconds - self.wrk_cpu_seconds
        return max(0.0, other) / self.duration_seconds

    def to_json(self) -> dict[str, Any]:
        figures = asdict(self)
        figures.update(
            requests_per_second=self.requests_per_second,
            server_cpu_us_per_request=self.server_cpu_us_per_request,
            other_cpu_cores=self.other_cpu_cores,
        )
        return figures


def busy_cpu_seconds() -> float:
    """Return the machine's CPU seconds spent on anything but idle and I/O wait since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def process_cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, token: str, args: argparse.Namespace, duration_seconds: int, server_pid: int,
            script_path: Path, processes: BenchProcesses) -> WrkRun:
    """Load `url` with wrk for `duration_seconds` and return its figures."""
    argv = [
        "wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{duration_seconds}s",
        "--timeout", f"{WRK_REQUEST_TIMEOUT_SECONDS}s", "-s", str(script_path),
        "-H", f"Authorization: Bearer {token}", url,
    ]
    server = psutil.Process(server_pid)
    server_before, wrk_before, machine_before = process_cpu_seconds(server), children_cpu_seconds(), busy_cpu_seconds()

    processes.wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = processes.wrk.communicate(timeout=duration_seconds + WRK_GRACE_SECONDS)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"wrk did not finish {WRK_GRACE_SECONDS:.0f} s after its {duration_seconds} s run") from error
    returncode = processes.wrk.returncode
    processes.wrk = None

    server_cpu = process_cpu_seconds(server) - server_before
    wrk_cpu = children_cpu_seconds() - wrk_before
    machine_cpu = busy_cpu_seconds() - machine_before
    lines = [line for line in stdout.splitlines() if line.startswith(WRK_RESULT_PREFIX)]
    if returncode != 0 or not lines:
        raise BenchError(f"wrk exited with {returncode} without its result line: {stderr.strip() or stdout.strip()}")

    figures = json.loads(lines[-1][len(WRK_RESULT_PREFIX):])
    errors = sum(figures[name] for name in figures if name.startswith("errors_"))
    return WrkRun(
        requests=int(figures["requests"]),
        duration_seconds=figures["duration_us"] / 1e6,
        errors=int(errors),
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        server_cpu_seconds=server_cpu,
        wrk_cpu_seconds=wrk_cpu,
        machine_busy_cpu_seconds=machine_cpu,
    )


# --- the run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One server and one route under test."""

    server: str
    route: str
    url: str
    pid: int


@dataclass
class Series:
    """The measured rounds of one target."""

    target: Target
    runs: list[WrkRun] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)


def build_targets(node_url: str, node_pid: int, bare_url: str, bare_pid: int, key: str) -> list[Target]:
    targets = []
    for route, path_of in (("health", lambda base: base + HEALTH_PATH), ("retrieve", lambda base: retrieve_url(base, key))):
        targets.append(Target("voxanode", route, path_of(node_url), node_pid))
        targets.append(Target("bare", route, path_of(bare_url), bare_pid))
    return targets


def measure(targets: list[Target], token: str, args: argparse.Namespace, script_path: Path,
            processes: BenchProcesses) -> list[Series]:
    """Warm every target up, then run the rounds, flipping the server order every round."""
    for target in targets:
        warm = run_wrk(target.url, token, args, args.warmup, target.pid, script_path, processes)
        print(f"warm-up {target.route:<9} {target.server:<9} {warm.requests_per_second:>8.0f} req/s, "
              f"{warm.errors} errors", flush=True)

    series = [Series(target) for target in targets]
    for round_index in range(args.rounds):
        ordered = series if round_index % 2 == 0 else _flip_pairs(series)
        for one in ordered:
            run = run_wrk(one.target.url, token, args, args.duration, one.target.pid, script_path, processes)
            one.runs.append(run)
            print(f"round {round_index + 1}/{args.rounds} {one.target.route:<9} {one.target.server:<9} "
                  f"{run.requests_per_second:>8.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                  f"server {run.server_cpu_us_per_request:5.0f} us CPU/req  other load {run.other_cpu_cores:.2f} cores  "
                  f"{run.errors} errors", flush=True)
    return series


def _flip_pairs(series: list[Series]) -> list[Series]:
    """Swap each (voxanode, bare) pair, so the bare app goes first in odd rounds."""
    flipped = []
    for index in range(0, len(series), 2):
        flipped += [series[index + 1], series[index]]
    return flipped


@dataclass(frozen=True)
class MachineState:
    """Load average and test-suite processes seen at one moment."""

    load_average: tuple[float, float, float]
    pytest_pids: tuple[int, ...]

    @classmethod
    def now(cls) -> "MachineState":
        own = os.getpid()
        pids = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if process.info["pid"] != own and any("pytest" in part for part in cmdline):
                pids.append(process.info["pid"])
        return cls(os.getloadavg(), tuple(pids))

    def describe(self) -> str:
        one, five, fifteen = self.load_average
        suite = f"{len(self.pytest_pids)} pytest processes running" if self.pytest_pids else "no pytest process"
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f}, {suite}"


def ratios(series: list[Series]) -> dict[str, dict[str, float]]:
    """Return, per route, voxanode/bare for throughput, p50, p99 and CPU per request."""
    by_key = {(one.target.server, one.target.route): one for one in series}
    result = {}
    for route in dict.fromkeys(one.target.route for one in series):
        ours, bare = by_key[("voxanode", route)], by_key[("bare", route)]
        result[route] = {
            name: ours.median(name) / bare.median(name)
            for name in ("requests_per_second", "p50_ms", "p99_ms", "server_cpu_us_per_request")
        }
    return result


def print_report(series: list[Series], args: argparse.Namespace, before: MachineState, after: MachineState) -> None:
    print()
    print(f"API benchmark: wrk {args.threads} thread(s), {args.connections} connections, {args.rounds} rounds of "
          f"{args.duration} s per target; {args.event_loop} event loop in both servers; {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {platform.machine()}")
    print(f"machine at start: {before.describe()}; at end: {after.describe()}")
    if args.without_api_middleware:
        print("diagnostic run: the node ran without its API middleware (no auth, rate limit, request ids or statistics)")
    header = (f"{'route':<9} {'server':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} "
              f"{'other cores':>11} {'errors':>6}  req/s per round")
    print(header)
    print("-" * len(header))
    for one in series:
        per_round = ", ".join(f"{run.requests_per_second:.0f}" for run in one.runs)
        print(f"{one.target.route:<9} {one.target.server:<9} {one.median('requests_per_second'):>8.0f} "
              f"{one.median('p50_ms'):>7.2f} {one.median('p99_ms'):>7.2f} {one.median('server_cpu_us_per_request'):>10.0f} "
              f"{one.median('other_cpu_cores'):>11.2f} {one.errors:>6}  {per_round}")

    print()
    print(f"ratios voxanode/bare (medians; throughput target >= {THROUGHPUT_RATIO_TARGET})")
    print(f"{'route':<9} {'req/s':>7} {'p50':>7} {'p99':>7} {'CPU/req':>8}  target")
    for route, figures in ratios(series).items():
        verdict = "met" if figures["requests_per_second"] >= THROUGHPUT_RATIO_TARGET else "NOT met"
        print(f"{route:<9} {figures['requests_per_second']:>7.2f} {figures['p50_ms']:>7.2f} {figures['p99_ms']:>7.2f} "
              f"{figures['server_cpu_us_per_request']:>8.2f}  {verdict}")


def write_json(path: Path, series: list[Series], args: argparse.Namespace, before: MachineState, after: MachineState) -> None:
    figures = {
        "duration_seconds": args.duration, "connections": args.connections, "threads": args.threads,
        "rounds": args.rounds, "event_loop": args.event_loop, "without_api_middleware": args.without_api_middleware,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine_before": asdict(before), "machine_after": asdict(after),
        "targets": [
            {
                "server": one.target.server, "route": one.target.route,
                "median": {name: one.median(name) for name in
                           ("requests_per_second", "p50_ms", "p99_ms", "server_cpu_us_per_request", "other_cpu_cores")},
                "errors": one.errors,
                "rounds": [run.to_json() for run in one.runs],
            }
            for one in series
        ],
        "ratios_voxanode_over_bare": ratios(series),
        "throughput_ratio_target": THROUGHPUT_RATIO_TARGET,
    }
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def pick_blocks() -> tuple[AddressBlock, AddressBlock]:
    """Return two free loopback blocks of one address each, in different /24 networks."""
    first = allocate_free_block(1)
    while True:
        second = allocate_free_block(1)
        if second.first_address.rsplit(".", 1)[0] != first.first_address.rsplit(".", 1)[0]:
            return first, second


def run_bench(args: argparse.Namespace, base_dir: Path, processes: BenchProcesses) -> int:
    """Set both servers up, measure, print the report and return the exit status."""
    node_block, bare_block = pick_blocks()
    print(f"voxanode: starting one node on {node_block.first_address}:{node_block.api_port}", flush=True)
    devnet, tokens = start_voxanode(node_block, base_dir, processes, args.event_loop, args.without_api_middleware)
    node = devnet.nodes[0]

    key = store_bench_key(node.api_url, tokens)
    replies = capture_replies(node.api_url, key, tokens)
    if args.without_api_middleware:
        print("voxanode: API middleware removed (diagnostic run): no auth, rate limit, request ids or statistics",
              flush=True)
    else:
        check_protections(node.api_url, key, tokens)
    print(f"bare app: starting on {bare_block.first_address}:{bare_block.api_port}", flush=True)
    bare_url = start_bare(bare_block, replies, base_dir, processes, args.event_loop)
    check_bare_replies(bare_url, key, replies)

    script_path = base_dir / "report.lua"
    script_path.write_text(WRK_SCRIPT.replace("%(prefix)s", WRK_RESULT_PREFIX), encoding="utf-8")
    targets = build_targets(node.api_url, node.pid, bare_url, processes.bare.pid, key)

    before = MachineState.now()
    print(f"machine: {before.describe()}", flush=True)
    series = measure(targets, tokens.read, args, script_path, processes)
    after = MachineState.now()

    print_report(series, args, before, after)
    if args.json:
        write_json(args.json, series, args, before, after)
    failed = [one for one in series if one.errors]
    for one in failed:
        print(f"bench: error: {one.errors} failed requests on {one.target.server} {one.target.route}", file=sys.stderr)
    return 1 if failed else 0


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_wrk_args(argv: Sequence[str] | None, description: str, rounds_help: str,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   default_duration: int = DEFAULT_DURATION_SECONDS) -> argparse.Namespace:
    """Parse the load options that every wrk bench here takes, and check their bounds.

    `add_arguments` adds the options of one bench to the parser.
    """
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--duration", type=int, default=default_duration,
                        help="seconds of load per target and round (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                        help="open connections wrk keeps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="wrk threads (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=rounds_help + " (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_SECONDS,
                        help="seconds of unmeasured load per target before the rounds (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-dir", action="store_true", help="keep the node data directory and logs")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--duration, --warmup, --rounds and --threads must be >= 1")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    return args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_wrk_args(
        argv,
        "Measure requests per second of a voxanode node's API against a bare aiohttp app, with wrk.",
        "measured rounds; the report shows their medians",
        add_api_arguments,
    )


def add_event_loop_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP,
                        help="event loop of both servers: the node's default, uvloop, or asyncio (default: %(default)s)")


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    add_event_loop_argument(parser)
    parser.add_argument("--without-api-middleware", action="store_true",
                        help="diagnostic: start the node with its API middleware removed, so with no request ids, "
                             "token check, rate limit or request statistics, to measure what the rest costs")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [SERVE_BARE_FLAG]:
        return serve_bare(argv[1:])

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if shutil.which("wrk") is None:
        print("bench: error: wrk is not on PATH; install it with `apt-get install -y wrk`", file=sys.stderr)
        return 1

    base_dir = Path(tempfile.mkdtemp(prefix="voxanode-bench-api-"))
    processes = BenchProcesses()
    atexit.register(processes.stop_all)
    signal.signal(signal.SIGTERM, raise_system_exit)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C or kill -INT must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_bench(args, base_dir, processes)
    except (BenchError, DevnetError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()
        if args.keep_dir:
            print(f"node data and logs kept in {base_dir}")
        else:
            shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
