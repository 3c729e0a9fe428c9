"""The daemon as a service: readiness notices, graceful stop and reload on SIGHUP."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import FAST_DAEMON_ARGS, api_get, wait_for
from voxanode.devnet import allocate_free_block

NOTICE_TIMEOUT_SECONDS = 30
JOIN_SECONDS = 20


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, owned by the test."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float = NOTICE_TIMEOUT_SECONDS) -> dict[str, str]:
        """Wait for one notice and return its KEY=VALUE lines as a dict."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def close(self) -> None:
        self.sock.close()


def start_daemon(tmp_path: Path, host: str, port: int, *extra: str, env: dict | None = None):
    log = open(tmp_path / "node.log", "w")
    argv = [
        sys.executable, "-m", "voxanode", *FAST_DAEMON_ARGS,
        "--data-dir", str(tmp_path / "data"),
        "--api-host", host, "--api-port", str(port),
        "--peer-host", host, "--peer-port", str(port),
        *extra,
    ]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    log.close()
    return process


def stop_daemon(process: subprocess.Popen) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def test_notify_ready_then_stopping(tmp_path):
    block = allocate_free_block(1)
    host = block.first_address
    notify = NotifySocket(tmp_path / "notify.sock")
    process = start_daemon(tmp_path, host, block.api_port, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = notify.receive()
        assert ready.get("READY") == "1", ready
        # The API serves as soon as the node reports ready, without any retry.
        status, body, _ = api_get(f"http://{host}:{block.api_port}", "/status/health", timeout=2)
        assert status == 200, body
        assert "node-" in ready["STATUS"], ready

        process.send_signal(signal.SIGTERM)
        stopping = notify.receive()
        assert stopping.get("STOPPING") == "1", stopping
        assert process.wait(timeout=30) == 0
    finally:
        stop_daemon(process)
        notify.close()


def test_abstract_notify_socket_name(tmp_path):
    block = allocate_free_block(1)
    name = f"voxanode-test-{os.getpid()}-{block.api_port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    process = start_daemon(tmp_path, block.first_address, block.api_port, env={"NOTIFY_SOCKET": "@" + name})
    try:
        sock.settimeout(NOTICE_TIMEOUT_SECONDS)
        assert b"READY=1" in sock.recv(4096).split(b"\n")
    finally:
        assert stop_daemon(process) == 0
        sock.close()


def test_sigterm_completes_a_request_in_flight(devnet_factory):
    """A /test/connection waiting on a frozen peer still gets its reply after SIGTERM."""
    network = devnet_factory(2, extra_args=["--rpc-timeout-seconds", "3"])
    first, frozen = network.nodes
    assert wait_for(lambda: len(api_get(first.api_url, "/data/discover_nodes/").body["nodes"]) == 2, JOIN_SECONDS)
    frozen.freeze()
    replies = []
    request = threading.Thread(
        target=lambda: replies.append(api_get(first.api_url, "/test/connection", timeout=30))
    )
    started = time.monotonic()
    request.start()
    time.sleep(1.0)
    assert request.is_alive(), "the request ended before the stop signal"
    first.send_signal(signal.SIGTERM)
    request.join(timeout=30)
    frozen.thaw()

    assert replies, "no reply to the request in flight"
    status, body, _ = replies[0]
    assert status == 200, body
    assert body["peers"][0]["reachable"] is False
    assert time.monotonic() - started >= 3
    assert first.wait_exit(timeout=30) == 0


def write_json(path: Path, document) -> None:
    path.write_text(json.dumps(document))


def member_ids(node) -> set[str]:
    status, body, _ = api_get(node.api_url, "/data/discover_nodes/")
    assert status == 200, body
    return {entry["node_id"] for entry in body["nodes"] if entry["status"] == "online"}


def test_sighup_joins_new_bootstrap_peer(devnet_factory, tmp_path):
    peers_file = tmp_path / "bootstrap_peers.json"
    write_json(peers_file, [])
    lone = devnet_factory(1, extra_args=["--bootstrap-file", str(peers_file)]).nodes[0]
    other = devnet_factory(1).nodes[0]
    lone_id, other_id = lone.fetch_node_id(), other.fetch_node_id()
    time.sleep(2)
    assert member_ids(lone) == {lone_id}

    write_json(peers_file, [other.peer_address])
    lone.send_signal(signal.SIGHUP)

    assert wait_for(lambda: member_ids(lone) == {lone_id, other_id}, JOIN_SECONDS) is True
    assert wait_for(lambda: member_ids(other) == {lone_id, other_id}, JOIN_SECONDS) is True
    assert wait_for(lambda: "bootstrap peers now 1: added " + other.peer_address in lone.log_tail(200), 5)


def test_sighup_broken_file_keeps_settings(devnet_factory, tmp_path):
    settings_file = tmp_path / "settings.json"
    write_json(settings_file, {"log_level": "INFO"})
    node = devnet_factory(1, extra_args=["--config", str(settings_file)]).nodes[0]

    settings_file.write_text('{"log_level": "DEBUG",')
    node.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload rejected, the node keeps its running settings" in node.log_tail(200), 10)
    assert node.is_running()
    status, body, _ = api_get(node.api_url, "/status/health")
    assert status == 200, body
    assert " DEBUG " not in node.log_tail(200)

    write_json(settings_file, {"log_level": "DEBUG", "max_value_bytes": 2048})
    node.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "log_level changed from INFO to DEBUG" in node.log_tail(200), 10)
    tail = node.log_tail(200)
    assert "max_value_bytes changed" in tail
    assert "takes effect after a restart" in tail
    # The new level applies at once: the next request is logged at DEBUG.
    api_get(node.api_url, "/status/health")
    assert wait_for(lambda: " DEBUG " in node.log_tail(50), 10)


def test_sighup_before_start_does_not_kill_the_daemon(tmp_path):
    block = allocate_free_block(1)
    notify = NotifySocket(tmp_path / "notify.sock")
    process = start_daemon(tmp_path, block.first_address, block.api_port, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        # The daemon ignores SIGHUP from its first settings read until its handler is set.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and process.poll() is None:
            if "starting voxanode" in (tmp_path / "node.log").read_text():
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGHUP)
        assert notify.receive().get("READY") == "1"
        assert process.poll() is None
    finally:
        assert stop_daemon(process) == 0
        notify.close()


def test_sigterm_while_starting_skips_api(tmp_path):
    block = allocate_free_block(1)
    notify = NotifySocket(tmp_path / "notify.sock")
    process = start_daemon(tmp_path, block.first_address, block.api_port, env={"NOTIFY_SOCKET": str(notify.path)})
    log_path = tmp_path / "node.log"
    try:
        # The peer socket is bound before the late imports, which take a few hundred
        # milliseconds, and the API opens only after them.
        assert wait_for(lambda: "peer socket bound" in log_path.read_text(), 30, interval=0.005) is True
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        notices = []
        with contextlib.suppress(TimeoutError):
            while True:
                notices.append(notify.receive(timeout=0.1))
    finally:
        stop_daemon(process)
        notify.close()

    assert all(notice.get("READY") != "1" for notice in notices), notices
    log = log_path.read_text()
    signalled = log.index("received SIGTERM")
    assert "API listening" not in log[signalled:], log
    assert "node started" not in log[signalled:], log


@pytest.mark.parametrize("log_format", ["json", "plain"])
def test_log_format(tmp_path, log_format):
    block = allocate_free_block(1)
    notify = NotifySocket(tmp_path / "notify.sock")
    process = start_daemon(
        tmp_path, block.first_address, block.api_port, "--log-format", log_format,
        env={"NOTIFY_SOCKET": str(notify.path)},
    )
    try:
        notify.receive()
    finally:
        assert stop_daemon(process) == 0
        notify.close()
    lines = (tmp_path / "node.log").read_text().splitlines()
    assert any("node started" in line for line in lines), lines
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert {"time", "level", "logger", "node_id", "message"} <= set(entries[-1])
        assert all(entry["node_id"].startswith("node-") for entry in entries[1:])
    else:
        assert all(" node=" in line for line in lines)


def test_sighup_applies_new_rate_limits(devnet_factory, tmp_path):
    settings_file = tmp_path / "settings.json"
    write_json(settings_file, {"rate_limit_data": "1000/minute"})
    node = devnet_factory(1, fast=False, extra_args=["--config", str(settings_file)]).nodes[0]

    def data_limit() -> str:
        status, body, headers = api_get(node.api_url, "/data/retrieve/", key="absent")
        assert status == 404, body
        return headers["X-RateLimit-Limit"]

    assert data_limit() == "1000"
    write_json(settings_file, {"rate_limit_data": "5/minute"})
    node.send_signal(signal.SIGHUP)
    assert wait_for(lambda: data_limit() == "5", 10) is True
    tail = node.log_tail(100)
    assert "rate_limit_data changed from 1000/minute to 5/minute" in tail
    assert "token file" in tail
    assert "active tokens" in tail
