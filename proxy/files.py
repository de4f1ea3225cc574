"""Reading the files a configuration names, only when nobody else could have changed them.

Every file the proxy trusts (its configuration, secrets, private keys, CA files) decides
who may log in or whom the proxy believes. One that another local user can rewrite hands
that user the tenant's tokens: append a CA to a world-writable ``client_ca_file`` and
your own certificate logs in as ``printer``. So a file is read only if

* it is a regular file (a FIFO would block the reader for ever, a device is no file), opened
  without blocking and checked on the open descriptor, so what is checked is what is read;
* it belongs to root or to the user the proxy runs as;
* neither its group nor other users may write it, and for a *private* file (secrets,
  private keys, a configuration holding secrets) neither may read it either, with one
  exception: a file of root that only the proxy's own group may read (``root:GROUP``
  mode 0440 or 0640, GROUP the effective group of a proxy that is not root). That is how
  root hands a secret to one service, and how Kubernetes mounts Secrets for a pod's
  ``fsGroup``;
* no directory above it (followed through symbolic links) is writable by every user, unless
  it is sticky (``/tmp``): otherwise the file could be swapped for another.

Each refusal is one sentence saying what is wrong and the command that fixes it.
"""

from __future__ import annotations

import os
import pwd
import stat
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["MAX_SIZE", "UnreadableFile", "UnsafeFile", "check_directories", "read_trusted"]

#: Configuration files, secrets, keys and CA bundles are small; anything larger is a mistake.
MAX_SIZE: Final = 1024 * 1024


class UnsafeFile(Exception):
    """The file cannot be trusted or read; ``str()`` says why and how to fix it."""


class UnreadableFile(UnsafeFile):
    """The file cannot be read at all (missing, permission denied, an I/O error): a fault
    of the machine rather than of the configuration."""


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _who(bits: int) -> str:
    parts = []
    if bits & 0o070:
        parts.append("its group")
    if bits & 0o007:
        parts.append("other users")
    return " and ".join(parts)


def check_directories(path: Path) -> None:
    """Raise :exc:`UnsafeFile` if a directory above ``path`` (or above what it links to)
    may be written by every user without the sticky bit."""
    seen: set[str] = set()
    for start in (path.absolute(), path.resolve()):
        for directory in start.parents:
            name = str(directory)
            if name in seen:
                continue
            seen.add(name)
            try:
                mode = directory.stat().st_mode
            except OSError:
                continue  # reading the file will say what is wrong
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                raise UnsafeFile(
                    f"directory {directory} is writable by every user (mode "
                    f"{stat.S_IMODE(mode):o}), so {path.name} could be replaced; "
                    f"chmod o-w {directory}"
                )


def _check_descriptor(path: Path, info: os.stat_result, *, private: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"{path} is not a regular file; point the setting at a file")
    me = os.geteuid()
    if info.st_uid not in (0, me):
        owner = _user(info.st_uid)
        hint = f" (or, if the proxy runs as {owner}, run this as {owner})" if me == 0 else ""
        raise UnsafeFile(
            f"{path} belongs to {owner}, not to root or {_user(me)} (the user the proxy runs "
            f"as); chown {_user(me)} {path}{hint}"
        )
    mode = stat.S_IMODE(info.st_mode)
    writable = mode & 0o022
    if writable:
        raise UnsafeFile(
            f"{path} is writable by {_who(writable)} (mode {mode:o}); chmod go-w {path}"
        )
    shared_with_my_group = (
        info.st_uid == 0 and me != 0 and info.st_gid == os.getegid() and mode & 0o077 == 0o040
    )
    if private and mode & 0o077 and not shared_with_my_group:
        raise UnsafeFile(
            f"{path} is accessible to {_who(mode & 0o077)} (mode {mode:o}) and holds a "
            f"secret; chmod 600 {path}"
        )


def read_trusted(path: Path, *, private: bool) -> bytes:
    """The contents of ``path`` if it passes the rules above (``private``: it holds a secret
    or a private key); :exc:`UnsafeFile` otherwise, or if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableFile(f"cannot read {path}: {exc.strerror}") from None
    try:
        _check_descriptor(path, os.fstat(fd), private=private)
        check_directories(path)
        data = os.read(fd, MAX_SIZE + 1)
        while len(data) <= MAX_SIZE and (more := os.read(fd, MAX_SIZE + 1 - len(data))):
            data += more
    except OSError as exc:
        raise UnreadableFile(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise UnsafeFile(f"{path} is larger than {MAX_SIZE // 1024} KiB; is it the right file?")
    return data
