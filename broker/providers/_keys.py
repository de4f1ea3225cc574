"""Private keys from the configuration's PEM secrets; those that sign JWT assertions, loaded
once, in the form authlib signs with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.jwk import ECKey, OKPKey, RSAKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from broker.model import App, Secret

__all__ = ["SigningKey", "load_private_key", "load_signing_key", "pkcs8_pem"]


class SigningKey:
    """A private key as a joserfc key (what authlib's signers take) and its JWS algorithm.

    Passing authlib a joserfc key, not PEM text, is deliberate: with PEM it imports the key on
    every signature and warns (AuthlibDeprecationWarning, joserfc's SecurityWarning).
    """

    def __init__(self, key: RSAKey | ECKey | OKPKey, algorithm: str) -> None:
        self.key = key
        self.algorithm = algorithm

    def __repr__(self) -> str:
        return f"SigningKey(<redacted>, {self.algorithm})"


_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def load_private_key(app: App, secret: Secret, what: str) -> PrivateKeyTypes:
    """The unencrypted private key in the PEM ``secret`` (``what`` names the setting);
    ``ValueError`` naming only where it came from."""
    pem = secret.reveal().encode("utf-8")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError(
            f"app {app.name!r}: the private key in {what} ({secret.origin}) is encrypted; "
            "store it unencrypted with restrictive file permissions"
        ) from None
    except ValueError:
        raise ValueError(
            f"app {app.name!r}: {what} ({secret.origin}) holds no readable PEM private key"
        ) from None


def pkcs8_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    """``key`` as an unencrypted PKCS #8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_signing_key(app: App, secret: Secret, what: str) -> SigningKey:
    """RSA (RS256), EC P-256/384/521 (ES256/384/512) or Ed25519 (``Ed25519``, RFC 9864's
    name for EdDSA with that curve) key from a PEM; ``ValueError``."""
    key = load_private_key(app, secret, what)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"app {app.name!r}: the RSA key in {what} is shorter than 2048 bits")
        return SigningKey(RSAKey.import_key(pkcs8_pem(key)), "RS256")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGORITHMS:
        return SigningKey(ECKey.import_key(pkcs8_pem(key)), _EC_ALGORITHMS[key.curve.name])
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return SigningKey(OKPKey.import_key(pkcs8_pem(key)), "Ed25519")
    raise ValueError(
        f"app {app.name!r}: {what} ({secret.origin}) has a {type(key).__name__}; "
        "use an RSA (2048 bits or more), an EC P-256/P-384/P-521 or an Ed25519 key"
    )
