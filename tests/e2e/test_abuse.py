"""Abuse resistance through the running proxy: failed-login delays and lockouts, and
connection limits."""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import time
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

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
    mock_clock: trio.testing.MockClock,
) -> None:
    """Under trio's MockClock, which stands still until the test moves it on."""
    rig.limits.update(failure_delay=0, lockout_after=3, failure_window=600)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    wrong = [
        await in_thread(lambda: login(pki, proxy.port, "guess", source=ATTACKER)) for _ in range(3)
    ]
    assert wrong[0].startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    locked = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source=ATTACKER))
    assert locked == wrong[0]  # the same answer as a wrong password
    assert "locked out after 3 failures in 600s" in caplog.text
    mock_clock.jump(599)
    still = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source=ATTACKER))
    assert still == wrong[0]
    mock_clock.jump(1)
    expired = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source=ATTACKER))
    assert expired.startswith(b"a1 OK")


async def test_an_attacker_elsewhere_cannot_lock_the_real_program_out(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    rig.limits.update(failure_delay=0, lockout_after=3)
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


async def test_connections_per_network_are_limited(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(max_connections_per_network=2)
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
    # Once the proxy has seen them closed, the address may connect again.
    with trio.fail_after(30):
        while proxy.server.sessions_open:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.01)
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
    rig.limits.update(failure_delay=0, lockout_after=3)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))

    async def guess(n: int) -> None:
        await in_thread(lambda: login(pki, proxy.port, f"guess {n}", source=ATTACKER))

    async with trio.open_nursery() as guesses:
        for n in range(20):  # twenty different passwords (the same one is checked once)
            guesses.start_soon(guess, n)
    checked = caplog.text.count("refused: wrong password")
    # Hashes run hash_concurrency (2) at a time, and each re-checks the lockout first.
    assert 3 <= checked <= 3 + 1
    assert caplog.text.count("locked out after") >= 20 - checked


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ("imap", b"* BYE Autologout; idle for too long.\r\n"),
        ("pop3", b"-ERR [SYS/TEMP] Autologout; idle for too long.\r\n"),
        ("smtp", b"421 4.4.2 "),
    ],
)
async def test_a_client_that_dribbles_a_command_is_cut_off(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    protocol: str,
    expected: bytes,
) -> None:
    """line_timeout: a whole command within a second of the greeting, not one byte at a time."""
    rig.limits.update(line_timeout=1, login_timeout=100)
    upstream = {"imap": dovecot.ports.imaps, "pop3": dovecot.ports.pop3s}.get(
        protocol, dovecot.ports.submissions or 0
    )
    listener = Listener(protocol=protocol, upstream_port=upstream)
    proxy = await start_proxy(nursery, rig.write([listener]))

    def dribble() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
            tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            received = tls.recv(4096)  # the greeting
            with contextlib.suppress(OSError):
                for byte in b"a1 NOOP":  # never finished: no CRLF
                    tls.sendall(bytes([byte]))
                    time.sleep(0.3)
            while chunk := tls.recv(4096):  # a socket timeout here fails the test
                received += chunk
            return received

    transcript = await in_thread(dribble)
    assert expected in transcript


async def test_a_client_that_keeps_talking_but_never_logs_in_is_cut_off(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    """login_timeout: prompt harmless commands keep line_timeout happy, not this one."""
    rig.limits.update(line_timeout=100, login_timeout=1.5)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))

    def chatter() -> tuple[bytes, int]:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
            tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            received = tls.recv(4096)  # the greeting
            answered = 0
            with contextlib.suppress(OSError):
                for n in range(100):
                    tls.sendall(b"n%d NOOP\r\n" % n)
                    reply = tls.recv(4096)
                    received += reply
                    if b" OK " not in reply:
                        break
                    answered += 1
                    time.sleep(0.2)
            while chunk := tls.recv(4096):
                received += chunk
            return received, answered

    transcript, answered = await in_thread(chatter)
    assert 1 <= answered < 100  # served at first, then cut off long before the loop ends
    assert transcript.endswith(b"* BYE Autologout; idle for too long.\r\n")


@pytest.mark.parametrize(
    ("protocol", "script", "begin_tls"),
    [
        ("imap", b"a1 STARTTLS\r\na2 LOGIN x y\r\n", b"a1 OK"),
        ("pop3", b"STLS\r\nUSER x\r\n", b"+OK Begin TLS"),
        ("smtp", b"EHLO client.test\r\nSTARTTLS\r\nAUTH PLAIN AHgAeQ==\r\n", b"220 2.0.0"),
    ],
)
async def test_commands_injected_behind_starttls_are_never_executed(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    script: bytes,
    begin_tls: bytes,
) -> None:
    """CVE-2011-0411: plaintext sent in the same packet as STARTTLS must not be run later,
    inside TLS, as if the client had sent it there. The proxy hangs up instead."""
    upstream = {"imap": dovecot.ports.imaps, "pop3": dovecot.ports.pop3s}.get(
        protocol, dovecot.ports.submissions or 0
    )
    listener = Listener(protocol=protocol, tls="starttls", upstream_port=upstream)
    proxy = await start_proxy(nursery, rig.write([listener]))

    def inject() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            received = sock.recv(4096)
            sock.sendall(script)
            while chunk := sock.recv(4096):
                received += chunk
            return received

    transcript = await in_thread(inject)
    # Nothing answers the injected command: the last thing said is (at most) "begin TLS".
    last_line = transcript.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    assert begin_tls not in transcript or last_line.startswith(begin_tls), transcript
    assert re.search(r"(pipelined|sent) data (behind|right after) (STLS|STARTTLS)", caplog.text)


async def test_a_network_is_a_prefix_not_an_address(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    """Issue: 300 connections from one IPv6 /64 were all served. With ipv4_prefix = 24 the
    loopback addresses 127.0.0.2 and 127.0.0.3 are one network, as a /64's are by default."""
    rig.limits.update(max_connections_per_network=2, ipv4_prefix=24)
    listener = Listener(tls="starttls", upstream_port=dovecot.ports.imaps)
    proxy = await start_proxy(nursery, rig.write([listener]))

    def connect(source: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", proxy.port), 30, (source, 0))
        return sock, sock.recv(4096)

    held = [await in_thread(functools.partial(connect, f"127.0.0.{n}")) for n in (2, 3)]
    try:
        refused, reply = await in_thread(lambda: connect("127.0.0.4"))
        refused.close()
        assert reply.startswith(b"* BYE [UNAVAILABLE] Too many connections")
        other, greeting = await in_thread(lambda: connect("127.0.1.1"))  # another /24
        other.close()
        assert greeting.startswith(b"* OK")
    finally:
        for sock, _ in held:
            sock.close()


async def counting_upstream(
    accepted: list[trio.SocketStream], *, task_status: trio.TaskStatus[int]
) -> None:
    """A TCP server that accepts and holds connections without a word, counting them."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(hold, listeners, handler_nursery=nursery)


async def test_silent_clients_hold_few_upstream_connections(
    nursery: trio.Nursery, rig: ProxyRig, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue: every accepted connection opened an upstream TLS connection before the client
    had said anything. Beyond max_early_upstreams, the upstream waits for the client."""
    accepted: list[trio.SocketStream] = []
    port = await nursery.start(counting_upstream, accepted)
    rig.limits.update(max_early_upstreams=2)
    listener = Listener(tls="none", upstream_port=port, upstream_tls="starttls")
    proxy = await start_proxy(nursery, rig.write([listener]))

    def connect() -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", proxy.port), 30)
        return sock, sock.recv(4096)

    silent = [await in_thread(connect) for _ in range(5)]
    try:
        assert all(greeting.startswith(b"* OK") for _, greeting in silent)
        await trio.testing.wait_all_tasks_blocked()
        assert len(accepted) == 2
        silent[4][0].sendall(b"a1 NOOP\r\n")  # a client that speaks gets its upstream
        with trio.fail_after(10):
            while len(accepted) < 3:  # noqa: ASYNC110 (the proxy reports nothing to wait on)
                await trio.sleep(0.01)
    finally:
        for sock, _ in silent:
            sock.close()
