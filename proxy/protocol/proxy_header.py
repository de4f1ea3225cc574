"""The PROXY protocol header a load balancer sends before the client's bytes (sans-I/O).

Theory of operation
-------------------
HAProxy's PROXY protocol (versions 1 and 2) prefixes a TCP connection with the
addresses of the connection the balancer accepted, so that the server behind it sees the
real client. The header is the first thing on the connection, and nothing of the client's
may be read as part of it, nor any of it as the client's:

* **Version 1** is one line of at most 107 bytes: ``PROXY TCP4 <src> <dst> <sport>
  <dport>\\r\\n`` (``TCP6`` for IPv6), or ``PROXY UNKNOWN ...\\r\\n`` when the balancer does
  not know (the connection's own addresses are used then).
* **Version 2** is binary: a 12-byte signature, a version/command byte (``0x20`` LOCAL:
  a health check of the balancer's own, ``0x21`` PROXY), a family/transport byte, a
  16-bit length, the addresses (IPv4: 12 bytes, IPv6: 36, Unix: 216) and
  type-length-value records (TLVs). TLVs are walked and their lengths checked; ALPN,
  authority (the TLS server name the client asked for) and unique ID are kept, a CRC32C
  record is verified, everything else is skipped. Only stream transports are accepted.

The driver asks :func:`header_length` how long the header is, given the bytes read so
far (``None``: not known yet), so that it can read exactly the header and no byte more;
then :func:`parse_header` turns those bytes into a :class:`ProxyHeader`. Both raise
:class:`ProxyHeaderError` for anything that is not a well-formed header within
``max_size`` bytes. Nothing here reads a socket or a clock.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_V1",
    "SIGNATURE_V2",
    "ProxyCommand",
    "ProxyHeader",
    "ProxyHeaderError",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "header_length",
    "parse_header",
]

#: The longest version-1 line, CRLF included.
MAX_V1: Final = 107
SIGNATURE_V2: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX: Final = b"PROXY "
#: Version 2: fixed part (signature, version/command, family, length).
_V2_FIXED: Final = 16
_V2_ADDRESS_SIZES: Final = {0x1: 12, 0x2: 36, 0x3: 216}

#: TLV types kept (others are skipped).
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_UNIQUE_ID: Final = 0x05


class ProxyHeaderError(ValueError):
    """Not a PROXY protocol header; ``str()`` says why (safe to log)."""


class ProxyCommand(enum.Enum):
    #: The balancer relays a client: the addresses are the client's.
    PROXY = "proxy"
    #: The balancer speaks for itself (a health check): use the connection's addresses.
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    command: ProxyCommand
    #: The client's address and port, if the header carries one (TCP over IPv4 or IPv6).
    source: tuple[str, int] | None = None
    #: The address the client connected to.
    destination: tuple[str, int] | None = None
    alpn: bytes = b""
    #: The server name the client asked for in TLS (SNI), as the balancer saw it.
    authority: str = ""
    unique_id: bytes = b""


def header_length(data: bytes, *, max_size: int = 4096) -> int | None:
    """The length of the header ``data`` starts with, ``None`` if more bytes are needed.

    Never asks for more than ``max_size`` bytes in all; raises :exc:`ProxyHeaderError` as
    soon as ``data`` cannot be the start of a header.
    """
    if not data:
        return None
    if data[0:1] == b"P":
        return _v1_length(data)
    if data[0:1] == b"\r":
        return _v2_length(data, max_size)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _v1_length(data: bytes) -> int | None:
    known = data[: len(_V1_PREFIX)]
    if known != _V1_PREFIX[: len(known)]:
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
    end = data.find(b"\r\n", 0, MAX_V1)
    if end >= 0:
        return end + 2
    if len(data) >= MAX_V1:
        raise ProxyHeaderError(f"version 1 header longer than {MAX_V1} bytes")
    if b"\n" in data or b"\r" in data[:-1]:
        raise ProxyHeaderError("version 1 header with a bare CR or LF")
    return None


def _v2_length(data: bytes, max_size: int) -> int | None:
    known = data[: len(SIGNATURE_V2)]
    if known != SIGNATURE_V2[: len(known)]:
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
    if len(data) < _V2_FIXED:
        return None
    total = _V2_FIXED + int.from_bytes(data[14:16], "big")
    if total > max_size:
        raise ProxyHeaderError(f"version 2 header of {total} bytes, more than {max_size}")
    return total


def parse_header(data: bytes) -> ProxyHeader:
    """Parse exactly one whole header (as :func:`header_length` measured it)."""
    if data.startswith(SIGNATURE_V2):
        return _parse_v2(data)
    if data.startswith(_V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader:
    if len(data) > MAX_V1 or not data.endswith(b"\r\n") or data.count(b"\r\n") != 1:
        raise ProxyHeaderError("version 1 header is not one line of at most 107 bytes")
    try:
        line = data[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("version 1 header is not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, ProxyCommand.LOCAL)  # whatever follows is to be ignored
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("version 1 header is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    family = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    source = _v1_address(family, fields[2], fields[4])
    destination = _v1_address(family, fields[3], fields[5])
    return ProxyHeader(1, ProxyCommand.PROXY, source, destination)


def _v1_address(
    family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], host: str, port: str
) -> tuple[str, int]:
    try:
        address = family(host)
    except ValueError:
        raise ProxyHeaderError(
            f"version 1 header: not an address of its family: {host!r}"
        ) from None
    # Decimal without a sign or leading zeros, as the specification writes ports.
    if not (port.isascii() and port.isdigit()) or len(port) > 5 or port != str(int(port)):
        raise ProxyHeaderError(f"version 1 header: not a port: {port!r}")
    if int(port) > 65535:
        raise ProxyHeaderError(f"version 1 header: port out of range: {port}")
    return str(address), int(port)


def _parse_v2(data: bytes) -> ProxyHeader:
    if len(data) < _V2_FIXED or len(data) != _V2_FIXED + int.from_bytes(data[14:16], "big"):
        raise ProxyHeaderError("version 2 header length does not match its bytes")
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"version 2 header with version {version}")
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"version 2 header with unknown command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    body = data[_V2_FIXED:]
    size = _V2_ADDRESS_SIZES.get(family, 0)
    if family not in (0x0, *_V2_ADDRESS_SIZES):
        raise ProxyHeaderError(f"version 2 header with unknown address family {family}")
    if len(body) < size:
        raise ProxyHeaderError("version 2 header too short for its addresses")
    if command == 0x1 and family != 0x0 and transport != 0x1:
        raise ProxyHeaderError("version 2 header for a transport other than a stream")
    tlvs = _tlvs(data, _V2_FIXED + size)
    source = destination = None
    if command == 0x1 and family in (0x1, 0x2):
        width = 4 if family == 0x1 else 16
        ip: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address] = (
            ipaddress.IPv4Address if family == 0x1 else ipaddress.IPv6Address
        )
        ports = body[2 * width : 2 * width + 4]
        source = (str(ip(body[:width])), int.from_bytes(ports[:2], "big"))
        destination = (str(ip(body[width : 2 * width])), int.from_bytes(ports[2:], "big"))
    authority = tlvs.get(PP2_TYPE_AUTHORITY, b"")
    try:
        server_name = authority.decode("utf-8")  # the spec's encoding of the host name
    except UnicodeDecodeError:
        raise ProxyHeaderError("version 2 header: authority TLV is not UTF-8") from None
    # A LOCAL header, or an unspecified or Unix family: the connection's own addresses.
    proxied = command == 0x1 and source is not None
    return ProxyHeader(
        2,
        ProxyCommand.PROXY if proxied else ProxyCommand.LOCAL,
        source,
        destination,
        alpn=tlvs.get(PP2_TYPE_ALPN, b""),
        authority=server_name,
        unique_id=tlvs.get(PP2_TYPE_UNIQUE_ID, b""),
    )


def _tlvs(data: bytes, start: int) -> dict[int, bytes]:
    """Walk the TLVs from ``start`` to the end of ``data``; verify a CRC32C record."""
    found: dict[int, bytes] = {}
    offset = start
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError("version 2 header: truncated TLV")
        kind = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        value_at = offset + 3
        if value_at + length > len(data):
            raise ProxyHeaderError("version 2 header: a TLV runs past the header")
        if kind == PP2_TYPE_CRC32C:
            if length != 4:
                raise ProxyHeaderError("version 2 header: CRC32C TLV is not 4 bytes")
            zeroed = data[:value_at] + b"\x00\x00\x00\x00" + data[value_at + 4 :]
            if crc32c(zeroed) != int.from_bytes(data[value_at : value_at + 4], "big"):
                raise ProxyHeaderError("version 2 header: CRC32C does not match")
        if kind not in found:
            found[kind] = data[value_at : value_at + length]
        offset = value_at + length
    return found


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of PROXY protocol version 2."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A version 1 header naming ``source`` (for an upstream that reads one)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    src, dst = _same_family(src, dst)
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A version 2 PROXY header naming ``source``, without TLVs."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    src, dst = _same_family(src, dst)
    family = 0x11 if src.version == 4 else 0x21
    body = (
        src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    )
    return SIGNATURE_V2 + bytes([0x21, family]) + len(body).to_bytes(2, "big") + body


def _mapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_family(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> tuple[
    ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address
]:
    """Both addresses in one family: IPv4 where both can be, else IPv6 (IPv4-mapped)."""
    src, dst = _mapped(src), _mapped(dst)
    if src.version == dst.version:
        return src, dst
    return (
        src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}"),
        dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}"),
    )
