"""Protocol errors that say whose fault it was.

A machine raises one of these from ``handle()`` after moving itself to its ``ERROR`` state;
the driver sends :attr:`ProxyError.reply_hint` to the client (when there is one) and closes
the connection. Any other exception escaping a machine is a bug.
"""

from __future__ import annotations

__all__ = ["ClientProtocolError", "FrameError", "ProxyError", "UpstreamProtocolError"]


class ProxyError(Exception):
    """Base class: the session cannot go on."""

    def __init__(self, message: str, *, reply_hint: bytes = b"") -> None:
        super().__init__(message)
        #: What the client should be sent before the connection is closed (may be empty).
        self.reply_hint = reply_hint


class ClientProtocolError(ProxyError):
    """The client broke the protocol (or a limit we set on it)."""


class UpstreamProtocolError(ProxyError):
    """The upstream server answered something we cannot work with."""


class FrameError(ValueError):
    """Raised by the framer: a line or literal exceeds its limit, or is malformed.

    Machines translate it into a :class:`ClientProtocolError` or
    :class:`UpstreamProtocolError`, depending on whose bytes they were.
    """
