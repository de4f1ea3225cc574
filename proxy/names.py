"""Login names and mailbox addresses: how they compare, and which ones are refused.

Two strings name the same login or mailbox when they are equal but for the case of ASCII
letters. Unicode case folding is not used: it makes different strings equal
(``reports@conto\\u017fo.com``, with U+017F LONG S, folds to ``reports@contoso.com``, and the Kelvin
sign to ``k``), so a client could log in as one spelling and have another one sent upstream.

A mailbox a client names (a SASL authorization identity, an XOAUTH2 ``user=``) must be a
plain address: one ``@`` between a local part and a domain, without spaces, backslashes,
quotes, ``*``, control or invisible formatting characters (Unicode category Cf: bidi
overrides that make a name display as another, zero-width characters). The mailbox the
proxy then sends upstream is the configured spelling when the client named a configured
address, and the client's own string only when it matched a pattern, ``*`` standing for any
run of characters within the local part or within the domain, never across the ``@``.
"""

from __future__ import annotations

import string
import unicodedata
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "fold_case",
    "has_format_characters",
    "is_plain_address",
    "match_mailbox",
    "pattern_matches",
]

_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
#: RFC 5322 atext without ``*`` (it stands for a wildcard here), plus the dot.
_LOCAL_SPECIALS: Final = frozenset("!#$%&'+-/=?^_`{|}~.")
_DOMAIN_SPECIALS: Final = frozenset("-.")


def fold_case(text: str) -> str:
    """``text`` with ASCII letters in lower case, every other character unchanged."""
    return text.translate(_ASCII_LOWER)


def has_format_characters(text: str) -> bool:
    """Does ``text`` hold an invisible formatting character (Unicode category Cf)?"""
    return any(unicodedata.category(c) == "Cf" for c in text)


def _plain_part(part: str, specials: frozenset[str]) -> bool:
    return bool(part) and all(c.isalnum() or c in specials for c in part)


def is_plain_address(text: str) -> bool:
    """``local@domain`` of letters, digits and the usual address punctuation, nothing else."""
    local, at, domain = text.rpartition("@")
    return (
        bool(at)
        and _plain_part(local, _LOCAL_SPECIALS)
        and _plain_part(domain, _DOMAIN_SPECIALS)
        and not domain.startswith(".")
        and not domain.endswith(".")
        and ".." not in domain
    )


def _glob(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters; everything else matches itself."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == text
    if not (text.startswith(parts[0]) and text.endswith(parts[-1])):
        return False
    position, end = len(parts[0]), len(text) - len(parts[-1])
    for part in parts[1:-1]:
        found = text.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return position <= end


def pattern_matches(pattern: str, address: str) -> bool:
    """Does ``pattern`` (an address, or one with ``*`` in its local part or domain) match
    ``address``, ignoring the case of ASCII letters? ``*`` never matches an ``@``."""
    local_pattern, at_pattern, domain_pattern = fold_case(pattern).rpartition("@")
    local, at, domain = fold_case(address).rpartition("@")
    if not (at_pattern and at) or "@" in local:
        return False
    return _glob(local_pattern, local) and _glob(domain_pattern, domain)


def match_mailbox(patterns: Iterable[str], wanted: str) -> str | None:
    """The mailbox to open for a client that asked for ``wanted``, or ``None`` if no
    pattern allows it: the configured spelling of an address it names, or ``wanted`` itself
    if it matched a pattern with ``*`` (then it must be a plain address)."""
    folded = fold_case(wanted)
    patterns = list(patterns)
    for pattern in patterns:
        if "*" not in pattern and fold_case(pattern) == folded:
            return pattern
    if not is_plain_address(wanted) or has_format_characters(wanted):
        return None
    for pattern in patterns:
        if "*" in pattern and pattern_matches(pattern, wanted):
            return wanted
    return None
