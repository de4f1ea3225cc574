"""TLS contexts for both sides of the proxy, and a friendly description of TLS failures."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import trio

from proxy.config import ClientCertificates
from proxy.net.tlssocket import TlsSocketStream

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["client_side_context", "describe_tls_error", "peer_certificate", "upstream_context"]


def client_side_context(
    certificate: Path,
    *,
    client_ca_file: Path | None = None,
    client_certificates: ClientCertificates = ClientCertificates.NONE,
) -> ssl.SSLContext:
    """The context our listeners present to legacy clients.

    ``certificate`` is one PEM file holding the private key and the certificate chain.
    TLS 1.2 is the floor: legacy clients older than that are not worth a downgrade.
    Client certificates, when asked for, must chain to ``client_ca_file`` and only to it:
    the system trust store is never used for them, since anyone can get a certificate from
    a public CA.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.2 renegotiation from clients: nothing needs it, it has a history of attacks,
    # and with TLS on the socket (tlssocket.py) OpenSSL would hold it until a pending
    # write finished.
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.load_cert_chain(certificate)
    if client_certificates is not ClientCertificates.NONE:
        if client_ca_file is None:
            raise ValueError("client certificates need a client_ca_file")
        context.load_verify_locations(cafile=client_ca_file)
        context.verify_mode = (
            ssl.CERT_REQUIRED
            if client_certificates is ClientCertificates.REQUIRED
            else ssl.CERT_OPTIONAL
        )
    return context


def upstream_context(ca_file: Path | None) -> ssl.SSLContext:
    """The context for the upstream mail server: certificate and host name always checked,
    against the system trust store plus ``ca_file`` when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def describe_tls_error(exc: BaseException) -> str:
    """One line for the log saying what went wrong in a handshake."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"TLS handshake failed: {exc}"


def peer_certificate(stream: trio.abc.Stream) -> bytes | None:
    """The certificate (DER) the peer presented in ``stream``'s finished handshake, already
    verified by it; ``None`` if it presented none or ``stream`` is not TLS. Read it right
    after the handshake: once the connection breaks, the TLS object may no longer say."""
    der: object = None
    try:
        if isinstance(stream, TlsSocketStream):
            der = stream.socket.getpeercert(binary_form=True)
        elif isinstance(stream, trio.SSLStream):
            der = stream.getpeercert(binary_form=True)
    except (ValueError, trio.NeedHandshakeError):  # the handshake did not finish
        return None
    return der if isinstance(der, bytes) else None
