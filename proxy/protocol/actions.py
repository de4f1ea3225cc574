"""Actions: imperatives a protocol machine returns for the I/O layer to carry out.

The driver in :mod:`proxy.net.session` dispatches on these with ``match`` and ends with
``assert_never``, so mypy proves that every action is handled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.protocol.events import Side
    from proxy.protocol.sasl import AnyCredentials

__all__ = [
    "Action",
    "BeginRelay",
    "Close",
    "ConnectUpstream",
    "Note",
    "RequestToken",
    "SendToClient",
    "SendToServer",
    "Severity",
    "StartTls",
]


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToServer:
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Open the connection to the upstream (TCP, then TLS if it is implicit).

    Answered by :class:`~proxy.protocol.events.ServerConnected` or
    :class:`~proxy.protocol.events.ServerUnavailable`.
    """


@dataclass(frozen=True, slots=True)
class StartTls:
    """Stop reading ``side`` in plaintext, send ``preface`` (still in plaintext), then
    run the TLS handshake on that side.

    The reply that invites the client to start TLS travels as ``preface`` so that the
    driver can stop reading *before* the client may send its ClientHello. Answered by
    :class:`~proxy.protocol.events.TlsEstablished`.
    """

    side: Side
    preface: bytes = b""


@dataclass(frozen=True, slots=True)
class RequestToken:
    """Check ``credentials`` locally and obtain a token for the mailbox they may use.

    Answered by :class:`~proxy.protocol.events.TokenIssued` or
    :class:`~proxy.protocol.events.TokenRefused`.
    """

    credentials: AnyCredentials


@dataclass(frozen=True, slots=True)
class BeginRelay:
    """Authentication is done: send the tails, then copy bytes both ways unchanged.

    ``to_server`` holds client bytes received after the login command (pipelined
    commands); ``to_client`` holds upstream bytes received after the final reply.
    """

    to_server: bytes
    to_client: bytes


class Severity(enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Note:
    """Something the operator should read in the log (never contains a secret)."""

    severity: Severity
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close both sides after sending anything queued before; ``reason`` is for the log."""

    reason: str = field(default="")


Action = (
    SendToClient
    | SendToServer
    | ConnectUpstream
    | StartTls
    | RequestToken
    | BeginRelay
    | Note
    | Close
)
