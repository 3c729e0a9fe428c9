"""Host-level faults for chaos tests: iptables partitions, faked clocks, full disks.

Every fault here touches only what the test created:

- `Partition` drops traffic between two groups of devnet addresses with rules that
  name exactly those addresses, in a chain of its own, `VOXA-CHAOS-<pid>`, reached
  from OUTPUT (loopback traffic passes OUTPUT once per packet). `remove()` deletes
  the chain, and runs from the test's finally blocks and from atexit.
  `remove_stale_chains()` deletes chains left by test processes that no longer run.
- `faketime_env()` builds the environment that starts a node under libfaketime with a
  fixed clock offset (Debian package `faketime`).
- `TmpfsDataDir` moves a stopped node's data directory onto a small tmpfs, which the
  test fills to make the disk full, and moves it back and unmounts it at the end.

Packet loss and delay (`tc netem`) are not here: the kernel of the CI machine has no
`sch_netem` qdisc, and netem on a host interface would hit other tests.
"""

import atexit
import contextlib
import glob
import logging
import os
import re
import shutil
import subprocess
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
    """Drop all IPv4 traffic between two address groups, in this process's own chain."""

    def __init__(self) -> None:
        self.chain = f"{CHAIN_PREFIX}{os.getpid()}"
        self.installed = False
        self.active = False
        self.pairs: list[tuple[str, str]] = []

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
        """Drop packets from any address of one group to any address of the other."""
        self.install()
        self.heal()
        group_a, group_b = list(group_a), list(group_b)
        overlap = set(group_a) & set(group_b)
        if overlap:
            raise FaultError(f"addresses in both partition groups: {sorted(overlap)}")
        for source in group_a:
            for destination in group_b:
                for pair in ((source, destination), (destination, source)):
                    _iptables("-A", self.chain, "-s", pair[0], "-d", pair[1], "-j", "DROP")
                    self.pairs.append(pair)
        self.active = True
        logger.info("partition %s | %s installed in chain %s", group_a, group_b, self.chain)

    def heal(self) -> None:
        """Remove the drop rules; the chain stays for the next split."""
        if self.installed:
            _iptables("-F", self.chain)
        self.pairs = []
        self.active = False

    def remove(self) -> None:
        """Delete the chain and its jump; safe to call twice."""
        if not self.installed:
            return
        _delete_chain(self.chain)
        self.installed = False
        self.active = False
        self.pairs = []
        with contextlib.suppress(ValueError):
            atexit.unregister(self.remove)

    def dropped_packets(self) -> int:
        """Return how many packets the chain's rules dropped since the last split."""
        if not self.installed:
            return 0
        listing = _iptables("-L", self.chain, "-v", "-x", "-n").stdout
        total = 0
        for line in listing.splitlines()[2:]:
            fields = line.split()
            if fields and fields[0].isdigit():
                total += int(fields[0])
        return total


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
