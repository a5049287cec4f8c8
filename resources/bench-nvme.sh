#!/usr/bin/env bash
# Benchmark: sequential reads of an emulated NVMe drive in the test host, by the test host's own
# nvme driver and by an rvmm guest that has the drive passed through (VFIO), plus the VM exits
# rvmm's VM takes during the guest's reads (KVM debugfs in the test host). Each side reads the
# drive from its start with O_DIRECT in 1 MiB blocks, --runs times; the script prints each run's
# time as it ends, then the median of the runs. The test host runs under QEMU/TCG: absolute
# figures mean little, the guest/host ratio and the exits per MiB are what to compare between rvmm
# versions.
#
# Usage: bench-nvme.sh [--size SIZE] [--mib N] [--runs N] [--cpus N]
#   --size SIZE   the drive's size in QEMU's syntax (default 1G)
#   --mib N       MiB read per run (default: the whole drive)
#   --runs N      runs per side (default 5)
#   --cpus N      guest vCPUs (default 2)
# Environment: RVMM_BIN (default: cargo build --release -p rvmm, then <target>/release/rvmm),
# RVMM_BUILD_DIR. The console is saved as build/logs/bench-nvme.log.
set -euo pipefail
# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=1G
mib=""
runs=5
cpus=2
usage() { sed -n '/^# Usage:/,/^# Environment/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --mib) mib="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "bench-nvme.sh: unknown option $1" >&2; usage ;;
  esac
done
size_mib() {
  local number="${1%[MmGg]}"
  case "$1" in
    *[Gg]) echo $((number * 1024)) ;;
    *[Mm]) echo "$number" ;;
    *) die "--size takes mebibytes or gibibytes (256M, 1G), not $1" ;;
  esac
}
[ -n "$mib" ] || mib="$(size_mib "$size")"
case "$mib$runs$cpus" in *[!0-9]*) die "--mib, --runs and --cpus take numbers" ;; esac
[ "$mib" -le "$(size_mib "$size")" ] || die "--mib $mib is more than the drive's $size"

if [ -z "${RVMM_BIN:-}" ]; then
  use_cargo
  (cd "$WORKSPACE_DIR" && cargo build --release -p rvmm)
fi
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
[ -x "$RVMM_BIN" ] || die "no rvmm binary at $RVMM_BIN"
bash "$RESOURCES_DIR/prepare-images.sh"

workdir="$BUILD_DIR/run/bench-nvme"
log_file="$BUILD_DIR/logs/bench-nvme.log"
mkdir -p "$workdir" "$BUILD_DIR/logs"
scenario="$workdir/scenario.sh"
{
  printf 'MIB=%s\nRUNS=%s\nCPUS=%s\n' "$mib" "$runs" "$cpus"
  cat <<'SCENARIO'
NVME=$(pci_find 1b36:0010 | sed -n 1p)
if ! NS=$(nvme_host_namespace "$NVME"); then
  hmark bench_error "no namespace on $NVME"
  exit 1
fi
# Allocated blocks (not holes of the sparse image) behind every MiB both sides read.
start=$(uptime_s)
dd if=/dev/zero of="/dev/$NS" bs=1048576 count="$MIB" oflag=direct 2>/dev/null
hmark bench_fill "$NS" "mib=$MIB" "secs=$(awk -v a="$start" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')"
run=1
while [ "$run" -le "$RUNS" ]; do
  start=$(uptime_s)
  dd if="/dev/$NS" of=/dev/null bs=1048576 count="$MIB" iflag=direct 2>/dev/null
  end=$(uptime_s)
  hmark bench_host "$run" "mib=$MIB" "secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')"
  run=$((run + 1))
done
vfio_bind "$NVME" || exit 1
RVMM_TIMEOUT=1800
rvmm_start bench run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
  --cmdline "$(guest_cmdline nvme_read "rvmm.mib=$MIB" "rvmm.runs=$RUNS")" \
  --cpus "$CPUS" --memory size=512M --serial stdio --device "$NVME"
if rvmm_wait_output bench "GUEST nvme_read_begin" 300; then
  kvm_report bench begin
  if rvmm_wait_output bench "GUEST nvme_read_end" 1500; then kvm_report bench end; fi
fi
rvmm_wait bench
SCENARIO
} >"$scenario"

log "booting the test host (drive $size, $runs runs of $mib MiB per side); console: $log_file"
status=0
flock "$BUILD_DIR/testhost.lock" bash "$RESOURCES_DIR/testhost.sh" --scenario "$scenario" \
  --workdir "$workdir" --nvme 1 --nvme-size "$size" --no-igb --timeout 2400 |
  sed -u 's/\r//g' | tee "$log_file" |
  grep --line-buffered -E '^(HOST|GUEST) (bench|nvme_read|kvm_stats|rvmm_exit)' >&2 ||
  status=$?
[ "$status" -eq 0 ] || log "the test host run ended with status $status"

# secs_of PREFIX: the secs= values of the markers starting with PREFIX.
secs_of() { grep -E "^$1 " "$log_file" | sed -n 's/.* secs=\([0-9.]*\).*/\1/p'; }
# stat_of LABEL STAT: a counter of HOST kvm_stats LABEL.
stat_of() { grep -E "^HOST kvm_stats $1 " "$log_file" | sed -n "s/.* $2=\\([0-9.]*\\).*/\\1/p"; }

mapfile -t host_secs < <(secs_of "HOST bench_host [0-9]+")
mapfile -t guest_secs < <(secs_of "GUEST nvme_read [0-9]+")
[ "${#host_secs[@]}" -eq "$runs" ] || die "the test host finished ${#host_secs[@]} of $runs runs: see $log_file"
[ "${#guest_secs[@]}" -eq "$runs" ] || die "the guest finished ${#guest_secs[@]} of $runs runs: see $log_file"
host_median="$(median "${host_secs[@]}")"
guest_median="$(median "${guest_secs[@]}")"

exits_line=""
t0="$(stat_of begin uptime)"
t1="$(stat_of end uptime)"
if [ -n "$t0" ] && [ -n "$t1" ]; then
  exits_line="$(awk -v t0="$t0" -v t1="$t1" -v mib="$mib" -v runs="$runs" \
    -v e0="$(stat_of begin exits)" -v e1="$(stat_of end exits)" \
    -v m0="$(stat_of begin mmio_exits)" -v m1="$(stat_of end mmio_exits)" \
    -v i0="$(stat_of begin io_exits)" -v i1="$(stat_of end io_exits)" \
    -v h0="$(stat_of begin halt_exits)" -v h1="$(stat_of end halt_exits)" \
    -v q0="$(stat_of begin irq_exits)" -v q1="$(stat_of end irq_exits)" 'BEGIN {
      secs = t1 - t0; exits = e1 - e0
      printf "%d exits in %.1f s: %.0f exits/s, %.1f per MiB read (mmio %d, io %d, halt %d, irq %d)",
        exits, secs, exits / secs, exits / (mib * runs), m1 - m0, i1 - i0, h1 - h0, q1 - q0 }')"
fi

rate() { awk -v mib="$mib" -v secs="$1" 'BEGIN { printf "%.1f", mib / secs }'; }
ratio="$(awk -v h="$host_median" -v g="$guest_median" 'BEGIN { printf "%.2f", h / g }')"
command_line="resources/bench-nvme.sh --size $size --mib $mib --runs $runs --cpus $cpus"
echo
echo "NVMe sequential read, O_DIRECT 1 MiB blocks, $mib MiB per run, median of $runs runs"
echo "(QEMU/TCG test host: compare ratios, not absolute figures)"
printf '  test host nvme driver   %7.2f s  %8s MiB/s   runs: %s\n' "$host_median" \
  "$(rate "$host_median")" "${host_secs[*]}"
printf '  rvmm guest (VFIO)       %7.2f s  %8s MiB/s   runs: %s\n' "$guest_median" \
  "$(rate "$guest_median")" "${guest_secs[*]}"
echo "  guest throughput / test host throughput: $ratio"
echo "  rvmm VM during the guest's reads: ${exits_line:-no KVM counters (see $log_file)}"
echo
echo "Markdown for docs/performance.md:"
echo
echo "| side | median time | throughput | runs (s) |"
echo "|---|---|---|---|"
echo "| test host nvme driver | $host_median s | $(rate "$host_median") MiB/s | ${host_secs[*]} |"
echo "| rvmm guest, drive passed through | $guest_median s | $(rate "$guest_median") MiB/s | ${guest_secs[*]} |"
echo
echo "Guest/host throughput ratio: $ratio. VM exits during the guest's reads: ${exits_line:-none measured}."
echo "Command: \`$command_line\` (rvmm binary $RVMM_BIN, workspace at $(git -C "$WORKSPACE_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown))."
