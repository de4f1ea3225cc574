"""Metrics and health on the operations listener, scraped live while logins happen; the
exposition checked by Prometheus's own promtool."""

from __future__ import annotations

import functools
import http.client
import imaplib
import json
import shutil
import socket
import subprocess
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from broker import build_source
from proxy.config import load_config
from proxy.net.server import BoundListener, ProxyServer
from proxy.ops.metrics import Metrics
from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig
from tests.e2e.helpers import in_thread, tls_context

if TYPE_CHECKING:
    from pathlib import Path

    from broker.source import CachingTokenSource
    from tests.support.dovecot import Dovecot

pytestmark = pytest.mark.e2e


def get(port: int, path: str, accept: str = "") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.getheader("content-type") or "", response.read()
    finally:
        conn.close()


def samples(exposition: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def promtool(exposition: bytes) -> subprocess.CompletedProcess[bytes]:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool (Debian package prometheus) is not installed"
    return subprocess.run(
        [tool, "check", "metrics"], input=exposition, capture_output=True, timeout=60, check=False
    )


async def start(
    nursery: trio.Nursery, config_path: Path, *, refresh: bool = True
) -> tuple[ProxyServer, list[BoundListener], CachingTokenSource]:
    config = load_config(config_path)
    metrics = Metrics("test")
    tokens = build_source(config.apps, config.cache, on_fetch=metrics.token_fetch)
    server = ProxyServer(config, tokens, grace=1.0, metrics=metrics)
    bound: list[BoundListener] = await nursery.start(server.serve)
    if refresh:
        await nursery.start(tokens.run)
    return server, bound, tokens


def imap_login(rig: ProxyRig, port: int, password: str) -> str:
    with imaplib.IMAP4_SSL("localhost", port, ssl_context=tls_context(rig.pki), timeout=30) as imap:
        try:
            imap.login(MAILBOX, password)
        except imaplib.IMAP4.error:
            return "NO"
        imap.select("INBOX")
        imap.logout()
        return "OK"


async def test_metrics_move_as_logins_happen_and_promtool_accepts_them(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot
) -> None:
    rig.tables["metrics"] = {"listen": '"127.0.0.1:0"'}
    server, bound, tokens = await start(
        nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    )
    port = bound[0].port
    ops = server.operations_address[1]
    listener = bound[0].config.name

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, _, body = await in_thread(lambda: get(ops, "/metrics"))
        assert status == 200
        return samples(body)

    before = await scrape()
    assert await in_thread(lambda: imap_login(rig, port, PASSWORD)) == "OK"
    assert await in_thread(lambda: imap_login(rig, port, PASSWORD)) == "OK"  # cached password
    assert await in_thread(lambda: imap_login(rig, port, "wrong")) == "NO"
    after = await scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("xoauth2_proxy_logins_total", protocol="imap", result="success") == 2
    assert moved("xoauth2_proxy_logins_total", protocol="imap", result="bad_credentials") == 1
    assert moved("xoauth2_proxy_sessions_total", listener=listener) == 3
    assert moved("xoauth2_proxy_credential_cache_lookups_total", result="hit") == 1
    assert moved("xoauth2_proxy_credential_cache_lookups_total", result="miss") == 2
    for phase, count in (("password_check", 3), ("token", 2), ("upstream_login", 2)):
        assert (
            moved("xoauth2_proxy_login_phase_seconds_count", protocol="imap", phase=phase) == count
        ), phase
    # SELECT's answer came from the upstream, the LOGOUT went to it.
    assert (
        moved("xoauth2_proxy_relayed_bytes_total", protocol="imap", direction="upstream_to_client")
        > 0
    )
    assert (
        moved("xoauth2_proxy_relayed_bytes_total", protocol="imap", direction="client_to_upstream")
        > 0
    )
    # Both apps' tokens were fetched once at start; the logins used them.
    assert value(after, "xoauth2_proxy_token_fetches_total", app="contoso", outcome="success") == 1
    assert 3000 < value(after, "xoauth2_proxy_token_expiry_seconds", app="contoso") <= 3600
    assert ("xoauth2_proxy_hash_queue_depth", frozenset()) in after
    assert value(after, "xoauth2_proxy_lockouts_active", scope="login") == 0
    assert value(after, "xoauth2_proxy_build_info", version="test") == 1

    # No label carries a login, a mailbox or an address.
    _, _, text = await in_thread(lambda: get(ops, "/metrics"))
    assert MAILBOX.encode() not in text
    assert b"127.0.0.1" not in text.replace(listener.encode(), b"")

    checked = promtool(text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # OpenMetrics too, for a server that asks for it.
    status, content_type, body = await in_thread(
        lambda: get(ops, "/metrics", "application/openmetrics-text; version=1.0.0")
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    tokens.close()


async def test_lockouts_and_sessions_open_are_reported(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot
) -> None:
    rig.tables["metrics"] = {"listen": '"127.0.0.1:0"'}
    rig.limits.update(lockout_after=2, failure_delay=0, max_failure_delay=0)
    server, bound, tokens = await start(
        nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]), refresh=False
    )
    ops, port, listener = server.operations_address[1], bound[0].port, bound[0].config.name
    for _ in range(2):
        assert await in_thread(lambda: imap_login(rig, port, "wrong")) == "NO"
    assert await in_thread(lambda: imap_login(rig, port, PASSWORD)) == "NO"  # locked out

    def open_one() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with imaplib.IMAP4_SSL("localhost", port, ssl_context=tls_context(rig.pki), timeout=30):
            return samples(get(ops, "/metrics")[2])

    during = await in_thread(open_one)
    assert value(during, "xoauth2_proxy_sessions_open", listener=listener) == 1
    assert value(during, "xoauth2_proxy_lockouts_active", scope="login") == 1
    assert value(during, "xoauth2_proxy_logins_total", protocol="imap", result="locked_out") == 1
    tokens.close()


async def test_health_and_readiness(nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot) -> None:
    rig.tables["metrics"] = {"listen": '"127.0.0.1:0"'}
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    # An app Entra does not know: its token request fails for good.
    path.write_text(
        path.read_text().replace(
            'client_id = "99999999-2222-3333-4444-555555555555"',
            'client_id = "00000000-dead-beef-0000-000000000000"',
        )
    )
    config = load_config(path)
    tokens = build_source(config.apps, config.cache)
    server = ProxyServer(config, tokens, grace=1.0)
    bound = await nursery.start(server.serve)
    ops = server.operations_address[1]

    status, _, body = await in_thread(lambda: get(ops, "/healthz"))
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    # No token requested yet: not ready, and it says which app.
    status, content_type, body = await in_thread(lambda: get(ops, "/readyz"))
    assert status == 503
    assert content_type == "application/json"
    assert json.loads(body)["problems"] == [
        "app contoso: no token yet",
        "app roleless: no token yet",
    ]

    await nursery.start(tokens.run)
    with trio.fail_after(30):
        while not (  # noqa: ASYNC110 - the broker offers no event to wait on
            len(server.readiness()) == 1
            and server.readiness()[0].startswith("app roleless: no valid token")
        ):
            await trio.sleep(0.05)
    status, _, body = await in_thread(lambda: get(ops, "/readyz"))
    assert status == 503
    (problem,) = json.loads(body)["problems"]
    assert problem.startswith("app roleless: no valid token; the last request failed:")
    assert "AADSTS700016" in problem
    assert "emulated-client-secret" not in body.decode()

    # Without the broken app (a reload), ready.
    text = path.read_text()
    path.write_text(text[: text.index("[apps.roleless]")] + text[text.index("[[listeners]]") :])
    assert await server.reload(load_config(path), tokens)
    status, _, body = await in_thread(lambda: get(ops, "/readyz"))
    assert (status, json.loads(body)) == (200, {"status": "ready"})

    # Other paths and methods.
    assert (await in_thread(lambda: get(ops, "/nothing")))[0] == 404

    def post() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", ops, timeout=30)
        conn.request("POST", "/metrics", body=b"x")
        status = conn.getresponse().status
        conn.close()
        return status

    assert await in_thread(post) == 405

    def head() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", ops, timeout=30)
        conn.request("HEAD", "/healthz")
        response = conn.getresponse()
        result = response.status, response.read()
        conn.close()
        return result

    assert await in_thread(head) == (200, b"")
    # A session in progress keeps the proxy draining (with none it would exit at once).
    with socket.create_connection(("127.0.0.1", bound[0].port), timeout=30):
        await trio.testing.wait_all_tasks_blocked()  # accepted: its TLS handshake waits
        server.shutdown()
        status, _, body = await in_thread(lambda: get(ops, "/readyz"))
    assert status == 503
    assert json.loads(body)["problems"] == ["shutting down: no longer accepting connections"]
    tokens.close()


async def test_oversized_or_broken_requests_get_an_error_not_a_hang(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot
) -> None:
    rig.tables["metrics"] = {"listen": '"127.0.0.1:0"'}
    server, _, tokens = await start(
        nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]), refresh=False
    )
    ops = server.operations_address[1]

    def raw(data: bytes) -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", ops), timeout=30) as sock:
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    assert (await in_thread(functools.partial(raw, b"NONSENSE\r\n\r\n"))).startswith(
        b"HTTP/1.1 400"
    )
    huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await in_thread(functools.partial(raw, huge))).startswith(b"HTTP/1.1 431")
    tokens.close()
