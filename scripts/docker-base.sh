#!/usr/bin/env bash
# Make the local base image debian-local:bookworm without any registry: debootstrap from
# Debian's packages, then `docker import`. Idempotent. Needs root and a Docker engine.
set -euo pipefail
IMAGE=${BASE_IMAGE:-debian-local:bookworm}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "$IMAGE"; exit 0; fi
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
chmod 755 "$root"  # mktemp made it 0700: the image root must be traversable by non-root users
tar -C "$root" -c . | docker import - "$IMAGE" >/dev/null
echo "$IMAGE"
