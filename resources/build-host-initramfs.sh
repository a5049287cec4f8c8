#!/usr/bin/env bash
# Builds build/images/host-initramfs.cpio: the initramfs of the QEMU test host. It holds busybox,
# the host kernel modules (KVM on nested SVM, VFIO, igb, NVMe) decompressed, the rvmm binary with
# its shared libraries, iproute2's ip as /usr/sbin/ip (busybox ip cannot show or set a PF's VF
# settings), the guest kernel (bzImage and vmlinux) and the guest initramfs, and
# resources/host/init. The per-test /scenario.sh is not in it: resources/testhost.sh appends it as
# a second small archive. Uncompressed (the kernel unpacks it faster under TCG); cached on the
# hash of its inputs.
#
# Environment: RVMM_BIN (default ${CARGO_TARGET_DIR:-<workspace>/target}/release/rvmm). Without
# that binary the image is still built (the test host's own checks need no rvmm) and the test host
# reports "HOST rvmm missing".
set -euo pipefail
# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Load order of the test host: KVM on (nested) SVM, VFIO, the igb PF driver, NVMe for host-side
# checks, the kernel's AER error injector (the device error tests). modprobe adds each module's
# dependencies first.
HOST_MODULES=(irqbypass kvm ccp kvm-amd vfio vfio_iommu_type1 vfio-pci-core vfio-pci
  dca i2c-algo-bit igb e1000 nvme-core nvme aer_inject)
output="$IMAGES_DIR/host-initramfs.cpio"
guest_initramfs="$IMAGES_DIR/guest-initramfs.cpio.gz"
rvmm_bin="$(rvmm_binary)"
# The embedding example (cargo build --release -p rvmm --examples), when built.
example_bin="$(dirname "$rvmm_bin")/examples/hotplug"
busybox="$(static_busybox)"
rel="$(kernel_release)"
iproute2="$(readlink -f /usr/sbin/ip 2>/dev/null || true)"
if [ ! -x "$iproute2" ] || "$iproute2" -V 2>&1 | grep -q BusyBox; then
  die "iproute2's ip is missing (/usr/sbin/ip): run resources/install-deps.sh"
fi
[ -s "$guest_initramfs" ] || die "$guest_initramfs is missing: run resources/build-guest-initramfs.sh"

hash="$(inputs_hash "$0" "$RESOURCES_DIR/lib.sh" "$RESOURCES_DIR/host/init" \
  "$RESOURCES_DIR/host/host-lib.sh" "$busybox" "$KERNEL_DIR/vmlinuz" "$KERNEL_DIR/vmlinux" \
  "$guest_initramfs" "$rvmm_bin" "=$rel" "=${HOST_MODULES[*]}" \
  "$example_bin" "$iproute2")"
if stamp_is_current host-initramfs "$hash" "$output"; then exit 0; fi

log "building $output"
staging="$IMAGES_DIR/host-root"
rm -rf "$staging"
mkdir -p "$staging"/{bin,sbin,dev,proc,sys,tmp,run,root,etc/rvmm,lib/rvmm,guest}
install -m 0755 "$busybox" "$staging/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$staging/bin/$applet"
done
# The kernel runs /sbin/modprobe for modules it requests itself.
ln -sf ../bin/busybox "$staging/sbin/modprobe"
install -m 0755 "$RESOURCES_DIR/host/init" "$staging/init"
install -m 0644 "$RESOURCES_DIR/host/host-lib.sh" "$staging/lib/rvmm/host-lib.sh"
printf '%s\n' "${HOST_MODULES[@]}" >"$staging/etc/rvmm/modules"
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/sh' \
  >"$staging/etc/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$staging/etc/group"
copy_modules "$staging" "${HOST_MODULES[@]}"

install -m 0644 "$KERNEL_DIR/vmlinuz" "$staging/guest/vmlinuz"
install -m 0644 "$KERNEL_DIR/vmlinux" "$staging/guest/vmlinux"
install -m 0644 "$guest_initramfs" "$staging/guest/initramfs.cpio.gz"
# iproute2's ip and its libraries (paths kept, as copy_binary does), beside busybox's ip applet.
install -D -m 0755 "$iproute2" "$staging/usr/sbin/ip"
for lib in $(ldd "$iproute2" | grep -o '/[^ ]*'); do
  mkdir -p "$staging$(dirname "$lib")"
  cp -L "$lib" "$staging$lib"
done
if [ -x "$rvmm_bin" ]; then
  copy_binary "$staging" "$rvmm_bin" rvmm
else
  log "warning: no rvmm binary at $rvmm_bin; the test host will report 'HOST rvmm missing'"
fi
if [ -x "$example_bin" ]; then
  copy_binary "$staging" "$example_bin" rvmm-example-hotplug
fi

mkdir -p "$IMAGES_DIR"
(cd "$staging" && find . -print0 | LC_ALL=C sort -z |
  cpio --null -o -H newc -R 0:0 --quiet) >"$output.tmp"
mv "$output.tmp" "$output"
rm -rf "$staging"
stamp_write host-initramfs "$hash"
log "host initramfs ready: $(du -h "$output" | cut -f1) (rvmm: $rvmm_bin)"
