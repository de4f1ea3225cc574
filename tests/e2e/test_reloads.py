"""Reloads and stops that drop nothing, proven on ``serve`` as a process with real signals:
an IMAP IDLE, a POP3 RETR and an SMTP DATA in progress go through a SIGHUP that changes
users, apps, certificates and listeners; a SIGTERM lets a FETCH finish within --grace
while new connections are refused. sd_notify is heard on a real datagram socket."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import MAILBOX, OTHER_MAILBOX, PASSWORD, Listener, ProxyRig
from tests.e2e.helpers import ServeProcess, message, starttls_listener, tls_context
from tests.e2e.test_serve_command import login as imap_login

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.support.dovecot import Dovecot
    from tests.support.smtpsink import SmtpSink

pytestmark = pytest.mark.e2e


class Notifications:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def until(self, key: str) -> list[dict[str, str]]:
        seen = [self.next()]
        while key not in seen[-1]:
            seen.append(self.next())
        return seen


class Line:
    """A TLS client connection read line by line (blocking, with a deadline)."""

    def __init__(self, rig: ProxyRig, port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.tls = tls_context(rig.pki).wrap_socket(raw, server_hostname="localhost")
        self.stream = self.tls.makefile("rwb")

    def send(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def line(self) -> bytes:
        line = self.stream.readline()
        assert line, "connection closed"
        return line

    def until(self, prefix: bytes) -> list[bytes]:
        lines = [self.line()]
        while not lines[-1].startswith(prefix):
            lines.append(self.line())
        return lines

    def close(self) -> None:
        self.stream.close()
        self.tls.close()


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    listening = Notifications(tmp_path / "notify.sock")
    yield listening
    listening.sock.close()


def test_sighup_drops_nothing_and_changes_listeners(
    tmp_path: Path,
    rig: ProxyRig,
    dovecot: Dovecot,
    sink: SmtpSink,
    notifications: Notifications,
) -> None:
    assert dovecot.ports.submissions is not None
    imap = Listener(upstream_port=dovecot.ports.imaps)
    pop3 = Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s)
    smtp = starttls_listener(dovecot)
    config = rig.write([imap, pop3, smtp])
    retrieved = message(2_000_000, subject="reload-retr")
    dovecot.deliver(MAILBOX, retrieved)
    serve = ServeProcess(
        config, tmp_path / "serve.log", env={"NOTIFY_SOCKET": str(notifications.path)}
    )
    sessions: list[Line] = []
    try:
        imap_port, pop3_port, smtp_port = serve.ports(3)
        assert notifications.until("READY")[-1]["READY"] == "1"

        # IMAP: idling.
        idle = Line(rig, imap_port)
        sessions.append(idle)
        idle.line()
        idle.send(f"a1 LOGIN {quoted(MAILBOX)} {quoted(PASSWORD)}\r\n".encode())
        assert idle.until(b"a1 ")[-1].startswith(b"a1 OK")
        idle.send(b"a2 SELECT INBOX\r\na3 IDLE\r\n")
        idle.until(b"a2 OK")
        assert idle.line().startswith(b"+ ")

        # POP3: a RETR of 2 MB, of which only the start has been read.
        pop = Line(rig, pop3_port)
        sessions.append(pop)
        pop.line()
        pop.send(f"USER {MAILBOX}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
        pop.line()
        assert pop.line().startswith(b"+OK")
        count = int(pop.line().split()[1])
        pop.send(f"RETR {count}\r\n".encode())
        assert pop.line().startswith(b"+OK")
        first = pop.stream.read(4096)

        # SMTP: half a message sent after DATA.
        mail = smtplib.SMTP("localhost", smtp_port, timeout=30)
        mail.starttls(context=tls_context(rig.pki))
        mail.login(MAILBOX, PASSWORD)
        mail.mail(MAILBOX)
        mail.rcpt("someone@example.com")
        assert mail.docmd("DATA")[0] == 354
        sent = message(200_000, subject="reload-data")
        assert mail.sock is not None
        mail.sock.sendall(sent[: len(sent) // 2])

        # The reload: a new user, an app renamed, a renewed certificate; the SMTP listener
        # removed, a second IMAP listener added.
        rig.add_user(OTHER_MAILBOX, PASSWORD)
        rig.write(
            [
                imap,
                pop3,
                Listener(upstream_port=dovecot.ports.imaps, extra={"hostname": '"new.example"'}),
            ]
        )
        config.write_text(config.read_text().replace("[apps.roleless]", "[apps.spare]"))
        serve.process.send_signal(signal.SIGHUP)
        serve.wait_for(lambda: "configuration reloaded" in serve.text(), "the reload")
        reload_notices = notifications.until("READY")
        assert reload_notices[0]["RELOADING"] == "1"
        assert "MONOTONIC_USEC" in reload_notices[0]
        assert "no longer listening on smtp@127.0.0.1:0" in serve.text()

        # Every session goes on, unharmed.
        dovecot.deliver(MAILBOX, message(1000, subject="reload-idle"))
        assert re.match(rb"\* \d+ EXISTS", idle.line())
        idle.send(b"DONE\r\n")
        assert idle.until(b"a3 ")[-1].startswith(b"a3 OK")
        idle.send(b"a4 LOGOUT\r\n")
        assert idle.until(b"a4 ")[-1].startswith(b"a4 OK")

        rest = b""
        while not (first + rest).endswith(b"\r\n.\r\n"):
            chunk = pop.stream.read1(65536)
            assert chunk, "RETR cut short"
            rest += chunk
        body = (first + rest)[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
        assert body == retrieved
        pop.send(b"QUIT\r\n")
        assert pop.line().startswith(b"+OK")

        mail.sock.sendall(sent[len(sent) // 2 :] + b".\r\n")
        code, _ = mail.getreply()
        assert code == 250
        mail.quit()
        assert any(b"Subject: reload-data" in m.data for m in sink.wait_for(1, timeout=30)), (
            "the message did not arrive"
        )

        # The new listener serves the new user; the removed one refuses connections.
        new_port = serve.ports(4)[3]
        assert imap_login(rig, new_port, OTHER_MAILBOX) == "OK"
        assert imap_login(rig, imap_port, OTHER_MAILBOX) == "OK"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", smtp_port), timeout=30).close()
        assert "internal error" not in serve.text()

        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0
        assert "STOPPING" in notifications.until("STOPPING")[-1]
    finally:
        for s in sessions:
            s.close()
        serve.close()


def test_sigterm_lets_a_fetch_finish_and_refuses_new_connections(
    tmp_path: Path, rig: ProxyRig, dovecot: Dovecot
) -> None:
    config = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    fetched = message(4_000_000, subject="sigterm-fetch")
    dovecot.deliver(MAILBOX, fetched)
    serve = ServeProcess(config, tmp_path / "serve.log", grace=60)
    client = None
    try:
        port = serve.port()
        client = Line(rig, port)
        client.line()
        client.send(f"a1 LOGIN {quoted(MAILBOX)} {quoted(PASSWORD)}\r\n".encode())
        client.until(b"a1 ")
        client.send(b"a2 SELECT INBOX\r\n")
        exists = [line for line in client.until(b"a2 OK") if line.endswith(b"EXISTS\r\n")]
        count = int(exists[0].split()[1])
        client.send(f"a3 FETCH {count} BODY.PEEK[]\r\n".encode())
        head = client.line()
        size = int(re.search(rb"\{(\d+)\}", head).group(1))  # type: ignore[union-attr]
        first = client.stream.read(65536)

        serve.process.send_signal(signal.SIGTERM)
        serve.wait_for(lambda: "no longer accepting" in serve.text(), "the stop")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=30).close()
        assert serve.process.poll() is None  # waiting for the FETCH

        body = first + client.stream.read(size - len(first))
        assert body == fetched
        assert client.until(b"a3 ")[-1].startswith(b"a3 OK")
        client.send(b"a4 LOGOUT\r\n")
        assert client.until(b"a4 ")[-1].startswith(b"a4 OK")
        assert serve.process.wait(30) == 0
        assert "internal error" not in serve.text()
    finally:
        if client is not None:
            client.close()
        serve.close()


def test_a_reload_that_cannot_open_a_new_listener_changes_nothing(
    tmp_path: Path, rig: ProxyRig, dovecot: Dovecot
) -> None:
    imap = Listener(upstream_port=dovecot.ports.imaps)
    config = rig.write([imap])
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        port = serve.port()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            # A new user, and a second listener on a port another program holds.
            rig.add_user(OTHER_MAILBOX, PASSWORD)
            head, _, tail = (
                rig.write([imap, Listener(upstream_port=dovecot.ports.imaps)])
                .read_text()
                .rpartition('listen = "127.0.0.1:0"')
            )
            config.write_text(f'{head}listen = "127.0.0.1:{busy}"{tail}')
            serve.process.send_signal(signal.SIGHUP)
            serve.wait_for(lambda: "reload refused" in serve.text(), "the refusal")
        assert "cannot listen" in serve.text()
        # Nothing changed: the new user is unknown, the old listener serves.
        assert imap_login(rig, port, MAILBOX) == "OK"
        with pytest.raises(Exception, match="AUTHENTICATIONFAILED"):
            imap_login(rig, port, OTHER_MAILBOX)
    finally:
        serve.close()
