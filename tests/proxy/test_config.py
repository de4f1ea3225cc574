"""Configuration loading: every mistake reported as ``FILE: KEY: text``, secrets resolved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.config import ClientCertificates, ConfigError, Protocol, load_config
from proxy.identities import HashParameters, hash_password
from proxy.protocol.modes import ClientTls, UpstreamTls
from tests.support.certs import TestPki

CHEAP = HashParameters(memory_cost=64, iterations=1, lanes=1)
HASH = hash_password("s3cret", CHEAP)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def good_config(tmp_path: Path) -> str:
    (tmp_path / "server.pem").write_text("placeholder")
    (tmp_path / "server.pem").chmod(0o600)
    return f"""
[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ env = "XO_TEST_SECRET" }}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "implicit"
certificate = {{ file = "server.pem" }}
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

[users."Reports@contoso.com"]
password_hash = "{HASH}"
app = "contoso"
protocols = ["imap"]
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_good_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    config = load_config(write(tmp_path, good_config(tmp_path)))
    app = config.apps["contoso"]
    assert app.client_secret is not None
    assert app.client_secret.reveal() == "the-client-secret"
    assert app.scope == "https://outlook.office365.com/.default"
    assert app.authority == "https://login.microsoftonline.com"
    (listener,) = config.listeners
    assert (listener.host, listener.port) == ("127.0.0.1", 1993)
    assert listener.tls is ClientTls.IMPLICIT
    assert listener.upstream_tls is UpstreamTls.IMPLICIT
    assert (listener.upstream_host, listener.upstream_port) == ("outlook.office365.com", 993)
    user = config.user("reports@CONTOSO.com")
    assert user is not None
    assert user.mailbox == "Reports@contoso.com"
    assert user.protocols == frozenset({Protocol.IMAP})
    assert "the-client-secret" not in repr(config)


def test_every_problem_is_reported_with_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[apps.contoso]
provider = "yahoo"
client_id = "x"
client_secret = "inline-secret"
colour = "blue"

[[listeners]]
protocol = "nntp"
listen = "0.0.0.0:143"
tls = "none"
upstream = "no-port"
upstream_tls = "implicit"

[users."a@b.c"]
password_hash = "plaintext"
app = "missing"
protocols = ["imap", "gopher"]
""",
    )
    found = problems(path)
    expected_keys = [
        "apps.contoso.provider",
        "apps.contoso.tenant",
        "apps.contoso.client_secret",
        "apps.contoso.colour",
        "listeners[0].protocol",
        "listeners[0].upstream",
        "listeners[0].tls",
        'users."a@b.c".password_hash',
        'users."a@b.c".app',
        'users."a@b.c".protocols',
    ]
    for key in expected_keys:
        assert any(p.startswith(f"{path}: {key}: ") for p in found), (key, found)
    assert "inline-secret" not in "\n".join(found)


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    secret_file.chmod(0o600)
    text = good_config(tmp_path).replace('{ env = "XO_TEST_SECRET" }', '{ file = "secret" }')
    config = load_config(write(tmp_path, text))
    secret = config.apps["contoso"].client_secret
    assert secret is not None
    assert secret.reveal() == "from-a-file"
    assert "from-a-file" not in repr(secret)

    secret_file.chmod(0o644)
    assert any(
        "accessible to its group and other users" in p for p in problems(write(tmp_path, text))
    )

    monkeypatch.delenv("XO_TEST_SECRET", raising=False)
    assert any(
        "XO_TEST_SECRET is not set" in p for p in problems(write(tmp_path, good_config(tmp_path)))
    )


def test_inline_secret_warns_and_needs_a_private_file(tmp_path: Path) -> None:
    text = good_config(tmp_path).replace('{ env = "XO_TEST_SECRET" }', '{ value = "abc" }')
    config = load_config(write(tmp_path, text))
    assert any("inline" in w for w in config.warnings)
    assert problems(write(tmp_path, text, 0o640)) == [
        f"{tmp_path / 'config.toml'}: (file): holds inline secrets: {tmp_path / 'config.toml'} "
        f"is accessible to its group (mode 640) and holds a secret; chmod 600 "
        f"{tmp_path / 'config.toml'}"
    ]


def test_world_writable_config_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    path = tmp_path / "config.toml"
    for mode, who in ((0o666, "its group and other users"), (0o620, "its group")):
        assert problems(write(tmp_path, good_config(tmp_path), mode)) == [
            f"{path}: {path} is writable by {who} (mode {mode:o}); chmod go-w {path}"
        ]


def test_plaintext_listener_needs_loopback_or_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    base = good_config(tmp_path).replace(
        'tls = "implicit"\ncertificate = { file = "server.pem" }', 'tls = "none"'
    )
    config = load_config(write(tmp_path, base))
    assert config.listeners[0].tls is ClientTls.NONE
    public = base.replace("127.0.0.1:1993", "0.0.0.0:1993")
    assert any("allow_plaintext" in p for p in problems(write(tmp_path, public)))
    opted = public.replace('tls = "none"', 'tls = "none"\nallow_plaintext = true')
    assert load_config(write(tmp_path, opted)).listeners[0].allow_plaintext


def test_tls_listener_needs_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    text = good_config(tmp_path).replace('certificate = { file = "server.pem" }\n', "")
    assert any(
        "listeners[0].certificate: is required" in p for p in problems(write(tmp_path, text))
    )


def test_ipv6_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    text = good_config(tmp_path).replace("127.0.0.1:1993", "[::1]:1993")
    (listener,) = load_config(write(tmp_path, text)).listeners
    assert (listener.host, listener.port) == ("::1", 1993)
    assert listener.name == "imap@[::1]:1993"


def test_not_toml(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[apps\n"))
    assert found[0].startswith(f"{tmp_path / 'config.toml'}: not valid TOML")


def test_password_hash_list_for_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    second = hash_password("new", CHEAP)
    text = good_config(tmp_path).replace(
        f'password_hash = "{HASH}"', f'password_hash = ["{HASH}", "{second}"]'
    )
    user = load_config(write(tmp_path, text)).user("reports@contoso.com")
    assert user is not None
    assert user.password_hashes == (HASH, second)


# -- providers other than Microsoft, and the token cache ---------------------------------


def with_apps(tmp_path: Path, apps: str, extra: str = "") -> str:
    """The good configuration with its [apps.contoso] replaced by ``apps`` (same name)."""
    text = good_config(tmp_path)
    start = text.index("[apps.contoso]")
    end = text.index("[[listeners]]")
    return text[:start] + apps + "\n" + text[end:] + extra


def write_secret(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)


def service_account_json(**changes: object) -> str:
    account: dict[str, object] = {
        "type": "service_account",
        "project_id": "contoso-mail",
        "private_key_id": "0123456789abcdef",
        "private_key": "-----BEGIN PRIVATE KEY-----\nMIIE...\n-----END PRIVATE KEY-----\n",
        "client_email": "relay@contoso-mail.iam.gserviceaccount.com",
        "client_id": "104242424242424242424",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    account.update(changes)
    return json.dumps({k: v for k, v in account.items() if v is not None})


def test_google_app(tmp_path: Path) -> None:
    write_secret(tmp_path, "sa.json", service_account_json())
    text = with_apps(
        tmp_path, '[apps.contoso]\nprovider = "google"\nservice_account = { file = "sa.json" }\n'
    )
    app = load_config(write(tmp_path, text)).apps["contoso"]
    assert app.provider == "google"
    assert app.client_id == "relay@contoso-mail.iam.gserviceaccount.com"
    assert app.key_id == "0123456789abcdef"
    assert app.token_url == "https://oauth2.googleapis.com/token"
    assert app.scope == "https://mail.google.com/"
    assert app.private_key is not None
    assert app.private_key.origin == f"file {tmp_path / 'sa.json'}"
    assert "MIIE" not in repr(app)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not a service account JSON key"),
        (service_account_json(type="authorized_user"), "is not a service account JSON key"),
        (service_account_json(private_key=None), "has no private_key"),
        (service_account_json(token_uri="http://x/token"), "token_uri must be an https://"),
    ],
)
def test_google_service_account_problems(tmp_path: Path, content: str, message: str) -> None:
    write_secret(tmp_path, "sa.json", content)
    text = with_apps(
        tmp_path,
        '[apps.contoso]\nprovider = "google"\nservice_account = { file = "sa.json" }\n'
        'tenant = "x"\n',
    )
    found = problems(write(tmp_path, text))
    key = f"{tmp_path / 'config.toml'}: apps.contoso"
    assert any(p.startswith(f"{key}.service_account: ") and message in p for p in found), found
    assert f"{key}.tenant: does not apply to provider 'google'" in found


def test_oauth2_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KC_SECRET", "kc-secret")
    write_secret(
        tmp_path, "client.pem", "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"
    )
    text = with_apps(
        tmp_path,
        """[apps.contoso]
provider = "oauth2"
token_url = "https://idp.example/realms/mail/protocol/openid-connect/token"
client_id = "mail-proxy"
client_secret = { env = "KC_SECRET" }
scope = "mail"

[apps.jwt]
provider = "oauth2"
token_url = "https://idp.example/token"
client_id = "mail-proxy-jwt"
auth_method = "private_key_jwt"
private_key = { file = "client.pem" }
key_id = "k1"
scope = "mail"
""",
    )
    config = load_config(write(tmp_path, text))
    basic, jwt_app = config.apps["contoso"], config.apps["jwt"]
    assert basic.auth_method == "client_secret_basic"
    assert basic.client_secret is not None
    assert basic.client_secret.reveal() == "kc-secret"
    assert jwt_app.auth_method == "private_key_jwt"
    assert jwt_app.key_id == "k1"
    assert jwt_app.private_key is not None


def test_oauth2_problems(tmp_path: Path) -> None:
    text = with_apps(
        tmp_path,
        """[apps.contoso]
provider = "oauth2"
token_url = "http://idp.example/token"
client_id = "mail-proxy"
auth_method = "mtls"
tenant = "x"

[apps.jwt]
provider = "oauth2"
token_url = "https://idp.example/token"
client_id = "c"
scope = "mail"
auth_method = "private_key_jwt"
client_secret = { value = "s" }
""",
    )
    found = problems(write(tmp_path, text, 0o600))
    key = f"{tmp_path / 'config.toml'}: apps"
    expected = [
        f"{key}.contoso.token_url: must be an https:// URL",
        f"{key}.contoso.scope: is required",
        f"{key}.contoso.auth_method: must be one of",
        f"{key}.contoso.tenant: does not apply to provider 'oauth2'",
        f'{key}.jwt.private_key: is required with auth_method = "private_key_jwt"',
        f'{key}.jwt.client_secret: does not apply with auth_method = "private_key_jwt"',
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)


def test_oauth2_discovery_resources_and_expectations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KC_SECRET", "k" * 40)
    write_secret(
        tmp_path,
        "client.pem",
        "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"
        "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
    )
    text = with_apps(
        tmp_path,
        """[apps.contoso]
provider = "oauth2"
issuer = "https://sso.example.com/realms/mail"
client_id = "mail-proxy"
auth_method = "client_secret_jwt"
client_secret = { env = "KC_SECRET" }
assertion_audience = "token_endpoint"
resource = ["imap://mail.example.com", "smtp://mail.example.com"]
expect_audience = "dovecot"
expect_scope = []

[apps.tls]
provider = "oauth2"
issuer = "https://dev-1.okta.example/oauth2/default"
client_id = "0oa1"
auth_method = "tls_client_auth"
client_certificate = { file = "client.pem" }
scope = "mail.read"
""",
    )
    config = load_config(write(tmp_path, text))
    app, tls = config.apps["contoso"], config.apps["tls"]
    assert app.issuer == "https://sso.example.com/realms/mail"
    assert app.token_url == ""
    assert app.scope == ""
    assert app.resources == ("imap://mail.example.com", "smtp://mail.example.com")
    assert app.assertion_audience == "token_endpoint"
    assert app.expect_audience == ("dovecot",)
    assert app.expect_scope == ()
    assert tls.client_certificate is not None
    assert tls.expect_audience is None  # default: the resources asked for
    assert tls.expect_scope is None


def test_oauth2_new_problems(tmp_path: Path) -> None:
    text = with_apps(
        tmp_path,
        """[apps.both]
provider = "oauth2"
issuer = "https://idp.example"
token_url = "https://idp.example/token"
client_id = "c"
scope = "mail"
client_secret = { value = "s" }

[apps.neither]
provider = "oauth2"
client_id = "c"
client_secret = { value = "s" }

[apps.bad]
provider = "oauth2"
issuer = "https://idp.example/?realm=x"
client_id = "c"
resource = ["mail", "imap://mail#frag"]
auth_method = "client_secret_jwt"
client_secret = { value = "short" }
assertion_audience = "issuer"
client_certificate = { value = "x" }

[apps.tls]
provider = "oauth2"
token_url = "https://idp.example/token"
client_id = "c"
scope = "mail"
auth_method = "self_signed_tls_client_auth"
assertion_audience = "issuer"
key_id = "k"
""",
    )
    found = problems(write(tmp_path, text, 0o600))
    key = f"{tmp_path / 'config.toml'}: apps"
    expected = [
        f"{key}.both: set issuer (the server's metadata names its token endpoint) or token_url",
        f"{key}.neither.issuer: is required (or token_url",
        f"{key}.neither.scope: is required",
        f"{key}.bad.issuer: must be an https:// URL without query or fragment",
        f"{key}.bad.resource: 'mail' is not an absolute URI",
        f"{key}.bad.resource: 'imap://mail#frag' is not an absolute URI",
        f"{key}.bad.client_secret: is too short for client_secret_jwt",
        f'{key}.bad.client_certificate: does not apply with auth_method = "client_secret_jwt"',
        f'{key}.tls.client_certificate: is required with auth_method = "self_signed_tls',
        f"{key}.tls.assertion_audience: only applies with",
        f'{key}.tls.assertion_audience: "issuer" needs issuer',
        f"{key}.tls.key_id: only applies with",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)


CACHE_KEY = "q1QGv2x7a1ohxP8CRZ1ZPqsgqM1I1r6Tc0qGSzf0w6U="


def test_cache_defaults_to_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    assert load_config(write(tmp_path, good_config(tmp_path))).cache.kind == "memory"


def test_file_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    monkeypatch.setenv("XO_CACHE_KEY", CACHE_KEY)
    (tmp_path / "state").mkdir()
    text = good_config(tmp_path) + (
        '\n[cache]\nkind = "file"\npath = "state/tokens"\nkey = { env = "XO_CACHE_KEY" }\n'
    )
    cache = load_config(write(tmp_path, text)).cache
    assert cache.kind == "file"
    assert cache.path == tmp_path / "state" / "tokens"
    assert cache.key is not None
    assert cache.key.reveal() == CACHE_KEY
    (tmp_path / "state" / "tokens").write_bytes(b"x")
    (tmp_path / "state" / "tokens").chmod(0o644)
    assert any("cache.path: " in p and "chmod 600" in p for p in problems(write(tmp_path, text)))


def test_redis_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    monkeypatch.setenv("XO_CACHE_KEY", CACHE_KEY)
    monkeypatch.setenv("XO_REDIS_PASSWORD", "redis-pass")
    text = good_config(tmp_path) + (
        '\n[cache]\nkind = "redis"\nurl = "rediss://redis.internal:6380/2"\n'
        'key = { env = "XO_CACHE_KEY" }\npassword = { env = "XO_REDIS_PASSWORD" }\n'
        'prefix = "mail-proxy"\nlock_timeout = 10\n'
    )
    cache = load_config(write(tmp_path, text)).cache
    assert (cache.kind, cache.url, cache.prefix, cache.lock_timeout) == (
        "redis",
        "rediss://redis.internal:6380/2",
        "mail-proxy",
        10.0,
    )
    assert cache.password is not None
    assert "redis-pass" not in repr(cache)


def test_cache_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    monkeypatch.setenv("XO_WEAK_KEY", "correct horse battery staple")
    text = good_config(tmp_path) + (
        '\n[cache]\nkind = "redis"\nurl = "redis://:hunter2@redis:6379/0"\n'
        'key = { env = "XO_WEAK_KEY" }\npath = "tokens"\nlock_timeout = 0\ncolour = 1\n'
    )
    found = problems(write(tmp_path, text))
    key = f"{tmp_path / 'config.toml'}: cache"
    for start in (
        f"{key}.url: must not hold credentials",
        f"{key}.key: env XO_WEAK_KEY: must be 32 random bytes",
        f'{key}.path: does not apply to kind = "redis"',
        f"{key}.lock_timeout: must be a positive",
        f"{key}.colour: unknown key",
    ):
        assert any(p.startswith(start) for p in found), (start, found)
    assert not any("hunter2" in p or "horse" in p for p in found)
    no_key = good_config(tmp_path) + '\n[cache]\nkind = "file"\npath = "missing/tokens"\n'
    found = problems(write(tmp_path, no_key))
    assert any(p.startswith(f"{key}.key: is required") for p in found)
    assert any(p.startswith(f"{key}.path: directory") for p in found)


def test_the_shipped_example_is_valid_once_its_placeholders_are_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = (Path(__file__).parents[2] / "deploy" / "config.example.toml").read_text()
    certificate = TestPki(tmp_path / "pki").issue("proxy", "mail.contoso.com")
    placeholder = next(
        w for w in example.split('"') if w.startswith("$argon2id$") and "REPLACE" in w
    )
    text = example.replace("/etc/xoauth2-proxy/server.pem", str(certificate)).replace(
        placeholder, hash_password("pw", HashParameters(memory_cost=256, iterations=1, lanes=1))
    )
    monkeypatch.setenv("CONTOSO_SECRET", "s3cret")
    config = load_config(write(tmp_path, text))
    assert [listener.protocol for listener in config.listeners] == [
        Protocol.IMAP,
        Protocol.IMAP,
        Protocol.POP3,
        Protocol.SMTP,
    ]
    assert config.cache.kind == "memory"


def test_cheaper_than_default_hashes_are_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    strong = hash_password("new")  # today's default cost
    text = good_config(tmp_path).replace(f'"{HASH}"', f'["{strong}", "{HASH}"]')
    path = write(tmp_path, text)
    config = load_config(path)
    assert config.warnings == (
        f'{path}: users."Reports@contoso.com".password_hash[1]: argon2id m=64,t=1,p=1 costs '
        "less than the current default m=65536,t=3,p=4: when you next rotate this password, "
        "hash it again with `xoauth2-proxy hash-password`",
    )
    only_strong = good_config(tmp_path).replace(HASH, strong)
    assert load_config(write(tmp_path, only_strong)).warnings == ()


def test_app_identities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    (tmp_path / "clients-ca.pem").write_text("placeholder")
    fingerprint = "AB:" * 31 + "CD"
    text = (
        good_config(tmp_path).replace(
            'upstream_tls = "implicit"\n',
            'upstream_tls = "implicit"\nclient_ca_file = "clients-ca.pem"\n',
            1,
        )
        + f"""
[users.scanner]
certificate_fingerprint = "sha256:{fingerprint}"
certificate_subject = ["CN=scanner01,O=Contoso"]
app = "contoso"
mailbox = "scans@contoso.com"
mailboxes = ["scans@contoso.com", "*@reports.contoso.com"]

[users.erp]
app_key_hash = "sha256:{"0f" * 32}"
app = "contoso"
"""
    )
    config = load_config(write(tmp_path, text))
    listener = config.listeners[0]
    assert listener.client_ca_file == tmp_path / "clients-ca.pem"
    assert listener.client_certificates is ClientCertificates.OPTIONAL  # asked, not demanded
    scanner = config.users["scanner"]
    assert scanner.password_hashes == ()
    assert scanner.certificate_fingerprints == {fingerprint.replace(":", "").lower()}
    assert scanner.certificate_subjects == {"CN=scanner01,O=Contoso"}
    assert scanner.may_open("q3@reports.contoso.com")
    assert not scanner.may_open("ceo@contoso.com")
    assert config.users["erp"].app_key_hashes == {"0f" * 32}
    assert "0f0f" not in repr(config.users["erp"])


@pytest.mark.parametrize(
    ("addition", "problem"),
    [
        (
            '[users.x]\napp = "contoso"\n',
            'users."x": needs a credential: password_hash, certificate_fingerprint, '
            "certificate_subject or app_key_hash",
        ),
        (
            '[users.x]\napp = "contoso"\ncertificate_fingerprint = "abc"\n',
            "users.\"x\".certificate_fingerprint: not a SHA-256 fingerprint: 'abc'",
        ),
        (
            '[users.x]\napp = "contoso"\napp_key_hash = "md5:00"\n',
            'users."x".app_key_hash: must be the sha256:... line `app-key` printed',
        ),
        (
            f'[users.x]\napp = "contoso"\napp_key_hash = "sha256:{"1" * 64}"\n'
            f'[users.y]\napp = "contoso"\napp_key_hash = "sha256:{"1" * 64}"\n',
            'users."y".app_key_hash: the same app key hash is given to users."x"',
        ),
        (
            '[users.x]\napp = "contoso"\ncertificate_subject = "CN=x"\nmailboxes = []\n',
            'users."x".mailboxes: must list at least one mailbox or pattern',
        ),
    ],
)
def test_identity_mistakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, addition: str, problem: str
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    path = write(tmp_path, good_config(tmp_path) + "\n" + addition)
    assert f"{path}: {problem}" in problems(path)


def test_client_certificates_need_a_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    text = good_config(tmp_path).replace(
        'upstream_tls = "implicit"\n',
        'upstream_tls = "implicit"\nclient_certificates = "required"\n',
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}: listeners[0].client_ca_file: is required to ask clients for certificates"
    ]


@pytest.mark.parametrize(
    "name", ["login_timeout", "upstream_timeout", "token_timeout", "tls_handshake_timeout"]
)
def test_deadlines_must_be_positive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    path = write(tmp_path, good_config(tmp_path) + f"\n[limits]\n{name} = 0\n")
    assert problems(path) == [f"{path}: limits.{name}: must be a positive number of seconds"]


def test_mailbox_must_be_in_the_users_mailboxes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    text = good_config(tmp_path).replace(
        'protocols = ["imap"]',
        'protocols = ["imap"]\nmailbox = "ceo@contoso.com"\nmailboxes = ["reports-*@contoso.com"]',
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}: users.\"Reports@contoso.com\".mailbox: 'ceo@contoso.com' is not in the "
        "user's mailboxes"
    ]
    # Without a mailbox of its own, a user with a policy must name one at each login.
    load_config(write(tmp_path, text.replace('mailbox = "ceo@contoso.com"\n', "")))


def test_control_characters_in_logins_and_mailboxes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    text = (
        good_config(tmp_path)
        .replace('[users."Reports@contoso.com"]', '[users."Reports\\n@contoso.com"]')
        .replace('protocols = ["imap"]', 'protocols = ["imap"]\nmailbox = "a\\u0007@contoso.com"')
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f'{path}: users."Reports\\n@contoso.com": the login name contains control characters',
        f"{path}: users.\"Reports\\n@contoso.com\".mailbox: 'a\\x07@contoso.com' contains "
        "control characters",
    ]


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        (
            "trusted_lockout_after = 5",
            "trusted_lockout_after: must be at least lockout_after (10): networks a login "
            "works from get the higher ceiling",
        ),
        ("ipv4_prefix = 33", "ipv4_prefix: must be a whole number from 8 to 32"),
        ("ipv6_prefix = 8", "ipv6_prefix: must be a whole number from 16 to 128"),
        ("failure_window = 0", "failure_window: must be a positive number of seconds"),
        ("max_early_upstreams = 1.5", "max_early_upstreams: must be a whole number of at least 0"),
        ("upstream_pool = 2.5", "upstream_pool: must be a whole number from 0 to 100"),
        ("upstream_pool = 101", "upstream_pool: must be a whole number from 0 to 100"),
        (
            "upstream_pool_max_age = 0",
            "upstream_pool_max_age: must be a positive number of seconds",
        ),
        ("ticket_key_lifetime = 0", "ticket_key_lifetime: must be a positive number of seconds"),
    ],
)
def test_throttle_and_network_limits_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: str, problem: str
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    path = write(tmp_path, good_config(tmp_path) + f"\n[limits]\n{limits}\n")
    assert problems(path) == [f"{path}: limits.{problem}"]


def test_limits_of_earlier_versions_are_accepted_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    text = "\n[limits]\nlockout_time = 600\nmax_connections_per_address = 7\n"
    config = load_config(write(tmp_path, good_config(tmp_path) + text))
    assert config.limits.max_connections_per_network == 7
    assert [w.split(": ")[1] for w in config.warnings if ": limits." in w] == [
        "limits.lockout_time",
        "limits.max_connections_per_address",
    ]
    default = load_config(write(tmp_path, good_config(tmp_path)))
    assert default.limits.throttle_policy().network_of("2001:db8::1") == "2001:db8::/64"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (
            '[users."rep\\u202eorts@contoso.com"]\npassword_hash = "HASH"\napp = "contoso"\n'
            'mailbox = "reports@contoso.com"',
            'users."rep\u202eorts@contoso.com": the login name contains invisible formatting '
            "characters (Unicode Cf)",
        ),
        (
            '[users."erp"]\npassword_hash = "HASH"\napp = "contoso"\n'
            'mailbox = "erp@contoso.com"\nmailboxes = ["erp@contoso.com", "erp-* x@contoso.com"]',
            "users.\"erp\".mailboxes: 'erp-* x@contoso.com' is not a plain address "
            "(local@domain; * in patterns)",
        ),
    ],
)
def test_names_that_could_pass_for_others_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, problem: str
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    path = write(tmp_path, good_config(tmp_path) + "\n" + table.replace("HASH", HASH) + "\n")
    assert problems(path) == [f"{path}: {problem}"]


@pytest.mark.parametrize(
    ("listen", "allowed"),
    [
        ("127.0.0.1:1993", True),
        ("127.1.2.3:1993", True),
        ("[::1]:1993", True),
        ("localhost:1993", True),
        ("0.0.0.0:1993", False),
        ("[::]:1993", False),
        ("192.0.2.10:1993", False),
        ("mail.example.com:1993", False),
        ("localhost.example.com:1993", False),
        ("127.0.0.1.example.com:1993", False),
    ],
)
def test_plaintext_only_on_loopback_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listen: str, allowed: bool
) -> None:
    """A host name other than localhost may resolve anywhere: only loopback addresses and
    localhost may listen without TLS unless the listener opts in."""
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    text = good_config(tmp_path).replace(
        'tls = "implicit"\ncertificate = { file = "server.pem" }', 'tls = "none"'
    )
    path = write(tmp_path, text.replace("127.0.0.1:1993", listen))
    if allowed:
        assert load_config(path).listeners[0].tls is ClientTls.NONE
    else:
        assert problems(path) == [
            f"{path}: listeners[0].tls: plaintext on a non-loopback address sends passwords "
            "in the clear; use TLS, or set allow_plaintext = true"
        ]


@pytest.mark.parametrize(
    ("source", "setup", "problem"),
    [
        ('{ file = "secret" }', "missing", "cannot read {dir}/secret: No such file or directory"),
        ('{ file = "secret" }', "empty", "{dir}/secret is empty"),
        ('{ file = "secret" }', "blank", "{dir}/secret is empty"),
        ('{ file = "secret" }', "binary", "{dir}/secret is not UTF-8 text"),
        ('{ vault = "secret" }', "", "unknown secret source 'vault'; use env, file or value"),
        ('{ file = "" }', "", "file must be a non-empty string"),
        ('{ env = "XO_UNSET_FOR_TEST" }', "", "environment variable XO_UNSET_FOR_TEST is not set"),
        ('{ env = "A", file = "b" }', "", "must be one of"),
        ('"plain-text-secret"', "", "put the secret in"),
    ],
)
def test_every_bad_secret_source_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, setup: str, problem: str
) -> None:
    monkeypatch.delenv("XO_UNSET_FOR_TEST", raising=False)
    secret = tmp_path / "secret"
    if setup in ("empty", "blank", "binary"):
        secret.write_bytes({"empty": b"", "blank": b" \n\t\n", "binary": b"\xff\xfe"}[setup])
        secret.chmod(0o600)
    text = good_config(tmp_path).replace('{ env = "XO_TEST_SECRET" }', source)
    path = write(tmp_path, text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: apps.contoso.client_secret: ")
    assert problem.format(dir=tmp_path) in found[0]
    assert "plain-text-secret" not in found[0]


def test_operations_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    base = good_config(tmp_path)
    config = load_config(write(tmp_path, base))
    assert (config.metrics, config.control_socket, config.log_format) == (None, None, "text")
    listener = config.listeners[0]
    assert not listener.proxy_protocol
    (tmp_path / "run").mkdir()
    extra = '\n[metrics]\n\n[control]\nsocket = "run/control.sock"\n\n[logging]\nformat = "json"\n'
    config = load_config(write(tmp_path, base + extra))
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9464)  # loopback
    assert config.control_socket == tmp_path / "run" / "control.sock"
    assert config.log_format == "json"
    proxied = base.replace(
        'upstream_tls = "implicit"',
        'upstream_tls = "implicit"\nproxy_protocol = true\n'
        'trusted_proxies = ["10.0.0.0/8", "2001:db8::1"]\nupstream_client_address = "proxy-v2"',
    )
    config = load_config(write(tmp_path, proxied + '\n[metrics]\nlisten = "[::1]:9100"\n'))
    listener = config.listeners[0]
    assert listener.proxy_protocol
    assert [str(n) for n in listener.trusted_proxies] == ["10.0.0.0/8", "2001:db8::1/128"]
    assert listener.upstream_client_address.value == "proxy-v2"
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("::1", 9100)


def test_operations_settings_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    base = good_config(tmp_path).replace(
        'upstream_tls = "implicit"',
        'upstream_tls = "implicit"\nproxy_protocol = true\nupstream_client_address = "x"',
    )
    text = base + (
        '\n[metrics]\nlisten = "nowhere"\nport = 1\n\n[control]\nsocket = "open/c.sock"\n'
        '\n[logging]\nformat = "xml"\n'
    )
    found = problems(write(tmp_path, text))
    path = tmp_path / "config.toml"
    assert f"{path}: listeners[0].trusted_proxies: is required with proxy_protocol = true" in (
        "\n".join(found)
    )
    assert any("listeners[0].upstream_client_address: must be one of" in p for p in found)
    assert f"{path}: metrics.listen: must be host:port, not 'nowhere'" in found
    assert f"{path}: metrics.port: unknown key" in found
    assert any("control.socket: directory" in p and "writable by every user" in p for p in found)
    assert any("logging.format: must be one of text, json" in p for p in found)
    lonely = good_config(tmp_path).replace(
        'upstream_tls = "implicit"', 'upstream_tls = "implicit"\ntrusted_proxies = ["bad"]'
    )
    found = problems(write(tmp_path, lonely))
    assert f"{path}: listeners[0].trusted_proxies: not an address or network: 'bad'" in found
    assert f"{path}: listeners[0].trusted_proxies: only applies with proxy_protocol = true" in found


def delegated_config(tmp_path: Path, apps: str, *, cache: str = "", users: str = "") -> str:
    (tmp_path / "server.pem").write_text("placeholder")
    (tmp_path / "server.pem").chmod(0o600)
    (tmp_path / "cache.key").write_text("A" * 43 + "=\n")
    (tmp_path / "cache.key").chmod(0o600)
    cache = cache or '[cache]\nkind = "file"\npath = "tokens"\nkey = { file = "cache.key" }\n'
    return f"""{apps}
{cache}
[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "implicit"
certificate = {{ file = "server.pem" }}
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

{
        users
        or f'''[users."jane"]
password_hash = "{HASH}"
app = "personal"
mailbox = "jane@outlook.com"
'''
    }"""


def test_delegated_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_GOOGLE_SECRET", "GOCSPX-secret")
    config = load_config(
        write(
            tmp_path,
            delegated_config(
                tmp_path,
                """
[apps.personal]
provider = "microsoft"
delegated = true
client_id = "11111111-2222-3333-4444-555555555555"

[apps.gmail]
provider = "google"
delegated = true
client_id = "123-abc.apps.googleusercontent.com"
client_secret = { env = "XO_GOOGLE_SECRET" }
redirect_uri = "http://localhost:8765/"

[apps.keycloak]
provider = "oauth2"
delegated = true
issuer = "https://sso.example.com/realms/mail"
client_id = "mail-proxy"
auth_method = "none"
scope = "mail"
""",
                users=f'''[users."jane"]
password_hash = "{HASH}"
app = "personal"
mailbox = "shared@outlook.com"
account = "Jane@Outlook.com"

[users."jane-scanner"]
password_hash = "{HASH}"
app = "personal"
mailbox = "jane@outlook.com"

[users."bob@gmail.com"]
password_hash = "{HASH}"
app = "gmail"
''',
            ),
        )
    )
    personal = config.apps["personal"]
    assert personal.delegated
    assert personal.tenant == "common"
    assert personal.client_secret is None
    assert "IMAP.AccessAsUser.All" in personal.scope
    assert personal.redirect_uri == "http://127.0.0.1"
    gmail = config.apps["gmail"]
    assert (gmail.scope, gmail.auth_method) == ("https://mail.google.com/", "client_secret_post")
    assert gmail.token_url == "https://oauth2.googleapis.com/token"
    assert gmail.redirect_uri == "http://localhost:8765/"
    assert config.apps["keycloak"].auth_method == "none"
    assert config.delegated_accounts() == {
        "personal": {"jane@outlook.com": ["jane", "jane-scanner"]},
        "gmail": {"bob@gmail.com": ["bob@gmail.com"]},
    }
    user = config.user("jane")
    assert user is not None
    assert user.signs_in_as == "Jane@Outlook.com"


def test_delegated_app_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    found = problems(
        write(
            tmp_path,
            delegated_config(
                tmp_path,
                """
[apps.personal]
provider = "microsoft"
delegated = "yes"
client_id = "11111111-2222-3333-4444-555555555555"
tenant = "consumers"
client_secret = { env = "XO_TEST_SECRET" }
redirect_uri = "https://example.com/callback"

[apps.personal2]
provider = "microsoft"
delegated = true
client_id = "11111111-2222-3333-4444-555555555555"
scope = "https://outlook.office365.com/.default"

[apps.gmail]
provider = "google"
delegated = true
client_id = "123.apps.googleusercontent.com"
service_account = { file = "sa.json" }

[apps.sa]
provider = "google"
client_id = "123.apps.googleusercontent.com"
service_account = { file = "sa.json" }

[apps.generic]
provider = "oauth2"
delegated = true
token_url = "https://sso.example.com/token"
client_id = "x"
auth_method = "none"
scope = "mail"

[apps.appOnly]
provider = "oauth2"
token_url = "https://sso.example.com/token"
client_id = "x"
auth_method = "none"
scope = "mail"

[apps.plain]
provider = "oauth2"
token_url = "https://sso.example.com/token"
client_id = "x"
auth_method = "client_secret_post"
client_secret = { env = "XO_TEST_SECRET" }
scope = "mail"
""",
                cache='[cache]\nkind = "memory"\n',
                users=f'''[users."jane"]
password_hash = "{HASH}"
app = "plain"
account = "jane@example.com"
''',
            ),
        )
    )
    text = "\n".join(found)
    for expected in (
        "apps.personal.delegated: must be true or false",
        "apps.personal.tenant: 'consumers' cannot issue app-only tokens",
        "apps.personal.redirect_uri: only applies with delegated = true",
        "apps.personal2.scope: a /.default scope is for app-only tokens",
        "apps.gmail.service_account: does not apply with delegated = true",
        "apps.gmail.client_secret: is required",
        "apps.sa.client_id: only applies with delegated = true",
        "apps.generic: a delegated app without issuer needs authorization_url",
        "apps.appOnly.auth_method: must be one of",
        'users."jane".account: only applies to users of delegated apps',
        "cache.kind: delegated apps (apps.generic, apps.gmail, apps.personal2) keep people",
    ):
        assert expected in text, (expected, found)


def test_redirect_uri_must_be_a_loopback(tmp_path: Path) -> None:
    for bad in ("http://example.com", "https://127.0.0.1", "http://127.0.0.1:99999", "x"):
        path = write(
            tmp_path,
            delegated_config(
                tmp_path,
                f"""
[apps.personal]
provider = "microsoft"
delegated = true
client_id = "11111111-2222-3333-4444-555555555555"
redirect_uri = "{bad}"
""",
            ),
        )
        assert any("redirect_uri: must be http://127.0.0.1" in p for p in problems(path)), bad


def test_the_control_socket_s_directories_are_checked_all_the_way_up(tmp_path: Path) -> None:
    """Not only its own directory: one above it that everyone may write lets anyone rename
    the path away and put their own socket in the proxy's place."""
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "open" / "run").mkdir(mode=0o700)
    text = good_config(tmp_path) + '\n[control]\nsocket = "open/run/c.sock"\n'
    found = problems(write(tmp_path, text))
    assert any(
        f"control.socket: directory {tmp_path / 'open'} is writable by every user" in p
        for p in found
    ), found
