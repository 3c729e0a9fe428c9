"""Signed HTTP calls from this node to other nodes' `/internal/` routes.

Every call is signed with the node key (`voxanode.api.internal_auth`) and goes to the
API address the target announced in membership gossip. Failures come back as
`PeerCallError` with the target and the reason, never as a bare aiohttp exception.
"""

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from voxanode.api.internal_auth import sign_request
from voxanode.identity import Identity
from voxanode.settings import format_peer_address

logger = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT_SECONDS = 10.0
MAX_STREAM_LINE_BYTES = 1024 * 1024


class PeerCallError(Exception):
    """A node-to-node call that got no usable response.

    `status` is the HTTP status when the peer replied, else None. `body` is its JSON
    reply when it had one.
    """

    def __init__(self, node_id: str, reason: str, status: int | None = None, body: Any = None):
        super().__init__(f"call to node {node_id} failed: {reason}")
        self.node_id = node_id
        self.reason = reason
        self.status = status
        self.body = body


class PeerCalls:
    """One HTTP client session for all calls of this node to its peers."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=8),
                json_serialize=json.dumps,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _url(address: tuple[str, int], path_qs: str) -> str:
        return f"http://{format_peer_address(address[0], address[1])}{path_qs}"

    async def call(
        self,
        node_id: str,
        address: tuple[str, int],
        method: str,
        path_qs: str,
        payload: Any = None,
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT_SECONDS,
    ) -> tuple[int, Any]:
        """Send one signed request and return (status, JSON body).

        A reply with a JSON body is returned, whatever its status. No reply, or a
        reply that is not JSON, raises PeerCallError.
        """
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = sign_request(self.identity, method, path_qs, body)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                method,
                self._url(address, path_qs),
                data=body or None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                try:
                    answer = await response.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError) as error:
                    raise PeerCallError(
                        node_id, f"response is not JSON (HTTP {response.status})", response.status
                    ) from error
                return response.status, answer
        except PeerCallError:
            raise
        except TimeoutError as error:
            raise PeerCallError(node_id, f"no response within {timeout:g} s") from error
        except aiohttp.ClientError as error:
            raise PeerCallError(node_id, f"{type(error).__name__}: {error}") from error

    async def stream_lines(
        self, node_id: str, address: tuple[str, int], path_qs: str, *, connect_timeout: float = 10.0
    ) -> AsyncIterator[Any]:
        """Yield the JSON objects of a newline-delimited JSON response as they arrive."""
        headers = sign_request(self.identity, "GET", path_qs, b"")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=None)
        try:
            async with self._client().get(
                self._url(address, path_qs), headers=headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    raise PeerCallError(node_id, f"HTTP {response.status}: {text}", response.status)
                while True:
                    line = await response.content.readline()
                    if not line:
                        return
                    if len(line) > MAX_STREAM_LINE_BYTES:
                        continue
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        yield json.loads(line)
                    except ValueError:
                        logger.debug("skipping a malformed stream line from node=%s", node_id)
        except PeerCallError:
            raise
        except (aiohttp.ClientError, TimeoutError) as error:
            raise PeerCallError(node_id, f"{type(error).__name__}: {error}") from error
