"""Files the configuration names are trusted only if nobody else could have changed them:
one test per rule, for each kind of file, through ``load_config`` as ``check`` and
``serve`` use it. (The tests run as root: "another user" is uid 65534.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.files import UnsafeFile, read_trusted
from tests.proxy.test_config import good_config, write

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private directory (pytest's base is shared with other users' processes)."""
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    tmp_path.chmod(0o700)
    return tmp_path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def private(path: Path, text: str = "x") -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def config_with(folder: Path, old: str, new: str, *, extra: str = "") -> Path:
    text = good_config(folder)
    assert old in text
    return write(folder, text.replace(old, new, 1) + extra)


SECRET = ('{ env = "XO_TEST_SECRET" }', '{ file = "secret" }')


@pytest.mark.parametrize(
    ("mode", "who"), [(0o640, "its group"), (0o604, "other users"), (0o660, "its group")]
)
def test_a_secret_file_must_be_private(folder: Path, mode: int, who: str) -> None:
    secret = private(folder / "secret", "s3cret")
    secret.chmod(mode)
    found = problems(config_with(folder, *SECRET))
    expected = "is writable by its group" if mode & 0o020 else f"is accessible to {who}"
    assert len(found) == 1
    assert f"apps.contoso.client_secret: {secret} {expected}" in found[0]


def test_a_listener_private_key_must_be_private(folder: Path) -> None:
    path = write(folder, good_config(folder))
    (folder / "server.pem").chmod(0o644)
    assert problems(path) == [
        f"{path}: listeners[0].certificate: {folder / 'server.pem'} is accessible to its "
        f"group and other users (mode 644) and holds a secret; chmod 600 {folder / 'server.pem'}"
    ]


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("client_ca_file", "listeners[0].client_ca_file"),
        ("upstream_ca_file", "listeners[0].upstream_ca_file"),
        ("ca_file", "apps.contoso.ca_file"),
    ],
)
@pytest.mark.parametrize("mode", [0o666, 0o664])
def test_a_ca_file_must_not_be_writable_by_others(
    folder: Path, key: str, where: str, mode: int
) -> None:
    """The attack: a local user appends its own CA, the operator reloads, and that user's
    certificate logs in (client_ca_file), or the IdP or upstream is impersonated."""
    ca = folder / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    ca.chmod(mode)
    if key == "ca_file":
        path = config_with(folder, "client_secret = {", 'ca_file = "ca.pem"\nclient_secret = {')
    else:
        extra = 'client_certificates = "optional"\n' if key == "client_ca_file" else ""
        path = config_with(
            folder,
            'upstream_tls = "implicit"\n',
            f'upstream_tls = "implicit"\n{key} = "ca.pem"\n{extra}',
        )
    found = problems(path)
    assert f"{path}: {where}: {ca} is writable by" in found[0]
    assert found[0].endswith(f"; chmod go-w {ca}")
    ca.chmod(0o644)  # readable by all is fine for a CA file
    load_config(path)


def test_a_file_of_another_user_is_refused(folder: Path) -> None:
    secret = private(folder / "secret")
    os.chown(secret, NOBODY, NOBODY)
    found = problems(config_with(folder, *SECRET))
    assert f"{secret} belongs to nobody, not to root or root" in found[0]
    assert found[0].endswith(
        f"chown root {secret} (or, if the proxy runs as nobody, run this as nobody)"
    )


def test_a_configuration_of_another_user_is_refused(folder: Path) -> None:
    path = write(folder, good_config(folder))
    os.chown(path, NOBODY, NOBODY)
    assert problems(path) == [
        f"{path}: {path} belongs to nobody, not to root or root (the user the proxy runs "
        f"as); chown root {path} (or, if the proxy runs as nobody, run this as nobody)"
    ]


def test_a_directory_writable_by_everyone_is_refused(folder: Path) -> None:
    path = write(folder, good_config(folder))
    folder.chmod(0o777)
    assert problems(path) == [
        f"{path}: directory {folder} is writable by every user (mode 777), so config.toml "
        f"could be replaced; chmod o-w {folder}"
    ]
    folder.chmod(0o1777)  # sticky, as /tmp: others cannot replace our files
    load_config(path)


def test_a_link_into_a_directory_writable_by_everyone_is_refused(folder: Path) -> None:
    shared = folder / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    private(shared / "secret")
    (folder / "secret").symlink_to(shared / "secret")
    found = problems(config_with(folder, *SECRET))
    assert f"directory {shared} is writable by every user" in found[0]


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_only_regular_files_are_read_and_a_fifo_never_blocks(folder: Path, kind: str) -> None:
    secret = folder / "secret"
    if kind == "fifo":
        os.mkfifo(secret, 0o600)
    elif kind == "device":
        secret.symlink_to("/dev/zero")
    else:
        secret.mkdir(mode=0o700)
    found = problems(config_with(folder, *SECRET))
    assert f"{secret} is not a regular file" in found[0]


def test_a_fifo_at_the_cache_path_does_not_hang_check(folder: Path) -> None:
    """Issue: a FIFO at the cache path hung check and serve for ever (blocking open)."""
    key = private(folder / "cache.key", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
    os.mkfifo(folder / "tokens", 0o600)
    path = write(
        folder,
        good_config(folder)
        + f'\n[cache]\nkind = "file"\npath = "tokens"\nkey = {{ file = "{key}" }}\n',
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XO_TEST_SECRET": "x"},
        check=False,
    )
    assert done.returncode == 2
    assert f"cache.path: {folder / 'tokens'} is not a regular file" in done.stderr


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("group-writable directory", "is writable by other users (mode 770)"),
        ("symlink", "is a symbolic link"),
        ("another user's file", "belongs to nobody, not to root or root"),
        ("readable file", "is accessible to its group"),
    ],
)
def test_the_cache_file_and_its_directory(folder: Path, setup: str, problem: str) -> None:
    key = private(folder / "cache.key", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
    cache_dir = folder / "cache"
    cache_dir.mkdir(mode=0o700)
    tokens = cache_dir / "tokens"
    if setup == "group-writable directory":
        cache_dir.chmod(0o770)
    elif setup == "symlink":
        tokens.symlink_to(private(folder / "elsewhere"))
    elif setup == "another user's file":
        os.chown(private(tokens), NOBODY, NOBODY)
    else:
        private(tokens).chmod(0o640)
    text = good_config(folder)
    text += f'\n[cache]\nkind = "file"\npath = "cache/tokens"\nkey = {{ file = "{key}" }}\n'
    found = problems(write(folder, text))
    assert any(
        p.startswith(f"{folder / 'config.toml'}: cache.path: ") and problem in p for p in found
    ), found


def test_read_trusted_reads_what_it_checked(folder: Path) -> None:
    assert read_trusted(private(folder / "ok", "content"), private=True) == b"content"
    largest = private(folder / "largest", "x" * (1024 * 1024))
    assert len(read_trusted(largest, private=True)) == 1024 * 1024
    big = private(folder / "big", "x" * (1024 * 1024 + 1))
    with pytest.raises(UnsafeFile, match="larger than 1024 KiB"):
        read_trusted(big, private=True)
    # Executable or not makes no difference to a file that is only read.
    runnable = private(folder / "run", "x")
    runnable.chmod(0o755)
    assert read_trusted(runnable, private=False) == b"x"
    with pytest.raises(UnsafeFile, match=r"cannot read .*: No such file"):
        read_trusted(folder / "missing", private=False)


@pytest.mark.parametrize(
    ("group", "mode", "accepted"),
    [
        (NOBODY, 0o440, True),  # root:the proxy's group, read-only: a Kubernetes Secret
        (NOBODY, 0o640, True),
        (NOBODY, 0o460, False),  # its group may write it
        (NOBODY, 0o444, False),  # everyone may read it
        (NOBODY, 0o450, False),
        (0, 0o440, False),  # root's group, not the proxy's
    ],
)
def test_a_secret_of_root_shared_with_the_proxy_s_group_only(
    folder: Path, monkeypatch: pytest.MonkeyPatch, group: int, mode: int, accepted: bool
) -> None:
    """As a proxy running as nobody:nogroup would judge it (the ids it compares with are
    nobody's; the files are real)."""
    secret = folder / "secret"
    secret.write_text("s3cret")
    os.chown(secret, 0, group)
    secret.chmod(mode)
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    monkeypatch.setattr(os, "getegid", lambda: NOBODY)
    if accepted:
        assert read_trusted(secret, private=True) == b"s3cret"
    else:
        with pytest.raises(UnsafeFile, match=r"holds a secret|writable by its group"):
            read_trusted(secret, private=True)


def test_a_secret_shared_with_root_s_group_is_refused_to_root(folder: Path) -> None:
    """A proxy running as root shares its group with no service: mode 440 is refused."""
    secret = folder / "secret"
    secret.write_text("s3cret")
    secret.chmod(0o440)
    with pytest.raises(UnsafeFile, match="is accessible to its group"):
        read_trusted(secret, private=True)
