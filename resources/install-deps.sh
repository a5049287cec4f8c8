#!/usr/bin/env bash
# Installs the Debian packages that building rvmm and running its test host need.
# Idempotent: packages already present are left alone. Must run as root (or via sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_backports() {
  grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null && return 1
  return 0
}

. /etc/os-release
if [ "${VERSION_CODENAME:-}" = "bookworm" ] && need_backports; then
  # Same mirror and keyring as the main Debian source, backports suite.
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri="http://deb.debian.org/debian"
  $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

pkgs_base="busybox-static zstd cpio xz-utils kmod gzip e2fsprogs iproute2 python3"
missing=""
for p in $pkgs_base qemu-system-x86 linux-image-amd64; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $pkgs_base
  if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 linux-image-amd64
  else
    $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86 linux-image-amd64
  fi
fi
