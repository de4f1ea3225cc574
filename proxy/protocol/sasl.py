"""SASL pieces shared by IMAP, POP3 and SMTP (RFC 4422, 4616, 7628; XOAUTH2).

Decoding what clients send (PLAIN, LOGIN, and for app identities EXTERNAL, XOAUTH2 and
OAUTHBEARER), the error challenge we answer a refused bearer login with (RFC 7628 section
3.2.2), and encoding what we send upstream (XOAUTH2). Base64 is decoded strictly: anything
but the RFC 4648 alphabet with correct padding is refused, as RFC 4422 requires of SASL
profiles.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from proxy.protocol.framing import has_control_characters, printable

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "LOGIN_PASSWORD_PROMPT",
    "LOGIN_USERNAME_PROMPT",
    "AnyCredentials",
    "BearerCredentials",
    "Credentials",
    "ExternalCredentials",
    "InvalidCredentials",
    "Mechanism",
    "SaslError",
    "b64decode_strict",
    "describe_error_challenge",
    "parse_external",
    "parse_login_field",
    "parse_oauthbearer",
    "parse_plain",
    "parse_response",
    "parse_xoauth2",
    "text_credential",
    "xoauth2_response",
]

#: Longest user name or password we accept from a client, in bytes.
MAX_CREDENTIAL = 1024
#: The LOGIN mechanism's prompts (draft-murchison-sasl-login): base64 of ``Username:`` and
#: ``Password:``, the words clients expect.
LOGIN_USERNAME_PROMPT: Final = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT: Final = b"UGFzc3dvcmQ6"


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


def _text(raw: bytes, what: str, limit: int = MAX_CREDENTIAL) -> str:
    if len(raw) > limit:
        raise InvalidCredentials(f"{what} too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCredentials(f"{what} is not UTF-8") from exc
    if has_control_characters(text):
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
            # RFC 7628 section 3.1 (RFC 6750 section 2.1): "Bearer" 1*SP token.
            scheme, _, credential = value.partition(b" ")
            credential = credential.strip(b" ")
            if scheme.lower() != b"bearer" or not credential:
                raise SaslError(f"{mechanism}: auth must be 'Bearer <token>'")
            token = _text(credential, "bearer token", MAX_BEARER)
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


#: RFC 5801 section 4 ``gs2-header`` as OAUTHBEARER uses it: a channel binding flag, an
#: optional ``a=`` authorization identity, and nothing else.
_GS2_HEADER: Final = re.compile(rb"([ny]),(?:a=([^,]*))?,")
#: RFC 5801 ``saslname``: ``=`` only in the escapes ``=2C`` (a comma) and ``=3D`` (``=``).
_SASLNAME_ESCAPE: Final = re.compile(rb"=(2C|3D)?")


def _saslname(raw: bytes) -> bytes:
    def unescape(match: re.Match[bytes]) -> bytes:
        if match.group(1) is None:
            raise SaslError("OAUTHBEARER: '=' in a user name must start =2C or =3D")
        return b"," if match.group(1) == b"2C" else b"="

    return _SASLNAME_ESCAPE.sub(unescape, raw)


def parse_oauthbearer(message: bytes) -> BearerCredentials:
    """Parse a decoded OAUTHBEARER response (RFC 7628 section 3.1):
    ``n,a=U, ^A [host=...^A port=...^A] auth=Bearer T ^A ^A``; ``U`` names the mailbox."""
    if not message.endswith(b"\x01\x01"):
        raise SaslError("OAUTHBEARER: must end with two ^A")
    header, sep, rest = message[:-2].partition(b"\x01")
    if not sep:
        raise SaslError("OAUTHBEARER: no GS2 header")
    if header.startswith(b"p="):  # it would ask for channel binding, which we lack
        raise SaslError("OAUTHBEARER: channel binding is not supported")
    gs2 = _GS2_HEADER.fullmatch(header)
    if gs2 is None:
        raise SaslError("OAUTHBEARER: malformed GS2 header")
    user = _text(_saslname(gs2.group(2) or b""), "user name")
    field_user, token = _bearer_fields(rest.split(b"\x01") if rest else [], "OAUTHBEARER")
    user = user or field_user
    if not user:
        raise InvalidCredentials("OAUTHBEARER names no user (a=)")
    return BearerCredentials(user=user, key=token)


# --- Mechanisms, as the protocol machines offer and run them ---------------------------------


class Mechanism(enum.Enum):
    """A SASL mechanism a client may log in to the proxy with (names are case-insensitive).

    PLAIN (RFC 4616) and LOGIN carry passwords; EXTERNAL (RFC 4422 appendix A), XOAUTH2 and
    OAUTHBEARER (RFC 7628) carry app identities and are offered only where the listener is
    set up for them (:attr:`~proxy.protocol.modes.AuthSettings.app_mechanisms`).
    """

    PLAIN = "PLAIN"
    LOGIN = "LOGIN"
    EXTERNAL = "EXTERNAL"
    XOAUTH2 = "XOAUTH2"
    OAUTHBEARER = "OAUTHBEARER"

    @classmethod
    def named(cls, name: bytes, offered: tuple[Mechanism, ...]) -> Mechanism | None:
        """The mechanism ``name`` (any case) if it is among ``offered``, else ``None``."""
        return next((m for m in offered if m.value.encode() == name.upper()), None)

    @property
    def bearer(self) -> bool:
        """Does a refusal take RFC 7628's error challenge (XOAUTH2, OAUTHBEARER)?"""
        return self in (Mechanism.XOAUTH2, Mechanism.OAUTHBEARER)

    @property
    def error_challenge(self) -> bytes:
        """The base64 JSON error challenge that announces a refused bearer login
        (RFC 7628 section 3.2.2); the client answers it to get the final failure."""
        return _ERROR_CHALLENGES[self]


#: What servers send: RFC 7628 section 3.2.2 for OAUTHBEARER, Google's and Dovecot's form
#: for XOAUTH2 (which has no RFC). Sent whatever was wrong (unknown key, user or mailbox,
#: malformed message), so that a refusal says nothing about which it was.
_ERROR_CHALLENGES: Final = {
    Mechanism.OAUTHBEARER: base64.b64encode(b'{"status":"invalid_token"}'),
    Mechanism.XOAUTH2: base64.b64encode(b'{"status":"401","schemes":"bearer"}'),
}

_PARSERS: Final[dict[Mechanism, Callable[[bytes], AnyCredentials]]] = {
    Mechanism.PLAIN: parse_plain,
    Mechanism.EXTERNAL: parse_external,
    Mechanism.XOAUTH2: parse_xoauth2,
    Mechanism.OAUTHBEARER: parse_oauthbearer,
}


def parse_response(mechanism: Mechanism, message: bytes) -> AnyCredentials:
    """Parse the one (decoded) client response of PLAIN, EXTERNAL, XOAUTH2 or OAUTHBEARER.

    Raises :class:`SaslError` (or its :class:`InvalidCredentials`) like the parsers above.
    LOGIN takes two responses, so it is not one of these (``ValueError``: a bug).
    """
    parse = _PARSERS.get(mechanism)
    if parse is None:
        raise ValueError(f"{mechanism.value} does not take a single response")
    return parse(message)
