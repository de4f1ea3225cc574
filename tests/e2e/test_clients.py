"""Real command-line mail clients from Debian's packages, run as legacy users run them,
through the proxy to Dovecot (tokens from the emulated Entra, verified by Dovecot)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, message, msmtp_send, private_file, run, starttls_listener

if TYPE_CHECKING:
    from pathlib import Path

    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.smtpsink import SmtpSink

pytestmark = [pytest.mark.e2e]


async def test_fetchmail_pop3_keeps_mail_on_the_server(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki, tmp_path: Path
) -> None:
    """fetchmail over POP3 with STLS, as a cron job polls a mailbox, keeping the mail."""
    body = message(50_000, "fetchmail-keep")
    dovecot.deliver(MAILBOX, body)
    listener = Listener(
        protocol="pop3", tls="starttls", upstream_port=dovecot.ports.pop3s, upstream_tls="implicit"
    )
    # fetchmail's rc syntax cannot carry the shared test password's quotes: a user of its own.
    rig.add_user("fetchmail-job", "fetch-Secret-1", mailbox=MAILBOX)
    proxy = await start_proxy(nursery, rig.write([listener]))
    delivered = tmp_path / "delivered"
    delivered.mkdir()
    rc = private_file(
        tmp_path / "fetchmailrc",
        f"poll localhost protocol POP3 service {proxy.port} auth password\n"
        '  user "fetchmail-job" password "fetch-Secret-1"\n'
        f'  sslproto tls1.2+ sslcertck sslcertfile "{pki.ca_file}"\n'
        "  keep fetchall\n"
        f"  mda \"/bin/sh -c 'cat > {delivered}/$$'\"\n",
    )

    def fetch() -> None:
        run(["fetchmail", "--nodetach", "--nosyslog", "-f", str(rc)], home=tmp_path)

    await in_thread(fetch)
    fetched = [p.read_bytes() for p in delivered.iterdir()]
    # fetchmail adds its own Received header and delivers with LF line endings.
    assert any(f.endswith(body.replace(b"\r\n", b"\n")) for f in fetched)
    # "keep": the message is still there for the next poll.
    await in_thread(fetch)
    assert len(list(delivered.iterdir())) == 2 * len(fetched)


async def test_msmtp_sends_with_auth(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    sink: SmtpSink,
    tmp_path: Path,
) -> None:
    """msmtp with STARTTLS and AUTH PLAIN on a 587-style listener, as an ERP job sends."""
    proxy = await start_proxy(nursery, rig.write([starttls_listener(dovecot)]))
    body = message(20_000, "msmtp-sent")
    before = len(sink.messages)
    await in_thread(
        lambda: msmtp_send(pki, proxy.port, tmp_path, auth="plain", secret=PASSWORD, body=body)
    )
    received = await in_thread(lambda: sink.wait_for(before + 1, timeout=10))
    assert any(m.data.endswith(body) for m in received[before:])


async def test_curl_reads_pop3s_and_sends_smtp(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    sink: SmtpSink,
    tmp_path: Path,
) -> None:
    assert dovecot.ports.submission is not None
    body = message(10_000, "curl-pop3s")
    dovecot.deliver(MAILBOX, body)
    proxy = await start_proxy(
        nursery,
        rig.write(
            [
                Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s),
                starttls_listener(dovecot),
            ]
        ),
    )
    user = f"{MAILBOX}:{PASSWORD}"
    common = ["curl", "--silent", "--show-error", "--cacert", str(pki.ca_file), "--user", user]

    def list_and_fetch() -> list[bytes]:
        listing = run([*common, f"pop3s://localhost:{proxy.port_of(0)}/"], home=tmp_path)
        numbers = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
        return [
            run(
                [*common, f"pop3s://localhost:{proxy.port_of(0)}/{n.decode()}"], home=tmp_path
            ).stdout
            for n in numbers
        ]

    messages = await in_thread(list_and_fetch)
    assert body in messages

    sent = message(3000, "curl-smtp")
    before = len(sink.messages)
    await in_thread(
        lambda: run(
            [
                *common,
                "--ssl-reqd",
                "--mail-from",
                MAILBOX,
                "--mail-rcpt",
                "someone@example.com",
                "--upload-file",
                "-",
                f"smtp://localhost:{proxy.port_of(1)}",
            ],
            home=tmp_path,
            stdin=sent,
        )
    )
    received = await in_thread(lambda: sink.wait_for(before + 1, timeout=10))
    assert any(m.data.endswith(sent) for m in received[before:])
