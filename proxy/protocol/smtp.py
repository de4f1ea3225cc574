"""The pre-authentication phase of one proxied SMTP submission connection: :class:`SmtpAuth`.

Theory of operation
===================

``SmtpAuth`` is the :class:`~proxy.protocol.login.LoginMachine` (read its module first:
the two sides, the login attempt, reconnecting, limits and secrets are all there) with the
grammar, replies and upstream dialogue of SMTP submission (RFC 5321, RFC 6409), which
this module holds. Its two sides meet in :meth:`SmtpAuth._join` for one more thing than
the login: the client's EHLO after TLS. Our reply repeats some of the upstream's service
extensions, so an EHLO that comes before the upstream's own EHLO reply (after TLS) is held
(client state ``HELD``) until that list is known, or until the upstream is known to be
unusable for now.

When to greet
    ``start()`` sends ``220 <hostname> ESMTP xoauth2-proxy ready`` at once. Holding it
    until the upstream is ready would let the EHLO reply list the upstream's extensions,
    but would put the two connections in a row (the upstream's greeting, EHLO, STARTTLS,
    handshake and second EHLO before the client's first byte). Only the EHLO reply after
    TLS needs the upstream's list, so only it waits, with the commands pipelined behind
    it. If the upstream turns out to be unreachable or unusable, a held EHLO gets the
    proxy's own extension (``AUTH``) alone: a subset of the upstream's is always safe to
    advertise. Later EHLOs use the last list learned, even while it reconnects.

Client side (we are the server; RFC 5321, 3207, 4954, 2920)
    Command verbs are case-insensitive; lines end in CRLF (a bare LF is accepted). On a
    STARTTLS listener before TLS (``PLAINTEXT``), EHLO is answered at once with the
    proxy's own list, ``PIPELINING``, ``ENHANCEDSTATUSCODES`` and ``STARTTLS`` and no
    ``AUTH`` (RFC 3207 section 4.2 has the client forget it after TLS; RFC 4954 section 4
    and RFC 8314 want no password in the clear); AUTH and the mail commands get ``530
    5.7.0 Must issue a STARTTLS command first`` (RFC 3207 section 4). STARTTLS is answered
    ``220 2.0.0 Ready to start TLS``. TLS resets the session (RFC 3207 section 4.2): the
    client is back in ``CONNECTED`` and must say EHLO again.

    After TLS, or from the start on an implicit-TLS or plaintext listener, EHLO is
    answered with ``250-<hostname>``, ``AUTH PLAIN LOGIN`` (followed by ``EXTERNAL`` when
    ``AuthSettings.sasl_external`` is set and ``XOAUTH2 OAUTHBEARER`` when
    ``sasl_bearer`` is), and those of the upstream's ``PIPELINING``, ``SIZE`` (with its
    limit), ``ENHANCEDSTATUSCODES``, ``8BITMIME``, ``SMTPUTF8`` and ``CHUNKING`` that its
    EHLO after TLS listed (:func:`~proxy.protocol.capabilities.smtp_proxy_extensions`).
    They describe the mail transaction, which the upstream runs after the relay begins;
    nothing else of the upstream's list is repeated. HELO is answered with ``250
    <hostname>``.

    AUTH needs a preceding EHLO or HELO (``503 5.5.1`` otherwise). It is accepted after
    HELO: RFC 4954 defines AUTH as a service extension that a client learns from EHLO,
    but does not make the server refuse it after HELO; Postfix and Exchange accept it,
    and legacy devices (scanners, mostly) send HELO then AUTH LOGIN. Its continuation
    requests are ``334`` (for LOGIN ``334 VXNlcm5hbWU6``, then ``334 UGFzc3dvcmQ6``). A
    LOGIN user name that cannot be anyone's is remembered and refused only after the
    password, so that the password line is never taken for a command. NOOP and RSET get
    ``250 2.0.0 OK``, HELP a ``214``, QUIT ``221 2.0.0 Bye``; MAIL, RCPT, DATA, BDAT and
    the other mail commands ``530 5.7.0 Authentication required``, unknown commands ``500
    5.5.2``, bad arguments ``501 5.5.2``. Commands pipelined behind AUTH (RFC 2920) wait
    with the bytes behind a held EHLO, bounded by ``max_line + max_literal``: SMTP has no
    literals, so ``max_literal`` is the pipelining allowance here.

Upstream side (we are the client)
    Replies are a three-digit code and text, ``-`` after the code on every line but the
    last, the same code on every line (RFC 5321 section 4.2); a whole reply is bounded by
    ``max_server_line``. The greeting is ``220`` (maybe multiline); ``421`` at any time
    means "not now" and a ``554`` greeting "no service here" (RFC 5321 section 3.1,
    answered with QUIT). Then ``EHLO <hostname>``. With ``UpstreamTls.STARTTLS`` that
    first list must offer ``STARTTLS``; we send it and expect ``220``, then EHLO again,
    whose list is the one believed (RFC 3207 section 4.2). It must offer ``AUTH`` with
    ``XOAUTH2`` (the older ``AUTH=`` form is read too). Then ``AUTH XOAUTH2`` alone, and
    after the server's ``334`` the base64 token on a line of its own. Never as an initial
    response: tokens of 1.5 to 3 KB break command line limits (RFC 5321 section
    4.5.3.1.4), and Dovecot refuses such AUTH lines with ``500 5.5.2 Line too long``. A
    reconnected upstream whose list lacks an extension the client was already told about
    is noted as a warning.

Outcomes
    * ``235``: the client gets ``235 2.7.0 Authentication successful`` (our words; the
      upstream's text is its own).
    * A final ``5xx`` after the token, other than the syntax class ``50x``: ``535 5.7.8``.
      A ``4xx`` is passed on as the temporary ``454 4.7.0``.
    * ``50x`` after the token, or any refusal of ``AUTH XOAUTH2`` before the token was
      sent: the XOAUTH2 exchange itself was refused; ``454 4.7.0``.
    * The failure that spends the login budget is followed by ``421``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.protocol import replies
from proxy.protocol.actions import Close, Severity
from proxy.protocol.capabilities import (
    POP3_SMTP_PASSWORD_MECHANISMS,
    SmtpExtensions,
    smtp_proxy_extensions,
)
from proxy.protocol.errors import FrameError
from proxy.protocol.framing import LineBuffer, printable
from proxy.protocol.login import (
    CRLF,
    UPSTREAM_IN_FLIGHT,
    LoginMachine,
    Verdict,
    client_table,
    upstream_table,
)
from proxy.protocol.login import ClientInput as _CI
from proxy.protocol.login import ClientState as _C
from proxy.protocol.login import UpstreamInput as _UI
from proxy.protocol.login import UpstreamState as _U
from proxy.protocol.modes import UpstreamTls

if TYPE_CHECKING:
    from proxy.protocol.modes import AuthSettings

__all__ = [
    "CLIENT_TRANSITIONS",
    "UPSTREAM_TRANSITIONS",
    "SmtpAuth",
    "is_hostname",
    "state_diagrams",
]

#: Every legal move of the client side.
CLIENT_TRANSITIONS: Final = client_table(
    "smtp-client",
    {
        # TLS resets the session (RFC 3207 section 4.2): EHLO again.
        _C.TLS_NEGOTIATION: {_CI.TLS_ESTABLISHED: _C.CONNECTED},
        _C.CONNECTED: {
            _CI.DATA: _C.CONNECTED,
            _CI.HARMLESS: _C.CONNECTED,
            _CI.REJECTED: _C.CONNECTED,
            _CI.HELLO: _C.NOT_AUTHENTICATED,
            _CI.HOLD: _C.HELD,
            _CI.QUIT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
        },
        _C.HELD: {_CI.DATA: _C.HELD, _CI.RELEASED: _C.NOT_AUTHENTICATED},
        _C.NOT_AUTHENTICATED: {
            _CI.HELLO: _C.NOT_AUTHENTICATED,
            _CI.HOLD: _C.HELD,
            _CI.AUTH_LOGIN: _C.SASL_USERNAME,
            _CI.USERNAME: _C.SASL_PASSWORD,
        },
    },
)

#: Every legal move of the upstream side.
UPSTREAM_TRANSITIONS: Final = upstream_table(
    "smtp-upstream",
    {
        _U.GREETING: {
            _UI.ASK_PLAIN_CAPABILITIES: _U.PLAIN_CAPABILITIES,
            _UI.ASK_CAPABILITIES: _U.CAPABILITIES,
        },
    },
)

#: Upstream states in which its extension list after TLS is on its way.
_UPSTREAM_LEARNING: Final = frozenset(
    {
        _U.CONNECTING,
        _U.GREETING,
        _U.PLAIN_CAPABILITIES,
        _U.STARTTLS,
        _U.TLS_NEGOTIATION,
        _U.CAPABILITIES,
    }
)


# === Syntax ================================================================================

#: Mail commands (RFC 5321, 3030, 4468): before login they get 530 (RFC 4954 section 6).
_MAIL_COMMANDS: Final = frozenset(
    {b"MAIL", b"RCPT", b"DATA", b"BDAT", b"BURL", b"VRFY", b"EXPN", b"ETRN"}
)
#: Commands that take no arguments (RFC 5321 section 4.1.1, RFC 3207 section 4).
_NO_ARGUMENTS: Final = frozenset({b"RSET", b"QUIT", b"STARTTLS"})

#: A domain (RFC 5321 section 4.1.2) or an address literal, for our own name.
_HOSTNAME: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"|\[[\x21-\x5a\x5e-\x7e]+\]"
)
_MAX_HOSTNAME: Final = 255


def is_hostname(text: str) -> bool:
    """Can ``text`` name us in a greeting and an EHLO (a domain or an address literal)?"""
    return len(text) <= _MAX_HOSTNAME and _HOSTNAME.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class _Reply:
    """One reply from the upstream (RFC 5321 section 4.2): its code and each line's text."""

    code: int
    lines: tuple[bytes, ...]

    def describe(self) -> str:
        """The reply on one log line: ``535 5.7.8 Authentication failed.``"""
        return printable(b"%d %s" % (self.code, b" / ".join(self.lines)), 300)

    @property
    def syntax_class(self) -> bool:
        """``50x`` and ``40x``: the command itself was not understood (RFC 5321 4.2.1)."""
        return self.code // 10 % 10 == 0


def _reply_line(line: bytes) -> tuple[int, bool, bytes]:
    """Split one reply line into its code, whether it is the last, and its text."""
    code, separator = line[:3], line[3:4]
    if (
        len(code) != 3
        or not code.isdigit()
        or code[0] not in b"2345"
        or separator not in (b"", b" ", b"-")
    ):
        raise FrameError(f"malformed reply line {printable(line, 80)!r}")
    return int(code), separator != b"-", line[4:]


class _ReplyReader:
    """Reassembles upstream replies, multiline ones included, bounded by ``limit`` bytes."""

    __slots__ = ("_buf", "_code", "_limit", "_lines", "_size")

    def __init__(self, limit: int) -> None:
        self._buf = LineBuffer(limit)
        self._limit = limit
        self._code: int | None = None
        self._lines: list[bytes] = []
        self._size = 0

    def __len__(self) -> int:
        return len(self._buf) + self._size

    def receive_data(self, data: bytes) -> None:
        self._buf.receive_data(data)

    def next_reply(self) -> _Reply | None:
        """The next complete reply, or ``None``; :class:`FrameError` if malformed or too big."""
        while True:
            line = self._buf.next_line()
            if line is None:
                return None
            self._size += len(line) + len(CRLF)
            if self._size > self._limit:
                raise FrameError(f"reply longer than {self._limit} bytes")
            code, last, text = _reply_line(line)
            if self._code is not None and code != self._code:
                raise FrameError(f"multiline reply changes its code from {self._code} to {code}")
            self._code = code
            self._lines.append(text)
            if last:
                reply = _Reply(code, tuple(self._lines))
                self._code, self._lines, self._size = None, [], 0
                return reply

    def take_all(self) -> bytes:
        """The bytes not parsed yet (for the relay, or to be dropped). The lines of an
        unfinished reply are dropped: the relay begins right after a complete reply."""
        self._code, self._lines, self._size = None, [], 0
        return self._buf.take_all()


# === The machine ===========================================================================


class SmtpAuth(LoginMachine[bytes, _Reply]):
    """The pre-authentication phase of one proxied SMTP submission connection (see the
    module). ``hostname`` is the proxy's name in its greeting, in its EHLO reply and in the EHLO it
    sends upstream: a domain or an address literal (RFC 5321 section 4.1.2).
    """

    __slots__ = ("_advertised", "_extensions", "_hostname")

    client_transitions = CLIENT_TRANSITIONS
    upstream_transitions = UPSTREAM_TRANSITIONS
    words = replies.SMTP
    refuses_user_names_late = True
    token_rejected_causes = (
        "the token's audience or roles do not fit this server (Microsoft 365 needs the "
        "SMTP.SendAsApp application permission with admin consent); SMTP AUTH is disabled "
        "for the mailbox or the tenant (Exchange: Set-CASMailbox "
        "-SmtpClientAuthenticationDisabled $false); or the app may not use this mailbox "
        "(Exchange: the service principal is not registered, or lacks "
        "Add-MailboxPermission FullAccess or SendAs)."
    )

    def __init__(self, settings: AuthSettings, *, hostname: str = "localhost") -> None:
        if not is_hostname(hostname):
            raise ValueError(f"not a domain or address literal: {hostname!r}")
        super().__init__(
            settings,
            password_mechanisms=POP3_SMTP_PASSWORD_MECHANISMS,
            first_state=_C.CONNECTED,
            reader=_ReplyReader(settings.max_server_line),
        )
        self._hostname = hostname.encode("ascii")
        #: The upstream's list after TLS, from the last connection that offered XOAUTH2.
        self._extensions: SmtpExtensions | None = None
        #: The upstream's extension keywords that our EHLO replies have listed so far.
        self._advertised: frozenset[bytes] = frozenset()

    def _greet(self) -> None:
        self._answer(b"220 " + self._hostname + b" " + replies.SMTP_GREETING_TEXT)

    def _join(self) -> None:
        """Answer a held EHLO once the upstream's list is known (or will not be soon),
        then move a login on (see :meth:`LoginMachine._join`)."""
        if self._client is _C.HELD:
            if self._extensions is not None or self._upstream not in _UPSTREAM_LEARNING:
                self._client_move(_CI.RELEASED)
                self._hello_reply(True, before_tls=False)
            return
        super()._join()

    # === client side =====================================================================

    def _next_command(self) -> bytes | None:
        return self._client_buf.next_line()

    def _on_command(self, command: bytes) -> None:
        verb, _, rest = command.partition(b" ")
        verb = verb.upper()
        args = [word for word in rest.split(b" ") if word]  # SP separates (RFC 5321 4.1.1)
        if verb in (b"EHLO", b"HELO"):
            self._on_hello(verb == b"EHLO", args)
        elif verb == b"NOOP":  # a parameter is allowed and ignored (RFC 5321 4.1.1.9)
            self._harmless(replies.SMTP_OK)
        elif verb == b"HELP":
            self._harmless(replies.SMTP_HELP)
        elif verb in _NO_ARGUMENTS and args:
            self._rejected(replies.SMTP_SYNTAX)
        elif verb == b"RSET":
            self._harmless(replies.SMTP_OK)
        elif verb == b"QUIT":
            self._client_move(_CI.QUIT)
            self._answer(replies.SMTP_BYE)
            self._out.append(Close("client quit"))
        elif verb == b"STARTTLS" and self._client is _C.PLAINTEXT:
            self._start_client_tls(replies.SMTP_READY_FOR_TLS + CRLF)
        elif verb == b"STARTTLS":
            self._rejected(replies.SMTP_NO_STARTTLS)
        elif verb == b"AUTH":
            self._on_auth(args)
        elif verb in _MAIL_COMMANDS:
            self._rejected(
                replies.SMTP_TLS_REQUIRED
                if self._client is _C.PLAINTEXT
                else replies.SMTP_AUTH_REQUIRED
            )
        else:
            self._rejected(replies.SMTP_UNKNOWN_COMMAND)

    def _harmless(self, reply: bytes) -> None:
        self._client_move(_CI.HARMLESS)
        self._answer(reply)

    def _on_hello(self, extended: bool, args: list[bytes]) -> None:
        if not args:
            self._rejected(replies.SMTP_SYNTAX)
        elif self._client is _C.PLAINTEXT:
            self._client_move(_CI.HARMLESS)
            self._hello_reply(extended, before_tls=True)
        elif extended and self._extensions is None and self._upstream in _UPSTREAM_LEARNING:
            self._client_move(_CI.HOLD)  # answered by _join
        else:
            self._client_move(_CI.HELLO)
            self._hello_reply(extended, before_tls=False)

    def _hello_reply(self, extended: bool, *, before_tls: bool) -> None:
        if not extended:
            self._answer(b"250 " + self._hostname)
            return
        upstream = self._extensions or SmtpExtensions()
        keywords = smtp_proxy_extensions(
            before_tls=before_tls, upstream=upstream, mechanisms=self._mechanisms
        )
        if not before_tls:
            self._advertised |= {line.split(b" ")[0] for line in upstream.passed_on()}
        lines = [self._hostname, *keywords]
        self._to_client(
            b"".join(b"250-" + line + CRLF for line in lines[:-1]) + b"250 " + lines[-1] + CRLF
        )

    def _on_auth(self, args: list[bytes]) -> None:
        if self._client is _C.PLAINTEXT:
            self._rejected(replies.SMTP_TLS_REQUIRED)
        elif self._client is _C.CONNECTED:
            self._rejected(replies.SMTP_HELLO_FIRST)
        elif not args or len(args) > 2:
            self._rejected(replies.SMTP_SYNTAX)
        else:
            self._start_sasl(args[0], args[1] if len(args) == 2 else None)

    # === upstream side ===================================================================

    def _ask_capabilities(self) -> None:
        self._to_server(b"EHLO " + self._hostname + CRLF)

    def _on_reply(self, reply: _Reply) -> None:
        state = self._upstream
        if reply.code == 421:  # RFC 5321 section 3.8: the server is closing the connection
            self._going_away(f"said {reply.describe()}")
        elif state is _U.GREETING:
            self._on_greeting(reply)
        elif state in (_U.PLAIN_CAPABILITIES, _U.CAPABILITIES):
            self._on_ehlo(reply)
        elif state is _U.STARTTLS:
            if reply.code != 220:
                self._unsuitable(f"it refused STARTTLS: {reply.describe()}")
            else:
                self._start_upstream_tls("STARTTLS 220")
        elif state in UPSTREAM_IN_FLIGHT:
            self._on_auth_reply(reply)
        else:
            raise self._upstream_error(
                f"upstream sent a reply to no command in state {state.name}: {reply.describe()!r}",
            )

    def _on_greeting(self, reply: _Reply) -> None:
        if reply.code == 220:
            starttls = self._settings.upstream_tls is UpstreamTls.STARTTLS
            self._upstream_move(_UI.ASK_PLAIN_CAPABILITIES if starttls else _UI.ASK_CAPABILITIES)
            self._ask_capabilities()
        elif reply.code == 554:  # RFC 5321 section 3.1: no service here; QUIT, then it closes
            self._going_away(f"said {reply.describe()}", farewell=b"QUIT" + CRLF)
        else:
            raise self._upstream_error(f"upstream greeting is not 220: {reply.describe()!r}")

    def _on_ehlo(self, reply: _Reply) -> None:
        if reply.code != 250:
            self._unsuitable(f"it refused EHLO: {reply.describe()}")
            return
        extensions = SmtpExtensions.parse(reply.lines[1:])
        if self._upstream is _U.PLAIN_CAPABILITIES:
            if "STARTTLS" not in extensions:
                self._unsuitable(
                    "upstream_tls is starttls but the server does not offer STARTTLS "
                    f"({printable(repr(extensions))}); use implicit TLS (port 465)"
                )
                return
            self._upstream_move(_UI.ASK_STARTTLS)
            self._to_server(b"STARTTLS" + CRLF)
            return
        if not self._require_xoauth2(extensions.mechanisms, "AUTH XOAUTH2"):
            return
        missing = self._advertised - {line.split(b" ")[0] for line in extensions.passed_on()}
        if missing:
            names = b" ".join(sorted(missing)).decode("ascii")
            self._note(
                Severity.WARNING,
                f"the reconnected upstream no longer offers {names}, which the client "
                "was told about; it may refuse commands that use them",
            )
        self._extensions = extensions
        self._upstream_move(_UI.CAPABLE)

    def _on_auth_reply(self, reply: _Reply) -> None:
        if reply.code == 334:
            self._on_continuation(reply.lines[0])
        elif reply.code == 235:
            self._logged_in(replies.SMTP_AUTH_SUCCEEDED + CRLF)
        elif reply.code < 400:
            raise self._upstream_error(
                f"upstream answered {reply.describe()!r} in state {self._upstream.name}",
            )
        elif reply.code < 500:
            self._login_refused(Verdict.TEMPORARY, reply.describe())
        elif self._upstream is _U.AUTH_SENT or reply.syntax_class:
            self._login_refused(Verdict.EXCHANGE_REFUSED, reply.describe())
        else:
            self._login_refused(Verdict.TOKEN_REJECTED, reply.describe())


state_diagrams = SmtpAuth.state_diagrams
