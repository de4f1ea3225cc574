"""Authenticated encryption of cached tokens: AES-256-GCM from ``cryptography``.

A sealed value is ``VERSION || nonce (12 random bytes) || ciphertext+tag``. The *context*
(associated data) binds a value to where it belongs -- the Redis key, the cache file's
format -- so a value copied to another place does not decrypt. Without the key a cache is
just noise: no token, no claim, no mailbox can be read from it.

The key is 32 random bytes, written in base64 (``openssl rand -base64 32``); a passphrase is
refused, because nothing here stretches it.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from broker.model import Secret

__all__ = ["KEY_HELP", "SealError", "Sealer", "parse_key"]

VERSION: Final = b"\x01"
NONCE_SIZE: Final = 12
KEY_HELP: Final = "must be 32 random bytes in base64; create one with `openssl rand -base64 32`"


class SealError(ValueError):
    """A value does not decrypt: another key, another context, or damaged."""


def parse_key(key: Secret) -> bytes:
    """The 32-byte key in ``key`` (``ValueError`` naming only its origin otherwise)."""
    text = "".join(key.reveal().split())
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"the cache key ({key.origin}) {KEY_HELP}")
    return raw


class Sealer:
    """Seals and opens values with one key. Thread-safe."""

    def __init__(self, key: Secret) -> None:
        self._aead = AESGCM(parse_key(key))

    def __repr__(self) -> str:
        return "Sealer(<key redacted>)"

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        if len(sealed) < 1 + NONCE_SIZE + 16 or sealed[:1] != VERSION:
            raise SealError("not a sealed value of a known version")
        nonce, body = sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, body, context)
        except InvalidTag:
            raise SealError("does not decrypt with this key") from None
