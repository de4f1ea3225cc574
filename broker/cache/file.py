"""An encrypted token cache in one file, so tokens survive a restart.

Theory of operation
-------------------
The file holds one sealed JSON document (:mod:`broker.cache.sealing`, AES-256-GCM) mapping
each key's :attr:`~broker.cache.CacheKey.name` to a token, and (``grants``) to the sign-in of
a delegated app's user. Without the key the file reveals nothing, not even which mailboxes
have tokens.

- **Permissions.** The file is created with mode 0600 and must stay private: a file that
  its group or other users can access, or that another user owns, is refused (when opening
  the cache: ``ValueError``; later: :class:`~broker.cache.CacheError`, and the source goes on
  without the cache).
- **Atomic writes.** A write goes to a new temporary file in the same directory (0600,
  ``O_EXCL``), is flushed to disk, and replaces the old file with ``os.replace``; readers
  see the old or the new file, never half of one.
- **Several writers.** The proxy and ``xoauth2-proxy token`` may write at the same time: each
  write re-reads the file and merges under an ``flock`` on ``PATH.lock``, so no writer loses
  another's entries. Tokens that expired are dropped on write; sign-ins are kept until
  replaced. A new refresh token therefore replaces the old one in the same ``os.replace``:
  a crash at any moment leaves one of the two on disk. A writer waits at most
  ``lock_wait`` seconds for the lock (a stopped process may hold it forever), then gives up
  with :class:`~broker.cache.CacheError`, as for any other failure to read or write: the
  source carries on without the cache.
- **Wrong key or damaged file.** Treated as empty (logged once); the next write replaces it.
  Changing the key therefore only costs one token request per app.

Blocking file I/O runs in worker threads (``trio.to_thread.run_sync``), which a cancelled
caller abandons: a write then finishes (or gives up) on its own, and no caller waits longer
than its own deadline.
- **Renewals, one process at a time.** :meth:`FileTokenCache.exclusive` takes a POSIX record
  lock on one byte of ``PATH.renew.lock`` chosen by the key, so the proxy and the ``token`` or
  ``authorize`` commands never renew the same key at once -- which matters for refresh
  tokens that the identity provider rotates and refuses to see twice. Record locks belong to
  the process, so one descriptor stays open for the cache's life (closing any other would
  drop them all), and tasks of one process are kept apart by the source's single flight. A
  holder that does not let go within ``lock_wait`` seconds (a stopped process) is logged and
  passed by.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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

from broker.cache import CachedToken, CacheError, Grant
from broker.cache.sealing import Sealer, SealError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
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
#: Seconds a renewal waits for another process renewing the same key: longer than a renewal
#: may hold the lock (the source's fetch_timeout, 60 s, and a store), so that two processes
#: never use one refresh token at once (servers that rotate them revoke the grant for it).
RENEW_WAIT: Final = 90.0
#: The renewal lock's byte is one of this many, chosen by the key.
_RENEW_SLOTS: Final = 1 << 20


class _Document:
    """What the file holds: tokens and sign-ins, by key name."""

    __slots__ = ("entries", "grants")

    def __init__(
        self,
        entries: dict[str, CachedToken] | None = None,
        grants: dict[str, Grant] | None = None,
    ) -> None:
        self.entries = entries if entries is not None else {}
        self.grants = grants if grants is not None else {}


class FileTokenCache:
    """Tokens in the encrypted file ``path`` (created on first write), sealed with ``key``.

    ``ValueError`` at once for a bad key, a missing directory or an existing file that is not
    private. A write waits at most ``lock_wait`` seconds for another writer's lock, a renewal
    (:meth:`exclusive`) ``renew_wait`` seconds for another process renewing the same key.
    """

    def __init__(
        self,
        path: Path,
        key: Secret,
        *,
        lock_wait: float = LOCK_WAIT,
        renew_wait: float = RENEW_WAIT,
    ) -> None:
        if not lock_wait >= 0:
            raise ValueError("lock_wait must not be negative")
        if not renew_wait >= 0:
            raise ValueError("renew_wait must not be negative")
        self._path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._renew_path = path.with_name(path.name + ".renew.lock")
        self._renew_fd: int | None = None
        self._lock_wait = lock_wait
        self._renew_wait = renew_wait
        self._sealer = Sealer(key)
        self._mutex = threading.Lock()
        self._renew_mutex = threading.Lock()
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
        document = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)
        return document.entries.get(key.name)

    async def store(self, key: CacheKey, entry: CachedToken) -> None:
        # Abandoning the thread is safe: the write is atomic, and waits for the lock only
        # until its own deadline.
        def put(document: _Document) -> None:
            document.entries[key.name] = entry

        await trio.to_thread.run_sync(self._merge, put, abandon_on_cancel=True)

    async def load_grant(self, key: CacheKey) -> Grant | None:
        document = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)
        return document.grants.get(key.name)

    async def store_grant(self, key: CacheKey, grant: Grant) -> None:
        def put(document: _Document) -> None:
            document.grants[key.name] = grant

        await trio.to_thread.run_sync(self._merge, put, abandon_on_cancel=True)

    @asynccontextmanager
    async def exclusive(self, key: CacheKey) -> AsyncIterator[None]:
        """Renew ``key`` alone among the processes using this file (see the module)."""
        offset = int.from_bytes(hashlib.sha256(key.name.encode()).digest()[:4]) % _RENEW_SLOTS
        try:
            fd = await trio.to_thread.run_sync(self._renew_descriptor, abandon_on_cancel=True)
        except CacheError as exc:
            log.warning("%s; renewing without the lock", exc)
            yield
            return
        deadline = trio.current_time() + self._renew_wait
        pause = LOCK_POLL_FIRST
        while True:
            try:
                # Non-blocking, on a local file: no need for a thread.
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                break
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
                if trio.current_time() >= deadline:
                    log.warning(
                        "token cache %s: another process has been renewing %s for more than "
                        "%g s (is it stopped?); renewing without waiting for it",
                        self._renew_path,
                        key,
                        self._renew_wait,
                    )
                    yield
                    return
            except OSError as exc:  # e.g. ENOLCK on NFS
                log.warning(
                    "token cache %s: cannot lock (%s); renewing without the lock",
                    self._renew_path,
                    _reason(exc),
                )
                yield
                return
            await trio.sleep(pause)
            pause = min(pause * 2, LOCK_POLL_MAX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)

    def close(self) -> None:
        """Let go of the renewal lock file (the cache file is opened only to read or write)."""
        with self._renew_mutex:
            fd, self._renew_fd = self._renew_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- worker threads ---------------------------------------------------------------------

    def _renew_descriptor(self) -> int:
        """The renewal lock file's descriptor, opened once (see the module)."""
        with self._renew_mutex:
            if self._renew_fd is None:
                try:
                    self._renew_fd = os.open(
                        self._renew_path,
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                        0o600,
                    )
                except OSError as exc:
                    raise CacheError(
                        f"token cache {self._renew_path}: cannot open: {_reason(exc)}"
                    ) from None
            return self._renew_fd

    def _read(self) -> _Document:
        try:
            # Non-blocking: a FIFO put in its place must not hang the reader.
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return _Document()
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
            raw_grants = document.get("grants", {})
            grants = {name: Grant.from_json(value) for name, value in raw_grants.items()}
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
            return _Document()
        self._warned = None
        return _Document(entries, grants)

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

    def _merge(self, change: Callable[[_Document], None]) -> None:
        """Read the file, ``change`` the document, drop expired tokens, write it back."""
        with self._locked(time.monotonic() + self._lock_wait):
            document = self._read()
            change(document)
            now = time.time()
            document.entries = {
                k: v for k, v in document.entries.items() if v.token.expires_at > now
            }
            self._write(document)

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

    def _write(self, document: _Document) -> None:
        content = {
            "entries": {k: json.loads(v.to_json()) for k, v in document.entries.items()},
            "grants": {k: json.loads(v.to_json()) for k, v in document.grants.items()},
        }
        sealed = self._sealer.seal(json.dumps(content).encode("utf-8"), CONTEXT)
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
                os.replace(temporary, self._path)
            except BaseException:
                temporary.unlink(missing_ok=True)  # nothing left behind, whatever failed
                raise
            directory = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise CacheError(f"token cache {self._path}: cannot write: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
