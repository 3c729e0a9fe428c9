"""API bearer tokens: the token file in the data directory, and matching presented tokens.

A token is `voxa_` followed by 32 random bytes in URL-safe base64. It is printed once
when created and never stored: the token file `tokens.json` keeps, per token, an id
(`tok-` and 8 hex digits), a name, a scope, the SHA-256 of the token, the creation time
and the revocation time. The file is written with mode 0600 to a temporary file that
replaces the old one, so a reader sees the old or the new file, never a partial one.
Changes go through `create_token` and `revoke_token`, which hold an exclusive lock on
`tokens.json.lock` while they read, change and write the file.

The running daemon keeps a `TokenStore`: it checks the file's stat signature at most
once per `TOKEN_FILE_CHECK_INTERVAL_SECONDS`, and at once for a token it does not know,
and rereads the file when the signature changed. So a created token works at once and
a revoked one is rejected within that interval, without a restart.
"""

import base64
import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxanode.api.timestamps import isoformat_utc

TOKEN_FILE_NAME = "tokens.json"
TOKEN_LOCK_FILE_NAME = "tokens.json.lock"
TOKEN_FILE_MODE = 0o600
TOKEN_FILE_SCHEMA_VERSION = 1
TOKEN_PREFIX = "voxa_"
TOKEN_RANDOM_BYTES = 32
TOKEN_ID_PREFIX = "tok-"
TOKEN_ID_RANDOM_BYTES = 4
MAX_TOKEN_NAME_CHARS = 64
# 32 bytes are 43 URL-safe base64 characters without padding.
TOKEN_PATTERN = re.compile(r"voxa_[A-Za-z0-9_-]{43}")
TOKEN_ID_PATTERN = re.compile(r"tok-[0-9a-f]{8}")
TOKEN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_HEX_PATTERN = re.compile(r"[0-9a-f]{64}")
# The API checks the token file's stat signature at most this often while known tokens
# arrive, so a revoked token is rejected within this time. In a py-spy profile, one
# stat per request cost about 9 µs of a 230 µs retrieve.
TOKEN_FILE_CHECK_INTERVAL_SECONDS = 1.0

logger = logging.getLogger(__name__)


class Scope(enum.StrEnum):
    """Permission level of a token. Each scope includes the rights of the scopes before it."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the order read < write < admin."""
        return _SCOPE_RANKS[self]

    def allows(self, required: "Scope") -> bool:
        """Return whether a token of this scope may do what `required` guards."""
        return _SCOPE_RANKS[self] >= _SCOPE_RANKS[required]


_SCOPE_RANKS = {scope: rank for rank, scope in enumerate(Scope)}
SCOPE_NAMES = tuple(scope.value for scope in Scope)


class TokenError(Exception):
    """Base class of the token errors."""


class TokenUsageError(TokenError):
    """A token command got an invalid name or scope, or names a token that does not exist."""


class TokenFileError(TokenError):
    """The token file cannot be read, parsed or written. The message names the file."""


@dataclass(frozen=True)
class TokenRecord:
    """One entry of the token file. `sha256` is the hex digest of the token itself."""

    id: str
    name: str
    scope: Scope
    sha256: str
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """Whether the token is not revoked."""
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        """Return the entry as stored in the token file."""
        return {
            "id": self.id,
            "name": self.name,
            "scope": self.scope.value,
            "sha256": self.sha256,
            "created": self.created_at,
            "revoked": self.revoked_at,
        }

    def describe(self) -> dict[str, Any]:
        """Return the entry without its hash, as `voxanode token list --json` prints it."""
        return {
            "id": self.id,
            "name": self.name,
            "scope": self.scope.value,
            "created": self.created_at,
            "revoked": self.revoked_at,
        }


def token_file_path(data_dir: Path) -> Path:
    """Return the path of the token file in a node's data directory."""
    return Path(data_dir) / TOKEN_FILE_NAME


def new_token() -> str:
    """Return a fresh random token: the prefix and 32 random bytes in URL-safe base64."""
    random_part = base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_RANDOM_BYTES))
    return TOKEN_PREFIX + random_part.decode("ascii").rstrip("=")


def hash_token(token: str) -> bytes:
    """Return the SHA-256 digest of a token, the form in which it is stored."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def is_well_formed_token(text: str) -> bool:
    """Return whether `text` has the shape of a token that `new_token` makes."""
    return TOKEN_PATTERN.fullmatch(text) is not None


def check_token_name(name: str) -> str:
    """Return `name` if it is a valid token name, else raise TokenUsageError."""
    if not TOKEN_NAME_PATTERN.fullmatch(name):
        raise TokenUsageError(
            f"invalid token name {json.dumps(name)[: MAX_TOKEN_NAME_CHARS + 2]}: use 1 to "
            f"{MAX_TOKEN_NAME_CHARS} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if TOKEN_ID_PATTERN.fullmatch(name):
        raise TokenUsageError(
            f"invalid token name {name}: it has the form of a token id, so `voxanode token revoke`"
            " could not tell them apart; choose another name"
        )
    return name


def parse_scope(text: str) -> Scope:
    """Return the Scope named `text`, else raise TokenUsageError listing the scopes."""
    try:
        return Scope(text)
    except ValueError:
        raise TokenUsageError(
            f"invalid scope {json.dumps(text)[:MAX_TOKEN_NAME_CHARS]}: must be one of {', '.join(SCOPE_NAMES)}"
        ) from None


# --- the token file ---------------------------------------------------------------------


def read_token_file(path: Path) -> list[TokenRecord]:
    """Return the entries of the token file, or an empty list when it does not exist.

    Raises TokenFileError when the file cannot be read or is not a valid token file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"cannot read the token file {path}: {_reason(error)}") from None
    try:
        return parse_token_document(json.loads(text))
    except ValueError as error:
        raise TokenFileError(f"invalid token file {path}: {error}") from None


def parse_token_document(document: object) -> list[TokenRecord]:
    """Return the entries of a decoded token file; raise ValueError naming the first problem."""
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object with schema_version and tokens")
    version = document.get("schema_version")
    if version != TOKEN_FILE_SCHEMA_VERSION:
        raise ValueError(
            f"schema_version is {json.dumps(version)}, but this version reads only {TOKEN_FILE_SCHEMA_VERSION}"
        )
    entries = document.get("tokens")
    if not isinstance(entries, list):
        raise ValueError("tokens must be a list")

    records = []
    seen_ids: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        try:
            record = _parse_entry(entry)
        except ValueError as error:
            raise ValueError(f"token entry {number}: {error}") from None
        if record.id in seen_ids:
            raise ValueError(f"token entry {number}: id {record.id} appears twice")
        seen_ids.add(record.id)
        records.append(record)
    return records


def _parse_entry(entry: object) -> TokenRecord:
    if not isinstance(entry, dict):
        raise ValueError("must be a JSON object")
    token_id = entry.get("id")
    name = entry.get("name")
    scope = entry.get("scope")
    digest = entry.get("sha256")
    created = entry.get("created")
    revoked = entry.get("revoked")
    if not isinstance(token_id, str) or not TOKEN_ID_PATTERN.fullmatch(token_id):
        raise ValueError("id must be tok- and 8 hex digits")
    if not isinstance(name, str) or not TOKEN_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name of {token_id} is not a valid token name")
    if scope not in SCOPE_NAMES:
        raise ValueError(f"scope of {token_id} must be one of {', '.join(SCOPE_NAMES)}")
    if not isinstance(digest, str) or not SHA256_HEX_PATTERN.fullmatch(digest):
        raise ValueError(f"sha256 of {token_id} must be 64 lower-case hex digits")
    if not isinstance(created, str):
        raise ValueError(f"created of {token_id} must be a time string")
    if revoked is not None and not isinstance(revoked, str):
        raise ValueError(f"revoked of {token_id} must be a time string or null")
    return TokenRecord(token_id, name, Scope(scope), digest, created, revoked)


def write_token_file(path: Path, records: list[TokenRecord]) -> None:
    """Replace the token file atomically with `records`; the file gets mode 0600.

    Raises TokenFileError when the file cannot be written; the old file then stays.
    """
    path = Path(path)
    document = {
        "schema_version": TOKEN_FILE_SCHEMA_VERSION,
        "tokens": [record.to_json() for record in records],
    }
    text = json.dumps(document, indent=2) + "\n"
    temporary_name = None
    try:
        # mkstemp creates the file with mode 0600, so no other user can read it at any time.
        descriptor, temporary_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{TOKEN_FILE_NAME}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "w", encoding="utf-8") as temporary_file:
            temporary_file.write(text)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        os.chmod(temporary_name, TOKEN_FILE_MODE)
        os.replace(temporary_name, path)
        temporary_name = None
        _fsync_directory(path.parent)
    except OSError as error:
        raise TokenFileError(f"cannot write the token file {path}: {_reason(error)}") from None
    finally:
        if temporary_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary_name)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-change-write of the token file at `path`."""
    lock_path = Path(path).with_name(TOKEN_LOCK_FILE_NAME)
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, TOKEN_FILE_MODE)
    except OSError as error:
        raise TokenFileError(f"cannot open the lock file {lock_path}: {_reason(error)}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def create_token(path: Path, name: str, scope: Scope) -> tuple[str, TokenRecord]:
    """Add a new token to the token file and return (token, its entry).

    The token is returned only here. Raises TokenUsageError when the name is invalid
    or an active token has it already, and TokenFileError when the file fails.
    """
    check_token_name(name)
    with _locked(path):
        records = read_token_file(path)
        if any(record.active and record.name == name for record in records):
            raise TokenUsageError(
                f"an active token is already named {name}; choose another name,"
                f" or revoke it first with `voxanode token revoke {name}`"
            )
        taken_ids = {record.id for record in records}
        token_id = _new_token_id(taken_ids)
        token = new_token()
        record = TokenRecord(token_id, name, scope, hash_token(token).hex(), isoformat_utc())
        write_token_file(path, [*records, record])
    return token, record


def _new_token_id(taken_ids: set[str]) -> str:
    while True:
        token_id = TOKEN_ID_PREFIX + secrets.token_hex(TOKEN_ID_RANDOM_BYTES)
        if token_id not in taken_ids:
            return token_id


def revoke_token(path: Path, id_or_name: str) -> tuple[TokenRecord, bool]:
    """Revoke the token with this id, or the active token with this name.

    Returns (entry, revoked_now). `revoked_now` is False when the token was revoked
    before, and the file is then left unchanged. Raises TokenUsageError when no token
    has this id or name, and TokenFileError when the file fails.
    """
    # An unknown token fails here, before the lock file is made, also when the data
    # directory does not exist.
    _find_for_revoke(read_token_file(path), id_or_name)
    with _locked(path):
        records = read_token_file(path)
        index = _find_for_revoke(records, id_or_name)
        record = records[index]
        if not record.active:
            return record, False
        revoked = dataclasses.replace(record, revoked_at=isoformat_utc())
        records[index] = revoked
        write_token_file(path, records)
    return revoked, True


def _find_for_revoke(records: list[TokenRecord], id_or_name: str) -> int:
    """Return the index of the token to revoke: by id, else the active one with that name.

    Without an active token of that name, the most recent revoked one is returned.
    """
    for index, record in enumerate(records):
        if record.id == id_or_name:
            return index
    named = [index for index, record in enumerate(records) if record.name == id_or_name]
    if not named:
        raise TokenUsageError(
            f"no token has the id or name {json.dumps(id_or_name)[: MAX_TOKEN_NAME_CHARS + 2]};"
            " list the tokens with `voxanode token list`"
        )
    active = [index for index in named if records[index].active]
    return active[0] if active else named[-1]


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


# --- the running daemon's view ------------------------------------------------------------


@dataclass(frozen=True)
class _LoadedToken:
    record: TokenRecord
    digest: bytes


class TokenStore:
    """The tokens of one token file, reread whenever the file changes.

    `refresh` compares the file's stat signature (inode, size, modification time) with
    that of the last read, so an unchanged file costs one stat call. The API calls
    `refresh_if_due`, which makes that call at most once per check interval. When the file
    fails to read or parse, the store keeps the tokens of the last good read and logs
    one error. It reads that broken file again only after the file changes.
    """

    def __init__(
        self, path: Path, check_interval_seconds: float = TOKEN_FILE_CHECK_INTERVAL_SECONDS
    ):
        self.path = Path(path)
        self.check_interval_seconds = check_interval_seconds
        self._tokens: tuple[_LoadedToken, ...] = ()
        # The stat result of the last read, or ("stat failed", errno) after a failed stat.
        self._signature: tuple[object, ...] | None = None
        self._read_once = False
        # time.monotonic() after which refresh_if_due checks the file again.
        self._next_check = 0.0
        # Why the last read of a changed file failed; None after a good read.
        self.last_error: str | None = None

    @property
    def active_count(self) -> int:
        """Number of tokens that are not revoked, as of the last good read."""
        return sum(1 for token in self._tokens if token.record.active)

    def refresh_if_due(self) -> None:
        """Call `refresh` unless it ran less than `check_interval_seconds` ago."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval_seconds
        self.refresh()

    def refresh(self) -> None:
        """Reread the token file if it changed since the last call."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._forget_all()
            return
        except OSError as error:
            # Logged once per failure kind, because refresh runs about once a second.
            if self._signature != ("stat failed", error.errno):
                self._signature = ("stat failed", error.errno)
                logger.error(
                    "cannot stat the token file %s: %s; keeping the %d active tokens read before",
                    self.path,
                    _reason(error),
                    self.active_count,
                )
            self.last_error = f"cannot stat it: {_reason(error)}"
            return

        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            records = read_token_file(self.path)
        except TokenFileError as error:
            # The message names the file and the problem, never file content.
            logger.error("%s; keeping the %d active tokens read before", error, self.active_count)
            self.last_error = str(error)
            return

        self.last_error = None
        first_read = not self._read_once
        self._read_once = True
        self._tokens = tuple(
            _LoadedToken(record, bytes.fromhex(record.sha256)) for record in records
        )
        # The daemon logs the count at start, so only later reads are worth an INFO line.
        logger.log(
            logging.DEBUG if first_read else logging.INFO,
            "read the token file %s: %d active tokens, %d revoked",
            self.path,
            self.active_count,
            len(self._tokens) - self.active_count,
        )

    def _forget_all(self) -> None:
        if self._signature is None and not self._tokens:
            return
        logger.warning("the token file %s was removed, so no token is valid now", self.path)
        self._tokens = ()
        self._signature = None

    def find(self, token: str) -> TokenRecord | None:
        """Return the entry whose hash matches `token`, revoked ones included, or None.

        Every stored hash is compared with hmac.compare_digest, and the loop goes on
        after a match. So the time taken does not reveal how many bytes of a hash
        matched, and hardly depends on which entry matched.
        """
        presented = hash_token(token)
        found: TokenRecord | None = None
        for loaded in self._tokens:
            if hmac.compare_digest(loaded.digest, presented):
                found = loaded.record
        return found
