"""The one timestamp format of the API: UTC, whole seconds, `YYYY-MM-DDTHH:MM:SSZ`."""

import functools
import time

MILLISECONDS_PER_SECOND = 1000
ISO_UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Whole seconds whose text is kept: the current second of every reply, and the
# created and expires times of the records read most often.
FORMATTED_SECONDS_CACHE_SIZE = 4096


def isoformat_utc(
    seconds: float | None = None, *, milliseconds: int | None = None
) -> str:
    """Format a Unix time as `YYYY-MM-DDTHH:MM:SSZ`, dropping fractions of a second.

    Pass seconds (as from `time.time()`) or keyword `milliseconds` (as in DHT records),
    or neither for the current time.
    """
    if seconds is not None and milliseconds is not None:
        raise TypeError("pass seconds or milliseconds, not both")
    if milliseconds is not None:
        whole_seconds = milliseconds // MILLISECONDS_PER_SECOND
    elif seconds is not None:
        whole_seconds = int(seconds // 1)
    else:
        whole_seconds = int(time.time())
    return _format_whole_seconds(whole_seconds)


@functools.lru_cache(maxsize=FORMATTED_SECONDS_CACHE_SIZE)
def _format_whole_seconds(whole_seconds: int) -> str:
    # Every reply carries the current time, so each second is formatted once and
    # then served from the cache.
    return time.strftime(ISO_UTC_FORMAT, time.gmtime(whole_seconds))
