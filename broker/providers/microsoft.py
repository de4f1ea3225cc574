"""Microsoft Entra ID: app-only tokens (client-credentials grant) through msal.

Theory of operation
-------------------
msal is blocking, so :meth:`MicrosoftProvider.fetch` runs it in a worker thread
(``trio.to_thread.run_sync``); nothing here blocks the event loop. One
``msal.ConfidentialClientApplication`` is built per provider, lazily and in a worker thread,
because msal's constructor already does network I/O (OIDC discovery of the tenant); a failed
build is retried on the next fetch.

We configure msal deliberately:

- **No msal token cache.** ``acquire_token_for_client`` answers from msal's in-memory cache
  until five minutes before expiry. Our cache (:mod:`broker.source`) refreshes earlier (ten
  minutes by default, which Microsoft's high-volume SMTP needs), so msal's cache would hand the
  same old token back to every early refresh. Every fetch is therefore one token request.
- **No msal HTTP cache.** msal memorises HTTP 400 answers for 60 s and 429/5xx answers for their
  Retry-After (5 s without one) and replays them without asking the IdP. Retry policy is the
  caller's, so every fetch really asks.
- **Our own http_client.** msal accepts any object with requests-like ``get``/``post`` returning
  ``status_code``, ``text`` and ``headers``. :class:`_MsalHttpClient` adapts an
  ``httpx.Client`` (system trust store plus ``App.ca_file``, explicit timeouts, no redirects)
  and raises on 5xx/429 itself, because msal turns a 5xx into an exception that has lost the
  Retry-After header.
- ``instance_discovery=False`` (no call to login.microsoftonline.com to validate the authority,
  so sovereign clouds, private IdPs and the test emulator work) and ``azure_region=False`` (no
  regional endpoint, whatever ``MSAL_FORCE_REGION``/``REGION_NAME`` say).

Sovereign clouds are reached through ``App.authority`` (the host, without the tenant): US
Government (GCC High, DoD) ``https://login.microsoftonline.us``, with the Exchange scope
``https://outlook.office365.us/.default``; China, operated by 21Vianet,
``https://login.partner.microsoftonline.cn`` (MSAL's older name for it,
``https://login.chinacloudapi.cn``, also answers), with ``https://partner.outlook.cn/.default``.
The default is the global cloud, ``https://login.microsoftonline.com``.

A certificate credential whose certificate has expired fails at once, without asking Entra,
with the steps to replace it.

Failures become :class:`~broker.errors.PermanentTokenError` (the configuration or the tenant
must change: wrong secret, unknown app or tenant, unregistered certificate...) with the AADSTS
code and a concrete fix, or :class:`~broker.errors.TemporaryTokenError` (network, timeouts,
HTTP 5xx and 429, Entra's transient codes) with ``retry_after`` when the IdP said. Messages never
contain the secret, the client assertion or a token.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import urlencode

import httpx
import msal
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.claims import check_token, expectations_for, is_tenant_id
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError, token_mismatch
from broker.model import AccessToken
from broker.providers._http import CONNECT_TIMEOUT, IO_TIMEOUT, exception_chain, tls_context
from broker.providers._http import MAX_RETRY_AFTER as MAX_RETRY_AFTER
from broker.providers._http import retry_after as _retry_after
from broker.providers._http import transport_error as _transport_error
from broker.providers._keys import load_private_key, pkcs8_pem

if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path
    from types import TracebackType

    from broker.claims import Expectations
    from broker.model import App

__all__ = ["MicrosoftProvider", "classify_entra_error"]

#: Used when a token response has no ``expires_in`` (Entra always sends one).
_FALLBACK_LIFETIME: Final = 300
_MULTI_TENANT: Final = frozenset({"common", "organizations", "consumers"})
_AADSTS: Final = re.compile(r"AADSTS(\d+)")

_REGISTRATION = "Microsoft Entra admin center > App registrations > the app"

#: AADSTS codes that no retry will fix, with what the operator should do.
_PERMANENT: Final[dict[int, str]] = {
    7000215: (
        "The client secret is wrong. Copy the secret's *Value* (not its Secret ID) from "
        f"{_REGISTRATION} > Certificates & secrets into client_secret."
    ),
    7000222: (
        "The client secret has expired. Create a new one under "
        f"{_REGISTRATION} > Certificates & secrets and update client_secret."
    ),
    7000218: "The request carried no credential: configure client_secret or certificate.",
    700016: (
        "The tenant has no application with this client_id. Check client_id (the "
        "'Application (client) ID') and tenant, and that the app is registered or consented "
        "in that tenant."
    ),
    90002: (
        "The tenant does not exist. Check tenant: the directory (tenant) ID or a verified "
        "domain such as contoso.onmicrosoft.com, and the authority's cloud."
    ),
    900023: "The tenant value is not a valid domain or GUID. Check tenant.",
    700027: (
        "The certificate is not accepted. Upload this certificate (public part) under "
        f"{_REGISTRATION} > Certificates & secrets, and check that the PEM's private key "
        "belongs to it."
    ),
    700021: "The client assertion names another app: check client_id.",
    700024: (
        "The client assertion is outside its validity window: this machine's clock is wrong. "
        "Synchronise it (NTP)."
    ),
    50049: "The authority is unknown or invalid. Check authority (or remove it for the default).",
    50012: "The client credential was rejected. Check the certificate or secret and client_id.",
    1002012: (
        "The scope is invalid. App-only tokens need a resource scope ending in /.default, "
        "e.g. https://outlook.office365.com/.default."
    ),
    70011: (
        "The scope is invalid. App-only tokens need a resource scope ending in /.default, "
        "e.g. https://outlook.office365.com/.default."
    ),
    500011: (
        "The resource in scope is not in this tenant. Check scope; for Exchange Online use "
        "https://outlook.office365.com/.default."
    ),
    7000112: "The application is disabled in the tenant. Re-enable its enterprise application.",
    7000114: "The application is disabled in the tenant. Re-enable its enterprise application.",
    53003: "Conditional Access blocked the app. Review the tenant's Conditional Access policies.",
    700025: "The app is registered as a public client. Register it as a confidential (web) app.",
    9002331: (
        'The app registration accepts personal Microsoft accounts only: set tenant = "consumers".'
    ),
    50194: (
        "The app registration accepts accounts of its own tenant only: set tenant to that "
        'tenant\'s ID or domain instead of "common" or "organizations", or let it accept '
        f"accounts of other directories ({_REGISTRATION} > Authentication > Supported "
        "account types)."
    ),
}

#: AADSTS codes Entra documents as transient.
_TRANSIENT: Final = frozenset({90033, 90024, 50196, 80001})
_TRANSIENT_ERRORS: Final = frozenset({"temporarily_unavailable", "server_error"})


class MicrosoftProvider:
    """Fetches app-only access tokens for one Entra app registration.

    Construction parses the credential (no I/O; ``ValueError`` with a clear message for a
    bad PEM or app). Call :meth:`close` (or use ``with``) to release the connection pool.
    """

    def __init__(
        self,
        app: App,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        if app.provider != "microsoft":
            raise ValueError(f"app {app.name!r}: provider is {app.provider!r}, not 'microsoft'")
        if not app.tenant:
            raise ValueError(f"app {app.name!r}: tenant is required for Microsoft Entra")
        if app.tenant.lower() in _MULTI_TENANT and not app.delegated:
            raise ValueError(
                f"app {app.name!r}: tenant {app.tenant!r} cannot issue app-only tokens; "
                "use the tenant's ID or domain"
            )
        if not app.authority.startswith("https://"):
            # The client secret or assertion would cross the network in the clear.
            raise ValueError(f"app {app.name!r}: authority must be an https:// URL")
        self._app = app
        self._secrets: tuple[str, ...] = ()
        #: None: a public client (delegated apps only), which has no credential.
        self._credential: str | dict[str, str] | None = None
        #: When the certificate credential stops being valid (UTC), if there is one.
        self._not_after: datetime | None = None
        if app.certificate is not None:
            self._credential, self._not_after = _certificate_credential(app)
            self._secrets = (self._credential["private_key"],)
        elif app.client_secret is not None:
            self._credential = app.client_secret.reveal()
            self._secrets = (self._credential,)
        elif not app.delegated:
            raise ValueError(f"app {app.name!r}: needs client_secret or certificate")
        self._http = _MsalHttpClient(
            ca_file=app.ca_file, connect_timeout=connect_timeout, io_timeout=io_timeout
        )
        self._lock = threading.Lock()
        self._msal: msal.ClientApplication | None = None
        #: What tokens must say, once the tenant's ID is known.
        self._expected: Expectations | None = None

    def __repr__(self) -> str:
        return f"MicrosoftProvider(app={self._app.name!r}, tenant={self._app.tenant!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool. A fetch still running in a thread then fails."""
        self._http.close()

    async def expectations(self) -> Expectations:
        """What every token must say: ``tid`` the tenant's ID (learned from Entra's tenant
        discovery once, when the tenant is a domain), ``aud`` the resource of the scope."""
        if self._expected is not None:
            await trio.lowlevel.checkpoint()
            return self._expected
        return await trio.to_thread.run_sync(self._expectations_blocking, abandon_on_cancel=True)

    async def fetch(self) -> AccessToken:
        """Request a new token from Entra (always a network request: see the module doc).

        The work runs in a worker thread. If the caller is cancelled, the call returns at once
        and the thread finishes in the background (bounded by the HTTP timeouts); its result
        is discarded. That is safe: the msal application and the HTTP client are thread-safe.
        """
        return await trio.to_thread.run_sync(self._fetch_blocking, abandon_on_cancel=True)

    # -- the worker thread ------------------------------------------------------------------

    def _fetch_blocking(self) -> AccessToken:
        started = time.time()
        if self._not_after is not None and self._not_after.timestamp() <= started:
            assert self._app.certificate is not None
            raise PermanentTokenError(
                f"{self._where()}: the certificate ({self._app.certificate.origin}) expired on "
                f"{self._not_after:%Y-%m-%d %H:%M} UTC",
                code="CERTIFICATE_EXPIRED",
                fix="Create a new certificate, upload its public part under "
                f"{_REGISTRATION} > Certificates & secrets, and replace the PEM file (key and "
                "certificate). Entra refuses assertions signed with an expired certificate.",
            )
        try:
            result = self._client().acquire_token_for_client(scopes=[self._app.scope])
        except BrokerError:
            raise
        except _HttpStatusError as exc:
            raise self._status_error(exc) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        except ValueError as exc:
            # msal's JSON parsing of a token response that is not JSON.
            raise TemporaryTokenError(
                self._scrub(
                    f"{self._where()}: the token endpoint answered with something that "
                    f"is not an OAuth 2.0 JSON response ({type(exc).__name__})"
                ),
                fix="Check authority: it must be the identity provider's base URL.",
            ) from None
        if "access_token" not in result:
            raise classify_entra_error(result, where=self._where(), scrub=self._scrub)
        expires_in = result.get("expires_in")
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = _FALLBACK_LIFETIME
        token = AccessToken(
            value=str(result["access_token"]),
            expires_at=started + float(expires_in),
            scope=self._app.scope,
        )
        problems = check_token(self._expectations_blocking(), token)
        if problems:
            raise token_mismatch(self._where(), problems)
        return token

    def _expectations_blocking(self) -> Expectations:
        if self._expected is not None:
            return self._expected
        tenant_id = ""
        if not is_tenant_id(self._app.tenant):
            try:
                tenant_id = str(self._client().authority.tenant)
            except _HttpStatusError as exc:
                raise self._status_error(exc) from None
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from None
            if not is_tenant_id(tenant_id):
                raise PermanentTokenError(
                    f"{self._where()}: the tenant's ID is not known: the authority's metadata "
                    f"names the tenant {tenant_id!r}, not a directory ID",
                    code="TENANT_ID",
                    fix="Set tenant to the directory (tenant) ID, a GUID, shown on the "
                    "Overview page of Microsoft Entra ID.",
                )
        self._expected = expectations_for(self._app, tenant_id=tenant_id.lower())
        return self._expected

    def _client(self) -> msal.ClientApplication:
        with self._lock:
            if self._msal is None:
                self._msal = self._build()
            return self._msal

    def _build(self) -> msal.ClientApplication:
        app = self._app
        options: dict[str, Any] = {
            "authority": f"{app.authority.rstrip('/')}/{app.tenant}",
            "token_cache": _NoTokenCache(),
            "http_client": self._http,
            "http_cache": _ForgetfulMapping(),
            "instance_discovery": False,
        }
        try:
            if self._credential is None:
                return msal.PublicClientApplication(app.client_id, **options)
            return msal.ConfidentialClientApplication(
                app.client_id,
                client_credential=self._credential,
                azure_region=msal.ClientApplication.DISABLE_MSAL_FORCE_REGION,
                **options,
            )
        except (BrokerError, _HttpStatusError, httpx.HTTPError):
            raise
        except (ValueError, RuntimeError) as exc:
            # Tenant discovery failed: msal wraps the IdP's answer in a ValueError whose
            # context holds the response text, where Entra names an AADSTS code.
            code = _first_code(exc)
            text = _PERMANENT.get(code or 0) if code is not None else None
            raise PermanentTokenError(
                self._scrub(
                    f"{self._where()}: tenant discovery failed"
                    + (f" with AADSTS{code}" if code is not None else "")
                    + f" at {app.authority.rstrip('/')}/{app.tenant}/v2.0/.well-known/"
                    "openid-configuration"
                ),
                code=f"AADSTS{code}" if code is not None else None,
                fix=text
                or "Check authority and tenant: the URL above must serve an OpenID configuration.",
            ) from None

    def _status_error(self, exc: _HttpStatusError) -> BrokerError:
        detail = _oauth_error(exc.body)
        code = _first_code_in(detail)
        kind = "throttled the request" if exc.status == 429 else "failed"
        wait = f"; retry after {exc.retry_after:g} s" if exc.retry_after is not None else ""
        message = f"{self._where()}: the identity provider {kind} (HTTP {exc.status}"
        if code is not None:
            message += f", AADSTS{code}"
        message += f") on {exc.path}{wait}"
        return TemporaryTokenError(
            self._scrub(message),
            code=f"AADSTS{code}" if code is not None else f"HTTP {exc.status}",
            fix="Nothing to change: the broker retries. If it persists, check "
            "https://status.cloud.microsoft and the tenant's service health.",
            retry_after=exc.retry_after,
        )

    def _transport_error(self, exc: httpx.HTTPError) -> BrokerError:
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return PermanentTokenError(
                f"{self._where()}: authority {self._app.authority!r} is not an https:// URL",
                fix="Set authority to the IdP's base URL, e.g. https://login.microsoftonline.com.",
            )
        return _transport_error(
            exc,
            where=self._where(),
            peer="the identity provider",
            trust_fix="Trust the IdP's CA: install it in the system store or set ca_file to a "
            "PEM file holding it. If an HTTPS proxy intercepts traffic, trust its CA.",
            network_fix="Check DNS, routing, firewalls and proxies (HTTPS_PROXY) between this "
            f"host and {self._app.authority}.",
            scrub=self._scrub,
        )

    def _where(self) -> str:
        return f"app {self._app.name!r} (tenant {self._app.tenant}, client {self._app.client_id})"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "<redacted>")
        return text


def classify_entra_error(
    result: dict[str, Any], *, where: str, scrub: Callable[[str], str] | None = None
) -> BrokerError:
    """Turn msal's error result (Entra's error JSON) into a broker error.

    ``where`` names the app in the message; ``scrub`` removes secrets from it.
    """
    error = str(result.get("error") or "unknown_error")
    description = str(result.get("error_description") or "")
    code = _first_code_in(result)
    first_line = description.splitlines()[0].strip() if description else error
    ids = ", ".join(
        f"{k}={result[k]}" for k in ("trace_id", "correlation_id", "timestamp") if result.get(k)
    )
    message = f"{where}: Entra refused the token request: {error}: {first_line}"
    if ids:
        message += f" ({ids})"
    if scrub is not None:
        message = scrub(message)
    code_text = f"AADSTS{code}" if code is not None else None
    if error in _TRANSIENT_ERRORS or (code is not None and code in _TRANSIENT):
        return TemporaryTokenError(
            message, code=code_text, fix="Nothing to change: the broker retries."
        )
    fix = _PERMANENT.get(code or 0) if code is not None else None
    if fix is None:
        fix = (
            f"See https://login.microsoftonline.com/error?code={code} for this code."
            if code is not None
            else "Check the app registration, tenant and credential."
        )
    return PermanentTokenError(message, code=code_text, fix=fix)


# -- msal plumbing -------------------------------------------------------------------------


class _HttpStatusError(Exception):
    """HTTP 5xx or 429 from the IdP; carries what msal would drop (Retry-After, body)."""

    def __init__(self, status: int, path: str, retry_after: float | None, body: str) -> None:
        super().__init__(f"HTTP {status} on {path}")
        self.status = status
        self.path = path
        self.retry_after = retry_after
        self.body = body


class _MsalHttpClient:
    """The ``http_client`` msal calls: requests-like ``get``/``post`` over ``httpx.Client``.

    Trusts the system store plus ``ca_file``; explicit timeouts; no redirects; no keep-alive;
    honours HTTPS_PROXY/NO_PROXY. ``httpx.Client`` is safe to share between threads.
    """

    def __init__(self, *, ca_file: Path | None, connect_timeout: float, io_timeout: float) -> None:
        self._client = httpx.Client(
            verify=tls_context(ca_file),
            timeout=httpx.Timeout(io_timeout, connect=connect_timeout),
            # One token request an hour gains nothing from keep-alive, and no idle pooled
            # socket is left for the garbage collector if the owner never calls close().
            limits=httpx.Limits(max_keepalive_connections=0),
            follow_redirects=False,
        )

    def get(
        self,
        url: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: object,
    ) -> httpx.Response:
        return self._checked(self._client.get(url, params=params, headers=headers))

    def post(
        self,
        url: str,
        params: dict[str, str] | None = None,
        data: dict[str, object] | str | bytes | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: object,
    ) -> httpx.Response:
        if isinstance(data, dict):
            # Encode the form as requests does. httpx would send a bytes value (msal's client
            # assertion is bytes) as its repr, "b'eyJ...'", and drop None differently.
            data = urlencode({k: v for k, v in data.items() if v is not None}, doseq=True)
            headers = {**(headers or {}), "Content-Type": "application/x-www-form-urlencoded"}
        response = self._client.post(url, params=params, content=data, headers=headers)
        return self._checked(response)

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code == 429 or response.status_code >= 500:
            raise _HttpStatusError(
                response.status_code,
                response.url.path,
                _retry_after(response.headers.get("Retry-After")),
                response.text,
            )
        return response


class _NoTokenCache(msal.TokenCache):  # type: ignore[misc]
    """An msal token cache that keeps nothing: msal always asks the IdP (we cache)."""

    def add(self, event: dict[str, Any], now: float | None = None) -> None:
        return None


class _ForgetfulMapping(MutableMapping[str, object]):
    """msal's ``http_cache`` that forgets everything, so msal never replays an HTTP answer."""

    def __getitem__(self, key: str) -> object:
        raise KeyError(key)

    def __setitem__(self, key: str, value: object) -> None:
        return None

    def __delitem__(self, key: str) -> None:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


# -- helpers -------------------------------------------------------------------------------


def _certificate_credential(app: App) -> tuple[dict[str, str], datetime]:
    """msal's certificate credential from the app's PEM (private key + certificate chain),
    and when the certificate expires."""
    assert app.certificate is not None
    origin = app.certificate.origin
    key = load_private_key(app, app.certificate, "certificate")
    try:
        chain = x509.load_pem_x509_certificates(app.certificate.reveal().encode("utf-8"))
    except ValueError:
        raise ValueError(
            f"app {app.name!r}: certificate ({origin}) holds no PEM certificate"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"app {app.name!r}: certificate ({origin}) holds a key that is not RSA "
            f"({type(key).__name__}); Entra accepts only RSA certificates for client assertions"
        )
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != (
        key.public_key().public_bytes(serialization.Encoding.DER, public)
    ):
        raise ValueError(
            f"app {app.name!r}: in certificate ({origin}) the first certificate does not "
            "belong to the private key; put the app's certificate first, then its issuers"
        )
    credential = {
        "private_key": pkcs8_pem(key).decode("ascii"),
        # Entra's x5t: SHA-1 of the DER certificate, as shown in the Entra portal.
        "thumbprint": leaf.fingerprint(hashes.SHA1()).hex().upper(),
        # Sent as x5c, so subject name + issuer authentication works too.
        "public_certificate": "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain
        ),
    }
    return credential, leaf.not_valid_after_utc


def _oauth_error(body: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _first_code_in(result: dict[str, Any]) -> int | None:
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes and isinstance(codes[0], int):
        return codes[0]
    match = _AADSTS.search(str(result.get("error_description") or ""))
    return int(match.group(1)) if match else None


def _first_code(exc: BaseException) -> int | None:
    for link in exception_chain(exc):
        match = _AADSTS.search(str(link))
        if match:
            return int(match.group(1))
    return None
