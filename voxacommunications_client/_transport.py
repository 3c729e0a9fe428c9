"""HTTP and websocket transport of the client: one aiohttp session, retries and error mapping.

`Transport` sends JSON requests to one node and returns the parsed JSON object of a
successful reply, or raises the VoxaError subclass of the failure. `MessageStream`
is an async iterator over the JSON text frames of a websocket route.

Retry rules (`is_retryable`): a GET, and a websocket handshake, is retried after a
connection error, a timeout, 429 and 503 SERVICE_UNAVAILABLE. Any other method is
retried only when the connection failed before the request was sent, or on 429,
because the rate limiter rejects a request before its handler runs. Nothing else is
retried, so a POST that may have reached its handler is never sent twice. The wait
before retry n (from 0) is the reply's Retry-After when it has one, else a random
time between half and all of min(max_backoff, backoff * 2**n).
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from voxacommunications_client.errors import (
    INVALID_RESPONSE,
    STREAM_CLOSED,
    ApiError,
    NetworkError,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    VoxaError,
    error_from_response,
)

# A Retry-After longer than this is not waited for. The error is raised at once, so
# no single wait of a call exceeds this.
MAX_RETRY_AFTER_SECONDS = 60.0
# The client pings an open websocket this often and drops it when no pong arrives
# within half of it, so a stream from a node that vanished does not hang forever.
WEBSOCKET_HEARTBEAT_SECONDS = 30.0
WEBSOCKET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
WEBSOCKET_NORMAL_CLOSE = 1000
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})
USER_AGENT = "voxacommunications-client"

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _AttemptFailed(Exception):
    """One attempt got no reply. `before_send` is True when the request was surely not sent."""

    def __init__(self, error: NetworkError, *, before_send: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.before_send = before_send


def is_retryable(method: str, error: VoxaError, *, before_send: bool = False) -> bool:
    """Return whether a request with `method` that failed with `error` may be sent again."""
    if isinstance(error, NetworkError):
        return before_send or method in IDEMPOTENT_METHODS
    if isinstance(error, RateLimited):
        return True
    if isinstance(error, ServiceUnavailable):
        return method in IDEMPOTENT_METHODS
    return False


def retry_delay(
    attempt: int,
    backoff: float,
    max_backoff: float,
    retry_after: float | None,
    rng: random.Random,
) -> float | None:
    """Return the seconds to wait before retry `attempt` (from 0), or None not to retry.

    Retry-After wins over the backoff, and one beyond MAX_RETRY_AFTER_SECONDS means
    no retry.
    """
    if retry_after is not None:
        return retry_after if retry_after <= MAX_RETRY_AFTER_SECONDS else None
    ceiling = min(max_backoff, backoff * 2**attempt)
    return rng.uniform(ceiling / 2, ceiling)


def normalize_base_url(url: str) -> str:
    """Check that `url` is an http or https URL with a host, and return it without a trailing /."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid node URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid node URL {url!r}: a query or fragment is not accepted")
    return url.rstrip("/")


class Transport:
    """Requests to one node over one aiohttp session, created on first use in the running loop.

    `timeout` (seconds) bounds each attempt: a whole HTTP request and reply, or a
    websocket handshake. `retries` is the number of attempts after the first.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0 seconds, got {backoff} and {max_backoff}")
        self.base_url = normalize_base_url(url)
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._rng = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise VoxaError("the client is closed. Create a new one")
        if self._session is None:
            # No session-wide timeout: each request sets its own, and a websocket that
            # follows a stream must stay open longer than any request.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        """Close the session and every connection and websocket on it. Safe to call twice."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def url_for(self, path: str) -> str:
        return self.base_url + path

    # -- requests -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
    ) -> dict[str, Any]:
        """Send one request, with retries, and return the reply's JSON object.

        `params` entries that are None are left out of the query string.
        """
        query = {name: str(value) for name, value in (params or {}).items() if value is not None}
        return await self._with_retries(method, path, lambda: self._send(method, path, query, json_body))

    async def _with_retries(self, method: str, path: str, attempt: Callable[[], Any]) -> Any:
        for number in range(self.retries + 1):
            try:
                return await attempt()
            except _AttemptFailed as failure:
                error: VoxaError = failure.error
                before_send = failure.before_send
            except (RateLimited, ServiceUnavailable) as reply_error:
                error, before_send = reply_error, False

            if number == self.retries or not is_retryable(method, error, before_send=before_send):
                raise error
            retry_after = getattr(error, "retry_after", None)
            delay = retry_delay(number, self.backoff, self.max_backoff, retry_after, self._rng)
            if delay is None:
                raise error
            logger.info(
                "retrying %s %s in %.1f s after %s (retry %d of %d) request_id=%s",
                method, path, delay, error.code, number + 1, self.retries, error.request_id,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(self, method: str, path: str, query: dict[str, str], json_body: Any) -> dict[str, Any]:
        """Send one attempt, and return the JSON object of a 2xx reply or raise its error."""
        session = self._open_session()
        url = self.url_for(path)
        description = f"{method} {path}"
        started = time.monotonic()
        try:
            async with session.request(
                method,
                url,
                params=query or None,
                json=json_body,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                text = await response.text(errors="replace")
                status, headers = response.status, response.headers
        except aiohttp.ClientConnectorError as exc:
            raise self._failure(_connect_error(self.base_url, url, exc), exc, True) from exc
        except TimeoutError as exc:
            # One total timeout covers connecting too, so the request may have been sent.
            message = f"{description} to {self.base_url} got no reply within {self.timeout:g} s"
            raise self._failure(RequestTimeout(message, url=url), exc, False) from exc
        except aiohttp.ClientError as exc:
            message = f"{description} to {self.base_url} failed: {type(exc).__name__}: {exc}"
            raise self._failure(NetworkError(message, url=url), exc, False) from exc

        request_id = headers.get("X-Request-ID")
        logger.debug(
            "%s -> %d request_id=%s in %.0f ms", description, status, request_id, (time.monotonic() - started) * 1000
        )
        body = _parse_json(text)
        if status >= 400:
            raise error_from_response(status, body, headers, description)
        if not isinstance(body, dict):
            raise ApiError(
                f"{description} returned HTTP {status} without a JSON object body",
                code=INVALID_RESPONSE,
                request_id=request_id,
                status=status,
            )
        return body

    @staticmethod
    def _failure(error: NetworkError, cause: BaseException, before_send: bool) -> _AttemptFailed:
        error.__cause__ = cause
        return _AttemptFailed(error, before_send=before_send)

    # -- websockets -----------------------------------------------------------------------

    def stream(
        self, path: str, params: Mapping[str, Any], parse: Callable[[dict[str, Any]], T]
    ) -> "MessageStream[T]":
        """Return a MessageStream over the websocket at `path`, which connects on first use."""
        query = {name: str(value) for name, value in params.items() if value is not None}
        return MessageStream(self, path, query, parse)

    async def connect_websocket(self, path: str, query: dict[str, str]) -> aiohttp.ClientWebSocketResponse:
        """Open the websocket at `path`, with the GET retry rules for the handshake."""
        return await self._with_retries("GET", path, lambda: self._handshake(path, query))

    async def _handshake(self, path: str, query: dict[str, str]) -> aiohttp.ClientWebSocketResponse:
        session = self._open_session()
        url = self.url_for(path)
        try:
            async with asyncio.timeout(self.timeout):
                websocket = await session.ws_connect(
                    url,
                    params=query or None,
                    headers=self._headers(),
                    heartbeat=WEBSOCKET_HEARTBEAT_SECONDS,
                    max_msg_size=WEBSOCKET_MAX_MESSAGE_BYTES,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise await self._refused_handshake_error(path, query, exc) from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._failure(_connect_error(self.base_url, url, exc), exc, True) from exc
        except TimeoutError as exc:
            message = f"websocket GET {path} to {self.base_url} got no reply within {self.timeout:g} s"
            raise self._failure(RequestTimeout(message, url=url), exc, False) from exc
        except aiohttp.ClientError as exc:
            message = f"websocket GET {path} to {self.base_url} failed: {type(exc).__name__}: {exc}"
            raise self._failure(NetworkError(message, url=url), exc, False) from exc
        logger.debug("websocket opened path=%s", path)
        return websocket


    async def _refused_handshake_error(
        self, path: str, query: dict[str, str], exc: aiohttp.WSServerHandshakeError
    ) -> ApiError:
        """Build the error of a refused upgrade, with the node's envelope when it can be read.

        aiohttp drops the body of a refused upgrade, so the same request is sent once
        more as a plain GET: the node checks parameters, token and limits before the
        upgrade, so it replies with the same status and its error envelope.
        """
        if exc.status >= 400:
            try:
                async with asyncio.timeout(self.timeout):
                    async with self._open_session().get(
                        self.url_for(path), params=query or None, headers=self._headers()
                    ) as response:
                        body = _parse_json(await response.text())
                        if response.status == exc.status and isinstance(body, dict) and "error" in body:
                            return error_from_response(
                                response.status, body, response.headers, f"websocket GET {path}"
                            )
            except (aiohttp.ClientError, TimeoutError):
                pass
        return _handshake_error(path, exc)


def _connect_error(base_url: str, url: str, exc: aiohttp.ClientConnectorError) -> NetworkError:
    message = f"cannot connect to {base_url}: {exc.os_error}. Check the URL and that the node is running"
    return NetworkError(message, url=url)


def _parse_json(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _handshake_error(path: str, exc: aiohttp.WSServerHandshakeError) -> ApiError:
    """Build the error of a refused websocket upgrade from its status and headers alone,
    when the node's error envelope could not be read."""
    headers = exc.headers if exc.headers is not None else CIMultiDict()
    if exc.status >= 400:
        return error_from_response(exc.status, None, headers, f"websocket GET {path}")
    return ApiError(
        f"websocket GET {path} was not upgraded: HTTP {exc.status}, {exc.message}",
        code=INVALID_RESPONSE,
        request_id=headers.get("X-Request-ID"),
        status=exc.status,
    )


class MessageStream(Generic[T]):
    """Async iterator over the JSON text frames of one websocket, each passed to `parse`.

    It connects on `connect()`, `async with` or the first `__anext__`. Iteration ends
    when the node closes the websocket with 1000 (normal closure). Any other close
    code, or a broken connection, raises NetworkError with code STREAM_CLOSED and the
    close code in `details["close_code"]`. `aclose()` closes the websocket. A stream
    dropped without `aclose()` is closed by the event loop's async generator finalizer.
    """

    def __init__(
        self, transport: Transport, path: str, query: dict[str, str], parse: Callable[[dict[str, Any]], T]
    ) -> None:
        self._transport = transport
        self._path = path
        self._parse = parse
        self._query = query
        self._frames = self._receive_frames()
        self._connected = False
        self._closed = False

    async def connect(self) -> None:
        """Open the websocket now, so a refused request raises here. Does nothing when open."""
        if self._closed:
            raise VoxaError(f"the stream of {self._path} is closed")
        if not self._connected:
            # The generator opens the websocket and stops at its first yield.
            await self._frames.__anext__()
            self._connected = True

    def __aiter__(self) -> "MessageStream[T]":
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        await self.connect()
        return await self._frames.__anext__()

    async def aclose(self) -> None:
        """Close the websocket. Safe to call twice."""
        self._closed = True
        await self._frames.aclose()

    async def __aenter__(self) -> "MessageStream[T]":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _receive_frames(self) -> AsyncIterator[Any]:
        websocket = await self._transport.connect_websocket(self._path, self._query)
        try:
            yield None
            while True:
                message = await websocket.receive()
                if message.type == aiohttp.WSMsgType.TEXT:
                    data = _parse_json(message.data)
                    if isinstance(data, dict):
                        yield self._parse(data)
                    else:
                        logger.warning("skipped a websocket frame that is not a JSON object path=%s", self._path)
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    self._check_close(websocket, message)
                    return
                elif message.type == aiohttp.WSMsgType.ERROR:
                    raise self._stream_error(f"failed: {websocket.exception()!r}", websocket.close_code, "")
        finally:
            await websocket.close()
            logger.debug("websocket closed path=%s close_code=%s", self._path, websocket.close_code)

    def _check_close(self, websocket: aiohttp.ClientWebSocketResponse, message: aiohttp.WSMessage) -> None:
        code = websocket.close_code
        if code == WEBSOCKET_NORMAL_CLOSE:
            return
        reason = message.extra if isinstance(message.extra, str) else ""
        raise self._stream_error(f"was closed by the node with code {code}", code, reason)

    def _stream_error(self, failure: str, code: int | None, reason: str) -> NetworkError:
        message = f"websocket {self._path} {failure}"
        if reason:
            message += f": {reason}"
        return NetworkError(
            message,
            url=self._transport.url_for(self._path),
            code=STREAM_CLOSED,
            details={"close_code": code, "reason": reason},
        )
