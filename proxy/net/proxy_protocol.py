"""Reading a PROXY protocol header off a new connection, and nothing after it.

The parsing is :mod:`proxy.protocol.proxy_header`'s; this module only moves bytes. It
peeks at what has arrived, asks the parser how long the header is, and then takes exactly
that many bytes off the socket: whatever the client sent behind the header (a TLS
ClientHello, a pipelined command) stays in the socket for the session, as if the balancer
had not been there. The caller sets the deadline.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from proxy.protocol.proxy_header import ProxyHeader, ProxyHeaderError, header_length, parse_header

if TYPE_CHECKING:
    from collections.abc import Iterable

    import trio

    from proxy.config import Network

__all__ = ["is_trusted", "read_proxy_header"]

#: The largest header accepted (version 2 with TLVs; HAProxy's own stay far below).
MAX_HEADER = 4096


def is_trusted(address: str, networks: Iterable[Network]) -> bool:
    """Is ``address`` (an IPv4-mapped IPv6 address counts as IPv4) in ``networks``?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


async def read_proxy_header(stream: trio.SocketStream) -> ProxyHeader:
    """Read one header from ``stream``'s socket, leaving every later byte unread.

    Raises :exc:`~proxy.protocol.proxy_header.ProxyHeaderError` for a malformed header
    or a connection that ends before one; ``OSError`` if the connection breaks.
    """
    sock = stream.socket
    taken = b""
    while True:
        # What has arrived, without taking it; at most what the header may still need.
        peeked = await sock.recv(MAX_HEADER - len(taken), socket.MSG_PEEK)
        if not peeked:
            raise ProxyHeaderError("the connection ended before a whole PROXY header")
        length = header_length(taken + peeked, max_size=MAX_HEADER)
        # Until the length is known every byte is the header's (a header's prefix cannot
        # be followed by anything else); then exactly up to its end.
        want = len(peeked) if length is None else min(len(peeked), length - len(taken))
        while want:
            data = await sock.recv(want)
            if not data:
                raise ProxyHeaderError("the connection ended before a whole PROXY header")
            taken += data
            want -= len(data)
        if length is not None and len(taken) == length:
            return parse_header(taken)
