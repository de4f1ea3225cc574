"""The PROXY protocol header: versions 1 and 2, measured and parsed whole, one byte at a
time and with the client's bytes behind it; anything else is a ProxyHeaderError."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.proxy_header import (
    MAX_V1,
    SIGNATURE_V2,
    ProxyCommand,
    ProxyHeader,
    ProxyHeaderError,
    crc32c,
    encode_v1,
    encode_v2,
    header_length,
    parse_header,
)

CLIENT_BYTES = b"\x16\x03\x01\x02\x00ClientHello..."


def read(data: bytes, *, max_size: int = 4096) -> tuple[ProxyHeader, bytes]:
    """What a driver does: measure, take exactly the header, parse; the rest is the client's."""
    length = header_length(data, max_size=max_size)
    assert length is not None, "incomplete"
    return parse_header(data[:length]), data[length:]


def read_bytewise(data: bytes) -> tuple[ProxyHeader, bytes]:
    """One byte at a time, as a trickling balancer sends it: never more than the header."""
    for end in range(1, len(data) + 1):
        length = header_length(data[:end])
        if length is not None and length <= end:
            return parse_header(data[:length]), data[length:]
    raise AssertionError("never complete")


def v2(command: int, family: int, body: bytes, tlvs: bytes = b"") -> bytes:
    payload = body + tlvs
    return SIGNATURE_V2 + bytes([command, family]) + struct.pack("!H", len(payload)) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


IPV4_BODY = bytes([192, 0, 2, 10, 10, 0, 0, 5]) + struct.pack("!HH", 51234, 993)

VALID = [
    (
        b"PROXY TCP4 192.0.2.10 10.0.0.5 51234 993\r\n",
        ProxyHeader(1, ProxyCommand.PROXY, ("192.0.2.10", 51234), ("10.0.0.5", 993)),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
        ProxyHeader(1, ProxyCommand.PROXY, ("2001:db8::1", 65535), ("2001:db8::2", 0)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, ProxyCommand.LOCAL)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, ProxyCommand.LOCAL)),
    (
        v2(0x21, 0x11, IPV4_BODY),
        ProxyHeader(2, ProxyCommand.PROXY, ("192.0.2.10", 51234), ("10.0.0.5", 993)),
    ),
    (
        v2(
            0x21,
            0x21,
            bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 1, 2),
        ),
        ProxyHeader(2, ProxyCommand.PROXY, ("::1", 1), ("::2", 2)),
    ),
    (v2(0x20, 0x00, b""), ProxyHeader(2, ProxyCommand.LOCAL)),
    (v2(0x20, 0x11, IPV4_BODY), ProxyHeader(2, ProxyCommand.LOCAL)),  # health check
    (v2(0x21, 0x00, b""), ProxyHeader(2, ProxyCommand.LOCAL)),  # unspecified: own addresses
    (v2(0x21, 0x31, bytes(216)), ProxyHeader(2, ProxyCommand.LOCAL)),  # Unix sockets
    (  # an internationalised host name, UTF-8 as the specification says
        v2(0x21, 0x11, IPV4_BODY, tlv(0x02, "mail.bücher.example".encode())),
        ProxyHeader(
            2,
            ProxyCommand.PROXY,
            ("192.0.2.10", 51234),
            ("10.0.0.5", 993),
            authority="mail.bücher.example",
        ),
    ),
    (
        v2(
            0x21,
            0x11,
            IPV4_BODY,
            tlv(0x01, b"imap")
            + tlv(0x02, b"mail.contoso.com")
            + tlv(0x04, bytes(7))  # NOOP, skipped
            + tlv(0x05, b"id-1")
            + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))  # SSL, skipped
            + tlv(0xEE, b"custom"),
        ),
        ProxyHeader(
            2,
            ProxyCommand.PROXY,
            ("192.0.2.10", 51234),
            ("10.0.0.5", 993),
            alpn=b"imap",
            authority="mail.contoso.com",
            unique_id=b"id-1",
        ),
    ),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_valid_headers_whole_bytewise_and_with_trailing_bytes(
    header: bytes, expected: ProxyHeader
) -> None:
    assert read(header) == (expected, b"")
    assert read_bytewise(header) == (expected, b"")
    assert read(header + CLIENT_BYTES) == (expected, CLIENT_BYTES)
    assert read_bytewise(header + CLIENT_BYTES) == (expected, CLIENT_BYTES)


def with_crc(header: bytes) -> bytes:
    """``header`` plus a CRC32C TLV computed as the specification says (over the whole
    header with the checksum's own bytes zero)."""
    placeholder = tlv(0x03, bytes(4))
    grown = bytearray(header + placeholder)
    grown[14:16] = struct.pack("!H", len(grown) - 16)
    checksum = crc32c(bytes(grown))
    grown[-4:] = struct.pack("!I", checksum)
    return bytes(grown)


def test_crc32c_is_checked() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    good = with_crc(v2(0x21, 0x11, IPV4_BODY))
    assert read(good)[0].source == ("192.0.2.10", 51234)
    bad = bytearray(good)
    bad[20] ^= 1  # a changed address
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        read(bytes(bad))


INVALID = [
    pytest.param(b"GET / HTTP/1.1\r\n", id="not-a-header"),
    pytest.param(b"* OK IMAP4rev1\r\n", id="imap-greeting"),
    pytest.param(b"\x16\x03\x01\x02\x00", id="tls-client-hello"),
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.5 51234\r\n", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.5 51234 993 x\r\n", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 2001:db8::1 10.0.0.5 1 2\r\n", id="v1-wrong-family"),
    pytest.param(b"PROXY TCP6 192.0.2.1 10.0.0.5 1 2\r\n", id="v1-v4-as-tcp6"),
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.5 65536 993\r\n", id="v1-port-range"),
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.5 0993 993\r\n", id="v1-leading-zero"),
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.5 +1 993\r\n", id="v1-signed-port"),
    pytest.param(b"PROXY TCP4  192.0.2.10 10.0.0.5 1 2\r\n", id="v1-double-space"),
    pytest.param(b"PROXY UDP4 192.0.2.10 10.0.0.5 1 2\r\n", id="v1-udp"),
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.5 1 2\n", id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.10\r10.0.0.5 1 2\r\n", id="v1-bare-cr"),
    pytest.param(b"PROXY TCP4 \xc0.0.2.10 10.0.0.5 1 2\r\n", id="v1-not-ascii"),
    pytest.param("PROXY TCP4 192.0.2.10 10.0.0.5 \u0661 2\r\n".encode(), id="v1-arabic-digit"),
    pytest.param(b"PROXY " + b"A" * (MAX_V1 - 6), id="v1-too-long"),
    pytest.param(b"proxy TCP4 192.0.2.10 10.0.0.5 1 2\r\n", id="v1-lower-case"),
    pytest.param(SIGNATURE_V2[:-1] + b"X" + bytes(4), id="v2-bad-signature"),
    pytest.param(v2(0x11, 0x11, IPV4_BODY), id="v2-version-1"),
    pytest.param(v2(0x22, 0x11, IPV4_BODY), id="v2-unknown-command"),
    pytest.param(v2(0x21, 0x12, IPV4_BODY), id="v2-datagram"),
    pytest.param(v2(0x21, 0x41, IPV4_BODY), id="v2-unknown-family"),
    pytest.param(v2(0x21, 0x21, IPV4_BODY), id="v2-short-for-ipv6"),
    pytest.param(v2(0x21, 0x11, IPV4_BODY, b"\x01\x00"), id="v2-truncated-tlv-head"),
    pytest.param(v2(0x21, 0x11, IPV4_BODY, b"\x01\x00\x09abc"), id="v2-tlv-past-end"),
    pytest.param(v2(0x21, 0x11, IPV4_BODY, tlv(0x03, b"\x00\x00")), id="v2-short-crc"),
    pytest.param(v2(0x21, 0x11, IPV4_BODY, tlv(0x02, b"\xff")), id="v2-authority-binary"),
    pytest.param(v2(0x21, 0x11, IPV4_BODY, bytes(4090)), id="v2-over-max-size"),
]


@pytest.mark.parametrize("data", INVALID)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        read(data + CLIENT_BYTES)


def test_size_limit_is_known_before_the_bytes_arrive() -> None:
    """A v2 header announcing more than max_size is refused from its first 16 bytes."""
    head = SIGNATURE_V2 + b"\x21\x11" + struct.pack("!H", 60000)
    with pytest.raises(ProxyHeaderError, match="more than 4096"):
        header_length(head)
    assert header_length(head[:15]) is None


def test_v1_is_refused_as_soon_as_it_is_too_long() -> None:
    assert header_length(b"PROXY " + b"1" * (MAX_V1 - 7)) is None
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        header_length(b"PROXY " + b"1" * (MAX_V1 - 6))


def test_header_length_never_needs_more_than_the_header() -> None:
    """The driver reads exactly the measured bytes: the client's first byte is never
    consumed as part of the header, even when it arrives in the same packet."""
    for header, _ in VALID:
        for end in range(1, len(header) + 1):
            assert header_length(header[:end]) in (None, len(header))
        assert header_length(header + CLIENT_BYTES) == len(header)


def unmapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("192.0.2.10", 51234), ("10.0.0.5", 993)),
        (("2001:db8::1", 1), ("2001:db8::2", 143)),
        (("192.0.2.10", 1), ("2001:db8::2", 143)),  # mixed: written as IPv6
        (("::ffff:192.0.2.10", 1), ("10.0.0.5", 143)),  # mapped: written as IPv4
    ],
)
def test_encoded_headers_parse_back(source: tuple[str, int], destination: tuple[str, int]) -> None:
    for encode in (encode_v1, encode_v2):
        header, rest = read(encode(source, destination))
        assert rest == b""
        assert header.command is ProxyCommand.PROXY
        assert header.source is not None
        assert header.source[1] == source[1]
        assert unmapped(header.source[0]) == unmapped(source[0])


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_proxy_header_error(data: bytes) -> None:
    try:
        length = header_length(data)
        if length is not None and length <= len(data):
            parse_header(data[:length])
    except ProxyHeaderError:
        pass


@given(
    st.sampled_from([h for h, _ in VALID]),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=0, max_value=255),
)
def test_corrupted_valid_headers_raise_only_proxy_header_error(
    header: bytes, position: int, value: int
) -> None:
    corrupted = bytearray(header)
    corrupted[position % len(header)] = value
    try:
        length = header_length(bytes(corrupted))
        if length is not None and length <= len(corrupted):
            parse_header(bytes(corrupted[:length]))
    except ProxyHeaderError:
        pass
