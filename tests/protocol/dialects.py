"""What each protocol says, for transcripts that hold for all three (``test_login.py``) and
for each protocol's own (``test_imap.py``, ``test_pop3.py``, ``test_smtp.py``).

A :class:`Dialect` is a phrasebook: the transcript lines (see :mod:`tests.protocol.playbook`)
in which one protocol greets, logs in, answers, refuses and hands over, written out in full,
so that a transcript built from them still states every byte the machine must send. The
machine's own reply constants are never used here: the phrasebook is the independent
record of what the client must see.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from proxy.protocol.actions import Action, Note, RequestToken, SendToServer
from proxy.protocol.errors import ProxyError
from proxy.protocol.imap import ImapAuth
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls
from proxy.protocol.pop3 import Pop3Auth
from proxy.protocol.sasl import xoauth2_response
from proxy.protocol.smtp import SmtpAuth
from tests.protocol.playbook import (
    IMAP_TRAILERS,
    TOKEN,
    Feed,
    Mode,
    Step,
    Trailers,
    run,
    transcript,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "APP_KEY",
    "DIALECTS",
    "DOVECOT_EHLO",
    "IMAP",
    "LOGIN_DIALECTS",
    "MAILBOX",
    "PASSWORD",
    "POP3",
    "POP3_READY",
    "SMTP",
    "VARS",
    "AnyAuth",
    "Dialect",
    "app_settings",
    "assert_hidden",
    "b64",
    "collect",
    "each_dialect",
    "each_login_dialect",
]

AnyAuth = ImapAuth | Pop3Auth | SmtpAuth

MAILBOX = "alice@contoso.com"
#: An app key, as ``xoauth2-proxy app-key`` makes them.
APP_KEY = "xo2k_c2VjcmV0LWFwcC1rZXktZm9yLXRyYW5zY3JpcHRz"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


#: The password of the secrets tests, which must show nowhere.
PASSWORD = "s3cr3t-Pa55"

VARS = {
    "EXISTS": 'client=b"* 1 EXISTS\\r\\n"',
    "XOAUTH2": xoauth2_response(MAILBOX, TOKEN.value).decode(),
    "PLAIN": b64("\0alice\0secret"),
    "PLAIN_WRONG": b64("\0alice\0wrong"),
    "ALICE": b64("alice"),
    "SECRET": b64("secret"),
    "PASSWORD": PASSWORD,
    "PASSWORD_B64": b64(PASSWORD),
    "PASSWORD_PLAIN": b64(f"\0alice\0{PASSWORD}"),
    "KEY": APP_KEY,
    # What clients that speak OAuth send, with our app key as their token.
    "XO": b64(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01"),
    "OB": b64(f"n,a={MAILBOX},\x01host=proxy.test\x01port=993\x01auth=Bearer {APP_KEY}\x01\x01"),
    # Our error challenges, exactly: {"status":"401","schemes":"bearer"} for XOAUTH2,
    # {"status":"invalid_token"} for OAUTHBEARER (RFC 7628 section 3.2.2).
    "XO_REFUSED": "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=",
    "OB_REFUSED": "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=",
    # Dovecot's error challenge for a token it refuses.
    "CHALLENGE": "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
}


def _lines(text: str) -> str:
    """A transcript fragment, one step a line, each ending in a newline."""
    return "".join(line.strip() + "\n" for line in text.strip().splitlines())


@dataclass(frozen=True)
class Dialect:
    """One protocol's phrasebook. Fragments end in a newline, so they concatenate."""

    name: str
    #: Commands and their answers carry tags (IMAP).
    tags: bool
    make: Callable[[AuthSettings], AnyAuth]
    trailers: Trailers
    #: The LOGIN mechanism is offered (besides PLAIN, for passwords).
    login_mechanism: bool
    #: The verb of a SASL login (``AUTHENTICATE``, ``AUTH``), and of its continuation
    #: requests (``+``, ``334``).
    auth_verb: str
    prompt_marker: str
    #: ``>> start`` up to ``<< connect-upstream``: on an implicit-TLS listener (where
    #: ``{mechanisms}`` are IMAP's ``AUTH=`` capabilities), and on a STARTTLS listener.
    start_template: str
    starttls_start: str
    #: The upstream from ``>> server-connected`` until it is ready for the login.
    upstream_ready: str
    #: What the client says before it may log in (SMTP's HELO).
    hello: str
    #: After ``>> token``: the login going upstream, and the upstream accepting it (with
    #: what the client is told) or rejecting the token.
    token_out: str
    accepted: str
    rejected: str
    #: After ``>> token``'s login went upstream: a temporary refusal.
    refused_later: str
    #: An upstream that takes the token only after its continuation request (IMAP without
    #: SASL-IR), and what goes to it after ``>> token``; the same as above elsewhere.
    two_step_ready: str
    two_step_out: str
    #: Refusals of the token (with the note they get: severity, then what it says), and
    #: refusals of the login before the token went (all temporary for the client).
    refusals: tuple[tuple[str, str], ...]
    early_refusals: tuple[tuple[str, str], ...]
    #: What the note of a rejected token names among the likely causes.
    causes: tuple[str, ...]
    #: What a ready upstream may not say (nobody asked).
    unexpected: tuple[str, ...]
    #: Logins in the protocol's own commands whose credentials cannot be anyone's (raw
    #: bytes, as text cannot show them), what is answered before the refusal, and why.
    impossible: tuple[tuple[bytes, str, str], ...]
    #: The upstream saying it goes away while idle, and how the notes quote it.
    goodbye: str
    goodbye_said: str
    #: From ``>> server-connected``: an upstream without XOAUTH2, as the note quotes it.
    no_xoauth2: str
    no_xoauth2_said: str
    #: From ``>> server-connected``: the upstream's go-ahead to our STARTTLS.
    upstream_starttls: str
    #: Answers (without the IMAP tag).
    failed: str
    unavailable: str
    unavailable_name: str
    cancelled: str
    invalid_base64: str
    invalid_sasl: str
    unsupported: str
    syntax_error: str
    #: Commands with their answers: one answered locally, one unknown, one that needs a
    #: login, and STARTTLS (answered by the preface of ``<< start-tls client``).
    harmless: tuple[str, str]
    unknown: tuple[str, str]
    after_login: tuple[str, str]
    starttls: tuple[str, str]
    #: Lines the client gets before the machine closes, and the hints of its errors.
    too_many_errors: str
    too_many_failures: str
    line_too_long: str
    protocol_error: str
    pipelined: str
    upstream_error: str
    #: Every way the client sends alice's ``$PASSWORD`` (AUTH PLAIN in ``login``).
    password_logins: tuple[str, ...]
    #: Client bytes that may wait unparsed behind a login, for these limits.
    allowance: Callable[[int, int], int]

    def __str__(self) -> str:
        return self.name

    # -- building transcripts --------------------------------------------------------------

    def c(self, command: str, tag: str = "a1") -> str:
        """The client sends ``command`` (tagged with ``tag`` in IMAP)."""
        return f"C: {self._tagged(command, tag)}\n"

    def s(self, answer: str, tag: str = "a1") -> str:
        """The client gets ``answer`` to its command (tagged in IMAP)."""
        return f"S: {self._tagged(answer, tag)}\n"

    def exchange(self, pair: tuple[str, str], tag: str = "a1") -> str:
        return self.c(pair[0], tag) + self.s(pair[1], tag)

    def auth(self, arguments: str, tag: str = "a1") -> str:
        """A SASL login command: ``AUTHENTICATE PLAIN ...``, ``AUTH PLAIN ...``."""
        return self.c(f"{self.auth_verb} {arguments}", tag)

    def prompt(self, payload: str = "$SP") -> str:
        """Our SASL continuation request (an empty one by default)."""
        separator = "" if payload == "$SP" else " "
        return f"S: {self.prompt_marker}{separator}{payload}\n"

    def login(self, plain: str = "PLAIN", who: str = "alice secret", tag: str = "a1") -> str:
        """A password login with AUTH PLAIN (``$PLAIN``), up to its token request."""
        return self.auth(f"PLAIN ${plain}", tag) + f"<< request-token {who}\n"

    def logged_in(self, tag: str = "a1") -> str:
        """From ``>> token``, with the upstream ready: the relay begins."""
        accepted = self.accepted.replace("S: a1 ", f"S: {tag} ")
        return (
            f">> token {MAILBOX}\n{self.token_out}{accepted}"
            f"<< note info logged in to the upstream as '{MAILBOX}'\n<< relay\n"
        )

    def hint(self, kind: str, line: str) -> str:
        """``!! client-error <line>`` (``kind`` is client or upstream)."""
        return f"!! {kind}-error {line}\n"

    def _tagged(self, text: str, tag: str) -> str:
        return f"{tag} {text}" if self.tags and text else text

    # -- machines --------------------------------------------------------------------------

    def started(self, *, external: bool = False, bearer: bool = False) -> str:
        """The greeting, on a listener that offers these mechanisms for app identities."""
        names = [
            "PLAIN",
            *(["EXTERNAL"] if external else []),
            *(["XOAUTH2", "OAUTHBEARER"] if bearer else []),
        ]
        return self.start_template.replace("{mechanisms}", " ".join(f"AUTH={n}" for n in names))

    @property
    def start(self) -> str:
        return self.started()

    @property
    def app_start(self) -> str:
        return self.started(external=True, bearer=True)

    @property
    def ready(self) -> str:
        """Greeted, with the upstream ready and the client allowed to log in."""
        return self.start + self.upstream_ready + self.hello

    @property
    def app_ready(self) -> str:
        return self.app_start + self.upstream_ready + self.hello

    def machine(
        self,
        client_tls: ClientTls = ClientTls.IMPLICIT,
        upstream_tls: UpstreamTls = UpstreamTls.IMPLICIT,
        *,
        app: bool = False,
        external: bool = False,
        bearer: bool = False,
        **limits: int,
    ) -> AnyAuth:
        """A fresh machine; ``app`` offers every mechanism for app identities."""
        return self.make(
            AuthSettings(
                client_tls,
                upstream_tls,
                sasl_external=external or app,
                sasl_bearer=bearer or app,
                **limits,
            )
        )

    def play(self, text: str, mode: Mode = Mode.WHOLE, auth: AnyAuth | None = None) -> AnyAuth:
        """Run the transcript ``text`` against ``auth`` (a fresh machine by default)."""
        auth = auth or self.machine()
        run(auth, transcript(text, **VARS), mode, VARS, self.trailers)
        return auth

    def steps(self, text: str) -> list[Step]:
        return transcript(text, **VARS)


IMAP = Dialect(
    name="imap",
    tags=True,
    login_mechanism=False,
    make=ImapAuth,
    trailers=IMAP_TRAILERS,
    auth_verb="AUTHENTICATE",
    prompt_marker="+",
    start_template=_lines("""
        >> start
        S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID {mechanisms}] xoauth2-proxy ready.
        << connect-upstream
    """),
    starttls_start=_lines("""
        >> start
        S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] xoauth2-proxy ready.
        << connect-upstream
    """),  # noqa: E501
    upstream_ready=_lines("""
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2] Dovecot ready.
    """),
    hello="",
    token_out="P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2\n",
    accepted=_lines("""
        U: X1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
        S: a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
    """),
    rejected="U: X1 NO [AUTHENTICATIONFAILED] Authentication failed.\n",
    refused_later="U: X1 NO [UNAVAILABLE] later\n",
    two_step_ready=">> server-connected\nU: * OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\n",
    two_step_out="P: X1 AUTHENTICATE XOAUTH2\nU: +$SP\nP: $XOAUTH2\n",
    refusals=(
        ("X1 NO AUTHENTICATE failed.", "warning the upstream rejected the token: NO AUTHE"),
        ("X1 NO [UNAVAILABLE] Try later.", "warning upstream temporarily unavailable: NO [UN"),
        ("X1 BAD Unknown mechanism", "error refused the XOAUTH2 exchange itself: BAD Unknown"),
    ),
    early_refusals=(("X1 NO mechanism disabled", "error exchange itself: NO mechanism disabled"),),
    causes=("IMAP.AccessAsApp", "admin consent", "Add-MailboxPermission FullAccess"),
    unexpected=("garbage", "X7 OK what", "X1 OK", "+ go on", "X1 FROB x"),
    impossible=(
        (b'a1 LOGIN alice "\xff\xfe"\r\n', "", "password is not UTF-8"),
        (b"a1 LOGIN {5+}\r\nal\x01ce secret\r\n", "", "user name contains control characters"),
        (b'a1 LOGIN "" secret\r\n', "", "user name is empty"),
    ),
    goodbye="U: * BYE Autologout; idle for too long\n",
    goodbye_said="said BYE: Autologout; idle for too long",
    no_xoauth2=_lines("""
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=OAUTHBEARER] hi
        P: X1 CAPABILITY
        U: * CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=OAUTHBEARER
        U: X1 OK done
    """),
    no_xoauth2_said="it does not offer AUTH=XOAUTH2 (SASL mechanisms offered: OAUTHBEARER PLAIN)",
    upstream_starttls=_lines("""
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 STARTTLS] hi
        P: X1 STARTTLS
        U: X1 OK go ahead
    """),
    failed="NO [AUTHENTICATIONFAILED] Authentication failed.",
    unavailable="NO [UNAVAILABLE] Temporary failure, try again later.",
    unavailable_name="UNAVAILABLE",
    cancelled="BAD Authentication cancelled.",
    invalid_base64="BAD Invalid base64 in SASL response.",
    invalid_sasl="BAD Invalid SASL PLAIN message.",
    unsupported="NO Unsupported authentication mechanism.",
    syntax_error="BAD Syntax error.",
    harmless=("NOOP", "OK NOOP completed."),
    unknown=("FROB", "BAD Unknown command."),
    after_login=("SELECT INBOX", "NO Please authenticate first."),
    starttls=("STARTTLS", "OK Begin TLS negotiation now."),
    too_many_errors="S: * BYE Too many invalid commands.\n",
    too_many_failures="S: * BYE Too many failed logins.\n",
    line_too_long="* BAD Line too long.\\r\\n* BYE Closing the connection.",
    protocol_error="* BYE Protocol error.",
    pipelined="* BYE Too much data pipelined behind the login.",
    upstream_error="* BYE [UNAVAILABLE] Temporary failure, try again later.",
    password_logins=(
        "C: a1 AUTHENTICATE PLAIN $PASSWORD_PLAIN\n",
        "C: a1 AUTHENTICATE PLAIN\nC: $PASSWORD_PLAIN\n",
        "C: a1 LOGIN alice $PASSWORD\n",
        'C: a1 LOGIN alice "$PASSWORD"\n',
        "C: a1 LOGIN alice {11+}\nC: $PASSWORD\n",
    ),
    allowance=lambda max_line, max_literal: max_line + max_literal,
)

_POP3_START = _lines("""
    >> start
    S: +OK xoauth2-proxy ready.
    << connect-upstream
""")

#: Dovecot's answers on an implicit-TLS (pop3s) port.
POP3_READY = _lines("""
        >> server-connected
        U: +OK Dovecot (Debian) ready.
        P: CAPA
        U: +OK
        U: CAPA
        U: TOP
        U: UIDL
        U: RESP-CODES
        U: PIPELINING
        U: AUTH-RESP-CODE
        U: USER
        U: SASL XOAUTH2 OAUTHBEARER
        U: .
    """)
POP3_TOKEN_OUT = _lines("""
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
    """)

POP3 = Dialect(
    name="pop3",
    tags=False,
    login_mechanism=True,
    make=Pop3Auth,
    #: Pipelined POP3 commands, and bytes behind the upstream's +OK.
    trailers=Trailers(client=b"STAT\r\nRETR 1", partial=b"RETR 1", server=b"+OK 1 120\r\n+OK"),
    auth_verb="AUTH",
    prompt_marker="+",
    start_template=_POP3_START,
    starttls_start=_POP3_START,
    upstream_ready=POP3_READY,
    hello="",
    token_out=POP3_TOKEN_OUT,
    accepted=_lines("""
        U: +OK Logged in.
        S: +OK Logged in.
    """),
    rejected="U: -ERR [AUTH] Authentication failed.\n",
    refused_later="U: -ERR [SYS/TEMP] later\n",
    two_step_ready=POP3_READY,
    two_step_out=POP3_TOKEN_OUT,
    refusals=(
        ("-ERR Authentication failure: bad password.", "warning the upstream rejected the token"),
        *(
            (line, f"warning upstream temporarily unavailable: {line}")
            for line in (
                "-ERR [SYS/TEMP] Internal error occurred.",
                "-ERR [IN-USE] Mailbox is locked by another POP3 session.",
                "-ERR [LOGIN-DELAY] Wait 900 seconds between logins.",
                "-ERR [sys/temp] lower case",
            )
        ),
        ("-ERR [SYS/PERM] Disabled.", "error the upstream reports a system error: -ERR [SYS/PERM]"),
    ),
    early_refusals=(("-ERR [AUTH] Unsupported mechanism.", "error exchange itself: -ERR [AUTH]"),),
    causes=("POP.AccessAsApp", "admin consent", "FullAccess", "Set-CASMailbox -PopEnabled"),
    unexpected=("garbage", "+OK what", "+ go on", ""),
    impossible=tuple(
        (raw, "S: +OK Send PASS.\n", why)
        for raw, why in (
            (b"USER alice\r\nPASS \xff\xfe\r\n", "password is not UTF-8"),
            (b"USER al\x01ice\r\nPASS secret\r\n", "user name contains control characters"),
            (b"USER \r\nPASS secret\r\n", "user name is empty"),
        )
    ),
    goodbye="U: -ERR Disconnected for inactivity.\n",
    goodbye_said="said -ERR Disconnected for inactivity.",
    no_xoauth2=_lines("""
        >> server-connected
        U: +OK hi
        P: CAPA
        U: +OK
        U: USER
        U: SASL PLAIN OAUTHBEARER
        U: .
    """),
    no_xoauth2_said="it does not offer SASL XOAUTH2 (SASL mechanisms offered: OAUTHBEARER PLAIN)",
    upstream_starttls=_lines("""
        >> server-connected
        U: +OK hi
        P: STLS
        U: +OK go ahead
    """),
    failed="-ERR [AUTH] Authentication failed.",
    unavailable="-ERR [SYS/TEMP] Temporary failure, try again later.",
    unavailable_name="SYS/TEMP",
    cancelled="-ERR Authentication cancelled.",
    invalid_base64="-ERR Invalid base64 in SASL response.",
    invalid_sasl="-ERR Invalid SASL PLAIN message.",
    unsupported="-ERR Unsupported authentication mechanism.",
    syntax_error="-ERR Syntax error.",
    harmless=("USER bob", "+OK Send PASS."),
    unknown=("FROB", "-ERR Unknown command."),
    after_login=("STAT", "-ERR Please log in first."),
    starttls=("STLS", "+OK Begin TLS negotiation now."),
    too_many_errors="S: -ERR Too many invalid commands.\n",
    too_many_failures="S: -ERR Too many failed logins.\n",
    line_too_long="-ERR Line too long.",
    protocol_error="-ERR Protocol error.",
    pipelined="-ERR Too much data pipelined behind the login.",
    upstream_error="-ERR [SYS/TEMP] Temporary failure, try again later.",
    password_logins=(
        "C: AUTH PLAIN $PASSWORD_PLAIN\n",
        "C: AUTH PLAIN\nC: $PASSWORD_PLAIN\n",
        "C: USER alice\nC: PASS $PASSWORD\n",
        "C: AUTH LOGIN\nC: $ALICE\nC: $PASSWORD_B64\n",
        "C: AUTH LOGIN $ALICE\nC: $PASSWORD_B64\n",
    ),
    allowance=lambda max_line, _max_literal: max_line,
)

#: Dovecot's EHLO reply after TLS (before TLS it adds STARTTLS).
DOVECOT_EHLO = _lines("""
    U: 250-localhost
    U: 250-8BITMIME
    U: 250-AUTH XOAUTH2 OAUTHBEARER
    U: 250-BURL imap
    U: 250-CHUNKING
    U: 250-ENHANCEDSTATUSCODES
    U: 250-SIZE
    U: 250 PIPELINING
""")
_SMTP_START = _lines("""
    >> start
    S: 220 proxy.test ESMTP xoauth2-proxy ready
    << connect-upstream
""")

SMTP_READY = (
    ">> server-connected\nU: 220 localhost Dovecot (Debian) ready.\nP: EHLO proxy.test\n"
    + DOVECOT_EHLO
)
SMTP_TOKEN_OUT = "P: AUTH XOAUTH2\nU: 334$SP\nP: $XOAUTH2\n"

SMTP = Dialect(
    name="smtp",
    tags=False,
    login_mechanism=True,
    make=lambda settings: SmtpAuth(settings, hostname="proxy.test"),
    #: Pipelined envelope commands (RFC 2920), and upstream bytes behind its 235 (which a
    #: real server does not send, but the relay must keep).
    trailers=Trailers(
        client=b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bo",
        partial=b"RCPT TO:<bo",
        server=b"250 2.0.0 early\r\n250-SIZ",
    ),
    auth_verb="AUTH",
    prompt_marker="334",
    start_template=_SMTP_START,
    starttls_start=_SMTP_START,
    upstream_ready=SMTP_READY,
    hello="C: HELO client.test\nS: 250 proxy.test\n",
    token_out=SMTP_TOKEN_OUT,
    accepted=_lines("""
        U: 235 2.7.0 Logged in.
        S: 235 2.7.0 Authentication successful
    """),
    rejected="U: 535 5.7.8 Authentication failed.\n",
    refused_later="U: 454 4.7.0 later\n",
    two_step_ready=SMTP_READY,
    two_step_out=SMTP_TOKEN_OUT,
    refusals=(
        ("535 5.7.139 SmtpClientAuthentication is off", "warning the upstream rejected the token"),
        ("454 4.7.0 Temporary failure", "warning upstream temporarily unavailable: 454 4.7.0"),
        ("500 5.5.2 Line too long", "error the XOAUTH2 exchange itself: 500 5.5.2 Line too long"),
    ),
    early_refusals=(
        ("504 5.5.4 Unrecognized authentication type", "error exchange itself: 504 5.5.4"),
        ("535 5.7.8 no", "error exchange itself: 535 5.7.8 no"),
        ("454 4.7.0 later", "warning upstream temporarily unavailable: 454 4.7.0 later"),
    ),
    causes=("SMTP.SendAsApp", "SmtpClientAuthenticationDisabled", "FullAccess", "SendAs"),
    unexpected=("250 2.0.0 OK", "334 go on", "garbage"),
    impossible=(),  # SMTP has no login command of its own
    goodbye="U: 421 4.4.2 localhost Disconnected for inactivity\n",
    goodbye_said="said 421 4.4.2 localhost Disconnected for inactivity",
    no_xoauth2=_lines("""
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250-PIPELINING
        U: 250 AUTH PLAIN OAUTHBEARER
    """),
    no_xoauth2_said="it does not offer AUTH XOAUTH2 (SASL mechanisms offered: OAUTHBEARER PLAIN)",
    upstream_starttls=_lines("""
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250 STARTTLS
        P: STARTTLS
        U: 220 2.0.0 go ahead
    """),
    failed="535 5.7.8 Authentication credentials invalid",
    unavailable="454 4.7.0 Temporary authentication failure",
    unavailable_name="454",
    cancelled="501 5.0.0 Authentication cancelled",
    invalid_base64="501 5.5.2 Cannot decode base64 response",
    invalid_sasl="501 5.5.2 Invalid SASL PLAIN message",
    unsupported="504 5.5.4 Unrecognized authentication type",
    syntax_error="501 5.5.2 Syntax error",
    harmless=("NOOP", "250 2.0.0 OK"),
    unknown=("FROB", "500 5.5.2 Command not recognized"),
    after_login=("MAIL FROM:<a@b>", "530 5.7.0 Authentication required"),
    starttls=("STARTTLS", "220 2.0.0 Ready to start TLS"),
    too_many_errors="S: 421 4.7.0 Too many invalid commands, closing connection\n",
    too_many_failures="S: 421 4.7.0 Too many failed logins, closing connection\n",
    line_too_long="500 5.5.6 Line too long",
    protocol_error="421 4.5.0 Protocol error, closing connection",
    pipelined="421 4.7.0 Too much data pipelined, closing connection",
    upstream_error="421 4.3.0 Service not available, closing connection",
    password_logins=(
        "C: AUTH PLAIN $PASSWORD_PLAIN\n",
        "C: AUTH PLAIN\nC: $PASSWORD_PLAIN\n",
        "C: AUTH LOGIN\nC: $ALICE\nC: $PASSWORD_B64\n",
        "C: AUTH LOGIN $ALICE\nC: $PASSWORD_B64\n",
    ),
    allowance=lambda max_line, max_literal: max_line + max_literal,
)

DIALECTS = (IMAP, POP3, SMTP)
#: Those that offer the LOGIN mechanism.
LOGIN_DIALECTS = (POP3, SMTP)
#: Listener settings for app identities, with the mechanisms offered for them.
APPS = [
    (False, False, ""),
    (True, False, " EXTERNAL"),
    (False, True, " XOAUTH2 OAUTHBEARER"),
    (True, True, " EXTERNAL XOAUTH2 OAUTHBEARER"),
]
app_settings = pytest.mark.parametrize(("external", "bearer", "apps"), APPS)
#: Run a test once per protocol, with its :class:`Dialect` as ``d``.
each_dialect = pytest.mark.parametrize("d", DIALECTS, ids=str)
each_login_dialect = pytest.mark.parametrize("d", LOGIN_DIALECTS, ids=str)


# === Secrets ===============================================================================


def collect(text: str, auth: AnyAuth) -> tuple[list[Action], list[str]]:
    """Every action of the transcript's inputs (outputs are not checked), and every text
    the machine showed meanwhile: its repr after each input, its errors' messages."""
    actions: list[Action] = []
    shown: list[str] = []
    for step in transcript(text, **VARS):
        if isinstance(step, Feed):
            try:
                actions += auth.start() if step.event is None else auth.handle(step.event)
            except ProxyError as exc:
                shown.append(str(exc))
            shown.append(repr(auth))
    return actions, shown


def assert_hidden(
    actions: list[Action],
    shown: list[str],
    secrets: Sequence[str],
    *,
    token_line: bytes,
    token_lines: int,
) -> list[RequestToken]:
    """No secret anywhere but in the token requests (returned) and the ``token_lines``
    XOAUTH2 lines upstream, which must match ``token_line``."""
    token_b64 = VARS["XOAUTH2"].encode()
    secrets = [*secrets, TOKEN.value, VARS["XOAUTH2"]]
    requests, lines = [], 0
    for action in actions:
        if isinstance(action, RequestToken):
            requests.append(action)
            for secret in secrets:
                assert secret not in repr(action)
            continue
        if isinstance(action, SendToServer) and token_b64 in action.data:
            assert re.fullmatch(token_line + token_b64 + rb"\r\n", action.data)
            lines += 1
            continue
        text = repr(action) + (action.text if isinstance(action, Note) else "")
        data = getattr(action, "data", b"") + getattr(action, "to_server", b"")
        for secret in secrets:
            assert secret not in text
            assert secret.encode() not in data
    assert lines == token_lines
    for text in shown:
        for secret in secrets:
            assert secret not in text
    return requests
