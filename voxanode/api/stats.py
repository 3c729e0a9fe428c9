"""Request counters of this API server, reported by `/info/program_stats`."""

from dataclasses import dataclass

FIRST_ERROR_STATUS = 400


@dataclass
class RequestStats:
    """Counts and total time of the responses sent since the server started.

    Error responses are those with status 400 or above.
    """

    requests: int = 0
    errors: int = 0
    total_response_ms: float = 0.0

    def record(self, status: int, response_ms: float) -> None:
        """Count one response with its HTTP status and handling time."""
        self.requests += 1
        self.total_response_ms += response_ms
        if status >= FIRST_ERROR_STATUS:
            self.errors += 1

    @property
    def average_response_ms(self) -> float:
        if self.requests == 0:
            return 0.0
        return self.total_response_ms / self.requests

    @property
    def success_rate_percent(self) -> float:
        """Share of responses below status 400; 100 before the first response."""
        if self.requests == 0:
            return 100.0
        return 100.0 * (self.requests - self.errors) / self.requests
