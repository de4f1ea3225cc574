"""The pre-authentication phase of one proxied POP3 connection: :class:`Pop3Auth`.

Theory of operation
===================

``Pop3Auth`` is the :class:`~proxy.protocol.login.LoginMachine` (read its module first:
the two sides, the login attempt, reconnecting, limits and secrets are all there) with
POP3's grammar, replies and upstream dialogue, which this module holds.

Client side (we are the server; RFC 1939, RFC 2449, RFC 5034)
    The greeting is ``+OK``, without an APOP timestamp, so that no client tries APOP,
    whose shared secret we do not have. Commands are a keyword, case-insensitive, and
    arguments separated by single spaces (RFC 1939 section 3).

    * ``CAPA`` (RFC 2449 section 5) is answered locally with our own list: ``USER``,
      ``SASL PLAIN LOGIN`` (and the mechanisms for app identities the listener offers),
      ``RESP-CODES``, ``AUTH-RESP-CODE`` (RFC 3206: every refusal of credentials carries
      ``[AUTH]``); on a STARTTLS listener before TLS ``STLS`` instead of ``USER`` and
      ``SASL`` (RFC 2595 section 4, RFC 8314). Once the upstream's CAPA is known, its lines
      for ``TOP``, ``UIDL``, ``PIPELINING``, ``EXPIRE`` and ``LOGIN-DELAY`` follow ours: they
      describe the TRANSACTION state, which is the upstream's. Before that, clients see
      our lines only (we do not wait for an upstream that may be slow or down) and learn
      the full list by asking again after login, as RFC 2449 section 5 allows.
      ``PIPELINING`` is offered only if the upstream offers it, because commands
      pipelined behind the login reach it as they came; before login every complete line
      is answered in order regardless.
    * ``AUTH`` without arguments lists our mechanisms as a multi-line ``+OK`` response
      (not in RFC 5034, but Outlook and others send it; Dovecot answers it likewise);
      before TLS on a STARTTLS listener the list is empty.
    * ``STLS`` (only on a STARTTLS listener, before TLS) is answered ``+OK``.
    * ``USER name`` then ``PASS password``. Both take the rest of the line verbatim after
      one space, so passwords may contain spaces (RFC 1939 section 7 allows a server to
      treat them so). ``USER`` is always answered ``+OK``, whatever the name, so unknown
      users cannot be told from wrong passwords; ``PASS`` must follow ``USER`` (RFC 1939
      section 7): a refused command in between forgets the name, ``CAPA`` does not.
    * ``AUTH <mechanism>`` (RFC 5034) takes an initial response (for LOGIN the user name)
      or answers our continuations: ``+ ``, or for LOGIN ``+ VXNlcm5hbWU6`` and ``+
      UGFzc3dvcmQ6`` ("Username:", "Password:"). A LOGIN user name that cannot be anyone's
      is refused at once.
    * ``QUIT`` is answered locally and closes.
    * Before TLS on a STARTTLS listener, ``USER``, ``PASS`` and ``AUTH <mechanism>`` get
      ``-ERR Plaintext login disallowed; use STLS first.`` without a response code: the
      credentials were not judged, so ``[AUTH]`` (RFC 3206 sections 5 and 6: what
      AUTH-RESP-CODE promises for problems *with the credentials*) would make clients
      discard a good password, and ``[SYS/PERM]`` (RFC 3206 section 4) would misreport a
      policy as a system fault. CAPA offers neither USER nor SASL then, so compliant
      clients never get there.
    * Commands of the TRANSACTION state (``STAT``, ``RETR``, ``NOOP``...) get ``-ERR
      Please log in first.``, unknown ones ``-ERR Unknown command.``; the refusal that
      spends the budget is followed by ``-ERR Too many invalid commands.`` (Dovecot, too,
      adds such a line before it hangs up).

    Lines are bounded by ``max_line`` for commands and SASL responses alike (RFC 2449
    section 4 limits commands to 255 octets, but refusing a longer line helps nobody), and
    so are the bytes pipelined behind a login.

Upstream side (we are the client)
    Greeting: ``+OK`` (Debian's Dovecot: ``+OK Dovecot (Debian) ready.``); ``-ERR`` means
    "not now" (the connection is expected to close). With ``UpstreamTls.STARTTLS`` we
    send ``STLS`` straight away (an upstream that refuses it is unusable) and expect
    ``+OK``. With implicit TLS, or after STLS, we send ``CAPA`` and read its list
    (dot-unstuffed, bounded by ``max_server_line``), which must offer ``SASL ...
    XOAUTH2``; a server without CAPA cannot say that it does, and is unusable. Then
    ``AUTH XOAUTH2`` alone, and the base64 token on its own line after the server's ``+``
    (tokens are far over RFC 2449's 255-octet command line). An unasked ``-ERR`` while
    idle (Dovecot's "Disconnected for inactivity.") means the connection is closing.

Outcomes
    * ``+OK``: the upstream's line goes to the client as the answer to its PASS or AUTH
      (Dovecot: ``+OK Logged in.``).
    * ``-ERR [AUTH] ...``, or ``-ERR`` without a code: exactly ``-ERR [AUTH]
      Authentication failed.`` ``[SYS/TEMP]``, ``[IN-USE]`` and ``[LOGIN-DELAY]`` (RFC
      2449 section 8, RFC 3206) are temporary: ``-ERR [SYS/TEMP] ...``. So is
      ``[SYS/PERM]``, noted at ERROR severity: it is the operator's problem, not the
      user's password.
    * ``-ERR`` to ``AUTH XOAUTH2`` itself, before the token was sent: the XOAUTH2 exchange
      was refused; ``-ERR [SYS/TEMP]``.
    * The failure that spends the login budget is followed by ``-ERR Too many failed
      logins.`` The driver sends :data:`~proxy.protocol.replies.POP3_TIMEOUT` when the
      login phase outlasts its deadline.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from proxy.protocol import replies
from proxy.protocol.actions import Close
from proxy.protocol.capabilities import (
    POP3_SMTP_PASSWORD_MECHANISMS,
    Pop3Capabilities,
    pop3_proxy_capabilities,
)
from proxy.protocol.errors import FrameError
from proxy.protocol.framing import LineBuffer, printable
from proxy.protocol.login import (
    CRLF,
    LOGIN_STARTS,
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
from proxy.protocol.sasl import Credentials, InvalidCredentials, text_credential

if TYPE_CHECKING:
    from proxy.protocol.modes import AuthSettings

__all__ = ["CLIENT_TRANSITIONS", "UPSTREAM_TRANSITIONS", "Pop3Auth", "state_diagrams"]

#: USER, and AUTH LOGIN with or without the user name: how POP3 logins also start.
_POP3_STARTS: Final = {
    _CI.USER: _C.USER_GIVEN,
    _CI.AUTH_LOGIN: _C.SASL_USERNAME,
    _CI.USERNAME: _C.SASL_PASSWORD,
}

#: Every legal move of the client side.
CLIENT_TRANSITIONS: Final = client_table(
    "pop3-client",
    {
        _C.NOT_AUTHENTICATED: _POP3_STARTS,
        # PASS must follow USER (RFC 1939 section 7): a refused command forgets the name.
        _C.USER_GIVEN: {
            **LOGIN_STARTS,
            **_POP3_STARTS,
            _CI.DATA: _C.USER_GIVEN,
            _CI.HARMLESS: _C.USER_GIVEN,
        },
        # A LOGIN user name that cannot be anyone's is refused at once.
        _C.SASL_USERNAME: {_CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED},
    },
)

#: Every legal move of the upstream side.
UPSTREAM_TRANSITIONS: Final = upstream_table(
    "pop3-upstream",
    {_U.GREETING: {_UI.ASK_STARTTLS: _U.STARTTLS, _UI.ASK_CAPABILITIES: _U.CAPABILITIES}},
)


# === Syntax ================================================================================

#: Commands of the TRANSACTION state (RFC 1939 section 5 and 7, RFC 2449): before login
#: they get "Please log in first." rather than "Unknown command.".
_AFTER_LOGIN_COMMANDS: Final = frozenset(b"STAT LIST RETR DELE NOOP RSET TOP UIDL LAST".split())
#: Commands the proxy runs itself before login (refused with a syntax error when their
#: arguments are wrong).
_LOCAL_COMMANDS: Final = frozenset({b"CAPA", b"QUIT", b"STLS", b"USER", b"PASS", b"AUTH"})
#: Upstream response codes (RFC 2449 section 8, RFC 3206) that mean "try again later".
_TEMPORARY_CODES: Final = frozenset({b"SYS/TEMP", b"IN-USE", b"LOGIN-DELAY"})


class _Status(enum.Enum):
    OK = "+OK"
    ERR = "-ERR"
    #: A SASL continuation request, ``+`` and maybe a base64 payload.
    CONTINUE = "+"


@dataclass(frozen=True, slots=True)
class _Reply:
    """One reply from the upstream, split the way RFC 1939 and RFC 2449 describe it."""

    status: _Status
    #: The extended response code, upper-cased (``AUTH``, ``SYS/TEMP``...), or empty.
    code: bytes
    #: The text after the status indicator and code; for ``+``, the base64 payload.
    text: bytes
    #: The status line as received, without its line ending.
    raw: bytes
    #: The lines of a multi-line answer, dot-unstuffed (the answer to CAPA).
    lines: tuple[bytes, ...] = ()

    @classmethod
    def parse(cls, line: bytes) -> _Reply:
        """The reply; :class:`FrameError` if the line is not one."""
        head, _, rest = line.partition(b" ")
        word = head.upper()
        if head == b"+":
            return cls(_Status.CONTINUE, b"", rest, line)
        if word not in (b"+OK", b"-ERR"):
            raise FrameError(f"not a POP3 reply: {printable(line, 80)!r}")
        code = b""
        if rest.startswith(b"["):
            end = rest.find(b"]")
            if end > 0:
                code, rest = rest[1:end].upper(), rest[end + 1 :].lstrip(b" ")
        return cls(_Status.OK if word == b"+OK" else _Status.ERR, code, rest, line)


class _ReplyReader:
    """Reassembles upstream replies, and the multi-line answer to CAPA (up to its ``.``
    line, RFC 1939 section 3), bounded by ``limit`` bytes."""

    __slots__ = ("_buf", "_head", "_limit", "_lines", "_list_due", "_size")

    def __init__(self, limit: int) -> None:
        self._buf = LineBuffer(limit)
        self._limit = limit
        #: A ``+OK`` will open a list (we asked CAPA); the list opened, and its lines.
        self._list_due = False
        self._head: _Reply | None = None
        self._lines: list[bytes] = []
        self._size = 0

    def __len__(self) -> int:
        return len(self._buf) + self._size

    def receive_data(self, data: bytes) -> None:
        self._buf.receive_data(data)

    def expect_list(self) -> None:
        """The next reply, if ``+OK``, is followed by lines up to ``.``."""
        self._list_due = True

    def next_reply(self) -> _Reply | None:
        while (line := self._buf.next_line()) is not None:
            if self._head is None:
                reply = _Reply.parse(line)
                if reply.status is not _Status.OK or not self._list_due:
                    self._list_due = False
                    return reply
                self._head, self._list_due = reply, False
            elif line == b".":
                reply = replace(self._head, lines=tuple(self._lines))
                self._head, self._lines, self._size = None, [], 0
                return reply
            else:
                line = line[1:] if line.startswith(b".") else line  # dot-stuffing
                self._size += len(line) + len(CRLF)
                if self._size > self._limit:
                    raise FrameError(f"CAPA list longer than {self._limit} bytes")
                self._lines.append(line)
        return None

    def take_all(self) -> bytes:
        """The bytes not parsed yet (for the relay, or to be dropped); an unfinished list
        is dropped."""
        self._list_due, self._head, self._lines, self._size = False, None, [], 0
        return self._buf.take_all()


# === The machine ===========================================================================


class Pop3Auth(LoginMachine[bytes, _Reply]):
    """The pre-authentication phase of one proxied POP3 connection (see the module)."""

    __slots__ = ("_caps", "_reader", "_user")

    client_transitions = CLIENT_TRANSITIONS
    upstream_transitions = UPSTREAM_TRANSITIONS
    words = replies.POP3
    starttls = "STLS"
    token_rejected_causes = (
        "the token's audience or roles do not fit this server (Microsoft 365 needs the "
        "POP.AccessAsApp application permission with admin consent), the app may not open "
        "this mailbox (Exchange: the service principal is not registered or lacks "
        "Add-MailboxPermission FullAccess), or POP3 is disabled for the mailbox "
        "(Set-CASMailbox -PopEnabled $true)."
    )

    def __init__(self, settings: AuthSettings) -> None:
        reader = _ReplyReader(settings.max_server_line)
        super().__init__(
            settings,
            password_mechanisms=POP3_SMTP_PASSWORD_MECHANISMS,
            first_state=_C.NOT_AUTHENTICATED,
            reader=reader,
        )
        self._reader = reader
        #: The USER argument, raw, until PASS (validated there, so USER always says +OK).
        self._user = b""
        #: The upstream's last complete CAPA list.
        self._caps = Pop3Capabilities()

    @property
    def _pipelining_allowance(self) -> int:
        return self._settings.max_line

    def _greet(self) -> None:
        self._answer(replies.POP3_GREETING)

    def _client_move(self, what: _CI) -> None:
        super()._client_move(what)
        if self._client is not _C.USER_GIVEN:
            self._user = b""  # only as long as the state that expects PASS

    # === client side =====================================================================

    def _next_command(self) -> bytes | None:
        return self._client_buf.next_line()

    def _on_command(self, command: bytes) -> None:
        keyword, space, args = command.partition(b" ")
        name = keyword.upper()
        bare = not space
        plaintext = self._client is _C.PLAINTEXT
        if name == b"CAPA" and bare:
            self._client_move(_CI.HARMLESS)
            caps = pop3_proxy_capabilities(
                before_tls=plaintext, upstream=self._caps, mechanisms=self._mechanisms
            )
            self._to_client(replies.POP3_CAPA_FOLLOWS + CRLF + caps + b"." + CRLF)
        elif name == b"AUTH" and bare:
            self._client_move(_CI.HARMLESS)
            mechanisms = b"".join(m.value.encode("ascii") + CRLF for m in self._mechanisms)
            mechanisms = b"" if plaintext else mechanisms
            self._to_client(replies.POP3_MECHANISMS_FOLLOW + CRLF + mechanisms + b"." + CRLF)
        elif name == b"QUIT" and bare:
            self._client_move(_CI.QUIT)
            self._answer(replies.POP3_LOGOUT)
            self._out.append(Close("client logged out"))
        elif name == b"STLS" and bare and plaintext:
            self._start_client_tls(replies.POP3_BEGIN_TLS + CRLF)
        elif name in (b"USER", b"PASS", b"AUTH") and plaintext:
            self._rejected(replies.POP3_TLS_REQUIRED)
        elif name == b"USER" and not bare:
            self._client_move(_CI.USER)
            self._user = args
            self._answer(replies.POP3_USER_ACCEPTED)
        elif name == b"PASS" and self._client is not _C.USER_GIVEN:
            self._rejected(replies.POP3_NO_USER)
        elif name == b"PASS" and not bare:
            self._on_pass(args)
        elif name == b"AUTH":
            mechanism, space, initial = args.partition(b" ")
            if not mechanism or (space and not initial) or b" " in initial:
                self._rejected(replies.POP3_SYNTAX_ERROR)
            else:
                self._start_sasl(mechanism, initial if space else None)
        elif name == b"STLS" and not plaintext:
            self._rejected(replies.POP3_NO_STLS)
        elif name in _AFTER_LOGIN_COMMANDS:
            self._rejected(replies.POP3_LOG_IN_FIRST)
        elif name in _LOCAL_COMMANDS:
            self._rejected(replies.POP3_SYNTAX_ERROR)
        else:
            self._rejected(replies.POP3_UNKNOWN_COMMAND)

    def _on_pass(self, password: bytes) -> None:
        try:
            login = text_credential(self._user, "user name")
            if not login:
                raise InvalidCredentials("user name is empty")
            credentials = Credentials(login=login, password=text_credential(password, "password"))
        except InvalidCredentials as exc:
            self._invalid_credentials(str(exc))
            return
        self._begin_login(credentials)

    # === upstream side ===================================================================

    def _ask_capabilities(self) -> None:
        self._reader.expect_list()
        self._to_server(b"CAPA" + CRLF)

    def _on_reply(self, reply: _Reply) -> None:
        state = self._upstream
        said = printable(reply.raw)
        if state is _U.GREETING:
            self._on_greeting(reply)
        elif reply.status is _Status.CONTINUE:
            self._on_continuation(reply.text)
        elif state in UPSTREAM_IN_FLIGHT:
            self._on_login_result(reply)
        elif state is _U.READY:
            if reply.status is not _Status.ERR:
                raise self._upstream_error(f"upstream sent an unasked reply: {said!r}")
            self._going_away(f"said {said}")
        elif reply.status is _Status.ERR and state is _U.STARTTLS:
            self._unsuitable(
                f"upstream_tls is starttls but it refused STLS: {said}; use implicit TLS (port 995)"
            )
        elif reply.status is _Status.ERR:
            self._unsuitable(
                f"it refused CAPA: {said}; without CAPA (RFC 2449) it cannot say that it "
                "offers SASL XOAUTH2"
            )
        elif state is _U.STARTTLS:
            self._start_upstream_tls("STLS +OK")
        else:
            self._caps = Pop3Capabilities.parse(reply.lines)
            if self._require_xoauth2(self._caps.mechanisms, "SASL XOAUTH2"):
                self._upstream_move(_UI.CAPABLE)

    def _on_greeting(self, reply: _Reply) -> None:
        if reply.status is _Status.ERR:
            self._going_away(f"said {printable(reply.raw)}")
        elif reply.status is not _Status.OK:
            raise self._upstream_error(
                f"upstream greeting is not +OK: {printable(reply.raw, 80)!r}"
            )
        elif self._settings.upstream_tls is UpstreamTls.STARTTLS:
            self._upstream_move(_UI.ASK_STARTTLS)
            self._to_server(b"STLS" + CRLF)
        else:
            self._upstream_move(_UI.ASK_CAPABILITIES)
            self._ask_capabilities()

    def _on_login_result(self, reply: _Reply) -> None:
        said = printable(reply.raw)
        if reply.status is _Status.OK:
            self._logged_in(reply.raw + CRLF)
        elif self._upstream is _U.AUTH_SENT:
            self._login_refused(Verdict.EXCHANGE_REFUSED, said)
        elif reply.code in _TEMPORARY_CODES:
            self._login_refused(Verdict.TEMPORARY, said)
        elif reply.code.startswith(b"SYS"):
            self._login_refused(Verdict.SYSTEM_ERROR, said)
        else:
            self._login_refused(Verdict.TOKEN_REJECTED, said)


state_diagrams = Pop3Auth.state_diagrams
