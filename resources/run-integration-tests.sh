#!/usr/bin/env bash
# Runs rvmm's integration test binaries (package rvmm-tests) in parallel lanes: each lane takes
# the next binary from one queue and runs it with --test-threads=1, so as many test hosts run at
# once as there are lanes. A test host vCPU is one TCG thread that keeps a core busy: the default
# is one lane per core (at most one per 4 GiB of available memory, a test host's 3 GiB and QEMU),
# and the harness's test host slots (RVMM_TESTHOST_SLOTS, tests/src/testhost.rs) are set to the
# same number, so a two-CPU test host (placement's NUMA host) waits until it has the machine's two
# cores to itself. Each binary's output is kept in <build>/logs/tests/<binary>.out and printed
# whole when it ends; a summary with each binary's time closes the run.
#
# Usage: resources/run-integration-tests.sh [ARGS...]   ARGS go to every test binary (a test
# name filter, --nocapture, ...).
# Environment: RVMM_TEST_LANES (number of lanes), RVMM_BUILD_DIR, CARGO_TARGET_DIR, RVMM_BIN.
# Exits non-zero if a binary failed or could not be built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"
use_cargo

# Longest first (times of a 2-core machine), so that the last binaries to start are short ones
# and the lanes end together; placement last, since its test host needs both cores. Binaries not
# listed run after the listed ones, before placement.
ORDER=(hotplug sriov console hostile passthrough legacy device_errors reboot ch_api lifecycle
  boot seccomp lifecycle_pause large_bar unprivileged embedding boot_errors testhost)
LAST=(placement)

lanes="${RVMM_TEST_LANES:-}"
if [ -z "$lanes" ]; then
  lanes="$(nproc)"
  avail_kib="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
  by_memory=$((avail_kib / (4 * 1024 * 1024)))
  [ "$by_memory" -ge "$lanes" ] || lanes="$by_memory"
  [ "$lanes" -ge 1 ] || lanes=1
fi
case "$lanes" in '' | *[!0-9]* | 0) die "RVMM_TEST_LANES must be a positive number" ;; esac
export RVMM_TESTHOST_SLOTS="$lanes"

out_dir="$BUILD_DIR/logs/tests"
rm -rf "$out_dir"
mkdir -p "$out_dir"

# The test executables cargo builds for the package (its library's unit tests and every file of
# tests/tests), as "name path" lines.
list="$out_dir/executables"
cargo test -p rvmm-tests --no-run --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("profile", {}).get("test") and msg.get("executable"):
        target = msg["target"]
        name = "lib" if "lib" in target["kind"] else target["name"]
        print(name, msg["executable"])
' >"$list"
[ -s "$list" ] || die "cargo built no test executable of rvmm-tests"

# The queue: listed binaries in ORDER, then unlisted ones, then LAST.
queue="$out_dir/queue"
{
  for name in "${ORDER[@]}"; do grep "^$name " "$list" || true; done
  grep -v -E "^($(IFS='|'; echo "${ORDER[*]}|${LAST[*]}")) " "$list" || true
  for name in "${LAST[@]}"; do grep "^$name " "$list" || true; done
} >"$queue"
: >"$out_dir/next"
: >"$out_dir/results"

# Prints the next "name path" line of the queue, or fails when it is empty.
take_next() {
  (
    flock 8
    index="$(wc -l <"$out_dir/next")"
    line="$(sed -n "$((index + 1))p" "$queue")"
    [ -n "$line" ] || exit 1
    echo taken >>"$out_dir/next"
    printf '%s\n' "$line"
  ) 8>"$out_dir/queue.lock"
}

lane() {
  local lane_no="$1" name exe started status elapsed
  shift
  while read -r name exe < <(take_next); do
    started=$(date +%s)
    printf 'run-integration-tests: lane %s: %s started\n' "$lane_no" "$name"
    status=0
    (cd "$root/tests" && "$exe" --test-threads=1 "$@") >"$out_dir/$name.out" 2>&1 || status=$?
    elapsed=$(($(date +%s) - started))
    {
      flock 9
      printf '\n===== %s (%s, lane %s, %s s, exit %s) =====\n' "$name" "$exe" "$lane_no" "$elapsed" "$status"
      cat "$out_dir/$name.out"
      printf '%s %s %s\n' "$name" "$status" "$elapsed" >>"$out_dir/results"
    } 9>"$out_dir/print.lock"
  done
}

log "$(wc -l <"$queue") test binaries in $lanes lane(s)"
started=$(date +%s)
pids=()
for ((i = 1; i <= lanes; i++)); do
  lane "$i" "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
# Doc tests of the harness (examples in its rustdoc).
status=0
cargo test -p rvmm-tests --doc -- "$@" || status=1

echo
echo "run-integration-tests: $(wc -l <"$out_dir/results") binaries in $(($(date +%s) - started)) s, $lanes lane(s):"
sort -k3 -n -r "$out_dir/results" | while read -r name code secs; do
  if [ "$code" = 0 ]; then verdict=ok; else verdict="FAILED (exit $code)"; fi
  printf '  %-16s %5s s  %s\n' "$name" "$secs" "$verdict"
done
if awk '$2 != 0 {bad=1} END {exit !bad}' "$out_dir/results"; then status=1; fi
if [ "$(wc -l <"$out_dir/results")" -ne "$(wc -l <"$queue")" ]; then
  echo "run-integration-tests: only $(wc -l <"$out_dir/results") of $(wc -l <"$queue") binaries ran" >&2
  status=1
fi
exit "$status"
