#!/bin/sh
# Make a Debian bookworm base image from Debian's packages (debootstrap), for a host that
# reaches Debian's archive but no container registry. Run as root:
#
#   sh deploy/container/debian-base.sh [TAG]     (default TAG: localhost/debian:bookworm)
#   podman build --build-arg BASE=localhost/debian:bookworm -f deploy/container/Containerfile .
#
# DEBIAN_MIRROR overrides the archive (default http://deb.debian.org/debian).
set -eu

tag=${1:-localhost/debian:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase bookworm "$root" "$mirror"
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# What debootstrap downloaded is not needed in the image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$tag"
