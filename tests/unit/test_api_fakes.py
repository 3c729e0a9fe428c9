"""An in-process stand-in for the node, and a fixture serving the real API for it.

The API tests run real HTTP against `start_api`, bound to 127.0.0.1 on a free port.
`FakeNode` provides the node interface the API uses, with real Settings. Its data service keeps real
signed records in a dict and returns the data service's own result types, and tests
set which nodes acknowledge a store. This module contains no tests itself.
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from voxanode.api.app import start_api
from voxanode.dht.records import Record, now_millis, sign_record
from voxanode.dht.service import NoHoldersError, RetrieveResult, StoreResult
from voxanode.identity import Identity
from voxanode.peer.protocol import PeerStats
from voxanode.settings import Settings

# Small limits, so that the tests show the API reads them from the settings.
TEST_MAX_KEY_BYTES = 16
TEST_MAX_VALUE_BYTES = 1024
TEST_MAX_BODY_BYTES = 4096
TEST_MAX_TTL_SECONDS = 86400
TEST_DEFAULT_TTL_SECONDS = 600
TEST_DEFAULT_REPLICAS = 2
TEST_KSIZE = 5


@dataclass
class FakePingResult:
    node_id: str | None
    address: str
    reachable: bool
    rtt_ms: float | None


@dataclass
class FakeStorageStatus:
    ok: bool
    records: int
    detail: str


@dataclass
class StoreCall:
    key: str
    value_json: bytes
    ttl_seconds: int
    replicas: int


class FakeDataService:
    """Signs and keeps records in memory. `peer_ids` acknowledge stores in order.

    A store asking for more replicas than `peer_ids` has gets one "timed out" error
    per missing node. With no peer ids, a store raises NoHoldersError. When
    `store_exception` is set, store raises it.
    """

    def __init__(self, identity: Identity, peer_ids: list[str]):
        self.identity = identity
        self.peer_ids = peer_ids
        self.records: dict[str, Record] = {}
        self.store_calls: list[StoreCall] = []
        self.store_exception: Exception | None = None

    async def store(
        self, key: str, value_json: bytes, ttl_seconds: int, replicas: int
    ) -> StoreResult:
        self.store_calls.append(StoreCall(key, value_json, ttl_seconds, replicas))
        if self.store_exception is not None:
            raise self.store_exception

        holders = self.peer_ids[:replicas]
        errors = [
            f"node-{index:012x}: timed out"
            for index in range(replicas - len(holders))
        ]
        if not holders:
            raise NoHoldersError(replicas, errors)

        record = sign_record(self.identity, key, value_json, ttl_seconds, replicas)
        self.records[key] = record
        return StoreResult(
            key=key,
            holders=list(holders),
            created_ms=record.created_ms,
            expires_ms=record.expires_ms,
            requested=replicas,
            errors=errors,
        )

    async def retrieve(self, key: str) -> RetrieveResult | None:
        record = self.records.get(key)
        if record is None or record.is_expired(now_millis()):
            return None
        return RetrieveResult(
            record=record, holders=self.peer_ids[: record.replicas], repaired=[]
        )


class FakeNode:
    """The node interface of the API, with state that tests set directly.

    `settings` are the real Settings with the small test limits above; keyword
    arguments replace further fields.
    """

    def __init__(self, data_dir: Path, **settings: Any):
        test_settings = {
            "data_dir": data_dir,
            "api_host": "127.0.0.1",
            "api_port": 0,
            "max_value_bytes": TEST_MAX_VALUE_BYTES,
            "max_key_bytes": TEST_MAX_KEY_BYTES,
            "max_body_bytes": TEST_MAX_BODY_BYTES,
            "max_ttl_seconds": TEST_MAX_TTL_SECONDS,
            "default_ttl_seconds": TEST_DEFAULT_TTL_SECONDS,
            "default_replicas": TEST_DEFAULT_REPLICAS,
            "ksize": TEST_KSIZE,
            "dev": True,
        }
        self.settings = dataclasses.replace(Settings(), **{**test_settings, **settings})
        self.identity = Identity.generate()
        self.node_id = self.identity.node_id
        self.started_at = time.time()
        self.data = FakeDataService(self.identity, ["node-aaaaaaaaaaaa", "node-bbbbbbbbbbbb"])
        self.bootstrap_peers: tuple[tuple[str, int], ...] = ()
        self.connected_peers = 0
        self.pings: list[FakePingResult] = []
        self.storage = FakeStorageStatus(ok=True, records=0, detail="ok")
        self.ping_limits: list[int] = []

    def peer_stats(self) -> PeerStats:
        return PeerStats(
            connected_peers=self.connected_peers,
            total_connections=self.connected_peers + 1,
            bytes_sent=1000,
            bytes_received=2000,
            datagrams_sent=10,
            datagrams_received=20,
            datagrams_dropped={"bad_signature": 2},
            bytes_sent_by_method={"ping": 600, "find_node": 400},
        )

    async def ping_peers(self, limit: int = 3) -> list[FakePingResult]:
        self.ping_limits.append(limit)
        return self.pings[:limit]

    def storage_status(self) -> FakeStorageStatus:
        return self.storage


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path / "data")


@pytest.fixture
async def serve_api():
    """Start the API for a node and return a session whose base URL is the server."""
    runners = []
    sessions = []

    async def serve(node: FakeNode) -> aiohttp.ClientSession:
        runner = await start_api(node)
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        session = aiohttp.ClientSession(base_url=f"http://{host}:{port}")
        sessions.append(session)
        return session

    yield serve
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client(serve_api, node: FakeNode) -> aiohttp.ClientSession:
    return await serve_api(node)
