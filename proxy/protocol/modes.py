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
    client_tls: ClientTls
    upstream_tls: UpstreamTls
    max_line: int = 8192
    max_literal: int = 8192
    max_bad_commands: int = 10
    max_auth_failures: int = 3
    max_server_line: int = 65536
