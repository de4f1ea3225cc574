"""Abuse resistance through the running proxy: failed-login delays and lockouts, and
connection limits."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, tls_context

if TYPE_CHECKING:
    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.e2e]

ATTACKER = "127.0.0.2"  # loopback has all of 127/8: a second source address
REAL = "127.0.0.1"


def login(
    pki: TestPki, port: int, password: str, *, source: str = REAL, user: str = MAILBOX
) -> bytes:
    """One LOGIN of ``user`` from ``source``; the tagged reply."""
    address = ("127.0.0.1", port)
    with (
        socket.create_connection(address, timeout=30, source_address=(source, 0)) as sock,
        tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls,
        tls.makefile("rwb") as stream,
    ):
        stream.readline()
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        stream.write(f'a1 LOGIN "{user}" "{quoted}"\r\n'.encode())
        stream.flush()
        while not (line := stream.readline()).startswith(b"a1 "):
            assert line, "connection closed before the reply"
        return line.rstrip()


async def test_lockout_refuses_even_the_right_password_until_it_expires(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(failure_delay=0, lockout_after=3, lockout_time=1)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    wrong = [
        await in_thread(lambda: login(pki, proxy.port, "guess", source=ATTACKER)) for _ in range(3)
    ]
    assert wrong[0].startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    locked = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source=ATTACKER))
    assert locked == wrong[0]  # the same answer as a wrong password
    assert "locked out after 3 failures" in caplog.text
    await trio.sleep(1.1)
    assert (await in_thread(lambda: login(pki, proxy.port, PASSWORD))).startswith(b"a1 OK")


async def test_an_attacker_elsewhere_cannot_lock_the_real_program_out(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    rig.limits.update(failure_delay=0, lockout_after=3, lockout_time=600)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    assert (await in_thread(lambda: login(pki, proxy.port, PASSWORD))).startswith(b"a1 OK")
    for _ in range(5):
        await in_thread(lambda: login(pki, proxy.port, "guess", source=ATTACKER))
    attacker = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source=ATTACKER))
    assert attacker.startswith(b"a1 NO [AUTHENTICATIONFAILED]")  # locked out
    real = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source=REAL))
    assert real.startswith(b"a1 OK")


async def test_failures_slow_the_next_attempts_down(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(failure_delay=0.05, max_failure_delay=0.1)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    for _ in range(4):
        await in_thread(lambda: login(pki, proxy.port, "guess", source=ATTACKER))
    delays = [r.getMessage().split("delayed ")[1] for r in caplog.records if "delayed" in r.msg]
    # No delay before the first attempt; then 0.05 s, doubling, capped at 0.1 s.
    assert delays == [f"{d}s after recent failures" for d in ("0.05", "0.1", "0.1")]


async def test_connections_per_address_are_limited(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(max_connections_per_address=2)
    listener = Listener(tls="starttls", upstream_port=dovecot.ports.imaps)
    proxy = await start_proxy(nursery, rig.write([listener]))

    def connect(source: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(
            ("127.0.0.1", proxy.port), timeout=30, source_address=(source, 0)
        )
        return sock, sock.recv(4096)

    held = [await in_thread(lambda: connect(ATTACKER)) for _ in range(2)]
    try:
        assert all(greeting.startswith(b"* OK") for _, greeting in held)
        refused, reply = await in_thread(lambda: connect(ATTACKER))
        refused.close()
        assert reply == b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
        other, greeting = await in_thread(lambda: connect(REAL))  # other addresses are served
        other.close()
        assert greeting.startswith(b"* OK")
    finally:
        for sock, _ in held:
            sock.close()
    assert "too many connections" in caplog.text
    # Once they are closed, the address may connect again.
    await trio.sleep(0.2)
    again, greeting = await in_thread(lambda: connect(ATTACKER))
    again.close()
    assert greeting.startswith(b"* OK")


async def test_an_implicit_tls_listener_over_the_limit_just_closes(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    """A plaintext line would be noise to a TLS client: the proxy hangs up at once."""
    rig.limits.update(max_connections=1)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))

    def over_the_limit() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as first,
            tls_context(pki).wrap_socket(first, server_hostname="localhost") as tls,
        ):
            assert tls.recv(4096).startswith(b"* OK")
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as second:
                return second.recv(4096)

    assert await in_thread(over_the_limit) == b""


async def test_parallel_guesses_cannot_outrun_the_lockout(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(failure_delay=0, lockout_after=3, lockout_time=600)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))

    async def guess() -> None:
        await in_thread(lambda: login(pki, proxy.port, "guess", source=ATTACKER))

    async with trio.open_nursery() as guesses:
        for _ in range(20):
            guesses.start_soon(guess)
    checked = caplog.text.count("refused: wrong password")
    # Hashes run hash_concurrency (2) at a time, and each re-checks the lockout first.
    assert 3 <= checked <= 3 + 1
    assert caplog.text.count("locked out after") >= 20 - checked
