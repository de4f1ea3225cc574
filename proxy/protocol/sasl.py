"""SASL pieces shared by IMAP, POP3 and SMTP (RFC 4422, 4616, 7628; XOAUTH2).

Decoding what clients send (PLAIN, LOGIN) and encoding what we send upstream (XOAUTH2,
OAUTHBEARER). Base64 is decoded strictly: anything but the RFC 4648 alphabet with correct
padding is refused, as RFC 4422 requires of SASL profiles.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Final

from proxy.protocol.framing import printable

__all__ = [
    "AnyCredentials",
    "BearerCredentials",
    "Credentials",
    "ExternalCredentials",
    "InvalidCredentials",
    "SaslError",
    "b64decode_strict",
    "describe_error_challenge",
    "parse_external",
    "parse_login_field",
    "parse_oauthbearer",
    "parse_plain",
    "parse_xoauth2",
    "text_credential",
    "xoauth2_response",
]

#: Longest user name or password we accept from a client, in bytes.
MAX_CREDENTIAL = 1024


class SaslError(ValueError):
    """The client's SASL message is malformed."""


class InvalidCredentials(SaslError):
    """The message is well formed, but what it carries cannot be anyone's credentials
    (empty or overlong user name, text that is not UTF-8, control characters).

    Protocols answer this like a wrong password (the same bytes, counted as a failed
    login), not as a syntax error: the client did nothing wrong in the protocol.
    """


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a legacy client presented: its login name, its password and, optionally,
    the identity it asks to act as (SASL authorization identity)."""

    login: str
    password: str = field(repr=False)
    authzid: str = ""

    def __repr__(self) -> str:
        return f"Credentials(login={self.login!r}, password=<redacted>, authzid={self.authzid!r})"


#: RFC 4648 base64 with exactly the padding it needs (the decoders of the standard
#: library forgive surplus ``=``).
_BASE64: Final = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def b64decode_strict(data: bytes) -> bytes:
    """Decode base64 strictly; ``SaslError`` on anything else."""
    if not _BASE64.fullmatch(data):
        raise SaslError("invalid base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the pattern rules it out
        raise SaslError("invalid base64") from exc


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_CREDENTIAL:
        raise InvalidCredentials(f"{what} too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCredentials(f"{what} is not UTF-8") from exc
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise InvalidCredentials(f"{what} contains control characters")
    return text


def parse_plain(message: bytes) -> Credentials:
    """Parse a decoded PLAIN message: ``[authzid] NUL authcid NUL passwd`` (RFC 4616)."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN needs exactly three NUL-separated fields")
    authzid, authcid, password = parts
    if not authcid:
        raise InvalidCredentials("PLAIN authentication identity is empty")
    return Credentials(
        login=_text(authcid, "user name"),
        password=_text(password, "password"),
        authzid=_text(authzid, "authorization identity"),
    )


def parse_login_field(decoded: bytes, what: str) -> str:
    """Check one field of the LOGIN mechanism (user name or password), already decoded."""
    return _text(decoded, what)


def text_credential(raw: bytes, what: str) -> str:
    """Check a user name or password sent outside SASL (IMAP LOGIN, POP3 USER/PASS)."""
    return _text(raw, what)


def xoauth2_response(mailbox: str, token: str) -> bytes:
    """The XOAUTH2 initial response, base64-encoded: ``user=M^Aauth=Bearer T^A^A``."""
    raw = f"user={mailbox}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)


def describe_error_challenge(payload: bytes) -> str:
    """Summarise a server's base64 JSON error challenge for the log.

    Gives ``key=value`` pairs of the scalar members, e.g. ``schemes=Bearer, scope=...,
    status=invalid_token``: printable, bounded, and free of secrets (the server does not
    echo the token).
    """
    try:
        decoded = base64.b64decode(payload, validate=True)
        parsed = json.loads(decoded)
    except (binascii.Error, ValueError, RecursionError):
        return "unreadable error challenge"
    if not isinstance(parsed, dict):
        return "unreadable error challenge"
    fields = ", ".join(f"{k}={v}" for k, v in sorted(parsed.items()) if isinstance(v, str | int))
    return printable(fields, 300) if fields else "empty error challenge"


# --- Clients that bring their own credential kinds (app identities) -------------------------

#: Longest bearer token (an app key) we accept from a client, in bytes.
MAX_BEARER = 4096


@dataclass(frozen=True, slots=True)
class ExternalCredentials:
    """SASL EXTERNAL (RFC 4422 appendix A): the TLS client certificate is the credential;
    ``authzid`` optionally names the mailbox to open."""

    authzid: str = ""

    @property
    def login(self) -> str:
        """What logs and the failed-login counts call this attempt."""
        return self.authzid or "(client certificate)"


@dataclass(frozen=True, slots=True)
class BearerCredentials:
    """XOAUTH2 or OAUTHBEARER from a client that speaks OAuth itself: its bearer token is
    one of our app keys (never a real token), and ``user`` names the mailbox."""

    user: str
    key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"BearerCredentials(user={self.user!r}, key=<redacted>)"

    @property
    def login(self) -> str:
        return self.user


#: Every kind of credential a protocol machine can ask the driver to check.
AnyCredentials = Credentials | ExternalCredentials | BearerCredentials


def parse_external(message: bytes) -> ExternalCredentials:
    """Parse a decoded EXTERNAL response: empty, or the authorization identity."""
    return ExternalCredentials(authzid=_text(message, "authorization identity") if message else "")


def _bearer_fields(fields: list[bytes], mechanism: str) -> tuple[str, str]:
    """``user`` (if present) and the bearer token from ``key=value`` fields."""
    user, token = "", None
    for item in fields:
        name, sep, value = item.partition(b"=")
        if not sep:
            raise SaslError(f"{mechanism}: field without '='")
        if name == b"user":
            user = _text(value, "user name")
        elif name == b"auth":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() != b"bearer" or not credential:
                raise SaslError(f"{mechanism}: auth must be 'Bearer <token>'")
            if len(credential) > MAX_BEARER:
                raise InvalidCredentials("bearer token too long")
            token = _text(credential.strip(), "bearer token")
    if token is None:
        raise SaslError(f"{mechanism}: no auth field")
    return user, token


def parse_xoauth2(message: bytes) -> BearerCredentials:
    """Parse a decoded XOAUTH2 response: ``user=U ^A auth=Bearer T ^A ^A``."""
    if not message.endswith(b"\x01\x01"):
        raise SaslError("XOAUTH2: must end with two ^A")
    user, token = _bearer_fields(message[:-2].split(b"\x01"), "XOAUTH2")
    if not user:
        raise InvalidCredentials("XOAUTH2 user is empty")
    return BearerCredentials(user=user, key=token)


def parse_oauthbearer(message: bytes) -> BearerCredentials:
    """Parse a decoded OAUTHBEARER response (RFC 7628 section 3.1):
    ``n,a=U, ^A [host=...^A port=...^A] auth=Bearer T ^A ^A``; ``U`` names the mailbox."""
    if not message.endswith(b"\x01\x01"):
        raise SaslError("OAUTHBEARER: must end with two ^A")
    header, sep, rest = message[:-2].partition(b"\x01")
    if not sep:
        raise SaslError("OAUTHBEARER: no GS2 header")
    flag, _, attributes = header.partition(b",")
    if flag not in (b"n", b"y"):  # "p=..." would ask for channel binding, which we lack
        raise SaslError("OAUTHBEARER: channel binding is not supported")
    user = ""
    for attribute in attributes.split(b","):
        if attribute.startswith(b"a="):
            # RFC 5801 saslname: "=2C" is a comma, "=3D" an equals sign.
            user = _text(attribute[2:].replace(b"=2C", b",").replace(b"=3D", b"="), "user name")
    field_user, token = _bearer_fields(rest.split(b"\x01") if rest else [], "OAUTHBEARER")
    user = user or field_user
    if not user:
        raise InvalidCredentials("OAUTHBEARER names no user (a=)")
    return BearerCredentials(user=user, key=token)
