"""Reply texts and codes for all three protocols, named in one place.

The temporary/permanent split is what keeps legacy clients from prompting for passwords
or disabling accounts when the fault is not theirs:

=============  ==============================  ===========================
protocol       permanent (bad credentials)     temporary (try again later)
=============  ==============================  ===========================
IMAP           ``NO [AUTHENTICATIONFAILED]``   ``NO [UNAVAILABLE]``
               (RFC 5530)
POP3           ``-ERR [AUTH]`` (RFC 3206)      ``-ERR [SYS/TEMP]``
SMTP           ``535 5.7.8`` (RFC 4954)        ``454 4.7.0``
=============  ==============================  ===========================

What the shared login machine (:mod:`proxy.protocol.login`) says is one
:class:`LoginReplies` per protocol (:data:`IMAP`, :data:`POP3`, :data:`SMTP`); the
constants beside each are what only that protocol's grammar says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class LoginReplies:
    """The words of one protocol for what every login machine says.

    *Answers* go to the client's command as the protocol answers commands (IMAP adds the
    command's tag; all add the line ending). *Lines*, sent before the machine closes, and
    *hints*, which travel in the :class:`~proxy.protocol.errors.ProxyError` it raises, are
    complete, line endings included.
    """

    #: Answers: refused credentials (the same bytes whatever was wrong with them), "try
    #: again later" (and how the operator's notes name it), a cancelled SASL exchange, bad
    #: base64, a SASL message that does not parse, a mechanism not offered.
    auth_failed: bytes
    unavailable: bytes
    unavailable_name: str
    cancelled: bytes
    invalid_base64: bytes
    invalid_sasl: bytes
    unsupported_mechanism: bytes
    #: What starts a SASL continuation request, before its payload (``334 ``, ``+ ``).
    continuation: bytes
    #: Lines: the budget of refused commands, or of failed logins, is spent.
    too_many_errors: bytes
    too_many_failures: bytes
    #: Hints: too much pipelined behind a login; a line or literal over its limit; the
    #: client broke the protocol; the upstream did.
    pipelined: bytes
    line_too_long: bytes
    protocol_error: bytes
    upstream_error: bytes


# Below, answers (status lines, tagged results) are written without tag and line ending;
# untagged responses, continuation requests and the lines the driver sends on its own
# (timeout, busy) are complete.

# --- IMAP (RFC 3501/9051 responses, RFC 5530 response codes) -------------------------------
IMAP: Final = LoginReplies(
    auth_failed=b"NO [AUTHENTICATIONFAILED] Authentication failed.",
    unavailable=b"NO [UNAVAILABLE] Temporary failure, try again later.",
    unavailable_name="UNAVAILABLE",
    cancelled=b"BAD Authentication cancelled.",
    invalid_base64=b"BAD Invalid base64 in SASL response.",
    invalid_sasl=b"BAD Invalid SASL PLAIN message.",
    unsupported_mechanism=b"NO Unsupported authentication mechanism.",
    continuation=b"+ ",
    too_many_errors=b"* BYE Too many invalid commands.\r\n",
    too_many_failures=b"* BYE Too many failed logins.\r\n",
    pipelined=b"* BYE Too much data pipelined behind the login.\r\n",
    # The tag of a line over the limit cannot be trusted, so an untagged BAD (RFC 3501
    # section 7.1.3), then BYE before the connection is closed.
    line_too_long=b"* BAD Line too long.\r\n* BYE Closing the connection.\r\n",
    protocol_error=b"* BYE Protocol error.\r\n",
    upstream_error=b"* BYE [UNAVAILABLE] Temporary failure, try again later.\r\n",
)
IMAP_PRIVACY_REQUIRED: Final = b"NO [PRIVACYREQUIRED] Use STARTTLS first."
IMAP_AUTHENTICATE_FIRST: Final = b"NO Please authenticate first."
IMAP_UNKNOWN_COMMAND: Final = b"BAD Unknown command."
IMAP_SYNTAX_ERROR: Final = b"BAD Syntax error."
IMAP_LITERAL_REFUSED: Final = b"BAD Literal not accepted here."
IMAP_NO_STARTTLS: Final = b"BAD STARTTLS is not available here."
IMAP_BEGIN_TLS: Final = b"OK Begin TLS negotiation now."
IMAP_CAPABILITY_DONE: Final = b"OK CAPABILITY completed."
IMAP_NOOP_DONE: Final = b"OK NOOP completed."
IMAP_ID_DONE: Final = b"OK ID completed."
IMAP_LOGOUT_DONE: Final = b"OK LOGOUT completed."
#: Answers a line without a valid tag, as an untagged (``*``) result.
IMAP_NO_VALID_TAG: Final = b"BAD Syntax error: no valid tag."
IMAP_GREETING_TEXT: Final = b"xoauth2-proxy ready."
IMAP_CONTINUE_LITERAL: Final = b"+ Ready for literal data\r\n"
IMAP_ID_NIL: Final = b"* ID NIL\r\n"
IMAP_BYE_LOGOUT: Final = b"* BYE Logging out.\r\n"
IMAP_BYE_TIMEOUT: Final = b"* BYE Autologout; idle for too long.\r\n"

# --- POP3 (RFC 1939, RFC 2449 extended response codes, RFC 3206) ---------------------------
POP3: Final = LoginReplies(
    auth_failed=b"-ERR [AUTH] Authentication failed.",
    unavailable=b"-ERR [SYS/TEMP] Temporary failure, try again later.",
    unavailable_name="SYS/TEMP",
    cancelled=b"-ERR Authentication cancelled.",
    invalid_base64=b"-ERR Invalid base64 in SASL response.",
    invalid_sasl=b"-ERR Invalid SASL PLAIN message.",
    unsupported_mechanism=b"-ERR Unsupported authentication mechanism.",
    continuation=b"+ ",
    too_many_errors=b"-ERR Too many invalid commands.\r\n",
    too_many_failures=b"-ERR Too many failed logins.\r\n",
    pipelined=b"-ERR Too much data pipelined behind the login.\r\n",
    line_too_long=b"-ERR Line too long.\r\n",
    protocol_error=b"-ERR Protocol error.\r\n",
    upstream_error=b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n",
)
POP3_GREETING: Final = b"+OK xoauth2-proxy ready."
POP3_CAPA_FOLLOWS: Final = b"+OK Capability list follows."
POP3_MECHANISMS_FOLLOW: Final = b"+OK Mechanisms follow."
POP3_USER_ACCEPTED: Final = b"+OK Send PASS."
POP3_LOGOUT: Final = b"+OK Logging out."
POP3_BEGIN_TLS: Final = b"+OK Begin TLS negotiation now."
# No response code: the credentials were not judged, so neither [AUTH] (RFC 3206 section 5,
# which AUTH-RESP-CODE reserves for problems with the credentials) nor [SYS/PERM] fits.
POP3_TLS_REQUIRED: Final = b"-ERR Plaintext login disallowed; use STLS first."
POP3_NO_STLS: Final = b"-ERR STLS is not available here."
POP3_NO_USER: Final = b"-ERR No user name given; send USER first."
POP3_LOG_IN_FIRST: Final = b"-ERR Please log in first."
POP3_UNKNOWN_COMMAND: Final = b"-ERR Unknown command."
POP3_SYNTAX_ERROR: Final = b"-ERR Syntax error."
#: Sent by the driver when the login phase outlasts its deadline (UW ipop3d's wording).
#: ``[SYS/TEMP]`` because the deadline also runs while the proxy waits for a token or the
#: upstream: the client may be waiting for its PASS reply and must not take it for ``[AUTH]``.
POP3_TIMEOUT: Final = b"-ERR [SYS/TEMP] Autologout; idle for too long.\r\n"

# --- SMTP (RFC 5321, RFC 3463 enhanced codes, RFC 4954) ------------------------------------
SMTP: Final = LoginReplies(
    auth_failed=b"535 5.7.8 Authentication credentials invalid",
    unavailable=b"454 4.7.0 Temporary authentication failure",
    unavailable_name="454",
    cancelled=b"501 5.0.0 Authentication cancelled",
    invalid_base64=b"501 5.5.2 Cannot decode base64 response",
    invalid_sasl=b"501 5.5.2 Invalid SASL PLAIN message",
    unsupported_mechanism=b"504 5.5.4 Unrecognized authentication type",
    continuation=b"334 ",
    too_many_errors=b"421 4.7.0 Too many invalid commands, closing connection\r\n",
    too_many_failures=b"421 4.7.0 Too many failed logins, closing connection\r\n",
    pipelined=b"421 4.7.0 Too much data pipelined, closing connection\r\n",
    line_too_long=b"500 5.5.6 Line too long\r\n",
    protocol_error=b"421 4.5.0 Protocol error, closing connection\r\n",
    upstream_error=b"421 4.3.0 Service not available, closing connection\r\n",
)
SMTP_AUTH_SUCCEEDED: Final = b"235 2.7.0 Authentication successful"
SMTP_SYNTAX: Final = b"501 5.5.2 Syntax error"
SMTP_TLS_REQUIRED: Final = b"530 5.7.0 Must issue a STARTTLS command first"
SMTP_AUTH_REQUIRED: Final = b"530 5.7.0 Authentication required"
#: Follows ``220 <host name> `` in the greeting.
SMTP_GREETING_TEXT: Final = b"ESMTP xoauth2-proxy ready"
SMTP_OK: Final = b"250 2.0.0 OK"
SMTP_HELP: Final = b"214 2.0.0 Send EHLO, then AUTH with a mechanism it lists"
SMTP_BYE: Final = b"221 2.0.0 Bye"
SMTP_READY_FOR_TLS: Final = b"220 2.0.0 Ready to start TLS"
SMTP_HELLO_FIRST: Final = b"503 5.5.1 Send EHLO or HELO first"
SMTP_UNKNOWN_COMMAND: Final = b"500 5.5.2 Command not recognized"
SMTP_NO_STARTTLS: Final = b"502 5.5.1 STARTTLS not available"
#: Sent by the driver when the login phase outlasts its deadline (4.4.2, "bad connection",
#: is what Postfix says on a timeout). 421 rather than a 5xx: the deadline also runs while
#: the proxy waits for a token or the upstream, which is nobody's permanent failure.
SMTP_TIMEOUT: Final = b"421 4.4.2 Timeout exceeded, closing connection\r\n"

# --- Connection limits, all protocols: complete lines sent instead of a greeting -----------
IMAP_BYE_BUSY: Final = b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
POP3_BUSY: Final = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
SMTP_BUSY: Final = b"421 4.7.0 Too many connections, try again later\r\n"
