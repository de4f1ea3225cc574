"""A throwaway PKI for tests: one CA, and leaf certificates written as PEM files.

Keys are ECDSA P-256 unless asked otherwise, as README recommends for listeners: a
handshake signs with the server's key, and a P-256 signature costs a fraction of an RSA
one (``tests/bench/bench_proxy.py --key rsa`` measures the difference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trustme

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["TestPki"]


class TestPki:
    """A trustme CA whose certificates are written under ``directory``.

    ``ca_file`` is what clients must trust; :meth:`issue` writes one PEM file holding the
    private key and the certificate chain, the format our configuration expects.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(
        self, name: str, *identities: str, key_type: trustme.KeyType = trustme.KeyType.ECDSA
    ) -> Path:
        """Issue a server or client certificate; return the combined key+chain PEM path.

        ``key_type``: ECDSA (P-256), or RSA (2048 bits) to compare with.
        """
        names = identities or ("localhost", "127.0.0.1")
        # The first name also as the subject CN: some clients (fetchmail) insist on one.
        leaf = self.ca.issue_cert(*names, common_name=names[0], key_type=key_type)
        path = self.directory / f"{name}.pem"
        with path.open("wb") as out:
            out.write(leaf.private_key_pem.bytes())
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        path.chmod(0o600)
        return path

    def issue_split(self, name: str, *identities: str) -> tuple[Path, Path]:
        """Issue a certificate as separate key and chain files (for servers like Dovecot)."""
        names = identities or ("localhost", "127.0.0.1")
        # The first name also as the subject CN: some clients (fetchmail) insist on one.
        leaf = self.ca.issue_cert(*names, common_name=names[0], key_type=trustme.KeyType.ECDSA)
        key = self.directory / f"{name}.key"
        chain = self.directory / f"{name}.crt"
        leaf.private_key_pem.write_to_path(str(key))
        with chain.open("wb") as out:
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        key.chmod(0o600)
        return key, chain
