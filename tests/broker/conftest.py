"""Fixtures for broker tests: an emulated Entra tenant with two registered apps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.model import App, Secret
from tests.broker.helpers import (
    CERT_CLIENT_ID,
    CLIENT_SECRET,
    SECRET_CLIENT_ID,
    rsa_certificate_pem,
)
from tests.support.entra import EntraEmulator

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def certificate_pem() -> bytes:
    return rsa_certificate_pem()


@pytest.fixture(scope="session")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def idp(
    tmp_path: Path, certificate_pem: bytes, signing_key: rsa.RSAPrivateKey
) -> Iterator[EntraEmulator]:
    with EntraEmulator(tmp_path, signing_key=signing_key) as emulator:
        emulator.register_app(SECRET_CLIENT_ID, secret=CLIENT_SECRET)
        emulator.register_app(CERT_CLIENT_ID, certificate_pem=certificate_pem)
        yield emulator


@pytest.fixture
def secret_app(idp: EntraEmulator) -> App:
    return App(
        name="contoso",
        provider="microsoft",
        client_id=SECRET_CLIENT_ID,
        tenant=idp.tenant,
        client_secret=Secret(CLIENT_SECRET, origin="env CONTOSO_SECRET"),
        authority=idp.authority,
        ca_file=idp.ca_file,
    )


@pytest.fixture
def cert_app(idp: EntraEmulator, certificate_pem: bytes) -> App:
    return App(
        name="contoso-cert",
        provider="microsoft",
        client_id=CERT_CLIENT_ID,
        tenant=idp.tenant_id,
        certificate=Secret(certificate_pem.decode(), origin="file /etc/contoso.pem"),
        authority=idp.authority,
        ca_file=idp.ca_file,
    )
