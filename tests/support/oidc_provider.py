"""A real third-party OAuth 2.0 authorization server for tests: the npm package oidc-provider.

:class:`OidcProvider` runs ``tests/support/oidc-provider/server.mjs`` with the node that its
package.json pins, not the system's (the package and its lock file are committed beside it;
``npm ci`` there installs both, as ``tests/install-deps.sh`` does). Nothing of it is
written here: discovery, client authentication, resource indicators, token formats and
errors are the package's own, so the broker is tested against code that others wrote to
the RFCs.

The server listens on 127.0.0.1 over HTTPS with a certificate from its own :class:`TestPki`
(trust :attr:`ca_file`), asks clients for certificates from that PKI (``tls_client_auth``),
and signs JWT access tokens RS256 with a key made here (:meth:`public_key_pem`, for
Dovecot). It is stopped with the context manager, or when this process dies (its stdin
closes).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from tests.support.certs import TestPki

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

__all__ = ["PACKAGE_DIR", "OidcProvider", "OidcProviderError"]

PACKAGE_DIR: Final = Path(__file__).resolve().parent / "oidc-provider"
_START_TIMEOUT = 30.0


class OidcProviderError(RuntimeError):
    """node or the package is missing, or the server did not start (the message says why)."""


class OidcProvider:
    """oidc-provider serving ``clients`` (RFC 7591 metadata) and ``resources``.

    ``resources`` maps a resource indicator to ``{"scope": "...", "audience": "...",
    "format": "jwt" | "opaque", "typ": "JWT" | None}`` (``typ`` None: RFC 9068's "at+jwt");
    ``default_resource`` is used for requests that name none (without it they get opaque
    tokens with no audience). The JWT assertions of ``issuer_audience_clients`` must name the
    issuer as their audience, as draft-ietf-oauth-rfc7523bis and FAPI 2.0 require; others may
    name the token endpoint too (the package's default). ``people`` are the accounts (e-mail
    addresses) that can sign in to delegated clients, through the pages
    :class:`tests.support.browser.Browser` fills in.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        clients: Sequence[Mapping[str, Any]],
        resources: Mapping[str, Mapping[str, Any]],
        default_resource: str | None = None,
        scopes: Sequence[str] = (),
        issuer_audience_clients: Sequence[str] = (),
        ttl: int = 3600,
        people: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.pki = TestPki(workdir / "pki")
        self.ca_file = self.pki.ca_file
        self.kid = "oidc-provider-test-key"
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.clients = [dict(c) for c in clients]
        self.resources = {k: dict(v) for k, v in resources.items()}
        self.default_resource = default_resource
        self.scopes = list(scopes)
        self.issuer_audience_clients = list(issuer_audience_clients)
        self.ttl = ttl
        self.people = list(people)
        self._process: subprocess.Popen[str] | None = None
        self._issuer: str | None = None
        self._stderr: list[str] = []
        self._drainer = threading.Thread()

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise RuntimeError("oidc-provider is not running: use it in a with statement")
        return self._issuer

    def issue_client_certificate(self, name: str) -> Path:
        """A key and certificate (one PEM file) from the server's PKI, for tls_client_auth;
        the same one for the same name."""
        path = self.pki.directory / f"client-{name}.pem"
        return path if path.is_file() else self.pki.issue(f"client-{name}", name)

    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def stderr(self) -> str:
        return "".join(self._stderr)

    def __enter__(self) -> Self:
        # The node that package.json pins (oidc-provider 9 needs node 20.18 or later; Debian 12
        # ships 18), installed by npm beside the package.
        node = PACKAGE_DIR / "node_modules" / ".bin" / "node"
        if not (node.is_file() and (PACKAGE_DIR / "node_modules" / "oidc-provider").is_dir()):
            raise OidcProviderError(
                f"the npm packages oidc-provider and node are not installed: run `npm ci` in "
                f"{PACKAGE_DIR} (tests/install-deps.sh does)"
            )
        key, chain = self.pki.issue_split("oidc-provider", "127.0.0.1", "localhost")
        private = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        jwk = RSAKey.import_key(private).as_dict(private=True)
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        config = {
            "tls": {"key": str(key), "cert": str(chain), "client_ca": str(self.ca_file)},
            "jwks": {"keys": [jwk]},
            "clients": self.clients,
            "resources": self.resources,
            "default_resource": self.default_resource,
            "scopes": self.scopes,
            "issuer_audience_clients": self.issuer_audience_clients,
            "ttl": self.ttl,
            "people": self.people,
        }
        config_file = self.workdir / "oidc-provider.json"
        descriptor = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump(config, out)
        process = subprocess.Popen(
            [str(node), str(PACKAGE_DIR / "server.mjs"), str(config_file)],
            cwd=PACKAGE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NODE_ENV": "test"},
        )
        self._process = process
        assert process.stderr is not None
        self._drainer = threading.Thread(target=self._drain, args=(process.stderr,), daemon=True)
        self._drainer.start()
        first: list[str] = []
        reader = threading.Thread(
            target=lambda: first.append(process.stdout.readline() if process.stdout else "")
        )
        reader.start()
        reader.join(_START_TIMEOUT)
        line = first[0] if first else ""
        try:
            self._issuer = str(json.loads(line)["issuer"])
        except (ValueError, KeyError, TypeError):
            self.__exit__(None, None, None)
            raise OidcProviderError(
                f"oidc-provider did not start (first line {line!r}):\n{self.stderr()}"
            ) from None
        return self

    def _drain(self, stream: Any) -> None:
        for line in stream:
            self._stderr.append(line)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._drainer.join(10)  # it ends when the process's stderr does
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
