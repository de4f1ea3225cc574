"""``xoauth2-proxy serve`` as operators run it: a process, signals, background refresh."""

from __future__ import annotations

import imaplib
import signal
import socket
import ssl
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import MAILBOX, OTHER_MAILBOX, PASSWORD, Listener, ProxyRig
from tests.e2e.helpers import ServeProcess
from tests.e2e.test_caches import cache_key
from tests.support.redis import RedisServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = pytest.mark.e2e


@pytest.fixture
def rig_config(rig: ProxyRig, dovecot: Dovecot) -> Path:
    return rig.write([Listener(upstream_port=dovecot.ports.imaps)])


@pytest.fixture
def serve(tmp_path: Path, rig_config: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(rig_config, tmp_path / "serve.log")
    yield process
    process.close()


def login(rig: ProxyRig, port: int, user: str, password: str = PASSWORD) -> str:
    context = ssl.create_default_context(cafile=str(rig.pki.ca_file))
    with imaplib.IMAP4_SSL("localhost", port, ssl_context=context, timeout=30) as imap:
        status, _ = imap.login(user, password)
        imap.logout()
        return status


def test_token_fetched_in_background_before_any_login(
    serve: ServeProcess, idp: EntraEmulator, rig: ProxyRig
) -> None:
    before = idp.token_requests
    port = serve.port()
    # Background refresh asks the IdP at start (both configured apps), before anyone logs in.
    serve.wait_for(lambda: idp.token_requests >= before + 2, "the background token requests")
    assert login(rig, port, MAILBOX) == "OK"
    assert idp.token_requests == before + 2  # the login used the token fetched in advance


def test_sighup_reloads_users_and_apps_and_sigterm_stops(
    serve: ServeProcess, rig: ProxyRig, rig_config: Path, idp: EntraEmulator
) -> None:
    port = serve.port()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        login(rig, port, OTHER_MAILBOX)

    # A new user, and the app set changes (an app renamed): a new token source is built.
    rig.add_user(OTHER_MAILBOX, PASSWORD)
    rig.write([Listener(upstream_port=rig.dovecot.ports.imaps)])
    rig_config.write_text(rig_config.read_text().replace("[apps.roleless]", "[apps.spare]"))
    serve.process.send_signal(signal.SIGHUP)
    serve.wait_for(lambda: "configuration reloaded" in serve.text(), "the reload")
    assert login(rig, port, OTHER_MAILBOX) == "OK"
    assert login(rig, port, MAILBOX) == "OK"

    # A broken file is refused and the running configuration stays.
    rig_config.write_text(rig_config.read_text() + "\n[users.broken]\npassword_hash = 7\n")
    serve.process.send_signal(signal.SIGHUP)
    serve.wait_for(lambda: "reload refused" in serve.text(), "the refusal")
    assert login(rig, port, OTHER_MAILBOX) == "OK"

    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(30) == 0
    assert "SIGTERM received: shutting down" in serve.text()


def served_certificate(rig: ProxyRig, port: int) -> bytes:
    context = ssl.create_default_context(cafile=str(rig.pki.ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate


def test_sighup_picks_up_a_renewed_certificate(
    serve: ServeProcess, rig: ProxyRig, rig_config: Path
) -> None:
    port = serve.port()
    before = served_certificate(rig, port)
    rig.write([Listener(upstream_port=rig.dovecot.ports.imaps)])  # a new certificate, same path
    serve.process.send_signal(signal.SIGHUP)
    serve.wait_for(lambda: "configuration reloaded" in serve.text(), "the reload")
    after = served_certificate(rig, port)
    assert after != before
    assert login(rig, port, MAILBOX) == "OK"


def test_a_reload_refuses_a_ca_file_others_could_have_changed(
    tmp_path: Path, rig: ProxyRig, dovecot: Dovecot
) -> None:
    """The attack: a local user appends its own CA to a world-writable client_ca_file and
    waits for the operator's next reload; its certificate would then log in."""
    ca = tmp_path / "clients-ca.pem"
    ca.write_bytes(rig.pki.ca_file.read_bytes())
    ca.chmod(0o644)
    listener = Listener(
        upstream_port=dovecot.ports.imaps,
        extra={"client_ca_file": f'"{ca}"', "client_certificates": '"optional"'},
    )
    config = rig.write([listener])
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        port = serve.port()
        ca.chmod(0o666)
        serve.process.send_signal(signal.SIGHUP)
        serve.wait_for(lambda: "reload refused" in serve.text(), "the refusal")
        assert f"client_ca_file: {ca} is writable by its group and other users" in serve.text()
        assert login(rig, port, MAILBOX) == "OK"  # the running configuration stays
    finally:
        serve.close()


def test_two_instances_sharing_redis_share_the_lockout(
    tmp_path: Path, rig: ProxyRig, dovecot: Dovecot
) -> None:
    """Behind a load balancer, N instances must not give an attacker N times the guesses."""
    with RedisServer(tmp_path / "redis") as redis:
        rig.limits.update(failure_delay=0, lockout_after=4)
        rig.cache = {"kind": '"redis"', "url": f'"{redis.url}"', "key": cache_key(rig)}
        config = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
        instances = [ServeProcess(config, tmp_path / f"serve{n}.log") for n in range(2)]
        try:
            ports = [instance.port() for instance in instances]
            refusals = []
            for n in range(8):  # the guesses alternate between the instances
                with pytest.raises(imaplib.IMAP4.error):
                    login(rig, ports[n % 2], MAILBOX, password=f"guess {n}")
            for instance in instances:
                refusals.append(instance.text().count("refused: wrong password"))
            assert sum(refusals) == 4  # checked: lockout_after in all, not per instance
            for port in ports:  # both refuse even the right password now
                with pytest.raises(imaplib.IMAP4.error):
                    login(rig, port, MAILBOX)
        finally:
            for instance in instances:
                instance.close()
