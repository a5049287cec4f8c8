#!/usr/bin/env bash
# Benchmark of the parallel prefault of guest RAM, run in the test host (QEMU/TCG, 2 vCPUs:
# compare ratios, not seconds): the reservation (allocate + prefault + mlock) of a 2 GiB guest,
# on 4 KiB pages and on 2 MiB hugepages, with 1 prefault thread (rvmm started under
# `taskset -c 0`, so it may use one CPU and starts one thread per region) and with N threads
# (all the test host's CPUs). The kernel is an empty file: rvmm reserves the RAM, logs the
# reservation, then refuses the kernel and exits, so no guest boots. Each figure is the median of
# RUNS runs (default 3); prints each run's figures, then the medians as a Markdown table.
#
# Usage: bench-prefault.sh            (as root; builds rvmm and the images first)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-3}"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"
use_cargo
bash resources/install-deps.sh
cargo build --release -p rvmm
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
bash resources/prepare-images.sh

workdir="${RVMM_BUILD_DIR:-$root/build}/run/bench-prefault"
mkdir -p "$workdir"
scenario="$workdir/scenario.sh"
cat >"$scenario" <<SCENARIO
RUNS=$runs
SCENARIO
cat >>"$scenario" <<'SCENARIO'
rvmm_stdin
: >/tmp/empty-kernel
# ms_of DURATION: "12.3ms" / "1.2s" / "850µs" (Rust Debug of Duration) -> integer ms.
ms_of() { awk -v d="$1" 'BEGIN { v=d+0; if (d ~ /µs$/) v/=1000; else if (d ~ /ms$/) ; else if (d ~ /s$/) v*=1000; printf "%d\n", v }'; }
size_mib=2048
hmark bench_cpus "$(cat /sys/devices/system/cpu/online)"
for pages in 4k 2m; do
  if [ "$pages" = 2m ]; then hugepages_set $((size_mib / 2 + 8)) >/dev/null; mem="size=${size_mib}M,hugepages=on"; else mem="size=${size_mib}M"; fi
  for i in $(seq "$RUNS"); do
    for cpus in one all; do
      if [ "$cpus" = one ]; then set -- taskset -c 0 "$RVMM"; else set -- "$RVMM"; fi
      "$@" run --kernel /tmp/empty-kernel --memory "$mem" --serial off --log-level info <&9 >/tmp/res.out 2>&1 || true
      line=$(grep 'prefaulted and locked in' /tmp/res.out | head -n1)
      [ -n "$line" ] || hmark bench_error "$pages $cpus" "$(tail -n 2 /tmp/res.out | tr '\n' ' ')"
      hmark bench_sample "reserve_${pages}_$cpus" "size_mib=$size_mib" \
        "reserve_ms=$(ms_of "$(echo "$line" | sed -n 's/.*prefaulted and locked in \([^ ]*\).*/\1/p')")" \
        "threads=$(echo "$line" | sed -n 's/.*(\([0-9]*\) prefault threads.*/\1/p')"
    done
  done
  [ "$pages" = 2m ] && hugepages_set 0 >/dev/null
done
SCENARIO

log="$workdir/console.log"
bash resources/testhost.sh --scenario "$scenario" --workdir "$workdir" --memory 3G --nvme 0 \
  --no-igb --cpus 2 --timeout 1200 | sed -u 's/\r$//' | tee "$log" |
  grep --line-buffered -E '^HOST (bench_sample|bench_error|bench_cpus) ' || true

# figure_median NAME KEY: the median of the KEY= values of the HOST bench_sample NAME lines, or n/a.
figure_median() {
  local values
  mapfile -t values < <(grep -E "^HOST bench_sample $1 " "$log" | tr ' ' '\n' | sed -n "s/^$2=//p")
  median "${values[@]}" || echo n/a
}
gib_s() { awk -v s="$1" -v t="$2" 'BEGIN { if (t + 0 > 0) printf "%.2f", s / 1024 / (t / 1000); else print "n/a" }'; }

echo
echo "| figure | median of $runs |"
echo "|---|---|"
for pages in 4k 2m; do
  for cpus in one all; do
    name="reserve_${pages}_$cpus"
    size_mib=$(figure_median "$name" size_mib)
    reserve_ms=$(figure_median "$name" reserve_ms)
    echo "| $name | size_mib=$size_mib threads=$(figure_median "$name" threads)" \
      "reserve_ms=$reserve_ms reserve_gib_s=$(gib_s "$size_mib" "$reserve_ms") |"
  done
done
