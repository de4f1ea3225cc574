"""The pre-authentication phase of one proxied IMAP connection: :class:`ImapAuth`.

Theory of operation
===================

``ImapAuth`` is the :class:`~proxy.protocol.login.LoginMachine` (read its module first:
the two sides, the login attempt, reconnecting, limits and secrets are all there) with
IMAP's grammar, replies and upstream dialogue, which this module holds.

Client side (we are the server; RFC 3501 / RFC 9051)
    The greeting carries our own pre-authentication capability list (``IMAP4rev1 SASL-IR
    LITERAL+ ID AUTH=PLAIN``, followed by ``AUTH=EXTERNAL`` when
    ``AuthSettings.sasl_external`` is set and ``AUTH=XOAUTH2 AUTH=OAUTHBEARER`` when
    ``sasl_bearer`` is; on a STARTTLS listener before TLS ``STARTTLS LOGINDISABLED`` and
    no ``AUTH=``, RFC 2595 / RFC 8314). Command names are case-insensitive. CAPABILITY,
    NOOP, ID (``* ID NIL``) and LOGOUT are answered locally; STARTTLS only on a STARTTLS
    listener, before TLS, with a tagged ``OK``. LOGIN takes two astrings (RFC 3501
    section 9): atoms, quoted strings with ``\\\\`` and ``\\"`` escapes, and literals,
    synchronizing (``{n}``, answered by ``+ Ready for literal data``) or not (``{n+}``,
    RFC 7888 LITERAL+). AUTHENTICATE takes the mechanisms advertised (others get ``NO
    Unsupported authentication mechanism.``), each with one response: on the command line
    (RFC 4959 SASL-IR, ``=`` for an empty one) or after our empty ``+`` continuation.
    Before TLS on a STARTTLS listener LOGIN and AUTHENTICATE are refused with ``NO
    [PRIVACYREQUIRED]`` (RFC 5530). Other commands get ``BAD`` (``NO Please authenticate
    first`` for commands of the authenticated state), a synchronizing literal of a
    command we refuse before its data is sent (RFC 3501 section 7.5), and a line without a
    valid tag an untagged ``BAD``. Literals are bounded by ``max_literal``; the bytes
    pipelined behind a login by ``max_line + max_literal``.

Upstream side (we are the client)
    Greeting: ``* OK`` (maybe with ``[CAPABILITY ...]``); ``* BYE`` means "not now",
    ``* PREAUTH`` that the server cannot be used (the connection is logged in to some
    mailbox already). With ``UpstreamTls.STARTTLS`` we ask CAPABILITY unless the
    greeting listed ``STARTTLS``, require it, send it and expect our tagged ``OK``. After
    TLS we always ask CAPABILITY again; with implicit TLS a greeting's list that offers
    ``AUTH=XOAUTH2`` is taken as it is. The list must offer ``AUTH=XOAUTH2``. Our tags are
    ``X1``, ``X2``... Then ``AUTHENTICATE XOAUTH2 <base64>`` on one line if the server
    offers SASL-IR, else the command alone and the response after its ``+``. Responses
    may carry literals, which are read as part of their response; ``* BYE`` at any time
    means the server is going away.

Outcomes
    * Tagged ``OK``: the untagged responses received since our AUTHENTICATE are
      forwarded, then the upstream's completion line with *the client's* tag in place of
      ours (its code and text, such as the post-login ``[CAPABILITY ...]``, are kept).
    * Tagged ``NO``: ``NO [AUTHENTICATIONFAILED]``, unless the upstream marked it
      ``[UNAVAILABLE]``, which is passed on as ``NO [UNAVAILABLE]``.
    * Tagged ``BAD`` (before or after the token was sent), or ``NO`` before the token was
      sent: the XOAUTH2 exchange itself was refused; the client gets ``NO [UNAVAILABLE]``.
    * The failure that spends a budget is followed by ``* BYE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from proxy.protocol import replies
from proxy.protocol.actions import Close
from proxy.protocol.capabilities import (
    IMAP_PASSWORD_MECHANISMS,
    ImapCapabilities,
    imap_proxy_capabilities,
)
from proxy.protocol.errors import FrameError, UpstreamProtocolError
from proxy.protocol.framing import LineBuffer, literal_at_end, printable
from proxy.protocol.login import (
    CLIENT_PARSING,
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
from proxy.protocol.sasl import Credentials, InvalidCredentials, text_credential

if TYPE_CHECKING:
    from proxy.protocol.modes import AuthSettings

__all__ = ["CLIENT_TRANSITIONS", "UPSTREAM_TRANSITIONS", "ImapAuth", "state_diagrams"]

#: Every legal move of the client side: IMAP's commands are all in the shared table.
CLIENT_TRANSITIONS: Final = client_table("imap-client", {})

#: Every legal move of the upstream side.
UPSTREAM_TRANSITIONS: Final = upstream_table(
    "imap-upstream",
    {
        _U.GREETING: {
            _UI.ASK_PLAIN_CAPABILITIES: _U.PLAIN_CAPABILITIES,
            _UI.ASK_STARTTLS: _U.STARTTLS,  # the greeting's list offers STARTTLS
            _UI.ASK_CAPABILITIES: _U.CAPABILITIES,
            _UI.CAPABLE: _U.READY,  # the greeting's list offers AUTH=XOAUTH2
            _UI.UNSUITABLE: _U.FAILED,  # PREAUTH
        },
        _U.READY: {_UI.AUTHENTICATE_IR: _U.TOKEN_SENT},  # SASL-IR
    },
    chatter=True,
)


# === Syntax ================================================================================

#: Commands of the authenticated and selected states (RFC 3501, 9051 and common
#: extensions): before login they get "NO Please authenticate first" rather than BAD.
_AFTER_LOGIN_COMMANDS: Final = frozenset(
    b"""APPEND CHECK CLOSE COMPRESS COPY CREATE DELETE DELETEACL ENABLE EXAMINE EXPUNGE
    FETCH GETACL GETMETADATA GETQUOTA GETQUOTAROOT IDLE LIST LISTRIGHTS LSUB MOVE MYRIGHTS
    NAMESPACE NOTIFY RENAME SEARCH SELECT SETACL SETMETADATA SETQUOTA SORT STATUS STORE
    SUBSCRIBE THREAD UID UNSELECT UNSUBSCRIBE""".split()
)

#: Commands the proxy runs itself before login.
_LOCAL_COMMANDS: Final = frozenset(
    {b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE", b"ID"}
)

_SP: Final = 0x20
_DQUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_LBRACE: Final = 0x7B
#: atom-specials of RFC 3501 other than CTL and SP, without "]" (ASTRING-CHAR allows it).
_ATOM_SPECIALS: Final = frozenset(b'(){%*"\\')
#: Tags additionally exclude "+" (RFC 3501 section 9, ``tag``).
_TAG_SPECIALS: Final = _ATOM_SPECIALS | {ord("+")}


class _SyntaxError(Exception):
    """Internal: the command's arguments do not parse (answered with BAD)."""


def _astring_char(byte: int) -> bool:
    # Bytes >= 0x80 are accepted, leniently: some legacy clients send UTF-8 passwords as
    # atoms. Credentials are checked to be UTF-8 without control characters afterwards.
    return byte > _SP and byte != 0x7F and byte not in _ATOM_SPECIALS


def _valid_tag(tag: bytes) -> bool:
    return bool(tag) and all(0x20 < b < 0x7F and b not in _TAG_SPECIALS for b in tag)


def _quoted(line: bytes, pos: int) -> tuple[bytes, int]:
    """Parse the quoted string starting at ``line[pos] == '"'``; return it and the end."""
    value = bytearray()
    i = pos + 1
    while i < len(line):
        byte = line[i]
        if byte == _DQUOTE:
            return bytes(value), i + 1
        if byte == _BACKSLASH:
            i += 1
            if i >= len(line) or line[i] not in (_DQUOTE, _BACKSLASH):
                raise _SyntaxError
            value.append(line[i])
        elif byte in (0x00, 0x0D, 0x0A):
            raise _SyntaxError
        else:
            value.append(byte)
        i += 1
    raise _SyntaxError


def _atom(line: bytes, pos: int) -> tuple[bytes, int]:
    end = line.find(b" ", pos)
    end = len(line) if end < 0 else end
    value = line[pos:end]
    if not value or not all(_astring_char(b) for b in value):
        raise _SyntaxError
    return value, end


def _astrings(lines: list[bytes], literals: list[bytes], pos: int) -> list[bytes]:
    """The astring arguments of a command starting at ``lines[0][pos]`` (a space).

    ``lines[i]`` ends with the announcement of ``literals[i]``; ``lines[i + 1]`` is
    what follows that literal's data.
    """
    values: list[bytes] = []
    index = 0
    while True:
        line = lines[index]
        if pos == len(line):
            if index != len(lines) - 1:
                raise _SyntaxError
            return values
        if line[pos] != _SP or pos + 1 == len(line):
            raise _SyntaxError
        pos += 1
        if line[pos] == _DQUOTE:
            value, pos = _quoted(line, pos)
        elif line[pos] == _LBRACE:
            marker = line[pos:]
            if index >= len(literals) or marker.rfind(b"{") != 0:
                raise _SyntaxError
            if literal_at_end(marker, len(literals[index])) is None:
                raise _SyntaxError
            values.append(literals[index])
            index += 1
            pos = 0
            continue
        else:
            value, pos = _atom(line, pos)
        values.append(value)


@dataclass(frozen=True, slots=True)
class _Response:
    """One response from the upstream, split the way RFC 3501 section 7 describes it."""

    #: ``b"*"`` (untagged), ``b"+"`` (continuation request) or a command tag.
    tag: bytes
    #: First word after the tag, upper-cased (``OK``, ``NO``, ``CAPABILITY``...).
    status: bytes
    #: The line after ``tag SP``, kept for rewriting the tag.
    after_tag: bytes
    #: Response code name (``CAPABILITY``, ``UNAVAILABLE``...) and its arguments.
    code: bytes
    code_data: bytes
    #: Human-readable text; for a continuation request, everything after ``+ ``.
    text: bytes
    #: The response as received, line endings and literals included.
    raw: bytes

    @classmethod
    def parse(cls, first: bytes, raw: bytes) -> _Response:
        if first.startswith(b"+"):
            text = first[2:] if first[1:2] == b" " else first[1:]
            return cls(b"+", b"", first[2:], b"", b"", text, raw)
        tag, sp, after = first.partition(b" ")
        if not sp or not tag or not after:
            raise UpstreamProtocolError(
                f"malformed response from the upstream: {printable(first, 80)!r}",
                reply_hint=replies.IMAP.upstream_error,
            )
        word, _, rest = after.partition(b" ")
        status = word.upper()
        code = code_data = b""
        if status in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH") and rest.startswith(b"["):
            end = rest.find(b"]")
            if end > 0:
                code, _, code_data = rest[1:end].partition(b" ")
                code = code.upper()
                rest = rest[end + 1 :].lstrip(b" ")
        return cls(tag, status, after, code, code_data, rest, raw)


class _ResponseReader:
    """Reassembles upstream responses, literals included, bounded by ``limit`` bytes."""

    __slots__ = ("_buf", "_first", "_limit", "_literal", "_parts", "_size")

    def __init__(self, limit: int) -> None:
        self._buf = LineBuffer(limit)
        self._limit = limit
        self._first: bytes | None = None
        self._parts: list[bytes] = []
        self._literal: int | None = None
        self._size = 0

    def __len__(self) -> int:
        return len(self._buf) + self._size

    def receive_data(self, data: bytes) -> None:
        self._buf.receive_data(data)

    def next_reply(self) -> _Response | None:
        """The next complete response, or ``None``; :class:`FrameError` if oversized."""
        while True:
            if self._literal is not None:
                data = self._buf.next_bytes(self._literal)
                if data is None:
                    return None
                self._add(data)
                self._literal = None
            line = self._buf.next_line()
            if line is None:
                return None
            self._add(line + CRLF)
            if self._first is None:
                self._first = line
            if not line.startswith(b"+"):
                literal = literal_at_end(line, self._limit)
                if literal is not None:
                    self._literal = literal.size
                    continue
            first, raw = self._first, b"".join(self._parts)
            self._first, self._parts, self._size = None, [], 0
            return _Response.parse(first, raw)

    def take_all(self) -> bytes:
        """Everything held, in order (for the relay, or to be dropped)."""
        rest = b"".join(self._parts) + self._buf.take_all()
        self._first, self._parts, self._size, self._literal = None, [], 0, None
        return rest

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self._limit:
            raise FrameError(f"response longer than {self._limit} bytes")
        self._parts.append(piece)


@dataclass(slots=True)
class _Command:
    """A client command being reassembled across literals."""

    tag: bytes
    name: bytes
    #: Where the arguments start in ``lines[0]`` (at the space before them).
    args_at: int
    lines: list[bytes]
    #: Literal data, kept only for LOGIN (whose arguments we need).
    literals: list[bytes] = field(default_factory=list)
    keep: bool = False
    has_literal: bool = False
    literal_due: int | None = None

    @property
    def args(self) -> bytes:
        return self.lines[0][self.args_at + 1 :]

    @property
    def size(self) -> int:
        return sum(map(len, self.lines)) + sum(map(len, self.literals))


# === The machine ===========================================================================


class ImapAuth(LoginMachine[_Command, _Response]):
    """The pre-authentication phase of one proxied IMAP connection (see the module)."""

    __slots__ = ("_caps", "_client_tag", "_command", "_forward", "_forward_size", "_tag", "_tags")

    client_transitions = CLIENT_TRANSITIONS
    upstream_transitions = UPSTREAM_TRANSITIONS
    words = replies.IMAP
    token_rejected_causes = (
        "the token's audience or roles do not fit this server (Microsoft 365 needs the "
        "IMAP.AccessAsApp application permission with admin consent), or the app may not "
        "open this mailbox (Exchange: the service principal is not registered or lacks "
        "Add-MailboxPermission FullAccess)."
    )

    def __init__(self, settings: AuthSettings) -> None:
        super().__init__(
            settings,
            password_mechanisms=IMAP_PASSWORD_MECHANISMS,
            first_state=_C.NOT_AUTHENTICATED,
            reader=_ResponseReader(settings.max_server_line),
        )
        self._command: _Command | None = None
        #: The tag of the client command being answered (``*`` for an untagged answer).
        self._client_tag = b"*"
        #: Our last tag upstream (``X1``, ``X2``...), while its command is out.
        self._tags = 0
        self._tag = b""
        self._caps = ImapCapabilities()
        #: Untagged responses the upstream sent since our AUTHENTICATE.
        self._forward: list[bytes] = []
        self._forward_size = 0

    def _held(self) -> int:
        command = self._command.size if self._command is not None else 0
        return command + self._forward_size

    def _forget_connection(self) -> None:
        self._forward, self._forward_size = [], 0

    def _greet(self) -> None:
        caps = imap_proxy_capabilities(
            before_tls=self._client is _C.PLAINTEXT, mechanisms=self._mechanisms
        )
        self._to_client(b"* OK [CAPABILITY " + caps + b"] " + replies.IMAP_GREETING_TEXT + CRLF)

    def _answer(self, reply: bytes) -> None:
        self._to_client(self._client_tag + b" " + reply + CRLF)

    # === client side =====================================================================

    def _next_command(self) -> _Command | None:
        """Reassemble the next complete command; answer literal announcements."""
        buf = self._client_buf
        while self._client in CLIENT_PARSING:
            command = self._command
            if command is not None and command.literal_due is not None:
                data = buf.next_bytes(command.literal_due)
                if data is None:
                    return None
                command.literal_due = None
                if command.keep:
                    command.literals.append(data)
            line = buf.next_line()
            if line is None:
                return None
            if command is None:
                command = self._begin_command(line)
                if command is None:
                    continue
            elif command.keep:
                command.lines.append(line)
            literal = literal_at_end(line, self._settings.max_literal)
            if literal is None:
                self._command = None
                return command
            command.has_literal = True
            if command.keep and len(command.literals) == 2:
                command.keep = False  # LOGIN takes two arguments: this one is too many
            if literal.synchronizing and not command.keep:
                # Refuse before the data is sent (RFC 3501 section 7.5).
                self._command = None
                self._refuse(command)
                continue
            if literal.synchronizing:
                self._to_client(replies.IMAP_CONTINUE_LITERAL)
            command.literal_due = literal.size
            self._command = command
        return None

    def _begin_command(self, line: bytes) -> _Command | None:
        tag, _, rest = line.partition(b" ")
        if not _valid_tag(tag):
            self._client_tag = b"*"
            self._rejected(replies.IMAP_NO_VALID_TAG)
            return None
        name = rest.partition(b" ")[0].upper()
        keep = name == b"LOGIN" and self._client is _C.NOT_AUTHENTICATED
        return _Command(tag, name, len(tag) + 1 + len(name), [line], keep=keep)

    def _on_command(self, command: _Command) -> None:
        self._client_tag = command.tag
        name = command.name
        plain = command.args == b"" and not command.has_literal
        if name == b"CAPABILITY" and plain:
            caps = imap_proxy_capabilities(
                before_tls=self._client is _C.PLAINTEXT, mechanisms=self._mechanisms
            )
            self._client_move(_CI.HARMLESS)
            self._to_client(b"* CAPABILITY " + caps + CRLF)
            self._answer(replies.IMAP_CAPABILITY_DONE)
        elif name == b"NOOP" and plain:
            self._client_move(_CI.HARMLESS)
            self._answer(replies.IMAP_NOOP_DONE)
        elif name == b"ID":
            self._client_move(_CI.HARMLESS)
            self._to_client(replies.IMAP_ID_NIL)
            self._answer(replies.IMAP_ID_DONE)
        elif name == b"LOGOUT" and plain:
            self._client_move(_CI.QUIT)
            self._to_client(replies.IMAP_BYE_LOGOUT)
            self._answer(replies.IMAP_LOGOUT_DONE)
            self._out.append(Close("client logged out"))
        elif name == b"STARTTLS" and plain and self._client is _C.PLAINTEXT:
            self._start_client_tls(command.tag + b" " + replies.IMAP_BEGIN_TLS + CRLF)
        elif name == b"LOGIN" and self._client is _C.NOT_AUTHENTICATED:
            self._on_login(command)
        elif name == b"AUTHENTICATE" and self._client is _C.NOT_AUTHENTICATED:
            parts = command.args.split(b" ")
            if command.has_literal or not command.args or len(parts) > 2:
                self._rejected(replies.IMAP_SYNTAX_ERROR)
            else:
                self._start_sasl(parts[0], parts[1] if len(parts) == 2 else None)
        else:
            self._refuse(command)

    def _refuse(self, command: _Command) -> None:
        """Answer a command we will not run (the answer a literal refusal gets too)."""
        self._client_tag = command.tag
        name = command.name
        if name in (b"LOGIN", b"AUTHENTICATE") and self._client is _C.PLAINTEXT:
            reply = replies.IMAP_PRIVACY_REQUIRED
        elif name in _AFTER_LOGIN_COMMANDS:
            reply = replies.IMAP_AUTHENTICATE_FIRST
        elif name == b"STARTTLS" and self._client is not _C.PLAINTEXT:
            reply = replies.IMAP_NO_STARTTLS
        elif name in _LOCAL_COMMANDS and command.has_literal:
            reply = replies.IMAP_LITERAL_REFUSED
        elif name in _LOCAL_COMMANDS:
            reply = replies.IMAP_SYNTAX_ERROR
        else:
            reply = replies.IMAP_UNKNOWN_COMMAND
        self._rejected(reply)

    def _on_login(self, command: _Command) -> None:
        try:
            if not command.keep:
                raise _SyntaxError
            values = _astrings(command.lines, command.literals, command.args_at)
            if len(values) != 2:
                raise _SyntaxError
        except _SyntaxError:
            self._rejected(replies.IMAP_SYNTAX_ERROR)
            return
        try:
            login = text_credential(values[0], "user name")
            password = text_credential(values[1], "password")
            if not login:
                raise InvalidCredentials("user name is empty")
        except InvalidCredentials as exc:
            self._invalid_credentials(str(exc))
            return
        self._begin_login(Credentials(login=login, password=password))

    # === upstream side ===================================================================

    def _send_command(self, command: bytes) -> None:
        self._tags += 1
        self._tag = b"X%d" % self._tags
        if command == b"CAPABILITY":
            self._caps = ImapCapabilities()
        self._to_server(self._tag + b" " + command + CRLF)

    def _ask_capabilities(self) -> None:
        self._send_command(b"CAPABILITY")

    def _on_reply(self, reply: _Response) -> None:
        state = self._upstream
        if reply.tag == b"*" and reply.status == b"BYE":
            self._going_away(f"said BYE: {printable(reply.text)}")
        elif state is _U.GREETING:
            self._on_greeting(reply)
        elif reply.tag == b"*":
            if reply.status == b"CAPABILITY" and state in (_U.PLAIN_CAPABILITIES, _U.CAPABILITIES):
                self._caps = ImapCapabilities.parse(reply.after_tag[len(b"CAPABILITY ") :])
            if state in UPSTREAM_IN_FLIGHT:
                self._forward_size += len(reply.raw)
                if self._forward_size > self._settings.max_server_line:
                    raise self._upstream_error("too many untagged responses at login")
                self._forward.append(reply.raw)
            self._upstream_move(_UI.CHATTER)
        elif reply.tag == b"+":
            self._on_continuation(reply.text)
        else:
            self._on_tagged(reply)

    def _on_tagged(self, reply: _Response) -> None:
        state = self._upstream
        if not self._tag or reply.tag != self._tag:
            raise self._upstream_error(
                f"upstream answered an unknown tag in state {state.name}: "
                f"{printable(reply.raw, 80)!r}",
            )
        if reply.status not in (b"OK", b"NO", b"BAD"):
            raise self._upstream_error(f"upstream sent a tagged {printable(reply.status, 20)!r}")
        self._tag = b""
        if state in UPSTREAM_IN_FLIGHT:
            self._on_login_result(reply)
        elif reply.status != b"OK":
            what = "STARTTLS" if state is _U.STARTTLS else "CAPABILITY"
            self._unsuitable(f"it refused {what}: {printable(reply.after_tag)}")
        elif state is _U.STARTTLS:
            self._start_upstream_tls("STARTTLS OK")
        else:
            if reply.code == b"CAPABILITY":
                self._caps = ImapCapabilities.parse(reply.code_data)
            if state is _U.PLAIN_CAPABILITIES:
                self._ask_starttls()
            elif self._require_xoauth2(self._caps.mechanisms, "AUTH=XOAUTH2"):
                self._upstream_move(_UI.CAPABLE)

    def _on_greeting(self, reply: _Response) -> None:
        if reply.tag != b"*" or reply.status not in (b"OK", b"PREAUTH"):
            raise self._upstream_error(
                f"upstream greeting is not * OK: {printable(reply.raw, 80)!r}"
            )
        if reply.status == b"PREAUTH":
            self._unsuitable(
                "it greeted with PREAUTH (the connection is already logged in to some "
                "mailbox), so there is no way to log in to the right one with XOAUTH2"
            )
            return
        # A list in the greeting saves a round trip when it has what we need; when it
        # does not, we ask CAPABILITY rather than trust a possibly abridged list.
        listed = ImapCapabilities()
        if reply.code == b"CAPABILITY":
            listed = ImapCapabilities.parse(reply.code_data)
        if self._settings.upstream_tls is UpstreamTls.IMPLICIT:
            if "XOAUTH2" in listed.mechanisms:
                self._caps = listed
                self._upstream_move(_UI.CAPABLE)
            else:
                self._upstream_move(_UI.ASK_CAPABILITIES)
                self._send_command(b"CAPABILITY")
        elif "STARTTLS" in listed:
            self._caps = listed
            self._ask_starttls()
        else:
            self._upstream_move(_UI.ASK_PLAIN_CAPABILITIES)
            self._send_command(b"CAPABILITY")

    def _ask_starttls(self) -> None:
        if "STARTTLS" not in self._caps:
            self._unsuitable(
                "upstream_tls is starttls but the server does not offer STARTTLS "
                f"({self._caps!r}); use implicit TLS (port 993)"
            )
            return
        self._upstream_move(_UI.ASK_STARTTLS)
        self._send_command(b"STARTTLS")

    def _send_authenticate(self) -> None:
        attempt = self._current_attempt()
        self._forget_connection()
        if "SASL-IR" in self._caps:
            self._upstream_move(_UI.AUTHENTICATE_IR)
            self._send_command(b"AUTHENTICATE XOAUTH2 " + attempt.response)
            attempt.response = b""
        else:
            self._upstream_move(_UI.AUTHENTICATE)
            self._send_command(b"AUTHENTICATE XOAUTH2")

    def _on_login_result(self, reply: _Response) -> None:
        if reply.status == b"OK":
            forward = b"".join(self._forward)
            self._forget_connection()
            self._logged_in(forward + self._client_tag + b" " + reply.after_tag + CRLF)
        elif reply.status == b"BAD" or self._upstream is _U.AUTH_SENT:
            self._login_refused(Verdict.EXCHANGE_REFUSED, printable(reply.after_tag))
        elif reply.code == b"UNAVAILABLE":
            self._login_refused(Verdict.TEMPORARY, printable(reply.after_tag))
        else:
            self._login_refused(Verdict.TOKEN_REJECTED, printable(reply.after_tag))


state_diagrams = ImapAuth.state_diagrams
