"""deploy/kubernetes, rendered with kustomize (``kubectl kustomize``, as ``kubectl apply -k``
does) and checked: every object against the Kubernetes API's schemas (kubernetes-validate,
strict: unknown fields are errors) and the pieces against each other (selectors, ports,
Secrets, drain time). tests/e2e/test_container.py runs ``check`` in the image, as the
pod's user, on the files the pod would see, made from the rendered ConfigMap and Secrets.

No cluster runs here: what a cluster would add (scheduling, probes running, the image
pulled) is not tested; the container test runs the image itself.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
import tomllib
from typing import TYPE_CHECKING, Any

import kubernetes_validate
import pytest
import yaml

from tests.support.certs import TestPki
from tests.support.sources import ROOT

if TYPE_CHECKING:
    from pathlib import Path

MANIFESTS = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes release still maintained when this was written, and the newest
#: whose schemas kubernetes-validate carries.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())

Object = dict[str, Any]


def render(work: Path) -> list[Object]:
    """``kubectl kustomize`` of a copy in ``work``, with the secret files an operator
    provides."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: run tests/install-deps.sh"
    copy = work / "kubernetes"
    shutil.copytree(MANIFESTS, copy, ignore=shutil.ignore_patterns("secrets"))
    (copy / "secrets").mkdir()
    pki = TestPki(work / "pki")
    (copy / "secrets" / "server.pem").write_bytes(
        pki.issue("server", "mail-proxy.contoso.com").read_bytes()
    )
    (copy / "secrets" / "client-secret").write_text("entra-client-secret-value\n")
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    (copy / "secrets" / "cache-key").write_text(key + "\n")
    (copy / "secrets" / "redis-password").write_text("redis-password\n")
    done = subprocess.run(
        [kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Object]:
    return render(tmp_path_factory.mktemp("kubernetes"))


def find(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def by_prefix(objects: list[Object], kind: str, prefix: str) -> Object:
    """A generated object: its name has a content hash appended."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"{kind} {prefix}*: {len(found)} found"
    return found[0]


def test_every_object_is_valid_for_the_api(rendered: list[Object]) -> None:
    kinds = sorted(f"{o['kind']}/{o['metadata']['name'].split('-')[-1]}" for o in rendered)
    assert len(rendered) == 10, kinds
    for version in VERSIONS:
        for item in rendered:
            try:
                kubernetes_validate.validate(item, version, strict=True)
            except Exception as exc:  # its own errors, and jsonschema's
                pytest.fail(f"{item['kind']} {item['metadata']['name']} ({version}): {exc}")
    assert all(o["metadata"].get("namespace") == "xoauth2-proxy" for o in rendered[1:])


def test_the_proxy_deployment(rendered: list[Object]) -> None:
    deployment = find(rendered, "Deployment", "xoauth2-proxy")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert container["image"] == "registry.example.com/xoauth2-proxy:0.1.0"

    # Non-root, read-only, no privileges.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]

    # Probes on the operations listener: readiness knows about tokens and stopping.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    # The drain: the preStop pause, then serve's --grace, must fit in the kill deadline.
    args = container["args"]
    assert args[0] == "serve"
    grace = float(args[args.index("--grace") + 1])
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= pause + grace + 5


def test_services_and_budget_select_the_pods(rendered: list[Object]) -> None:
    pods = find(rendered, "Deployment", "xoauth2-proxy")["spec"]["template"]
    labels = pods["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in pods["spec"]["containers"][0]["ports"]}
    service = find(rendered, "Service", "xoauth2-proxy")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["port"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        993: "imaps",
        995: "pop3s",
        587: "submission",
    }
    assert set(ports) == {"imaps", "pop3s", "submission", "metrics"}
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # clients' own addresses
    budget = find(rendered, "PodDisruptionBudget", "xoauth2-proxy")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1


def test_the_configuration_matches_the_manifests(rendered: list[Object]) -> None:
    config_map = by_prefix(rendered, "ConfigMap", "xoauth2-proxy-config-")
    config = tomllib.loads(config_map["data"]["config.toml"])
    pods = find(rendered, "Deployment", "xoauth2-proxy")["spec"]["template"]["spec"]
    container_ports = {p["containerPort"] for p in pods["containers"][0]["ports"]}
    listen_ports = {int(listener["listen"].rsplit(":", 1)[1]) for listener in config["listeners"]}
    metrics_port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    assert listen_ports | {metrics_port} == container_ports

    # Both replicas use the example Redis through its Service, with its password.
    assert config["cache"]["kind"] == "redis"
    redis_service = find(rendered, "Service", "xoauth2-proxy-redis")
    assert config["cache"]["url"] == (
        f"redis://{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/0"
    )
    redis = find(rendered, "Deployment", "xoauth2-proxy-redis")["spec"]["template"]
    assert redis_service["spec"]["selector"].items() <= redis["metadata"]["labels"].items()
    password = redis["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    generated = by_prefix(rendered, "Secret", "xoauth2-proxy-secrets-")
    assert password["name"] == generated["metadata"]["name"]
    assert password["key"] in generated["data"]
