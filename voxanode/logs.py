"""Logging setup of the daemon: one record per line on stderr, tagged with the node id.

Two formats: `plain` text lines, which leave out the time when stderr is the systemd
journal (journald stamps every line itself), and `json`, one object per line for log
shippers. The node id is known only after the node key loads, so `configure_logging`
may run without it and `set_node_id` fills it in later. Until then, lines show `node=-`.
"""

import json
import logging
import os
import sys
import time

from aiohttp.http_exceptions import HttpProcessingError

from voxanode.settings import LOG_FORMATS, LOG_LEVELS

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s node=%(node_id)s %(message)s"
JOURNAL_LOG_FORMAT = "%(levelname)s %(name)s node=%(node_id)s %(message)s"
# systemd sets this to "DEVICE:INODE" of the journal stream it connects to stderr.
JOURNAL_STREAM_VARIABLE = "JOURNAL_STREAM"
NO_NODE_ID = "-"
# kademlia 2.2.3 logs lookups, crawls and stored values at INFO, and rpcudp 5.0.1 logs
# every datagram at DEBUG. Both stay at WARNING unless the level is DEBUG.
CHATTY_LIBRARY_LOGGERS = ("kademlia", "rpcudp")
# Loggers kept at WARNING at every level. aiohttp's access log repeats the request
# lines that the API logs itself at DEBUG. urllib3, the Docker SDK's HTTP client,
# logs each call to the engine at DEBUG: 49 of 107 lines of one DEBUG devnet node.
ACCESS_LOGGER = "aiohttp.access"
QUIET_LIBRARY_LOGGERS = (ACCESS_LOGGER, "urllib3")
# aiohttp's server logs a request it cannot parse with a traceback, mostly at ERROR.
SERVER_LOGGER = "aiohttp.server"


class NodeIdFilter(logging.Filter):
    """Set `record.node_id` to this process's node id unless the record carries its own."""

    def __init__(self) -> None:
        super().__init__()
        self.node_id = NO_NODE_ID

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node_id"):
            record.node_id = self.node_id
        return True


class MalformedRequestFilter(logging.Filter):
    """Turn aiohttp's record of a request that did not parse into one DEBUG line.

    Any client can send bytes that are not HTTP, and the node replies 400 to them,
    so they are no fault of the node. aiohttp 3.14 logs a bad method as the first
    request of a connection at DEBUG, and a bad header or a line too long at ERROR,
    both with a traceback. The line keeps the client's address and the parser's reason.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        error = record.exc_info[1]
        if not isinstance(error, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        # The first line names the fault, and the lines after it quote the request's bytes.
        reason = (str(error.message).strip().splitlines() or [type(error).__name__])[0].rstrip(":")
        client = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.msg = "rejected a request that did not parse from %s: %s"
        record.args = (client, reason)
        record.exc_info = record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, milliseconds), level, logger, node, message."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        milliseconds = int((record.created - seconds) * 1000)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "node_id": getattr(record, "node_id", NO_NODE_ID),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def stderr_is_journal(environ=None) -> bool:
    """Return whether stderr is the journal stream that systemd set up for this process."""
    text = (os.environ if environ is None else environ).get(JOURNAL_STREAM_VARIABLE, "")
    device, _, inode = text.partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def make_formatter(log_format: str) -> logging.Formatter:
    """Return the formatter of a `log_format` setting: plain (default) or json, in any case."""
    name = log_format.lower()
    if name not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if name == "json":
        return JsonFormatter()
    return logging.Formatter(JOURNAL_LOG_FORMAT if stderr_is_journal() else LOG_FORMAT)


_node_id_filter = NodeIdFilter()
_malformed_request_filter = MalformedRequestFilter()
_installed_handler: logging.Handler | None = None


def configure_logging(level: str, node_id: str | None = None, log_format: str = "plain") -> None:
    """Send log records of `level` and above to stderr in `log_format` (plain or json).

    Calling it again replaces the handler installed before, so records are never
    written twice. Raises ValueError for a level outside DEBUG, INFO, WARNING, ERROR
    or a format other than plain and json.
    """
    global _installed_handler

    level_name = level.upper()
    if level_name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    numeric_level = logging.getLevelName(level_name)

    root = logging.getLogger()
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(_node_id_filter)
    root.addHandler(handler)
    _installed_handler = handler
    server_logger = logging.getLogger(SERVER_LOGGER)
    if _malformed_request_filter not in server_logger.filters:
        server_logger.addFilter(_malformed_request_filter)
    set_node_id(node_id)
    _apply_level(numeric_level)


def set_log_level(level: str) -> None:
    """Change the level of the installed handler's records, as on a settings reload."""
    level_name = level.upper()
    if level_name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    _apply_level(logging.getLevelName(level_name))


def _apply_level(numeric_level: int) -> None:
    logging.getLogger().setLevel(numeric_level)
    # NOTSET lets the chatty libraries follow the root level when it is DEBUG.
    library_level = logging.NOTSET if numeric_level == logging.DEBUG else logging.WARNING
    for name in CHATTY_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def set_node_id(node_id: str | None) -> None:
    """Set the node id shown in every later log line. None shows `-`."""
    _node_id_filter.node_id = node_id or NO_NODE_ID
