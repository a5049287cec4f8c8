#!/usr/bin/env bash
# Benchmarks of starting a VM, run in the test host (QEMU/TCG: compare ratios, not seconds):
#   - rvmm start -> vCPUs running, and rvmm start -> the guest's init (bzImage and vmlinux);
#   - VMM memory overhead: VmRSS of rvmm beyond the guest RAM once the guest is up;
#   - memory reservation rate (allocate + prefault + mlock) for the largest guest the test host
#     holds, on 4 KiB and 2 MiB pages, and the DMA-map rate of that RAM (one passthrough NVMe).
# Each figure is the median of RUNS runs (default 5). Prints a Markdown table.
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

median() { sort -n | awk '{a[NR]=$1} END { if (NR==0) print "n/a"; else print a[int((NR+1)/2)] }'; }

for kernel in "$GUEST_BZIMAGE" /guest/vmlinux; do
  name=$(basename "$kernel")
  : >/tmp/vcpu; : >/tmp/init; : >/tmp/rss
  for i in $(seq "$RUNS"); do
    set -- $(boot_once "$kernel")
    echo "$1" >>/tmp/vcpu; echo "$2" >>/tmp/init; echo "$3" >>/tmp/rss
  done
  hmark bench "boot_$name" "vcpu_ms=$(median </tmp/vcpu)" "init_ms=$(median </tmp/init)" \
    "overhead_mib=$(median </tmp/rss)"
done

# Reservation: the largest guest the 3 GiB test host holds, on 4 KiB then 2 MiB pages, with a
# passthrough NVMe so the RAM is also DMA-mapped. The guest powers off at once.
nvme=$(pci_find 1b36:0010)
vfio_bind "$nvme" >/dev/null
size_mib=2048
for pages in 4k 2m; do
  : >/tmp/res; : >/tmp/dma
  if [ "$pages" = 2m ]; then hugepages_set $((size_mib / 2 + 8)) >/dev/null; mem="size=${size_mib}M,hugepages=on"; else mem="size=${size_mib}M"; fi
  for i in $(seq "$RUNS"); do
    RUST_LOG=rvmm=info,rvmm_vfio=info "$RVMM" run --kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" \
      --cmdline "$(guest_cmdline basic)" --memory "$mem" --device "$nvme" --serial off <&9 >/tmp/res.out 2>&1 || true
    ms_of "$(sed -n 's/.*prefaulted and locked in \([^ ]*\).*/\1/p' /tmp/res.out | head -n1)" >>/tmp/res
    ms_of "$(sed -n 's/.*DMA-mapped [0-9]* MiB.* in \([^ ]*\)$/\1/p' /tmp/res.out | head -n1)" >>/tmp/dma
  done
  [ "$pages" = 2m ] && hugepages_set 0 >/dev/null
  res=$(median </tmp/res); dma=$(median </tmp/dma)
  hmark bench "reserve_$pages" "size_mib=$size_mib" "reserve_ms=$res" "dma_map_ms=$dma" \
    "reserve_gib_s=$(awk -v s=$size_mib -v t=$res 'BEGIN { if (t>0) printf "%.2f", s/1024/(t/1000); else print "n/a" }')" \
    "dma_map_gib_s=$(awk -v s=$size_mib -v t=$dma 'BEGIN { if (t>0) printf "%.2f", s/1024/(t/1000); else print "n/a" }')"
done
SCENARIO

log="$workdir/console.log"
bash resources/testhost.sh --scenario "$scenario" --workdir "$workdir" --memory 3G --nvme 1 \
  --no-igb --timeout 1800 | tee "$log" | grep -E '^HOST bench ' || true
echo
echo "| figure | median of $runs |"
echo "|---|---|"
grep -E '^HOST bench ' "$log" | sed 's/^HOST bench \([^ ]*\) \(.*\)$/| \1 | \2 |/'
