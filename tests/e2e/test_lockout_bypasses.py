"""Ways around the lockout that an attacker found, each reproduced through the running
proxy against Dovecot and shown closed.

(a) Guessing from the same address as a program that logs in every few seconds: its
    successes reset the count. (b) An app key whose policy includes another user's login
    name "succeeding" as that login, resetting its count. (c) LOGINs named after a
    certificate's fingerprint locking out that certificate's SASL EXTERNAL identity.
"""

from __future__ import annotations

import base64
import functools
import json
import socket
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, tls_context
from tests.e2e.test_abuse import login
from tests.e2e.test_identities import (
    ClientPki,
    app_key,
    authenticate,
    client_ca,
    clients,  # noqa: F401 (a fixture)
    imap,
    toml,
    xoauth2,
)

if TYPE_CHECKING:
    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.e2e]


def audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "xoauth2_proxy.audit"]


async def test_a_guesser_beside_a_busy_program_is_locked_out(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """(a): before, 29 of 29 guesses were checked while the program kept logging in."""
    rig.limits.update(failure_delay=0, lockout_after=3, trusted_lockout_after=6)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    program = [await in_thread(lambda: login(pki, proxy.port, PASSWORD))]
    for n in range(30):
        await in_thread(functools.partial(login, pki, proxy.port, f"guess {n}"))  # same address
        if n % 3 == 2:
            program.append(await in_thread(lambda: login(pki, proxy.port, PASSWORD)))
    checked = [a for a in audit(caplog) if a["reason"] == "wrong password"]
    assert len(checked) == 6  # trusted_lockout_after, then "locked out"
    assert program[0].startswith(b"a1 OK")
    # Once the ceiling is reached the program is locked out too: nobody on that address can
    # be told apart from the guesser (README says so), and the guessing stops.
    assert program[-1].startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    assert audit(caplog)[-1]["reason"] == "login locked out after 6 failures in 3600s"


async def test_an_app_key_cannot_reset_another_logins_failures(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """(b): an app key allowed to open MAILBOX logged in "as" MAILBOX every few guesses."""
    rig.limits.update(failure_delay=0, lockout_after=3)
    key, key_hash = app_key()
    rig.add_user(
        "erp",
        None,
        mailbox=MAILBOX,
        extra={"app_key_hash": toml(key_hash), "mailboxes": toml([MAILBOX])},
    )
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    context = tls_context(pki)

    def with_app_key() -> bytes:
        """AUTHENTICATE XOAUTH2 from the guesser's own address."""
        with (
            socket.create_connection(("127.0.0.1", proxy.port), 30, ("127.0.0.2", 0)) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
            tls.makefile("rwb") as stream,
        ):
            stream.readline()
            stream.write(b"a1 AUTHENTICATE XOAUTH2\r\n")
            stream.flush()
            assert stream.readline().startswith(b"+")
            stream.write(base64.b64encode(xoauth2(MAILBOX, key)) + b"\r\n")
            stream.flush()
            while not (line := stream.readline()).startswith(b"a1 "):
                assert line, "closed before the reply"
            return line.split()[1]

    for n in range(3):
        await in_thread(functools.partial(login, pki, proxy.port, f"guess {n}", source="127.0.0.2"))
        assert await in_thread(with_app_key) == b"OK"
    right = await in_thread(lambda: login(pki, proxy.port, PASSWORD, source="127.0.0.2"))
    assert right.startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    assert audit(caplog)[-1]["reason"] == "login locked out after 3 failures in 3600s"


async def test_logins_named_after_a_certificate_do_not_lock_it_out(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    clients: ClientPki,  # noqa: F811 (the fixture)
) -> None:
    """(c): all credential kinds shared one namespace of failure keys."""
    rig.limits.update(failure_delay=0, lockout_after=3)
    scanner = clients.scanner
    rig.add_user(
        "scanner01",
        None,
        mailbox=MAILBOX,
        extra={"certificate_fingerprint": toml(f"sha256:{scanner.fingerprint}")},
    )
    listener = Listener(upstream_port=dovecot.ports.imaps, extra=client_ca(clients))
    proxy = await start_proxy(nursery, rig.write([listener]))
    for name in (f"certificate {scanner.fingerprint[:32]}", f"certificate:{scanner.fingerprint}"):
        for n in range(3):
            await in_thread(functools.partial(login, pki, proxy.port, f"guess {n}", user=name))

    def external() -> str:
        with imap(proxy, scanner.context(pki)) as client:
            return authenticate(client, "EXTERNAL", b"")

    assert await in_thread(external) == "OK"
