"""A stand-in for one proxy instance in multi-process tests (``-m tests.support.token_worker``).

Reads one JSON object from the first line of stdin: ``app`` (the fields of a Microsoft
:class:`~broker.model.App`, the client secret under ``client_secret``), ``redis_url``,
``cache_key``, ``prefix`` and ``logins``. It builds a :class:`CachingTokenSource` on a
:class:`RedisTokenCache`, prints ``ready``, waits for a ``go`` line, then runs that many
concurrent ``token()`` calls and prints one JSON line: the SHA-256 of each distinct token.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import trio

from broker.cache.redis import RedisTokenCache
from broker.model import App, Secret
from broker.source import CachingTokenSource


async def main() -> None:
    spec = json.loads(sys.stdin.readline())
    fields = dict(spec["app"])
    fields["client_secret"] = Secret(fields["client_secret"])
    fields["ca_file"] = Path(fields["ca_file"])
    app = App(**fields)
    cache = RedisTokenCache(spec["redis_url"], Secret(spec["cache_key"]), prefix=spec["prefix"])
    source = CachingTokenSource({app.name: app}, cache=cache)
    tokens: set[str] = set()

    async def login() -> None:
        token = await source.token(app.name)
        tokens.add(hashlib.sha256(token.value.encode()).hexdigest())

    try:
        print("ready", flush=True)
        if (await trio.to_thread.run_sync(sys.stdin.readline)).strip() != "go":
            return
        async with trio.open_nursery() as nursery:
            for _ in range(int(spec["logins"])):
                nursery.start_soon(login)
    finally:
        source.close()
        cache.close()
    print(json.dumps(sorted(tokens)), flush=True)


if __name__ == "__main__":
    trio.run(main)
