"""The token caches with the running proxy: logins against Dovecot, which verifies every
token, and the emulated Entra counting the token requests."""

from __future__ import annotations

import base64
import functools
import os
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread
from tests.e2e.test_abuse import login
from tests.support.redis import RedisServer

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = [pytest.mark.e2e]


def cache_key(rig: ProxyRig) -> str:
    """A new cache key in a private file beside the configuration; its TOML value."""
    path = rig.directory / "cache-key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return '{ file = "cache-key" }'


async def test_file_cache_carries_the_token_across_a_restart(
    rig: ProxyRig, dovecot: Dovecot, pki: TestPki, idp: EntraEmulator, tmp_path: Path
) -> None:
    rig.cache = {"kind": '"file"', "path": f'"{tmp_path}/tokens"', "key": cache_key(rig)}
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    before = idp.token_requests
    for _ in range(2):  # the proxy, then the proxy restarted
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, path)
            reply = await in_thread(functools.partial(login, pki, proxy.port, PASSWORD))
            assert reply.startswith(b"a1 OK"), reply
            proxy.server.shutdown()
        proxy.tokens.close()
    assert idp.token_requests == before + 1  # the restarted proxy read the file
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o600


async def test_instances_sharing_redis_ask_the_identity_provider_once(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    idp: EntraEmulator,
    tmp_path: Path,
) -> None:
    """Two proxies behind one load balancer, 20 simultaneous logins spread over both."""
    with RedisServer(tmp_path / "redis") as redis:
        rig.cache = {"kind": '"redis"', "url": f'"{redis.url}"', "key": cache_key(rig)}
        path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
        proxies = [await start_proxy(nursery, path) for _ in range(2)]
        before = idp.token_requests
        replies: list[bytes] = []

        async def one(port: int) -> None:
            replies.append(await in_thread(lambda: login(pki, port, PASSWORD, user=MAILBOX)))

        async with trio.open_nursery() as logins:
            for n in range(20):
                logins.start_soon(one, proxies[n % 2].port)
        assert len(replies) == 20
        assert all(reply.startswith(b"a1 OK") for reply in replies), replies
        assert idp.token_requests == before + 1
        for proxy in proxies:
            proxy.server.shutdown()
            proxy.tokens.close()
