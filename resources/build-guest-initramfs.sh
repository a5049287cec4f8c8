#!/usr/bin/env bash
# Builds build/images/guest-initramfs.cpio.gz: the initramfs of the Linux guest that rvmm boots in
# the test host. busybox-static, resources/guest/init (markers + scenarios) with
# resources/guest/console.sh (its console input), and the guest kernel
# modules the scenarios load (NVMe, igbvf, e1000), decompressed, /bin/hostile (resources/guest/
# hostile.c, static, for the `hostile` scenario) and /bin/pio (resources/guest/pio.c, one I/O
# port access, for the `e1000` scenario). Cached on the hash of its inputs.
set -euo pipefail
# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GUEST_MODULES=(nvme-core nvme igbvf e1000 button evdev)
output="$IMAGES_DIR/guest-initramfs.cpio.gz"
busybox="$(static_busybox)"

# The hostile program is built with this machine's gcc against glibc's libc.a (libc6-dev).
if ! command -v gcc >/dev/null || [ ! -f "$(gcc -print-file-name=libc.a)" ]; then
  log "installing gcc and libc6-dev (static C programs for the guest)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends gcc libc6-dev
fi
hostile_src="$RESOURCES_DIR/guest/hostile.c"
pio_src="$RESOURCES_DIR/guest/pio.c"
uwake_src="$RESOURCES_DIR/guest/uwake.c"

rel="$(kernel_release)"
hash="$(inputs_hash "$0" "$RESOURCES_DIR/lib.sh" "$RESOURCES_DIR/guest/init" \
  "$RESOURCES_DIR/guest/console.sh" "$busybox" \
  "$KERNEL_DIR/vmlinuz" "=$rel" "=${GUEST_MODULES[*]}" "$hostile_src" "$pio_src" "$uwake_src" "=$(gcc --version | head -n1)")"
if stamp_is_current guest-initramfs "$hash" "$output"; then exit 0; fi

log "building $output"
staging="$IMAGES_DIR/guest-root"
rm -rf "$staging"
mkdir -p "$staging"/{bin,sbin,dev,proc,sys,tmp,etc,root}
install -m 0755 "$busybox" "$staging/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$staging/bin/$applet"
done
install -m 0755 "$RESOURCES_DIR/guest/init" "$staging/init"
install -D -m 0644 "$RESOURCES_DIR/guest/console.sh" "$staging/lib/rvmm/console.sh"
copy_modules "$staging" "${GUEST_MODULES[@]}"
gcc -static -O2 -Wall -Wextra -Werror -o "$staging/bin/hostile" "$hostile_src"
gcc -static -O2 -Wall -Wextra -Werror -o "$staging/bin/pio" "$pio_src"
gcc -static -O2 -Wall -Wextra -Werror -o "$staging/bin/uwake" "$uwake_src"

mkdir -p "$IMAGES_DIR"
(cd "$staging" && find . -print0 | LC_ALL=C sort -z |
  cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 >"$output.tmp"
mv "$output.tmp" "$output"
rm -rf "$staging"
stamp_write guest-initramfs "$hash"
log "guest initramfs ready: $(du -h "$output" | cut -f1)"
