"""A person at a web browser, for sign-in tests: follows redirects, fills in and submits the
forms sign-in pages show, until a page without a form (or an error) comes.

The pages of the emulated Entra and Google (tests/support/people.py) and of the real
oidc-provider (tests/support/oidc-provider/server.mjs) ask for the same fields: ``login``
(the account), ``consent`` (``accept`` or ``decline``) and ``user_code`` (a device
sign-in's code). Other fields keep the values the page gave them (hidden fields, CSRF
tokens). A form whose action is on the loopback (the proxy's redirect listener) is submitted
like any other: that is what Entra's ``form_post`` page does with script.

Blocking (httpx's synchronous client, with cookies); run it in a thread beside trio code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Final
from urllib.parse import urljoin

import httpx

if TYPE_CHECKING:
    import ssl

__all__ = ["Browser", "Visit"]

#: Pages followed before giving up (redirects and forms together).
MAX_STEPS: Final = 20


@dataclass
class _Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(_Form(values.get("action", ""), values.get("method", "get").lower()))
        elif tag == "input" and self.forms and values.get("name"):
            self.forms[-1].fields[values["name"]] = values.get("value", "")


@dataclass
class Visit:
    """Where the browser ended: the last response, and every URL it went to."""

    response: httpx.Response
    urls: list[str]


class Browser:
    """Signs in as ``login``, consenting unless ``consent`` is false; ``user_code`` for
    device sign-ins. ``verify`` is the TLS trust for the identity provider. A redirect to an
    address starting with ``stop_at`` is not followed (a browser on another machine than
    the one it is sent to): the visit ends there, the address being its last URL."""

    def __init__(
        self,
        verify: ssl.SSLContext | str,
        *,
        login: str,
        consent: bool = True,
        user_code: str = "",
        stop_at: str = "",
    ) -> None:
        self.login = login
        self.consent = consent
        self.user_code = user_code
        self.stop_at = stop_at
        self._client = httpx.Client(verify=verify, timeout=30, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def open(self, url: str) -> Visit:
        """Go to ``url`` and carry on until a page asks nothing more."""
        urls = [url]
        response = self._client.get(url)
        for _ in range(MAX_STEPS):
            if response.is_redirect:
                target = urljoin(str(response.url), response.headers["location"])
                urls.append(target)
                if self.stop_at and target.startswith(self.stop_at):
                    return Visit(response, urls)
                response = self._client.get(target)
                continue
            parser = _Forms()
            parser.feed(response.text)
            if not parser.forms:
                return Visit(response, urls)
            form = parser.forms[0]
            values = dict(form.fields)
            for name, value in (
                ("login", self.login),
                ("consent", "accept" if self.consent else "decline"),
                ("user_code", self.user_code),
            ):
                if name in values:
                    values[name] = value
            target = urljoin(str(response.url), form.action or str(response.url))
            urls.append(target)
            if form.method == "post":
                response = self._client.post(target, data=values)
            else:
                response = self._client.get(target, params=values)
        raise AssertionError(f"the sign-in did not end within {MAX_STEPS} pages: {urls}")
