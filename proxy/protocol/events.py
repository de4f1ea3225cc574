"""Events: facts, in the past tense, that the I/O layer feeds to a protocol machine.

Every auth-phase machine (``ImapAuth``, ``Pop3Auth``, ``SmtpAuth``) takes these through
``handle(event)`` and answers with a list of :mod:`proxy.protocol.actions`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.model import AccessToken

__all__ = [
    "ClientClosed",
    "ClientDataReceived",
    "Event",
    "Refusal",
    "ServerClosed",
    "ServerConnected",
    "ServerDataReceived",
    "ServerUnavailable",
    "Side",
    "TlsEstablished",
    "TokenIssued",
    "TokenRefused",
    "rejection_causes",
]


class Side(enum.Enum):
    """Which peer of the proxy: the legacy client, or the upstream mail server."""

    CLIENT = "client"
    SERVER = "server"


class Refusal(enum.Enum):
    """Why no token was issued for a login, as the client must be told."""

    #: Wrong password, unknown user, mailbox or protocol not allowed: a permanent failure
    #: that must look the same in every case.
    CREDENTIALS = "credentials"
    #: The identity provider or our configuration failed: a temporary failure, so that legacy
    #: clients retry later instead of prompting for a password.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class ClientDataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class ClientClosed:
    pass


@dataclass(frozen=True, slots=True)
class ServerConnected:
    """The TCP connection to the upstream is open (and its implicit TLS established)."""


@dataclass(frozen=True, slots=True)
class ServerUnavailable:
    """The upstream could not be reached; ``reason`` is for the operator's log."""

    reason: str


@dataclass(frozen=True, slots=True)
class ServerDataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class ServerClosed:
    pass


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    side: Side


@dataclass(frozen=True, slots=True)
class TokenIssued:
    """The local credentials were accepted and a token obtained for ``mailbox``."""

    mailbox: str
    token: AccessToken = field(repr=False)
    #: Who issued it (the app's provider): the likely causes of a refusal depend on it.
    provider: str = "microsoft"


def rejection_causes(provider: str) -> str:
    """Why a mail server may refuse a token of ``provider`` other than Microsoft's (whose
    causes each protocol names itself: roles, service principals, Exchange settings)."""
    if provider == "delegated":
        return (
            "Likely causes: the account that signed in may not open this mailbox (a shared "
            "mailbox needs FullAccess, sending as it SendAs, for that account), the protocol "
            "is turned off for it (Outlook.com and Gmail settings; Exchange: Set-CASMailbox), "
            "or the token lacks the protocol's permission (sign in again and consent to it)."
        )
    if provider == "google":
        return (
            "Likely causes: domain-wide delegation does not grant the service account "
            "https://mail.google.com/ for this user, or IMAP/POP is off for the user "
            "(Google Admin console: Apps > Google Workspace > Gmail > End User Access)."
        )
    return (
        "Likely causes: the token does not fit what this server checks -- its issuer, "
        "audience, scope or header typ (`xoauth2-proxy token --decode APP` shows them; the "
        "server's log says which) -- or the client may not open this mailbox there."
    )


@dataclass(frozen=True, slots=True)
class TokenRefused:
    refusal: Refusal


Event = (
    ClientDataReceived
    | ClientClosed
    | ServerConnected
    | ServerUnavailable
    | ServerDataReceived
    | ServerClosed
    | TlsEstablished
    | TokenIssued
    | TokenRefused
)
