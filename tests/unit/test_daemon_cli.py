"""Tests of the `voxanode` command, run as a real process with `python -m voxanode`."""

import configparser
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voxanode import __version__
from voxanode.daemon import _describe_bind_error
from voxanode.settings import SETTING_SPECS, BindError, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 60
STARTUP_TIMEOUT_SECONDS = 30
LOG_LINE_PATTERN = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+ node=(node-[0-9a-f]{12}|-) .*"
)


def daemon_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment without VOXA_* variables, plus `extra`."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("VOXA_")}
    python_path = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + python_path if python_path else "")
    environ.update(extra or {})
    return environ


def run_voxanode(cwd: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "voxanode", *args],
        cwd=cwd,
        env=daemon_environment(env),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def free_port(kind: int) -> int:
    """Return a loopback port that was free a moment ago, for TCP or UDP (`kind`)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_case(tmp_path: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


BAD_SETTING_CASES = [
    # (case id, args, environment, files in the working directory, setting named)
    ("port flag out of range", ["--api-port", "70000"], {}, {}, "api_port"),
    ("port env zero", [], {"VOXA_PEER_PORT": "0"}, {}, "peer_port"),
    ("unknown env variable", [], {"VOXA_API_PROT": "1"}, {}, "VOXA_API_PORT"),
    ("missing config file", ["--config", "missing.json"], {}, {}, "config_file"),
    ("unknown key in default config", [], {}, {"config/settings.json": '{"api_prot": 1}'},
     "api_port"),
    ("config not an object", [], {"VOXA_CONFIG": "list.json"}, {"list.json": "[]"},
     "config_file"),
    ("bad bootstrap flag", ["--bootstrap", "nohost"], {}, {}, "bootstrap"),
    ("bad default bootstrap file", [], {}, {"bootstrap_peers.json": '["x:0"]'},
     "bootstrap_file"),
    ("bad bool env", [], {"VOXA_DEV": "maybe"}, {}, "dev"),
    ("ttl default above max", ["--default-ttl-seconds", "9999999"], {}, {},
     "default_ttl_seconds"),
    ("data dir under a file", ["--data-dir", "a_file/data"], {}, {"a_file": "x"}, "data_dir"),
    ("unreadable node key", ["--data-dir", "state"], {}, {"state/node_key.pem": "not a key"},
     "data_dir"),
]


@pytest.mark.parametrize(
    ("args", "env", "files", "setting"),
    [case[1:] for case in BAD_SETTING_CASES],
    ids=[case[0] for case in BAD_SETTING_CASES],
)
def test_voxanode_bad_setting_exits_2_with_one_line(tmp_path, args, env, files, setting):
    prepare_case(tmp_path, files)

    completed = run_voxanode(tmp_path, *args, env=env)

    assert completed.returncode == 2
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("voxanode: error: ")
    assert setting in lines[0]


def test_voxanode_port_error_message(tmp_path):
    completed = run_voxanode(tmp_path, "--api-port", "70000")

    expected = (
        "voxanode: error: invalid setting api_port=70000 (from --api-port): "
        "must be an integer from 1 to 65535\n"
    )
    assert completed.stderr == expected


def test_voxanode_unknown_flag_is_one_line(tmp_path):
    completed = run_voxanode(tmp_path, "--api-prot", "1")

    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [
        "voxanode: error: unrecognized arguments: --api-prot 1; see voxanode --help"
    ]


def test_voxanode_version(tmp_path):
    completed = run_voxanode(tmp_path, "--version")

    assert completed.returncode == 0
    assert completed.stdout == f"voxanode {__version__}\n"


def test_voxanode_help_shows_defaults_and_env_twins(tmp_path):
    completed = run_voxanode(tmp_path, "--help", env={"COLUMNS": "200"})

    assert completed.returncode == 0
    help_text = completed.stdout
    for spec in SETTING_SPECS:
        assert spec.flag in help_text
        assert f"[default: {spec.default_text}; env {spec.env}]" in help_text
    assert "--no-dev" in help_text
    assert "[default: 9999; env VOXA_API_PORT]" in help_text


def test_console_script_points_at_main():
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")

    scripts = setup["options.entry_points"]["console_scripts"]
    assert "voxanode = voxanode.daemon:main" in scripts.splitlines()


# Bind failures and a full start of the node


def test_describe_bind_error_for_address_not_available():
    settings = Settings(sources={"api_host": "--api-host"})
    os_error = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    message = _describe_bind_error(BindError("api_port", "10.9.9.9", 9999, os_error), settings)

    assert message.startswith("invalid setting api_host=10.9.9.9 (from --api-host): ")
    assert "set api_host to an address of this machine" in message


def start_args(tmp_path: Path, api_port: int, peer_port: int) -> list[str]:
    return [
        "--data-dir", str(tmp_path / "data"),
        "--api-port", str(api_port),
        "--peer-port", str(peer_port),
        "--dev",
    ]


def test_voxanode_api_port_in_use_names_setting(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        api_port = occupied.getsockname()[1]
        peer_port = free_port(socket.SOCK_DGRAM)

        completed = run_voxanode(tmp_path, *start_args(tmp_path, api_port, peer_port))

    errors = [line for line in completed.stderr.splitlines() if line.startswith("voxanode:")]
    assert completed.returncode == 2, completed.stderr
    assert len(errors) == 1, completed.stderr
    assert f"invalid setting api_port={api_port} (from --api-port)" in errors[0]
    expected_problem = f"cannot listen on 127.0.0.1:{api_port} ({os.strerror(errno.EADDRINUSE)})"
    assert expected_problem in errors[0]


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_voxanode_peer_port_in_use_names_setting(tmp_path, event_loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as occupied:
        occupied.bind(("127.0.0.1", 0))
        peer_port = occupied.getsockname()[1]
        api_port = free_port(socket.SOCK_STREAM)

        completed = run_voxanode(
            tmp_path, *start_args(tmp_path, api_port, peer_port), "--event-loop", event_loop
        )

    errors = [line for line in completed.stderr.splitlines() if line.startswith("voxanode:")]
    assert completed.returncode == 2, completed.stderr
    assert len(errors) == 1, completed.stderr
    assert f"invalid setting peer_port={peer_port} (from --peer-port)" in errors[0]


def wait_for_tcp_port(port: int, process: subprocess.Popen) -> None:
    """Wait until 127.0.0.1:port accepts connections, failing if the process exits first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, "voxanode exited before it listened"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"voxanode did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT_SECONDS} s")


def test_voxanode_starts_and_stops_on_sigterm(tmp_path):
    api_port = free_port(socket.SOCK_STREAM)
    peer_port = free_port(socket.SOCK_DGRAM)
    log_path = tmp_path / "stderr.log"
    command = [sys.executable, "-m", "voxanode", *start_args(tmp_path, api_port, peer_port)]

    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=daemon_environment(), stderr=log_file, text=True
        )
    try:
        wait_for_tcp_port(api_port, process)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=COMMAND_TIMEOUT_SECONDS)

    lines = log_path.read_text(encoding="utf-8").splitlines()
    assert returncode == 0, lines
    assert lines, "voxanode wrote no log lines"
    assert all(LOG_LINE_PATTERN.fullmatch(line) for line in lines), lines
    key_path = tmp_path / "data" / "node_key.pem"
    assert key_path.is_file()
    dev_warnings = [line for line in lines if " WARNING voxanode.daemon " in line]
    assert len(dev_warnings) == 1
    assert "authentication is off" in dev_warnings[0]
    assert re.search(r"node=node-[0-9a-f]{12} ", dev_warnings[0])
    assert "voxanode stopped" in lines[-1]


def test_voxanode_settings_file_values_reach_node(tmp_path):
    api_port = free_port(socket.SOCK_STREAM)
    peer_port = free_port(socket.SOCK_DGRAM)
    settings_document = {"api_port": api_port, "peer_port": peer_port, "dev": True}
    prepare_case(tmp_path, {"config/settings.json": json.dumps(settings_document)})

    process = subprocess.Popen(
        [sys.executable, "-m", "voxanode", "--data-dir", "data", "--log-level", "error"],
        cwd=tmp_path,
        env=daemon_environment(),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tcp_port(api_port, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=COMMAND_TIMEOUT_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
    assert (tmp_path / "data" / "node_key.pem").is_file()
