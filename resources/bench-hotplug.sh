#!/usr/bin/env bash
# Hotplug latencies in the QEMU/TCG test host (compare ratios, not seconds), in both hotplug modes
# in one test host boot: one rvmm VM per mode (`--hotplug native`, then `--hotplug acpi`; 1 vCPU,
# 512 MiB, 4 root ports) runs the guest's monitor scenario (woken by the guest kernel's uevents,
# polling every 0.5 s besides), and the test host drives its emulated NVMe drive through
# `rvmm ctl`, RUNS times each:
#   - `rvmm ctl info`: what the client itself costs (part of every answer figure);
#   - hot-add: until add-device answers, and until the guest has the namespace (GUEST block-added);
#   - graceful removal: until remove-device answers (guest-ejected), until the namespace is gone;
#   - surprise removal (API): until remove-device answers (the host has the device back), until
#     the namespace is gone in the guest;
#   - host-initiated removal: `echo 1 > /sys/bus/pci/devices/BDF/remove` in the test host, until
#     that command returns (rvmm released the device), until the namespace is gone in the guest.
# Each step starts 1 s after the one before ended (the test host's one CPU is the guest's too).
# One vCPU by default: the test host has one CPU, and two vCPUs sharing it made the guest's nvme
# probe about twice as slow (IPIs and cross-vCPU waits through nested SVM) and froze the test host
# more often (QEMU's nested SVM emulation then takes no interrupt at all: docs/performance.md).
# A frozen test host is stopped at the run's time limit: 10 minutes plus 2 per run.
# Times are taken in the test host from just before the command (10 ms resolution); the guest's
# view is when its marker reached the test host (rvmm_arrival_ms), not when a wait polled for it.
# Prints each sample as it is taken, then the medians of both modes side by side as a Markdown
# table and a plot of every sample (one row of marks per figure and mode on a common millisecond
# scale); with --update-doc also writes both with the command into the Hotplug section of
# docs/performance.md (between its bench-hotplug markers). The console log keeps rvmm's debug log
# of every hotplug step and the guest kernel's log (rvmm.klog=1), all on the test host's clock:
# resources/hotplug-breakdown.py turns them into a breakdown of each step.
#
# Usage: bench-hotplug.sh [--runs N] [--cpus N] [--update-doc]  (5 runs, 1 vCPU; builds rvmm, images)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"

runs=5
cpus=1
update_doc=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --update-doc) update_doc=1; shift ;;
    -h | --help) sed -n '2,/^# Usage:/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$runs" in '' | *[!0-9]* | 0) die "--runs takes a positive number" ;; esac
case "$cpus" in '' | *[!0-9]* | 0) die "--cpus takes a positive number of vCPUs" ;; esac
command_line="resources/bench-hotplug.sh --runs $runs"
[ "$cpus" = 1 ] || command_line="$command_line --cpus $cpus"

use_cargo
cargo build --release -p rvmm
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
bash resources/prepare-images.sh

workdir="$BUILD_DIR/run/bench-hotplug"
mkdir -p "$workdir" "$BUILD_DIR/logs"
scenario="$workdir/scenario.sh"
{ echo "RUNS=$runs"; echo "CPUS=$cpus"; } >"$scenario"
cat >>"$scenario" <<'SCENARIO'
RVMM_TIMEOUT=$((300 + RUNS * 60))
NVME=$(pci_find 1b36:0010 | sed -n 1p)
vfio_bind "$NVME"
ADD="path=/sys/bus/pci/devices/$NVME,id=disk0"

# sample FIGURE MS: one measurement of FIGURE in the current MODE (bench-hotplug.sh takes the
# medians).
sample() { hmark bench_sample "${MODE}_$1" "${2:-missing}"; }

# step WHAT MS: notes the start or the answer of a step among the VM's stamped console and log
# lines, for resources/hotplug-breakdown.py.
step() { echo "$2 bench $1" >>"/tmp/rvmm-$VM.stamped"; }

# guest_waits TEXT COUNT START_MS: waits until the guest printed more than COUNT lines with TEXT;
# prints the milliseconds from START_MS to when line COUNT+1 arrived (rvmm_arrival_ms: not
# rounded up to the wait's polling, so the wait looks only every 0.5 s: its forks would take the
# test host's one CPU from the guest it measures), or nothing if it never did.
guest_waits() {
  local at
  rvmm_wait_more "$VM" "$1" "$2" 60 0.5 >/dev/null || return 0
  at=$(rvmm_arrival_ms "$VM" "$1" $(($2 + 1)))
  [ -n "$at" ] && echo $((at - $3))
}

# answered_at: sets ANSWERED to the test host's uptime (ms) without a process, then leaves the
# test host's one CPU to the guest for half a second: right after rvmm answers, the guest is
# still at the step (its driver, its monitor), and the bench's own forks would slow it.
answered_at() {
  read_uptime_ms
  ANSWERED=$UPTIME_MS
  sleep 0.5
}

# settle: the pause before each step. The test host has one CPU: a step started while the guest
# still finishes the one before (its monitor's output, the driver's last work) would share it.
settle() { sleep 1; }

# ctl_once: what one `rvmm ctl info` costs from the test host's shell (the client's start and
# the API's round trip: part of every answer figure).
ctl_once() {
  local t0
  settle
  t0=$(uptime_ms)
  "$RVMM" ctl --api-socket "$(api_socket "$VM")" info >/dev/null || return 1
  sample ctl_info $(($(uptime_ms) - t0))
}

# add_once: hot-add, recording add_answer and add_visible.
add_once() {
  local blocks t0
  blocks=$(rvmm_count "$VM" 'GUEST block-added')
  settle
  t0=$(uptime_ms)
  step add "$t0"
  "$RVMM" ctl --api-socket "$(api_socket "$VM")" add-device "$ADD" >/dev/null || return 1
  answered_at
  step answered "$ANSWERED"
  sample add_answer $((ANSWERED - t0))
  sample add_visible "$(guest_waits 'GUEST block-added' "$blocks" "$t0")"
}

# remove_once KIND [--surprise]: removal through the API, recording KIND_answer and KIND_gone.
remove_once() {
  local kind="$1" gone t0
  shift
  gone=$(rvmm_count "$VM" 'GUEST block-removed')
  settle
  t0=$(uptime_ms)
  step "$kind" "$t0"
  "$RVMM" ctl --api-socket "$(api_socket "$VM")" remove-device disk0 "$@" >/dev/null || return 1
  answered_at
  step answered "$ANSWERED"
  sample "${kind}_answer" $((ANSWERED - t0))
  sample "${kind}_gone" "$(guest_waits 'GUEST block-removed' "$gone" "$t0")"
}

# host_remove_once: the test host removes the device, then brings it back for the next run.
host_remove_once() {
  local gone t0
  gone=$(rvmm_count "$VM" 'GUEST block-removed')
  settle
  t0=$(uptime_ms)
  step host_remove "$t0"
  echo 1 >"/sys/bus/pci/devices/$NVME/remove" || return 1
  answered_at
  step answered "$ANSWERED"
  sample host_remove_done $((ANSWERED - t0))
  sample host_remove_gone "$(guest_waits 'GUEST block-removed' "$gone" "$t0")"
  pci_rescan "$NVME" >/dev/null && vfio_bind "$NVME" >/dev/null
}

# rvmm's log of each hotplug step (milliseconds), for the breakdown.
export RUST_LOG=rvmm::hotplug=debug,rvmm_vfio=info,rvmm_devices::ged=debug,rvmm_devices::pci_hotplug=debug,rvmm_pci::root_port=debug
for MODE in native acpi; do
VM=bench_$MODE
rvmm_start_lines "$VM" run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
  --cmdline "$(guest_cmdline monitor rvmm.hold=800 rvmm.poll=0.5 rvmm.klog=1)" --cpus "$CPUS" --memory size=512M \
  --root-ports 4 --hotplug "$MODE" --serial stdio --api-socket "$(api_socket "$VM")" >/dev/null
if rvmm_wait_output "$VM" 'GUEST monitor ready' 120 >/dev/null; then
  i=1
  while [ "$i" -le "$RUNS" ]; do
    ctl_once
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
# The monitor's end prints the guest's kernel log (rvmm.klog=1); then every console and log line
# with the test host's uptime when it arrived, for resources/hotplug-breakdown.py.
rvmm_stop_monitor "$VM" >/dev/null
sed "s/^/HOST stamped $MODE /" "/tmp/rvmm-$VM.stamped"
done
SCENARIO

# The samples are shown as they come; the whole console is kept.
log="$BUILD_DIR/logs/bench-hotplug.log"
log "booting the test host ($runs runs); console: $log"
bash resources/testhost.sh --scenario "$scenario" --workdir "$workdir" --nvme 1 --no-igb \
  --timeout $((600 + runs * 120)) 2>&1 | sed -u 's/\r$//' | tee "$log" |
  { grep --line-buffered -E '^HOST bench_sample ' || true; } ||
  die "the test host run failed; see $log"

# samples NAME: the samples (ms) of the HOST bench_sample NAME lines, one a line.
samples() {
  grep -E "^HOST bench_sample $1 [0-9]+$" "$log" | cut -d' ' -f4
}

# figure NAME: "median ms" of NAME's samples, or "n/a".
figure() {
  local s
  mapfile -t s < <(samples "$1")
  [ "${#s[@]}" -gt 0 ] || { echo "n/a"; return; }
  echo "$(median "${s[@]}") ms"
}

# row STEP UNTIL NAME: a table row with both modes' medians and the acpi/native ratio.
row() {
  local native acpi ratio="-"
  native=$(figure "native_$3")
  acpi=$(figure "acpi_$3")
  if [ "$native" != n/a ] && [ "$acpi" != n/a ] && [ "${native% ms}" -gt 0 ]; then
    ratio=$(awk -v a="${acpi% ms}" -v n="${native% ms}" 'BEGIN { printf "%.2f", a / n }')
  fi
  echo "| $1 | $2 | $native | $acpi | $ratio |"
}

FIGURES="ctl_info add_answer add_visible graceful_answer graceful_gone surprise_answer surprise_gone host_remove_done host_remove_gone"

table() {
  echo "| step | until | native (pciehp) median | acpi (acpiphp) median | acpi / native |"
  echo "|---|---|---|---|---|"
  row "\`rvmm ctl info\`" "it returns (the client's own cost, in every answer below)" ctl_info
  row "hot-add" "add-device answers (the guest has the device)" add_answer
  row "hot-add" "the namespace is a block device in the guest" add_visible
  row "graceful removal" "remove-device answers guest-ejected" graceful_answer
  row "graceful removal" "the namespace is gone in the guest" graceful_gone
  row "surprise removal (API)" "remove-device answers: the host has the device back" surprise_answer
  row "surprise removal (API)" "the namespace is gone in the guest" surprise_gone
  row "host removal (sysfs remove)" "the host's command returns: rvmm released the device" host_remove_done
  row "host removal (sysfs remove)" "the namespace is gone in the guest" host_remove_gone
}

# plot: every sample of every figure, one row per figure and mode, on a logarithmic millisecond
# scale from the smallest to the largest sample, shared by all rows (`o` one sample, `8` two or more in one column), so bimodal figures
# and the gap between the modes show at a glance.
plot() {
  local name mode
  {
    for name in $FIGURES; do
      for mode in native acpi; do
        echo "$name $mode $(samples "${mode}_$name" | tr '\n' ' ')"
      done
    done
  } | awk -v width=60 '
    { rows[NR] = $0; for (i = 3; i <= NF; i++) { v = $i + 0; if (v < 1) v = 1; if (v > max) max = v; if (min == 0 || v < min) min = v } }
    END {
      if (min == 0) min = 1
      if (max < min * 2) max = min * 2
      lmin = log(min); span = log(max) - lmin
      printf "%-30s|%s|\n", "figure (mode)", sprintf("%-" width "s", min " ms (log scale) -> " max " ms")
      for (r = 1; r <= NR; r++) {
        n = split(rows[r], f, " ")
        line = sprintf("%" width "s", "")
        for (i = 3; i <= n; i++) {
          v = f[i] + 0; if (v < 1) v = 1
          c = int((log(v) - lmin) / span * (width - 1)) + 1
          ch = substr(line, c, 1) == " " ? "o" : "8"
          line = substr(line, 1, c - 1) ch substr(line, c + 1)
        }
        printf "%-30s|%s|\n", f[1] " (" f[2] ")", line
      }
    }'
}

result="$(table)"
picture="$(plot)"
echo "$result"
echo
echo "$picture"
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
    echo
    echo '```'
    echo "$picture"
    echo '```'
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
