#!/usr/bin/env bash
# Hotplug latencies in the QEMU/TCG test host (compare ratios, not seconds): one rvmm VM (2 vCPUs,
# 512 MiB, 4 root ports) runs the guest's monitor scenario polling every 50 ms, and the test host
# drives its emulated NVMe drive through `rvmm ctl`, RUNS times each:
#   - hot-add: until add-device answers, and until the guest has the namespace (GUEST block-added);
#   - graceful removal: until remove-device answers (guest-ejected), until the namespace is gone;
#   - surprise removal (API): until remove-device answers (the host has the device back), until
#     the namespace is gone in the guest;
#   - host-initiated removal: `echo 1 > /sys/bus/pci/devices/BDF/remove` in the test host, until
#     that command returns (rvmm released the device), until the namespace is gone in the guest.
# Times are taken in the test host from just before the command (10 ms resolution, plus the
# monitor's 50 ms poll for the guest's view). Prints each sample as it is taken, then the medians
# as a Markdown table; with --update-doc also writes the table with the command into the Hotplug
# section of docs/performance.md (between its bench-hotplug markers).
#
# Usage: bench-hotplug.sh [--runs N] [--update-doc]     (default 5 runs; builds rvmm and the images)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"

runs=5
update_doc=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --update-doc) update_doc=1; shift ;;
    -h | --help) sed -n '2,/^# Usage:/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$runs" in '' | *[!0-9]* | 0) die "--runs takes a positive number" ;; esac
command_line="resources/bench-hotplug.sh --runs $runs"

use_cargo
cargo build --release -p rvmm
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
bash resources/prepare-images.sh

workdir="$BUILD_DIR/run/bench-hotplug"
mkdir -p "$workdir" "$BUILD_DIR/logs"
scenario="$workdir/scenario.sh"
echo "RUNS=$runs" >"$scenario"
cat >>"$scenario" <<'SCENARIO'
RVMM_TIMEOUT=900
NVME=$(pci_find 1b36:0010 | sed -n 1p)
vfio_bind "$NVME"
ADD="path=/sys/bus/pci/devices/$NVME,id=disk0"

# sample FIGURE MS: one measurement of FIGURE (bench-hotplug.sh takes the medians).
sample() { hmark bench_sample "$1" "${2:-missing}"; }

# guest_waits TEXT COUNT START_MS: waits until the guest printed more than COUNT lines with TEXT;
# prints the milliseconds since START_MS, or nothing if it never did.
guest_waits() {
  rvmm_wait_more bench "$1" "$2" 60 >/dev/null && echo $(($(uptime_ms) - $3))
}

# add_once: hot-add, recording add_answer and add_visible.
add_once() {
  local blocks t0
  blocks=$(rvmm_count bench 'GUEST block-added')
  t0=$(uptime_ms)
  "$RVMM" ctl --api-socket "$(api_socket bench)" add-device "$ADD" >/dev/null || return 1
  sample add_answer $(($(uptime_ms) - t0))
  sample add_visible "$(guest_waits 'GUEST block-added' "$blocks" "$t0")"
}

# remove_once KIND [--surprise]: removal through the API, recording KIND_answer and KIND_gone.
remove_once() {
  local kind="$1" gone t0
  shift
  gone=$(rvmm_count bench 'GUEST block-removed')
  t0=$(uptime_ms)
  "$RVMM" ctl --api-socket "$(api_socket bench)" remove-device disk0 "$@" >/dev/null || return 1
  sample "${kind}_answer" $(($(uptime_ms) - t0))
  sample "${kind}_gone" "$(guest_waits 'GUEST block-removed' "$gone" "$t0")"
}

# host_remove_once: the test host removes the device, then brings it back for the next run.
host_remove_once() {
  local gone t0
  gone=$(rvmm_count bench 'GUEST block-removed')
  t0=$(uptime_ms)
  echo 1 >"/sys/bus/pci/devices/$NVME/remove" || return 1
  sample host_remove_done $(($(uptime_ms) - t0))
  sample host_remove_gone "$(guest_waits 'GUEST block-removed' "$gone" "$t0")"
  pci_rescan "$NVME" >/dev/null && vfio_bind "$NVME" >/dev/null
}

rvmm_start_lines bench run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
  --cmdline "$(guest_cmdline monitor rvmm.hold=800 rvmm.poll=0.05)" --cpus 2 --memory size=512M \
  --root-ports 4 --serial stdio --api-socket "$(api_socket bench)" >/dev/null
if rvmm_wait_output bench 'GUEST monitor ready' 120 >/dev/null; then
  i=1
  while [ "$i" -le "$RUNS" ]; do
    add_once && remove_once graceful
    add_once && remove_once surprise --surprise
    i=$((i + 1))
  done
  # Last: a host-initiated removal goes through the VFIO request interrupt and the host's PCI
  # core; a failure here must not spoil the figures above.
  i=1
  while [ "$i" -le "$RUNS" ]; do
    add_once && host_remove_once
    i=$((i + 1))
  done
fi
"$RVMM" ctl --api-socket "$(api_socket bench)" shutdown
rvmm_wait_lines bench >/dev/null
SCENARIO

# The samples are shown as they come; the whole console is kept.
log="$BUILD_DIR/logs/bench-hotplug.log"
log "booting the test host ($runs runs); console: $log"
bash resources/testhost.sh --scenario "$scenario" --workdir "$workdir" --nvme 1 --no-igb \
  --timeout 1200 2>&1 | sed -u 's/\r$//' | tee "$log" |
  { grep --line-buffered -E '^HOST bench_sample ' || true; } ||
  die "the test host run failed; see $log"

# figure NAME: "median ms | samples" of the HOST bench_sample NAME lines, or "n/a | -".
figure() {
  local samples
  mapfile -t samples < <(grep -E "^HOST bench_sample $1 [0-9]+$" "$log" | cut -d' ' -f4)
  [ "${#samples[@]}" -gt 0 ] || { echo "n/a | -"; return; }
  echo "$(median "${samples[@]}") ms | ${samples[*]}"
}

table() {
  echo "| step | until | median | every sample (ms) |"
  echo "|---|---|---|---|"
  echo "| hot-add | add-device answers (guest's pciehp enabled the slot) | $(figure add_answer) |"
  echo "| hot-add | the namespace is a block device in the guest | $(figure add_visible) |"
  echo "| graceful removal | remove-device answers guest-ejected | $(figure graceful_answer) |"
  echo "| graceful removal | the namespace is gone in the guest | $(figure graceful_gone) |"
  echo "| surprise removal (API) | remove-device answers: the host has the device back | $(figure surprise_answer) |"
  echo "| surprise removal (API) | the namespace is gone in the guest | $(figure surprise_gone) |"
  echo "| host removal (sysfs remove) | the host's command returns: rvmm released the device | $(figure host_remove_done) |"
  echo "| host removal (sysfs remove) | the namespace is gone in the guest | $(figure host_remove_gone) |"
}

result="$(table)"
echo "$result"
echo "console: $log"

if [ "$update_doc" = 1 ]; then
  doc="$root/docs/performance.md"
  begin='<!-- bench-hotplug:begin -->'
  end='<!-- bench-hotplug:end -->'
  if ! grep -qF "$begin" "$doc" || ! grep -qF "$end" "$doc"; then
    die "$doc has no '$begin' ... '$end' block to update"
  fi
  block="$workdir/figures.md"
  {
    echo "$begin"
    echo "Command: \`$command_line\`, rvmm built from revision \`$(git rev-parse --short HEAD)\`," \
      "$(date -u +%Y-%m-%d)."
    echo
    echo "$result"
    echo "$end"
  } >"$block"
  # Replace the lines from the begin marker to the end marker by the new block.
  awk -v begin="$begin" -v end="$end" -v block="$block" '
    $0 == begin { while ((getline line < block) > 0) print line; skip = 1; next }
    $0 == end { skip = 0; next }
    !skip { print }' "$doc" >"$doc.tmp"
  mv "$doc.tmp" "$doc"
  echo "updated $doc"
fi
