"""IMAP and POP3 capability lists: the ones we advertise, and the ones we read from an upstream.

A capability list is a set of atoms (RFC 3501 section 7.2.1, RFC 9051 section 7.2.2),
compared case-insensitively. We never edit an upstream's list as text: we parse it into a
set, ask it questions, and build our own list from scratch (the pre-authentication list a
client sees is always the proxy's, never the upstream's; RFC 3501 section 6.2.1 and
RFC 2595 section 3.1 forbid trusting a list learnt before TLS).

POP3's CAPA response (RFC 2449 section 5) has one capability per line; we parse it the same
way and repeat only whole lines of a few known transaction capabilities.

SMTP's EHLO reply (RFC 5321 section 4.1.1.1) lists service extensions, one per line, each a
keyword and its parameters; we read the upstream's after TLS and repeat a few transaction
extensions in the proxy's own list (:func:`smtp_proxy_extensions`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Generic, TypeVar

from proxy.protocol.sasl import Mechanism

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "IMAP_PASSWORD_MECHANISMS",
    "POP3_SMTP_PASSWORD_MECHANISMS",
    "ImapCapabilities",
    "Pop3Capabilities",
    "SmtpExtensions",
    "imap_proxy_capabilities",
    "pop3_proxy_capabilities",
    "smtp_proxy_extensions",
]

ParamsT = TypeVar("ParamsT")

#: What the proxy itself implements before authentication, in the order we list it.
_BASE: Final = ("IMAP4rev1", "SASL-IR", "LITERAL+", "ID")
#: The SASL mechanisms for passwords: IMAP has LOGIN as a command, so only PLAIN.
IMAP_PASSWORD_MECHANISMS: Final = (Mechanism.PLAIN,)
POP3_SMTP_PASSWORD_MECHANISMS: Final = (Mechanism.PLAIN, Mechanism.LOGIN)


class _Lines(Generic[ParamsT]):
    """A capability list: each capability's name, upper-cased, with what its line says
    besides (nothing for IMAP's atoms); compared by content, asked by name in any case."""

    __slots__ = ("_lines",)

    def __init__(self, lines: tuple[tuple[str, ParamsT], ...] = ()) -> None:
        self._lines = lines

    def __contains__(self, name: str) -> bool:
        return any(tag == name.upper() for tag, _ in self._lines)

    def __bool__(self) -> bool:
        return bool(self._lines)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and other._lines == self._lines

    def __hash__(self) -> int:
        return hash(self._lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({' '.join(tag for tag, _ in self._lines)})"


class ImapCapabilities(_Lines[None]):
    """A parsed capability list (``* CAPABILITY ...`` or a ``[CAPABILITY ...]`` code)."""

    __slots__ = ()

    @classmethod
    def parse(cls, data: bytes) -> ImapCapabilities:
        """Parse the space-separated atoms after ``CAPABILITY`` (bytes that are not ASCII
        are kept as replacement characters, so they can never match a name we look for)."""
        atoms = {atom.upper() for atom in data.decode("ascii", "replace").split(" ") if atom}
        return cls(tuple((atom, None) for atom in sorted(atoms)))

    @property
    def mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms offered (``AUTH=XOAUTH2`` gives ``XOAUTH2``)."""
        return frozenset(atom[5:] for atom, _ in self._lines if atom.startswith("AUTH="))


def imap_proxy_capabilities(
    *, before_tls: bool, mechanisms: Iterable[Mechanism] = IMAP_PASSWORD_MECHANISMS
) -> bytes:
    """The proxy's own list, as sent in the greeting and in ``* CAPABILITY``.

    On a STARTTLS listener before TLS, logins are refused (``LOGINDISABLED``, no
    ``AUTH=``, RFC 3501 section 6.2.3 and 6.2.1); afterwards, and on implicit-TLS or
    plaintext listeners, ``LOGIN`` is offered, and ``AUTHENTICATE`` with each of
    ``mechanisms`` (``AUTH=PLAIN``, then those for app identities).
    """
    if before_tls:
        atoms: tuple[str, ...] = (*_BASE, "STARTTLS", "LOGINDISABLED")
    else:
        atoms = (*_BASE, *(f"AUTH={mechanism.value}" for mechanism in mechanisms))
    return " ".join(atoms).encode("ascii")


# --- POP3 (RFC 2449 section 5 and 6) ---------------------------------------------------------

#: The upstream's capabilities that describe its TRANSACTION state, which the proxy passes on
#: in its own CAPA list once it knows them (RFC 2449 section 6; RFC 2449 section 6.5 and 6.7
#: define the USER suffix of LOGIN-DELAY and EXPIRE for values that may change at login).
#: Everything else (USER, SASL, STLS, RESP-CODES, AUTH-RESP-CODE, APOP-era extensions, UTF8
#: and LANG, whose commands belong to the AUTHORIZATION state) is the proxy's own business.
_POP3_PASSED_ON: Final = ("TOP", "UIDL", "PIPELINING", "EXPIRE", "LOGIN-DELAY")


class Pop3Capabilities(_Lines[bytes]):
    """A parsed CAPA response: one capability per line, a tag and its parameters.

    Tags are compared case-insensitively; each line is kept as received (without its line
    ending) so that parameters reach our client unchanged.
    """

    __slots__ = ()

    @classmethod
    def parse(cls, lines: Iterable[bytes]) -> Pop3Capabilities:
        """Parse the lines between ``+OK`` and ``.``, already dot-unstuffed. Tags that are not
        ASCII keep replacement characters, so they never match a name we look for."""
        parsed = []
        for line in lines:
            tag = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
            if tag:
                parsed.append((tag, line))
        return cls(tuple(parsed))

    @property
    def mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms offered (``SASL PLAIN XOAUTH2`` gives PLAIN and XOAUTH2)."""
        names: set[str] = set()
        for tag, line in self._lines:
            if tag == "SASL":
                names.update(line.decode("ascii", "replace").upper().split()[1:])
        return frozenset(names)

    def passed_on(self) -> tuple[bytes, ...]:
        """The lines the proxy repeats in its own list, in the upstream's order (printable
        ASCII only: nothing else belongs in a capability line)."""
        return tuple(
            line
            for tag, line in self._lines
            if tag in _POP3_PASSED_ON and all(0x20 <= byte < 0x7F for byte in line)
        )


def pop3_proxy_capabilities(
    *,
    before_tls: bool,
    upstream: Pop3Capabilities,
    mechanisms: Iterable[Mechanism] = POP3_SMTP_PASSWORD_MECHANISMS,
) -> bytes:
    """The proxy's CAPA list (the lines between ``+OK`` and ``.``, each ending in CRLF).

    On a STARTTLS listener before TLS: ``STLS`` and no ``USER`` or ``SASL``, so that clients
    do not offer credentials in the clear (RFC 2595 section 4, RFC 8314). Otherwise ``USER``
    and ``SASL`` with ``mechanisms`` (``SASL PLAIN LOGIN``, then those for app identities).
    Always ``RESP-CODES`` and ``AUTH-RESP-CODE`` (our refusals carry ``[AUTH]`` and
    ``[SYS/TEMP]``, RFC 3206), followed by the upstream's transaction capabilities that are
    known so far (see ``_POP3_PASSED_ON``).
    """
    sasl = " ".join(("SASL", *(mechanism.value for mechanism in mechanisms)))
    own = ("STLS",) if before_tls else ("USER", sasl)
    lines = [name.encode("ascii") for name in (*own, "RESP-CODES", "AUTH-RESP-CODE")]
    lines += upstream.passed_on()
    return b"".join(line + b"\r\n" for line in lines)


# --- SMTP (RFC 5321 section 4.1.1.1, RFC 3207, RFC 4954) -----------------------------------

#: The upstream's service extensions that the proxy repeats in its EHLO reply after TLS, in
#: this order. Each describes the mail transaction, which the upstream runs once the relay
#: has begun; before login the proxy itself accepts pipelined commands and uses enhanced
#: status codes, so PIPELINING and ENHANCEDSTATUSCODES hold for the whole session when the
#: upstream has them. Everything else is withheld: AUTH and STARTTLS describe the upstream's
#: login, which is the proxy's business, and the proxy has not vetted the others (DSN, BURL,
#: BINARYMIME, REQUIRETLS...) against its relay.
_SMTP_PASSED_ON: Final = (
    "PIPELINING",
    "SIZE",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "SMTPUTF8",
    "CHUNKING",
)
#: The proxy's own list before TLS on a STARTTLS listener (RFC 3207 section 4.2 has the
#: client forget it after TLS): no AUTH, so that no password is offered in the clear.
_SMTP_BEFORE_TLS: Final = (b"PIPELINING", b"ENHANCEDSTATUSCODES", b"STARTTLS")
#: More digits than this is not a message size (RFC 1870 allows 20).
_SMTP_SIZE_DIGITS: Final = 20


class SmtpExtensions(_Lines[tuple[str, ...]]):
    """The service extensions of a parsed EHLO reply: a keyword and its parameters per line.

    Keywords are compared case-insensitively; bytes that are not ASCII become replacement
    characters, so they never match a name we look for.
    """

    __slots__ = ()

    @classmethod
    def parse(cls, lines: Iterable[bytes]) -> SmtpExtensions:
        """Parse the texts of an EHLO reply's lines after the first (which names the server),
        without their reply codes: ``SIZE 35882577``, ``AUTH PLAIN XOAUTH2``..."""
        parsed = []
        for line in lines:
            words = line.decode("ascii", "replace").split(" ")
            keyword, params = words[0].upper(), tuple(word for word in words[1:] if word)
            if keyword:
                parsed.append((keyword, params))
        return cls(tuple(parsed))

    def params(self, keyword: str) -> tuple[str, ...]:
        """The parameters of the first line with ``keyword`` (empty if there is none)."""
        return next((params for name, params in self._lines if name == keyword.upper()), ())

    @property
    def mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms offered: ``AUTH PLAIN XOAUTH2`` (RFC 4954), and the form
        ``AUTH=PLAIN XOAUTH2`` that servers still list for clients older than RFC 2554."""
        names: set[str] = set()
        for name, params in self._lines:
            if name == "AUTH":
                names.update(param.upper() for param in params)
            elif name.startswith("AUTH="):
                names.update(param.upper() for param in (name[5:], *params) if param)
        return frozenset(names)

    def passed_on(self) -> tuple[bytes, ...]:
        """The lines the proxy repeats (see ``_SMTP_PASSED_ON``), in the proxy's order.

        ``SIZE`` keeps its limit when the limit is a number, and stands alone when the
        upstream declares none (RFC 1870); any other parameter drops the line.
        """
        lines: list[bytes] = []
        for keyword in _SMTP_PASSED_ON:
            if keyword not in self:
                continue
            params = self.params(keyword)
            if keyword == "SIZE" and params:
                limit = params[0]
                if len(params) > 1 or not (limit.isascii() and limit.isdigit()):
                    continue
                if len(limit) > _SMTP_SIZE_DIGITS:
                    continue
                lines.append(f"SIZE {limit}".encode("ascii"))
            else:
                lines.append(keyword.encode("ascii"))
        return tuple(lines)


def smtp_proxy_extensions(
    *,
    before_tls: bool,
    upstream: SmtpExtensions,
    mechanisms: Iterable[Mechanism] = POP3_SMTP_PASSWORD_MECHANISMS,
) -> tuple[bytes, ...]:
    """The extension lines of the proxy's EHLO reply, without reply codes or line endings.

    On a STARTTLS listener before TLS: the proxy's own ``PIPELINING``,
    ``ENHANCEDSTATUSCODES`` and ``STARTTLS``, and no ``AUTH`` (RFC 3207, RFC 4954 section
    4, RFC 8314). Otherwise ``AUTH`` with ``mechanisms`` (``AUTH PLAIN LOGIN``, then those
    for app identities) and what the upstream's list passes on
    (:meth:`SmtpExtensions.passed_on`; an empty ``upstream`` when its list is unknown).
    """
    if before_tls:
        return _SMTP_BEFORE_TLS
    auth = b" ".join((b"AUTH", *(mechanism.value.encode("ascii") for mechanism in mechanisms)))
    return (auth, *upstream.passed_on())
