"""API rate limits over a real aiohttp server on loopback, and the rate limit settings.

The test app is built like `create_app` builds the API: the real route groups for a
FakeNode, the request id, statistics and error middleware, and the rate limit
middleware inside it. Clients connect from chosen 127.x source
addresses, so each address has its own budget.
"""

import asyncio
import base64
import logging
import math
import os
import time
from pathlib import Path

import aiohttp
import limits
import psutil
import pytest
from aiohttp import web

from test_api_fakes import FakeNode
from voxanode.api.keys import NODE_KEY, PROCESS_KEY, STATS_KEY
from voxanode.api.middlewares import build_api_middleware
from voxanode.api.ratelimit import (
    RATE_LIMITER_KEY,
    ApiRateLimiter,
    RateLimitCategory,
    client_address,
    count_request,
    setup_rate_limits,
)
from voxanode.api.routes import apps, connectivity, data, events, info, internal, nodes, status
from voxanode.api.stats import RequestStats
from voxanode.daemon import build_parser
from voxanode.events import EventBus
from voxanode.settings import (
    NetworkListRule,
    RateLimitRule,
    SettingsError,
    format_rate_limit,
    load_settings,
)

CLIENT_ADDRESS = "127.0.0.1"
OTHER_CLIENT_ADDRESS = "127.0.0.77"
CLIENT_ADDRESS_PATH = "/test/client_address"
# Small budgets, so each test drives its category past the limit in a few requests.
TEST_LIMITS = {
    "rate_limit_default": limits.parse("5/minute"),
    "rate_limit_data": limits.parse("8/minute"),
    "rate_limit_deployments": limits.parse("2/minute"),
    "rate_limit_status": None,
}
EXPIRY_WAIT_SECONDS = 3.0
MEMORY_TEST_CLIENTS = 2000


class LimitedNode(FakeNode):
    """The fake API node with a real event bus, for the websocket route."""

    def __init__(self, data_dir: Path, **settings):
        super().__init__(data_dir, **{**TEST_LIMITS, **settings})
        self.events = EventBus(self.node_id)


def build_app(node: FakeNode, *, with_setup: bool = True) -> web.Application:
    """Build the API app for `node` with the rate limit middleware in its place."""
    app = web.Application(
        middlewares=(build_api_middleware((count_request,)),),
        client_max_size=node.settings.max_body_bytes,
    )
    app[NODE_KEY] = node
    app[STATS_KEY] = RequestStats()
    app[PROCESS_KEY] = psutil.Process()
    for route_group in (data, nodes, status, info, connectivity, events, apps, internal):
        route_group.add_routes(app)
    app.router.add_get(CLIENT_ADDRESS_PATH, echo_client_address)
    if with_setup:
        setup_rate_limits(app, node.settings)
    return app


async def echo_client_address(request: web.Request) -> web.Response:
    trusted = request.app[RATE_LIMITER_KEY].trusted_proxies
    return web.json_response({"client": client_address(request, trusted)})


class LimitedServer:
    """A served test app and its client sessions, one per source address."""

    def __init__(self, runner: web.AppRunner):
        self.runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def client(self, source_address: str = CLIENT_ADDRESS) -> aiohttp.ClientSession:
        """Return a session whose connections come from `source_address`."""
        if source_address not in self._sessions:
            connector = aiohttp.TCPConnector(local_addr=(source_address, 0))
            self._sessions[source_address] = aiohttp.ClientSession(
                base_url=self.url, connector=connector
            )
        return self._sessions[source_address]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        await self.runner.cleanup()


@pytest.fixture
async def serve_limited():
    """Serve `build_app(node)` on 127.0.0.1 and return a LimitedServer."""
    servers: list[LimitedServer] = []

    async def serve(node: FakeNode, *, with_setup: bool = True) -> LimitedServer:
        runner = web.AppRunner(build_app(node, with_setup=with_setup), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, CLIENT_ADDRESS, 0).start()
        server = LimitedServer(runner)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        await server.close()


@pytest.fixture
async def server(serve_limited, tmp_path: Path) -> LimitedServer:
    return await serve_limited(LimitedNode(tmp_path / "data"))


def rate_headers(response: aiohttp.ClientResponse) -> tuple[int, int, int]:
    """Return the X-RateLimit Limit, Remaining and Reset values of a response."""
    headers = response.headers
    return (
        int(headers["X-RateLimit-Limit"]),
        int(headers["X-RateLimit-Remaining"]),
        int(headers["X-RateLimit-Reset"]),
    )


def has_rate_headers(response: aiohttp.ClientResponse) -> bool:
    names = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
    return any(name in response.headers for name in names)


async def get_status_and_headers(session: aiohttp.ClientSession, path: str):
    async with session.get(path) as response:
        await response.read()
        return response.status, response.headers


async def spend(session: aiohttp.ClientSession, path: str, count: int) -> list[int]:
    """GET `path` `count` times and return the X-RateLimit-Remaining values."""
    remaining = []
    for _ in range(count):
        async with session.get(path) as response:
            await response.read()
            remaining.append(rate_headers(response)[1])
    return remaining


# Counting and the 429


async def test_default_limit_counts_down_then_rejects(server):
    client = server.client()
    started = time.time()

    seen = []
    for _ in range(5):
        async with client.get("/info/version") as response:
            assert response.status == 200
            seen.append(rate_headers(response))
    finished = time.time()

    assert [limit for limit, _, _ in seen] == [5] * 5
    assert [remaining for _, remaining, _ in seen] == [4, 3, 2, 1, 0]
    resets = {reset for _, _, reset in seen}
    assert len(resets) == 1
    reset = resets.pop()
    # The window opens at the first request and the header rounds its end up.
    assert started < reset <= math.ceil(finished + 60)

    async with client.get("/info/version") as response:
        body = await response.json()
        assert response.status == 429
        assert rate_headers(response) == (5, 0, reset)
        retry_after = int(response.headers["Retry-After"])
        request_id = response.headers["X-Request-ID"]

    assert 1 <= retry_after <= 60
    assert body["success"] is False
    assert body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert body["error"]["details"] == {
        "category": "default",
        "limit": "5/minute",
        "retry_after_seconds": retry_after,
    }
    assert "5/minute" in body["error"]["message"]
    assert body["request_id"] == request_id


async def test_rejected_requests_stay_rejected(server):
    client = server.client()
    await spend(client, "/info/version", 5)

    for _ in range(3):
        async with client.get("/info/version") as response:
            assert response.status == 429
            assert rate_headers(response)[1] == 0


async def test_not_found_and_405_count_in_default(server):
    client = server.client()

    cases = [
        ("GET", "/no/such/route", 404, 4),
        ("GET", "/data/store/", 405, 3),
        ("GET", "/status/no-such-check", 404, 2),
        ("GET", "/apps/add_app/", 405, 1),
    ]
    for method, path, expected_status, expected_remaining in cases:
        async with client.request(method, path) as response:
            body = await response.json()
            assert response.status == expected_status, path
            assert body["success"] is False, path
            assert rate_headers(response)[:2] == (5, expected_remaining), path


async def test_data_budget_separate_from_default(server):
    client = server.client()
    await spend(client, "/info/version", 5)

    async with client.post("/data/store/", json={"key": "k1", "value": 1}) as response:
        assert response.status == 200
        assert rate_headers(response)[:2] == (8, 7)
    remaining = await spend(client, "/data/retrieve/?key=k1", 7)
    assert remaining == [6, 5, 4, 3, 2, 1, 0]

    async with client.get("/data/retrieve/?key=k1") as response:
        body = await response.json()
        assert response.status == 429
        assert body["error"]["details"]["category"] == "data"
        assert body["error"]["details"]["limit"] == "8/minute"


async def test_status_routes_never_limited(server):
    client = server.client()
    await spend(client, "/info/version", 5)

    for path in ["/status/health", "/status/system"] * 10:
        status, headers = await get_status_and_headers(client, path)
        assert status == 200, path
        assert "X-RateLimit-Limit" not in headers, path
        assert "Retry-After" not in headers, path


async def test_internal_routes_never_limited(server):
    client = server.client()

    for _ in range(12):
        async with client.post("/internal/sync/push", data=b"{}") as response:
            await response.read()
            assert response.status == 401
            assert not has_rate_headers(response)

    async with client.get("/info/version") as response:
        assert rate_headers(response)[:2] == (5, 4)


async def test_deployments_count_every_request(server):
    client = server.client()
    # The fake node runs no app controller, so each deployment fails with 503.
    for path, expected_remaining in [("/apps/add_app/", 1), ("/apps/add_app", 0)]:
        async with client.post(path, json={}) as response:
            await response.read()
            assert response.status == 503, path
            assert rate_headers(response)[:2] == (2, expected_remaining), path

    async with client.post("/apps/add_app/", json={}) as response:
        body = await response.json()
        assert response.status == 429
        assert body["error"]["details"]["category"] == "deployments"
        assert body["error"]["details"]["limit"] == "2/minute"

    async with client.get("/info/version") as response:
        assert rate_headers(response)[:2] == (5, 4)


async def test_websocket_response_carries_headers(server):
    client = server.client()
    await spend(client, "/info/version", 2)
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }

    async with client.get("/ws/network/events", headers=upgrade) as response:
        assert response.status == 101
        assert rate_headers(response)[:2] == (5, 2)
        assert response.headers["X-Request-ID"].startswith("req-")


async def test_other_client_address_has_own_budget(server):
    first = server.client(CLIENT_ADDRESS)
    second = server.client(OTHER_CLIENT_ADDRESS)
    await spend(first, "/info/version", 5)

    remaining = await spend(second, "/info/version", 5)

    assert remaining == [4, 3, 2, 1, 0]
    status, _ = await get_status_and_headers(first, "/info/version")
    assert status == 429
    status, _ = await get_status_and_headers(second, "/info/version")
    assert status == 429


async def test_window_resets_after_reset_time(serve_limited, tmp_path):
    node = LimitedNode(tmp_path / "data", rate_limit_default=limits.parse("2/second"))
    client = (await serve_limited(node)).client()
    await spend(client, "/info/version", 2)

    async with client.get("/info/version") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        reset = rate_headers(response)[2]

    await asyncio.sleep(max(0.0, reset - time.time()) + 0.05)
    async with client.get("/info/version") as response:
        assert response.status == 200
        assert rate_headers(response)[:2] == (2, 1)


async def test_unlimited_default_sends_no_headers(serve_limited, tmp_path):
    node = LimitedNode(tmp_path / "data", rate_limit_default=None)
    client = (await serve_limited(node)).client()

    for _ in range(12):
        status, headers = await get_status_and_headers(client, "/info/version")
        assert status == 200
        assert "X-RateLimit-Remaining" not in headers


async def test_middleware_without_setup_names_setup(serve_limited, tmp_path, caplog):
    node = LimitedNode(tmp_path / "data")
    client = (await serve_limited(node, with_setup=False)).client()

    with caplog.at_level(logging.ERROR, logger="voxanode.api.middlewares"):
        status, _ = await get_status_and_headers(client, "/info/version")

    assert status == 500
    assert "setup_rate_limits" in caplog.text


# Client addresses behind proxies


@pytest.mark.parametrize(
    "trusted, source, forwarded_for, expected",
    [
        ((), CLIENT_ADDRESS, ["203.0.113.9"], CLIENT_ADDRESS),
        (("127.0.0.1",), CLIENT_ADDRESS, [], CLIENT_ADDRESS),
        (("127.0.0.1",), CLIENT_ADDRESS, ["203.0.113.9"], "203.0.113.9"),
        (("127.0.0.0/8",), CLIENT_ADDRESS, ["198.51.100.1, 203.0.113.9, 127.0.0.5"], "203.0.113.9"),
        (("127.0.0.0/8", "10.0.0.0/8"), CLIENT_ADDRESS, ["127.0.0.9, 10.1.2.3"], "127.0.0.9"),
        (("127.0.0.1",), CLIENT_ADDRESS, ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),
        (("127.0.0.1",), CLIENT_ADDRESS, ["2001:db8::1"], "2001:db8::1"),
        (("127.0.0.1",), CLIENT_ADDRESS, ["::ffff:203.0.113.9"], "203.0.113.9"),
        (("127.0.0.1",), CLIENT_ADDRESS, ["203.0.113.9, not-an-address"], CLIENT_ADDRESS),
        (("127.0.0.1",), CLIENT_ADDRESS, ["203.0.113.9:8080"], CLIENT_ADDRESS),
        (("127.0.0.1",), CLIENT_ADDRESS, ["203.0.113.9,,198.51.100.1"], CLIENT_ADDRESS),
        (("127.0.0.1",), CLIENT_ADDRESS, [""], CLIENT_ADDRESS),
        (("10.0.0.0/8",), CLIENT_ADDRESS, ["203.0.113.9"], CLIENT_ADDRESS),
        (("127.0.0.1",), OTHER_CLIENT_ADDRESS, ["203.0.113.9"], OTHER_CLIENT_ADDRESS),
        (("::1",), CLIENT_ADDRESS, ["203.0.113.9"], CLIENT_ADDRESS),
    ],
)
async def test_client_address_cases(serve_limited, tmp_path, trusted, source, forwarded_for, expected):
    networks = NetworkListRule().parse(list(trusted), from_text=False)
    node = LimitedNode(tmp_path / "data", trusted_proxies=networks)
    client = (await serve_limited(node)).client(source)
    headers = [("X-Forwarded-For", value) for value in forwarded_for]

    async with client.get(CLIENT_ADDRESS_PATH, headers=headers) as response:
        body = await response.json()

    assert response.status == 200
    assert body["client"] == expected


async def test_forwarded_clients_have_own_budgets(serve_limited, tmp_path):
    networks = NetworkListRule().parse(["127.0.0.1"], from_text=False)
    node = LimitedNode(tmp_path / "data", trusted_proxies=networks)
    proxy = (await serve_limited(node)).client()
    first = {"X-Forwarded-For": "203.0.113.9"}
    second = {"X-Forwarded-For": "203.0.113.10"}

    for expected_remaining in [4, 3, 2, 1, 0]:
        async with proxy.get("/info/version", headers=first) as response:
            assert rate_headers(response)[1] == expected_remaining
    async with proxy.get("/info/version", headers=first) as response:
        body = await response.json()
        assert response.status == 429
        assert "203.0.113.9" in body["error"]["message"]

    async with proxy.get("/info/version", headers=second) as response:
        assert response.status == 200
        assert rate_headers(response)[1] == 4
    async with proxy.get("/info/version") as response:
        assert response.status == 200
        assert rate_headers(response)[1] == 4


# The limiter itself


def test_limiter_keeps_no_expired_windows():
    limiter = ApiRateLimiter({RateLimitCategory.DEFAULT: limits.parse("1/second")})
    for number in range(MEMORY_TEST_CLIENTS):
        limiter.hit(RateLimitCategory.DEFAULT, f"10.0.{number // 256}.{number % 256}")
    assert limiter.tracked_windows == MEMORY_TEST_CLIENTS

    time.sleep(1.1)
    # A hit schedules the storage's expiry sweep, which runs 10 ms later.
    limiter.hit(RateLimitCategory.DEFAULT, "10.1.0.1")
    deadline = time.monotonic() + EXPIRY_WAIT_SECONDS
    while limiter.tracked_windows > 1 and time.monotonic() < deadline:
        time.sleep(0.02)

    assert limiter.tracked_windows == 1


def test_limiter_rejects_hit_on_unlimited_category():
    limiter = ApiRateLimiter({RateLimitCategory.STATUS: None})

    with pytest.raises(ValueError, match="not limited"):
        limiter.hit(RateLimitCategory.STATUS, CLIENT_ADDRESS)


def test_limiter_from_settings_reads_every_category(tmp_path):
    node = LimitedNode(tmp_path)

    limiter = ApiRateLimiter.from_settings(node.settings)

    assert limiter.limit_for(RateLimitCategory.DEFAULT) == limits.parse("5/minute")
    assert limiter.limit_for(RateLimitCategory.DATA) == limits.parse("8/minute")
    assert limiter.limit_for(RateLimitCategory.DEPLOYMENTS) == limits.parse("2/minute")
    assert limiter.limit_for(RateLimitCategory.STATUS) is None
    assert limiter.trusted_proxies == ()


# Settings


@pytest.mark.parametrize(
    "raw, from_text, expected",
    [
        ("100/minute", True, limits.parse("100/minute")),
        ("10 per hour", True, limits.parse("10/hour")),
        (" 7/Second ", True, limits.parse("7/second")),
        ("3/5seconds", True, limits.parse("3/5 seconds")),
        ("unlimited", True, None),
        ("UNLIMITED", False, None),
        ("0", True, None),
        (0, False, None),
    ],
)
def test_rate_limit_rule_accepts(raw, from_text, expected):
    assert RateLimitRule().parse(raw, from_text) == expected


@pytest.mark.parametrize(
    "raw, message_part",
    [
        ("", "must be a rate limit"),
        ("lots", "must be a rate limit"),
        ("100/fortnight", "second, minute, hour"),
        ("0/minute", "at least 1 request"),
        ("5/0seconds", "at least 1 request"),
        ("1/second;5/minute", "not a list"),
        (100, "rate limit string"),
        (None, "rate limit string"),
        (False, "rate limit string"),
    ],
)
def test_rate_limit_rule_rejects(raw, message_part):
    with pytest.raises(ValueError) as raised:
        RateLimitRule().parse(raw, from_text=isinstance(raw, str))

    assert message_part in str(raised.value)


@pytest.mark.parametrize("text", ["100/minute", "10/hour", "3/5 seconds", "1/day", "unlimited"])
def test_format_rate_limit_round_trips(text):
    parsed = RateLimitRule().parse(text, from_text=True)

    assert format_rate_limit(parsed) == text


def test_network_list_rule_parses_addresses_and_networks():
    from_text = NetworkListRule().parse("10.0.0.0/8, 192.0.2.7,2001:db8::/32", from_text=True)
    from_file = NetworkListRule().parse(["10.0.0.0/8", "10.0.0.0/8"], from_text=False)

    assert [str(network) for network in from_text] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    assert [str(network) for network in from_file] == ["10.0.0.0/8"]


@pytest.mark.parametrize(
    "raw, message_part",
    [
        ("10.0.0.1/8", "host bits set"),
        ("proxy.example", "must be an IP address or CIDR network"),
        ([5], "must be an IP address or CIDR network string"),
        (5, "JSON list"),
    ],
)
def test_network_list_rule_rejects(raw, message_part):
    with pytest.raises(ValueError) as raised:
        NetworkListRule().parse(raw, from_text=isinstance(raw, str))

    assert message_part in str(raised.value)


def test_invalid_rate_limit_flag_names_setting(tmp_path):
    with pytest.raises(SettingsError) as raised:
        load_settings({"rate_limit_data": "lots"}, {}, tmp_path)

    assert raised.value.setting == "rate_limit_data"
    assert str(raised.value).startswith(
        "invalid setting rate_limit_data=lots (from --rate-limit-data): must be a rate limit"
    )


def test_rate_limit_settings_from_environment(tmp_path):
    environ = {
        "VOXA_RATE_LIMIT_STATUS": "50/second",
        "VOXA_RATE_LIMIT_DEFAULT": "unlimited",
        "VOXA_TRUSTED_PROXIES": "127.0.0.1,10.0.0.0/8",
    }

    settings = load_settings({}, environ, tmp_path)

    assert settings.rate_limit_status == limits.parse("50/second")
    assert settings.rate_limit_default is None
    assert [str(network) for network in settings.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert settings.source_of("rate_limit_status") == "VOXA_RATE_LIMIT_STATUS"


def test_later_rate_limit_flag_wins(tmp_path):
    arguments = ["--rate-limit-default", "100000/minute", "--rate-limit-default", "5/minute"]

    namespace = build_parser().parse_args(arguments)
    settings = load_settings(vars(namespace), {}, tmp_path)

    assert settings.rate_limit_default == limits.parse("5/minute")


def test_rate_limit_defaults_match_api_contract(tmp_path):
    settings = load_settings({}, {}, tmp_path)

    assert format_rate_limit(settings.rate_limit_default) == "100/minute"
    assert format_rate_limit(settings.rate_limit_deployments) == "10/hour"
    assert format_rate_limit(settings.rate_limit_data) == "1000/minute"
    assert settings.rate_limit_status is None
    assert settings.trusted_proxies == ()
