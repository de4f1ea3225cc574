"""IMAP capability lists: the one we advertise, and the ones we read from an upstream.

A capability list is a set of atoms (RFC 3501 section 7.2.1, RFC 9051 section 7.2.2),
compared case-insensitively. We never edit an upstream's list as text: we parse it into a
set, ask it questions, and build our own list from scratch (the pre-authentication list a
client sees is always the proxy's, never the upstream's; RFC 3501 section 6.2.1 and
RFC 2595 section 3.1 forbid trusting a list learnt before TLS).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ImapCapabilities",
    "imap_proxy_capabilities",
]

#: What the proxy itself implements before authentication, in the order we list it.
_BASE: Final = ("IMAP4rev1", "SASL-IR", "LITERAL+", "ID")


class ImapCapabilities:
    """A parsed capability list (``* CAPABILITY ...`` or a ``[CAPABILITY ...]`` code)."""

    __slots__ = ("_atoms",)

    def __init__(self, atoms: frozenset[str] = frozenset()) -> None:
        self._atoms = atoms

    @classmethod
    def parse(cls, data: bytes) -> ImapCapabilities:
        """Parse the space-separated atoms after ``CAPABILITY`` (bytes that are not ASCII
        are kept as replacement characters, so they can never match a name we look for)."""
        text = data.decode("ascii", "replace")
        return cls(frozenset(atom.upper() for atom in text.split(" ") if atom))

    def __contains__(self, name: str) -> bool:
        return name.upper() in self._atoms

    def __bool__(self) -> bool:
        return bool(self._atoms)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImapCapabilities) and other._atoms == self._atoms

    def __hash__(self) -> int:
        return hash(self._atoms)

    def __repr__(self) -> str:
        return f"ImapCapabilities({' '.join(sorted(self._atoms))})"

    @property
    def mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms offered (``AUTH=XOAUTH2`` gives ``XOAUTH2``)."""
        return frozenset(atom[5:] for atom in self._atoms if atom.startswith("AUTH="))


def imap_proxy_capabilities(*, before_tls: bool) -> bytes:
    """The proxy's own list, as sent in the greeting and in ``* CAPABILITY``.

    On a STARTTLS listener before TLS, logins are refused (``LOGINDISABLED``, no
    ``AUTH=``, RFC 3501 section 6.2.3 and 6.2.1); afterwards, and on implicit-TLS or
    plaintext listeners, ``LOGIN`` and ``AUTHENTICATE PLAIN`` (RFC 4616) are offered.
    """
    atoms = (*_BASE, "STARTTLS", "LOGINDISABLED") if before_tls else (*_BASE, "AUTH=PLAIN")
    return " ".join(atoms).encode("ascii")
