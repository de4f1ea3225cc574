#!/bin/sh
# Install the Debian packages the test suite and the sandbox run for real: Dovecot (IMAP,
# POP3, submission) as the upstream, Redis, the command-line mail clients run by the
# end-to-end tests, and systemd-analyze to check deploy/'s unit file.
# Run as root. The packages' own services are kept from starting on the standard ports.
set -eu

PACKAGES="dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond redis-server
fetchmail msmtp curl systemd"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

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
