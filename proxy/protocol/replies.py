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
IMAP_AUTH_FAILED: Final = b"NO [AUTHENTICATIONFAILED] Authentication failed."
IMAP_UNAVAILABLE: Final = b"NO [UNAVAILABLE] Temporary failure, try again later."
IMAP_PRIVACY_REQUIRED: Final = b"NO [PRIVACYREQUIRED] Use STARTTLS first."
IMAP_CANCELLED: Final = b"BAD Authentication cancelled."
IMAP_BYE_LINE_TOO_LONG: Final = b"* BYE Line too long.\r\n"
IMAP_BYE_TOO_MANY_ERRORS: Final = b"* BYE Too many invalid commands.\r\n"
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
