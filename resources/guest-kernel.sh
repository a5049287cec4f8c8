#!/usr/bin/env bash
# Obtains the Debian 6.12 kernel used as the test host kernel and as the rvmm guest kernel, without
# installing it on this machine: downloads the versioned linux-image package that the
# linux-image-amd64 meta package of bookworm-backports points at, extracts it under
# build/kernel/<package>_<version>/, cuts the ELF vmlinux (PVH entry) out of the bzImage and points
# build/kernel/current at the result. Cached: does nothing when that version is already prepared.
#
# Environment: RVMM_KERNEL_PACKAGE=linux-image-<rel> picks a package instead of the meta package's.
set -euo pipefail
# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

suite_args=()
# shellcheck source=/dev/null
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then suite_args=(-t bookworm-backports); fi

# Prints "<package> <version>" of the kernel to use.
resolve_package() {
  local package="${RVMM_KERNEL_PACKAGE:-}" version
  if [ -z "$package" ]; then
    package="$(apt-cache "${suite_args[@]}" depends linux-image-amd64 2>/dev/null |
      awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
  fi
  [ -n "$package" ] || return 1
  version="$(apt-cache "${suite_args[@]}" policy "$package" 2>/dev/null |
    awk '$1 == "Candidate:" { print $2; exit }')"
  [ -n "$version" ] && [ "$version" != "(none)" ] || return 1
  printf '%s %s\n' "$package" "$version"
}

if ! resolved="$(resolve_package)"; then
  apt-get update -qq || true
  resolved="$(resolve_package)" || {
    if [ -s "$KERNEL_DIR/release" ]; then
      log "apt knows no linux-image-amd64 package; keeping the cached kernel $(kernel_release)"
      exit 0
    fi
    die "apt knows no linux-image-amd64 package: run resources/install-deps.sh first"
  }
fi
package="${resolved% *}"
version="${resolved#* }"
target="$BUILD_DIR/kernel/${package}_${version}"

if [ -s "$target/vmlinux" ] && [ -s "$target/release" ] && [ -s "$target/vmlinuz" ]; then
  ln -sfn "$(basename "$target")" "$BUILD_DIR/kernel/current"
  exit 0
fi

size="$(apt-cache show "$package=$version" 2>/dev/null | awk '$1 == "Size:" { printf "%.0f MiB", $2 / 1048576; exit }')"
log "downloading kernel package $package $version (${size:-size unknown}) into $BUILD_DIR/kernel"
work="$BUILD_DIR/kernel/.download"
rm -rf "$work" "$target"
mkdir -p "$work"
# apt-get download writes into the current directory and shows its progress; as root it warns
# that the download runs unsandboxed, which is harmless here (that warning is left out).
download() {
  (cd "$work" && apt-get download "$package=$version" 2> >(grep -v 'unsandboxed' >&2))
}
started=$(date +%s)
if ! download; then
  apt-get update -qq
  download || die "cannot download $package=$version"
fi
deb="$(ls "$work"/*.deb)"
log "downloaded $(basename "$deb") ($(du -m "$deb" | cut -f1) MiB) in $(($(date +%s) - started)) s; unpacking"
mkdir -p "$target/root"
dpkg-deb -x "$deb" "$target/root"
rm -rf "$work"

vmlinuz="$(ls "$target"/root/boot/vmlinuz-*)"
release="${vmlinuz##*/vmlinuz-}"
[ -d "$target/root/lib/modules/$release" ] || die "$package has no modules for $release"
# The package leaves modules.dep to its postinst; modprobe -d needs it to resolve dependencies.
depmod -b "$target/root" "$release"
cp "$vmlinuz" "$target/vmlinuz"
python3 "$RESOURCES_DIR/extract-vmlinux.py" "$target/vmlinuz" "$target/vmlinux.tmp"
mv "$target/vmlinux.tmp" "$target/vmlinux"
if command -v readelf >/dev/null; then
  readelf -n "$target/vmlinux" | grep -Eq 'Xen.*(0x00000012|PHYS32)' ||
    die "readelf finds no Xen PVH note (type 0x12) in $target/vmlinux"
fi
printf '%s\n' "$release" >"$target/release"

# Only one kernel is kept: older versions are removed once the new one is complete.
for old in "$BUILD_DIR"/kernel/linux-image-*; do
  [ "$old" = "$target" ] || rm -rf "$old"
done
ln -sfn "$(basename "$target")" "$BUILD_DIR/kernel/current"
log "kernel $release ready in $target"
