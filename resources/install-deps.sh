#!/usr/bin/env bash
# Installs the Debian packages that building rvmm and running its test host need.
# Idempotent: packages already present are left alone. Must run as root (or via sudo).
# The Debian kernel used inside the test host is not installed here (this machine's /boot stays
# untouched): resources/guest-kernel.sh downloads and extracts it into build/kernel/.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

has_backports() {
  grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# shellcheck source=/dev/null
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = "bookworm" ] && ! has_backports; then
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

# Build: gcc and libc6-dev (the Rust linker). Images: busybox-static, cpio, gzip, xz-utils, zstd,
# kmod (modprobe/depmod on the extracted kernel), python3 (vmlinux extraction), iproute2 (its ip
# goes into the test host, for VF settings).
# Test host: qemu-system-x86 10.x from bookworm-backports (igb with SR-IOV).
pkgs_base=(gcc libc6-dev busybox-static zstd cpio xz-utils kmod gzip python3 coreutils iproute2)
missing_base=()
for p in "${pkgs_base[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing_base+=("$p")
done
qemu_ok=0
if dpkg -s qemu-system-x86 >/dev/null 2>&1 &&
  qemu-system-x86_64 -device help 2>/dev/null | grep -q '"igb"'; then
  qemu_ok=1
fi

if [ "${#missing_base[@]}" -gt 0 ] || [ "$qemu_ok" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  if [ "${#missing_base[@]}" -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${missing_base[@]}"
  fi
  if [ "$qemu_ok" = 0 ]; then
    if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
      $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
    else
      $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86
    fi
  fi
fi
