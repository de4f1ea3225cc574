"""A browser sign-in's answer pasted into the terminal is held to the same state check as
one the browser brings to the loopback listener."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from broker.signin import LoopbackRedirect

if TYPE_CHECKING:
    import pytest


async def test_a_pasted_address_with_another_state_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    redirect = LoopbackRedirect("http://127.0.0.1")
    await redirect.open()
    send, receive = trio.open_memory_channel[str](3)
    await send.send("http://127.0.0.1:1/?code=Zq9-a-code-value&state=another\n")
    await send.send("http://127.0.0.1:1/?code=real&state=good\n")
    try:
        with trio.fail_after(10):
            answer = await redirect.receive("good", receive)
    finally:
        await redirect.aclose()
    assert answer == {"code": "real", "state": "good"}
    assert "the pasted address is not this sign-in's answer" in caplog.text
    assert "Zq9-a-code-value" not in caplog.text  # nor is its code shown
