"""Network-key sealing of peer datagrams: the `Keyring`, `seal` and `open`.

With a network key set, every peer datagram is encrypted and authenticated with
AES-256-GCM after the framing layer has encoded it, so a host without the key can
neither read peer traffic nor send a datagram that a node accepts. A sealed datagram is

    version (1 byte) | key id (4 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)

The key id is the first 4 bytes of the SHA-256 of the key, so the receiver picks the
key directly instead of trying each one. The associated data is SEAL_LABEL followed
by the version byte and the key id, so the tag covers the header too. Sealing adds no
replay protection: the framing layer drops stale and repeated requests.

A keyring has one primary key, which seals, and any number of accepted keys, which
only open. A network rotates its key in three rolling steps: every node adds the new
key as accepted, then every node makes it primary and keeps the old one accepted, then
every node drops the old key. At every point of that sequence, each node can open
what any other node seals.
"""

import enum
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEAL_VERSION = 1
SEAL_LABEL = b"voxanode-peer-v1"
KEY_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 1 + KEY_ID_BYTES
SEAL_OVERHEAD_BYTES = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
FINGERPRINT_HEX_DIGITS = 8
# NOTE: nonces are random, and for random 96-bit nonces NIST SP 800-38D (section 8.3)
# allows at most 2**32 encryptions under one key, counted over every node of the
# network. Nothing here counts them, so operators must rotate the key before that.


class SealFailure(str, enum.Enum):
    """The check that a datagram failed when it could not be opened."""

    TOO_SHORT = "too_short"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_KEY_ID = "unknown_key_id"
    AUTHENTICATION_FAILED = "authentication_failed"


class SealError(ValueError):
    """A datagram that cannot be opened with this keyring. `reason` names the failed check."""

    def __init__(self, reason: SealFailure, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


class KeyringError(ValueError):
    """Keys that cannot form a keyring: a wrong length, or two keys with one key id."""


def key_id(key: bytes) -> bytes:
    """Return the 4-byte id that sealed datagrams carry to name their key."""
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def key_fingerprint(key: bytes) -> str:
    """Return the first 8 hex digits of the key's SHA-256, safe to log and to compare."""
    return hashlib.sha256(key).hexdigest()[:FINGERPRINT_HEX_DIGITS]


class Keyring:
    """The network keys of a node: `primary` seals, `primary` and `accepted` open.

    With no primary key the keyring is disabled: `seal` and `open` return the datagram
    unchanged and `overhead` is 0. Accepted keys without a primary key raise
    KeyringError, because such a node could open sealed datagrams but not reply to them.
    """

    def __init__(self, primary: bytes | None, accepted: list[bytes]):
        if primary is None and accepted:
            raise KeyringError("accepted network keys need a primary network key to seal with")
        keys = [primary] if primary is not None else []
        # A key listed twice, or the primary key listed again as accepted, counts once.
        keys += [key for key in dict.fromkeys(accepted) if key != primary]

        self._ciphers: dict[bytes, AESGCM] = {}
        self._fingerprints: list[str] = []
        for key in keys:
            if len(key) != KEY_BYTES:
                raise KeyringError(f"a network key must be {KEY_BYTES} bytes, not {len(key)}")
            identifier = key_id(key)
            if identifier in self._ciphers:
                raise KeyringError(
                    f"two network keys share the key id {identifier.hex()}; create a new key"
                )
            self._ciphers[identifier] = AESGCM(key)
            self._fingerprints.append(key_fingerprint(key))
        self._primary_id = key_id(primary) if primary is not None else None

    @property
    def enabled(self) -> bool:
        """Whether datagrams are sealed: true when a primary key is set."""
        return self._primary_id is not None

    @property
    def overhead(self) -> int:
        """Bytes that sealing adds to a datagram: SEAL_OVERHEAD_BYTES, or 0 when disabled."""
        return SEAL_OVERHEAD_BYTES if self.enabled else 0

    @property
    def fingerprints(self) -> list[str]:
        """Fingerprints of every key, the primary key first; empty when disabled."""
        return list(self._fingerprints)

    def seal(self, datagram: bytes) -> bytes:
        """Encrypt and authenticate a datagram with the primary key; unchanged when disabled."""
        if self._primary_id is None:
            return datagram
        header = bytes([SEAL_VERSION]) + self._primary_id
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._ciphers[self._primary_id].encrypt(nonce, datagram, SEAL_LABEL + header)
        return header + nonce + ciphertext

    def open(self, sealed: bytes) -> bytes:
        """Check and decrypt a sealed datagram; unchanged when disabled.

        Raises SealError when the datagram is too short, has another version, names a
        key this keyring does not have, or fails authentication.
        """
        if self._primary_id is None:
            return sealed
        if len(sealed) < SEAL_OVERHEAD_BYTES:
            raise SealError(SealFailure.TOO_SHORT, f"{len(sealed)} bytes")
        if sealed[0] != SEAL_VERSION:
            raise SealError(SealFailure.UNKNOWN_VERSION, f"version byte {sealed[0]}")

        header = sealed[:HEADER_BYTES]
        cipher = self._ciphers.get(header[1:])
        if cipher is None:
            raise SealError(SealFailure.UNKNOWN_KEY_ID, header[1:].hex())
        nonce = sealed[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
        try:
            return cipher.decrypt(nonce, sealed[HEADER_BYTES + NONCE_BYTES :], SEAL_LABEL + header)
        except InvalidTag:
            raise SealError(SealFailure.AUTHENTICATION_FAILED, f"key id {header[1:].hex()}") from None
