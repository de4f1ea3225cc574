"""Login storms at production settings: ``serve`` as a process, hashes at the default cost.

After a restart every legacy program logs in at once; a cron minute or a network blip does
the same. These tests start a fresh ``serve`` whose users' hashes come from the default
argon2id cost (64 MiB, 3 passes, 4 lanes), let the clients in all at once with a barrier,
and require every right login to succeed against the real Dovecot.
"""

from __future__ import annotations

import concurrent.futures
import functools
import imaplib
import json
import signal
import socket
import threading
from typing import TYPE_CHECKING, TypeVar

import pytest

from proxy.config import load_config
from proxy.identities import DEFAULT_PARAMETERS
from tests.e2e.conftest import MAILBOX, OTHER_MAILBOX, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import ServeProcess, in_thread, tls_context

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = pytest.mark.e2e

T = TypeVar("T")
USERS = [f"storm{n}@contoso.com" for n in range(10)]


def password_of(login: str) -> str:
    return f"pw of {login}"


@pytest.fixture
def storm_rig(rig: ProxyRig) -> ProxyRig:
    """Ten users at the default hash cost, opening the two test mailboxes."""
    rig.hash_parameters = DEFAULT_PARAMETERS
    rig.users.clear()
    for n, login in enumerate(USERS):
        rig.add_user(login, password_of(login), mailbox=(MAILBOX, OTHER_MAILBOX)[n % 2])
    return rig


@pytest.fixture
def serve(tmp_path: Path, storm_rig: ProxyRig, dovecot: Dovecot) -> Iterator[ServeProcess]:
    config = storm_rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    process = ServeProcess(config, tmp_path / "serve.log")
    yield process
    process.close()


def imap_login(context: ssl.SSLContext, port: int, login: str, password: str) -> str:
    """LOGIN, SELECT, LOGOUT as a legacy program does; the outcome as text."""
    try:
        with imaplib.IMAP4_SSL("localhost", port, ssl_context=context, timeout=60) as imap:
            imap.login(login, password)
            status, _ = imap.select("INBOX")
            imap.logout()
            return f"selected {status}"
    except imaplib.IMAP4.error as exc:
        return f"refused {exc}"


def raw_login(
    context: ssl.SSLContext, port: int, login: str, password: str, source: str = "127.0.0.1"
) -> bytes:
    """One LOGIN; the tagged reply, or what ended the connection before it."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), 60, (source, 0)) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
            tls.makefile("rwb") as stream,
        ):
            stream.readline()
            stream.write(f'a1 LOGIN "{login}" "{password}"\r\n'.encode())
            stream.flush()
            while not (line := stream.readline()).startswith(b"a1 "):
                if not line:
                    return b"closed"
            return line.rstrip()
    except OSError as exc:
        return f"broken: {exc}".encode()


def all_at_once(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``jobs`` in threads released together by a barrier; their outcomes in order."""
    barrier = threading.Barrier(len(jobs))

    def released(job: Callable[[], T]) -> T:
        barrier.wait(timeout=60)
        return job()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(released, jobs))


def test_sixty_first_logins_of_one_user(serve: ServeProcess, storm_rig: ProxyRig) -> None:
    port = serve.port()
    context = tls_context(storm_rig.pki)
    login = USERS[0]
    outcomes = all_at_once([lambda: imap_login(context, port, login, password_of(login))] * 60)
    assert outcomes == ["selected OK"] * 60
    # One hash for sixty identical attempts (each further check would say "accepted" too,
    # so count the audit lines instead: all sixty succeeded, none was busy).
    assert serve.text().count('"result": "success"') == 60


def test_sixty_first_logins_spread_over_ten_users(serve: ServeProcess, storm_rig: ProxyRig) -> None:
    port = serve.port()
    context = tls_context(storm_rig.pki)
    jobs = [
        functools.partial(imap_login, context, port, login, password_of(login))
        for login in USERS
        for _ in range(6)
    ]
    assert all_at_once(jobs) == ["selected OK"] * 60


def test_sixty_logins_while_twenty_connections_keep_guessing_from_the_same_address(
    serve: ServeProcess, storm_rig: ProxyRig
) -> None:
    port = serve.port()
    context = tls_context(storm_rig.pki)
    done = threading.Event()
    guesses = [0]

    def guesser(n: int) -> str:
        attempt = 0
        while not done.is_set():
            attempt += 1
            outcome = imap_login(context, port, "admin@contoso.com", f"guess {n}.{attempt}")
            assert outcome.startswith("refused"), outcome
            guesses[0] += 1
        return "guessed"

    jobs = [functools.partial(guesser, n) for n in range(20)]
    jobs += [
        functools.partial(imap_login, context, port, login, password_of(login))
        for login in USERS
        for _ in range(6)
    ]
    barrier = threading.Barrier(len(jobs))

    def released(job: Callable[[], str]) -> str:
        barrier.wait(timeout=60)
        return job()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(released, job) for job in jobs]
        real_outcomes = [f.result(timeout=300) for f in futures[20:]]
        done.set()
        assert [f.result(timeout=300) for f in futures[:20]] == ["guessed"] * 20
    assert real_outcomes == ["selected OK"] * 60
    assert guesses[0] >= 20  # the guessers really were at it


async def test_a_full_hash_queue_answers_busy_at_once(
    nursery: trio.Nursery,
    storm_rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Beyond hash_queue the temporary reply comes without waiting; log and audit say busy."""
    storm_rig.limits.update(hash_concurrency=1, hash_queue=1)
    proxy = await start_proxy(
        nursery, storm_rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    )
    context = tls_context(pki)
    # Each from its own loopback address, for its own login: no failure delay applies.
    jobs = [
        functools.partial(
            raw_login, context, proxy.port, f"nobody{n}@contoso.com", f"guess {n}", f"127.0.1.{n}"
        )
        for n in range(1, 21)
    ]
    replies = await in_thread(lambda: all_at_once(jobs))
    busy = [r for r in replies if r.startswith(b"a1 NO [UNAVAILABLE]")]
    refused = [r for r in replies if r.startswith(b"a1 NO [AUTHENTICATIONFAILED]")]
    assert len(busy) + len(refused) == 20, replies
    assert busy, "no attempt found the queue full"
    assert refused, "the queue served none"
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "xoauth2_proxy.audit"]
    busy_audits = [a for a in audits if a["reason"].startswith("busy: ")]
    assert len(busy_audits) == len(busy)
    assert {a["result"] for a in busy_audits} == {"temporary-failure"}
    assert "busy, try again later" in caplog.text
    assert "no token" not in caplog.text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_serve_within_its_grace_while_hashes_and_token_fetches_run(
    tmp_path: Path,
    storm_rig: ProxyRig,
    dovecot: Dovecot,
    idp: EntraEmulator,
    signum: signal.Signals,
) -> None:
    """Worker threads (argon2id, msal's blocking HTTP) cannot be cancelled; the process
    must not wait for them."""
    storm_rig.limits.update(hash_concurrency=1)
    config = storm_rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    idp.latency = 120  # every token request, the background refresh's first, hangs
    process = ServeProcess(config, tmp_path / "serve.log", grace=2)
    try:
        port = process.port()
        context = tls_context(storm_rig.pki)
        clients = concurrent.futures.ThreadPoolExecutor(max_workers=21)
        clients.submit(raw_login, context, port, USERS[0], password_of(USERS[0]))
        for n in range(20):
            clients.submit(raw_login, context, port, f"nobody{n}@contoso.com", f"guess {n}")
        # The background refresh waits for the IdP in a worker thread from the start; once
        # a hash has been computed, more are queued and one is running.
        process.wait_for(lambda: "unknown user" in process.text(), "a password check")
        process.process.send_signal(signum)
        # --grace 2, plus a few seconds: never the 120 s the IdP takes.
        assert process.process.wait(2 + 10) == 0
        clients.shutdown(wait=True, cancel_futures=True)
    finally:
        idp.latency = 0
        process.close()
    assert f"{signum.name} received: shutting down" in process.text()


async def test_a_reload_keeps_the_one_hash_pool_and_its_queue(
    nursery: trio.Nursery, storm_rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    """Issue: a SIGHUP built a new hash limiter, so hashes of the old and the new
    configuration could run at once, twice hash_concurrency."""
    storm_rig.limits.update(hash_concurrency=1)
    path = storm_rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    proxy = await start_proxy(nursery, path)
    pool = proxy.server.hashes
    storm_rig.limits.update(hash_concurrency=2, hash_queue=5)
    storm_rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    assert await proxy.server.reload(load_config(path), proxy.tokens)
    assert proxy.server.hashes is pool
    assert proxy.server.services.authenticator._hashes is pool
    assert (pool.concurrency, pool.max_queue) == (1, 5)  # the queue's limits follow
    context = tls_context(pki)
    login = USERS[0]
    reply = await in_thread(lambda: raw_login(context, proxy.port, login, password_of(login)))
    assert reply.startswith(b"a1 OK")
