"""sd_notify over a real datagram socket, and the JSON log format."""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING

from proxy.net import notify
from proxy.ops.logs import JsonFormatter

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def test_notify_sends_one_datagram_to_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind(str(path))
        listening.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.notify("READY=1", "STATUS=2 listeners, 0 sessions")
        assert listening.recv(4096) == b"READY=1\nSTATUS=2 listeners, 0 sessions"
        fields = notify.reloading()
        assert notify.notify(*fields)
        reload_message = listening.recv(4096).decode().splitlines()
        assert reload_message[0] == "RELOADING=1"
        assert reload_message[1].startswith("MONOTONIC_USEC=")
        assert int(reload_message[1].split("=")[1]) > 0


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"xoauth2-proxy-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind("\0" + name)
        listening.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("STOPPING=1")
        assert listening.recv(4096) == b"STOPPING=1"


def test_notify_without_a_socket_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify.notify("READY=1")  # never fails the caller
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:5")
    assert not notify.notify("READY=1")


def record(name: str, message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.INFO, "x.py", 1, message, None, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_lines_carry_the_fields() -> None:
    formatter = JsonFormatter()
    line = json.loads(
        formatter.format(
            record("xoauth2_proxy.session", "imap#3: hello \u202e", conn="imap#3", listener="l")
        )
    )
    assert line["level"] == "INFO"
    assert line["logger"] == "xoauth2_proxy.session"
    assert line["message"] == "imap#3: hello \u202e"
    assert (line["conn"], line["listener"]) == ("imap#3", "l")
    assert line["time"].endswith("+00:00")
    assert "\\u202e" in formatter.format(record("x", "\u202e"))  # escaped, one line
    audit = {"conn": "imap#3", "result": "success", "login": "a@b"}
    line = json.loads(formatter.format(record("xoauth2_proxy.audit", "{...}", audit=audit)))
    assert line["message"] == "audit"
    assert (line["result"], line["login"]) == ("success", "a@b")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failing = record("x", "failed")
        failing.exc_info = sys.exc_info()
    line = json.loads(formatter.format(failing))
    assert "ValueError: boom" in line["exception"]
