"""Signing a person in: the device sign-in and the browser sign-in with a loopback redirect.

Theory of operation
-------------------
:func:`sign_in` runs one interactive sign-in for an account of a delegated app and keeps
its result in the token source's store (:meth:`~broker.source.CachingTokenSource.
complete_sign_in`), but only after checking that the person signed in *as that account*:
the ID token's or UserInfo's ``email`` (when not marked unverified), ``preferred_username``
or ``upn`` must be it (:func:`~broker.delegated.matching_account`). Anything else -- another
account, or one the identity provider does not name -- is refused and nothing is stored.

**Device sign-in** (RFC 8628, :func:`device_sign_in`): the provider gets a device code and a
user code; ``show`` tells the person where to enter the user code; then the token endpoint is
polled every ``interval`` seconds (the server's, five more after each ``slow_down``, section
3.5) until the person is done, declines, or the codes expire. A temporary failure of one poll
(network, HTTP 5xx) is retried at the next interval. The device code is a secret: it is never
shown.

**Browser sign-in** (RFC 6749 section 4.1 with PKCE, RFC 8252 section 7.3,
:func:`browser_sign_in`): a listener on the loopback interface, on a port chosen now unless
one is given, receives the redirect. Each connection carries one HTTP/1.1 request, parsed
with h11 within :data:`REQUEST_TIMEOUT` and at most :data:`MAX_REQUEST` bytes; the redirect
comes as a GET (the answer in the query) or, for ``response_mode=form_post``, as a POST
(the answer in the body). Only requests for the redirect path that carry ``state`` count,
and ``state`` must equal the one sent, compared in constant time: an answer with another
``state`` (a forged or stale redirect) is refused with HTTP 400 and logged, and the
listener keeps waiting for the real one. The person may also paste the address the browser
was sent to (``pasted``: when the browser runs on another machine, its redirect to this
machine's loopback fails, but the address bar shows it), which is checked the same way.
The caller sets the overall deadline.
"""

from __future__ import annotations

import html
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, urlsplit, urlunsplit

import h11
import trio

from broker.delegated import (
    AuthorizationRequest,
    DelegatedProvider,
    DeviceAuthorization,
    Pending,
    Renewal,
    SignInFailed,
    account_names,
    matching_account,
)
from broker.errors import TemporaryTokenError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from broker.source import CachingTokenSource

__all__ = [
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "SLOW_DOWN_STEP",
    "LoopbackRedirect",
    "SignedIn",
    "browser_sign_in",
    "device_sign_in",
    "parse_redirect",
    "sign_in",
]

log = logging.getLogger("xoauth2_proxy.signin")

#: RFC 8628 section 3.5: seconds added to the polling interval at each ``slow_down``.
SLOW_DOWN_STEP: Final = 5.0
#: Seconds a connection to the loopback listener has to send its whole request.
REQUEST_TIMEOUT: Final = 10.0
#: Largest request (head and body) the loopback listener reads.
MAX_REQUEST: Final = 65536
#: Connections the loopback listener serves at once (browsers open a few speculatively).
MAX_CONNECTIONS: Final = 16

_PAGE: Final = (
    "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>xoauth2-proxy</title></head>"
    "<body><h1>{title}</h1><p>{text}</p></body></html>\n"
)


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A sign-in that was kept: the account it is for, and the name it was verified by."""

    account: str
    signed_in_as: str


async def sign_in(
    source: CachingTokenSource,
    app: str,
    account: str,
    flow: Callable[[DelegatedProvider], Awaitable[Renewal]],
) -> SignedIn:
    """Run ``flow`` (a :func:`device_sign_in` or :func:`browser_sign_in` with its options
    bound) for ``account`` of ``app``; check who signed in, and keep the sign-in.

    :class:`~broker.delegated.SignInFailed` if the person signed in as someone else or
    cannot be identified, or the flow failed; broker errors from the identity provider;
    :class:`~broker.cache.CacheError` if the store cannot keep the sign-in.
    """
    provider = source.provider(app)
    renewal = await flow(provider)
    if not renewal.refresh_token:
        raise SignInFailed(
            f"app {app!r}: the sign-in gave no refresh token, so the proxy could not renew "
            "its tokens",
            code="NO_REFRESH_TOKEN",
            fix="Let the client get refresh tokens: allow it the refresh_token grant and "
            "the offline_access scope (Google: an OAuth client of type 'Desktop app').",
        )
    identity = await provider.identity(renewal)
    matched = matching_account(identity, account)
    if matched is None:
        names = account_names(identity)
        if not names:
            raise SignInFailed(
                f"app {app!r}: the identity provider does not say who signed in (no email, "
                "preferred_username or upn), so the sign-in cannot be checked against "
                f"{account}",
                code="ACCOUNT_UNKNOWN",
                fix="Let the client have the openid and email scopes (and, for a server "
                "without ID tokens, a UserInfo endpoint: userinfo_url).",
            )
        raise SignInFailed(
            f"app {app!r}: signed in as {' / '.join(names)}, not as {account}; nothing was kept",
            code="WRONG_ACCOUNT",
            fix=f"Sign in as {account} (a browser already signed in to another account "
            "signs in with it: use a private window, or choose 'use another account').",
        )
    await source.complete_sign_in(app, account, renewal, signed_in_as=matched)
    return SignedIn(account.lower(), matched)


# -- the device sign-in -------------------------------------------------------------------


async def device_sign_in(
    provider: DelegatedProvider,
    *,
    show: Callable[[DeviceAuthorization], None],
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = trio.sleep,
) -> Renewal:
    """The device authorization grant: ``show`` the codes, poll until done.

    ``clock`` is the wall clock the codes' expiry is measured by; ``sleep`` waits between
    polls (tests record the intervals with it).
    """
    authorization = await provider.start_device_sign_in()
    show(authorization)
    while True:
        await sleep(authorization.interval)
        if clock() >= authorization.expires_at:
            raise SignInFailed(
                "the code expired before the sign-in was finished",
                code="expired_token",
                fix="Run authorize again and enter the new code sooner.",
            )
        try:
            outcome = await provider.poll_device_sign_in(authorization)
        except TemporaryTokenError as exc:
            log.warning("asking whether the sign-in is done failed (%s); asking again", exc)
            continue
        if isinstance(outcome, Pending):
            if outcome.slow_down:
                authorization.interval += SLOW_DOWN_STEP
            continue
        return outcome


# -- the browser sign-in ------------------------------------------------------------------


class LoopbackRedirect:
    """Where the browser sign-in's answer arrives: ``redirect_uri`` with the listener's port.

    Open it with :meth:`open` (binds the listener), serve with :meth:`receive`.
    """

    def __init__(self, redirect_uri: str, *, port: int = 0) -> None:
        parts = urlsplit(redirect_uri)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(
                f"redirect_uri {redirect_uri!r} must be http://127.0.0.1 or http://localhost "
                "(a loopback address, RFC 8252 section 7.3)"
            )
        self._template = parts
        self._wanted_port = parts.port or port
        self._path = parts.path or "/"
        self._listeners: list[trio.SocketListener] = []
        self.redirect_uri = ""

    async def open(self) -> str:
        """Bind the listener; the redirect URI to send (with the port)."""
        listeners = await trio.open_tcp_listeners(self._wanted_port, host="127.0.0.1")
        self._listeners = list(listeners)
        port = self._listeners[0].socket.getsockname()[1]
        host = self._template.hostname or "127.0.0.1"
        self.redirect_uri = urlunsplit(("http", f"{host}:{port}", self._path, "", ""))
        return self.redirect_uri

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.aclose()
        self._listeners = []

    async def receive(
        self, state: str, pasted: trio.MemoryReceiveChannel[str] | None
    ) -> dict[str, str]:
        """The redirect's parameters whose ``state`` is ``state``: from the browser, or
        pasted. Other requests are answered and ignored."""
        send, answers = trio.open_memory_channel[dict[str, str]](1)
        async with trio.open_nursery() as nursery:
            for listener in self._listeners:
                nursery.start_soon(self._accept, listener, state, send)
            if pasted is not None:
                nursery.start_soon(self._read_pasted, pasted, state, send)
            answer = await answers.receive()
            nursery.cancel_scope.cancel()
        return answer

    async def _accept(
        self,
        listener: trio.SocketListener,
        state: str,
        answers: trio.MemorySendChannel[dict[str, str]],
    ) -> None:
        limit = trio.Semaphore(MAX_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            while True:
                await limit.acquire()
                try:
                    stream = await listener.accept()
                except BaseException:
                    limit.release()
                    raise
                nursery.start_soon(self._serve, stream, state, answers, limit)

    async def _serve(
        self,
        stream: trio.SocketStream,
        state: str,
        answers: trio.MemorySendChannel[dict[str, str]],
        limit: trio.Semaphore,
    ) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                async with stream:
                    await self._exchange(stream, state, answers)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            limit.release()

    async def _exchange(
        self,
        stream: trio.SocketStream,
        state: str,
        answers: trio.MemorySendChannel[dict[str, str]],
    ) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(4096))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_REQUEST:
                        await _respond(stream, connection, 413, "Too large", "")
                        return
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:
            await _respond(stream, connection, 400, "Bad request", "")
            return
        if request is None:
            return
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        if path != self._path:
            await _respond(stream, connection, 404, "Not found", "")
            return
        text = query if request.method == b"GET" else body.decode("latin-1")
        verdict, params = _judge(text, state)
        if verdict:
            await _respond(stream, connection, 400, "Not this sign-in", verdict)
            return
        await _respond(
            stream,
            connection,
            200,
            "Received",
            "xoauth2-proxy has the answer of the sign-in; return to the terminal for the "
            "result. You may close this window.",
        )
        await answers.send(params)

    async def _read_pasted(
        self,
        pasted: trio.MemoryReceiveChannel[str],
        state: str,
        answers: trio.MemorySendChannel[dict[str, str]],
    ) -> None:
        async for line in pasted:
            line = line.strip()
            if not line:
                continue
            verdict, params = _judge(urlsplit(line).query, state)
            if verdict:
                log.warning("the pasted address is not this sign-in's answer: %s", verdict)
                continue
            await answers.send(params)
            return


def parse_redirect(text: str) -> dict[str, str]:
    """The parameters of a redirect (a query string or form body); ``ValueError`` if a
    parameter repeats (RFC 6749 section 3.1: parameters must not be included twice)."""
    parsed = parse_qs(text, keep_blank_values=True, max_num_fields=64)
    if any(len(values) != 1 for values in parsed.values()):
        raise ValueError("a parameter appears more than once")
    return {name: values[0] for name, values in parsed.items()}


def _judge(text: str, state: str) -> tuple[str, dict[str, str]]:
    """Why ``text`` is not this sign-in's answer (empty: it is), and its parameters."""
    try:
        params = parse_redirect(text)
    except ValueError as exc:
        return f"malformed answer: {exc}", {}
    if "code" not in params and "error" not in params:
        return "no code or error in it", {}
    received = params.get("state", "")
    if not secrets.compare_digest(received.encode(), state.encode()):
        log.warning(
            "a sign-in answer with another state arrived and was refused (a stale or forged "
            "redirect); still waiting for this sign-in's"
        )
        return "its state does not match this sign-in", {}
    return "", params


async def _respond(
    stream: trio.SocketStream, connection: h11.Connection, status: int, title: str, text: str
) -> None:
    page = _PAGE.format(title=html.escape(title), text=html.escape(text)).encode()
    headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(page))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ]
    try:
        data = connection.send(h11.Response(status_code=status, headers=headers))
        data = (data or b"") + (connection.send(h11.Data(data=page)) or b"")
        data += connection.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return
    await stream.send_all(data)


async def browser_sign_in(
    provider: DelegatedProvider,
    *,
    redirect_uri: str,
    show: Callable[[AuthorizationRequest], None],
    port: int = 0,
    pasted: trio.MemoryReceiveChannel[str] | None = None,
) -> Renewal:
    """The authorization-code grant with PKCE: listen on the loopback, ``show`` the URL,
    redeem the answer whose ``state`` matches (see the module)."""
    redirect = LoopbackRedirect(redirect_uri, port=port)
    await redirect.open()
    try:
        request = await provider.authorization_request(redirect.redirect_uri)
        show(request)
        response: Mapping[str, str] = await redirect.receive(request.state, pasted)
    finally:
        await redirect.aclose()
    return await provider.redeem(request, response)
