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
IMAP_BYE_LINE_TOO_LONG: Final = b"* BYE Line too long.\r\n"
IMAP_BYE_PIPELINED: Final = b"* BYE Too much data pipelined behind the login.\r\n"
IMAP_BYE_TOO_MANY_ERRORS: Final = b"* BYE Too many invalid commands.\r\n"
IMAP_BYE_TOO_MANY_FAILURES: Final = b"* BYE Too many failed logins.\r\n"
IMAP_BYE_TIMEOUT: Final = b"* BYE Autologout; idle for too long.\r\n"
IMAP_BYE_UNAVAILABLE: Final = b"* BYE [UNAVAILABLE] Temporary failure, try again later.\r\n"
IMAP_BYE_PROTOCOL: Final = b"* BYE Protocol error.\r\n"

# --- POP3 (RFC 1939, RFC 2449 extended response codes, RFC 3206) ---------------------------
POP3_AUTH_FAILED: Final = b"-ERR [AUTH] Authentication failed."
POP3_UNAVAILABLE: Final = b"-ERR [SYS/TEMP] Temporary failure, try again later."
POP3_CANCELLED: Final = b"-ERR Authentication cancelled."

# --- SMTP (RFC 5321, RFC 3463 enhanced codes, RFC 4954) ------------------------------------
SMTP_AUTH_SUCCEEDED: Final = b"235 2.7.0 Authentication successful"
SMTP_AUTH_FAILED: Final = b"535 5.7.8 Authentication credentials invalid"
SMTP_UNAVAILABLE: Final = b"454 4.7.0 Temporary authentication failure"
SMTP_CANCELLED: Final = b"501 5.0.0 Authentication cancelled"
SMTP_SYNTAX: Final = b"501 5.5.2 Syntax error"
SMTP_LINE_TOO_LONG: Final = b"500 5.5.6 Line too long"
SMTP_TLS_REQUIRED: Final = b"530 5.7.0 Must issue a STARTTLS command first"
SMTP_AUTH_REQUIRED: Final = b"530 5.7.0 Authentication required"
SMTP_SERVICE_UNAVAILABLE: Final = b"421 4.3.0 Service not available, closing connection"

# --- Connection limits, all protocols: complete lines sent instead of a greeting -----------
IMAP_BYE_BUSY: Final = b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
POP3_BUSY: Final = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
SMTP_BUSY: Final = b"421 4.7.0 Too many connections, try again later\r\n"
