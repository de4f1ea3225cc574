"""sd_notify: tell a service manager (systemd ``Type=notify``) how the service is doing.

The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named in
``$NOTIFY_SOCKET`` (``@`` at its start stands for the abstract namespace). Without that
variable nothing is sent. Sending never blocks and never fails the caller.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["notify", "reloading"]

log = logging.getLogger("xoauth2_proxy.notify")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; whether it went."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r is not a Unix socket address; not notifying", address)
        return False
    message = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, socket.MSG_DONTWAIT, address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def reloading() -> tuple[str, str]:
    """The fields that announce a reload (systemd wants the monotonic time with it)."""
    return "RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"
