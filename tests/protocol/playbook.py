"""Transcript tests for the auth machines, in RFC ``C:``/``S:`` notation for two peers.

A transcript is text, one step per line (indentation, blank lines and ``#`` comments are
ignored)::

    C: <line>     client -> proxy      ClientDataReceived   (CRLF appended)
    S: <line>     proxy -> client      SendToClient
    U: <line>     upstream -> proxy    ServerDataReceived
    P: <line>     proxy -> upstream    SendToServer

    >> start | server-connected | server-unavailable <reason> | server-closed
     | client-closed | tls client | tls server | token <mailbox>
     | refused credentials | refused unavailable
    << connect-upstream | request-token <login> <password> [<authzid>]   (shell quoting)
     | request-external [<authzid>] | request-bearer <user> <key>
     | start-tls client <preface line> | start-tls server
     | relay [server=b"..."] [client=b"..."]
     | note <info|warning|error> <text the note contains> | close [<text the reason contains>]
    !! client-error [<reply hint line>] | upstream-error [<reply hint line>]
       (a hint of several lines separates them with a literal \r\n)

``>>`` lines and ``C:``/``U:`` lines are inputs; ``<<``, ``S:``/``P:`` and ``!!`` lines are
what the machine must answer to the input before them, in order. Consecutive wire lines
with the same marker form one chunk: one event for inputs, one byte string for outputs
(adjacent sends are coalesced on both sides, so how the machine splits its writes does
not matter). ``$NAME`` is replaced from the variables given (``$SP`` is a space, for
lines that end in one). Steps can also be built in Python (:class:`Feed`,
:class:`Expect`, :class:`NoteLike`, :class:`CloseLike`, :class:`Raises`) for bytes that
text cannot show.

:func:`run` plays a transcript against a machine in one of three :class:`Mode` s, after
h11's ``tr()``: every data chunk whole, one byte at a time, or with trailing bytes
appended (see :data:`CLIENT_TRAILER`; pass :class:`Trailers` that look like the protocol
under test). On a mismatch it fails with an ``ndiff`` of what was expected against what
came, after the transcript so far; output that the transcript does not assert is a
mismatch too.
"""

from __future__ import annotations

import ast
import difflib
import enum
import re
import shlex
import string
import textwrap
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, assert_never

import pytest

from broker.model import AccessToken
from proxy.protocol.actions import (
    Action,
    BeginRelay,
    Close,
    ConnectUpstream,
    Note,
    RequestToken,
    SendToClient,
    SendToServer,
    Severity,
    StartTls,
)
from proxy.protocol.errors import ClientProtocolError, ProxyError, UpstreamProtocolError
from proxy.protocol.events import (
    ClientClosed,
    ClientDataReceived,
    Event,
    Refusal,
    ServerClosed,
    ServerConnected,
    ServerDataReceived,
    ServerUnavailable,
    Side,
    TlsEstablished,
    TokenIssued,
    TokenRefused,
)
from proxy.protocol.sasl import BearerCredentials, Credentials, ExternalCredentials

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from proxy.protocol.sasl import AnyCredentials

__all__ = [
    "CLIENT_TRAILER",
    "IMAP_TRAILERS",
    "SERVER_TRAILER",
    "TOKEN",
    "CloseLike",
    "Expect",
    "Feed",
    "Machine",
    "Mode",
    "NoteLike",
    "Raises",
    "Step",
    "Trailers",
    "run",
    "three_ways",
    "transcript",
    "two_ways",
]

#: The access token every ``>> token`` step delivers.
TOKEN = AccessToken("eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJlLXRlc3Q", 2e9)

#: Appended to the last client chunk before ``<< relay``: a complete command and a partial
#: one, which must reach ``BeginRelay.to_server`` unparsed and unchanged. Transcripts
#: without a relay get only the partial command, which must change nothing.
CLIENT_TRAILER = b"t9 NOOP\r\nt10 SEL"
PARTIAL_TRAILER = b"t10 SEL"
#: Appended to the last upstream chunk before ``<< relay``: must reach ``to_client``.
SERVER_TRAILER = b"* 3 EXISTS\r\n* 1 REC"


@dataclass(frozen=True, slots=True)
class Trailers:
    """The bytes :attr:`Mode.TRAILING` appends (see :data:`CLIENT_TRAILER`)."""

    #: Before a relay: complete command(s) and a partial one, for ``to_server``.
    client: bytes
    #: Without a relay: an incomplete command that must change nothing.
    partial: bytes
    #: Before a relay: upstream bytes for ``to_client``.
    server: bytes


IMAP_TRAILERS = Trailers(CLIENT_TRAILER, PARTIAL_TRAILER, SERVER_TRAILER)


class Machine(Protocol):
    def start(self) -> list[Action]: ...

    def handle(self, event: Event) -> list[Action]: ...


class Mode(enum.Enum):
    WHOLE = "whole"
    BYTEWISE = "bytewise"
    TRAILING = "trailing"


three_ways = pytest.mark.parametrize("mode", list(Mode), ids=[m.value for m in Mode])
#: For transcripts where trailing bytes change the meaning (e.g. plaintext after STARTTLS).
two_ways = pytest.mark.parametrize(
    "mode", [Mode.WHOLE, Mode.BYTEWISE], ids=[Mode.WHOLE.value, Mode.BYTEWISE.value]
)


@dataclass(frozen=True, slots=True)
class Feed:
    """An input: ``event``, or ``start()`` when it is ``None``."""

    event: Event | None
    text: str = ""


@dataclass(frozen=True, slots=True)
class Expect:
    """An action that must come out exactly like this."""

    action: Action
    text: str = ""


@dataclass(frozen=True, slots=True)
class NoteLike:
    severity: Severity
    contains: str


@dataclass(frozen=True, slots=True)
class CloseLike:
    contains: str = ""


@dataclass(frozen=True, slots=True)
class Raises:
    error: type[ProxyError]
    #: The exact reply hint, or ``None`` not to check it.
    hint: bytes | None = None


Output = Expect | NoteLike | CloseLike | Raises
Step = Feed | Output

_SEVERITIES = {s.value: s for s in Severity}
_RELAY_ARG = re.compile(r'(server|client)=(b"(?:[^"\\]|\\.)*")')


# === Parsing ===============================================================================


def transcript(text: str, **variables: str) -> list[Step]:
    """Parse a transcript (see the module docstring) into steps."""
    values = {"SP": " ", **variables}
    steps: list[Step] = []
    for number, raw in enumerate(textwrap.dedent(text).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = string.Template(line).substitute(values)
        try:
            steps.append(_step(line))
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"transcript line {number}: {raw.strip()!r}: {exc}") from exc
    return _merge_chunks(steps)


def _step(line: str) -> Step:
    marker, rest = line[:2], line[2:]
    if rest.startswith(" "):
        rest = rest[1:]
    data = rest.encode() + b"\r\n"
    if marker == "C:":
        return Feed(ClientDataReceived(data))
    if marker == "U:":
        return Feed(ServerDataReceived(data))
    if marker == "S:":
        return Expect(SendToClient(data))
    if marker == "P:":
        return Expect(SendToServer(data))
    word, _, arg = rest.partition(" ")
    if marker == ">>":
        return Feed(_event(word, arg), line)
    if marker == "<<":
        return _expected_action(word, arg)
    if marker == "!!":
        error = {"client-error": ClientProtocolError, "upstream-error": UpstreamProtocolError}
        # A reply of several lines is written with literal \r\n between them.
        hint = arg.replace("\\r\\n", "\r\n").encode() + b"\r\n" if arg else None
        return Raises(error[word], hint)
    raise ValueError("unknown marker")


def _event(word: str, arg: str) -> Event | None:
    simple: dict[str, Event | None] = {
        "start": None,
        "server-connected": ServerConnected(),
        "server-closed": ServerClosed(),
        "client-closed": ClientClosed(),
    }
    if word in simple:
        return simple[word]
    if word == "tls":
        return TlsEstablished(Side(arg))
    if word == "server-unavailable":
        return ServerUnavailable(arg)
    if word == "token":
        return TokenIssued(arg, TOKEN)
    if word == "refused":
        return TokenRefused(Refusal(arg))
    raise ValueError(f"unknown event {word!r}")


def _expected_action(word: str, arg: str) -> Output:
    if word == "connect-upstream":
        return Expect(ConnectUpstream())
    if word == "request-token":
        login, password, *authzid = shlex.split(arg)
        return Expect(RequestToken(Credentials(login, password, *authzid)))
    if word == "request-external":
        return Expect(RequestToken(ExternalCredentials(*shlex.split(arg))))
    if word == "request-bearer":
        user, key = shlex.split(arg)
        return Expect(RequestToken(BearerCredentials(user, key)))
    if word == "start-tls":
        side, _, preface = arg.partition(" ")
        return Expect(StartTls(Side(side), preface.encode() + b"\r\n" if preface else b""))
    if word == "relay":
        tails = {key: ast.literal_eval(value) for key, value in _RELAY_ARG.findall(arg)}
        return Expect(BeginRelay(tails.get("server", b""), tails.get("client", b"")))
    if word == "note":
        severity, _, contains = arg.partition(" ")
        return NoteLike(_SEVERITIES[severity], contains)
    if word == "close":
        return CloseLike(arg)
    raise ValueError(f"unknown action {word!r}")


def _merge_chunks(steps: list[Step]) -> list[Step]:
    """Consecutive wire steps with the same direction become one chunk."""
    merged: list[Step] = []
    for step in steps:
        last = merged[-1] if merged else None
        joined = _join(last, step)
        if joined is None:
            merged.append(step)
        else:
            merged[-1] = joined
    return merged


def _join(first: Step | None, second: Step) -> Step | None:
    if isinstance(first, Feed) and isinstance(second, Feed):
        a, b = first.event, second.event
        if isinstance(a, ClientDataReceived) and isinstance(b, ClientDataReceived):
            return Feed(ClientDataReceived(a.data + b.data))
        if isinstance(a, ServerDataReceived) and isinstance(b, ServerDataReceived):
            return Feed(ServerDataReceived(a.data + b.data))
    if isinstance(first, Expect) and isinstance(second, Expect):
        joined = _coalesce_pair(first.action, second.action)
        return None if joined is None else Expect(joined)
    return None


def _coalesce_pair(a: Action, b: Action) -> Action | None:
    if isinstance(a, SendToClient) and isinstance(b, SendToClient):
        return SendToClient(a.data + b.data)
    if isinstance(a, SendToServer) and isinstance(b, SendToServer):
        return SendToServer(a.data + b.data)
    return None


def _coalesce(actions: Sequence[Action]) -> list[Action]:
    result: list[Action] = []
    for action in actions:
        joined = _coalesce_pair(result[-1], action) if result else None
        if joined is None:
            result.append(action)
        else:
            result[-1] = joined
    return result


# === Modes =================================================================================


def _with_trailers(steps: list[Step], trailers: Trailers) -> list[Step]:
    relay = next(
        (
            i
            for i, s in enumerate(steps)
            if isinstance(s, Expect) and isinstance(s.action, BeginRelay)
        ),
        None,
    )
    end = len(steps) if relay is None else relay
    last_client = _last_feed(steps, end, ClientDataReceived)
    steps = list(steps)
    if relay is None:
        if last_client is not None:
            steps[last_client] = _appended(steps[last_client], trailers.partial)
        return steps
    last_server = _last_feed(steps, end, ServerDataReceived)
    expected = steps[relay]
    assert isinstance(expected, Expect)
    assert isinstance(expected.action, BeginRelay)
    to_server, to_client = expected.action.to_server, expected.action.to_client
    if last_client is not None:
        steps[last_client] = _appended(steps[last_client], trailers.client)
        to_server += trailers.client
    if last_server is not None:
        steps[last_server] = _appended(steps[last_server], trailers.server)
        to_client += trailers.server
    steps[relay] = Expect(BeginRelay(to_server, to_client))
    return steps


def _last_feed(steps: list[Step], end: int, kind: type[Event]) -> int | None:
    for index in range(end - 1, -1, -1):
        step = steps[index]
        if isinstance(step, Feed) and isinstance(step.event, kind):
            return index
    return None


def _appended(step: Step, tail: bytes) -> Step:
    assert isinstance(step, Feed)
    event = step.event
    if isinstance(event, ClientDataReceived):
        return replace(step, event=ClientDataReceived(event.data + tail))
    assert isinstance(event, ServerDataReceived)
    return replace(step, event=ServerDataReceived(event.data + tail))


def _pieces(event: Event | None, mode: Mode) -> list[Event | None]:
    if mode is Mode.BYTEWISE and isinstance(event, ClientDataReceived):
        return [ClientDataReceived(event.data[i : i + 1]) for i in range(len(event.data))]
    if mode is Mode.BYTEWISE and isinstance(event, ServerDataReceived):
        return [ServerDataReceived(event.data[i : i + 1]) for i in range(len(event.data))]
    return [event]


# === Running ===============================================================================


def run(
    machine: Machine,
    steps: Sequence[Step],
    mode: Mode = Mode.WHOLE,
    variables: Mapping[str, str] | None = None,
    trailers: Trailers = IMAP_TRAILERS,
) -> None:
    """Play ``steps`` against ``machine``; fail the test at the first difference."""
    plan = _with_trailers(list(steps), trailers) if mode is Mode.TRAILING else list(steps)
    shown = dict(variables or {})
    history: list[str] = []
    index = 0
    if plan and not isinstance(plan[0], Feed):
        pytest.fail("a transcript must start with an input")
    while index < len(plan):
        feed = plan[index]
        assert isinstance(feed, Feed)
        index += 1
        expected: list[Output] = []
        while index < len(plan) and not isinstance(plan[index], Feed):
            output = plan[index]
            assert not isinstance(output, Feed)
            expected.append(output)
            index += 1
        actual, error = _feed(machine, feed, mode)
        _compare(feed, expected, actual, error, history, shown, mode)
        history += _render_feed(feed, shown)
        history += [line for item in expected for line in _render_expected(item, shown)]


def _feed(machine: Machine, feed: Feed, mode: Mode) -> tuple[list[Action], ProxyError | None]:
    actions: list[Action] = []
    pieces = _pieces(feed.event, mode)
    for index, piece in enumerate(pieces):
        try:
            actions += machine.start() if piece is None else machine.handle(piece)
        except ProxyError as exc:
            return _coalesce(actions), exc
        if actions and isinstance(actions[-1], BeginRelay | Close):
            # The driver stops feeding here; a relay gets the bytes it still held.
            rest = b"".join(getattr(p, "data", b"") for p in pieces[index + 1 :])
            last = actions[-1]
            if rest and isinstance(last, BeginRelay):
                client_side = isinstance(piece, ClientDataReceived)
                actions[-1] = BeginRelay(
                    last.to_server + (rest if client_side else b""),
                    last.to_client + (b"" if client_side else rest),
                )
            break
    return _coalesce(actions), None


def _matches(expected: Output, action: Action) -> bool:
    match expected:
        case Expect(action=wanted):
            return wanted == action
        case NoteLike(severity=severity, contains=contains):
            return (
                isinstance(action, Note)
                and action.severity is severity
                and (contains in action.text)
            )
        case CloseLike(contains=contains):
            return isinstance(action, Close) and contains in action.reason
        case Raises():
            return False
        case _:
            assert_never(expected)


def _compare(
    feed: Feed,
    expected: list[Output],
    actual: list[Action],
    error: ProxyError | None,
    history: list[str],
    shown: Mapping[str, str],
    mode: Mode,
) -> None:
    raises = [item for item in expected if isinstance(item, Raises)]
    wanted = [item for item in expected if not isinstance(item, Raises)]
    if raises and expected[-1] is not raises[-1]:
        pytest.fail("!! must be the last expectation after an input")
    ok = len(wanted) == len(actual) and all(map(_matches, wanted, actual))
    if raises:
        want = raises[0]
        ok = (
            ok
            and isinstance(error, want.error)
            and (want.hint is None or error.reply_hint == want.hint)
        )
    else:
        ok = ok and error is None
    if ok:
        return
    left = [line for item in expected for line in _render_expected(item, shown)]
    right = [line for action in actual for line in _render_action(action, shown)]
    if error is not None:
        right.append(f"!! {type(error).__name__} {error} (hint {error.reply_hint!r})")
    diff = "\n".join(difflib.ndiff(left, right))
    context = "\n".join(f"  {line}" for line in history[-12:])
    fed = "\n".join(f"  {line}" for line in _render_feed(feed, shown))
    pytest.fail(
        f"transcript mismatch ({mode.value}) after\n{context}\n{fed}\n"
        f"--- expected / +++ actual:\n{diff}",
        pytrace=False,
    )


# === Rendering (for the diff) ==============================================================


def _text(data: bytes, shown: Mapping[str, str]) -> str:
    text = data.decode("utf-8", "backslashreplace")
    for name, value in sorted(shown.items(), key=lambda kv: -len(kv[1])):
        if len(value) >= 8:
            text = text.replace(value, f"${name}")
    return text


def _wire(marker: str, data: bytes, shown: Mapping[str, str]) -> list[str]:
    lines = data.split(b"\r\n")
    rendered = [f"{marker} {_text(line, shown)}".rstrip() for line in lines[:-1]]
    if lines[-1]:
        rendered.append(f"{marker[0]}~ {_text(lines[-1], shown)}  (no line ending)")
    return rendered


def _render_feed(feed: Feed, shown: Mapping[str, str]) -> list[str]:
    match feed.event:
        case ClientDataReceived(data=data):
            return _wire("C:", data, shown)
        case ServerDataReceived(data=data):
            return _wire("U:", data, shown)
        case None:
            return [">> start"]
        case event:
            return [feed.text or f">> {event}"]


def _render_expected(item: Output, shown: Mapping[str, str]) -> list[str]:
    match item:
        case Expect(action=action):
            return _render_action(action, shown)
        case NoteLike(severity=severity, contains=contains):
            return [f"<< note {severity.value} {contains}"]
        case CloseLike(contains=contains):
            return [f"<< close {contains}".rstrip()]
        case Raises(error=error, hint=hint):
            return [f"!! {error.__name__} (hint {hint!r})"]
        case _:
            assert_never(item)


def _render_action(action: Action, shown: Mapping[str, str]) -> list[str]:
    match action:
        case SendToClient(data=data):
            return _wire("S:", data, shown)
        case SendToServer(data=data):
            return _wire("P:", data, shown)
        case RequestToken(credentials=credentials):
            return [_render_request(credentials)]
        case StartTls(side=side, preface=preface):
            return [f"<< start-tls {side.value} {_text(preface, shown)!r}"]
        case BeginRelay(to_server=to_server, to_client=to_client):
            return [f"<< relay server={to_server!r} client={to_client!r}"]
        case Note(severity=severity, text=text):
            return [f"<< note {severity.value} {text}"]
        case Close(reason=reason):
            return [f"<< close {reason}"]
        case ConnectUpstream():
            return ["<< connect-upstream"]
        case _:
            assert_never(action)


def _render_request(credentials: AnyCredentials) -> str:
    match credentials:
        case Credentials(login=login, password=password, authzid=authzid):
            words = [login, password, *([authzid] if authzid else [])]
            return f"<< request-token {shlex.join(words)}"
        case ExternalCredentials(authzid=authzid):
            return f"<< request-external {shlex.join([authzid] if authzid else [])}".rstrip()
        case BearerCredentials(user=user, key=key):
            return f"<< request-bearer {shlex.join([user, key])}"
        case _:
            assert_never(credentials)
