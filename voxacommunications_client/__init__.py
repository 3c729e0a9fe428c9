"""Python client of the voxanode REST and websocket API.

`VoxaClient` is the blocking client and `AsyncVoxaClient` the asyncio one; both have
the same groups of calls (`apps`, `data`, `nodes`, `status`, `info`, `test`,
`events()`), return the frozen dataclasses of `models`, and raise the exceptions of
`errors`, which are also importable from here.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from voxacommunications_client import errors, models
from voxacommunications_client._transport import MessageStream
from voxacommunications_client.async_client import AsyncVoxaClient
from voxacommunications_client.client import Stream, VoxaClient
from voxacommunications_client.errors import (
    ApiError,
    AuthenticationRequired,
    AuthorizationFailed,
    Conflict,
    DeploymentFailed,
    InternalError,
    InvalidRequest,
    NetworkError,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    VoxaError,
    WaitTimeout,
)

try:
    __version__ = version("voxanode")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "unknown"

# A library leaves log output to the application: without its own handlers, nothing
# of this package reaches stderr through logging's last-resort handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ApiError",
    "AsyncVoxaClient",
    "AuthenticationRequired",
    "AuthorizationFailed",
    "Conflict",
    "DeploymentFailed",
    "InternalError",
    "InvalidRequest",
    "MessageStream",
    "NetworkError",
    "NotFound",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "Stream",
    "VoxaClient",
    "VoxaError",
    "WaitTimeout",
    "errors",
    "models",
]
