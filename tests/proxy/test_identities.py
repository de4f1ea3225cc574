"""Local credential checks: argon2id, rotation, the verified-credential cache, policies."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.config import Protocol, UserConfig
from proxy.hashpool import HashPool
from proxy.identities import (
    DEFAULT_PARAMETERS,
    Authenticator,
    BadCredentials,
    HashParameters,
    LockedOut,
    check_hash_format,
    hash_password,
    outdated_parameters,
    parameters_of,
)
from proxy.protocol.sasl import (
    AnyCredentials,
    BearerCredentials,
    Credentials,
    ExternalCredentials,
)

CHEAP = HashParameters(memory_cost=64, iterations=1, lanes=1)


def user(login: str = "reports@contoso.com", *passwords: str, **kw: object) -> UserConfig:
    hashes = tuple(hash_password(p, CHEAP) for p in (passwords or ("right",)))
    return UserConfig(
        login=login,
        password_hashes=hashes,
        app=str(kw.get("app", "contoso")),
        mailbox=str(kw.get("mailbox", login)),
        protocols=frozenset(kw.get("protocols", set(Protocol))),  # type: ignore[call-overload]
    )


@pytest.fixture
async def pool(nursery: trio.Nursery) -> HashPool:
    """A running hash pool, as ``serve`` has."""
    hashes = HashPool(2)
    await nursery.start(hashes.run)
    return hashes


def authenticator(pool: HashPool, *users: UserConfig, **kw: float) -> Authenticator:
    return Authenticator(
        {u.login.casefold(): u for u in users},
        hashes=pool,
        dummy_parameters=CHEAP,
        **kw,  # type: ignore[arg-type]
    )


def test_hash_format() -> None:
    phc = hash_password("pw", CHEAP)
    assert phc.startswith("$argon2id$v=19$m=64,t=1,p=1$")
    assert check_hash_format(phc) is None
    assert parameters_of(phc) == CHEAP
    assert check_hash_format("$2b$12$abcdefghijklmnopqrstuv") is not None
    assert "memory cost" in str(check_hash_format(phc.replace("m=64", "m=99999999")))
    assert hash_password("pw", CHEAP) != phc  # salted


async def test_accepts_the_right_password_and_names_the_mailbox(pool: HashPool) -> None:
    auth = authenticator(pool, user("Scanner@contoso.com", mailbox="shared@contoso.com"))
    identity = await auth.authenticate(Credentials("scanner@CONTOSO.com", "right"), Protocol.IMAP)
    assert (identity.login, identity.mailbox, identity.app) == (
        "Scanner@contoso.com",
        "shared@contoso.com",
        "contoso",
    )


@pytest.mark.parametrize(
    ("credentials", "reason"),
    [
        (Credentials("reports@contoso.com", "wrong"), "wrong password"),
        (Credentials("nobody@contoso.com", "right"), "unknown user"),
        (
            Credentials("reports@contoso.com", "right", authzid="ceo@contoso.com"),
            "'s mailboxes",
        ),
    ],
)
async def test_refusals(pool: HashPool, credentials: Credentials, reason: str) -> None:
    auth = authenticator(pool, user())
    with pytest.raises(BadCredentials, match=reason):
        await auth.authenticate(credentials, Protocol.IMAP)


async def test_protocol_not_allowed(pool: HashPool) -> None:
    auth = authenticator(pool, user(protocols={Protocol.SMTP}))
    with pytest.raises(BadCredentials, match="imap is not in"):
        await auth.authenticate(Credentials("reports@contoso.com", "right"), Protocol.IMAP)
    await auth.authenticate(Credentials("reports@contoso.com", "right"), Protocol.SMTP)


async def test_rotation_accepts_every_listed_hash(pool: HashPool) -> None:
    auth = authenticator(pool, user("reports@contoso.com", "old", "new"))
    for password in ("old", "new"):
        identity = await auth.authenticate(
            Credentials("reports@contoso.com", password), Protocol.POP3
        )
        assert identity.login == "reports@contoso.com"
    with pytest.raises(BadCredentials, match=r"^wrong password$"):
        await auth.authenticate(Credentials("reports@contoso.com", "older"), Protocol.POP3)


async def test_verified_credentials_are_cached_until_ttl(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    import proxy.identities as identities

    real = identities._verify

    def counting(password: str, phc: str) -> bool:
        calls.append(phc)
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", counting)
    now = [1000.0]
    auth = Authenticator(
        {"a@b.c": user("a@b.c")},
        hashes=pool,
        dummy_parameters=CHEAP,
        cache_ttl=60,
        clock=lambda: now[0],
    )
    creds = Credentials("a@b.c", "right")
    await auth.authenticate(creds, Protocol.IMAP)
    await auth.authenticate(creds, Protocol.IMAP)
    assert len(calls) == 1
    with pytest.raises(BadCredentials):
        await auth.authenticate(Credentials("a@b.c", "wrong"), Protocol.IMAP)
    assert len(calls) == 2  # a wrong password is never answered from the cache
    now[0] += 61
    await auth.authenticate(creds, Protocol.IMAP)
    assert len(calls) == 3
    assert "right" not in repr(auth)


async def test_hashing_runs_off_the_event_loop_with_bounded_concurrency(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    import proxy.identities as identities

    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def slow(password: str, phc: str) -> bool:
        with lock:
            running[0] += 1
            running[1] = max(running)
            threads.add(threading.get_ident())
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return False

    monkeypatch.setattr(identities, "_verify", slow)
    auth = authenticator(pool, user("a@b.c"), cache_ttl=0)

    async def attempt(password: str) -> None:
        with pytest.raises(BadCredentials):
            await auth.authenticate(Credentials("a@b.c", password), Protocol.IMAP)

    async with trio.open_nursery() as nursery:
        for n in range(8):  # eight different passwords: eight checks
            nursery.start_soon(attempt, f"guess {n}")
    assert running[1] == pool.concurrency == 2
    assert loop_thread not in threads


# -- app identities: certificates, app keys, mailbox policies ----------------------------


@pytest.fixture(scope="module")
def client_certs() -> tuple[bytes, bytes]:
    """Two client certificates (DER) from a throwaway CA."""
    ca = trustme.CA()
    ders = []
    for name in ("scanner01", "erp"):
        pem = ca.issue_cert(f"{name}@contoso.com", common_name=name).cert_chain_pems[0].bytes()
        ders.append(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER))
    return ders[0], ders[1]


def identity_user(**fields: Any) -> UserConfig:
    """User "scanner" (password "right") with ``fields`` replaced."""
    return dataclasses.replace(user("scanner"), **fields)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_certificate_by_fingerprint_with_and_without_authzid(
    pool: HashPool,
    client_certs: tuple[bytes, bytes],
) -> None:
    scanner, erp = client_certs
    owner = identity_user(
        certificate_fingerprints=frozenset({sha256(scanner)}),
        mailbox="scans@contoso.com",
        mailboxes=("scans@contoso.com", "*@reports.contoso.com"),
    )
    auth = authenticator(pool, owner)
    identity = await auth.authenticate(ExternalCredentials(), Protocol.SMTP, certificate=scanner)
    assert (identity.login, identity.mailbox, identity.kind) == (
        "scanner",
        "scans@contoso.com",
        "certificate",
    )
    chosen = await auth.authenticate(
        ExternalCredentials("Q3@Reports.Contoso.com"), Protocol.IMAP, certificate=scanner
    )
    assert chosen.mailbox == "Q3@Reports.Contoso.com"
    for credentials, certificate, reason in [
        (ExternalCredentials("ceo@contoso.com"), scanner, "'s mailboxes"),
        (ExternalCredentials("x@reports.contoso.com.evil"), scanner, "'s mailboxes"),
        (ExternalCredentials(), erp, "client certificate not configured"),
        (ExternalCredentials(), None, "no client certificate"),
    ]:
        with pytest.raises(BadCredentials, match=reason):
            await auth.authenticate(credentials, Protocol.IMAP, certificate=certificate)


async def test_certificate_by_subject(pool: HashPool, client_certs: tuple[bytes, bytes]) -> None:
    scanner, _ = client_certs
    subject = x509.load_der_x509_certificate(scanner).subject.rfc4514_string()
    assert subject.startswith("CN=scanner")
    auth = authenticator(pool, identity_user(certificate_subjects=frozenset({subject})))
    identity = await auth.authenticate(ExternalCredentials(), Protocol.POP3, certificate=scanner)
    assert identity.login == "scanner"


async def test_password_and_certificate_must_both_match(
    pool: HashPool,
    client_certs: tuple[bytes, bytes],
) -> None:
    scanner, erp = client_certs
    owner = identity_user(certificate_fingerprints=frozenset({sha256(scanner)}))
    other = dataclasses.replace(user("erp"), certificate_fingerprints=frozenset({sha256(erp)}))
    auth = authenticator(pool, owner, other)
    identity = await auth.authenticate(
        Credentials("scanner", "right"), Protocol.IMAP, certificate=scanner
    )
    assert identity.kind == "password"
    with pytest.raises(BadCredentials, match="no client certificate"):
        await auth.authenticate(Credentials("scanner", "right"), Protocol.IMAP)
    with pytest.raises(BadCredentials, match="belongs to another user"):
        await auth.authenticate(Credentials("scanner", "right"), Protocol.IMAP, certificate=erp)


async def test_app_key_swaps_in_for_the_mailbox_it_names(pool: HashPool) -> None:
    key = "xo2k_" + "a" * 43
    auth = authenticator(
        pool,
        identity_user(
            password_hashes=(),
            app_key_hashes=frozenset({sha256(key.encode())}),
            mailboxes=("*@reports.contoso.com",),
        ),
    )
    identity = await auth.authenticate(
        BearerCredentials("daily@reports.contoso.com", key), Protocol.SMTP
    )
    assert (identity.login, identity.mailbox, identity.kind) == (
        "scanner",
        "daily@reports.contoso.com",
        "app-key",
    )
    with pytest.raises(BadCredentials, match=r"^unknown app key$"):
        await auth.authenticate(
            BearerCredentials("daily@reports.contoso.com", key + "x"), Protocol.SMTP
        )
    with pytest.raises(BadCredentials, match="'s mailboxes"):
        await auth.authenticate(BearerCredentials("ceo@contoso.com", key), Protocol.SMTP)
    # An identity without a password cannot log in with one.
    with pytest.raises(BadCredentials, match=r"^the user has no password$"):
        await auth.authenticate(Credentials("scanner", ""), Protocol.SMTP)


@pytest.mark.parametrize(
    ("pattern", "mailbox", "allowed"),
    [
        ("*@reports.contoso.com", "a@reports.contoso.com", True),
        ("*@reports.contoso.com", "a@REPORTS.contoso.com", True),
        ("*@reports.contoso.com", "a@x.reports.contoso.com", False),
        ("*@reports.contoso.com", "@reports.contoso.com", False),  # no local part
        ("*@reports.contoso.com", "a@reports.contoso.com.evil", False),
        ("scan-*@contoso.com", "scan-1@contoso.com", True),
        ("scan-*@contoso.com", "scan@contoso.com", False),
        ("a*b*c@x.com", "abc@x.com", True),
        ("a*b*c@x.com", "ac@x.com", False),
        ("a*bc*c@x.com", "abc@x.com", False),
        ("exact@contoso.com", "exact@contoso.com", True),
        ("exact@contoso.com", "EXACT@Contoso.COM", True),
        # Issue: * matched @, \, spaces and itself; U+017F folded to s.
        ("erp-*@contoso.com", "erp-x@contoso.com\\ceo@contoso.com", False),
        ("erp-*@contoso.com", "erp-x\\ceo@contoso.com", False),
        ("erp-*@contoso.com", "erp-a b@contoso.com", False),
        ("erp-*@contoso.com", "erp-*@contoso.com", False),
        ("erp-*@contoso.com", "erp-x@evil.com@contoso.com", False),
        ("*@contoso.com", "ceo@evil.com", False),
        ("reports@contoso.com", "reports@conto\u017fo.com", False),
        ("reports@contoso.com", "reports@contoso.com\u200b", False),
        ("*@contoso.com", "rep\u202eorts@contoso.com", False),
    ],
)
def test_mailbox_patterns(pattern: str, mailbox: str, allowed: bool) -> None:
    assert identity_user(mailboxes=(pattern,)).may_open(mailbox) is allowed


async def test_every_failed_check_costs_the_same_number_of_hashes(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing: the most hashes any user has (password rotation), for every failure."""
    import proxy.identities as identities

    real = identities._verify
    computed: list[str] = []

    def counting(password: str, phc: str) -> bool:
        computed.append(phc)
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", counting)
    auth = authenticator(pool, user("rotating", "old", "new"), user("single", "pw"))
    for credentials in (
        Credentials("rotating", "wrong"),
        Credentials("single", "wrong"),
        Credentials("nobody", "wrong"),
    ):
        computed.clear()
        with pytest.raises(BadCredentials):
            await auth.authenticate(credentials, Protocol.IMAP)
        assert len(computed) == 2, credentials.login
    computed.clear()
    await auth.authenticate(Credentials("single", "pw"), Protocol.IMAP)
    assert len(computed) == 1  # success stops at the matching hash


async def test_the_gate_can_refuse_before_any_hash_is_computed(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.identities as identities

    computed: list[str] = []

    def counting(password: str, phc: str) -> bool:
        computed.append(phc)
        return True

    monkeypatch.setattr(identities, "_verify", counting)
    auth = authenticator(pool, user("reports@contoso.com"))
    with pytest.raises(LockedOut, match="locked out"):
        await auth.authenticate(
            Credentials("reports@contoso.com", "right"), Protocol.IMAP, gate=lambda: "locked out"
        )
    assert computed == []


async def test_a_cheap_old_hash_is_padded_to_the_dummys_cost(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue: a user whose hash was cheaper than the dummy answered a wrong password in
    3 ms, an unknown user in 320 ms, telling the two apart."""
    import proxy.identities as identities

    real = identities._verify
    costs: list[HashParameters | None] = []

    def recording(password: str, phc: str) -> bool:
        costs.append(parameters_of(phc))
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", recording)
    dearer = HashParameters(memory_cost=128, iterations=2, lanes=1)
    auth = Authenticator(
        {
            "cheap": user("cheap", "pw"),
            "dear": dataclasses.replace(
                user("dear"), password_hashes=(hash_password("pw", dearer),)
            ),
        },
        hashes=pool,
        dummy_parameters=dearer,
    )
    for login in ("cheap", "dear", "nobody"):
        costs.clear()
        with pytest.raises(BadCredentials):
            await auth.authenticate(Credentials(login, "wrong"), Protocol.IMAP)
        assert dearer in costs, login  # every failure costs a hash at the dummy's cost
        assert costs.count(dearer) == 1, login
    costs.clear()
    await auth.authenticate(Credentials("cheap", "pw"), Protocol.IMAP)
    assert costs == [CHEAP]  # a success stops at its match


def test_the_mailbox_sent_upstream_is_the_configured_spelling_or_a_pattern_match() -> None:
    policy = identity_user(mailboxes=("Reports@Contoso.com", "erp-*@contoso.com"))
    assert policy.mailbox_for("reports@CONTOSO.COM") == "Reports@Contoso.com"
    assert policy.mailbox_for("ERP-7@contoso.com") == "ERP-7@contoso.com"
    assert policy.mailbox_for("reports@conto\u017fo.com") is None


async def test_invisible_formatting_characters_are_refused(pool: HashPool) -> None:
    """Issue: a login of U+202E and reversed text showed as another user's name in a log
    viewer; zero-width characters passed the same way."""
    auth = authenticator(pool, user("reports@contoso.com"))
    for login in ("reports@contoso.com\u200b", "\u202emoc.osotnoc@stroper"):
        with pytest.raises(
            BadCredentials,
            match=r"^the login name contains invisible formatting characters \(Unicode Cf\)$",
        ):
            await auth.authenticate(Credentials(login, "right"), Protocol.IMAP)
    with pytest.raises(BadCredentials, match="invisible formatting characters"):
        await auth.authenticate(
            Credentials("reports@contoso.com", "right", authzid="reports@contoso.com\u2060"),
            Protocol.IMAP,
        )


async def test_an_unreadable_client_certificate_is_a_refusal(pool: HashPool) -> None:
    """The TLS layer verified it, but it is not X.509 the proxy can read: no identity."""
    auth = authenticator(pool, identity_user(certificate_subjects=frozenset({"CN=scanner"})))
    with pytest.raises(BadCredentials, match="unreadable client certificate"):
        await auth.authenticate(ExternalCredentials(), Protocol.IMAP, certificate=b"\x30\x03junk")


async def test_the_verified_credential_cache_evicts_the_oldest(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.identities as identities

    monkeypatch.setattr(identities, "_CACHE_SIZE", 2)
    real = identities._verify
    computed: list[str] = []

    def counting(password: str, phc: str) -> bool:
        computed.append(password)
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", counting)
    auth = authenticator(pool, user("a", "pa"), user("b", "pb"), user("c", "pc"))
    for login in ("a", "b", "a", "c", "a", "b"):
        await auth.authenticate(Credentials(login, f"p{login}"), Protocol.IMAP)
    # a, b computed; a cached; c computed (b evicted: a was used more recently); a cached;
    # b computed again.
    assert computed == ["pa", "pb", "pc", "pb"]


@pytest.mark.parametrize(
    ("phc", "problem"),
    [
        ("$argon2id$v=19$m=8,t=1,p=2$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA", "invalid"),
        ("$argon2id$v=19$m=64,t=0,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA", "invalid"),
        ("$argon2id$v=19$m=64,t=1,p=0$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA", "invalid"),
        ("$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA", "not an argon2id"),
    ],
)
def test_hashes_that_cannot_be_used(phc: str, problem: str) -> None:
    assert problem in str(check_hash_format(phc))


def test_cost_of_hashes_that_are_not_ours() -> None:
    assert parameters_of("$2b$12$abcdefghijklmnopqrstuv") is None
    assert outdated_parameters("$2b$12$abcdefghijklmnopqrstuv") is None
    assert outdated_parameters(hash_password("pw", CHEAP)) is not None
    dearer = HashParameters(memory_cost=65536 * 2, iterations=3, lanes=1)
    assert outdated_parameters(hash_password("pw", dearer)) is None


async def test_users_can_come_from_a_lookup_function(pool: HashPool) -> None:
    found = user("reports@contoso.com")
    auth = Authenticator(
        lambda login: found if login == "reports@contoso.com" else None,
        hashes=pool,
        dummy_parameters=CHEAP,
        cache_ttl=0,
    )
    identity = await auth.authenticate(Credentials("reports@contoso.com", "right"), Protocol.IMAP)
    assert identity.mailbox == "reports@contoso.com"
    with pytest.raises(BadCredentials, match=r"^unknown user$"):
        await auth.authenticate(Credentials("other@contoso.com", "right"), Protocol.IMAP)


async def test_naming_ones_own_login_as_the_mailbox_opens_the_default(pool: HashPool) -> None:
    auth = authenticator(pool, user("scanner", mailbox="scans@contoso.com"))
    identity = await auth.authenticate(
        Credentials("scanner", "right", authzid="SCANNER"), Protocol.IMAP
    )
    assert identity.mailbox == "scans@contoso.com"


async def test_forgetting_the_verified_credentials(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.identities as identities

    real = identities._verify
    computed: list[str] = []

    def counting(password: str, phc: str) -> bool:
        computed.append(password)
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", counting)
    auth = authenticator(pool, user("a", "pa"))
    for _ in range(2):
        await auth.authenticate(Credentials("a", "pa"), Protocol.IMAP)
    assert computed == ["pa"]
    auth.forget_all()  # after a reload
    await auth.authenticate(Credentials("a", "pa"), Protocol.IMAP)
    assert computed == ["pa", "pa"]
    uncached = authenticator(pool, user("a", "pa"), cache_ttl=0)
    for _ in range(2):
        await uncached.authenticate(Credentials("a", "pa"), Protocol.IMAP)
    assert computed == ["pa"] * 4


async def test_every_spelling_of_a_login_shares_one_verification(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.identities as identities

    real = identities._verify
    computed: list[str] = []

    def counting(password: str, phc: str) -> bool:
        computed.append(password)
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", counting)
    now = [1000.0]
    auth = Authenticator(
        {"reports@contoso.com": user("Reports@Contoso.com", "pw")},
        hashes=pool,
        dummy_parameters=CHEAP,
        cache_ttl=0.5,
        clock=lambda: now[0],
    )
    for login in ("Reports@Contoso.com", "REPORTS@contoso.com", "reports@contoso.com"):
        await auth.authenticate(Credentials(login, "pw"), Protocol.IMAP)
    assert computed == ["pw"]  # under half a second, any spelling: remembered
    now[0] += 0.5  # the remembered verification ends exactly now
    await auth.authenticate(Credentials("reports@contoso.com", "pw"), Protocol.IMAP)
    assert computed == ["pw", "pw"]


async def test_the_pool_learns_each_attempts_network_and_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fairness and the per-network bound need the attempt's network and login."""
    seen: list[tuple[str, str]] = []

    class Recording(HashPool):
        async def check(self, key: bytes, compute: Any, **kw: Any) -> bool:
            seen.append((kw["network"], kw["login"]))
            return await super().check(key, compute, **kw)

    pool = Recording(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        auth = authenticator(pool, user("Reports@contoso.com"))
        await auth.authenticate(
            Credentials("reports@CONTOSO.com", "right"), Protocol.IMAP, network="192.0.2.0/24"
        )
        with pytest.raises(BadCredentials):
            await auth.authenticate(Credentials("Nobody", "x"), Protocol.IMAP, network="net")
        nursery.cancel_scope.cancel()
    assert seen == [("192.0.2.0/24", "Reports@contoso.com"), ("net", "nobody")]


async def test_refusal_reasons_are_exact(pool: HashPool, client_certs: tuple[bytes, bytes]) -> None:
    """They are the audit line's reason, which operators read and filter on."""
    scanner, erp = client_certs
    owner = identity_user(certificate_fingerprints=frozenset({sha256(scanner)}))
    other = identity_user(login="erp", certificate_fingerprints=frozenset({sha256(erp)}))
    auth = authenticator(pool, owner, other)
    cases: list[tuple[AnyCredentials, bytes | None, str]] = [
        (ExternalCredentials(), None, "no client certificate"),
        (ExternalCredentials(), b"\x30\x03junk", "unreadable client certificate"),
        (Credentials("scanner", "right"), erp, "the client certificate belongs to another user"),
    ]
    for credentials, certificate, reason in cases:
        with pytest.raises(BadCredentials) as refused:
            await auth.authenticate(credentials, Protocol.IMAP, certificate=certificate)
        assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("m", "t", "p", "usable"),
    [
        (1024 * 1024, 1, 1, True),  # the memory limit itself
        (1024 * 1024 + 1, 1, 1, False),
        (16, 1, 2, True),  # argon2's least memory: 8 KiB per lane
        (15, 1, 2, False),
    ],
)
def test_the_edges_of_usable_hash_parameters(m: int, t: int, p: int, usable: bool) -> None:
    phc = f"$argon2id$v=19$m={m},t={t},p={p}$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"
    assert (check_hash_format(phc) is None) is usable


@pytest.mark.parametrize(
    ("memory_cost", "iterations"),
    [(DEFAULT_PARAMETERS.memory_cost, 1), (64, DEFAULT_PARAMETERS.iterations)],
)
def test_a_hash_cheaper_in_one_parameter_is_outdated(memory_cost: int, iterations: int) -> None:
    phc = (
        f"$argon2id$v=19$m={memory_cost},t={iterations},p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"
    )
    assert "costs less than the current default" in str(outdated_parameters(phc))


def test_hash_password_writes_argon2id_with_a_16_byte_salt_and_a_32_byte_hash() -> None:
    phc = hash_password("pw", CHEAP)
    _, kind, version, cost, salt, digest = phc.split("$")
    assert (kind, version, cost) == ("argon2id", "v=19", "m=64,t=1,p=1")
    assert len(base64.b64decode(salt + "=" * (-len(salt) % 4))) == 16
    assert len(base64.b64decode(digest + "=" * (-len(digest) % 4))) == 32


async def test_each_lookup_says_whether_the_verified_cache_answered(pool: HashPool) -> None:
    seen: list[bool] = []
    auth = Authenticator(
        {"a": user("a", "pa")}, hashes=pool, dummy_parameters=CHEAP, on_lookup=seen.append
    )
    await auth.authenticate(Credentials("a", "pa"), Protocol.IMAP)
    await auth.authenticate(Credentials("a", "pa"), Protocol.IMAP)
    with pytest.raises(BadCredentials):
        await auth.authenticate(Credentials("a", "wrong"), Protocol.IMAP)
    assert seen == [False, True, False]


async def test_failures_count_under_the_kind_and_whom_the_credential_claims(
    pool: HashPool,
) -> None:
    key = "xo2k_" + "b" * 43
    auth = authenticator(
        pool,
        identity_user(login="Scanner", app_key_hashes=frozenset({sha256(key.encode())})),
    )
    der = b"certificate bytes"
    assert auth.throttle_key(Credentials("SCANNER", "x"), None) == "password:scanner"
    # An app key counts for the identity it belongs to, whatever mailbox its client names.
    assert auth.throttle_key(BearerCredentials("ceo@contoso.com", key), None) == "app-key:scanner"
    assert (
        auth.throttle_key(BearerCredentials("scanner", key + "x"), None) == "app-key:(unknown key)"
    )
    assert auth.throttle_key(ExternalCredentials("scanner"), der) == (f"certificate:{sha256(der)}")
    assert auth.throttle_key(ExternalCredentials(), None) == f"certificate:{sha256(b'')}"


async def test_app_key_and_certificate_must_both_match(
    pool: HashPool,
    client_certs: tuple[bytes, bytes],
) -> None:
    scanner, erp = client_certs
    key = "xo2k_" + "c" * 43
    owner = identity_user(
        certificate_fingerprints=frozenset({sha256(scanner)}),
        app_key_hashes=frozenset({sha256(key.encode())}),
    )
    auth = authenticator(pool, owner)
    bearer = BearerCredentials("scanner", key)
    identity = await auth.authenticate(bearer, Protocol.SMTP, certificate=scanner)
    assert identity.kind == "app-key"
    with pytest.raises(BadCredentials, match="no client certificate"):
        await auth.authenticate(bearer, Protocol.SMTP)
    with pytest.raises(BadCredentials, match="certificate"):
        await auth.authenticate(bearer, Protocol.SMTP, certificate=erp)
    # A certificate login is its own proof.
    certified = await auth.authenticate(ExternalCredentials(), Protocol.SMTP, certificate=scanner)
    assert certified.kind == "certificate"


async def test_an_identity_names_the_account_that_signs_in_for_it(pool: HashPool) -> None:
    shared = dataclasses.replace(
        user("frontdesk", "pw", mailbox="desk@contoso.com"), account="anna@contoso.com"
    )
    own = user("anna", "pw2", mailbox="anna@contoso.com")
    auth = authenticator(pool, shared, own)
    desk = await auth.authenticate(Credentials("frontdesk", "pw"), Protocol.IMAP)
    assert (desk.mailbox, desk.account) == ("desk@contoso.com", "anna@contoso.com")
    anna = await auth.authenticate(Credentials("anna", "pw2"), Protocol.IMAP)
    assert anna.account == "anna@contoso.com"  # by default the mailbox signs in
