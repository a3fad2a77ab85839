"""The Ed25519 adapter (``cryptography``): signing keys, trust directories, sign and verify.

A participant signs with its private key (PEM, PKCS#8, mode 0600); it trusts the public keys in its
trust directory, one ``NAME.pub`` (PEM) per participant it accepts messages from. A name that is not
directory is read again at most every ``RELOAD_S`` seconds, so an agent provisioned after the others
started is trusted, and a revoked one distrusted, without a restart. Key bytes are never logged.
"""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import EdgeAgentError
from edge_agent.exitcodes import ExitCode
from edge_agent.protocol.topics import COORDINATOR, check_id

log = logging.getLogger(__name__)
RELOAD_S = 5.0
_PEM = serialization.Encoding.PEM


class KeysError(EdgeAgentError):
    """A signing key or trust directory cannot be used."""

    exit_code = ExitCode.CONFIG


def new_signing_key() -> bytes:
    """A new Ed25519 private key as PEM (PKCS#8)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_key_pem(private_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError("not an Ed25519 private key")
    return key.public_key().public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class FileSigner:
    """Signs with the Ed25519 key in a file (refused if others can read it)."""

    def __init__(self, path: Path) -> None:
        try:
            mode = path.stat().st_mode
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise KeysError(f"signing key {path}: cannot read: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeysError(
                f"signing key {path}: readable by others (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
            )
        if not isinstance(key, Ed25519PrivateKey):
            raise KeysError(f"signing key {path} is not an Ed25519 key")
        self._key = key

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


class TrustDir:
    """The public keys of a trust directory; ``verify`` is False for a bad signature or an unknown signer."""

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            raise KeysError(f"trust directory {path} does not exist; provision the agent again")
        self.path = path
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._loaded_at = float("-inf")
        self._load()
        if not self._keys:
            raise KeysError(f"trust directory {path} holds no NAME.pub keys")

    def _load(self) -> None:
        self._loaded_at = time.monotonic()
        keys: dict[str, Ed25519PublicKey] = {}
        for file in sorted(self.path.glob("*.pub")):
            name = file.stem
            if name != COORDINATOR:
                try:
                    check_id(name)
                except ValueError:
                    log.warning("trust directory %s: %s is no participant's name; ignored", self.path, file.name)
                    continue
            try:
                key = serialization.load_pem_public_key(file.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("trust directory %s: %s unreadable (%s); ignored", self.path, file.name, exc)
                continue
            if isinstance(key, Ed25519PublicKey):
                keys[name] = key
        self._keys = keys

    def knows(self, name: str) -> bool:
        if time.monotonic() - self._loaded_at >= RELOAD_S:  # new participants appear, revoked ones disappear
            self._load()
        return name in self._keys

    def verify(self, name: str, message: bytes, signature: bytes) -> bool:
        key = self._keys.get(name) if self.knows(name) else None
        if key is None:
            return False
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True
