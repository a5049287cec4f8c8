#!/usr/bin/env bash
# Benchmark: guest NVMe read throughput with the VM on the drive's NUMA node versus on the other
# node, in the two-node test host (testhost.sh --numa: the drive nvme-node1 behind an expander
# bus on node 1). The drive is passed through to two rvmm guests in turn: "near" with
# `--memory size=512M,host_node=1 --cpus 2,affinity=1` (guest RAM and vCPU threads on node 1) and
# "far" with host_node=0 and affinity=0. Each guest reads the drive from its start with O_DIRECT
# in 1 MiB blocks, --runs times (guest scenario nvme_read); the script prints the median of each
# and their ratio. QEMU emulates the two nodes without any distance between them (same memory,
# no interconnect): the figures show the mechanism (RAM and vCPUs placed per node), not the cost
# of a cross-socket hop on real hardware.
#
# Usage: bench-numa-nvme.sh [--size SIZE] [--mib N] [--runs N]
#   --size SIZE   the drive's size in QEMU's syntax (default 512M)
#   --mib N       MiB read per run (default: the whole drive)
#   --runs N      runs per placement (default 3)
# Environment: RVMM_BIN (default: cargo build --release -p rvmm, then <target>/release/rvmm),
# RVMM_BUILD_DIR. The console is saved as build/logs/bench-numa-nvme.log.
set -euo pipefail
# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=512M
mib=""
runs=3
usage() { sed -n '/^# Usage:/,/^# Environment/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --mib) mib="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "bench-numa-nvme.sh: unknown option $1" >&2; usage ;;
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
case "$mib$runs" in *[!0-9]*) die "--mib and --runs take numbers" ;; esac
[ "$mib" -le "$(size_mib "$size")" ] || die "--mib $mib is more than the drive's $size"

if [ -z "${RVMM_BIN:-}" ]; then
  use_cargo
  (cd "$WORKSPACE_DIR" && cargo build --release -p rvmm)
fi
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
[ -x "$RVMM_BIN" ] || die "no rvmm binary at $RVMM_BIN"
bash "$RESOURCES_DIR/prepare-images.sh"

workdir="$BUILD_DIR/run/bench-numa-nvme"
log_file="$BUILD_DIR/logs/bench-numa-nvme.log"
mkdir -p "$workdir" "$BUILD_DIR/logs"
scenario="$workdir/scenario.sh"
{
  printf 'MIB=%s\nRUNS=%s\n' "$mib" "$runs"
  cat <<'SCENARIO'
NVME=""
for dev in $(pci_find 1b36:0010); do
  if [ "$(cat "/sys/bus/pci/devices/$dev/numa_node")" = 1 ]; then NVME=$dev; fi
done
[ -n "$NVME" ] || { hmark bench_error "no NVMe drive on node 1"; exit 1; }
if ! NS=$(nvme_host_namespace "$NVME"); then
  hmark bench_error "no namespace on $NVME"
  exit 1
fi
# Allocated blocks (not holes of the sparse image) behind every MiB the guests read.
dd if=/dev/zero of="/dev/$NS" bs=1048576 count="$MIB" oflag=direct 2>/dev/null
hmark bench_drive "$NVME" "numa_node=$(cat "/sys/bus/pci/devices/$NVME/numa_node")"
vfio_bind "$NVME" || exit 1
RVMM_TIMEOUT=1800
for placement in near far; do
  if [ "$placement" = near ]; then node=1; else node=0; fi
  rvmm_start "$placement" run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
    --cmdline "$(guest_cmdline nvme_read "rvmm.mib=$MIB" "rvmm.runs=$RUNS")" \
    --cpus "2,affinity=$node" --memory "size=512M,host_node=$node" --serial stdio \
    --log-level info --device "$NVME"
  rvmm_wait "$placement"
done
SCENARIO
} >"$scenario"

log "booting the two-node test host ($runs runs of $mib MiB per placement); console: $log_file"
status=0
flock "$BUILD_DIR/testhost.lock" bash "$RESOURCES_DIR/testhost.sh" --scenario "$scenario" \
  --workdir "$workdir" --numa --cpus 2 --memory 3G --nvme 0 --nvme-size "$size" --no-igb \
  --timeout 2400 |
  sed -u 's/\r//g' | tee "$log_file" |
  grep --line-buffered -E '^(HOST|GUEST) (bench|nvme_read|begin|rvmm_exit)|placement:' >&2 ||
  status=$?
[ "$status" -eq 0 ] || log "the test host run ended with status $status"

# secs_of RUN: the secs= values of the GUEST nvme_read markers between HOST begin RUN and
# HOST end RUN.
secs_of() {
  sed -n "/^HOST begin $1\$/,/^HOST end $1\$/p" "$log_file" |
    grep -E '^GUEST nvme_read [0-9]+ ' | sed -n 's/.* secs=\([0-9.]*\).*/\1/p'
}
mapfile -t near_secs < <(secs_of near)
mapfile -t far_secs < <(secs_of far)
[ "${#near_secs[@]}" -eq "$runs" ] || die "the near guest finished ${#near_secs[@]} of $runs runs: see $log_file"
[ "${#far_secs[@]}" -eq "$runs" ] || die "the far guest finished ${#far_secs[@]} of $runs runs: see $log_file"
near_median="$(median "${near_secs[@]}")"
far_median="$(median "${far_secs[@]}")"

rate() { awk -v mib="$mib" -v secs="$1" 'BEGIN { printf "%.1f", mib / secs }'; }
ratio="$(awk -v n="$near_median" -v f="$far_median" 'BEGIN { printf "%.2f", f / n }')"
echo
echo "Guest NVMe sequential read, O_DIRECT 1 MiB blocks, $mib MiB per run, median of $runs runs"
echo "(two-node QEMU/TCG test host without NUMA distance: shows the mechanism, not a cost)"
printf '  VM on the drive'"'"'s node (1)  %7.2f s  %8s MiB/s   runs: %s\n' "$near_median" \
  "$(rate "$near_median")" "${near_secs[*]}"
printf '  VM on the other node (0)    %7.2f s  %8s MiB/s   runs: %s\n' "$far_median" \
  "$(rate "$far_median")" "${far_secs[*]}"
echo "  near throughput / far throughput: $ratio"
