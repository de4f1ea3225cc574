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
"""

from __future__ import annotations

from typing import Final

# --- IMAP (RFC 3501/9051 responses, RFC 5530 response codes) -------------------------------
# Tagged results are written without tag and line ending (the machine adds both); untagged
# responses and continuation requests are complete lines.
IMAP_AUTH_FAILED: Final = b"NO [AUTHENTICATIONFAILED] Authentication failed."
IMAP_UNAVAILABLE: Final = b"NO [UNAVAILABLE] Temporary failure, try again later."
IMAP_PRIVACY_REQUIRED: Final = b"NO [PRIVACYREQUIRED] Use STARTTLS first."
IMAP_CANCELLED: Final = b"BAD Authentication cancelled."
IMAP_AUTHENTICATE_FIRST: Final = b"NO Please authenticate first."
IMAP_UNKNOWN_COMMAND: Final = b"BAD Unknown command."
IMAP_SYNTAX_ERROR: Final = b"BAD Syntax error."
IMAP_LITERAL_REFUSED: Final = b"BAD Literal not accepted here."
IMAP_INVALID_BASE64: Final = b"BAD Invalid base64 in SASL response."
IMAP_INVALID_SASL: Final = b"BAD Invalid SASL PLAIN message."
IMAP_UNSUPPORTED_MECHANISM: Final = b"NO Unsupported authentication mechanism."
IMAP_NO_STARTTLS: Final = b"BAD STARTTLS is not available here."
IMAP_BEGIN_TLS: Final = b"OK Begin TLS negotiation now."
IMAP_CAPABILITY_DONE: Final = b"OK CAPABILITY completed."
IMAP_NOOP_DONE: Final = b"OK NOOP completed."
IMAP_ID_DONE: Final = b"OK ID completed."
IMAP_LOGOUT_DONE: Final = b"OK LOGOUT completed."
IMAP_GREETING_TEXT: Final = b"xoauth2-proxy ready."
IMAP_CONTINUE_LITERAL: Final = b"+ Ready for literal data\r\n"
IMAP_CONTINUE_SASL: Final = b"+ \r\n"
IMAP_ID_NIL: Final = b"* ID NIL\r\n"
IMAP_BAD_UNTAGGED: Final = b"* BAD Syntax error: no valid tag.\r\n"
IMAP_BYE_LOGOUT: Final = b"* BYE Logging out.\r\n"
#: A command line or literal over the limit: the command's tag cannot be trusted, so an
#: untagged BAD (RFC 3501 section 7.1.3), then BYE before the connection is closed.
IMAP_LINE_TOO_LONG: Final = b"* BAD Line too long.\r\n* BYE Closing the connection.\r\n"
IMAP_BYE_PIPELINED: Final = b"* BYE Too much data pipelined behind the login.\r\n"
IMAP_BYE_TOO_MANY_ERRORS: Final = b"* BYE Too many invalid commands.\r\n"
IMAP_BYE_TOO_MANY_FAILURES: Final = b"* BYE Too many failed logins.\r\n"
IMAP_BYE_TIMEOUT: Final = b"* BYE Autologout; idle for too long.\r\n"
IMAP_BYE_UNAVAILABLE: Final = b"* BYE [UNAVAILABLE] Temporary failure, try again later.\r\n"
IMAP_BYE_PROTOCOL: Final = b"* BYE Protocol error.\r\n"

# --- POP3 (RFC 1939, RFC 2449 extended response codes, RFC 3206) ---------------------------
# Status lines are written without their line ending (the machine adds it); continuation
# requests, and the lines the driver sends on its own (timeout, error hints), are complete.
POP3_AUTH_FAILED: Final = b"-ERR [AUTH] Authentication failed."
POP3_UNAVAILABLE: Final = b"-ERR [SYS/TEMP] Temporary failure, try again later."
POP3_CANCELLED: Final = b"-ERR Authentication cancelled."
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
POP3_INVALID_BASE64: Final = b"-ERR Invalid base64 in SASL response."
POP3_INVALID_SASL: Final = b"-ERR Invalid SASL PLAIN message."
POP3_UNSUPPORTED_MECHANISM: Final = b"-ERR Unsupported authentication mechanism."
POP3_CONTINUE_SASL: Final = b"+ \r\n"
#: SASL LOGIN prompts, base64 of ``Username:`` and ``Password:`` (as clients expect them).
POP3_CONTINUE_USERNAME: Final = b"+ VXNlcm5hbWU6\r\n"
POP3_CONTINUE_PASSWORD: Final = b"+ UGFzc3dvcmQ6\r\n"
POP3_LINE_TOO_LONG: Final = b"-ERR Line too long.\r\n"
POP3_PIPELINED: Final = b"-ERR Too much data pipelined behind the login.\r\n"
POP3_TOO_MANY_ERRORS: Final = b"-ERR Too many invalid commands.\r\n"
POP3_TOO_MANY_FAILURES: Final = b"-ERR Too many failed logins.\r\n"
POP3_PROTOCOL_ERROR: Final = b"-ERR Protocol error.\r\n"
POP3_UNAVAILABLE_CLOSING: Final = POP3_UNAVAILABLE + b"\r\n"
#: Sent by the driver when the login phase outlasts its deadline (UW ipop3d's wording).
#: ``[SYS/TEMP]`` because the deadline also runs while the proxy waits for a token or the
#: upstream: the client may be waiting for its PASS reply and must not take it for ``[AUTH]``.
POP3_TIMEOUT: Final = b"-ERR [SYS/TEMP] Autologout; idle for too long.\r\n"

# --- SMTP (RFC 5321, RFC 3463 enhanced codes, RFC 4954) ------------------------------------
# Reply lines are written without their line ending (the machine adds it); SMTP_TIMEOUT,
# which the driver sends on its own, is complete.
SMTP_AUTH_SUCCEEDED: Final = b"235 2.7.0 Authentication successful"
SMTP_AUTH_FAILED: Final = b"535 5.7.8 Authentication credentials invalid"
SMTP_UNAVAILABLE: Final = b"454 4.7.0 Temporary authentication failure"
SMTP_CANCELLED: Final = b"501 5.0.0 Authentication cancelled"
SMTP_SYNTAX: Final = b"501 5.5.2 Syntax error"
SMTP_LINE_TOO_LONG: Final = b"500 5.5.6 Line too long"
SMTP_TLS_REQUIRED: Final = b"530 5.7.0 Must issue a STARTTLS command first"
SMTP_AUTH_REQUIRED: Final = b"530 5.7.0 Authentication required"
SMTP_SERVICE_UNAVAILABLE: Final = b"421 4.3.0 Service not available, closing connection"
#: Follows ``220 <host name> `` in the greeting.
SMTP_GREETING_TEXT: Final = b"ESMTP xoauth2-proxy ready"
SMTP_OK: Final = b"250 2.0.0 OK"
SMTP_HELP: Final = b"214 2.0.0 Send EHLO, then AUTH with a mechanism it lists"
SMTP_BYE: Final = b"221 2.0.0 Bye"
SMTP_READY_FOR_TLS: Final = b"220 2.0.0 Ready to start TLS"
#: SASL continuations (RFC 4954 section 4): empty for PLAIN; for LOGIN, base64 of
#: ``Username:`` and ``Password:`` (as clients expect them).
SMTP_CONTINUE: Final = b"334 "
SMTP_ASK_USERNAME: Final = b"334 VXNlcm5hbWU6"
SMTP_ASK_PASSWORD: Final = b"334 UGFzc3dvcmQ6"
SMTP_HELLO_FIRST: Final = b"503 5.5.1 Send EHLO or HELO first"
SMTP_UNKNOWN_COMMAND: Final = b"500 5.5.2 Command not recognized"
SMTP_INVALID_BASE64: Final = b"501 5.5.2 Cannot decode base64 response"
SMTP_INVALID_SASL: Final = b"501 5.5.2 Invalid SASL PLAIN message"
SMTP_UNSUPPORTED_MECHANISM: Final = b"504 5.5.4 Unrecognized authentication type"
SMTP_NO_STARTTLS: Final = b"502 5.5.1 STARTTLS not available"
SMTP_PIPELINED: Final = b"421 4.7.0 Too much data pipelined, closing connection"
SMTP_TOO_MANY_ERRORS: Final = b"421 4.7.0 Too many invalid commands, closing connection"
SMTP_TOO_MANY_FAILURES: Final = b"421 4.7.0 Too many failed logins, closing connection"
SMTP_PROTOCOL_ERROR: Final = b"421 4.5.0 Protocol error, closing connection"
#: Sent by the driver when the login phase outlasts its deadline (4.4.2, "bad connection",
#: is what Postfix says on a timeout). 421 rather than a 5xx: the deadline also runs while
#: the proxy waits for a token or the upstream, which is nobody's permanent failure.
SMTP_TIMEOUT: Final = b"421 4.4.2 Timeout exceeded, closing connection\r\n"

# --- Connection limits, all protocols: complete lines sent instead of a greeting -----------
IMAP_BYE_BUSY: Final = b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
POP3_BUSY: Final = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
SMTP_BUSY: Final = b"421 4.7.0 Too many connections, try again later\r\n"
