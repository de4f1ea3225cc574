#!/bin/sh
# Install the Debian packages the test suite and the sandbox run for real: Python's venv
# (README's commands install the proxy into .venv), Dovecot (IMAP, POP3, submission) as
# the upstream, Redis, the command-line mail clients run by the end-to-end tests, git (the
# package tests copy the files it tracks),
# systemd-analyze to check deploy/'s unit file, podman, buildah, runc and debootstrap to
# build and run deploy/container's image from Debian's packages, and kubectl to render
# deploy/kubernetes with kustomize, HAProxy (in front of the proxy: PROXY protocol) and
# Prometheus (promtool checks the metrics); then the npm packages the tests run with node (see
# install_npm_packages).
# Run as root. The packages' own services are kept from starting on the standard ports.
# On a system without dpkg, it only says what is missing.
set -eu

PACKAGES="python3 python3-venv
dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond redis-server
fetchmail msmtp curl git systemd haproxy prometheus
podman buildah runc catatonit debootstrap uidmap"
# kubectl: any will do (Debian's kubernetes-client, or one installed otherwise).
command -v kubectl >/dev/null 2>&1 || PACKAGES="$PACKAGES kubernetes-client"

# -- npm packages the tests run (a separate concern from the Debian packages above) -----------
# The npm package oidc-provider, a real third-party OAuth 2.0 authorization server, run by
# the end-to-end tests (tests/support/oidc_provider.py) with the node that package.json pins
# (npm's node package: oidc-provider 9 needs node 20.18 or later, Debian 12 ships 18, which
# is enough to run npm); versions pinned by the committed package-lock.json.
install_npm_packages() {
    if ! command -v node >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs
    fi
    if ! command -v npm >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
    fi
    npm ci --prefix "$(dirname "$0")/support/oidc-provider" --no-audit --no-fund --silent
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    missing=""
    for c in dovecot redis-server fetchmail msmtp curl systemd-analyze podman buildah runc \
        debootstrap kubectl node npm git; do
        command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing="$missing $c"
    done
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$missing python3-venv"
    if [ -n "$missing" ]; then
        echo "not a Debian system: install these (or their equivalents) yourself:$missing" >&2
        exit 1
    fi
    install_npm_packages
    exit 0
fi

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    install_npm_packages
    exit 0
fi

# Installing dovecot-core would start the system service on ports 143 and 993.
policy=/usr/sbin/policy-rc.d
created_policy=no
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=yes
fi
trap 'if [ "$created_policy" = yes ]; then rm -f "$policy"; fi' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing

install_npm_packages
