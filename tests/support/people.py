"""The person-facing half of an authorization server, for the emulators in tests.

:class:`SignIns` holds what the emulated Entra (tests/support/entra.py) and the emulated
Google (tests/support/oauth2.py) need to let people sign in to delegated apps: accounts,
their consent per client, device sign-ins (RFC 8628), authorization codes bound to PKCE
challenges (RFC 7636) and refresh tokens, with the ways these end -- declined, expired,
revoked (a changed password), consent withdrawn. The emulators add their own token formats,
error shapes and endpoints.

The pages a person sees are small HTML forms (:func:`form_page`) with the fields
``login`` (the account), ``consent`` (``accept`` or ``decline``) and ``user_code``, which
:class:`tests.support.browser.Browser` fills in. A browser sign-in that ends with
``response_mode=form_post`` gets a page whose form posts the answer to the redirect URI, as
Entra's does with script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlencode, urlsplit

__all__ = ["Page", "Person", "PersonError", "SignIn", "SignIns", "form_page"]

#: How long an authorization code lives (seconds).
CODE_LIFETIME: Final = 600


class PersonError(Exception):
    """A refusal at the token endpoint: the RFC 6749/8628 ``error`` and a description."""

    def __init__(self, error: str, description: str, *, reason: str = "") -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        #: Why, in the emulator's terms: revoked, consent, expired, declined, reused...
        self.reason = reason or error


@dataclass
class Person:
    login: str
    #: A stable identifier (Entra's oid, Google's sub).
    subject: str
    #: Refresh tokens issued before this moment are refused (a password change).
    valid_after: float = 0.0
    #: Scopes each client may use for this person.
    consents: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class SignIn:
    """What a finished sign-in or a renewal grants: who, which client, which scopes."""

    login: str
    client_id: str
    scopes: tuple[str, ...]
    nonce: str = ""
    issued_at: float = field(default_factory=time.time)


@dataclass
class _Device:
    client_id: str
    scopes: tuple[str, ...]
    user_code: str
    expires_at: float
    #: pending, approved, declined, redeemed
    status: str = "pending"
    login: str = ""


@dataclass
class _Code:
    sign_in: SignIn
    redirect_uri: str
    challenge: str
    method: str
    expires_at: float


@dataclass
class _Request:
    """A browser sign-in waiting for the person (between the page and its form)."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str
    challenge: str
    method: str
    nonce: str
    response_mode: str


@dataclass
class Page:
    """An answer to the person's browser: HTML, or a redirect (``location``)."""

    status: int
    html: str = ""
    location: str = ""


def form_page(title: str, action: str, fields: dict[str, str], *, hidden: dict[str, str]) -> str:
    """A page with one form posting to ``action``: visible ``fields`` (name to label) and
    ``hidden`` values."""
    inputs = "".join(
        f'<label>{html.escape(label)} <input type="text" name="{html.escape(name)}"></label>\n'
        for name, label in fields.items()
    )
    inputs += "".join(
        f'<input type="hidden" name="{html.escape(n)}" value="{html.escape(v)}">\n'
        for n, v in hidden.items()
    )
    return (
        f"<!DOCTYPE html>\n<html><head><title>{html.escape(title)}</title></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<form method="post" action="{html.escape(action)}">\n{inputs}'
        '<button type="submit">Continue</button>\n</form>\n</body></html>\n'
    )


def _message_page(title: str, text: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>\n"
    )


def loopback_match(registered: str, actual: str) -> bool:
    """RFC 8252 section 7.3: a loopback redirect URI matches whatever its port."""
    a, b = urlsplit(registered), urlsplit(actual)
    return (a.scheme, a.hostname, a.path or "/") == (b.scheme, b.hostname, b.path or "/")


class SignIns:
    """Accounts, consent, and the grants people make. Thread-safe.

    ``rotate``: each renewal returns a new refresh token (the old one stays valid, as with
    Entra). ``device_interval`` is the polling interval device sign-ins are given.
    """

    def __init__(self, *, rotate: bool, device_interval: int = 1) -> None:
        self.rotate = rotate
        self.device_interval = device_interval
        self.device_lifetime = 900
        #: The next this many device polls are answered slow_down.
        self.slow_downs = 0
        #: Every device poll: (device code's user code, answer error or "issued").
        self.polls: list[tuple[str, str]] = []
        #: Every refresh token redeemed, in order (the test's view of renewals).
        self.renewals: list[str] = []
        self._lock = threading.Lock()
        self._people: dict[str, Person] = {}
        self._devices: dict[str, _Device] = {}
        self._requests: dict[str, _Request] = {}
        self._codes: dict[str, _Code] = {}
        self._all_codes: list[str] = []
        self._refresh: dict[str, SignIn] = {}

    # -- what tests do ------------------------------------------------------------------------

    def add_person(self, login: str, subject: str | None = None) -> Person:
        with self._lock:
            person = Person(login.lower(), subject or secrets.token_hex(8))
            self._people[login.lower()] = person
            return person

    def person(self, login: str) -> Person | None:
        with self._lock:
            return self._people.get(login.lower())

    def change_password(self, login: str) -> None:
        """Every refresh token of ``login`` issued so far is refused from now on."""
        with self._lock:
            self._people[login.lower()].valid_after = time.time() + 0.001

    def withdraw_consent(self, login: str, client_id: str) -> None:
        with self._lock:
            self._people[login.lower()].consents.pop(client_id, None)

    def refresh_tokens_of(self, login: str) -> list[str]:
        with self._lock:
            return [t for t, s in self._refresh.items() if s.login == login.lower()]

    def secrets_issued(self) -> list[str]:
        """Every device code, authorization code and refresh token issued so far (what a
        secrets scan looks for)."""
        with self._lock:
            return [*self._devices, *self._all_codes, *self._refresh]

    # -- the device sign-in ---------------------------------------------------------------------

    def start_device(self, client_id: str, scopes: tuple[str, ...]) -> tuple[str, _Device]:
        device_code = secrets.token_urlsafe(32)
        user_code = "".join(secrets.choice(string.ascii_uppercase) for _ in range(8))
        device = _Device(client_id, scopes, user_code, time.time() + self.device_lifetime)
        with self._lock:
            self._devices[device_code] = device
        return device_code, device

    def device_page(self, action: str) -> Page:
        return Page(
            200,
            form_page(
                "Enter the code",
                action,
                {"user_code": "Code", "login": "Account", "consent": "accept or decline"},
                hidden={},
            ),
        )

    def device_submit(self, form: dict[str, str]) -> Page:
        code = form.get("user_code", "").strip().upper()
        with self._lock:
            found = next(
                (
                    d
                    for d in self._devices.values()
                    if d.user_code == code and d.status == "pending"
                ),
                None,
            )
            person = self._people.get(form.get("login", "").lower())
            if found is None:
                return Page(400, _message_page("Unknown code", "That code is not valid."))
            if person is None:
                return Page(400, _message_page("Unknown account", "No such account."))
            if form.get("consent") != "accept":
                found.status = "declined"
                return Page(200, _message_page("Declined", "You declined the sign-in."))
            found.status, found.login = "approved", person.login
            person.consents.setdefault(found.client_id, set()).update(found.scopes)
        return Page(200, _message_page("Signed in", "You may close this window."))

    def poll_device(self, device_code: str, client_id: str) -> SignIn:
        with self._lock:
            device = self._devices.get(device_code)
            if device is None or device.client_id != client_id or device.status == "redeemed":
                raise PersonError("bad_verification_code", "The device code is not valid.")
            if time.time() >= device.expires_at:
                self.polls.append((device.user_code, "expired_token"))
                raise PersonError("expired_token", "The device code has expired.")
            if self.slow_downs:
                self.slow_downs -= 1
                self.polls.append((device.user_code, "slow_down"))
                raise PersonError("slow_down", "Polling too often.")
            if device.status == "pending":
                self.polls.append((device.user_code, "authorization_pending"))
                raise PersonError("authorization_pending", "The user has not finished yet.")
            if device.status == "declined":
                self.polls.append((device.user_code, "access_denied"))
                raise PersonError("access_denied", "The user declined.", reason="declined")
            device.status = "redeemed"
            self.polls.append((device.user_code, "issued"))
            return SignIn(device.login, client_id, device.scopes)

    # -- the browser sign-in -------------------------------------------------------------------

    def authorize_page(self, params: dict[str, str], action: str, *, require_pkce: bool) -> Page:
        """The sign-in page for a valid request (the caller checked client and redirect)."""
        if params.get("response_type") != "code":
            return Page(400, _message_page("Bad request", "response_type must be code"))
        method = params.get("code_challenge_method", "plain")
        if require_pkce and (not params.get("code_challenge") or method != "S256"):
            return Page(400, _message_page("Bad request", "PKCE with S256 is required"))
        request_id = secrets.token_urlsafe(16)
        with self._lock:
            self._requests[request_id] = _Request(
                params["client_id"],
                params["redirect_uri"],
                tuple(params.get("scope", "").split()),
                params.get("state", ""),
                params.get("code_challenge", ""),
                method,
                params.get("nonce", ""),
                params.get("response_mode", "query"),
            )
        return Page(
            200,
            form_page(
                "Sign in",
                action,
                {"login": "Account", "consent": "accept or decline"},
                hidden={"request": request_id},
            ),
        )

    def authorize_submit(self, form: dict[str, str]) -> Page:
        with self._lock:
            request = self._requests.pop(form.get("request", ""), None)
            person = self._people.get(form.get("login", "").lower())
            if request is None:
                return Page(400, _message_page("Expired", "Start the sign-in again."))
            if person is None:
                return Page(400, _message_page("Unknown account", "No such account."))
            answer: dict[str, str]
            if form.get("consent") != "accept":
                answer = {
                    "error": "access_denied",
                    "error_description": "The user declined to consent to access the app.",
                }
            else:
                person.consents.setdefault(request.client_id, set()).update(request.scopes)
                code = secrets.token_urlsafe(32)
                self._all_codes.append(code)
                self._codes[code] = _Code(
                    SignIn(person.login, request.client_id, request.scopes, request.nonce),
                    request.redirect_uri,
                    request.challenge,
                    request.method,
                    time.time() + CODE_LIFETIME,
                )
                answer = {"code": code}
        if request.state:
            answer["state"] = request.state
        if request.response_mode == "form_post":
            # Entra's page submits this form with script; the test's browser does it.
            return Page(
                200,
                form_page("Working...", request.redirect_uri, {}, hidden=answer),
            )
        separator = "&" if "?" in request.redirect_uri else "?"
        return Page(302, location=request.redirect_uri + separator + urlencode(answer))

    def redeem_code(self, code: str, client_id: str, redirect_uri: str, verifier: str) -> SignIn:
        with self._lock:
            grant = self._codes.pop(code, None)
        if grant is None or grant.sign_in.client_id != client_id:
            raise PersonError("invalid_grant", "The authorization code is not valid.")
        if time.time() >= grant.expires_at:
            raise PersonError("invalid_grant", "The authorization code has expired.")
        if grant.redirect_uri != redirect_uri:
            raise PersonError("invalid_grant", "redirect_uri differs from the request's.")
        if grant.challenge:
            digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
            computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            if grant.method != "S256" or not secrets.compare_digest(computed, grant.challenge):
                raise PersonError("invalid_grant", "The code_verifier does not match.")
        return grant.sign_in

    # -- refresh tokens ------------------------------------------------------------------------

    def issue_refresh_token(self, sign_in: SignIn) -> str:
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._refresh[token] = sign_in
        return token

    def renew(self, refresh_token: str, client_id: str) -> SignIn:
        """The sign-in a refresh token stands for, if it is still good."""
        with self._lock:
            self.renewals.append(refresh_token)
            sign_in = self._refresh.get(refresh_token)
            if sign_in is None or sign_in.client_id != client_id:
                raise PersonError("invalid_grant", "The refresh token is not valid.")
            person = self._people.get(sign_in.login)
            if person is None or sign_in.issued_at < person.valid_after:
                raise PersonError(
                    "invalid_grant",
                    "The refresh token was revoked: the password changed.",
                    reason="revoked",
                )
            consented = person.consents.get(client_id, set())
            if not set(sign_in.scopes) <= consented:
                raise PersonError(
                    "invalid_grant",
                    "The user has not consented to the application.",
                    reason="consent",
                )
            return SignIn(sign_in.login, client_id, sign_in.scopes, issued_at=sign_in.issued_at)
