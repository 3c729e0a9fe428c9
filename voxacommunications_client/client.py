"""VoxaClient: the blocking client, a facade over AsyncVoxaClient.

Each VoxaClient owns one event loop that runs on a daemon thread of its own. Every
method submits the matching AsyncVoxaClient coroutine to that loop and waits for its
result, so both clients share one implementation. `close()`, or leaving the `with`
block, closes the HTTP session and stops the thread. A client that is garbage
collected or still open at interpreter exit is closed the same way.

Log and event streams are `Stream` iterators. They connect when created, so a
refused request raises at the call, and they close their websocket when the loop
that reads them is left with break, or when closed explicitly.
"""

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from voxacommunications_client._transport import MessageStream
from voxacommunications_client.async_client import (
    DEFAULT_BACKOFF_SECONDS,
    DEFAULT_LIST_LIMIT,
    DEFAULT_LOG_TAIL_LINES,
    DEFAULT_MAX_BACKOFF_SECONDS,
    DEFAULT_POLL_INTERVAL_SECONDS,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_SECONDS,
    DEFAULT_URL,
    DEFAULT_WAIT_TIMEOUT_SECONDS,
    AsyncVoxaClient,
)
from voxacommunications_client.errors import VoxaError
from voxacommunications_client.models import (
    App,
    AppList,
    AppStatus,
    ConnectionTest,
    DataValue,
    Event,
    Health,
    LogEntry,
    NodeList,
    ProgramStats,
    ScaleResult,
    StopResult,
    StoreResult,
    SystemStatus,
    VersionInfo,
)

# Time allowed for the loop thread to finish after it was asked to stop.
LOOP_STOP_TIMEOUT_SECONDS = 5.0

logger = logging.getLogger(__name__)

T = TypeVar("T")
_END_OF_STREAM = object()


class _LoopThread:
    """An event loop running on a daemon thread. `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="voxa-client-loop", daemon=True)
        self._stopped = False
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def running(self) -> bool:
        return not self._stopped

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and return its result. An interrupted wait cancels it."""
        if self._stopped:
            coroutine.close()
            raise VoxaError("the client is closed. Create a new one")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise VoxaError("a VoxaClient method was called from a callback on the client's own thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # On KeyboardInterrupt and the like, the coroutine must not run on unseen.
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and wait for its thread. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(LOOP_STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            logger.warning("client loop thread did not stop within %.0f s", LOOP_STOP_TIMEOUT_SECONDS)
            return
        self._loop.close()


def _shut_down(runner: _LoopThread, async_client: AsyncVoxaClient) -> None:
    """Close the async client's session on its loop, then stop the loop thread."""
    if not runner.running:
        return
    try:
        runner.run(async_client.close())
        runner.run(_shut_down_async_generators())
    finally:
        runner.stop()


async def _shut_down_async_generators() -> None:
    await asyncio.get_running_loop().shutdown_asyncgens()


class Stream(Generic[T]):
    """Blocking iterator over a websocket stream, which closes the websocket when done.

    Iteration ends when the node ends the stream normally. Use it as a context manager,
    call `close()`, or leave a `for` loop over the call's result with break: the
    stream is closed as soon as nothing refers to it any more.
    """

    def __init__(self, runner: _LoopThread, stream: MessageStream[T]) -> None:
        self._runner = runner
        self._stream = stream
        self._closed = False
        runner.run(stream.connect())

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            item = self._runner.run(_next_item(self._stream))
        except BaseException:
            self._close_quietly()
            raise
        if item is _END_OF_STREAM:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Close the websocket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._runner.running:
            self._runner.run(self._stream.aclose())

    def __enter__(self) -> "Stream[T]":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._close_quietly()

    def _close_quietly(self) -> None:
        # Used where an error is already on its way or nothing may raise. Closing the
        # client's session closes the websocket in any case.
        try:
            self.close()
        except Exception:  # noqa: BLE001
            logger.debug("closing a stream failed", exc_info=True)


async def _next_item(stream: MessageStream[T]) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END_OF_STREAM


class Apps:
    """App routes. AsyncApps describes each call."""

    def __init__(self, client: "VoxaClient") -> None:
        self._client = client
        self._async = client._async.apps

    def deploy(
        self,
        name: str,
        image: str,
        replicas: int = 1,
        *,
        resources: Mapping[str, str] | None = None,
        environment: Mapping[str, str] | None = None,
        ports: Sequence[Mapping[str, Any]] | None = None,
        health_check: Mapping[str, Any] | None = None,
        restart: str | None = None,
        command: Sequence[str] | None = None,
    ) -> App:
        return self._client._run(
            self._async.deploy(
                name,
                image,
                replicas,
                resources=resources,
                environment=environment,
                ports=ports,
                health_check=health_check,
                restart=restart,
                command=command,
            )
        )

    def list(
        self, *, status: str | None = None, node_id: str | None = None, limit: int = DEFAULT_LIST_LIMIT, offset: int = 0
    ) -> AppList:
        return self._client._run(self._async.list(status=status, node_id=node_id, limit=limit, offset=offset))

    def get_status(self, app_id: str) -> AppStatus:
        return self._client._run(self._async.get_status(app_id))

    def scale(self, app_id: str, replicas: int) -> ScaleResult:
        return self._client._run(self._async.scale(app_id, replicas))

    def stop(self, app_id: str, *, force: bool = False) -> StopResult:
        return self._client._run(self._async.stop(app_id, force=force))

    def logs(self, app_id: str, *, follow: bool = True, tail: int = DEFAULT_LOG_TAIL_LINES) -> Stream[LogEntry]:
        """Return a blocking iterator over the app's log lines, connected already."""
        return self._client._stream(self._async.logs(app_id, follow=follow, tail=tail))

    def wait_until_running(
        self,
        app_id: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT_SECONDS,
        poll_interval: float = DEFAULT_POLL_INTERVAL_SECONDS,
        on_progress: Callable[[AppStatus], None] | None = None,
    ) -> AppStatus:
        """Wait until the app runs. `on_progress` is called on the client's loop thread."""
        return self._client._run(
            self._async.wait_until_running(
                app_id, timeout=timeout, poll_interval=poll_interval, on_progress=on_progress
            )
        )


class Data:
    """Data routes, as in AsyncData."""

    def __init__(self, client: "VoxaClient") -> None:
        self._client = client
        self._async = client._async.data

    def store(self, key: str, value: Any, *, ttl: int | None = None, replicas: int | None = None) -> StoreResult:
        return self._client._run(self._async.store(key, value, ttl=ttl, replicas=replicas))

    def retrieve(self, key: str) -> DataValue:
        return self._client._run(self._async.retrieve(key))


class Nodes:
    """The discovery route, as in AsyncNodes."""

    def __init__(self, client: "VoxaClient") -> None:
        self._client = client
        self._async = client._async.nodes

    def discover(self, *, status: str | None = None, capability: str | None = None) -> NodeList:
        return self._client._run(self._async.discover(status=status, capability=capability))


class Status:
    """Status routes: health and system status."""

    def __init__(self, client: "VoxaClient") -> None:
        self._client = client
        self._async = client._async.status

    def health(self) -> Health:
        return self._client._run(self._async.health())

    def system(self) -> SystemStatus:
        return self._client._run(self._async.system())


class Info:
    """Info routes: version and program statistics."""

    def __init__(self, client: "VoxaClient") -> None:
        self._client = client
        self._async = client._async.info

    def version(self) -> VersionInfo:
        return self._client._run(self._async.version())

    def program_stats(self) -> ProgramStats:
        return self._client._run(self._async.program_stats())


class Test:
    """The test route: the node's live connection check."""

    __test__ = False  # not a pytest test class

    def __init__(self, client: "VoxaClient") -> None:
        self._client = client
        self._async = client._async.test

    def connection(self) -> ConnectionTest:
        return self._client._run(self._async.connection())


class VoxaClient:
    """Blocking client of one node's API. Use `with`, or call `close()`.

    The arguments are those of AsyncVoxaClient: `token` for nodes without --dev,
    `timeout` per attempt in seconds, and `retries`, `backoff`, `max_backoff` for
    retries. A client may be used from several threads. Their calls run on its one
    loop, interleaved at each wait for the node.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_SECONDS,
        max_backoff: float = DEFAULT_MAX_BACKOFF_SECONDS,
    ) -> None:
        self._async = AsyncVoxaClient(
            url, token=token, timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff
        )
        self._runner = _LoopThread()
        self._finalizer = weakref.finalize(self, _shut_down, self._runner, self._async)
        self.apps = Apps(self)
        self.data = Data(self)
        self.nodes = Nodes(self)
        self.status = Status(self)
        self.info = Info(self)
        self.test = Test(self)

    @property
    def url(self) -> str:
        """The node's base URL."""
        return self._async.url

    def authenticate(self, token: str | None) -> None:
        """Set the bearer token sent with every later request (None sends none)."""
        self._async.authenticate(token)

    def events(self, *, types: str | Iterable[str] | None = None, since: str | None = None) -> Stream[Event]:
        """Return a blocking iterator over the node's network events, connected already."""
        return self._stream(self._async.events(types=types, since=since))

    def close(self) -> None:
        """Close the HTTP session and open streams, and stop the loop thread. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> "VoxaClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    def _stream(self, stream: MessageStream[T]) -> Stream[T]:
        return Stream(self._runner, stream)
