"""Unit tests of voxanode.logs: line format, node id, levels of library loggers."""

import asyncio
import json
import logging
import os
import re
import sys

import pytest
from aiohttp import web

from voxanode.logs import configure_logging, set_log_level, set_node_id

TIMESTAMP_PATTERN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
WATCHED_LOGGERS = ("kademlia", "rpcudp", "aiohttp.access", "urllib3")


@pytest.fixture(autouse=True)
def restore_logging():
    """Put back the root handlers and every level that configure_logging changes."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    root_level = root.level
    levels = {name: logging.getLogger(name).level for name in WATCHED_LOGGERS}
    server_filters = list(logging.getLogger("aiohttp.server").filters)
    yield
    logging.getLogger("aiohttp.server").filters[:] = server_filters
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(root_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    set_node_id(None)


def expected_line(level: str, name: str, node: str, message: str) -> re.Pattern:
    fields = [level, name, "node=" + node, message]
    return re.compile(TIMESTAMP_PATTERN + " " + " ".join(re.escape(text) for text in fields))


def test_configure_logging_line_format(capsys):
    configure_logging("info")

    logging.getLogger("voxanode.test").info("stored key=%s size=%d", "ab12", 5)

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    expected = expected_line("INFO", "voxanode.test", "-", "stored key=ab12 size=5")
    assert expected.fullmatch(lines[0])


def test_set_node_id_tags_later_lines(capsys):
    configure_logging("INFO")
    set_node_id("node-1a2b3c4d5e6f")

    logging.getLogger("voxanode.test").warning("peer suspect")

    line = capsys.readouterr().err.splitlines()[0]
    expected = expected_line("WARNING", "voxanode.test", "node-1a2b3c4d5e6f", "peer suspect")
    assert expected.fullmatch(line)


def test_configure_logging_takes_node_id(capsys):
    configure_logging("DEBUG", node_id="node-000000000001")

    logging.getLogger("voxanode.test").debug("tick")

    assert "node=node-000000000001 tick" in capsys.readouterr().err


def test_record_node_id_wins_over_process_node_id(capsys):
    configure_logging("INFO", node_id="node-aaaaaaaaaaaa")

    logging.getLogger("voxanode.test").info("other", extra={"node_id": "node-bbbbbbbbbbbb"})

    assert "node=node-bbbbbbbbbbbb other" in capsys.readouterr().err


def test_configure_logging_level_filters(capsys):
    configure_logging("warning")

    logging.getLogger("voxanode.test").info("hidden")
    logging.getLogger("voxanode.test").error("shown")

    output = capsys.readouterr().err
    assert "hidden" not in output
    assert "shown" in output


def test_configure_logging_twice_writes_each_line_once(capsys):
    configure_logging("INFO")
    configure_logging("INFO")

    logging.getLogger("voxanode.test").info("once")

    assert capsys.readouterr().err.count("once") == 1


@pytest.mark.parametrize(
    ("level", "library_level"),
    [("DEBUG", logging.NOTSET), ("INFO", logging.WARNING), ("ERROR", logging.WARNING)],
)
def test_configure_logging_quiets_libraries(level, library_level):
    configure_logging(level)

    assert logging.getLogger("kademlia").level == library_level
    assert logging.getLogger("rpcudp").level == library_level
    assert logging.getLogger("aiohttp.access").level == logging.WARNING
    assert logging.getLogger("urllib3").level == logging.WARNING


def test_library_info_hidden_unless_debug(capsys):
    configure_logging("INFO")
    logging.getLogger("kademlia.network").info("per-rpc chatter")
    assert "per-rpc chatter" not in capsys.readouterr().err

    configure_logging("DEBUG")
    logging.getLogger("kademlia.network").info("per-rpc chatter")
    assert "per-rpc chatter" in capsys.readouterr().err


def test_configure_logging_rejects_unknown_level():
    with pytest.raises(ValueError, match="log level must be one of DEBUG, INFO, WARNING, ERROR"):
        configure_logging("verbose")


def test_json_format_one_object_per_line(capsys):
    configure_logging("INFO", node_id="node-0123456789ab", log_format="json")
    logging.getLogger("voxanode.test").info("stored key=%s", "k1")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("voxanode.test").exception("failed")
    lines = capsys.readouterr().err.splitlines()
    first = json.loads(lines[0])
    assert first["message"] == "stored key=k1"
    assert first["node_id"] == "node-0123456789ab"
    assert first["level"] == "INFO"
    assert first["logger"] == "voxanode.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    second = json.loads(lines[1])
    assert "ValueError: boom" in second["exception"]
    assert len(lines) == 2


def test_plain_format_journal_without_time(capfd, monkeypatch):
    status = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    configure_logging("INFO", node_id="node-0123456789ab")
    logging.getLogger("voxanode.test").info("hello")
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    configure_logging("INFO", node_id="node-0123456789ab")
    logging.getLogger("voxanode.test").info("again")
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == "INFO voxanode.test node=node-0123456789ab hello"
    assert expected_line("INFO", "voxanode.test", "node-0123456789ab", "again").fullmatch(lines[1])


def test_set_log_level_changes_the_level(capsys):
    configure_logging("INFO")
    set_log_level("debug")
    logging.getLogger("voxanode.test").debug("now visible")
    assert "now visible" in capsys.readouterr().err
    with pytest.raises(ValueError):
        set_log_level("LOUD")


def test_configure_logging_rejects_unknown_format():
    with pytest.raises(ValueError):
        configure_logging("INFO", log_format="xml")


async def send_raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_unparsable_request_logs_one_debug_line(capsys):
    async def fail(request: web.Request) -> web.Response:
        raise RuntimeError("handler fault")

    app = web.Application()
    app.router.add_get("/fail", fail)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    bad_header = b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"
    try:
        configure_logging("INFO")
        assert (await send_raw(port, bad_header)).startswith(b"HTTP/1.0 400 ")
        await asyncio.sleep(0.1)
        assert capsys.readouterr().err == ""

        configure_logging("DEBUG")
        await send_raw(port, bad_header)
        # aiohttp logs a bad method at DEBUG already, but with a traceback.
        await send_raw(port, b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "aiohttp.server" in line]
        assert "Traceback" not in err
        assert len(lines) == 2, lines
        assert expected_line(
            "DEBUG", "aiohttp.server", "-",
            "rejected a request that did not parse from 127.0.0.1: Invalid header token",
        ).fullmatch(lines[0])
        assert expected_line(
            "DEBUG", "aiohttp.server", "-",
            "rejected a request that did not parse from 127.0.0.1: Invalid method encountered",
        ).fullmatch(lines[1])

        # A fault of the server's own code keeps its level and traceback.
        configure_logging("INFO")
        assert b" 500 " in (await send_raw(port, b"GET /fail HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        await asyncio.sleep(0.1)
        err = capsys.readouterr().err
        assert "ERROR aiohttp.server" in err
        assert "RuntimeError: handler fault" in err
    finally:
        await runner.cleanup()
