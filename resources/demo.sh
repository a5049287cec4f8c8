#!/usr/bin/env bash
# Demo: builds rvmm, prepares the images, boots the test host (QEMU/TCG, nested SVM) and in it the
# Debian guest under rvmm, with the consoles of both shown. Quit QEMU with Ctrl-A X.
#
# Usage: demo.sh [--shell] [--no-passthrough]
#   --shell             the guest gives an interactive shell (exit it to power off) instead of
#                       reporting what it sees and powering off
#   --no-passthrough    boot the guest without a passthrough device. By default the test host's
#                       emulated NVMe is bound to vfio-pci and passed to the guest (rvmm --device),
#                       which writes and reads back a pattern on it
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"
use_cargo

guest_scenario=basic
passthrough=1
for arg in "$@"; do
  case "$arg" in
    --shell) guest_scenario=shell ;;
    --no-passthrough) passthrough=0 ;;
    *) sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
if [ "$passthrough" = 1 ] && [ "$guest_scenario" = basic ]; then guest_scenario=nvme; fi

bash resources/install-deps.sh
cargo build --release -p rvmm
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
bash resources/prepare-images.sh

workdir="${RVMM_BUILD_DIR:-$root/build}/run/demo"
mkdir -p "$workdir"
scenario="$workdir/scenario.sh"
{
  echo "guest_scenario=$guest_scenario"
  echo "passthrough=$passthrough"
  cat <<'SCENARIO'
device_args=""
if [ "$passthrough" = 1 ]; then
  nvme=$(pci_find 1b36:0010)
  vfio_bind "$nvme" && device_args="--device path=/sys/bus/pci/devices/$nvme,id=nvme0"
fi
hmark demo "rvmm run: guest scenario $guest_scenario $device_args"
"$RVMM" run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
  --cmdline "$(guest_cmdline "$guest_scenario")" --cpus 2 --memory size=512M --root-ports 2 \
  --serial stdio $device_args
hmark rvmm_exit "$?"
SCENARIO
} >"$scenario"
log "booting the test host, then the guest under rvmm; quit QEMU at any time with Ctrl-A X"
exec bash resources/testhost.sh --scenario "$scenario" --workdir "$workdir" --timeout 3600
