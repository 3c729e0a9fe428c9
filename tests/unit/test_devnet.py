"""Tests of the devnet harness that need no daemon.

Node processes here are stand-ins: `python -m http.server` serving the node's data
directory, where the stand-in writes the files status/health and status/system, so
GET /status/health returns 200 with a JSON body as the daemon's does.
"""

import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from voxanode import daemon as daemon_module
from voxanode import devnet as devnet_module
from voxanode.devnet import (
    AddressError,
    DevNode,
    Devnet,
    DevnetError,
    DevnetRunningError,
    NodeNotReadyError,
    allocate_free_block,
    build_parser,
    node_address,
    node_environment,
    parse_host_port,
    process_matches,
    read_cmdline,
    split_daemon_args,
    stop_from_state,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


class HttpServerNode(DevNode):
    """A node whose process is `python -m http.server` on the node's API address."""

    def command(self, extra_args=()):
        return [sys.executable, "-m", "http.server", "--bind", self.api_host, str(self.api_port), "--directory", str(self.data_dir)]

    def prepare_data_dir(self):
        super().prepare_data_dir()
        status_dir = self.data_dir / "status"
        status_dir.mkdir(exist_ok=True)
        (status_dir / "health").write_text(json.dumps({"status": "healthy"}))
        (status_dir / "system").write_text(json.dumps({"node_id": f"standin-{self.index}"}))


class SigtermIgnoringNode(HttpServerNode):
    """An HTTP stand-in that ignores SIGTERM, so only SIGKILL stops it."""

    def command(self, extra_args=()):
        code = (
            "import signal, sys, http.server, functools\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])\n"
            "http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), handler).serve_forever()\n"
        )
        return [sys.executable, "-c", code, self.api_host, str(self.api_port), str(self.data_dir)]


class CrashingNode(DevNode):
    """A node that prints a line and exits with code 3 at once."""

    def command(self, extra_args=()):
        return [sys.executable, "-c", "print('standin crashed on purpose', flush=True); raise SystemExit(3)"]


class SilentNode(DevNode):
    """A node that runs but never listens."""

    def command(self, extra_args=()):
        return [sys.executable, "-c", "import time; time.sleep(60)"]


class HttpServerDevnet(Devnet):
    node_class = HttpServerNode


def http_status(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


@pytest.fixture
def block():
    return allocate_free_block(4)


@pytest.fixture
def standin_devnet(tmp_path, block):
    devnet = HttpServerDevnet(3, tmp_path / "net", first_address=block.first_address, api_port=block.api_port, peer_port=block.peer_port, ready_timeout=15)
    yield devnet
    devnet.stop(timeout=2)


# --- addresses, arguments, environment ---------------------------------------------------


@pytest.mark.parametrize(
    ("first_address", "index", "expected"),
    [
        ("127.0.0.2", 0, "127.0.0.2"),
        ("127.0.0.2", 3, "127.0.0.5"),
        ("127.0.0.255", 1, "127.0.1.0"),
        ("127.40.7.1", 9, "127.40.7.10"),
        ("127.255.255.254", 1, "127.255.255.255"),
    ],
)
def test_node_address_walks_octets(first_address, index, expected):
    assert node_address(first_address, index) == expected


@pytest.mark.parametrize(
    ("first_address", "index"),
    [
        ("127.255.255.255", 1),
        ("10.0.0.1", 0),
        ("192.168.1.1", 0),
        ("128.0.0.1", 0),
        ("not-an-address", 0),
        ("::1", 0),
        ("127.0.0.2", -1),
    ],
)
def test_node_address_rejects_non_loopback(first_address, index):
    with pytest.raises(AddressError):
        node_address(first_address, index)


def test_devnet_rejects_range_leaving_loopback(tmp_path):
    with pytest.raises(AddressError):
        Devnet(3, tmp_path / "net", first_address="127.255.255.254")
    assert not (tmp_path / "net").exists()


def test_devnet_rejects_zero_size(tmp_path):
    with pytest.raises(DevnetError):
        Devnet(0, tmp_path / "net")


def test_devnet_layout_and_bootstrap_lists(tmp_path):
    devnet = Devnet(4, tmp_path / "net", first_address="127.0.0.2", api_port=9100, peer_port=9200, bootstrap_count=2)

    assert [node.api_url for node in devnet.nodes] == [f"http://127.0.0.{i}:9100" for i in range(2, 6)]
    assert [node.peer_address for node in devnet.nodes] == [f"127.0.0.{i}:9200" for i in range(2, 6)]
    assert [node.bootstrap for node in devnet.nodes] == [
        [],
        ["127.0.0.2:9200"],
        ["127.0.0.2:9200", "127.0.0.3:9200"],
        ["127.0.0.2:9200", "127.0.0.3:9200"],
    ]
    assert devnet.nodes[2].data_dir == (tmp_path / "net" / "node-2").resolve()
    assert devnet.nodes[2].log_path == (tmp_path / "net" / "node-2" / "node.log").resolve()

    added = devnet.add_node()
    assert added.index == 4
    assert added.api_url == "http://127.0.0.6:9100"
    assert added.bootstrap == ["127.0.0.2:9200", "127.0.0.3:9200"]
    assert added.process is None


def test_node_command_flags(tmp_path):
    node = DevNode(1, "127.0.0.3", 9100, "127.0.0.3", 9200, tmp_path / "node-1", bootstrap=["127.0.0.2:9200"], base_args=["--dev"])
    argv = node.command(["--log-level", "DEBUG"])

    assert argv[:3] == [sys.executable, "-m", "voxanode"]
    pairs = dict(zip(argv[3:-4:2], argv[4:-3:2], strict=True))
    assert pairs["--config"] == str(tmp_path / "node-1" / "settings.json")
    assert pairs["--data-dir"] == str(tmp_path / "node-1")
    assert pairs["--api-host"] == "127.0.0.3"
    assert pairs["--api-port"] == "9100"
    assert pairs["--peer-port"] == "9200"
    assert pairs["--bootstrap-file"] == str(tmp_path / "node-1" / "bootstrap_peers.json")
    assert pairs["--bootstrap"] == "127.0.0.2:9200"
    assert argv[-3:] == ["--dev", "--log-level", "DEBUG"]


def test_prepare_data_dir_writes_own_files(tmp_path):
    node = DevNode(2, "127.0.0.4", 9100, "127.0.0.4", 9200, tmp_path / "node-2", bootstrap=["127.0.0.2:9200", "127.0.0.3:9200"])
    node.prepare_data_dir()

    assert json.loads((tmp_path / "node-2" / "settings.json").read_text()) == {}
    assert json.loads((tmp_path / "node-2" / "bootstrap_peers.json").read_text()) == ["127.0.0.2:9200", "127.0.0.3:9200"]


def test_node_environment_drops_voxa_variables(monkeypatch):
    monkeypatch.setenv("VOXA_API_PORT", "1234")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = node_environment({"EXTRA": "1"})

    assert "VOXA_API_PORT" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]
    assert env["EXTRA"] == "1"


@pytest.mark.parametrize(
    ("argv", "own", "daemon"),
    [
        (["start", "-n", "3"], ["start", "-n", "3"], []),
        (["start", "--", "--log-level", "DEBUG", "--ksize", "5"], ["start"], ["--log-level", "DEBUG", "--ksize", "5"]),
        (["start", "--", "--", "-x"], ["start"], ["--", "-x"]),
    ],
)
def test_split_daemon_args(argv, own, daemon):
    assert split_daemon_args(argv) == (own, daemon)


def test_parser_start_defaults():
    args = build_parser().parse_args(["start"])

    assert args.nodes == 5
    assert args.dir == "./devnet"
    assert args.first_address == "127.0.0.2"
    assert args.api_port == 9999
    assert args.peer_port == 9999
    assert args.clean is False


def test_parser_start_options():
    args = build_parser().parse_args(["start", "-n", "2", "--dir", "/tmp/x", "--first-address", "127.9.0.1", "--api-port", "20001", "--peer-port", "20002"])

    assert (args.nodes, args.dir, args.first_address, args.api_port, args.peer_port) == (2, "/tmp/x", "127.9.0.1", 20001, 20002)


def readme_devnet_section() -> str:
    """Return the README's first-use section, which documents scripts/devnet."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## First use")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.parametrize("command", [[], ["start"], ["stop"], ["status"]])
def test_readme_names_every_devnet_option(command, capsys):
    with pytest.raises(SystemExit):
        devnet_module.main([*command, "--help"])
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", capsys.readouterr().out)) - {"--help"}
    section = readme_devnet_section()

    assert options, "the help lists options"
    assert sorted(option for option in options if f"`{option}" not in section) == []
    assert "arguments after `--` go to each\nnode's `voxanode` command" in section


def test_readme_devnet_example_parses():
    section = readme_devnet_section()
    (line,) = [line for line in section.splitlines() if line.startswith("scripts/devnet start") and " -- " in line]
    own, daemon = split_daemon_args(shlex.split(line)[1:])
    args = build_parser().parse_args(own)
    daemon_args = daemon_module.build_parser().parse_args(daemon)

    addresses = [node_address(args.first_address, index) for index in range(args.nodes)]
    assert addresses == ["127.0.1.10", "127.0.1.11", "127.0.1.12"]
    assert "nodes on 127.0.1.10 to 127.0.1.12, API port 9999, host-routed ingress on port 8080" in section
    assert args.api_port == 9999
    assert (daemon_args.log_level, daemon_args.ingress_port) == ("DEBUG", "8080")


def test_main_rejects_daemon_args_for_stop(capsys):
    with pytest.raises(SystemExit) as exit_info:
        devnet_module.main(["stop", "--", "--dev"])
    assert exit_info.value.code == 2
    assert "only accepted by the start command" in capsys.readouterr().err


def test_main_reports_missing_state(tmp_path, capsys):
    code = devnet_module.main(["status", "--dir", str(tmp_path)])

    assert code == 2
    assert "no devnet state file" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.2:9999", ("127.0.0.2", 9999)), ("host:1", ("host", 1))])
def test_parse_host_port_valid(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.2", ":9999", "127.0.0.2:0", "127.0.0.2:70000", "127.0.0.2:port"])
def test_parse_host_port_invalid(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


# --- free blocks ---------------------------------------------------------------------


def test_allocate_free_block_outside_default_devnet():
    block = allocate_free_block(5)
    octets = [int(part) for part in block.first_address.split(".")]

    assert octets[0] == 127
    assert octets[1] >= 10
    assert 20000 <= block.api_port <= 32000
    assert 20000 <= block.peer_port <= 32000


def test_allocate_free_block_skips_taken_port():
    # The first candidate of a seeded generator, with its API port taken on its third address.
    seed = 12345
    first = allocate_free_block(3, random.Random(seed))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((node_address(first.first_address, 2), first.api_port))
        second = allocate_free_block(3, random.Random(seed))

    assert second != first


# --- process lifecycle with stand-ins ------------------------------------------------------


def test_devnet_start_and_stop_standins(standin_devnet):
    standin_devnet.start()

    for node in standin_devnet.nodes:
        assert http_status(node.api_url + "/status/health") == 200
        assert node.fetch_node_id() == f"standin-{node.index}"
    state = json.loads(standin_devnet.state_path.read_text())
    assert [entry["pid"] for entry in state["nodes"]] == [node.pid for node in standin_devnet.nodes]
    for entry in state["nodes"]:
        assert read_cmdline(entry["pid"]) == entry["argv"]

    pids = [node.pid for node in standin_devnet.nodes]
    codes = standin_devnet.stop(timeout=5)

    assert codes == {0: -signal.SIGTERM, 1: -signal.SIGTERM, 2: -signal.SIGTERM}
    assert not standin_devnet.state_path.exists()
    assert all(read_cmdline(pid) is None for pid in pids)
    assert standin_devnet.stop() == codes


def test_devnet_context_manager_stops(tmp_path, block):
    with HttpServerDevnet(2, tmp_path / "net", first_address=block.first_address, api_port=block.api_port, peer_port=block.peer_port, ready_timeout=15) as devnet:
        assert all(node.is_running() for node in devnet.nodes)
    assert not any(node.is_running() for node in devnet.nodes)
    assert devnet.exit_codes == {0: -signal.SIGTERM, 1: -signal.SIGTERM}


def test_freeze_stops_responses_until_thaw(standin_devnet):
    standin_devnet.start()
    node = standin_devnet.nodes[1]

    node.freeze()
    with pytest.raises(OSError):
        http_status(node.api_url + "/status/health", timeout=0.5)
    node.thaw()
    assert http_status(node.api_url + "/status/health") == 200


def test_stop_of_frozen_node_is_graceful(standin_devnet):
    standin_devnet.start()
    node = standin_devnet.nodes[2]
    node.freeze()

    assert node.stop(timeout=5) == -signal.SIGTERM


def test_stop_escalates_to_sigkill(tmp_path, block):
    node = SigtermIgnoringNode(0, block.first_address, block.api_port, block.first_address, block.peer_port, tmp_path / "node-0")
    node.start()
    try:
        node.wait_ready(15)
        started = time.monotonic()
        code = node.stop(timeout=0.5)
    finally:
        node.kill()

    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_restart_gives_new_process(standin_devnet):
    standin_devnet.start()
    node = standin_devnet.nodes[0]
    old_pid = node.pid

    assert node.restart(timeout=5) == -signal.SIGTERM
    node.wait_ready(15)
    assert node.pid != old_pid
    assert http_status(node.api_url + "/status/health") == 200
    state = json.loads(standin_devnet.state_path.read_text())
    assert state["nodes"][0]["pid"] == node.pid


def test_add_node_recorded_in_state(standin_devnet):
    standin_devnet.start()

    added = standin_devnet.add_node()

    assert http_status(added.api_url + "/status/health") == 200
    state = json.loads(standin_devnet.state_path.read_text())
    assert [entry["pid"] for entry in state["nodes"]] == [node.pid for node in standin_devnet.nodes]


def test_kill_returns_sigkill_code(standin_devnet):
    standin_devnet.start()

    assert standin_devnet.nodes[1].kill() == -signal.SIGKILL
    assert standin_devnet.stop(timeout=5)[1] == -signal.SIGKILL


def test_wait_ready_reports_early_exit(tmp_path, block):
    node = CrashingNode(0, block.first_address, block.api_port, block.first_address, block.peer_port, tmp_path / "node-0")
    node.start()

    with pytest.raises(NodeNotReadyError) as error:
        node.wait_ready(15)
    assert "exited with code 3" in str(error.value)
    assert "standin crashed on purpose" in error.value.log_tail


def test_wait_ready_times_out(tmp_path, block):
    node = SilentNode(0, block.first_address, block.api_port, block.first_address, block.peer_port, tmp_path / "node-0")
    node.start()
    try:
        started = time.monotonic()
        with pytest.raises(NodeNotReadyError) as error:
            node.wait_ready(1.0)
        assert "did not respond" in str(error.value)
        assert time.monotonic() - started < 5
    finally:
        node.kill()


def test_failed_start_stops_started_nodes(tmp_path, block):
    class HalfCrashingNode(HttpServerNode):
        def command(self, extra_args=()):
            if self.index == 2:
                return CrashingNode.command(self, extra_args)
            return super().command(extra_args)

    class HalfCrashingDevnet(Devnet):
        node_class = HalfCrashingNode

    devnet = HalfCrashingDevnet(3, tmp_path / "net", first_address=block.first_address, api_port=block.api_port, peer_port=block.peer_port, ready_timeout=15)
    with pytest.raises(NodeNotReadyError):
        devnet.start()

    assert not any(node.is_running() for node in devnet.nodes)
    assert devnet.exit_codes[2] == 3
    assert not devnet.state_path.exists()


def test_second_devnet_in_same_dir_rejected(standin_devnet, block):
    standin_devnet.start()
    other = HttpServerDevnet(1, standin_devnet.base_dir, first_address=node_address(block.first_address, 3), api_port=block.api_port, peer_port=block.peer_port)

    with pytest.raises(DevnetRunningError):
        other.start()
    assert all(node.is_running() for node in standin_devnet.nodes)


def test_stale_state_file_replaced(standin_devnet):
    standin_devnet.base_dir.mkdir(parents=True)
    stale = {"schema_version": 1, "controller": None, "nodes": [{"index": 0, "pid": 999999999, "argv": ["gone"]}]}
    standin_devnet.state_path.write_text(json.dumps(stale))

    standin_devnet.start()

    state = json.loads(standin_devnet.state_path.read_text())
    assert state["nodes"][0]["pid"] == standin_devnet.nodes[0].pid


# --- stopping from another process ------------------------------------------------------


def test_stop_from_state_stops_nodes(standin_devnet):
    standin_devnet.start()
    pids = [node.pid for node in standin_devnet.nodes]

    outcome = stop_from_state(standin_devnet.base_dir, timeout=5)

    assert outcome == {0: "stopped", 1: "stopped", 2: "stopped"}
    assert all(read_cmdline(pid) is None for pid in pids)
    assert not standin_devnet.state_path.exists()
    assert standin_devnet.stop(timeout=5) == {0: -signal.SIGTERM, 1: -signal.SIGTERM, 2: -signal.SIGTERM}


def test_stop_from_state_spares_reused_pid(tmp_path):
    # A live process whose command line differs from the recorded one must not be signalled.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Right after the exec, /proc/<pid>/cmdline can still read empty for a moment.
        deadline = time.monotonic() + 5
        while read_cmdline(bystander.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_matches(bystander.pid, bystander.args)
        state = {
            "schema_version": 1,
            "controller": {"pid": bystander.pid, "argv": ["python", "-m", "voxanode.devnet", "start"]},
            "nodes": [{"index": 0, "pid": bystander.pid, "argv": [sys.executable, "-m", "voxanode", "--data-dir", str(tmp_path)]}],
        }
        (tmp_path / "devnet.json").write_text(json.dumps(state))

        outcome = stop_from_state(tmp_path, timeout=1)

        assert outcome == {0: "not running"}
        assert bystander.poll() is None
        assert process_matches(bystander.pid, bystander.args)
        assert not (tmp_path / "devnet.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_cli_status_and_stop_standins(standin_devnet):
    standin_devnet.start()
    pids = [node.pid for node in standin_devnet.nodes]
    script = REPO_ROOT / "scripts" / "devnet"
    env = {**os.environ, "PYTHON": sys.executable}

    status = subprocess.run([str(script), "status", "--dir", str(standin_devnet.base_dir)], capture_output=True, text=True, env=env, timeout=30)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("running") == 3
    assert status.stdout.count("healthy") == 3

    stop = subprocess.run([str(script), "stop", "--dir", str(standin_devnet.base_dir), "--timeout", "5"], capture_output=True, text=True, env=env, timeout=30)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.count("stopped") == 3
    assert all(read_cmdline(pid) is None for pid in pids)

    after = subprocess.run([str(script), "status", "--dir", str(standin_devnet.base_dir)], capture_output=True, text=True, env=env, timeout=30)
    assert after.returncode == 2
    assert "no devnet state file" in after.stderr
