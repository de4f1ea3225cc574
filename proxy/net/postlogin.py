"""What the upstream says right after a login, and as it ends a session.

Exchange Online can accept a token and then refuse the mailbox: IMAP answers the first
command ``BAD User is authenticated but not connected`` (or ends with ``* BYE`` saying
so), POP3 ``-ERR`` with the same words, and SMTP refuses the message as
``SendAsDenied``; the app lacks the mailbox permission (or its service principal is not
registered in Exchange). The login *looked* successful. :class:`FirstLines` watches the
first upstream lines after a login -- at most :data:`WATCH_LINES` lines or
:data:`WATCH_BYTES` bytes, and only those -- for these answers; after them the relay is
raw bytes again.

When a token expires, Exchange ends the session with ``* BYE Session invalidated -
AccessTokenExpired`` (POP3 ``-ERR``, SMTP ``421`` with the same word). That is looked for
only in the last bytes the upstream sent before it ended the session
(:func:`token_expired`), never in the session itself.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.protocol.framing import printable

__all__ = ["TAIL", "WATCH_BYTES", "WATCH_LINES", "FirstLines", "token_expired"]

#: How much of the upstream's output after a login is looked at.
WATCH_LINES: Final = 12
WATCH_BYTES: Final = 8192

#: The start of a status reply that refuses or ends something: IMAP ``tag NO|BAD`` or
#: ``* NO|BAD|BYE``, POP3 ``-ERR``, SMTP ``4xx``/``5xx``. The words are looked for only in
#: such lines, never in a message's text (a bounce quoting them, say).
_REFUSAL: Final = rb"(?:\S+ (?:NO|BAD|BYE)|-ERR|[45]\d\d[ -])"
_NOT_CONNECTED: Final = re.compile(
    rb"^" + _REFUSAL + rb".*(?:User is authenticated but not connected|SendAsDenied)",
    re.IGNORECASE,
)
_TOKEN_EXPIRED: Final = re.compile(
    rb"^" + _REFUSAL + rb".*AccessTokenExpired", re.IGNORECASE | re.MULTILINE
)
#: How far back from the end of a session the expiry notice is looked for.
TAIL: Final = 512


class FirstLines:
    """Watches the first upstream lines after a login; see the module documentation.

    Feed it what the upstream sends (:meth:`feed`) until :attr:`done`; then
    :attr:`refusal` is the line that refused the mailbox (printable, at most 200
    characters), or ``""``.
    """

    __slots__ = ("_seen", "done", "refusal")

    def __init__(self) -> None:
        self._seen = bytearray()
        self.done = False
        self.refusal = ""

    def feed(self, data: bytes | bytearray) -> None:
        if self.done:
            return
        self._seen += data[: WATCH_BYTES - len(self._seen)]
        complete = self._seen.count(b"\n")
        full = len(self._seen) >= WATCH_BYTES or complete >= WATCH_LINES
        lines = self._seen.split(b"\n")
        # Only whole lines are judged, unless the budget is spent.
        for line in lines[: min(complete, WATCH_LINES)] if not full else lines[:WATCH_LINES]:
            if _NOT_CONNECTED.search(line):
                self.refusal = printable(bytes(line).rstrip(b"\r"))
                self.finish()
                return
        if full:
            self.finish()

    def finish(self) -> None:
        """Stop watching (the budget is spent, or the session ended)."""
        self.done = True
        self._seen = bytearray()


def token_expired(tail: bytes | bytearray) -> bool:
    """Did the upstream's last bytes say the session's token expired?"""
    return _TOKEN_EXPIRED.search(bytes(tail[-TAIL:])) is not None
