"""The one timestamp format of the API: UTC, whole seconds, `YYYY-MM-DDTHH:MM:SSZ`."""

import time

MILLISECONDS_PER_SECOND = 1000
ISO_UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


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
    return time.strftime(ISO_UTC_FORMAT, time.gmtime(whole_seconds))
