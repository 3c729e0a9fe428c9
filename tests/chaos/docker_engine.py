"""A Docker engine of the test's own, which a chaos test may stop and start again.

The machine's shared dockerd serves other tests and must never restart, so
`PrivateDockerd` runs a second dockerd whose every path lies under one temporary
directory, /tmp/voxa-dockerd-<test pid>-XXXX: its API socket (`--host`), `--data-root`,
`--exec-root` (its containerd and network namespace files), `--pidfile` and an empty
`--config-file`, so /etc/docker/daemon.json does not apply.

Networking options, each chosen so that the shared engine's network stays untouched:

- `--bridge voxa-dk-<n>`: a bridge this class creates with a /24 of 10.213.0.0/16
  that no route of the host uses, and deletes at the end. `--bridge=none` must not be
  used: dockerd 20.10 then deletes the docker0 interface, which belongs to the shared
  engine, and without a bridge no port can be published.
- `--iptables=false`, `--ip-masq=false`, `--ip-forward=false`: no iptables rule and no
  sysctl changes. Published ports still work through docker-proxy (the default
  userland proxy), which listens on the node's 127.0.0.x address and connects to the
  container over the bridge.
- `--live-restore=false`: containers die with the engine, as on a default install.

Stopping with SIGTERM took 11 to 13 s on the test machine: dockerd gives each running
container its stop timeout (10 s by default), then stops its containerd. `remove()`
deletes every container first, stops the engine, unmounts what it left mounted under
the directory, and deletes the bridge and the directory. It runs from the test's
finally blocks and from atexit, and `remove_stale_engines()` cleans up after test
processes that no longer run.
"""

import atexit
import contextlib
import ipaddress
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import docker.errors
import requests

logger = logging.getLogger(__name__)

DIRECTORY_PREFIX = "voxa-dockerd-"
TEMP_ROOT = Path("/tmp")
BRIDGE_PREFIX = "voxa-dk-"
BRIDGE_SUPERNET = ipaddress.ip_network("10.213.0.0/16")
BRIDGE_FILE_NAME = "bridge"
PID_FILE_NAME = "dockerd.pid"
LOG_FILE_NAME = "dockerd.log"
SOCKET_FILE_NAME = "docker.sock"
READY_TIMEOUT_SECONDS = 30.0
# dockerd gives each container its stop timeout (10 s by default) and then stops containerd.
STOP_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.2
COMMAND_TIMEOUT_SECONDS = 60
LOG_TAIL_BYTES = 4000
UMOUNT_ATTEMPTS = 10


class EngineError(Exception):
    """The private engine could not be started, stopped or removed."""


def _run(argv: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, **options)


def _mounts_under(directory: Path) -> list[str]:
    """Return the mount points at or below `directory`, deepest first."""
    prefix = str(directory)
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like escaped in octal.
            point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount_all(directory: Path) -> None:
    for point in _mounts_under(directory):
        for _ in range(UMOUNT_ATTEMPTS):
            if _run(["umount", point]).returncode == 0:
                break
            time.sleep(POLL_SECONDS)
        else:
            logger.warning("mount %s of a private dockerd stays busy; detaching it lazily", point)
            _run(["umount", "-l", point])


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Return the IPv4 networks of the host's routes and addresses."""
    networks = []
    listing = _run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout
    listing += _run(["ip", "-4", "-o", "addr"]).stdout
    for text in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", listing):
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(text, strict=False))
    return networks


def _free_bridge_network(rng: random.Random) -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates = list(BRIDGE_SUPERNET.subnets(new_prefix=24))
    rng.shuffle(candidates)
    for candidate in candidates:
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise EngineError(f"every /24 of {BRIDGE_SUPERNET} overlaps a route of this host")


def _delete_bridge(name: str) -> None:
    if name and Path(f"/sys/class/net/{name}").exists():
        completed = _run(["ip", "link", "del", name])
        if completed.returncode != 0:
            logger.warning("could not delete bridge %s: %s", name, completed.stderr.strip())


def _pid_is_dockerd_of(pid: int, directory: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"dockerd") and str(directory).encode() in b" ".join(cmdline)


def _stop_pid(pid: int, timeout: float) -> bool:
    """SIGTERM `pid` and wait for it to end; return whether it ended in time."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return not Path(f"/proc/{pid}").exists()


def _remove_directory(directory: Path) -> None:
    """Stop a dockerd left running in `directory`, unmount, delete its bridge and the directory."""
    pid_file = directory / PID_FILE_NAME
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        if _pid_is_dockerd_of(pid, directory) and not _stop_pid(pid, STOP_TIMEOUT_SECONDS):
            logger.warning("dockerd %d of %s did not stop within %.0f s; killing it", pid, directory, STOP_TIMEOUT_SECONDS)
            os.kill(pid, signal.SIGKILL)
    _unmount_all(directory)
    with contextlib.suppress(OSError):
        _delete_bridge((directory / BRIDGE_FILE_NAME).read_text().strip())
    shutil.rmtree(directory, ignore_errors=True)


def remove_stale_engines() -> list[Path]:
    """Remove the private engines of test processes that no longer run; return their directories."""
    removed = []
    for directory in TEMP_ROOT.glob(f"{DIRECTORY_PREFIX}*"):
        match = re.fullmatch(rf"{DIRECTORY_PREFIX}(\d+)-.+", directory.name)
        if match is None or Path(f"/proc/{match.group(1)}").exists():
            continue
        logger.warning("removing private dockerd directory %s left by a test process that no longer runs", directory)
        _remove_directory(directory)
        removed.append(directory)
    return removed


class PrivateDockerd:
    """One dockerd under a temporary directory; `start()`, `stop()` and `remove()` it."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.directory: Path | None = None
        self.bridge = ""
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def socket_path(self) -> Path:
        return self._require_directory() / SOCKET_FILE_NAME

    @property
    def docker_host(self) -> str:
        """The DOCKER_HOST value of this engine, `unix:///tmp/.../docker.sock`."""
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _require_directory(self) -> Path:
        if self.directory is None:
            raise EngineError("the private dockerd was never started")
        return self.directory

    def _prepare(self) -> None:
        """Create the directory and the bridge, once."""
        remove_stale_engines()
        self.directory = Path(tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-", dir=TEMP_ROOT))
        atexit.register(self.remove)
        (self.directory / "daemon.json").write_text("{}\n", encoding="utf-8")
        network = _free_bridge_network(self.rng)
        self.bridge = f"{BRIDGE_PREFIX}{self.rng.randrange(10**6)}"
        (self.directory / BRIDGE_FILE_NAME).write_text(self.bridge + "\n", encoding="utf-8")
        gateway = f"{next(network.hosts())}/{network.prefixlen}"
        for argv in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", gateway, "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            completed = _run(argv)
            if completed.returncode != 0:
                raise EngineError(f"{' '.join(argv)} failed: {completed.stderr.strip()}")
        logger.info("private dockerd directory %s, bridge %s on %s", self.directory, self.bridge, network)

    def command(self) -> list[str]:
        directory = self._require_directory()
        return [
            "dockerd",
            "--host", self.docker_host,
            "--data-root", str(directory / "data"),
            "--exec-root", str(directory / "exec"),
            "--pidfile", str(directory / PID_FILE_NAME),
            "--config-file", str(directory / "daemon.json"),
            "--bridge", self.bridge,
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--live-restore=false",
        ]

    def start(self) -> None:
        """Start dockerd (on the same data root after a stop) and wait until it responds to a ping."""
        if self.directory is None:
            self._prepare()
        if self.running:
            return
        self.wait_stopped()
        with open(self._require_directory() / LOG_FILE_NAME, "ab") as log:
            # A session of its own, so a Ctrl-C in the terminal reaches only the test process.
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self.ping():
            if not self.running:
                raise EngineError(f"dockerd exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise EngineError(f"dockerd did not respond within {READY_TIMEOUT_SECONDS:.0f} s:\n{self.log_tail()}")
            time.sleep(POLL_SECONDS)
        logger.info("private dockerd %d responds on %s", self.process.pid, self.docker_host)

    def ping(self) -> bool:
        try:
            client = docker.DockerClient(base_url=self.docker_host, timeout=5)
        except docker.errors.DockerException:
            return False
        try:
            return bool(client.ping())
        except (docker.errors.DockerException, requests.RequestException):
            return False
        finally:
            client.close()

    def stop(self, wait: bool = True) -> None:
        """Send dockerd SIGTERM, as `systemctl stop docker` does; with `wait`, wait for it to exit."""
        if not self.running:
            return
        logger.info("stopping private dockerd %d", self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        if wait:
            self.wait_stopped()

    def wait_stopped(self) -> int | None:
        """Wait for a stopping dockerd to exit; return its exit code (None when it never ran)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as error:
            raise EngineError(
                f"dockerd {self.process.pid} did not exit within {STOP_TIMEOUT_SECONDS:.0f} s of SIGTERM:\n{self.log_tail()}"
            ) from error

    def docker(self, *args: str, stdin=None) -> subprocess.CompletedProcess:
        """Run the docker CLI against this engine."""
        return _run(["docker", "--host", self.docker_host, *args], stdin=stdin)

    def load_image(self, image: str) -> None:
        """Copy `image` from the shared engine with `docker save | docker load`; nothing is pulled."""
        with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as save:
            loaded = self.docker("load", stdin=save.stdout)
            save.stdout.close()
            save_error = save.stderr.read().decode(errors="replace").strip()
        if save.returncode != 0:
            raise EngineError(f"docker save {image} failed: {save_error}")
        if loaded.returncode != 0:
            raise EngineError(f"docker load of {image} failed: {loaded.stderr.strip()}")

    def containers(self, label: str, running_only: bool = False) -> list[str]:
        """Return the ids of this engine's containers that carry `label` (`key=value`)."""
        args = ["ps", "-q", "--no-trunc", "--filter", f"label={label}"]
        if not running_only:
            args.insert(1, "-a")
        listed = self.docker(*args)
        if listed.returncode != 0:
            raise EngineError(f"docker ps failed: {listed.stderr.strip()}")
        return listed.stdout.split()

    def log_tail(self) -> str:
        path = self._require_directory() / LOG_FILE_NAME
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            return data[-LOG_TAIL_BYTES:].decode(errors="replace")
        return ""

    def remove(self) -> None:
        """Delete every container, stop dockerd, unmount, and delete the bridge and the directory."""
        if self.directory is None:
            return
        if self.running:
            every = self.docker("ps", "-aq")
            if every.returncode == 0 and every.stdout.split():
                self.docker("rm", "-f", *every.stdout.split())
            self.stop(wait=False)
            try:
                self.wait_stopped()
            except EngineError as error:
                logger.warning("%s; killing it", error)
                self.process.kill()
                self.process.wait()
        _remove_directory(self.directory)
        self.directory = None
        self.bridge = ""
        with contextlib.suppress(ValueError):
            atexit.unregister(self.remove)
