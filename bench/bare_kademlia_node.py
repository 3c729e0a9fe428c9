"""Baseline node for the DHT benchmark: a bare `kademlia.network.Server` behind aiohttp.

It serves the same store and retrieve routes as voxanode with roughly the same reply
shapes, so bench/dht.py can drive both networks with one client:

- POST /data/store/ {"key", "value"}: the value is JSON-encoded and set with
  `Server.set`, which stores it on the ksize nodes closest to sha1(key);
- GET /data/retrieve/?key=: `Server.get`, JSON-decoded;
- GET /status/health: 200 once the UDP endpoint listens.

There are no signatures, TTLs, replica counts or persistence: it is the cost floor of
a Kademlia lookup over the same loopback network. SIGTERM and SIGINT stop it with exit 0.
"""

import argparse
import asyncio
import json
import logging
import signal
import sys

from aiohttp import web
from kademlia.network import Server

logger = logging.getLogger("bare_kademlia_node")

DEFAULT_KSIZE = 3
BOOTSTRAP_ATTEMPTS = 30
BOOTSTRAP_RETRY_SECONDS = 1.0
SERVER_KEY = web.AppKey("server", Server)


def parse_peer(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def error_reply(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"success": False, "error": {"code": code, "message": message}}, status=status)


async def store(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        key, value = body["key"], body["value"]
    except (ValueError, KeyError, TypeError):
        return error_reply(400, "INVALID_REQUEST", "body must be a JSON object with key and value")
    if not isinstance(key, str) or not key:
        return error_reply(400, "INVALID_REQUEST", "key must be a non-empty string")
    try:
        stored = await request.app[SERVER_KEY].set(key, json.dumps(value))
    except ValueError as exc:
        # kademlia 2.2.3's set_digest calls max() on the nodes its crawl found, which
        # raises ValueError when every contacted node timed out.
        logger.warning("store failed for a key of %d bytes: %s", len(key), exc)
        return error_reply(503, "STORE_FAILED", f"lookup found no node: {exc}")
    if not stored:
        return error_reply(503, "STORE_FAILED", "no node acknowledged the store")
    return web.json_response({"success": True, "key": key})


async def retrieve(request: web.Request) -> web.Response:
    key = request.query.get("key")
    if not key:
        return error_reply(400, "INVALID_REQUEST", "query parameter key is required")
    text = await request.app[SERVER_KEY].get(key)
    if text is None:
        return error_reply(404, "NOT_FOUND", "key not found")
    return web.json_response({"success": True, "key": key, "value": json.loads(text)})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


async def join(server: Server, peers: list[tuple[str, int]]) -> None:
    """Bootstrap from `peers`, retrying while none of them responds yet."""
    for attempt in range(1, BOOTSTRAP_ATTEMPTS + 1):
        found = await server.bootstrap(peers)
        if found:
            logger.info("joined through %s: %d nodes found", peers, len(found))
            return
        logger.warning("bootstrap attempt %d through %s found no node; retrying", attempt, peers)
        await asyncio.sleep(BOOTSTRAP_RETRY_SECONDS)
    logger.error("no bootstrap peer responded after %d attempts; running alone", BOOTSTRAP_ATTEMPTS)


async def run(args: argparse.Namespace) -> None:
    server = Server(ksize=args.ksize)
    await server.listen(args.peer_port, interface=args.peer_host)
    if args.bootstrap:
        await join(server, args.bootstrap)

    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_post("/data/store/", store)
    app.router.add_get("/data/retrieve/", retrieve)
    app.router.add_get("/status/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.api_host, args.api_port).start()
    logger.info("listening: api=%s:%d peer=%s:%d ksize=%d", args.api_host, args.api_port, args.peer_host, args.peer_port, args.ksize)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    logger.info("stopping")
    await runner.cleanup()
    server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="Bare kademlia.network.Server with the voxanode store/retrieve routes.")
    parser.add_argument("--api-host", default="127.0.0.1", help="address of the HTTP API (default: %(default)s)")
    parser.add_argument("--api-port", type=int, required=True, help="TCP port of the HTTP API")
    parser.add_argument("--peer-host", default="127.0.0.1", help="address of the Kademlia UDP endpoint (default: %(default)s)")
    parser.add_argument("--peer-port", type=int, required=True, help="UDP port of the Kademlia endpoint")
    parser.add_argument("--bootstrap", type=parse_peer, action="append", default=[], help="HOST:PORT of a peer to join through; repeatable")
    parser.add_argument("--ksize", type=int, default=DEFAULT_KSIZE, help="Kademlia k: bucket size and number of copies per value (default: %(default)s)")
    parser.add_argument("--log-level", default="WARNING", help="log level (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The kademlia package logs every get and set, values included, at INFO.
    logging.getLogger("kademlia").setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
