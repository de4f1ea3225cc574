"""How login names and mailboxes compare, and which mailbox names a client may use."""

from __future__ import annotations

import pytest

from proxy.names import (
    fold_case,
    has_format_characters,
    is_plain_address,
    match_mailbox,
    pattern_matches,
)


@pytest.mark.parametrize(
    ("pattern", "address", "matches"),
    [
        ("erp-*@contoso.com", "erp-7@contoso.com", True),
        ("erp-*@contoso.com", "ceo-reports@contoso.com", False),  # the prefix matters
        ("*-erp@contoso.com", "ceo-reports@contoso.com", False),  # and the suffix
        ("ab*b*c@x.com", "abc@x.com", False),  # a middle part after the prefix, not in it
        ("a*b*b*c@x.com", "abbc@x.com", True),  # each middle part at its first place
        ("*b*@x.com", "bxx@x.com", True),  # a middle part right at the start
        ("*aa*aa*@x.com", "aaa@x.com", False),  # parts do not overlap
        ("*aa*aa*@x.com", "aaaa@x.com", True),
        ("*@*", "a@b@c", False),  # one @ only
        ("*@*", "nodomain", False),
        ("nodomain", "nodomain", False),  # a pattern without @ matches nothing
        ("*@Contoso.COM", "Scans@contoso.com", True),
        ("*@contoso.com", "scans@conto\u017fo.com", False),  # no Unicode case folding
    ],
)
def test_pattern_matches(pattern: str, address: str, matches: bool) -> None:
    assert pattern_matches(pattern, address) is matches


def test_folding_only_ascii() -> None:
    assert fold_case("Reports@Contoso.COM") == "reports@contoso.com"
    assert fold_case("\u212a") == "\u212a"  # the Kelvin sign stays itself
    assert fold_case("\u017f") == "\u017f"


@pytest.mark.parametrize(
    ("address", "plain"),
    [
        ("reports@contoso.com", True),
        ("o'brien+tag@contoso.com", True),
        ("j\u00fcrgen@m\u00fcnchen.de", True),
        ("@contoso.com", False),
        ("reports@", False),
        ("reports", False),
        ("rep orts@contoso.com", False),
        ("x\\ceo@contoso.com", False),
        ('"x"@contoso.com', False),
        ("x*@contoso.com", False),
        ("x@contoso..com", False),
        ("x@.contoso.com", False),
        ("x@contoso.com.", False),
        ("x@y@contoso.com", False),
    ],
)
def test_plain_addresses(address: str, plain: bool) -> None:
    assert is_plain_address(address) is plain


def test_format_characters() -> None:
    assert has_format_characters("a\u200bb")
    assert has_format_characters("\u202e")
    assert not has_format_characters("reports@contoso.com")


def test_the_mailbox_a_client_names() -> None:
    policy = ["Reports@Contoso.com", "erp-*@contoso.com"]
    assert match_mailbox(policy, "REPORTS@contoso.com") == "Reports@Contoso.com"
    assert match_mailbox(policy, "erp-1@contoso.com") == "erp-1@contoso.com"
    assert match_mailbox(policy, "erp-1\u200b@contoso.com") is None
    assert match_mailbox(policy, "erp-a b@contoso.com") is None
    assert match_mailbox(policy, "ceo@contoso.com") is None
