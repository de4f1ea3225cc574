"""``xoauth2-proxy authorize``: the person behind a user of a delegated app signs in once.

The sign-in runs here, in the terminal (:mod:`broker.signin`): by default the device sign-in
-- a URL and a code to enter there, in any browser, on any device -- and with ``--browser``
the authorization-code grant with PKCE, whose answer comes back to a listener on this
machine's loopback (or is pasted: when the browser runs elsewhere, its redirect to this
machine fails, but its address bar shows where it was sent). Google allows Gmail's scope
only in the browser sign-in, so that is the default for Google apps.

What it keeps -- the refresh token, sealed in the configured token cache -- is what the
proxy renews the user's tokens with, from its next look at the cache (logins waiting on a
missing sign-in look every few seconds). The person must sign in as the user's account
(``account``, or its mailbox): another account is refused and nothing is kept.

It must run as the user the proxy runs as: the token cache is a private file of that user
(or a Redis the proxy reaches); the command refuses, with the ``sudo -u`` to use, to create
the cache file as another user.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import TYPE_CHECKING, Final, TextIO

import trio

from broker.cache import CacheError, open_cache
from broker.delegated import SignInFailed
from broker.errors import BrokerError
from broker.signin import browser_sign_in, device_sign_in, sign_in
from broker.source import CachingTokenSource, SignInState

if TYPE_CHECKING:
    from broker.delegated import (
        AuthorizationRequest,
        DelegatedProvider,
        DeviceAuthorization,
        Renewal,
    )
    from proxy.config import Config

__all__ = ["DEFAULT_TIMEOUT", "authorize_command", "run"]

#: Seconds the person has to sign in.
DEFAULT_TIMEOUT: Final = 900.0

EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2


def authorize_command(config: Config) -> str:
    """The command that signs a user of ``config`` in (followed by the login name)."""
    return f"xoauth2-proxy authorize -c {config.path.absolute()}"


def run(
    config: Config,
    login: str,
    *,
    method: str = "",
    port: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    stdin: TextIO | None = None,
) -> int:
    """Sign ``login`` in; the exit code. ``method`` is ``device``, ``browser`` or empty (the
    app's default); ``stdin``, if given, is read for a pasted address (browser sign-in)."""
    user = config.user(login)
    if user is None:
        print(f"{config.path}: users: no user {login!r}", file=err)
        return EXIT_CONFIG
    app = config.apps[user.app]
    if not app.delegated:
        print(
            f"{config.path}: apps.{user.app}: not a delegated app (delegated = true): its "
            "tokens are the app's own, nobody signs in to it",
            file=err,
        )
        return EXIT_CONFIG
    problem = _cache_owner_problem(config)
    if problem:
        print(problem, file=err)
        return EXIT_FAILURE
    try:
        cache = open_cache(config.cache)
    except ValueError as exc:
        print(f"{config.path}: cache: {exc}", file=err)
        return EXIT_CONFIG
    try:
        source = CachingTokenSource(
            {user.app: app},
            cache=cache,
            close_cache=True,
            authorize_command=authorize_command(config),
        )
    except ValueError as exc:
        cache.close()
        print(f"{config.path}: apps.{user.app}: {exc}", file=err)
        return EXIT_CONFIG
    chosen = method or ("browser" if app.provider == "google" else "device")
    signing_in = functools.partial(
        _sign_in,
        source,
        user.app,
        user.signs_in_as,
        login=user.login,
        method=chosen,
        redirect_uri=app.redirect_uri,
        port=port,
        out=out,
        err=err,
        stdin=stdin,
    )

    async def within_deadline() -> int:
        with trio.move_on_after(timeout):
            return await signing_in()
        print(f"no sign-in within {timeout:g} s; run authorize again", file=err)
        return EXIT_FAILURE

    try:
        return trio.run(within_deadline)
    finally:
        source.close()


async def _sign_in(
    source: CachingTokenSource,
    app: str,
    account: str,
    *,
    login: str,
    method: str,
    redirect_uri: str,
    port: int,
    out: TextIO,
    err: TextIO,
    stdin: TextIO | None,
) -> int:
    before = await source.sign_in_status(app, account)
    if before.state is SignInState.UNKNOWN:
        print(f"cannot use the token cache: {before.reason}", file=err)
        return EXIT_FAILURE
    if before.state is SignInState.SIGNED_IN:
        print(
            f"{account} is signed in already (as {before.signed_in_as}); a new sign-in "
            "replaces that one.",
            file=out,
        )

    def show_device(authorization: DeviceAuthorization) -> None:
        minutes = max(1, round((authorization.expires_at - time.time()) / 60))
        print(
            f"To sign in as {account} for user {login!r}, open\n\n    "
            f"{authorization.verification_uri}\n\nin any browser, on any device, and enter "
            f"the code\n\n    {authorization.user_code}\n",
            file=out,
        )
        if authorization.verification_uri_complete:
            print(f"(or open {authorization.verification_uri_complete})\n", file=out)
        print(f"Waiting for the sign-in (the code expires in {minutes} min)...", file=out)
        out.flush()

    def show_browser(request: AuthorizationRequest) -> None:
        listen = request.redirect_uri.split("//", 1)[-1].split("/", 1)[0]
        forward = f"forward that port first (ssh -L {listen.rsplit(':', 1)[-1]}:{listen} this-host)"
        elsewhere = (
            f"either {forward}, or sign in there and paste here the address the browser ends "
            "on (it may show an error page: the address is what counts)"
            if request.in_address
            else f"{forward}: the answer is posted to that address, not shown in it"
        )
        print(
            f"To sign in as {account} for user {login!r}, open this address in a browser "
            f"on this machine:\n\n    {request.url}\n\nThe answer comes back to {listen} "
            f"here. With a browser on another machine, {elsewhere}.\n",
            file=out,
        )
        print("Waiting for the sign-in...", file=out)
        out.flush()

    async def flow(provider: DelegatedProvider) -> Renewal:
        if method == "device":
            return await device_sign_in(provider, show=show_device)
        if stdin is None:
            return await browser_sign_in(
                provider, redirect_uri=redirect_uri, show=show_browser, port=port
            )
        send, receive = trio.open_memory_channel[str](4)
        # The sign-in's outcome leaves the nursery as itself, not in an ExceptionGroup.
        outcome: list[Renewal] = []
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_lines, stdin, send)
            try:
                outcome.append(
                    await browser_sign_in(
                        provider,
                        redirect_uri=redirect_uri,
                        show=show_browser,
                        port=port,
                        pasted=receive,
                    )
                )
            except BaseException as exc:  # re-raised below
                failure.append(exc)
            finally:
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]
        return outcome[0]

    try:
        done = await sign_in(source, app, account, flow)
    except OSError as exc:  # the loopback listener's port
        print(f"cannot listen for the browser's answer: {exc}", file=err)
        return EXIT_FAILURE
    except (BrokerError, CacheError) as exc:
        kind = "sign-in failed" if isinstance(exc, SignInFailed) else "no sign-in"
        code = f" [{exc.code}]" if isinstance(exc, BrokerError) and exc.code else ""
        print(f"{kind}: {exc}{code}", file=err)
        if isinstance(exc, BrokerError) and exc.fix:
            print(f"fix: {exc.fix}", file=err)
        if isinstance(exc, CacheError):
            print("fix: run authorize as the user the proxy runs as", file=err)
        return EXIT_FAILURE
    print(
        f"Signed in as {done.signed_in_as} for user {login!r}. The proxy renews the user's "
        "tokens with this sign-in from now on.",
        file=out,
    )
    return 0


async def _read_lines(stdin: TextIO, send: trio.MemorySendChannel[str]) -> None:
    """Lines typed or pasted on ``stdin``, until it ends (a worker thread reads them)."""
    async with send:
        while True:
            line = await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            await send.send(line)


def _cache_owner_problem(config: Config) -> str:
    """Why this process must not write the configured cache file: running as root, it
    would create (or find) a file the proxy's own user cannot use."""
    path = config.cache.path
    if config.cache.kind != "file" or path is None or os.geteuid() != 0:
        return ""
    try:
        owner = path.parent.stat().st_uid
        if path.exists():
            owner = path.stat().st_uid
    except OSError:
        return ""
    if owner == 0:
        return ""
    try:
        import pwd

        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return (
        f"{config.path}: cache.path: {path} belongs to {name}, the user the proxy runs as; "
        f"run authorize as that user: sudo -u {name} xoauth2-proxy authorize -c "
        f"{config.path.absolute()} ..."
    )
