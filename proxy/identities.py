"""Local identities: who may log in to the proxy, with which password, for which mailbox.

Passwords are stored as argon2id PHC strings (``$argon2id$v=19$m=…,t=…,p=…$salt$hash``),
made by ``xoauth2-proxy hash-password`` with :func:`hash_password` and checked with the
reference implementation through argon2-cffi, which is safe to call from several threads
at once. (``cryptography`` 50's argon2id never returns when two threads verify with more
than one lane: two wrong passwords sent at the same moment stopped every password login.)

Argon2id is slow and memory-hard on purpose, so it must never sit bare on the login path:

* checks go through a :class:`~proxy.hashpool.HashPool`: worker threads, a bounded queue
  that is fair between networks, and one computation for identical attempts;
* a password that verified is remembered for ``credential_cache_ttl`` seconds, keyed by an
  HMAC of the login name and password under a key that lives only in this process, so
  legacy programs that log in every minute cost one argon2id computation per TTL;
* an unknown login name is checked against a dummy hash with the default cost, so that
  "no such user" and "wrong password" take the same time and give the same answer.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import argon2
import trio
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography import x509

from proxy.hashpool import Refused
from proxy.names import fold_case, has_format_characters
from proxy.protocol.sasl import BearerCredentials, ExternalCredentials

if TYPE_CHECKING:
    from proxy.config import Protocol, UserConfig
    from proxy.hashpool import HashPool
    from proxy.protocol.sasl import AnyCredentials

__all__ = [
    "DEFAULT_PARAMETERS",
    "Authenticator",
    "BadCredentials",
    "HashParameters",
    "Identity",
    "LockedOut",
    "check_hash_format",
    "hash_password",
    "outdated_parameters",
    "parameters_of",
]


@dataclass(frozen=True, slots=True)
class HashParameters:
    """argon2id cost. The default is RFC 9106's second recommended option."""

    #: Memory in KiB.
    memory_cost: int = 65536
    iterations: int = 3
    lanes: int = 4


DEFAULT_PARAMETERS: Final = HashParameters()
MAX_MEMORY_COST: Final = 1024 * 1024  # 1 GiB: refuse hashes that would exhaust memory
_PHC: Final = re.compile(
    r"^\$argon2id\$v=19\$m=(?P<m>\d+),t=(?P<t>\d+),p=(?P<p>\d+)"
    r"\$(?P<salt>[A-Za-z0-9+/]{11,})\$(?P<hash>[A-Za-z0-9+/]{16,})$"
)
_CACHE_SIZE: Final = 10_000


def hash_password(password: str, parameters: HashParameters = DEFAULT_PARAMETERS) -> str:
    """Return the argon2id PHC string for ``password`` (with a fresh 16-byte salt)."""
    hasher = argon2.PasswordHasher(
        time_cost=parameters.iterations,
        memory_cost=parameters.memory_cost,
        parallelism=parameters.lanes,
        hash_len=32,
        salt_len=16,
        type=argon2.Type.ID,
    )
    return hasher.hash(password)


def check_hash_format(phc: str) -> str | None:
    """Return what is wrong with a stored hash, or ``None`` if it can be used."""
    match = _PHC.match(phc)
    if match is None:
        return "not an argon2id hash from `xoauth2-proxy hash-password`"
    memory, iterations, lanes = int(match["m"]), int(match["t"]), int(match["p"])
    if memory > MAX_MEMORY_COST:
        return f"memory cost {memory} KiB is above the limit of {MAX_MEMORY_COST} KiB"
    if memory < 8 * lanes or iterations < 1 or lanes < 1:
        return "invalid argon2id parameters"
    return None


def outdated_parameters(phc: str) -> str | None:
    """Say so if a stored hash costs less than :data:`DEFAULT_PARAMETERS` (an old or
    hand-tuned hash that is cheaper to attack); ``None`` if it does not."""
    current = parameters_of(phc)
    if current is None:
        return None
    default = DEFAULT_PARAMETERS
    if current.memory_cost >= default.memory_cost and current.iterations >= default.iterations:
        return None
    return (
        f"argon2id m={current.memory_cost},t={current.iterations},p={current.lanes} costs less "
        f"than the current default m={default.memory_cost},t={default.iterations},"
        f"p={default.lanes}: when you next rotate this password, hash it again with "
        "`xoauth2-proxy hash-password`"
    )


def parameters_of(phc: str) -> HashParameters | None:
    """The cost parameters of a stored hash (``None`` if it is not one of ours)."""
    match = _PHC.match(phc)
    if match is None:
        return None
    return HashParameters(
        memory_cost=int(match["m"]), iterations=int(match["t"]), lanes=int(match["p"])
    )


#: Verification takes its parameters from the stored hash, not from the hasher.
_VERIFIER: Final = argon2.PasswordHasher()


def _verify(password: str, phc: str) -> bool:
    try:
        return _VERIFIER.verify(phc, password)
    except (VerificationError, InvalidHashError):
        return False


def _verify_any(password: str, hashes: tuple[str, ...]) -> bool:
    """Whether ``password`` matches one of ``hashes``, checked in order (in a thread)."""
    return any(_verify(password, phc) for phc in hashes)


@dataclass(frozen=True, slots=True)
class Identity:
    """A login the proxy accepted: the mailbox it opens upstream, with which app."""

    login: str
    mailbox: str
    app: str
    #: How it proved itself: ``password``, ``certificate`` or ``app-key``.
    kind: str = "password"
    #: Delegated apps: the account whose sign-in its tokens come from.
    account: str = ""


class BadCredentials(Exception):
    """The login must fail as a bad password would. ``reason`` is for the log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LockedOut(BadCredentials):
    """Refused without checking the password: the caller's gate said it is locked out."""


class Authenticator:
    """Checks legacy credentials against the configured users.

    Password checks run in ``hashes``, which must be running (see
    :class:`~proxy.hashpool.HashPool`); certificates and app keys need no hash.
    """

    def __init__(
        self,
        users: Callable[[str], UserConfig | None] | Mapping[str, UserConfig],
        *,
        hashes: HashPool,
        cache_ttl: float = 300.0,
        dummy_parameters: HashParameters = DEFAULT_PARAMETERS,
        clock: Callable[[], float] = trio.current_time,
        on_lookup: Callable[[bool], None] | None = None,
    ) -> None:
        self._by_certificate: dict[str, UserConfig] = {}
        self._by_subject: dict[str, UserConfig] = {}
        self._by_app_key: dict[str, UserConfig] = {}
        if isinstance(users, Mapping):
            table = users
            self._lookup: Callable[[str], UserConfig | None] = lambda login: table.get(
                fold_case(login)
            )
            for user in table.values():
                self._by_certificate.update(dict.fromkeys(user.certificate_fingerprints, user))
                self._by_subject.update(dict.fromkeys(user.certificate_subjects, user))
                self._by_app_key.update(dict.fromkeys(user.app_key_hashes, user))
        else:
            self._lookup = users
        self._hashes = hashes
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._cache_key = secrets.token_bytes(32)
        #: Told whether each password check was answered by the verified cache (metrics).
        self._on_lookup = on_lookup
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        # A stand-in hash for logins with nothing to check: verifying it costs what verifying
        # a real one does (the cost is in the parameters; the bytes are random).
        self._dummy_hash = _random_phc(dummy_parameters)
        self._dummy_parameters = dummy_parameters
        #: Hashes a failed password check costs, whoever the user: the most any user has.
        self._rounds = max(
            (len(u.password_hashes) for u in self._users_for_rounds(users)), default=1
        )

    def __repr__(self) -> str:
        return f"<Authenticator {len(self._verified)} cached verifications>"

    async def authenticate(
        self,
        credentials: AnyCredentials,
        protocol: Protocol,
        *,
        certificate: bytes | None = None,
        network: str = "",
        deadline: float = math.inf,
        gate: Callable[[], str | None] | None = None,
    ) -> Identity:
        """Return the identity for ``credentials`` or raise :class:`BadCredentials`.

        ``certificate`` is the client's TLS certificate (DER), if it presented one; the
        listener's TLS layer has already verified it against ``client_ca_file``. A password
        check is queued in the hash pool under ``network`` (the client's source network)
        and must start before ``deadline`` (trio time), else :exc:`~proxy.hashpool.Busy`
        is raised. ``gate`` is asked once the check's turn has come and may return a
        reason to refuse without computing it (raised as :class:`LockedOut`): the caller
        re-checks its failed-login limits there, which parallel attempts would otherwise
        all pass before the first failure is counted.
        """
        if has_format_characters(credentials.login):
            await trio.lowlevel.checkpoint()
            raise BadCredentials(
                "the login name contains invisible formatting characters (Unicode Cf)"
            )
        if isinstance(credentials, ExternalCredentials):
            await trio.lowlevel.checkpoint()
            owner = self._certificate_owner(certificate)
            return self._identity(owner, protocol, credentials.authzid, "certificate", certificate)
        if isinstance(credentials, BearerCredentials):
            await trio.lowlevel.checkpoint()
            digest = hashlib.sha256(credentials.key.encode()).hexdigest()
            found = self._by_app_key.get(digest)
            if found is None:
                raise BadCredentials("unknown app key")
            return self._identity(found, protocol, credentials.user, "app-key", certificate)
        user = self._lookup(credentials.login)
        hashes = user.password_hashes if user is not None else ()
        try:
            matches = await self._password_matches(
                credentials.login, user, credentials.password, network, deadline, gate
            )
        except Refused as exc:
            raise LockedOut(str(exc)) from None
        if not matches:
            if user is None:
                raise BadCredentials("unknown user")
            raise BadCredentials("wrong password" if hashes else "the user has no password")
        assert user is not None
        wanted = credentials.authzid
        if fold_case(wanted) == fold_case(user.login):
            wanted = ""
        return self._identity(user, protocol, wanted, "password", certificate)

    def throttle_key(self, credentials: AnyCredentials, certificate: bytes | None) -> str:
        """What failures of ``credentials`` are counted under: the kind of credential and
        whom it claims to be. An app key counts for the identity it belongs to (never the
        mailbox its client names), a certificate for its fingerprint: one kind of
        credential can never lock out another, nor another user's."""
        if isinstance(credentials, ExternalCredentials):
            return f"certificate:{hashlib.sha256(certificate or b'').hexdigest()}"
        if isinstance(credentials, BearerCredentials):
            owner = self._by_app_key.get(hashlib.sha256(credentials.key.encode()).hexdigest())
            return f"app-key:{fold_case(owner.login) if owner is not None else '(unknown key)'}"
        return f"password:{fold_case(credentials.login)}"

    def _identity(
        self,
        user: UserConfig,
        protocol: Protocol,
        wanted_mailbox: str,
        kind: str,
        certificate: bytes | None,
    ) -> Identity:
        """The checks every kind of credential shares, once it has named ``user``."""
        if protocol not in user.protocols:
            raise BadCredentials(f"{protocol.value} is not in user {user.login!r}'s protocols")
        if kind != "certificate" and user.has_certificate:
            owner = self._certificate_owner(certificate)
            if owner is not user:
                raise BadCredentials("the client certificate belongs to another user")
        wanted = wanted_mailbox or user.mailbox
        if has_format_characters(wanted):
            raise BadCredentials(
                f"mailbox {wanted!r} contains invisible formatting characters (Unicode Cf)"
            )
        mailbox = user.mailbox_for(wanted)
        if mailbox is None:
            raise BadCredentials(f"mailbox {wanted!r} is not in user {user.login!r}'s mailboxes")
        return Identity(
            login=user.login,
            mailbox=mailbox,
            app=user.app,
            kind=kind,
            account=user.signs_in_as,
        )

    def _certificate_owner(self, certificate: bytes | None) -> UserConfig:
        if certificate is None:
            raise BadCredentials("no client certificate")
        fingerprint = hashlib.sha256(certificate).hexdigest()
        by_fingerprint = self._by_certificate.get(fingerprint)
        if by_fingerprint is not None:
            return by_fingerprint
        try:
            subject = x509.load_der_x509_certificate(certificate).subject.rfc4514_string()
        except ValueError as exc:
            raise BadCredentials("unreadable client certificate") from exc
        by_subject = self._by_subject.get(subject)
        if by_subject is None:
            raise BadCredentials(
                f"client certificate not configured (subject {subject!r}, sha256 {fingerprint})"
            )
        return by_subject

    def forget_all(self) -> None:
        """Drop every remembered verification (after a configuration reload)."""
        self._verified.clear()

    async def _password_matches(
        self,
        login: str,
        user: UserConfig | None,
        password: str,
        network: str,
        deadline: float,
        gate: Callable[[], str | None] | None,
    ) -> bool:
        """Check ``password``; a failure always costs :attr:`_rounds` hash computations."""
        hashes = user.password_hashes if user is not None else ()
        name = user.login if user is not None else fold_case(login)
        # Identifies this attempt: the remembered verification, and the one computation that
        # identical attempts in parallel share.
        key = hmac.new(
            self._cache_key,
            b"\x00".join([name.encode(), password.encode(), "\x00".join(hashes).encode()]),
            hashlib.sha256,
        ).digest()
        expiry = self._verified.get(key)
        if expiry is not None:
            if expiry > self._clock():
                self._verified.move_to_end(key)
                if self._on_lookup is not None:
                    self._on_lookup(True)
                await trio.lowlevel.checkpoint()
                return True
            del self._verified[key]
        if self._on_lookup is not None:
            self._on_lookup(False)
        candidates = self._candidates(hashes)

        def remember() -> None:
            if self._cache_ttl > 0 and hashes:
                self._verified[key] = self._clock() + self._cache_ttl
                while len(self._verified) > _CACHE_SIZE:
                    self._verified.popitem(last=False)

        return await self._hashes.check(
            key,
            functools.partial(_verify_any, password, candidates),
            network=network,
            login=name,
            deadline=deadline,
            gate=gate,
            on_match=remember,
        )

    def _candidates(self, hashes: tuple[str, ...]) -> tuple[str, ...]:
        """The hashes a check of ``hashes`` computes, in order, until one matches: each of
        the user's own, followed by the dummy where it costs less than the dummy (a cheap
        old hash must not answer a wrong password faster than an unknown user is told),
        then dummies up to the most hashes any user has."""
        candidates: list[str] = []
        for phc in hashes:
            candidates.append(phc)
            if parameters_of(phc) != self._dummy_parameters:
                candidates.append(self._dummy_hash)
        candidates += [self._dummy_hash] * max(self._rounds - len(hashes), 0)
        return tuple(candidates)

    @staticmethod
    def _users_for_rounds(
        users: Callable[[str], UserConfig | None] | Mapping[str, UserConfig],
    ) -> list[UserConfig]:
        return list(users.values()) if isinstance(users, Mapping) else []


def _random_phc(parameters: HashParameters) -> str:
    """A well-formed argon2id PHC string with random salt and hash: no password matches it
    (but for a 2**-256 chance), and checking one costs what ``parameters`` say."""
    salt = base64.b64encode(os.urandom(16)).rstrip(b"=").decode()
    digest = base64.b64encode(os.urandom(32)).rstrip(b"=").decode()
    return (
        f"$argon2id$v=19$m={parameters.memory_cost},t={parameters.iterations},"
        f"p={parameters.lanes}${salt}${digest}"
    )
