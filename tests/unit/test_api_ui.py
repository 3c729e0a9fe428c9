"""The dashboard routes and the websocket `access_token`, on a real aiohttp server.

The node runs without --dev, so each case shows which requests pass without a
token: the dashboard's page and files, and websocket upgrades whose query string
carries a token, but no plain request with a token in its query string.
"""

from pathlib import Path

import aiohttp
import pytest

from test_api_fakes import FakeNode, serve_api  # noqa: F401 - fixtures are used by name
from voxanode.api.routes.ui import UI_ASSETS, UI_DIR
from voxanode.events import EventBus
from voxanode.tokens import Scope, create_token, token_file_path

WAIT_SECONDS = 5.0


class SecuredNode(FakeNode):
    """The fake API node without --dev, with a real event bus for the websocket."""

    def __init__(self, data_dir: Path):
        super().__init__(data_dir, dev=False)
        self.events = EventBus(self.node_id)


@pytest.fixture
def secured_node(tmp_path: Path) -> SecuredNode:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return SecuredNode(data_dir)


@pytest.fixture
def read_token(secured_node: SecuredNode) -> str:
    token, _ = create_token(token_file_path(secured_node.settings.data_dir), "reader", Scope.READ)
    return token


async def test_dashboard_page_open_without_token(serve_api, secured_node):
    client = await serve_api(secured_node)

    async with client.get("/ui/") as response:
        html = await response.text()
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert html == (UI_DIR / "index.html").read_text(encoding="utf-8")

    async with client.head("/ui/") as response:
        assert response.status == 200


async def test_dashboard_redirects_without_slash(serve_api, secured_node):
    client = await serve_api(secured_node)

    async with client.get("/ui", allow_redirects=False) as response:
        assert response.status == 301
        assert response.headers["Location"] == "/ui/"
        assert response.headers["X-Request-ID"].startswith("req-")


@pytest.mark.parametrize("name", sorted(UI_ASSETS))
async def test_dashboard_assets_open_and_cached(serve_api, secured_node, name):
    client = await serve_api(secured_node)

    async with client.get(f"/ui/static/{name}") as response:
        body = await response.read()
        assert response.status == 200
        assert response.content_type == UI_ASSETS[name]
        etag = response.headers["ETag"]
    assert body == (UI_DIR / name).read_bytes()

    async with client.get(f"/ui/static/{name}", headers={"If-None-Match": etag}) as response:
        assert response.status == 304


@pytest.mark.parametrize("name", ["index.html", "..%2Fui.py", "dashboard.js.map"])
async def test_dashboard_asset_unknown_name_404(serve_api, secured_node, name):
    client = await serve_api(secured_node)

    async with client.get(f"/ui/static/{name}") as response:
        body = await response.json()

    assert response.status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert body["error"]["details"]["available"] == sorted(UI_ASSETS)


async def test_dashboard_post_needs_token(serve_api, secured_node):
    client = await serve_api(secured_node)

    async with client.post("/ui/") as response:
        assert response.status == 401


async def test_websocket_accepts_access_token(serve_api, secured_node, read_token):
    client = await serve_api(secured_node)

    async with client.ws_connect(
        f"/ws/network/events?access_token={read_token}", timeout=aiohttp.ClientWSTimeout(ws_close=WAIT_SECONDS)
    ) as websocket:
        assert not websocket.closed


@pytest.mark.parametrize("query", ["", "?access_token=voxa_" + "A" * 43, "?access_token=malformed"])
async def test_websocket_without_valid_token_401(serve_api, secured_node, query):
    client = await serve_api(secured_node)

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/ws/network/events{query}")

    assert refused.value.status == 401


async def test_access_token_ignored_without_upgrade(serve_api, secured_node, read_token):
    client = await serve_api(secured_node)

    async with client.get(f"/status/system?access_token={read_token}") as response:
        body = await response.json()

    assert response.status == 401
    assert body["error"]["code"] == "AUTHENTICATION_REQUIRED"
