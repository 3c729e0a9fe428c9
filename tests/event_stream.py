"""A background websocket client that collects a node's network events for tests."""

import asyncio
import json
import threading
import time

import aiohttp

CONNECT_TIMEOUT_SECONDS = 10.0


class EventStream:
    """Collects the events of `GET /ws/network/events` on a thread of its own."""

    def __init__(self, api_url: str, query: str = ""):
        self.url = api_url.replace("http://", "ws://") + "/ws/network/events" + query
        self.events: list[dict] = []
        self.close_code: int | None = None
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "EventStream":
        self._thread.start()
        if not self._connected.wait(CONNECT_TIMEOUT_SECONDS):
            raise TimeoutError(f"no websocket connection to {self.url}: {self._error!r}")
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._collect())
        except BaseException as error:  # reported through wait_for and __enter__
            self._error = error
            self._connected.set()

    async def _collect(self) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as socket:
                self._connected.set()
                while not self._stop.is_set():
                    try:
                        message = await socket.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self.events.append(json.loads(message.data))
                    elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        self.close_code = socket.close_code
                        return

    def matching(self, event_type: str, **fields) -> list[dict]:
        """Return the collected events of `event_type` whose fields equal `fields`."""
        found = []
        for event in list(self.events):
            if event.get("type") != event_type:
                continue
            data = event.get("data", {})
            if all(event.get(name, data.get(name)) == value for name, value in fields.items()):
                found.append(event)
        return found

    def wait_for(self, event_type: str, timeout: float, **fields) -> dict | None:
        """Wait until an event of `event_type` with `fields` arrives; return it or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(event_type, **fields)
            if found:
                return found[0]
            time.sleep(0.1)
        return None
