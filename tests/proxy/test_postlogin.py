"""What the upstream says after a login: refusals of the mailbox and token-expiry goodbyes,
in status replies only, never in the mail relayed."""

from __future__ import annotations

import pytest

from proxy.net.postlogin import FirstLines, token_expired

NOT_CONNECTED = "User is authenticated but not connected."


@pytest.mark.parametrize(
    "reply",
    [
        f"a2 BAD {NOT_CONNECTED}",
        f"* BYE {NOT_CONNECTED}",
        f"-ERR {NOT_CONNECTED}",
        "554 5.2.252 SendAsDenied; reports@contoso.com not allowed to send as ceo@contoso.com",
    ],
)
def test_a_refusal_of_the_mailbox_is_found(reply: str) -> None:
    watch = FirstLines()
    watch.feed(b"+OK welcome\r\n" + reply.encode() + b"\r\n")
    assert watch.refusal == reply
    assert watch.done


@pytest.mark.parametrize(
    "data",
    [
        # A bounce fetched or retrieved right after the login quotes the same words.
        f"+OK 1 messages\r\n+OK 312 octets\r\nSubject: undeliverable\r\n{NOT_CONNECTED}\r\n",
        "* 1 FETCH (BODY[] {58}\r\nRemote server said: 554 5.2.252 SendAsDenied\r\n\r\n)\r\n",
        f"a2 OK SELECT completed, {NOT_CONNECTED}\r\n",
    ],
)
def test_the_same_words_in_mail_or_a_success_are_not_a_refusal(data: str) -> None:
    watch = FirstLines()
    watch.feed(data.encode())
    assert watch.refusal == ""


def test_only_the_first_lines_are_watched() -> None:
    watch = FirstLines()
    watch.feed(b"* OK\r\n" * 12 + f"-ERR {NOT_CONNECTED}\r\n".encode())
    assert (watch.done, watch.refusal) == (True, "")


def test_a_token_expiry_goodbye_is_found_in_status_replies_only() -> None:
    assert token_expired(b"* BYE Session invalidated - AccessTokenExpired\r\n")
    assert token_expired(b"+OK\r\n-ERR Session invalidated - AccessTokenExpired\r\n")
    assert token_expired(b"421 4.7.0 Session invalidated - AccessTokenExpired\r\n")
    body = b"* 1 FETCH (BODY[] {30}\r\nyour AccessTokenExpired notice\r\n)\r\n* BYE Logging out\r\n"
    assert not token_expired(body)
