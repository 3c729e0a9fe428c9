"""The service manager notices: datagrams on NOTIFY_SOCKET, and nothing without it."""

import socket

from voxanode.notify import ServiceNotifier


def receive(sock: socket.socket) -> list[str]:
    sock.settimeout(2)
    return sock.recv(4096).decode().split("\n")


def test_notices_reach_a_path_socket(tmp_path):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = ServiceNotifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        notifier.ready("serving")
        assert receive(sock) == ["READY=1", "STATUS=serving"]
        notifier.reloading()
        lines = receive(sock)
        assert lines[0] == "RELOADING=1"
        assert lines[1].startswith("MONOTONIC_USEC=")
        notifier.stopping()
        assert receive(sock)[0] == "STOPPING=1"


def test_notices_reach_an_abstract_socket(tmp_path):
    name = f"voxanode-notify-test-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert ServiceNotifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert receive(sock) == ["READY=1"]


def test_without_the_variable_nothing_is_sent():
    notifier = ServiceNotifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_notifier_missing_socket_logged_once(tmp_path, caplog):
    notifier = ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send("READY=1") is False
    assert notifier.send("STOPPING=1") is False
    warnings = [record for record in caplog.records if "cannot notify" in record.getMessage()]
    assert len(warnings) == 1


def test_notifier_rejects_relative_name(caplog):
    notifier = ServiceNotifier({"NOTIFY_SOCKET": "relative/path"})
    assert not notifier.enabled
    assert any("neither a path" in record.getMessage() for record in caplog.records)
