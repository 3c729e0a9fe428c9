"""Logging setup of the daemon: one line per record on stderr, tagged with the node id.

The node id is known only after the node key loads. So `configure_logging` may run
without it, and `set_node_id` fills it in later. Until then, lines show `node=-`.
"""

import logging
import sys

from voxanode.settings import LOG_LEVELS

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s node=%(node_id)s %(message)s"
NO_NODE_ID = "-"
# kademlia 2.2.3 logs lookups, crawls and stored values at INFO, and rpcudp 5.0.1 logs
# every datagram at DEBUG. Both stay at WARNING unless the level is DEBUG.
CHATTY_LIBRARY_LOGGERS = ("kademlia", "rpcudp")
# aiohttp's access log repeats the request lines that the API logs itself at DEBUG.
ACCESS_LOGGER = "aiohttp.access"


class NodeIdFilter(logging.Filter):
    """Set `record.node_id` to this process's node id unless the record carries its own."""

    def __init__(self) -> None:
        super().__init__()
        self.node_id = NO_NODE_ID

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node_id"):
            record.node_id = self.node_id
        return True


_node_id_filter = NodeIdFilter()
_installed_handler: logging.Handler | None = None


def configure_logging(level: str, node_id: str | None = None) -> None:
    """Send log records of `level` and above to stderr in LOG_FORMAT.

    Calling it again replaces the handler installed before, so records are never
    written twice. Raises ValueError for a level outside DEBUG, INFO, WARNING, ERROR.
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
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_node_id_filter)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _installed_handler = handler
    set_node_id(node_id)

    # NOTSET lets the chatty libraries follow the root level when it is DEBUG.
    library_level = logging.NOTSET if numeric_level == logging.DEBUG else logging.WARNING
    for name in CHATTY_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)


def set_node_id(node_id: str | None) -> None:
    """Set the node id shown in every later log line. None shows `-`."""
    _node_id_filter.node_id = node_id or NO_NODE_ID
