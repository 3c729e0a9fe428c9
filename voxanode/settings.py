"""Daemon settings: the frozen `Settings` object, its table of defaults and help, loading.

Each setting is a field of `Settings`. The field's metadata carries a one-line help
text, the rule that checks a value, the command-line flag and the VOXA_* environment
twin. That one table feeds `load_settings`, the daemon's `--help`, error messages and
the example file `config/settings.json`.

Values come from four layers, and a later layer wins: the defaults, a JSON settings
file, VOXA_* environment variables, then flags. Every value given in any layer is
checked, even one that a later layer overrides, so a broken settings file is never
hidden by a flag. Relative paths are resolved against the current directory, also when
they come from a settings file.
"""

import base64
import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import limits

DEFAULT_CONFIG_FILE = Path("config") / "settings.json"
DEFAULT_BOOTSTRAP_FILE = Path("bootstrap_peers.json")
ENV_PREFIX = "VOXA_"
# Variables of the client tools (voxa-cli); the daemon neither reads nor rejects them.
CLIENT_ENV_VARIABLES = frozenset({"VOXA_URL", "VOXA_TOKEN", "VOXA_TIMEOUT", "VOXA_CLI_CONFIG"})
DEFAULT_SOURCE = "default"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("plain", "json")
# uvloop (libuv) runs the same asyncio code with less CPU per socket event; the
# standard loop is there for troubleshooting.
EVENT_LOOPS = ("uvloop", "asyncio")
MIN_PORT = 1
MAX_PORT = 65535
MAX_HOST_NAME_CHARS = 253
MAX_GIT_COMMIT_CHARS = 64
SHOWN_VALUE_CHARS = 40
SHOWN_PATH_CHARS = 200
GIT_TIMEOUT_SECONDS = 5.0
UNKNOWN_GIT_COMMIT = "unknown"
# The checkout that contains this package, when it runs from a source tree.
PACKAGE_CHECKOUT_DIR = Path(__file__).resolve().parent.parent

TRUE_WORDS = frozenset({"1", "true", "yes"})
FALSE_WORDS = frozenset({"0", "false", "no"})

GROUP_NODE = "node"
GROUP_PROTOCOL = "DHT and peer protocol"
GROUP_DATA = "stored data limits"
GROUP_TIMERS = "timers"
GROUP_MEMBERSHIP = "membership and events"
GROUP_APPS = "apps and Docker"
GROUP_RATE_LIMITS = "rate limits"
GROUP_INGRESS = "ingress"
# Balancing strategies of app ingress, as voxanode.ingress.balancer names them.
INGRESS_STRATEGIES = ("round_robin", "least_connections", "latency")

_INTEGER_PATTERN = re.compile(r"[+-]?[0-9]{1,18}")
_PORT_PATTERN = re.compile(r"[0-9]{1,5}")
_HOST_LABEL_PATTERN = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC_HOST_PATTERN = re.compile(r"[0-9.]+")
_GIT_COMMIT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# A network key is 32 bytes: 64 hex digits, or 43 base64 characters (standard or URL-safe
# alphabet) with an optional "=" of padding.
NETWORK_KEY_BYTES = 32
_HEX_KEY_PATTERN = re.compile(r"[0-9A-Fa-f]{64}")
_BASE64_KEY_PATTERN = re.compile(r"[A-Za-z0-9+/_-]{43}=?")
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
# Rate limit values that mean "no limit".
UNLIMITED_WORDS = frozenset({"unlimited", "0"})
UNLIMITED_TEXT = "unlimited"
RATE_LIMIT_EXAMPLES = "such as 100/minute, 10/hour or 3/5seconds"
# limits.parse reads a window count of 0, as in "5/0seconds", as 1, so the rule checks it.
_ZERO_WINDOW_PATTERN = re.compile(r"(/|per)\s*0+\s*[a-z]", re.IGNORECASE)
NETWORK_KEY_REQUIREMENT = (
    "must be 32 bytes as base64 or hex; create one with "
    "`python3 -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'`"
)

logger = logging.getLogger(__name__)


class SettingsError(Exception):
    """A setting has an invalid value, an unknown name, or names an unusable file.

    `setting` is the setting's name, or the unknown key or environment variable. The
    message is one line that names the value, where it came from and how to fix it.
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting

    @classmethod
    def for_value(
        cls, setting: str, value: object, source: str, problem: str, as_json: bool = False
    ) -> "SettingsError":
        """Build the standard error `invalid setting NAME=VALUE (from SOURCE): PROBLEM`."""
        value_text = show_value(value, as_json)
        return cls(setting, f"invalid setting {setting}={value_text} (from {source}): {problem}")


class BindError(OSError):
    """A listening socket for `setting` (api_port or peer_port) could not be bound.

    The node raises it out of `run_until_stopped` so the daemon can name the setting.
    `errno` is that of `os_error`. `strerror` is the system's text for it, because
    asyncio's own wording repeats the address.
    """

    def __init__(self, setting: str, host: str, port: int, os_error: OSError):
        reason = os.strerror(os_error.errno) if os_error.errno else os_error.strerror
        super().__init__(os_error.errno, reason)
        self.setting = setting
        self.host = host
        self.port = port
        self.os_error = os_error

    def __str__(self) -> str:
        address = format_peer_address(self.host, self.port)
        return f"cannot bind {self.setting} on {address}: {self.strerror}"


def show_value(value: object, as_json: bool = False) -> str:
    """Return a value as one short line for a message.

    Values are cut to SHOWN_VALUE_CHARS. Paths may be longer and lose their start
    instead, so the file name stays visible.
    """
    if isinstance(value, Path):
        text = str(value)
    elif isinstance(value, str) and not as_json:
        text = value
    elif isinstance(value, (list, tuple)) and not as_json:
        text = ",".join(str(item) for item in value)
    else:
        text = json.dumps(value, default=str)
    if not text.isprintable():
        text = json.dumps(text)

    if isinstance(value, Path):
        if len(text) > SHOWN_PATH_CHARS:
            text = "..." + text[3 - SHOWN_PATH_CHARS :]
    elif len(text) > SHOWN_VALUE_CHARS:
        text = text[: SHOWN_VALUE_CHARS - 3] + "..."
    return text


def format_peer_address(host: str, port: int) -> str:
    """Return `host:port`, with an IPv6 host in brackets."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# Rules: each turns a raw value into a typed one or raises ValueError with the fix.
# `from_text` is true for environment variables and flags, whose values are strings,
# and false for a settings file, whose values already have JSON types.


def _format_number(number: float) -> str:
    return f"{number:g}"


@dataclass(frozen=True)
class IntegerRule:
    """A whole number within bounds. Text is accepted only from the environment and flags."""

    minimum: int
    maximum: int | None = None
    metavar: str = "N"

    def requirement(self) -> str:
        if self.maximum is None:
            return f"an integer of at least {self.minimum}"
        return f"an integer from {self.minimum} to {self.maximum}"

    def parse(self, raw: object, from_text: bool) -> int:
        value = None
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif from_text and isinstance(raw, str) and _INTEGER_PATTERN.fullmatch(raw.strip()):
            value = int(raw)
        too_large = self.maximum is not None and value is not None and value > self.maximum
        if value is None or value < self.minimum or too_large:
            raise ValueError(f"must be {self.requirement()}")
        return value


@dataclass(frozen=True)
class NumberRule:
    """A finite number, integer or decimal, within bounds."""

    minimum: float
    maximum: float | None = None
    minimum_exclusive: bool = False
    metavar: str = "SECONDS"

    def requirement(self) -> str:
        if self.minimum_exclusive:
            text = f"a number greater than {_format_number(self.minimum)}"
        else:
            text = f"a number of at least {_format_number(self.minimum)}"
        if self.maximum is not None:
            text += f" and at most {_format_number(self.maximum)}"
        return text

    def parse(self, raw: object, from_text: bool) -> float:
        value = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif from_text and isinstance(raw, str):
            try:
                value = float(raw)
            except ValueError:
                value = None
        if value is None or not math.isfinite(value) or not self._within_bounds(value):
            raise ValueError(f"must be {self.requirement()}")
        return value

    def _within_bounds(self, value: float) -> bool:
        if self.minimum_exclusive and value <= self.minimum:
            return False
        if value < self.minimum:
            return False
        return self.maximum is None or value <= self.maximum


@dataclass(frozen=True)
class BooleanRule:
    """A boolean: JSON true or false in a file, 1/0/true/false/yes/no as text."""

    metavar: str = ""

    def parse(self, raw: object, from_text: bool) -> bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            word = raw.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise ValueError("must be one of 1, 0, true, false, yes, no")
        raise ValueError("must be true or false (a JSON boolean)")


@dataclass(frozen=True)
class HostRule:
    """A host name or an IP address to listen on, IPv6 without brackets."""

    metavar: str = "HOST"
    optional: bool = False

    def parse(self, raw: object, from_text: bool) -> str | None:
        if raw is None and self.optional:
            return None
        if not isinstance(raw, str):
            raise ValueError("must be a host name or IP address as a string")
        return _normalize_host(raw.strip())


@dataclass(frozen=True)
class ChoiceRule:
    """One word from a fixed list, in any case. The value is stored upper-case."""

    choices: tuple[str, ...]
    metavar: str = "LEVEL"

    def parse(self, raw: object, from_text: bool) -> str:
        if isinstance(raw, str) and raw.strip().upper() in self.choices:
            return raw.strip().upper()
        raise ValueError("must be one of " + ", ".join(self.choices) + " (any case)")


@dataclass(frozen=True)
class PathRule:
    """A file system path with `~` expanded. Optional paths accept JSON null in a file."""

    optional: bool = False
    metavar: str = "FILE"

    def parse(self, raw: object, from_text: bool) -> Path | None:
        if raw is None and self.optional:
            return None
        if not isinstance(raw, str) or not raw.strip():
            expected = "a non-empty path"
            if self.optional and not from_text:
                expected += " or null"
            raise ValueError(f"must be {expected}")
        if "\0" in raw:
            raise ValueError("must be a path without NUL characters")
        try:
            return Path(raw).expanduser()
        except RuntimeError as error:
            raise ValueError(f"must be a path whose ~ can be expanded ({error})") from error


@dataclass(frozen=True)
class PeerListRule:
    """HOST:PORT peers: a JSON list in a file, comma-separated text in the environment."""

    metavar: str = "HOST:PORT"

    def parse(self, raw: object, from_text: bool) -> tuple[str, ...]:
        if isinstance(raw, str) and from_text:
            entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
        elif isinstance(raw, (list, tuple)):
            entries = list(raw)
        else:
            raise ValueError('must be a JSON list of "HOST:PORT" strings')

        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(
                    f'entry {show_value(entry, as_json=True)} must be a "HOST:PORT" string'
                )
            parse_peer_address(entry)
        return tuple(entry.strip() for entry in entries)


@dataclass(frozen=True)
class GitCommitRule:
    """A commit id or version label without spaces. None means "find it at start"."""

    metavar: str = "COMMIT"

    def parse(self, raw: object, from_text: bool) -> str | None:
        if raw is None:
            return None
        text = raw.strip() if isinstance(raw, str) else ""
        if len(text) > MAX_GIT_COMMIT_CHARS or not _GIT_COMMIT_PATTERN.fullmatch(text):
            raise ValueError(
                f"must be a commit id of 1 to {MAX_GIT_COMMIT_CHARS} letters, digits or ._+-"
            )
        return text


def parse_network_key(text: str) -> bytes:
    """Decode a network key from 64 hex digits or base64; raise ValueError naming the fix.

    The error message never contains the text, because a rejected key may still be
    most of a real one.
    """
    stripped = text.strip()
    if _HEX_KEY_PATTERN.fullmatch(stripped):
        return bytes.fromhex(stripped)
    if _BASE64_KEY_PATTERN.fullmatch(stripped):
        standard = stripped.rstrip("=").translate(_URL_SAFE_TO_STANDARD) + "="
        return base64.b64decode(standard, validate=True)
    raise ValueError(NETWORK_KEY_REQUIREMENT)


@dataclass(frozen=True)
class NetworkKeyRule:
    """A network key as base64 or hex, decoded to 32 bytes. None means "no key": JSON null."""

    metavar: str = "KEY"

    def parse(self, raw: object, from_text: bool) -> bytes | None:
        if raw is None and not from_text:
            return None
        if not isinstance(raw, str):
            raise ValueError(f"{NETWORK_KEY_REQUIREMENT}, or null for an open network")
        if not raw.strip():
            # An empty variable, such as one set from an unset shell variable, must not
            # open the network silently.
            raise ValueError(
                f"is empty, but it {NETWORK_KEY_REQUIREMENT}. Leave it unset for an open network"
            )
        return parse_network_key(raw)


@dataclass(frozen=True)
class NetworkKeyListRule:
    """Network keys: a JSON list of strings in a file, comma-separated text otherwise."""

    metavar: str = "KEY,..."

    def parse(self, raw: object, from_text: bool) -> tuple[bytes, ...]:
        if isinstance(raw, str) and from_text:
            entries: list[object] = [entry for entry in raw.split(",") if entry.strip()]
        elif isinstance(raw, (list, tuple)):
            entries = list(raw)
        else:
            raise ValueError("must be a JSON list of keys, each 32 bytes as base64 or hex")

        keys = []
        for number, entry in enumerate(entries, start=1):
            if not isinstance(entry, str):
                raise ValueError(f"entry {number} {NETWORK_KEY_REQUIREMENT}")
            try:
                keys.append(parse_network_key(entry))
            except ValueError as error:
                raise ValueError(f"entry {number} {error}") from None
        return tuple(keys)


@dataclass(frozen=True)
class WordRule:
    """One word from a fixed list, in any case. The value is stored lower-case."""

    choices: tuple[str, ...]
    metavar: str = "WORD"

    def parse(self, raw: object, from_text: bool) -> str:
        if isinstance(raw, str) and raw.strip().lower() in self.choices:
            return raw.strip().lower()
        raise ValueError("must be one of " + ", ".join(self.choices))


@dataclass(frozen=True)
class WordListRule:
    """Words matching a pattern: a JSON list in a file, comma-separated text otherwise."""

    pattern: str
    description: str
    upper: bool = False
    metavar: str = "WORD,..."

    def parse(self, raw: object, from_text: bool) -> tuple[str, ...]:
        if isinstance(raw, str) and from_text:
            entries: list = [entry.strip() for entry in raw.split(",") if entry.strip()]
        elif isinstance(raw, (list, tuple)):
            entries = list(raw)
        else:
            raise ValueError(f"must be a JSON list of {self.description}")
        words = []
        for entry in entries:
            if not isinstance(entry, str) or not re.fullmatch(self.pattern, entry.strip()):
                raise ValueError(
                    f"entry {show_value(entry, as_json=True)} must be {self.description}"
                )
            word = entry.strip()
            words.append(word.upper() if self.upper else word.lower())
        return tuple(dict.fromkeys(words))


def format_rate_limit(limit: limits.RateLimitItem | None) -> str:
    """Return a rate limit as settings accept it: `100/minute`, `3/5 seconds` or `unlimited`."""
    if limit is None:
        return UNLIMITED_TEXT
    window = limit.GRANULARITY.name
    if limit.multiples == 1:
        return f"{limit.amount}/{window}"
    return f"{limit.amount}/{limit.multiples} {window}s"


@dataclass(frozen=True)
class RateLimitRule:
    """Requests per time window in the `limits` notation, such as 100/minute or 3/5seconds.

    "unlimited" or 0 parse to None, which means no limit. Each setting takes one limit.
    Text such as "1/second;5/minute" is rejected, because only its first limit would apply.
    """

    metavar: str = "LIMIT"

    def parse(self, raw: object, from_text: bool) -> limits.RateLimitItem | None:
        if raw == 0 and isinstance(raw, int) and not isinstance(raw, bool):
            return None
        if not isinstance(raw, str):
            raise ValueError(f'must be a rate limit string {RATE_LIMIT_EXAMPLES}, or "unlimited"')
        text = raw.strip()
        if text.lower() in UNLIMITED_WORDS:
            return None

        try:
            items = limits.parse_many(text)
        except ValueError:
            raise ValueError(
                f"must be a rate limit {RATE_LIMIT_EXAMPLES}, or unlimited. The window is"
                " second, minute, hour, day, month or year"
            ) from None
        if len(items) != 1:
            raise ValueError(f"must be one rate limit {RATE_LIMIT_EXAMPLES}, not a list of limits")
        item = items[0]
        if item.amount < 1 or _ZERO_WINDOW_PATTERN.search(text):
            raise ValueError(
                "must allow at least 1 request in a window of at least 1 unit."
                " Use unlimited or 0 for no limit"
            )
        return item


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NetworkListRule:
    """IP addresses or CIDR networks: a JSON list in a file, comma-separated text otherwise.

    An address is stored as a network of one address. A network with host bits set,
    such as 10.0.0.1/8, is rejected because it most likely contains a typing error.
    """

    metavar: str = "CIDR,..."

    def parse(self, raw: object, from_text: bool) -> tuple[IpNetwork, ...]:
        if isinstance(raw, str) and from_text:
            entries: list[object] = [entry.strip() for entry in raw.split(",") if entry.strip()]
        elif isinstance(raw, (list, tuple)):
            entries = list(raw)
        else:
            raise ValueError("must be a JSON list of IP addresses or CIDR networks")

        networks = []
        for entry in entries:
            entry_text = show_value(entry, as_json=True)
            if not isinstance(entry, str):
                raise ValueError(f"entry {entry_text} must be an IP address or CIDR network string")
            try:
                networks.append(ipaddress.ip_network(entry.strip()))
            except ValueError as error:
                raise ValueError(
                    f"entry {entry_text} must be an IP address or CIDR network such as"
                    f" 10.0.0.5 or 10.0.0.0/8 ({error})"
                ) from None
        return tuple(dict.fromkeys(networks))


Rule = (
    IntegerRule
    | WordRule
    | WordListRule
    | NumberRule
    | BooleanRule
    | HostRule
    | ChoiceRule
    | PathRule
    | PeerListRule
    | GitCommitRule
    | NetworkKeyRule
    | NetworkKeyListRule
    | RateLimitRule
    | NetworkListRule
)

PORT_RULE = IntegerRule(MIN_PORT, MAX_PORT, metavar="PORT")
POSITIVE_SECONDS_RULE = NumberRule(0.0, minimum_exclusive=True)
BYTES_RULE = IntegerRule(1, metavar="BYTES")


def _setting(
    default: object,
    help_text: str,
    rule: Rule,
    group: str,
    *,
    flag: str | None = None,
    env: str | None = None,
    default_text: str | None = None,
    in_file: bool = True,
    secret: bool = False,
):
    """Declare one setting: a dataclass field whose metadata is its row in the table.

    A secret setting is left out of the `Settings` repr and its value out of errors.
    """
    metadata = {
        "help": help_text,
        "rule": rule,
        "group": group,
        "flag": flag,
        "env": env,
        "default_text": default_text,
        "in_file": in_file,
        "secret": secret,
    }
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Every daemon setting, checked and typed. Components get the values they need.

    `Settings()` contains the defaults with paths still relative. Tests build variants with
    `dataclasses.replace(Settings(), ...)`; `load_settings` builds the daemon's own.
    """

    # node
    config_file: Path | None = _setting(
        None,
        "JSON file of settings, an object keyed by setting name",
        PathRule(optional=True),
        GROUP_NODE,
        flag="--config",
        env="VOXA_CONFIG",
        default_text="./config/settings.json if it exists",
        in_file=False,
    )
    data_dir: Path = _setting(
        Path("data"),
        "directory for the node key, stored records and app state",
        PathRule(metavar="DIR"),
        GROUP_NODE,
    )
    api_host: str = _setting(
        "127.0.0.1",
        "address the REST API listens on (TCP)",
        HostRule(),
        GROUP_NODE,
    )
    api_port: int = _setting(
        9999,
        "TCP port of the REST API",
        PORT_RULE,
        GROUP_NODE,
    )
    peer_host: str = _setting(
        "127.0.0.1",
        "address for peer traffic, DHT and gossip (UDP)",
        HostRule(),
        GROUP_NODE,
    )
    peer_port: int = _setting(
        9999,
        "UDP port for peer traffic",
        PORT_RULE,
        GROUP_NODE,
    )
    bootstrap: tuple[str, ...] = _setting(
        (),
        "peer to join at start. Repeat the flag, or separate peers with commas in the environment",
        PeerListRule(),
        GROUP_NODE,
        default_text="none",
    )
    bootstrap_file: Path | None = _setting(
        None,
        "JSON list of HOST:PORT peers to join, combined with --bootstrap",
        PathRule(optional=True),
        GROUP_NODE,
        default_text="./bootstrap_peers.json if it exists",
    )
    dev: bool = _setting(
        False,
        "development mode: API authentication off",
        BooleanRule(),
        GROUP_NODE,
    )
    log_level: str = _setting(
        "INFO",
        "log level: DEBUG, INFO, WARNING or ERROR",
        ChoiceRule(LOG_LEVELS),
        GROUP_NODE,
    )
    log_format: str = _setting(
        "plain",
        "log line format on stderr: plain text lines, or json objects for log shippers",
        WordRule(LOG_FORMATS, metavar="FORMAT"),
        GROUP_NODE,
    )
    event_loop: str = _setting(
        "uvloop",
        "event loop implementation: uvloop, or the standard library's asyncio loop",
        WordRule(EVENT_LOOPS, metavar="LOOP"),
        GROUP_NODE,
    )
    git_commit: str | None = _setting(
        None,
        "commit reported by /info/version",
        GitCommitRule(),
        GROUP_NODE,
        default_text="git rev-parse --short HEAD of the source checkout, else unknown",
    )

    # DHT and peer protocol
    ksize: int = _setting(
        20,
        "Kademlia bucket size k, also the maximum replica count",
        IntegerRule(1, 64),
        GROUP_PROTOCOL,
    )
    alpha: int = _setting(
        3,
        "Kademlia lookup parallelism",
        IntegerRule(1, 16),
        GROUP_PROTOCOL,
    )
    rpc_timeout_seconds: float = _setting(
        2.0,
        "wait for a peer's reply before the RPC counts as failed",
        NumberRule(0.0, 60.0, minimum_exclusive=True),
        GROUP_PROTOCOL,
    )
    max_datagram_bytes: int = _setting(
        8192,
        "largest UDP datagram sent or accepted",
        IntegerRule(1024, 65000, metavar="BYTES"),
        GROUP_PROTOCOL,
    )
    clock_skew_seconds: float = _setting(
        30.0,
        "tolerated clock difference when checking record and message times",
        NumberRule(0.0),
        GROUP_PROTOCOL,
    )
    network_key: bytes | None = _setting(
        None,
        "key that seals every peer datagram with AES-GCM, 32 bytes as base64 or hex;"
        " only nodes with the key can join. A flag shows in the process list, so set"
        " VOXA_NETWORK_KEY or the settings file instead",
        NetworkKeyRule(),
        GROUP_PROTOCOL,
        default_text="none, so any host that reaches peer_port can join",
        secret=True,
    )
    network_keys_accepted: tuple[bytes, ...] = _setting(
        (),
        "more keys accepted on received peer datagrams during a key rotation, comma-separated."
        " A flag shows in the process list, so set VOXA_NETWORK_KEYS_ACCEPTED or the"
        " settings file instead",
        NetworkKeyListRule(),
        GROUP_PROTOCOL,
        default_text="none",
        secret=True,
    )

    # stored data limits
    default_ttl_seconds: int = _setting(
        3600,
        "lifetime of a stored value when the request gives none (at most max_ttl_seconds)",
        IntegerRule(1, metavar="SECONDS"),
        GROUP_DATA,
    )
    max_ttl_seconds: int = _setting(
        2592000,
        "longest lifetime a request may set (30 days)",
        IntegerRule(1, metavar="SECONDS"),
        GROUP_DATA,
    )
    default_replicas: int = _setting(
        3,
        "copies of a value when the request gives no count (at most ksize)",
        IntegerRule(1, 64),
        GROUP_DATA,
    )
    max_value_bytes: int = _setting(
        65536,
        "largest value accepted, as compact JSON",
        BYTES_RULE,
        GROUP_DATA,
    )
    max_key_bytes: int = _setting(
        512,
        "longest key accepted, in UTF-8 bytes",
        BYTES_RULE,
        GROUP_DATA,
    )
    max_body_bytes: int = _setting(
        1048576,
        "largest API request body, greater than max_value_bytes",
        BYTES_RULE,
        GROUP_DATA,
    )

    # timers
    republish_interval_seconds: float = _setting(
        10.0,
        "time between rounds that restore missing replicas",
        POSITIVE_SECONDS_RULE,
        GROUP_TIMERS,
    )
    refresh_interval_seconds: float = _setting(
        3600.0,
        "time between Kademlia lookups that refresh the routing table; members that"
        " gossip reports are added to it as they join",
        POSITIVE_SECONDS_RULE,
        GROUP_TIMERS,
    )
    sweep_interval_seconds: float = _setting(
        30.0,
        "time between sweeps that delete expired records",
        POSITIVE_SECONDS_RULE,
        GROUP_TIMERS,
    )
    join_retry_seconds: float = _setting(
        5.0,
        "wait before joining again when no bootstrap peer answered",
        POSITIVE_SECONDS_RULE,
        GROUP_TIMERS,
    )
    shutdown_timeout_seconds: float = _setting(
        10.0,
        "time that API requests in progress get to finish when the node stops",
        POSITIVE_SECONDS_RULE,
        GROUP_TIMERS,
    )
    probe_interval_seconds: float = _setting(
        1.0,
        "time between SWIM probes; each probes one member",
        POSITIVE_SECONDS_RULE,
        GROUP_MEMBERSHIP,
    )
    probe_timeout_seconds: float = _setting(
        0.5,
        "wait for a direct probe's ack before asking other members to probe",
        POSITIVE_SECONDS_RULE,
        GROUP_MEMBERSHIP,
    )
    indirect_checks: int = _setting(
        3,
        "members asked to probe a member that missed a direct probe",
        IntegerRule(0, 16),
        GROUP_MEMBERSHIP,
    )
    suspicion_mult: int = _setting(
        4,
        "suspicion timeout in probe intervals, times log10 of the member count",
        IntegerRule(1, 100),
        GROUP_MEMBERSHIP,
    )
    retransmit_mult: int = _setting(
        4,
        "times each membership update is sent, times log10 of the member count",
        IntegerRule(1, 100),
        GROUP_MEMBERSHIP,
    )
    gossip_interval_seconds: float = _setting(
        0.2,
        "time between rounds that send queued membership updates",
        POSITIVE_SECONDS_RULE,
        GROUP_MEMBERSHIP,
    )
    gossip_fanout: int = _setting(
        3,
        "members each gossip round sends updates to",
        IntegerRule(1, 16),
        GROUP_MEMBERSHIP,
    )
    push_pull_interval_seconds: float = _setting(
        30.0,
        "time between full member list exchanges with one random member",
        POSITIVE_SECONDS_RULE,
        GROUP_MEMBERSHIP,
    )
    load_interval_seconds: float = _setting(
        2.0,
        "time between samples of this node's CPU and memory load",
        POSITIVE_SECONDS_RULE,
        GROUP_MEMBERSHIP,
    )
    forget_member_after_seconds: float = _setting(
        3600.0,
        "time an offline or departed member stays listed before it is forgotten",
        POSITIVE_SECONDS_RULE,
        GROUP_MEMBERSHIP,
    )
    leave_wait_seconds: float = _setting(
        1.0,
        "wait after announcing a graceful leave, so the announcement spreads",
        NumberRule(0.0),
        GROUP_MEMBERSHIP,
    )
    event_buffer_size: int = _setting(
        1000,
        "recent network events kept for replay with ?since=",
        IntegerRule(1, 1_000_000),
        GROUP_MEMBERSHIP,
    )
    event_client_queue_size: int = _setting(
        256,
        "undelivered events per event-stream client before it is disconnected",
        IntegerRule(1, 1_000_000),
        GROUP_MEMBERSHIP,
    )

    # apps and Docker
    docker_pull_policy: str = _setting(
        "never",
        "when app images are pulled: always, if-not-present, or never (local images only)",
        WordRule(("always", "if-not-present", "never"), metavar="POLICY"),
        GROUP_APPS,
    )
    docker_allowed_registries: tuple[str, ...] = _setting(
        (),
        "registries that images may be pulled from, such as docker.io",
        WordListRule(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?", "registry host names, optionally with :PORT",
                     metavar="HOST,..."),
        GROUP_APPS,
        default_text="none",
    )
    apps_allowed_capabilities: tuple[str, ...] = _setting(
        (),
        "Linux capabilities an app may add back to its containers, such as NET_BIND_SERVICE",
        WordListRule(r"(CAP_)?[A-Za-z_]{2,32}", "Linux capability names", upper=True,
                     metavar="CAP,..."),
        GROUP_APPS,
        default_text="none",
    )
    apps_max_replicas: int = _setting(
        50, "most replicas one app may ask for", IntegerRule(1, 10_000), GROUP_APPS
    )
    apps_pids_limit: int = _setting(
        512, "most processes in one app container", IntegerRule(16, 1_000_000), GROUP_APPS
    )
    apps_publish_host: str | None = _setting(
        None,
        "address that app container ports are published on",
        HostRule(optional=True),
        GROUP_APPS,
        default_text="api_host",
    )
    apps_stop_timeout_seconds: float = _setting(
        10.0,
        "time a stopped container has between SIGTERM and SIGKILL",
        NumberRule(0.0, 600.0),
        GROUP_APPS,
    )
    apps_start_timeout_seconds: float = _setting(
        60.0, "longest wait for a node to start its instances of an app", POSITIVE_SECONDS_RULE, GROUP_APPS
    )
    apps_reconcile_interval_seconds: float = _setting(
        2.0,
        "how often lost or crashed app instances are looked for and replaced",
        POSITIVE_SECONDS_RULE,
        GROUP_APPS,
    )
    apps_sync_interval_seconds: float = _setting(
        15.0,
        "how often the app catalogue is compared with a random member's",
        POSITIVE_SECONDS_RULE,
        GROUP_APPS,
    )
    apps_stats_interval_seconds: float = _setting(
        10.0, "how often container CPU, memory and network figures are read", POSITIVE_SECONDS_RULE, GROUP_APPS
    )
    docker_workers: int = _setting(
        4, "threads that make blocking Docker engine calls", IntegerRule(1, 64), GROUP_APPS
    )

    # rate limits
    rate_limit_default: limits.RateLimitItem | None = _setting(
        limits.parse("100/minute"),
        "API requests per client IP address to other routes, such as 100/minute or unlimited",
        RateLimitRule(),
        GROUP_RATE_LIMITS,
    )
    rate_limit_deployments: limits.RateLimitItem | None = _setting(
        limits.parse("10/hour"),
        "POST /apps/add_app/ requests per client IP address, rejected ones included",
        RateLimitRule(),
        GROUP_RATE_LIMITS,
    )
    rate_limit_data: limits.RateLimitItem | None = _setting(
        limits.parse("1000/minute"),
        "API requests per client IP address to /data/ routes",
        RateLimitRule(),
        GROUP_RATE_LIMITS,
    )
    rate_limit_status: limits.RateLimitItem | None = _setting(
        None,
        "API requests per client IP address to /status/ routes",
        RateLimitRule(),
        GROUP_RATE_LIMITS,
        default_text=UNLIMITED_TEXT,
    )
    rate_limit_ingress: limits.RateLimitItem | None = _setting(
        None,
        "app traffic requests per client IP address through /proxy/ and ingress_port",
        RateLimitRule(),
        GROUP_RATE_LIMITS,
        default_text=UNLIMITED_TEXT,
    )
    trusted_proxies: tuple[IpNetwork, ...] = _setting(
        (),
        "proxies, as IP addresses or CIDR networks, whose X-Forwarded-For header names"
        " the client for rate limits",
        NetworkListRule(),
        GROUP_RATE_LIMITS,
        default_text="none",
    )

    # ingress
    ingress_port: int = _setting(
        0,
        "TCP port of a second listener on api_host that routes app traffic by the Host"
        " header (APP or APP.anything); 0 turns it off",
        IntegerRule(0, MAX_PORT, metavar="PORT"),
        GROUP_INGRESS,
        default_text="0 (off)",
    )
    ingress_strategy: str = _setting(
        "round_robin",
        "how app traffic is spread over instances when the app's spec names no strategy:"
        " round_robin, least_connections or latency",
        WordRule(INGRESS_STRATEGIES, metavar="STRATEGY"),
        GROUP_INGRESS,
    )
    ingress_retries: int = _setting(
        2,
        "other instances an idempotent request is tried on after its connection failed",
        IntegerRule(0, 10),
        GROUP_INGRESS,
    )
    ingress_connect_timeout_seconds: float = _setting(
        5.0, "longest wait for a connection to an app instance", POSITIVE_SECONDS_RULE, GROUP_INGRESS
    )
    ingress_read_timeout_seconds: float = _setting(
        60.0,
        "longest wait for the next bytes from an app instance, response headers included",
        POSITIVE_SECONDS_RULE,
        GROUP_INGRESS,
    )
    ingress_circuit_failures: int = _setting(
        5,
        "failures in a row (failed connections, timeouts, 502-504 replies) after which an"
        " instance gets no traffic for the cool-down",
        IntegerRule(1, 1000),
        GROUP_INGRESS,
    )
    ingress_circuit_cooldown_seconds: float = _setting(
        10.0,
        "time an instance gets no traffic after its circuit opened, before one trial request",
        POSITIVE_SECONDS_RULE,
        GROUP_INGRESS,
    )

    # Derived by load_settings, not settable. bootstrap_peers lists the peers of
    # bootstrap_file, then those of bootstrap, parsed and without duplicates. sources
    # maps each setting to where its value came from: "default", a settings file, a
    # VOXA_* variable or a flag.
    bootstrap_peers: tuple[tuple[str, int], ...] = ()
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def source_of(self, name: str) -> str:
        """Return where the value of setting `name` came from."""
        return self.sources.get(name, DEFAULT_SOURCE)


@dataclass(frozen=True)
class SettingSpec:
    """One row of the settings table, read from a `Settings` field's metadata."""

    name: str
    default: object
    help: str
    rule: Rule
    group: str
    flag: str
    env: str
    default_text: str
    in_file: bool
    secret: bool


def display_value(value: object) -> str:
    """Return a setting's value as the user writes it, short enough for a log line."""
    if value is None or (isinstance(value, (tuple, list)) and not value):
        return "none"
    if isinstance(value, (limits.RateLimitItem, bool)):
        return _display_default(value)
    return show_value(value)


def _display_default(value: object) -> str:
    if isinstance(value, limits.RateLimitItem):
        return format_rate_limit(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return _display_path(value)
    return str(value)


def _display_path(path: Path) -> str:
    if path.is_absolute():
        return str(path)
    return "./" + path.as_posix()


def _spec_from_field(settings_field: dataclasses.Field) -> SettingSpec:
    metadata = settings_field.metadata
    name = settings_field.name
    default = settings_field.default
    return SettingSpec(
        name=name,
        default=default,
        help=metadata["help"],
        rule=metadata["rule"],
        group=metadata["group"],
        flag=metadata["flag"] or "--" + name.replace("_", "-"),
        env=metadata["env"] or ENV_PREFIX + name.upper(),
        default_text=metadata["default_text"] or _display_default(default),
        in_file=metadata["in_file"],
        secret=metadata["secret"],
    )


SETTING_SPECS: tuple[SettingSpec, ...] = tuple(
    _spec_from_field(settings_field)
    for settings_field in dataclasses.fields(Settings)
    if "help" in settings_field.metadata
)
SPECS_BY_NAME: Mapping[str, SettingSpec] = MappingProxyType(
    {spec.name: spec for spec in SETTING_SPECS}
)
_SPECS_BY_ENV = {spec.env: spec for spec in SETTING_SPECS}
_FILE_KEYS = tuple(spec.name for spec in SETTING_SPECS if spec.in_file)

# Pairs (smaller, larger, strict): smaller must be <= larger, or < larger when strict.
_ORDERED_PAIRS = (
    ("default_ttl_seconds", "max_ttl_seconds", False),
    ("default_replicas", "ksize", False),
    ("max_value_bytes", "max_body_bytes", True),
)


def default_settings_document() -> dict[str, object]:
    """Return every settings-file key with its default, as the JSON object to write."""
    document: dict[str, object] = {}
    for spec in SETTING_SPECS:
        if not spec.in_file:
            continue
        value = spec.default
        if isinstance(spec.rule, RateLimitRule):
            value = format_rate_limit(value)
        elif isinstance(value, Path):
            value = _display_path(value)
        elif isinstance(value, tuple):
            value = [str(item) if isinstance(item, IpNetwork) else item for item in value]
        document[spec.name] = value
    return document


def format_default_settings_document() -> str:
    """Return the text of config/settings.json: the default document, indented, newline-ended."""
    return json.dumps(default_settings_document(), indent=2) + "\n"


# Peer addresses


def _normalize_host(host: str) -> str:
    """Return the host in canonical form (IP addresses compressed, names lower-case).

    Raises ValueError naming what is wrong with it.
    """
    if not host:
        raise ValueError("must not be empty")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC_HOST_PATTERN.fullmatch(host):
        raise ValueError("must be a valid IPv4 address")
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    valid_labels = all(_HOST_LABEL_PATTERN.fullmatch(label) for label in labels)
    if len(name) > MAX_HOST_NAME_CHARS or not valid_labels:
        raise ValueError("must be a host name or an IP address, IPv6 without brackets")
    return name.lower()


def parse_peer_address(text: str) -> tuple[str, int]:
    """Parse `HOST:PORT` into (host, port), where the host is a name, IPv4, or [IPv6].

    The host comes back in canonical form: IP addresses compressed, names lower-case,
    IPv6 without brackets. Raises ValueError whose message starts "expected HOST:PORT".
    """
    stripped = text.strip()
    got = f'got "{show_value(stripped)}"'
    example = "such as 10.0.0.5:9999, node1.example:9999 or [::1]:9999"

    if stripped.startswith("["):
        host, separator, port_text = stripped[1:].partition("]:")
        if not separator:
            raise ValueError(f"expected HOST:PORT, {example}, {got}")
        if ":" not in host:
            raise ValueError(f"expected HOST:PORT with brackets only around IPv6, {got}")
    else:
        host, separator, port_text = stripped.rpartition(":")
        if not separator:
            raise ValueError(f"expected HOST:PORT, {example}, {got}")
        if ":" in host:
            raise ValueError(f"expected HOST:PORT with an IPv6 host in brackets, {example}, {got}")

    if not _PORT_PATTERN.fullmatch(port_text) or not MIN_PORT <= int(port_text) <= MAX_PORT:
        raise ValueError(f"expected HOST:PORT with a port from {MIN_PORT} to {MAX_PORT}, {got}")
    try:
        normalized_host = _normalize_host(host)
    except ValueError as error:
        raise ValueError(f"expected HOST:PORT, {got}: the host {error}") from None
    return normalized_host, int(port_text)


# Loading


@dataclass(frozen=True)
class _LayerValue:
    raw: object
    source: str
    from_text: bool


def load_settings(flags: Mapping[str, object], environ: Mapping[str, str], cwd: Path) -> Settings:
    """Build the settings from defaults < settings file < VOXA_* environment < flags.

    `flags` contains only the flags the user gave, keyed by setting name. The settings
    file is the one named by --config or VOXA_CONFIG, else ./config/settings.json when
    it exists. Raises SettingsError for the first invalid, unknown or unreadable input.
    """
    cwd = Path(cwd)
    env_values = _read_environment(environ)
    flag_values = _read_flags(flags)

    # The settings file is chosen by the flag or the environment, so it comes first.
    config_file, config_source = _choose_config_file(env_values, flag_values, cwd)
    file_values: dict[str, _LayerValue] = {}
    if config_file is not None:
        file_values = _read_settings_file(config_file, config_source)

    values, sources = _merge_layers((file_values, env_values, flag_values), cwd)
    values["config_file"] = config_file
    sources["config_file"] = config_source

    # Peers from the bootstrap file come first, then the bootstrap setting's own.
    bootstrap_file, bootstrap_file_source = _choose_bootstrap_file(
        values["bootstrap_file"], sources["bootstrap_file"], cwd
    )
    values["bootstrap_file"] = bootstrap_file
    sources["bootstrap_file"] = bootstrap_file_source
    file_peers: tuple[tuple[str, int], ...] = ()
    if bootstrap_file is not None:
        file_peers = _read_bootstrap_file(bootstrap_file, bootstrap_file_source)
    setting_peers = tuple(parse_peer_address(entry) for entry in values["bootstrap"])
    bootstrap_peers = tuple(dict.fromkeys(file_peers + setting_peers))

    _check_ordered_pairs(values, sources)
    _check_network_keys(values, sources)
    return Settings(**values, bootstrap_peers=bootstrap_peers, sources=MappingProxyType(sources))


def _merge_layers(
    layers: tuple[dict[str, _LayerValue], ...], cwd: Path
) -> tuple[dict[str, object], dict[str, str]]:
    """Return the value and source of every setting but config_file; later layers win.

    Every given value is parsed, so an invalid one fails even when a later layer
    overrides it. Relative paths, defaults included, are joined to `cwd`.
    """
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for spec in SETTING_SPECS:
        if spec.name == "config_file":
            continue
        values[spec.name] = spec.default
        sources[spec.name] = DEFAULT_SOURCE
        for layer in layers:
            if spec.name in layer:
                layer_value = layer[spec.name]
                values[spec.name] = _parse_layer_value(spec, layer_value)
                sources[spec.name] = layer_value.source
        if isinstance(values[spec.name], Path):
            values[spec.name] = cwd / values[spec.name]
    return values, sources


def _parse_layer_value(spec: SettingSpec, layer_value: _LayerValue) -> object:
    try:
        return spec.rule.parse(layer_value.raw, layer_value.from_text)
    except ValueError as error:
        if spec.secret:
            message = f"invalid setting {spec.name} (from {layer_value.source}): {error}"
            raise SettingsError(spec.name, message) from None
        as_json = not layer_value.from_text
        raise SettingsError.for_value(
            spec.name, layer_value.raw, layer_value.source, str(error), as_json
        ) from None


def _read_environment(environ: Mapping[str, str]) -> dict[str, _LayerValue]:
    values: dict[str, _LayerValue] = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in CLIENT_ENV_VARIABLES:
            continue
        spec = _SPECS_BY_ENV.get(variable)
        if spec is None:
            suggestion = _suggest(variable, list(_SPECS_BY_ENV))
            raise SettingsError(variable, f"unknown environment variable {variable}; {suggestion}")
        values[spec.name] = _LayerValue(environ[variable], variable, from_text=True)
    return values


def _read_flags(flags: Mapping[str, object]) -> dict[str, _LayerValue]:
    values: dict[str, _LayerValue] = {}
    for name, raw in flags.items():
        spec = SPECS_BY_NAME.get(name)
        if spec is None:
            raise ValueError(f"flags contain {name!r}, which is not a setting name")
        values[name] = _LayerValue(raw, spec.flag, from_text=True)
    return values


def _suggest(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3)
    if matches:
        return "did you mean " + " or ".join(matches) + "?"
    return "run voxanode --help for the list of settings"


def _choose_config_file(
    env_values: dict[str, _LayerValue], flag_values: dict[str, _LayerValue], cwd: Path
) -> tuple[Path | None, str]:
    """Return the settings file to read and its source, or None when none is named or found."""
    spec = SPECS_BY_NAME["config_file"]
    chosen: Path | None = None
    source = DEFAULT_SOURCE
    for layer in (env_values, flag_values):
        if "config_file" in layer:
            layer_value = layer["config_file"]
            chosen = cwd / _parse_layer_value(spec, layer_value)
            source = layer_value.source
    if chosen is None:
        default = cwd / DEFAULT_CONFIG_FILE
        if default.is_file():
            return default, DEFAULT_SOURCE
    return chosen, source


def _load_json_file(path: Path, setting: str, source: str) -> object:
    """Read and decode a JSON file, raising SettingsError on `setting` for any failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        reason = error.strerror or str(error)
        problem = f"cannot read the file ({reason}); give a readable JSON file"
        raise SettingsError.for_value(setting, path, source, problem) from None
    except UnicodeDecodeError as error:
        problem = f"the file is not UTF-8 text ({error.reason} at byte {error.start})"
        raise SettingsError.for_value(setting, path, source, problem) from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as error:
        problem = f"the file is not valid JSON: {error}"
        raise SettingsError.for_value(setting, path, source, problem) from None


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document: dict[str, object] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f'duplicate key "{show_value(key)}"')
        document[key] = value
    return document


def _describe_json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _read_settings_file(path: Path, source: str) -> dict[str, _LayerValue]:
    document = _load_json_file(path, "config_file", source)
    if not isinstance(document, dict):
        found = _describe_json_type(document)
        problem = f"the file must contain a JSON object of settings, not {found}"
        raise SettingsError.for_value("config_file", path, source, problem)

    values: dict[str, _LayerValue] = {}
    for key, raw in document.items():
        if key == "config_file":
            message = (
                f"config_file cannot be set inside the settings file {path}; "
                "use --config or VOXA_CONFIG"
            )
            raise SettingsError(key, message)
        if key not in _FILE_KEYS:
            suggestion = _suggest(key, list(_FILE_KEYS))
            message = f'unknown setting "{show_value(key)}" in {path}; {suggestion}'
            raise SettingsError(key, message)
        values[key] = _LayerValue(raw, str(path), from_text=False)
    return values


def _choose_bootstrap_file(value: object, source: str, cwd: Path) -> tuple[Path | None, str]:
    """Return the bootstrap file to read: the one set, else ./bootstrap_peers.json if present."""
    if isinstance(value, Path):
        return value, source
    default = cwd / DEFAULT_BOOTSTRAP_FILE
    if default.is_file():
        return default, DEFAULT_SOURCE
    return None, DEFAULT_SOURCE


def _read_bootstrap_file(path: Path, source: str) -> tuple[tuple[str, int], ...]:
    document = _load_json_file(path, "bootstrap_file", source)
    if not isinstance(document, list):
        found = _describe_json_type(document)
        problem = f'the file must contain a JSON list of "HOST:PORT" strings, not {found}'
        raise SettingsError.for_value("bootstrap_file", path, source, problem)

    peers = []
    for number, entry in enumerate(document, start=1):
        if not isinstance(entry, str):
            found = _describe_json_type(entry)
            problem = f'entry {number} must be a "HOST:PORT" string, not {found}'
            raise SettingsError.for_value("bootstrap_file", path, source, problem)
        try:
            peers.append(parse_peer_address(entry))
        except ValueError as error:
            problem = f"entry {number}: {error}"
            raise SettingsError.for_value("bootstrap_file", path, source, problem) from None
    return tuple(peers)


def _check_ordered_pairs(values: Mapping[str, object], sources: Mapping[str, str]) -> None:
    """Raise SettingsError when a pair of settings that must be ordered is not.

    The error names the member of the pair that was set away from its default. So when
    a user lowers max_ttl_seconds below the default TTL, it names max_ttl_seconds.
    """
    for smaller, larger, strict in _ORDERED_PAIRS:
        small_value, large_value = values[smaller], values[larger]
        in_order = small_value < large_value if strict else small_value <= large_value
        if in_order:
            continue

        if sources[smaller] == DEFAULT_SOURCE and sources[larger] != DEFAULT_SOURCE:
            relation = "greater than" if strict else "at least"
            other = f"{smaller}={small_value} (from {sources[smaller]})"
            problem = f"must be {relation} {other}"
            raise SettingsError.for_value(larger, large_value, sources[larger], problem)
        relation = "less than" if strict else "at most"
        other = f"{larger}={large_value} (from {sources[larger]})"
        problem = f"must be {relation} {other}"
        raise SettingsError.for_value(smaller, small_value, sources[smaller], problem)


def _check_network_keys(values: Mapping[str, object], sources: Mapping[str, str]) -> None:
    """Raise SettingsError when keys are accepted but no network_key is set to seal with."""
    if not values["network_keys_accepted"] or values["network_key"] is not None:
        return
    source = sources["network_keys_accepted"]
    message = (
        f"invalid setting network_keys_accepted (from {source}): accepted keys need a"
        " network_key to seal with; set network_key too, or remove network_keys_accepted"
    )
    raise SettingsError("network_keys_accepted", message)


# Build information


def resolve_git_commit(
    environ: Mapping[str, str] | None = None, checkout_dir: Path | None = None
) -> str:
    """Find the commit to report when git_commit is unset.

    Returns VOXA_GIT_COMMIT from `environ` (default: os.environ) when set, else the
    short HEAD commit of `checkout_dir` (default: the checkout this package sits in)
    when that directory contains `.git`, else "unknown". A missing git binary, a
    failing git command and a timeout after GIT_TIMEOUT_SECONDS also give "unknown".
    """
    if environ is None:
        environ = os.environ
    from_environment = environ.get("VOXA_GIT_COMMIT", "").strip()
    if from_environment:
        return from_environment

    directory = PACKAGE_CHECKOUT_DIR if checkout_dir is None else Path(checkout_dir)
    if not (directory / ".git").exists():
        return UNKNOWN_GIT_COMMIT
    command = ["git", "-C", str(directory), "rev-parse", "--short", "HEAD"]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.debug("cannot run git to find the commit: %s", error)
        return UNKNOWN_GIT_COMMIT
    commit = completed.stdout.strip()
    if completed.returncode != 0 or not commit:
        logger.debug("git rev-parse failed with status %d in %s", completed.returncode, directory)
        return UNKNOWN_GIT_COMMIT
    return commit
