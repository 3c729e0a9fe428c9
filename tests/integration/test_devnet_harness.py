"""The devnet harness against real voxanode daemons: library, fixture and scripts/devnet."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import FAST_DAEMON_ARGS, api_get
from voxanode.devnet import allocate_free_block, read_cmdline, read_state, stop_from_state

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVNET_SCRIPT = REPO_ROOT / "scripts" / "devnet"
CLI_READY_TIMEOUT_SECONDS = 90.0
CLI_EXIT_TIMEOUT_SECONDS = 30.0
URL_PATTERN = re.compile(r"http://127\.\d+\.\d+\.\d+:\d+")


class OutputCollector:
    """Read a process's stdout lines on a thread, so the test can wait with a deadline."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, process: subprocess.Popen, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text():
                return True
            if process.poll() is not None:
                self._thread.join(timeout=5)
                return marker in self.text()
            time.sleep(0.1)
        return False

    def finish(self) -> str:
        self._thread.join(timeout=10)
        return self.text()


def start_cli_devnet(base_dir: Path, size: int) -> subprocess.Popen:
    block = allocate_free_block(size)
    daemon_args = [arg for arg in FAST_DAEMON_ARGS if arg != "--dev"]
    argv = [
        str(DEVNET_SCRIPT), "start",
        "-n", str(size),
        "--dir", str(base_dir),
        "--first-address", block.first_address,
        "--api-port", str(block.api_port),
        "--peer-port", str(block.peer_port),
        "--", *daemon_args,
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def cleanup_cli_devnet(process: subprocess.Popen, base_dir: Path) -> None:
    """Stop a CLI devnet that a failed test left running."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=CLI_EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if (base_dir / "devnet.json").exists():
        stop_from_state(base_dir, timeout=5)


def test_devnet_three_nodes_healthy_and_stop_cleanly(devnet_factory):
    devnet = devnet_factory(3)
    pids = [node.pid for node in devnet.nodes]

    for node in devnet.nodes:
        status, body, _ = api_get(node.api_url, "/status/health")
        assert status == 200, body
        assert "status" in body
    state = read_state(devnet.base_dir)
    assert [entry["pid"] for entry in state["nodes"]] == pids

    exit_codes = devnet.stop()

    assert exit_codes == {0: 0, 1: 0, 2: 0}
    assert not devnet.state_path.exists()
    assert all(read_cmdline(pid) is None for pid in pids)
    assert devnet.stop() == exit_codes


def test_devnet_nodes_keep_their_own_data_dirs(devnet_factory):
    devnet = devnet_factory(2)
    devnet.stop()

    for node in devnet.nodes:
        assert node.log_path.stat().st_size > 0
        assert node.data_dir == devnet.base_dir / f"node-{node.index}"
    assert {path.name for path in devnet.base_dir.iterdir()} == {"node-0", "node-1"}


def test_devnet_add_node_and_restart(devnet_factory):
    devnet = devnet_factory(2)

    added = devnet.add_node()
    assert added.bootstrap == [devnet.nodes[0].peer_address]
    assert api_get(added.api_url, "/status/health").status == 200

    old_pid = devnet.nodes[1].pid
    assert devnet.nodes[1].restart() == 0
    devnet.nodes[1].wait_ready(60)
    assert devnet.nodes[1].pid != old_pid
    assert api_get(devnet.nodes[1].api_url, "/status/health").status == 200

    assert devnet.stop() == {0: 0, 1: 0, 2: 0}


def test_devnet_cli_start_then_stop_command(tmp_path):
    base_dir = tmp_path / "cli-devnet"
    process = start_cli_devnet(base_dir, 2)
    output = OutputCollector(process)
    try:
        assert output.wait_for("devnet: ready", process, CLI_READY_TIMEOUT_SECONDS), output.text()
        urls = sorted(set(URL_PATTERN.findall(output.text())))
        assert len(urls) == 2, output.text()
        for url in urls:
            assert api_get(url, "/status/health").status == 200
        pids = [entry["pid"] for entry in read_state(base_dir)["nodes"]]

        status = subprocess.run([str(DEVNET_SCRIPT), "status", "--dir", str(base_dir)], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        stop = subprocess.run([str(DEVNET_SCRIPT), "stop", "--dir", str(base_dir)], capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stdout + stop.stderr

        process.wait(timeout=CLI_EXIT_TIMEOUT_SECONDS)
        text = output.finish()
        assert process.returncode == 0, text
        assert "node 0 exit code 0" in text
        assert "node 1 exit code 0" in text
        assert all(read_cmdline(pid) is None for pid in pids)
        assert not (base_dir / "devnet.json").exists()
    finally:
        cleanup_cli_devnet(process, base_dir)


def test_devnet_cli_stops_on_sigint(tmp_path):
    base_dir = tmp_path / "cli-devnet"
    process = start_cli_devnet(base_dir, 2)
    output = OutputCollector(process)
    try:
        assert output.wait_for("devnet: ready", process, CLI_READY_TIMEOUT_SECONDS), output.text()
        pids = [entry["pid"] for entry in read_state(base_dir)["nodes"]]

        process.send_signal(signal.SIGINT)
        process.wait(timeout=CLI_EXIT_TIMEOUT_SECONDS)

        text = output.finish()
        assert process.returncode == 0, text
        assert "SIGINT received" in text
        assert all(read_cmdline(pid) is None for pid in pids)
        assert not (base_dir / "devnet.json").exists()
    finally:
        cleanup_cli_devnet(process, base_dir)


def test_devnet_cli_stop_after_controller_killed(tmp_path):
    base_dir = tmp_path / "cli-devnet"
    process = start_cli_devnet(base_dir, 2)
    output = OutputCollector(process)
    try:
        assert output.wait_for("devnet: ready", process, CLI_READY_TIMEOUT_SECONDS), output.text()
        pids = [entry["pid"] for entry in read_state(base_dir)["nodes"]]

        # The nodes run in sessions of their own, so they outlive a killed `start`.
        process.kill()
        process.wait(timeout=CLI_EXIT_TIMEOUT_SECONDS)
        assert all(read_cmdline(pid) is not None for pid in pids)

        stop = subprocess.run([str(DEVNET_SCRIPT), "stop", "--dir", str(base_dir)], capture_output=True, text=True, timeout=60)

        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert stop.stdout.count("stopped") == 2, stop.stdout
        assert all(read_cmdline(pid) is None for pid in pids)
        assert not (base_dir / "devnet.json").exists()
    finally:
        cleanup_cli_devnet(process, base_dir)
