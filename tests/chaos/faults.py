"""Host-level faults for chaos tests: iptables partitions, packet loss and delay, faked clocks, full disks.

Every fault here touches only what the test created:

- `Partition` drops traffic between two groups of devnet addresses with rules that
  name exactly those addresses, in a chain of its own, `VOXA-CHAOS-<pid>`, reached
  from OUTPUT (loopback traffic passes OUTPUT once per packet). `remove()` deletes
  the chain, and runs from the test's finally blocks and from atexit.
  `remove_stale_chains()` deletes chains left by test processes that no longer run.
- `Partition.lose()` drops a random share of the packets between addresses in the
  same chain, with iptables' `statistic` match. A packet dropped in OUTPUT fails the
  sender's sendto() with EPERM, which the node only logs at debug level, so to the
  node it is a packet lost on the way.
- `Partition.delay()` holds packets between addresses for a set time: its rules send
  them to an NFQUEUE queue, where `packet_delay.py`, started as a child process,
  accepts each one once its time is up.
- `faketime_env()` builds the environment that starts a node under libfaketime with a
  fixed clock offset (Debian package `faketime`).
- `TmpfsDataDir` moves a stopped node's data directory onto a small tmpfs, which the
  test fills to make the disk full, and moves it back and unmounts it at the end.

The kernel of the CI machine has no `sch_netem` qdisc, and netem on a host interface
would delay other tests' traffic too, so loss and delay come from iptables rules.
The Docker engine restart lives in `docker_engine.py`.
"""

import atexit
import contextlib
import glob
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

CHAIN_PREFIX = "VOXA-CHAOS-"
IPTABLES_TIMEOUT_SECONDS = 20
IPTABLES_LOCK_WAIT_SECONDS = "5"
FAKETIME_LIBRARY_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"
TMPFS_SIZE_BYTES = 16 * 1024 * 1024
FILL_CHUNK_BYTES = 256 * 1024
FILLER_FILE_NAME = "chaos-filler.bin"
UMOUNT_ATTEMPTS = 20
UMOUNT_RETRY_SECONDS = 0.25
DELAYER_SCRIPT = Path(__file__).resolve().with_name("packet_delay.py")
DELAYER_READY_SECONDS = 10.0
DELAYER_STOP_SECONDS = 10.0
DELAYER_EXIT_BIND_FAILED = 2
# NFQUEUE queue numbers tried for the delay process, starting at an offset by pid.
QUEUE_FIRST = 20000
QUEUE_SPAN = 20000
QUEUE_ATTEMPTS = 20


class FaultError(Exception):
    """A fault could not be injected or removed."""


# --- iptables partitions ---------------------------------------------------------------


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        ["iptables", "-w", IPTABLES_LOCK_WAIT_SECONDS, *args],
        capture_output=True,
        text=True,
        timeout=IPTABLES_TIMEOUT_SECONDS,
    )
    if check and completed.returncode != 0:
        raise FaultError(f"iptables {' '.join(args)} failed: {completed.stderr.strip()}")
    return completed


def iptables_available() -> bool:
    """Return whether `iptables -S` runs here (root and a filter table)."""
    try:
        return _iptables("-S", "OUTPUT", check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _delete_chain(chain: str) -> None:
    """Remove every OUTPUT jump to `chain`, then flush and delete it."""
    # Each -D removes one jump; a crashed run may have left more than one.
    while _iptables("-D", "OUTPUT", "-j", chain, check=False).returncode == 0:
        pass
    _iptables("-F", chain, check=False)
    _iptables("-X", chain, check=False)


def remove_stale_chains() -> list[str]:
    """Delete the VOXA-CHAOS-<pid> chains whose pid no longer runs; return their names."""
    listing = _iptables("-S").stdout
    removed = []
    for pid_text in re.findall(rf"^-N {CHAIN_PREFIX}(\d+)$", listing, flags=re.MULTILINE):
        if Path(f"/proc/{pid_text}").exists():
            continue
        chain = CHAIN_PREFIX + pid_text
        _delete_chain(chain)
        removed.append(chain)
        logger.warning("removed iptables chain %s left by a test process that no longer runs", chain)
    return removed


class Partition:
    """Drop or delay IPv4 traffic between address groups, in this process's own chain.

    `split()` drops all packets, `lose()` a random share, `delay()` delays them for a
    while. `heal()` removes every rule of the chain and stops the delay process.
    """

    def __init__(self) -> None:
        self.chain = f"{CHAIN_PREFIX}{os.getpid()}"
        self.installed = False
        self.active = False
        self.pairs: list[tuple[str, str]] = []
        self.delayer: subprocess.Popen | None = None
        self.delay_settings: tuple[float, float] | None = None
        self.queue: int | None = None
        # Packets the delay processes that already ended reported as delayed.
        self.delayed_reported = 0

    def install(self) -> None:
        """Create the (empty) chain and jump to it from OUTPUT; idempotent."""
        if self.installed:
            return
        remove_stale_chains()
        _delete_chain(self.chain)
        _iptables("-N", self.chain)
        self.installed = True
        atexit.register(self.remove)
        _iptables("-I", "OUTPUT", "1", "-j", self.chain)

    def split(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Drop packets from any address of one group to any address of the other.

        The split replaces every rule of the chain, loss and delay rules included.
        """
        group_a, group_b = list(group_a), list(group_b)
        self.install()
        self.heal()
        for pair in _pairs_between(group_a, group_b):
            _iptables("-A", self.chain, "-s", pair[0], "-d", pair[1], "-j", "DROP")
            self.pairs.append(pair)
        self.active = True
        logger.info("partition %s | %s installed in chain %s", group_a, group_b, self.chain)

    def lose(self, group_a: Iterable[str], group_b: Iterable[str], probability: float, protocol: str = "udp") -> None:
        """Drop each `protocol` packet between the groups, both ways, with `probability`.

        The rules are added to those already in the chain.
        """
        if not 0 < probability < 1:
            raise FaultError(f"loss probability must be between 0 and 1, got {probability}")
        group_a, group_b = list(group_a), list(group_b)
        self.install()
        for source, destination in _pairs_between(group_a, group_b):
            _iptables(
                "-A", self.chain, "-s", source, "-d", destination, "-p", protocol,
                "-m", "statistic", "--mode", "random", "--probability", f"{probability:.4f}",
                "-j", "DROP",
            )
        self.active = True
        logger.info(
            "loss of %.0f%% of %s packets between %s and %s in chain %s",
            probability * 100, protocol, group_a, group_b, self.chain,
        )

    def delay(
        self,
        group_a: Iterable[str],
        group_b: Iterable[str],
        delay_seconds: float,
        jitter_seconds: float = 0.0,
        protocol: str = "udp",
    ) -> None:
        """Hold each `protocol` packet between the groups, both ways, for the delay plus 0..jitter.

        One delay process serves the chain, so every delay() until the next heal()
        must use the same times. The rules are added to those already in the chain.
        """
        group_a, group_b = list(group_a), list(group_b)
        self.install()
        settings = (delay_seconds, jitter_seconds)
        if self.delayer is not None and self.delay_settings != settings:
            raise FaultError(f"a delay of {self.delay_settings} s is active; heal before setting {settings} s")
        if self.delayer is None:
            self._start_delayer(delay_seconds, jitter_seconds)
            self.delay_settings = settings
        for source, destination in _pairs_between(group_a, group_b):
            _iptables(
                "-A", self.chain, "-s", source, "-d", destination, "-p", protocol,
                "-j", "NFQUEUE", "--queue-num", str(self.queue), "--queue-bypass",
            )
        self.active = True
        logger.info(
            "delay of %.0f+%.0f ms on %s packets between %s and %s, queue %d",
            delay_seconds * 1000, jitter_seconds * 1000, protocol, group_a, group_b, self.queue,
        )

    def _start_delayer(self, delay_seconds: float, jitter_seconds: float) -> None:
        """Start packet_delay.py on a free queue number and wait until it is bound."""
        for attempt in range(QUEUE_ATTEMPTS):
            queue = QUEUE_FIRST + (os.getpid() + attempt) % QUEUE_SPAN
            process = subprocess.Popen(
                [
                    sys.executable, str(DELAYER_SCRIPT), "--queue", str(queue),
                    "--delay-ms", f"{delay_seconds * 1000:.3f}", "--jitter-ms", f"{jitter_seconds * 1000:.3f}",
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            readable, _, _ = select.select([process.stdout], [], [], DELAYER_READY_SECONDS)
            if readable and process.stdout.readline().strip() == "ready":
                self.delayer, self.queue = process, queue
                return
            process.kill()
            _, error_output = process.communicate()
            if process.returncode != DELAYER_EXIT_BIND_FAILED:
                raise FaultError(f"packet_delay.py on queue {queue} did not start: {error_output.strip()}")
            logger.info("NFQUEUE queue %d is in use; trying the next one", queue)
        raise FaultError(f"no free NFQUEUE queue in {QUEUE_ATTEMPTS} attempts from {QUEUE_FIRST}")

    def _stop_delayer(self) -> None:
        if self.delayer is None:
            return
        self.delayer.send_signal(signal.SIGTERM)
        try:
            output, error_output = self.delayer.communicate(timeout=DELAYER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.delayer.kill()
            output, error_output = self.delayer.communicate()
        match = re.search(r"^delayed (\d+) packets$", output, flags=re.MULTILINE)
        if match:
            self.delayed_reported += int(match.group(1))
        if error_output.strip():
            logger.warning("packet_delay.py on queue %s: %s", self.queue, error_output.strip())
        self.delayer = None
        self.delay_settings = None
        self.queue = None

    def heal(self) -> None:
        """Remove every rule and stop the delay process; the chain stays for the next fault."""
        if self.installed:
            _iptables("-F", self.chain)
        self._stop_delayer()
        self.pairs = []
        self.active = False

    def remove(self) -> None:
        """Delete the chain and its jump, and stop the delay process; safe to call twice."""
        self._stop_delayer()
        if not self.installed:
            return
        _delete_chain(self.chain)
        self.installed = False
        self.active = False
        self.pairs = []
        with contextlib.suppress(ValueError):
            atexit.unregister(self.remove)

    def packet_counts(self) -> dict[str, int]:
        """Return the packets the chain's rules matched since the last heal, by fault.

        Keys: "partitioned" (dropped by a split), "lost" (dropped by a loss rule) and
        "delayed" (sent to the delay queue).
        """
        counts = {"partitioned": 0, "lost": 0, "delayed": 0}
        if not self.installed:
            return counts
        listing = _iptables("-L", self.chain, "-v", "-x", "-n").stdout
        for line in listing.splitlines()[2:]:
            fields = line.split()
            if len(fields) < 3 or not fields[0].isdigit():
                continue
            if fields[2] == "NFQUEUE":
                counts["delayed"] += int(fields[0])
            elif "statistic" in line:
                counts["lost"] += int(fields[0])
            elif fields[2] == "DROP":
                counts["partitioned"] += int(fields[0])
        return counts

    def dropped_packets(self) -> int:
        """Return how many packets the chain's rules dropped since the last heal."""
        counts = self.packet_counts()
        return counts["partitioned"] + counts["lost"]


def _pairs_between(group_a: Iterable[str], group_b: Iterable[str]) -> list[tuple[str, str]]:
    """Return (source, destination) for every address pair across the groups, both ways."""
    group_a, group_b = list(group_a), list(group_b)
    overlap = set(group_a) & set(group_b)
    if overlap:
        raise FaultError(f"addresses in both groups: {sorted(overlap)}")
    pairs = []
    for source in group_a:
        for destination in group_b:
            pairs.extend([(source, destination), (destination, source)])
    return pairs


# --- clock skew ---------------------------------------------------------------------------


def faketime_library() -> str | None:
    """Return the path of libfaketime.so.1, or None when the package is not installed."""
    matches = sorted(glob.glob(FAKETIME_LIBRARY_GLOB))
    return matches[0] if matches else None


def faketime_env(offset_seconds: int) -> dict[str, str]:
    """Return the variables that run a process with its wall clock `offset_seconds` off.

    Only the wall clock moves: monotonic clocks stay real, so timers and timeouts in
    the node behave as on a machine whose clock is simply set wrong.
    """
    library = faketime_library()
    if library is None:
        raise FaultError("libfaketime is not installed; install the Debian package faketime")
    return {
        "LD_PRELOAD": library,
        "FAKETIME": f"{offset_seconds:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


# --- full disk ----------------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_SECONDS)


class TmpfsDataDir:
    """A node's data directory moved onto a tmpfs of `size_bytes`, which `fill()` fills.

    The node must be stopped around `mount()` and `unmount()`. Its files are copied
    to the tmpfs and back, so records written meanwhile survive the unmount.
    """

    def __init__(self, data_dir: Path, size_bytes: int = TMPFS_SIZE_BYTES) -> None:
        self.data_dir = Path(data_dir)
        self.saved_dir = self.data_dir.with_name(self.data_dir.name + ".on-disk")
        self.size_bytes = size_bytes
        self.mounted = False

    @property
    def filler_path(self) -> Path:
        return self.data_dir / FILLER_FILE_NAME

    def mount(self) -> None:
        """Move the directory aside, mount a tmpfs in its place and copy the files in."""
        if self.mounted:
            return
        os.rename(self.data_dir, self.saved_dir)
        self.data_dir.mkdir(mode=0o700)
        completed = _run(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0700", "tmpfs", str(self.data_dir)])
        if completed.returncode != 0:
            self.data_dir.rmdir()
            os.rename(self.saved_dir, self.data_dir)
            raise FaultError(f"mount tmpfs on {self.data_dir} failed: {completed.stderr.strip()}")
        self.mounted = True
        atexit.register(self.unmount)
        shutil.copytree(self.saved_dir, self.data_dir, dirs_exist_ok=True)

    def fill(self) -> int:
        """Write zeros until the tmpfs is full; return the bytes written."""
        written = 0
        max_chunks = self.size_bytes // FILL_CHUNK_BYTES + 2
        chunk = bytes(FILL_CHUNK_BYTES)
        with open(self.filler_path, "ab", buffering=0) as filler:
            for _ in range(max_chunks):
                try:
                    written += filler.write(chunk)
                except OSError:
                    break
            # The last partial chunk: fill the remaining bytes one small write at a time.
            for _ in range(FILL_CHUNK_BYTES // 512):
                try:
                    written += filler.write(bytes(512))
                except OSError:
                    break
        return written

    def free(self) -> None:
        """Delete the filler file, so the disk has room again."""
        self.filler_path.unlink(missing_ok=True)

    def unmount(self) -> None:
        """Copy the files back to disk, unmount the tmpfs and put the directory back."""
        if not self.mounted:
            return
        self.free()
        shutil.copytree(self.data_dir, self.saved_dir, dirs_exist_ok=True)
        for _ in range(UMOUNT_ATTEMPTS):
            if _run(["umount", str(self.data_dir)]).returncode == 0:
                break
            time.sleep(UMOUNT_RETRY_SECONDS)
        else:
            logger.warning("tmpfs on %s stays busy; detaching it lazily", self.data_dir)
            _run(["umount", "-l", str(self.data_dir)])
        self.data_dir.rmdir()
        os.rename(self.saved_dir, self.data_dir)
        self.mounted = False
        with contextlib.suppress(ValueError):
            atexit.unregister(self.unmount)
