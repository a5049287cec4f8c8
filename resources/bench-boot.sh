#!/usr/bin/env bash
# Benchmarks of starting a VM, run in the test host (QEMU/TCG: compare ratios, not seconds):
#   - rvmm start -> vCPUs running, and rvmm start -> the guest's init (bzImage and vmlinux);
#   - VMM memory overhead: VmRSS of rvmm beyond the guest RAM once the guest is up;
#   - memory reservation rate (allocate + prefault + mlock) for the largest guest the test host
#     holds, on 4 KiB and 2 MiB pages, and the DMA-map rate of that RAM (one passthrough NVMe).
# Each figure is the median of RUNS runs (default 5). Prints each run's figures as the run ends,
# then the medians as a Markdown table.
#
# Usage: bench-boot.sh            (as root; builds rvmm and the images first)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-5}"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"
use_cargo
bash resources/install-deps.sh
cargo build --release -p rvmm
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
bash resources/prepare-images.sh

workdir="${RVMM_BUILD_DIR:-$root/build}/run/bench-boot"
mkdir -p "$workdir"
scenario="$workdir/scenario.sh"
cat >"$scenario" <<SCENARIO
RUNS=$runs
SCENARIO
cat >>"$scenario" <<'SCENARIO'
# Milliseconds of uptime (10 ms resolution); busybox date has no %N.
now_ms() { uptime_ms; }
# The FIFO every rvmm run reads as stdin, opened once in this shell (fd 9).
rvmm_stdin
# ms_of DURATION: "12.3ms" / "1.2s" / "850µs" (Rust Debug of Duration) -> integer ms.
ms_of() { awk -v d="$1" 'BEGIN { v=d+0; if (d ~ /µs$/) v/=1000; else if (d ~ /ms$/) ; else if (d ~ /s$/) v*=1000; printf "%d\n", v }'; }

# One boot: time to "vCPUs running" (rvmm's log) and to the guest's "GUEST up" line, and VmRSS.
boot_once() {
  local kernel="$1" out=/tmp/bench.out t0 t_up pid rss
  t0=$(now_ms)
  RUST_LOG=rvmm=info "$RVMM" run --kernel "$kernel" --initramfs "$GUEST_INITRAMFS" \
    --cmdline "$(guest_cmdline hold rvmm.hold=4)" --memory size=512M --serial stdio <&9 >"$out" 2>&1 &
  pid=$!
  while ! grep -q '^GUEST up' "$out" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  t_up=$(now_ms)
  if ! grep -q '^GUEST up' "$out"; then
    hmark bench_error "$(basename "$kernel")" "$(grep -E 'error|panic' "$out" | tail -n 2 | tr '\n' ' ')" >&2
  fi
  sleep 1
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
  wait "$pid" || true
  vcpu=$(sed -n 's/.*vCPUs running \([^ ]*\) after.*/\1/p' "$out" | head -n1)
  echo "$(ms_of "${vcpu:-0ms}") $((t_up - t0)) $((rss / 1024 - 512))"
}

# Each run's figures are one HOST bench_sample line; bench-boot.sh takes the medians.
for kernel in "$GUEST_BZIMAGE" /guest/vmlinux; do
  name=$(basename "$kernel")
  for i in $(seq "$RUNS"); do
    set -- $(boot_once "$kernel")
    hmark bench_sample "boot_$name" "vcpu_ms=$1" "init_ms=$2" "overhead_mib=$3"
  done
done

# Reservation: the largest guest the 3 GiB test host holds, on 4 KiB then 2 MiB pages, with a
# passthrough NVMe so the RAM is also DMA-mapped. The guest powers off at once.
nvme=$(pci_find 1b36:0010)
vfio_bind "$nvme" >/dev/null
size_mib=2048
for pages in 4k 2m; do
  if [ "$pages" = 2m ]; then hugepages_set $((size_mib / 2 + 8)) >/dev/null; mem="size=${size_mib}M,hugepages=on"; else mem="size=${size_mib}M"; fi
  for i in $(seq "$RUNS"); do
    RUST_LOG=rvmm=info,rvmm_vfio=info "$RVMM" run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
      --cmdline "$(guest_cmdline basic)" --memory "$mem" --device "$nvme" --serial off <&9 >/tmp/res.out 2>&1 || true
    hmark bench_sample "reserve_$pages" "size_mib=$size_mib" \
      "reserve_ms=$(ms_of "$(sed -n 's/.*prefaulted and locked in \([^ ]*\).*/\1/p' /tmp/res.out | head -n1)")" \
      "dma_map_ms=$(ms_of "$(sed -n 's/.*DMA-mapped [0-9]* MiB.* in \([^ ]*\)$/\1/p' /tmp/res.out | head -n1)")"
  done
  [ "$pages" = 2m ] && hugepages_set 0 >/dev/null
done
SCENARIO

# The samples are shown as they come; the whole console is kept.
log="$workdir/console.log"
bash resources/testhost.sh --scenario "$scenario" --workdir "$workdir" --memory 3G --nvme 1 \
  --no-igb --timeout 1800 | sed -u 's/\r$//' | tee "$log" |
  grep --line-buffered -E '^HOST (bench_sample|bench_error) ' || true

# figure_median NAME KEY: the median of the KEY= values of the HOST bench_sample NAME lines, or n/a.
figure_median() {
  local values
  mapfile -t values < <(grep -E "^HOST bench_sample $1 " "$log" | tr ' ' '\n' | sed -n "s/^$2=//p")
  median "${values[@]}" || echo n/a
}
# gib_s MIB MS: the rate of MIB mebibytes in MS milliseconds in GiB/s, or n/a.
gib_s() { awk -v s="$1" -v t="$2" 'BEGIN { if (t + 0 > 0) printf "%.2f", s / 1024 / (t / 1000); else print "n/a" }'; }

echo
echo "| figure | median of $runs |"
echo "|---|---|"
for kernel in vmlinuz vmlinux; do
  echo "| boot_$kernel | vcpu_ms=$(figure_median "boot_$kernel" vcpu_ms)" \
    "init_ms=$(figure_median "boot_$kernel" init_ms)" \
    "overhead_mib=$(figure_median "boot_$kernel" overhead_mib) |"
done
for pages in 4k 2m; do
  size_mib=$(figure_median "reserve_$pages" size_mib)
  reserve_ms=$(figure_median "reserve_$pages" reserve_ms)
  dma_map_ms=$(figure_median "reserve_$pages" dma_map_ms)
  echo "| reserve_$pages | size_mib=$size_mib reserve_ms=$reserve_ms dma_map_ms=$dma_map_ms" \
    "reserve_gib_s=$(gib_s "$size_mib" "$reserve_ms") dma_map_gib_s=$(gib_s "$size_mib" "$dma_map_ms") |"
done
