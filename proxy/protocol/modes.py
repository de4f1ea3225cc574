"""Connection modes and limits shared by the IMAP, POP3 and SMTP auth machines."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.protocol.sasl import Mechanism

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
    #: The listener asks for TLS client certificates: offer SASL EXTERNAL (RFC 4422
    #: appendix A), with which a client logs in as its certificate's identity.
    sasl_external: bool = False
    #: App keys are configured: offer XOAUTH2 and OAUTHBEARER (RFC 7628) to programs
    #: that present an app key as their bearer token.
    sasl_bearer: bool = False
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

    @property
    def app_mechanisms(self) -> tuple[Mechanism, ...]:
        """The SASL mechanisms for app identities that this listener offers, in the order
        they are advertised after the password mechanisms (where those are offered)."""
        external = (Mechanism.EXTERNAL,) if self.sasl_external else ()
        bearer = (Mechanism.XOAUTH2, Mechanism.OAUTHBEARER) if self.sasl_bearer else ()
        return external + bearer
