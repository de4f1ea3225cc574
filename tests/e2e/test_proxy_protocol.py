"""The PROXY protocol with a real HAProxy in front (TCP mode, ``send-proxy`` and
``send-proxy-v2``) for IMAP, POP3 and SMTP: the client's own address is what the log, the
audit, the connection limits and the throttle see; connections from anywhere else, and
malformed headers, are closed before the proxy says anything."""

from __future__ import annotations

import json
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import trio

from proxy.protocol.proxy_header import SIGNATURE_V2, encode_v1, encode_v2
from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, tls_context
from tests.e2e.test_abuse import login as imap_login

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.e2e.conftest import RunningProxy
    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = pytest.mark.e2e

#: Where the clients connect from (HAProxy connects to the proxy from 127.0.0.1).
CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.4"
STRANGER = "127.0.0.3"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HAProxy:
    """A real HAProxy in TCP mode: one frontend per backend address, each sending a PROXY
    header of the given version."""

    def __init__(self, directory: Path, backends: list[tuple[int, str]]) -> None:
        binary = shutil.which("haproxy")
        assert binary is not None, "haproxy (Debian package haproxy) is not installed"
        self.ports = [free_port() for _ in backends]
        lines = [
            "global",
            "    maxconn 200",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
        for index, ((backend, version), port) in enumerate(zip(backends, self.ports, strict=True)):
            send = "send-proxy-v2" if version == "v2" else "send-proxy"
            lines += [
                f"listen front{index}",
                f"    bind 127.0.0.1:{port}",
                f"    server proxy 127.0.0.1:{backend} {send}",
            ]
        config = directory / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        self.log = directory / "haproxy.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        for port in self.ports:
            while True:
                assert self.process.poll() is None, self.log.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "haproxy did not start"
                    time.sleep(0.05)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def haproxies(tmp_path: Path) -> Iterator[list[HAProxy]]:
    started: list[HAProxy] = []
    yield started
    for h in started:
        h.close()


def trusted(protocol: str, port: int, **extra: str) -> Listener:
    return Listener(
        protocol=protocol,
        upstream_port=port,
        extra={"proxy_protocol": "true", "trusted_proxies": '["127.0.0.1/32"]', **extra},
    )


def upstream_ports(dovecot: Dovecot) -> dict[str, int]:
    assert dovecot.ports.submissions is not None
    return {
        "imap": dovecot.ports.imaps,
        "pop3": dovecot.ports.pop3s,
        "smtp": dovecot.ports.submissions,
    }


def tls_lines(pki: TestPki, port: int, source: str, script: list[bytes]) -> list[bytes]:
    """Connect from ``source``, then for each entry of ``script`` read a reply line (or
    lines, up to a final one) and send the entry; return every line read."""
    lines: list[bytes] = []
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s,
        tls_context(pki).wrap_socket(s, server_hostname="localhost") as tls,
        tls.makefile("rwb") as stream,
    ):
        for entry in [*script, b""]:
            line = stream.readline()
            while line.startswith(b"250-"):
                lines.append(line)
                line = stream.readline()
            lines.append(line)
            if not entry:
                break
            stream.write(entry)
            stream.flush()
    return lines


def pop3_login(pki: TestPki, port: int, source: str) -> bytes:
    lines = tls_lines(
        pki, port, source, [f"USER {MAILBOX}\r\n".encode(), f"PASS {PASSWORD}\r\n".encode()]
    )
    return lines[-1]


def smtp_login(pki: TestPki, port: int, source: str) -> int:
    with smtplib.SMTP_SSL(
        "localhost", port, context=tls_context(pki), timeout=30, source_address=(source, 0)
    ) as smtp:
        code, _ = smtp.login(MAILBOX, PASSWORD)
        return code


def log_in(protocol: str, pki: TestPki, port: int, source: str) -> bool:
    if protocol == "imap":
        return imap_login(pki, port, PASSWORD, source=source).startswith(b"a1 OK")
    if protocol == "pop3":
        return pop3_login(pki, port, source).startswith(b"+OK")
    return smtp_login(pki, port, source) == 235


async def settled(proxy: RunningProxy) -> None:
    """Until the proxy has finished every session its clients have left."""
    with trio.fail_after(30):
        while proxy.server.sessions_open:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)


def audits(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "xoauth2_proxy.audit"]


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
async def test_logins_through_haproxy_carry_the_client_address(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    tmp_path: Path,
    haproxies: list[HAProxy],
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    port = upstream_ports(dovecot)[protocol]
    proxy = await start_proxy(nursery, rig.write([trusted(protocol, port)]))
    haproxy = HAProxy(tmp_path, [(proxy.port, "v1"), (proxy.port, "v2")])
    haproxies.append(haproxy)
    for front in haproxy.ports:
        assert await in_thread(lambda front=front: log_in(protocol, pki, front, CLIENT))  # type: ignore[misc]
    await settled(proxy)
    sources = [a["source"] for a in audits(caplog)]
    assert sources == [CLIENT, CLIENT], sources
    assert caplog.text.count(f"connection from {CLIENT}:") == 2
    assert "via 127.0.0.1:" in caplog.text


async def test_connections_not_from_a_trusted_proxy_are_closed_before_a_greeting(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = trusted("pop3", dovecot.ports.pop3s)
    listener.tls = "none"
    proxy = await start_proxy(nursery, rig.write([listener]))

    def direct(source: str, data: bytes) -> bytes:
        with socket.create_connection(
            ("127.0.0.1", proxy.port), timeout=30, source_address=(source, 0)
        ) as sock:
            received = b""
            try:
                if data:
                    sock.sendall(data)
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass  # closed with our bytes unread
            return received

    # A stranger, even with a well-formed header naming someone else.
    header = encode_v1(("192.0.2.1", 1234), ("127.0.0.1", proxy.port))
    assert await in_thread(lambda: direct(STRANGER, header)) == b""
    assert await in_thread(lambda: direct(STRANGER, b"")) == b""
    # The trusted address without a header.
    assert await in_thread(lambda: direct("127.0.0.1", b"USER x\r\n")) == b""
    assert "not in trusted_proxies" in caplog.text
    assert "does not start with a PROXY protocol header" in caplog.text
    refused = proxy.server.metrics.registry.get_sample_value
    name = "xoauth2_proxy_connections_refused_total"
    listener_name = proxy.listeners[0].config.name
    assert refused(name, {"listener": listener_name, "reason": "untrusted_proxy"}) == 2
    assert refused(name, {"listener": listener_name, "reason": "bad_proxy_header"}) == 1
    # With a header, from the trusted address: the client it names is served (plaintext
    # on loopback here, to read the greeting without TLS).
    greeting = await in_thread(lambda: direct("127.0.0.1", header + b"QUIT\r\n"))
    assert greeting.startswith(b"+OK"), greeting
    assert "connection from 192.0.2.1:1234 via 127.0.0.1:" in caplog.text


async def test_limits_and_lockouts_count_the_client_behind_haproxy(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    tmp_path: Path,
    haproxies: list[HAProxy],
) -> None:
    rig.limits.update(
        max_connections_per_network=1, lockout_after=2, failure_delay=0, max_failure_delay=0
    )
    proxy = await start_proxy(nursery, rig.write([trusted("imap", dovecot.ports.imaps)]))
    haproxy = HAProxy(tmp_path, [(proxy.port, "v2")])
    haproxies.append(haproxy)
    front = haproxy.ports[0]

    def held_then_more() -> tuple[bytes, bool]:
        with (
            socket.create_connection(
                ("127.0.0.1", front), timeout=30, source_address=(CLIENT, 0)
            ) as sock,
            tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            assert tls.recv(4096).startswith(b"* OK")
            # A second connection of the same client is over its network's limit...
            try:
                second = imap_login(pki, front, PASSWORD, source=CLIENT)
            except (ssl.SSLError, OSError) as exc:  # closed at once: over the limit
                second = str(exc).encode()
            # ...another client's is not, although HAProxy's address is the same.
            other = imap_login(pki, front, PASSWORD, source=OTHER_CLIENT).startswith(b"a1 OK")
            return second, other

    second, other = await in_thread(held_then_more)
    assert not second.startswith(b"a1 OK"), second
    assert other
    # Refused for the limit, not for anything else that could have failed the login.
    refused = proxy.server.metrics.registry.get_sample_value
    labels = {"listener": proxy.listeners[0].config.name, "reason": "too_many"}
    assert refused("xoauth2_proxy_connections_refused_total", labels) == 1

    # Failures lock out the client's network, not HAProxy's.
    for _ in range(2):
        await settled(proxy)
        reply = await in_thread(lambda: imap_login(pki, front, "wrong", source=CLIENT))
        assert reply.startswith(b"a1 NO")
    await settled(proxy)
    locked = proxy.server.throttle.lockouts()
    assert [(lock.scope, lock.key) for lock in locked] == [("login", f"password:{MAILBOX}")]
    # The login is locked for networks it has not succeeded from: OTHER_CLIENT has (above)
    # and gets in, a stranger does not, though all come through the same HAProxy.
    assert (
        await in_thread(lambda: imap_login(pki, front, PASSWORD, source=OTHER_CLIENT))
    ).startswith(b"a1 OK")
    await settled(proxy)
    assert (await in_thread(lambda: imap_login(pki, front, PASSWORD, source=STRANGER))).startswith(
        b"a1 NO"
    )


def mutations(seed: int) -> Iterator[bytes]:
    """Malformed headers: random bytes, and valid headers of both versions with a byte
    changed, cut short, or stretched."""
    chosen = random.Random(seed)
    valid = [
        encode_v1(("192.0.2.10", 51234), ("127.0.0.1", 993)),
        encode_v2(("192.0.2.10", 51234), ("127.0.0.1", 993)),
        encode_v2(("2001:db8::1", 1), ("2001:db8::2", 993)),
    ]
    for _ in range(40):
        base = bytearray(chosen.choice(valid))
        kind = chosen.choice(["flip", "garbage", "stretch", "lie"])
        if kind == "flip":
            position = chosen.randrange(len(base))
            base[position] = (base[position] + chosen.randrange(1, 256)) % 256
        elif kind == "garbage":
            base = bytearray(chosen.randbytes(chosen.randrange(1, 300)))
        elif kind == "stretch":
            base = base[:-2] + b" " + b"9" * chosen.randrange(1, 200) + b"\r\n"
        elif base.startswith(SIGNATURE_V2):  # a length beyond what is sent, then silence
            base[14:16] = (len(base) - 16 + chosen.randrange(1, 5000)).to_bytes(2, "big")
        yield bytes(base)


async def test_fuzzed_headers_close_the_connection_and_nothing_else(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits["proxy_header_timeout"] = 1
    proxy = await start_proxy(nursery, rig.write([trusted("imap", dovecot.ports.imaps)]))

    def send(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # a TLS handshake behind a valid header ends
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
            except OSError:  # reset, or already closed when we shut our side
                return b"reset"
            return received

    accepted = 0
    for data in mutations(14):
        received = await in_thread(lambda data=data: send(data))  # type: ignore[misc]
        if received not in (b"", b"reset"):
            accepted += 1  # a mutation that is still a valid header: TLS then follows
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text
    assert caplog.text.count("closed:") >= 30 - accepted
    # The listener still serves a well-formed header and the client behind it.
    header = encode_v2((CLIENT, 40000), ("127.0.0.1", proxy.port))

    def real() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            sock.sendall(header)
            with tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls:
                return tls.recv(4096)

    assert (await in_thread(real)).startswith(b"* OK")
