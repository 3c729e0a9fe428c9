"""The systemd unit and scripts/install.sh, checked with systemd-analyze and real installs.

The unit is checked with `systemd-analyze verify` on a copy whose ExecStart binary is a
real file, because verify rejects a command that does not exist. install.sh runs as
root into throwaway roots (`--prefix`, `--no-systemctl`) that have their own
etc/passwd and etc/group, and installs a copy of the package sources, so edits that
others make in the checkout during the run cannot change what is installed. One
install is shared by the tests of this module. A first run takes about 15 s to create
the venv and pip install the wheels from pip's cache or index. Later runs take well
under a second unless the source changed.
"""

import ctypes
import hashlib
import http.client
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import api_get, wait_for
from voxanode import __version__
from voxanode.devnet import allocate_free_block

REPO_DIR = Path(__file__).resolve().parents[2]
UNIT_PATH = REPO_DIR / "systemd" / "voxanode.service"
INSTALL_SCRIPT = REPO_DIR / "scripts" / "install.sh"
INSTALLED_BINARY = "/opt/voxanode/venv/bin/voxanode"
# What install.sh reads from --source.
SOURCE_ITEMS = (
    "pyproject.toml",
    "setup.cfg",
    "README.md",
    "voxanode",
    "voxacommunications_client",
    "config/settings.json",
    "bootstrap_peers.json",
    "systemd/voxanode.service",
)
SEED_PASSWD = "root:x:0:0:root:/root:/bin/bash\n"
SEED_GROUP = "root:x:0:\ndocker:x:990:\n"
INSTALL_TIMEOUT_SECONDS = 300
COMMAND_TIMEOUT_SECONDS = 60
# systemd-analyze security rates exposure from 0 (locked down) to 10, and --threshold
# takes tenths. The unit scores 3.3 with systemd 252. A limit of 3.5 fails when the
# capability bounding set or several sandbox settings go, and
# test_unit_directive_value checks each setting by itself.
MAX_EXPOSURE_TENTHS = 35
DAEMON_READY_SECONDS = 30
DAEMON_STOP_SECONDS = 30
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh creates users and root-owned files")


# --- helpers ---------------------------------------------------------------------------


def run_command(command: list[str], timeout: float = COMMAND_TIMEOUT_SECONDS, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def run_install(prefix: Path, source: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run install.sh into `prefix` from `source`, without systemctl."""
    command = [
        str(INSTALL_SCRIPT),
        "--prefix", str(prefix),
        "--source", str(source),
        "--python", sys.executable,
        "--no-systemctl",
        *extra,
    ]
    return run_command(command, timeout=INSTALL_TIMEOUT_SECONDS)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def copy_sources(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in SOURCE_ITEMS:
        source = REPO_DIR / item
        destination = target / item
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=ignore)
        else:
            shutil.copy2(source, destination)
    return target


def seed_root(prefix: Path, with_accounts: bool = True) -> Path:
    """Create an empty root, with etc/passwd and etc/group when `with_accounts`."""
    (prefix / "etc").mkdir(parents=True)
    if with_accounts:
        (prefix / "etc" / "passwd").write_text(SEED_PASSWD)
        (prefix / "etc" / "group").write_text(SEED_GROUP)
    return prefix


def snapshot_tree(root: Path) -> dict[str, tuple]:
    """Map each path under `root` to its type, mode, owner, mtime and content hash."""
    entries = {}
    for directory, dir_names, file_names in os.walk(root):
        for name in [*dir_names, *file_names]:
            path = Path(directory) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = ""
            key = str(path.relative_to(root))
            entries[key] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_mtime_ns, content)
    entries["."] = (root.stat().st_mtime_ns,)
    return entries


def account_entry(prefix: Path, database: str, name: str) -> list[str] | None:
    """Return the fields of `name` in the root's etc/passwd or etc/group."""
    for line in (prefix / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def mode_and_owner(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def read_unit_directives(path: Path) -> dict[tuple[str, str], list[str]]:
    """Return the unit's values per (section, key), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    directives: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault((section, key.strip()), []).append(value.strip())
    return directives


def unit_with_binary(unit_text: str, binary: Path) -> str:
    """Return the unit text with the ExecStart binary replaced by `binary`."""
    replaced, count = re.subn(
        rf"^ExecStart={re.escape(INSTALLED_BINARY)}(?=\s)", f"ExecStart={binary}", unit_text, flags=re.MULTILINE
    )
    assert count == 1, f"ExecStart={INSTALLED_BINARY} not found exactly once in {UNIT_PATH}"
    return replaced


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path is not None, "systemd-analyze not found; install the systemd package (Debian: apt-get install systemd)"
    return path


@pytest.fixture
def checked_unit(tmp_path: Path) -> Path:
    """Write a copy of the unit whose ExecStart binary exists, in its own directory."""
    binary = tmp_path / "bin" / "voxanode"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    unit = tmp_path / "units" / "voxanode.service"
    unit.parent.mkdir()
    unit.write_text(unit_with_binary(UNIT_PATH.read_text(), binary))
    return unit


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_sources(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def first_install(tmp_path_factory: pytest.TempPathFactory, source_copy: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Install once into a throwaway root; return the root and the run's result."""
    if os.geteuid() != 0:
        pytest.skip("install.sh creates users and root-owned files, so it runs as root")
    prefix = seed_root(tmp_path_factory.mktemp("root"))
    result = run_install(prefix, source_copy)
    assert result.returncode == 0, describe(result)
    return prefix, result


# --- the unit --------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(systemd_analyze: str, checked_unit: Path):
    result = run_command([systemd_analyze, "verify", str(checked_unit)])

    assert result.returncode == 0, describe(result)
    # verify exits 0 after warnings such as an unknown key, so any output fails.
    assert result.stdout == "", describe(result)
    assert result.stderr == "", describe(result)


def test_unit_verify_reports_broken_copy(systemd_analyze: str, checked_unit: Path):
    # The check above would pass vacuously if verify printed nothing for a bad unit.
    broken = checked_unit.read_text().replace("SystemCallArchitectures=native", "SystemCallArchitectures=nativ")
    checked_unit.write_text(broken)

    result = run_command([systemd_analyze, "verify", str(checked_unit)])

    assert "nativ" in result.stdout + result.stderr, describe(result)


def test_unit_sandbox_exposure_below_limit(systemd_analyze: str, checked_unit: Path):
    result = run_command(
        [systemd_analyze, "security", "--offline=true", f"--threshold={MAX_EXPOSURE_TENTHS}", str(checked_unit)]
    )

    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert result.returncode == 0, f"exposure {exposure and exposure.group(1)} over {MAX_EXPOSURE_TENTHS / 10}\n{describe(result)}"


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("Service", "Type", "notify"),
        ("Service", "NotifyAccess", "main"),
        ("Service", "ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Service", "User", "voxanode"),
        ("Service", "SupplementaryGroups", "docker"),
        ("Service", "StateDirectory", "voxanode"),
        ("Service", "StateDirectoryMode", "0700"),
        ("Service", "ConfigurationDirectory", "voxanode"),
        ("Service", "ConfigurationDirectoryMode", "0750"),
        ("Service", "Restart", "on-failure"),
        ("Service", "RestartSec", "5s"),
        ("Unit", "StartLimitIntervalSec", "10min"),
        ("Unit", "StartLimitBurst", "5"),
        ("Service", "KillSignal", "SIGTERM"),
        ("Service", "UMask", "0077"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Service", "PrivateDevices", "yes"),
        ("Service", "ProtectKernelTunables", "yes"),
        ("Service", "ProtectKernelModules", "yes"),
        ("Service", "ProtectKernelLogs", "yes"),
        ("Service", "ProtectControlGroups", "yes"),
        ("Service", "ProtectClock", "yes"),
        ("Service", "ProtectHostname", "yes"),
        ("Service", "RestrictNamespaces", "yes"),
        ("Service", "RestrictRealtime", "yes"),
        ("Service", "RestrictSUIDSGID", "yes"),
        ("Service", "LockPersonality", "yes"),
        ("Service", "MemoryDenyWriteExecute", "yes"),
        ("Service", "SystemCallArchitectures", "native"),
        ("Service", "RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
        ("Service", "CapabilityBoundingSet", ""),
        ("Install", "WantedBy", "multi-user.target"),
    ],
)
def test_unit_directive_value(section: str, key: str, expected: str):
    directives = read_unit_directives(UNIT_PATH)

    assert directives.get((section, key)) == [expected]


def test_unit_execstart_uses_installed_paths():
    directives = read_unit_directives(UNIT_PATH)
    command = directives[("Service", "ExecStart")][0].split()

    assert command[0] == INSTALLED_BINARY
    assert command[command.index("--config") + 1] == "%E/voxanode/settings.json"
    assert command[command.index("--bootstrap-file") + 1] == "%E/voxanode/bootstrap_peers.json"
    assert command[command.index("--data-dir") + 1] == "%S/voxanode"


def test_unit_stop_timeout_exceeds_graceful_shutdown():
    from voxanode.settings import Settings

    directives = read_unit_directives(UNIT_PATH)
    timeout = directives[("Service", "TimeoutStopSec")][0]
    defaults = Settings()
    # API requests, then the app loops (5 s) and the other loops (0.5 s + 2 s).
    graceful_seconds = defaults.leave_wait_seconds + defaults.shutdown_timeout_seconds + 5 + 2.5

    assert timeout.endswith("s"), timeout
    assert timeout[:-1].isdigit(), timeout
    assert int(timeout[:-1]) > 2 * graceful_seconds


# --- install.sh ------------------------------------------------------------------------


@needs_root
def test_install_rejects_unknown_option(tmp_path: Path):
    result = run_command([str(INSTALL_SCRIPT), "--prefix", str(tmp_path), "--bogus"])

    assert result.returncode == 2, describe(result)
    assert "unknown option: --bogus" in result.stderr
    assert list(tmp_path.iterdir()) == []


@needs_root
def test_install_first_run_creates_service_files(first_install, source_copy: Path):
    prefix, result = first_install
    user = account_entry(prefix, "passwd", "voxanode")
    group = account_entry(prefix, "group", "voxanode")
    docker = account_entry(prefix, "group", "docker")
    assert user is not None, (prefix / "etc" / "passwd").read_text()
    assert group is not None, (prefix / "etc" / "group").read_text()
    uid, gid = int(user[2]), int(group[2])

    version = run_command([str(prefix / INSTALLED_BINARY.lstrip("/")), "--version"])
    assert version.returncode == 0, describe(version)
    assert version.stdout.strip() == f"voxanode {__version__}"

    assert user[3] == group[2]
    assert user[6] == "/usr/sbin/nologin"
    assert "voxanode" in docker[3].split(",")

    unit = prefix / "etc/systemd/system/voxanode.service"
    assert unit.read_bytes() == UNIT_PATH.read_bytes()
    assert mode_and_owner(unit) == (0o644, 0, 0)

    config_dir = prefix / "etc/voxanode"
    assert mode_and_owner(config_dir) == (0o750, 0, gid)
    for name, source in (("settings.json", "config/settings.json"), ("bootstrap_peers.json", "bootstrap_peers.json")):
        assert (config_dir / name).read_bytes() == (source_copy / source).read_bytes()
        assert mode_and_owner(config_dir / name) == (0o640, 0, gid)

    assert mode_and_owner(prefix / "var/lib/voxanode") == (0o700, uid, gid)
    assert "skipped systemctl daemon-reload and enable: --no-systemctl was given" in result.stdout
    assert "done:" in result.stdout


@needs_root
def test_install_second_run_changes_nothing(first_install, source_copy: Path):
    prefix, _ = first_install
    before = snapshot_tree(prefix)

    result = run_install(prefix, source_copy)

    assert result.returncode == 0, describe(result)
    assert "nothing changed: the installation is up to date" in result.stdout
    after = snapshot_tree(prefix)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert changed == []


@needs_root
def test_install_keeps_edited_settings(first_install, source_copy: Path):
    prefix, _ = first_install
    settings = prefix / "etc/voxanode/settings.json"
    bootstrap = prefix / "etc/voxanode/bootstrap_peers.json"
    edited = settings.read_text().replace('"log_level": "INFO"', '"log_level": "DEBUG"')
    assert edited != settings.read_text()
    settings.write_text(edited)
    bootstrap.unlink()

    result = run_install(prefix, source_copy)

    assert result.returncode == 0, describe(result)
    assert settings.read_text() == edited
    assert f"kept {settings} as it is (never overwritten)" in result.stdout
    # A missing file is installed again.
    assert bootstrap.read_bytes() == (source_copy / "bootstrap_peers.json").read_bytes()
    assert f"installed {bootstrap}" in result.stdout


@needs_root
def test_install_reinstalls_changed_source(first_install, source_copy: Path):
    prefix, _ = first_install
    init_file = source_copy / "voxanode" / "__init__.py"
    original = init_file.read_text()
    changed_version = f"{__version__}+installtest"
    init_file.write_text(original.replace(f'"{__version__}"', f'"{changed_version}"'))
    try:
        result = run_install(prefix, source_copy)
    finally:
        init_file.write_text(original)

    assert result.returncode == 0, describe(result)
    assert f"installed package voxanode {changed_version}" in result.stdout
    version = run_command([str(prefix / INSTALLED_BINARY.lstrip("/")), "--version"])
    assert version.stdout.strip() == f"voxanode {changed_version}"


@needs_root
def test_install_without_accounts_skips_user(tmp_path: Path, source_copy: Path):
    prefix = seed_root(tmp_path / "root", with_accounts=False)

    result = run_install(prefix, source_copy)

    assert result.returncode == 0, describe(result)
    assert "skipped user voxanode:" in result.stdout
    assert not (prefix / "etc" / "passwd").exists()
    assert mode_and_owner(prefix / "var/lib/voxanode") == (0o700, 0, 0)
    assert mode_and_owner(prefix / "etc/voxanode/settings.json") == (0o640, 0, 0)


# --- the installed daemon under the unit's MemoryDenyWriteExecute ----------------------


def refuse_writable_executable_memory() -> None:
    """Apply PR_SET_MDWE in the child before exec, as MemoryDenyWriteExecute=yes does."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed")


def mdwe_supported() -> bool:
    """Return whether this kernel has PR_SET_MDWE (Linux 6.3 and newer)."""
    try:
        subprocess.run(
            [sys.executable, "-c", "pass"],
            preexec_fn=refuse_writable_executable_memory,
            check=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
    except subprocess.SubprocessError:
        return False
    return True


@needs_root
def test_installed_daemon_runs_under_mdwe(first_install, tmp_path: Path):
    if not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or newer)")
    prefix, _ = first_install
    block = allocate_free_block(1)
    base_url = f"http://{block.first_address}:{block.api_port}"
    command = [
        str(prefix / INSTALLED_BINARY.lstrip("/")),
        "--dev",
        "--data-dir", str(tmp_path / "data"),
        "--api-host", block.first_address,
        "--api-port", str(block.api_port),
        "--peer-host", block.first_address,
        "--peer-port", str(block.peer_port),
        # With a network key the node loads AES-GCM ciphers from the cryptography package.
        "--network-key", "11" * 32,
    ]
    log_path = tmp_path / "node.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, preexec_fn=refuse_writable_executable_memory
        )
    try:
        ready = wait_for(lambda: _api_answers(base_url) or process.poll() is not None, DAEMON_READY_SECONDS)
        assert ready is True, log_path.read_text()
        assert process.poll() is None, log_path.read_text()
        status, body, _ = api_get(base_url, "/info/version")
        assert status == 200, body
        process.send_signal(signal.SIGTERM)
        exit_status = process.wait(timeout=DAEMON_STOP_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert exit_status == 0, log_path.read_text()


def _api_answers(base_url: str) -> bool:
    try:
        return api_get(base_url, "/info/version", timeout=2).status == 200
    except (OSError, http.client.HTTPException):
        return False
