"""deploy/container's image, built and run as an operator would: rootful podman, the base
image made from Debian's packages (no registry is reachable here), the configuration and
the secrets mounted read-only, a login through it with a real client against the test
Dovecot and the emulated Entra, its health check, and ``podman stop`` draining a session.

Facts of this machine the commands follow: Debian's crun refuses this host's hybrid
cgroup layout, so runc runs the containers; a container's ulimits must fit within the
host's (open files at most the hard limit); pip inside the build reaches PyPI through a
gateway whose CA is in the host's bundle, given to the build as a secret. The container
shares the host's network, where the test Dovecot and identity provider listen on
loopback. If podman or debootstrap is missing, the test fails: tests/install-deps.sh
installs them.
"""

from __future__ import annotations

import base64
import imaplib
import os
import resource
import shutil
import socket
import ssl
import subprocess
import time
from typing import TYPE_CHECKING

import pytest

from proxy.identities import hash_password
from tests.deploy.test_kubernetes import find, render
from tests.e2e.conftest import CLIENT_ID, CLIENT_SECRET, MAILBOX, PASSWORD, TEST_HASH
from tests.support.sources import ROOT, copy_sources

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = pytest.mark.e2e

BASE = "localhost/debian:bookworm"
IMAGE = "localhost/xoauth2-proxy:test"
UID = 10001  # the image's user
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # the host's, locally added CAs included


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", "--runtime", "runc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done


def ulimits() -> list[str]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", "nproc=32768:32768"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    for program in ("podman", "runc", "debootstrap"):
        assert shutil.which(program), f"{program} is missing: run tests/install-deps.sh"
    if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode != 0:
        base = subprocess.run(
            ["sh", str(ROOT / "deploy/container/debian-base.sh"), BASE],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert base.returncode == 0, base.stdout[-3000:] + base.stderr[-3000:]
    context = copy_sources(tmp_path_factory.mktemp("context"))
    podman(
        "build",
        "--format",
        "docker",  # keeps HEALTHCHECK
        *ulimits(),
        "--build-arg",
        f"BASE={BASE}",
        "--secret",
        f"id=ca,src={CA_BUNDLE}",
        "-f",
        str(context / "deploy/container/Containerfile"),
        "-t",
        IMAGE,
        str(context),
        timeout=1200,
    )
    return IMAGE


def private(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, UID, UID)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        done = podman("logs", self.name)
        return done.stdout + done.stderr

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in self.logs():
            state = podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            if state not in ("running", "stopping"):
                pytest.fail(f"the container is {state}:\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} in the container's log:\n{self.logs()}")
            time.sleep(0.2)


@pytest.fixture
def container(
    image: str,
    tmp_path: Path,
    pki: TestPki,
    idp: EntraEmulator,
    dovecot: Dovecot,
) -> Iterator[tuple[Container, int]]:
    """The image serving IMAP on a free loopback port, configured through mounts only."""
    port = free_port()
    etc = tmp_path / "etc"
    secrets = tmp_path / "secrets"
    for directory in (etc, secrets):
        directory.mkdir()
        directory.chmod(0o700)
        os.chown(directory, UID, UID)
    assert pki.ca_file.exists()
    private(etc / "server.pem", pki.issue("container", "localhost", "127.0.0.1").read_text())
    private(etc / "idp-ca.pem", idp.ca_file.read_text(), 0o644)
    private(etc / "upstream-ca.pem", dovecot.ca_file.read_text(), 0o644)
    private(secrets / "client-secret", CLIENT_SECRET + "\n")
    private(
        etc / "config.toml",
        f"""\
[apps.contoso]
provider = "microsoft"
tenant = "{idp.tenant}"
client_id = "{CLIENT_ID}"
client_secret = {{ file = "/run/secrets/xoauth2-proxy/client-secret" }}
authority = "{idp.authority}"
ca_file = "/etc/xoauth2-proxy/idp-ca.pem"

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:{port}"
tls = "implicit"
certificate = {{ file = "/etc/xoauth2-proxy/server.pem" }}
upstream = "127.0.0.1:{dovecot.ports.imaps}"
upstream_tls = "implicit"
upstream_ca_file = "/etc/xoauth2-proxy/upstream-ca.pem"

[users."{MAILBOX}"]
password_hash = "{hash_password(PASSWORD, TEST_HASH)}"
app = "contoso"
""",
    )
    name = f"xoauth2-proxy-test-{os.getpid()}-{port}"
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--init",
        "--network",
        "host",
        "--read-only",
        *ulimits(),
        "-v",
        f"{etc}:/etc/xoauth2-proxy:ro",
        "-v",
        f"{secrets}:/run/secrets/xoauth2-proxy:ro",
        image,
        "serve",
        "--grace",
        "30",
    )
    running = Container(name)
    try:
        running.wait_for_log(f"listening on 127.0.0.1:{port} ")
        yield running, port
    finally:
        print(running.logs())
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", "--volumes", name], check=False, timeout=60
        )


def imap_login(pki: TestPki, port: int) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    imap = imaplib.IMAP4_SSL("localhost", port, ssl_context=context, timeout=30)
    imap.login(MAILBOX, PASSWORD)
    return imap


def test_container_serves_checks_its_health_and_drains_on_stop(
    container: tuple[Container, int], pki: TestPki
) -> None:
    running, port = container
    assert podman("exec", running.name, "id", "-u").stdout.strip() == str(UID)
    # Only what runs the proxy: no pip, no test tools, no compiler, no venv module.
    found = podman(
        "exec",
        running.name,
        "python3",
        "-c",
        "import importlib.util as u, shutil; print(sorted("
        "[m for m in ('pip', 'pytest', 'hypothesis', 'mypy', 'ensurepip') if u.find_spec(m)]"
        " + [c for c in ('gcc', 'cc', 'apt-get') if shutil.which(c)]))",
    ).stdout.strip()
    assert found == "['apt-get']", found  # apt itself is in every Debian image

    with imap_login(pki, port) as imap:
        status, data = imap.select("INBOX", readonly=True)
        assert status == "OK", data
        imap.logout()
    assert f"logged in to the upstream as '{MAILBOX}'" in running.logs()

    # The image's HEALTHCHECK: the configuration checks and every listener accepts.
    podman("healthcheck", "run", running.name)

    # podman stop sends SIGTERM through --init: serve stops accepting, and the session in
    # progress goes on until it ends (within --grace); then the container exits 0.
    session = imap_login(pki, port)
    with subprocess.Popen(
        ["podman", "--runtime", "runc", "stop", "--time", "60", running.name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as stop:
        try:
            running.wait_for_log("SIGTERM received: shutting down")
            running.wait_for_log("no longer accepting")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
            status, data = session.select("INBOX", readonly=True)
            assert status == "OK", data
            assert session.logout()[0] == "BYE"
            _, errors = stop.communicate(timeout=90)
            assert stop.returncode == 0, errors
        finally:
            if session.state != "LOGOUT":  # a failure before the logout
                session.shutdown()
            if stop.poll() is None:
                stop.kill()
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", running.name).stdout
    assert exit_code.strip() == "0", running.logs()


def test_kubernetes_pod_files_pass_check_in_the_image(image: str, tmp_path: Path) -> None:
    """deploy/kubernetes's pod, as far as a pod can be had without a cluster: the image
    runs ``check`` as the pod's user and group on the files the kubelet would mount, made
    from the rendered ConfigMap and Secrets (Secrets owned by root, readable by the
    fsGroup only: mode 0440), at the same paths."""
    rendered = render(tmp_path)
    pod = find(rendered, "Deployment", "xoauth2-proxy")["spec"]["template"]["spec"]
    group = pod["securityContext"]["fsGroup"]
    user = pod["securityContext"]["runAsUser"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = []
    for index, mount in enumerate(pod["containers"][0]["volumeMounts"]):
        volume = volumes[mount["name"]]
        directory = tmp_path / f"volume-{index}"
        directory.mkdir(mode=0o755)
        if "configMap" in volume:
            for key, text in find(rendered, "ConfigMap", volume["configMap"]["name"])[
                "data"
            ].items():
                (directory / key).write_text(text)
                (directory / key).chmod(0o644)
        elif "secret" in volume:
            for key, encoded in find(rendered, "Secret", volume["secret"]["secretName"])[
                "data"
            ].items():
                (directory / key).write_bytes(base64.b64decode(encoded))
                os.chown(directory / key, 0, group)
                (directory / key).chmod(volume["secret"]["defaultMode"])
        else:
            continue  # emptyDir: nothing in it
        mounts += ["-v", f"{directory}:{mount['mountPath']}:ro"]
    run = ["podman", "--runtime", "runc", "run", "--rm", "--network=none", "--no-healthcheck"]
    done = subprocess.run(
        [*run, "--read-only", *ulimits(), "--user", f"{user}:{group}", *mounts, image, "check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/etc/xoauth2-proxy/config.toml: OK (1 apps, 3 listeners, 1 users)\n"
    assert done.stderr == ""  # no warning either: no inline secret, a hash at full cost


@pytest.fixture(scope="module")
def systemd_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image with systemd as PID 1 and deploy/systemd's unit installed as its comments
    say (the user exists in the image; the executable is linked where the unit runs it)."""
    context = tmp_path_factory.mktemp("systemd")
    shutil.copy(ROOT / "deploy/systemd/xoauth2-proxy.service", context)
    (context / "Containerfile").write_text(f"""\
FROM {image}
USER root
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        systemd systemd-sysv \\
 && rm -rf /var/lib/apt/lists/* \\
 && ln -s /opt/xoauth2-proxy/bin/xoauth2-proxy /usr/local/bin/xoauth2-proxy
COPY xoauth2-proxy.service /etc/systemd/system/
RUN systemctl enable xoauth2-proxy
ENTRYPOINT []
CMD ["/sbin/init"]
""")
    tag = "localhost/xoauth2-proxy-systemd:test"
    podman("build", *ulimits(), "-t", tag, str(context), timeout=900)
    return tag


def test_systemd_unit_started_by_systemd(
    systemd_image: str, tmp_path: Path, pki: TestPki, idp: EntraEmulator, dovecot: Dovecot
) -> None:
    """deploy/systemd's unit run by a real systemd (PID 1 in a container: it is not PID 1
    on the machine the tests run on): check before start, serve as the unit's user, a
    login through it, a reload, a reload refused for a broken configuration while the
    service goes on, and a stop with a session open that ends cleanly."""
    port = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o700)
    os.chown(etc, UID, UID)
    private(etc / "server.pem", pki.issue("systemd", "localhost", "127.0.0.1").read_text())
    private(etc / "idp-ca.pem", idp.ca_file.read_text(), 0o644)
    private(etc / "upstream-ca.pem", dovecot.ca_file.read_text(), 0o644)
    private(etc / "client-secret", CLIENT_SECRET + "\n")
    config = f"""\
[apps.contoso]
provider = "microsoft"
tenant = "{idp.tenant}"
client_id = "{CLIENT_ID}"
client_secret = {{ file = "/etc/xoauth2-proxy/client-secret" }}
authority = "{idp.authority}"
ca_file = "/etc/xoauth2-proxy/idp-ca.pem"

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:{port}"
tls = "implicit"
certificate = {{ file = "/etc/xoauth2-proxy/server.pem" }}
upstream = "127.0.0.1:{dovecot.ports.imaps}"
upstream_tls = "implicit"
upstream_ca_file = "/etc/xoauth2-proxy/upstream-ca.pem"

[users."{MAILBOX}"]
password_hash = "{hash_password(PASSWORD, TEST_HASH)}"
app = "contoso"
"""
    private(etc / "config.toml", config)
    name = f"xoauth2-proxy-systemd-{os.getpid()}-{port}"
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--systemd=always",
        "--network",
        "host",
        *ulimits(),
        "-v",
        f"{etc}:/etc/xoauth2-proxy:ro",
        systemd_image,
    )

    def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", "exec", name, "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def journal() -> str:
        return podman("exec", name, "journalctl", "-u", "xoauth2-proxy", "--no-pager").stdout

    def wait_for_journal(text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in journal():
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} in the unit's journal:\n{journal()}")
            time.sleep(0.2)

    try:
        wait_for_journal(f"listening on 127.0.0.1:{port} ")
        assert systemctl("is-active", "xoauth2-proxy").stdout.strip() == "active"
        assert (
            "check (code=exited, status=0/SUCCESS)" in systemctl("status", "xoauth2-proxy").stdout
        )
        pid = systemctl("show", "-p", "MainPID", "--value", "xoauth2-proxy").stdout.strip()
        owner = podman("exec", name, "stat", "-c", "%U", f"/proc/{pid}").stdout.strip()
        assert owner == "xoauth2-proxy"

        with imap_login(pki, port) as imap:
            assert imap.select("INBOX", readonly=True)[0] == "OK"
            imap.logout()

        assert systemctl("reload", "xoauth2-proxy").returncode == 0
        wait_for_journal("configuration reloaded")
        # A broken configuration: ExecReload's check refuses it, nothing is signalled.
        private(etc / "config.toml", config + "\n[users.broken]\npassword_hash = 7\n")
        assert systemctl("reload", "xoauth2-proxy").returncode != 0
        assert systemctl("is-active", "xoauth2-proxy").stdout.strip() == "active"
        assert journal().count("SIGHUP received") == 1
        private(etc / "config.toml", config)

        session = imap_login(pki, port)
        try:
            with subprocess.Popen(
                ["podman", "exec", name, "systemctl", "stop", "xoauth2-proxy"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ) as stop:
                wait_for_journal("no longer accepting")
                assert session.select("INBOX", readonly=True)[0] == "OK"
                assert session.logout()[0] == "BYE"
                _, errors = stop.communicate(timeout=90)
                assert stop.returncode == 0, errors
        finally:
            if session.state != "LOGOUT":
                session.shutdown()
        shown = systemctl("show", "-p", "Result", "-p", "ExecMainStatus", "xoauth2-proxy")
        assert shown.stdout.split() == ["Result=success", "ExecMainStatus=0"], journal()
    finally:
        print(journal())
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", "--volumes", name], check=False, timeout=60
        )
