#!/usr/bin/env bash
# Make the Dockerfile's base image locally when no registry is reachable: debootstrap a minimal Debian bookworm
# with python3 (3.11, like python:3.11-slim-bookworm) and `docker import` it under the name the Dockerfile's FROM
# uses. The root filesystem tarball is cached, so a second run takes seconds instead of minutes.
#
#   docker/make-base-image.sh [IMAGE_NAME]        (default: the Dockerfile's BASE_IMAGE)
#
# Environment: DOCKER (client command, may carry -H), BITFIT_DOCKER_CACHE (cache folder, default
# /var/cache/bitfit-docker), DEBIAN_MIRROR (default http://deb.debian.org/debian). Needs root and debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
CACHE=${BITFIT_DOCKER_CACHE:-/var/cache/bitfit-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv
# The FROM line's default, so the two cannot drift apart.
DEFAULT_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n1)
IMAGE=${1:-$DEFAULT_IMAGE}
[ -n "$IMAGE" ] || { echo "make-base-image: no image name given and no 'ARG BASE_IMAGE=' in Dockerfile" >&2; exit 2; }

# The cache key names everything that shapes the tarball; bump "v1" when the trimming below changes.
TARBALL="$CACHE/base-$SUITE-$(echo "$PACKAGES" | tr ',' '_')-v1.tar"

TMP=""
cleanup() {
  [ -n "$TMP" ] || return 0
  # A failed debootstrap can leave proc/sys mounted inside the chroot: undo that before removing the folder.
  for m in proc sys; do mountpoint -q "$TMP/rootfs/$m" && umount -l "$TMP/rootfs/$m"; done
  rm -rf "$TMP"
}
trap cleanup EXIT

make_rootfs() {
  TMP=$(mktemp -d /tmp/bitfit-rootfs.XXXXXX)
  local rootfs="$TMP/rootfs"
  echo "make-base-image: debootstrap $SUITE ($PACKAGES) from $MIRROR (about 2 minutes)"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" > "$TMP/debootstrap.log" 2>&1; then
    tail -n 30 "$TMP/debootstrap.log" >&2
    echo "make-base-image: debootstrap failed" >&2
    return 1
  fi
  # What an image never needs: package caches and lists (the image installs nothing with apt), docs, man pages.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  mkdir -p "$CACHE"
  tar --numeric-owner --xattrs -C "$rootfs" -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
}

if [ -s "$TARBALL" ]; then
  echo "make-base-image: using cached root filesystem $TARBALL"
else
  make_rootfs
fi

# The same environment the official python image sets, so the Dockerfile behaves alike on both.
$DOCKER import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES (stand-in for $IMAGE)" \
  "$TARBALL" "$IMAGE" > /dev/null
echo "make-base-image: imported $IMAGE ($($DOCKER run --rm --network none "$IMAGE" python3 --version))"
