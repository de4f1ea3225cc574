"""An app consented for some protocols and not others, as tenants really set them up.

Dovecot 2.3 cannot check the ``roles`` array claim (its oauth2 passdb reads only scalar
claims), so the test upstream would accept a token for any protocol: the role check is the
proxy's, and this shows it holds. The app here has ``IMAP.AccessAsApp`` only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import (
    IMAP_ONLY_CLIENT_ID,
    MAILBOX,
    PASSWORD,
    Listener,
    ProxyRig,
    start_proxy,
)
from tests.e2e.helpers import in_thread
from tests.e2e.test_abuse import login
from tests.e2e.test_pop3 import pass_reply
from tests.e2e.test_smtp import auth_result

if TYPE_CHECKING:
    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.e2e]


async def test_an_app_with_imap_only_opens_imap_and_nothing_else(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.apps["imaponly"] = IMAP_ONLY_CLIENT_ID
    rig.users.clear()
    rig.add_user(MAILBOX, PASSWORD, app="imaponly")
    path = rig.write(
        [
            Listener(upstream_port=dovecot.ports.imaps),
            Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s),
            Listener(protocol="smtp", upstream_port=dovecot.ports.submissions or 0),
        ]
    )
    proxy = await start_proxy(nursery, path)
    log_before = len(dovecot.log_text())
    imap = await in_thread(lambda: login(pki, proxy.port_of(0), PASSWORD))
    pop3 = await in_thread(lambda: pass_reply(pki, proxy.port_of(1), MAILBOX, PASSWORD))
    smtp = await in_thread(lambda: auth_result(pki, proxy.port_of(2), MAILBOX, PASSWORD))
    assert imap.startswith(b"a1 OK"), imap  # Dovecot verified the token
    assert pop3.startswith(b"-ERR [SYS/TEMP]"), pop3  # temporary: an administrator can fix it
    assert smtp.startswith(b"454 4.7.0"), smtp
    for role, protocol in (("POP.AccessAsApp", "POP3"), ("SMTP.SendAsApp", "SMTP")):
        assert (
            f"the token of app 'imaponly' lacks the {role} role (its roles: IMAP.AccessAsApp), "
            f"so {protocol} would refuse it"
        ) in caplog.text
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("audit")]
    assert [a["result"] for a in audit] == ["success", "temporary-failure", "temporary-failure"]
    # The two refused tokens never reached the upstream: only the IMAP login did.
    upstream = dovecot.log_text()[log_before:]
    assert "imap-login: Info: Login: user=<reports@contoso.com>, method=XOAUTH2" in upstream
    assert "pop3-login: Info: Login" not in upstream
    assert "submission-login: Info: Login" not in upstream
    assert upstream.count("method=XOAUTH2") == 1
