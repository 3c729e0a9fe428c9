"""The node's Ed25519 identity: the key on disk, the DHT id derived from it, signing.

The DHT id is the SHA-1 of the raw public key, so a peer cannot choose its own place
in the keyspace: every signed message carries the public key and the receiver derives
the id itself. The readable node id shown in the API and in logs is `node-` followed by
the first 12 hex digits of the DHT id.
"""

import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

KEY_FILE_NAME = "node_key.pem"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
DHT_ID_BYTES = 20
READABLE_ID_HEX_DIGITS = 12

logger = logging.getLogger(__name__)


class IdentityError(Exception):
    """The key file exists but cannot be read or is not an Ed25519 private key."""


def dht_id_for(public_key: bytes) -> bytes:
    """Return the 160-bit DHT id that belongs to a raw Ed25519 public key."""
    return hashlib.sha1(public_key).digest()


def readable_node_id(dht_id: bytes) -> str:
    """Return the node id as shown to users: `node-` and the first 12 hex digits."""
    return "node-" + dht_id.hex()[:READABLE_ID_HEX_DIGITS]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Return whether `signature` is a valid Ed25519 signature of `data`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A node's private key with its public key, DHT id and readable node id."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.dht_id: bytes = dht_id_for(self.public_key)
        self.node_id: str = readable_node_id(self.dht_id)

    @classmethod
    def generate(cls) -> "Identity":
        """Create an identity with a fresh key that is not saved anywhere."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "Identity":
        """Load the key from `data_dir`, or create it there with mode 0600 on first start."""
        path = Path(data_dir) / KEY_FILE_NAME
        if path.exists():
            return cls(_read_private_key(path))
        try:
            return cls.create(data_dir)
        except IdentityError:
            if not path.exists():
                raise
            # Another process created it first.
            return cls(_read_private_key(path))

    @classmethod
    def load(cls, data_dir: Path) -> "Identity":
        """Load the key from `data_dir`; raise IdentityError when there is none."""
        path = Path(data_dir) / KEY_FILE_NAME
        if not path.exists():
            raise IdentityError(f"no node key at {path}")
        return cls(_read_private_key(path))

    @classmethod
    def create(cls, data_dir: Path) -> "Identity":
        """Create a key in `data_dir` with mode 0600; raise IdentityError if one exists.

        The new key is written to a temporary file that is linked into place, so a
        crash never leaves a half-written key behind and an existing key is never
        replaced, even by a concurrent start.
        """
        path = Path(data_dir) / KEY_FILE_NAME
        if path.exists():
            raise IdentityError(f"a node key already exists at {path}")
        identity = cls.generate()
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as key_file:
                key_file.write(pem)
                key_file.flush()
                os.fsync(key_file.fileno())
            os.link(temporary, path)
        except FileExistsError:
            raise IdentityError(f"a node key already exists at {path}") from None
        finally:
            temporary.unlink(missing_ok=True)
        # Logging names the node only once the key has loaded; this line names it itself.
        logger.info("created node key at %s", path, extra={"node_id": identity.node_id})
        return identity

    def sign(self, data: bytes) -> bytes:
        """Return the Ed25519 signature of `data` made with this node's key."""
        return self._private_key.sign(data)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise IdentityError(f"cannot read node key {path}: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"node key {path} is not an Ed25519 private key")
    return key
