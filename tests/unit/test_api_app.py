"""Starting the API server: the bound address in the log, and bind failures."""

import errno
import logging
import socket

import aiohttp
import pytest

from test_api_fakes import FakeNode
from voxanode.api.app import start_api
from voxanode.api.timestamps import isoformat_utc


async def test_start_api_logs_bound_port(tmp_path, caplog):
    node = FakeNode(tmp_path)
    with caplog.at_level(logging.INFO, logger="voxanode.api.app"):
        runner = await start_api(node)
    try:
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1"
        assert port != 0

        lines = [record.getMessage() for record in caplog.records]
        assert f"API listening on http://127.0.0.1:{port}" in lines

        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/status/health") as response:
                assert response.status == 200
    finally:
        await runner.cleanup()


async def test_start_api_port_in_use(tmp_path):
    settings_module = pytest.importorskip("voxanode.settings")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = FakeNode(tmp_path, api_port=port)

        with pytest.raises(settings_module.BindError) as raised:
            await start_api(node)

    error = raised.value
    assert error.setting == "api_port"
    assert error.host == "127.0.0.1"
    assert error.port == port
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ((0,), "1970-01-01T00:00:00Z"),
        ((1750593600.999,), "2025-06-22T12:00:00Z"),
        ((), None),
    ],
)
def test_isoformat_utc_seconds(arguments, expected):
    text = isoformat_utc(*arguments)
    if expected is not None:
        assert text == expected
    assert len(text) == 20
    assert text.endswith("Z")


def test_isoformat_utc_milliseconds():
    assert isoformat_utc(milliseconds=1750593600999) == "2025-06-22T12:00:00Z"


def test_isoformat_utc_rejects_both():
    with pytest.raises(TypeError):
        isoformat_utc(1.0, milliseconds=1000)
