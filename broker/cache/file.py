"""An encrypted token cache in one file, so tokens survive a restart.

Theory of operation
-------------------
The file holds one sealed JSON document (:mod:`broker.cache.sealing`, AES-256-GCM) mapping
each key's :attr:`~broker.cache.CacheKey.name` to a token. Without the key the file reveals
nothing, not even which mailboxes have tokens.

- **Permissions.** The file is created with mode 0600 and must stay private: a file that
  its group or other users can access, or that another user owns, is refused (when opening
  the cache: ``ValueError``; later: :class:`~broker.cache.CacheError`, and the source goes on
  without the cache).
- **Atomic writes.** A write goes to a new temporary file in the same directory (0600,
  ``O_EXCL``), is flushed to disk, and replaces the old file with ``os.replace``; readers
  see the old or the new file, never half of one.
- **Several writers.** The proxy and ``xoauth2-proxy token`` may write at the same time: each
  write re-reads the file and merges under an ``flock`` on ``PATH.lock``, so no writer loses
  another's entries. Tokens that expired are dropped on write. A writer waits at most
  ``lock_wait`` seconds for the lock (a stopped process may hold it forever), then gives up
  with :class:`~broker.cache.CacheError`, as for any other failure to read or write: the
  source carries on without the cache.
- **Wrong key or damaged file.** Treated as empty (logged once); the next write replaces it.
  Changing the key therefore only costs one token request per app.

Blocking file I/O runs in worker threads (``trio.to_thread.run_sync``), which a cancelled
caller abandons: a write then finishes (or gives up) on its own, and no caller waits longer
than its own deadline.
:meth:`FileTokenCache.exclusive` does nothing: one proxy per file is the intended use; two
processes racing for the same token both ask the identity provider, which is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from broker.cache import CachedToken, CacheError
from broker.cache.sealing import Sealer, SealError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from broker.cache import CacheKey
    from broker.model import Secret

__all__ = ["FileTokenCache"]

log = logging.getLogger("xoauth2_proxy.broker.cache")

#: Associated data of the sealed document: the format's name and version.
CONTEXT: Final = b"xoauth2-proxy token cache file v1"
#: Seconds a writer waits for the lock file (held only while another writer merges).
LOCK_WAIT: Final = 5.0
#: How often a waiting writer tries the lock: first, and at most (seconds).
LOCK_POLL_FIRST: Final = 0.005
LOCK_POLL_MAX: Final = 0.1


class FileTokenCache:
    """Tokens in the encrypted file ``path`` (created on first write), sealed with ``key``.

    ``ValueError`` at once for a bad key, a missing directory or an existing file that is not
    private. A write waits at most ``lock_wait`` seconds for another writer's lock.
    """

    def __init__(self, path: Path, key: Secret, *, lock_wait: float = LOCK_WAIT) -> None:
        if not lock_wait >= 0:
            raise ValueError("lock_wait must not be negative")
        self._path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._lock_wait = lock_wait
        self._sealer = Sealer(key)
        self._mutex = threading.Lock()
        self._warned: str | None = None
        if not path.parent.is_dir():
            raise ValueError(f"token cache {path}: directory {path.parent} does not exist")
        try:
            self._read()
        except CacheError as exc:
            raise ValueError(str(exc)) from None

    def __repr__(self) -> str:
        return f"FileTokenCache({str(self._path)!r})"

    async def load(self, key: CacheKey) -> CachedToken | None:
        entries = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)
        return entries.get(key.name)

    async def store(self, key: CacheKey, entry: CachedToken) -> None:
        # Abandoning the thread is safe: the write is atomic, and waits for the lock only
        # until its own deadline.
        await trio.to_thread.run_sync(self._merge, key.name, entry, abandon_on_cancel=True)

    @asynccontextmanager
    async def exclusive(self, key: CacheKey) -> AsyncIterator[None]:
        yield

    def close(self) -> None:
        """Nothing to release: the file is opened only while it is read or written."""

    # -- worker threads ---------------------------------------------------------------------

    def _read(self) -> dict[str, CachedToken]:
        try:
            # Non-blocking: a FIFO put in its place must not hang the reader.
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CacheError(f"token cache {self._path}: cannot open: {_reason(exc)}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                self._check_private(os.fstat(f.fileno()))
                data = f.read()
        except OSError as exc:
            raise CacheError(f"token cache {self._path}: cannot read: {_reason(exc)}") from None
        try:
            document = json.loads(self._sealer.open(data, CONTEXT))
            raw = document["entries"]
            entries = {name: CachedToken.from_json(value) for name, value in raw.items()}
        except (SealError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = str(exc) if isinstance(exc, SealError) else "damaged"
            if self._warned != reason:
                self._warned = reason
                log.warning(
                    "token cache %s %s (was the key changed?); starting empty, the next "
                    "token replaces it",
                    self._path,
                    reason,
                )
            return {}
        self._warned = None
        return entries

    def _check_private(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise CacheError(f"token cache {self._path} is not a regular file; refusing it")
        if info.st_uid != os.geteuid():
            raise CacheError(
                f"token cache {self._path} belongs to another user (uid {info.st_uid}); "
                "refusing it: delete it or give it to the user the proxy runs as"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise CacheError(
                f"token cache {self._path} is accessible to other users "
                f"(mode {stat.S_IMODE(info.st_mode):o}); refusing it: chmod 600 it"
            )

    def _merge(self, name: str, entry: CachedToken) -> None:
        with self._locked(time.monotonic() + self._lock_wait):
            entries = self._read()
            entries[name] = entry
            now = time.time()
            keep = {k: v for k, v in entries.items() if v.token.expires_at > now}
            self._write(keep)

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        """This process's writers one at a time, and then the ``flock`` shared with others,
        both waited for until ``deadline`` (``time.monotonic``); :class:`CacheError` after."""
        if not self._mutex.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise self._busy()
        try:
            with self._flock(deadline):
                yield
        finally:
            self._mutex.release()

    @contextlib.contextmanager
    def _flock(self, deadline: float) -> Iterator[None]:
        try:
            fd = os.open(
                self._lock_path,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                0o600,
            )
        except OSError as exc:
            raise CacheError(
                f"token cache {self._lock_path}: cannot open: {_reason(exc)}"
            ) from None
        try:
            pause = LOCK_POLL_FIRST
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._busy() from None
                except OSError as exc:  # e.g. ENOLCK on NFS
                    raise CacheError(
                        f"token cache {self._lock_path}: cannot lock: {_reason(exc)}"
                    ) from None
                time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
                pause = min(pause * 2, LOCK_POLL_MAX)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the lock

    def _busy(self) -> CacheError:
        return CacheError(
            f"token cache {self._lock_path}: still locked by another writer after "
            f"{self._lock_wait:g} s (is a stopped process holding it?); token not written"
        )

    def _write(self, entries: dict[str, CachedToken]) -> None:
        document = {"entries": {k: json.loads(v.to_json()) for k, v in entries.items()}}
        sealed = self._sealer.seal(json.dumps(document).encode("utf-8"), CONTEXT)
        temporary = self._path.with_name(f".{self._path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)  # whatever the umask
                    f.write(sealed)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            os.replace(temporary, self._path)
            directory = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise CacheError(f"token cache {self._path}: cannot write: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
