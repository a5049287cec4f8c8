#!/usr/bin/env bash
# Prepares everything a test host run needs, each step cached on its inputs: the Debian kernel
# (test host kernel, guest bzImage and vmlinux, modules), the guest initramfs and the test host
# initramfs (which embeds the rvmm binary: RVMM_BIN, see resources/lib.sh).
set -euo pipefail
dir="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=resources/lib.sh
. "$dir/lib.sh"
# One preparation at a time: test processes running side by side each call this script.
mkdir -p "$BUILD_DIR"
exec 9>"$BUILD_DIR/prepare.lock"
flock 9
bash "$dir/guest-kernel.sh"
bash "$dir/build-guest-initramfs.sh"
bash "$dir/build-host-initramfs.sh"
