"""Connection modes and limits shared by the IMAP, POP3 and SMTP auth machines."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["AuthSettings", "ClientTls", "UpstreamTls"]


class ClientTls(enum.Enum):
    """TLS towards the legacy client, per listener."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"


class UpstreamTls(enum.Enum):
    """TLS towards the upstream server; there is no plaintext option."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """What an auth machine needs to know about its listener, and the limits it enforces.

    The limits bound the memory a connection can make the proxy hold before it is
    authenticated (see each machine's ``buffered``).
    """

    client_tls: ClientTls
    upstream_tls: UpstreamTls
    #: Longest command line from the client, line ending included.
    max_line: int = 8192
    #: Largest literal (IMAP) a client may send before login.
    max_literal: int = 8192
    #: Refused or malformed commands before the connection is closed.
    max_bad_commands: int = 10
    #: Failed logins (permanent or temporary) before the connection is closed.
    max_auth_failures: int = 3
    #: Longest response (lines and literals) from the upstream before login.
    max_server_line: int = 65536

    def __post_init__(self) -> None:
        if min(self.max_line, self.max_server_line) < 64:
            raise ValueError("line limits below 64 bytes cannot carry a login")
        if self.max_literal < 0 or min(self.max_bad_commands, self.max_auth_failures) < 1:
            raise ValueError("limits must be positive")
