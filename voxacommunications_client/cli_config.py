"""Connection settings of voxa-cli: node URL, bearer token and request timeout.

Each setting comes from the first of: its command-line flag, its environment variable
(`VOXA_URL`, `VOXA_TOKEN`, `VOXA_TIMEOUT`), the config file, the default. Click reads
the flags and the environment; this module reads the config file and fills in the rest.

The config file is TOML with the optional keys `url`, `token` and `timeout` (seconds).
Its path is `--config`, else `$VOXA_CLI_CONFIG`, else `~/.config/voxa/config.toml`. A file
named by `--config` or `$VOXA_CLI_CONFIG` must exist, while the default path may be absent.
"""

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:9999"
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_CONFIG_PATH = Path("~/.config/voxa/config.toml")
URL_SCHEMES = ("http://", "https://")
# Permission bits that let the group or other users read a file.
SHARED_READ_BITS = 0o044
CONFIG_KEYS = ("url", "token", "timeout")


class ConfigError(Exception):
    """A missing, unreadable or invalid config file; `hint` is the fix to suggest."""

    def __init__(self, path: str, message: str, hint: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.hint = hint


FILE_HINT = "fix the file, or point --config or VOXA_CLI_CONFIG at another one"


@dataclass(frozen=True)
class ConnectionSettings:
    """The resolved URL, token and timeout that every command connects with."""

    url: str
    # Kept out of repr, so a logged or printed settings object never shows the token.
    token: str | None = field(repr=False)
    timeout_seconds: float


def config_file_path(explicit_path: str | None) -> tuple[Path, bool]:
    """Return the config file path and whether it must exist.

    `explicit_path` is the value of `--config` or `$VOXA_CLI_CONFIG`, which click has
    already merged; without it the default path is used and may be missing.
    """
    if explicit_path:
        return Path(explicit_path).expanduser(), True
    return DEFAULT_CONFIG_PATH.expanduser(), False


def read_config_file(path: Path, required: bool) -> dict[str, Any]:
    """Read and check the TOML config file; return {} when an optional file is absent."""
    try:
        with path.open("rb") as config_file:
            values = tomllib.load(config_file)
    except FileNotFoundError:
        if required:
            raise ConfigError(str(path), "config file not found", "create it, or correct --config or VOXA_CLI_CONFIG") from None
        return {}
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}", FILE_HINT) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}", FILE_HINT) from exc

    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            str(path), f"unknown key {', '.join(unknown)}; the keys are {', '.join(CONFIG_KEYS)}", FILE_HINT
        )
    for key in ("url", "token"):
        if key in values and not isinstance(values[key], str):
            raise ConfigError(str(path), f"{key} must be a string", FILE_HINT)
    if "url" in values and url_problem(values["url"]):
        raise ConfigError(str(path), f"url: {url_problem(values['url'])}", FILE_HINT)
    timeout = values.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(str(path), f"timeout must be a number of seconds above 0, got {timeout!r}", FILE_HINT)
    logger.debug("read config file %s with keys %s", path, sorted(values))
    return values


def token_file_warning(path: Path, values: dict[str, Any]) -> str | None:
    """Return a warning when the config file contains a token that other users may read."""
    if not values.get("token"):
        return None
    mode = path.stat().st_mode
    if not mode & SHARED_READ_BITS:
        return None
    return f"{path} contains a token that other users can read (mode {mode & 0o777:o}); run chmod 600 {path}"


def resolve_settings(
    url: str | None, token: str | None, timeout_seconds: float | None, file_values: dict[str, Any]
) -> ConnectionSettings:
    """Fill the settings that no flag or environment variable set from the file, then the defaults.

    `url`, `token` and `timeout_seconds` are the flag-or-environment values, which click
    has checked, or None when neither was given. `file_values` come from read_config_file.
    """
    if url is None:
        url = file_values.get("url", DEFAULT_URL)
    if timeout_seconds is None:
        timeout_seconds = float(file_values.get("timeout", DEFAULT_TIMEOUT_SECONDS))
    if token is None:
        token = file_values.get("token")
    return ConnectionSettings(url=url.rstrip("/"), token=token or None, timeout_seconds=timeout_seconds)


def url_problem(url: str) -> str | None:
    """Return why `url` is not a node API URL, or None when it is one."""
    if not url.startswith(URL_SCHEMES) or not url.split("://", 1)[1].strip("/"):
        return f"the node URL must look like http://HOST:PORT, got {url!r}"
    return None
