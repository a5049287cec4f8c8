#!/usr/bin/env bash
# Builds rvmm's libFuzzer targets (tests/fuzz, a cargo-fuzz project) and runs each for
# FUZZ_SECONDS seconds (default 30), one per core at a time. Fails (non-zero) if a target does not
# build or any input crashes one; the crashing input is saved and its path printed.
#
# Usage: resources/fuzz.sh [TARGET...]   (default: every target)
#
# Environment:
#   FUZZ_SECONDS      seconds per target (default 30)
#   FUZZ_SANITIZER    address (default) or none; `none` builds and runs faster but only catches
#                     panics, not memory errors in unsafe code. The default is none with a Rust
#                     toolchain that has no AddressSanitizer runtime (Debian's rustc-web)
#   FUZZ_JOBS         targets fuzzed at once (default: the number of cores)
#   FUZZ_TARGET_DIR   cargo target directory of the fuzz build (default <target>/fuzz, where
#                     <target> is CARGO_TARGET_DIR or <workspace>/target)
#   RVMM_BUILD_DIR    the git-ignored build directory (default <workspace>/build): corpora are kept
#                     in <build>/fuzz/corpus/<target> across runs, crashes go to
#                     <build>/fuzz/artifacts/<target>/, logs to <build>/fuzz/logs/<target>.log
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sanitizer coverage passes). The toolchain
# is a stable one (resources/lib.sh use_cargo), so the build runs with RUSTC_BOOTSTRAP=1, which
# lets stable rustc accept them. cargo-fuzz itself is installed from crates.io when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"
use_cargo

ALL_TARGETS=(api_request pci_config slot_registers msix_table vfio_config vfio_region_info claim_file netlink_answer)
seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-}"
fuzz_dir="$root/tests/fuzz"
target_dir="${FUZZ_TARGET_DIR:-$(cargo_target_dir)/fuzz}"
build="${RVMM_BUILD_DIR:-$root/build}/fuzz"
triple="$(rustc -vV | sed -n 's/^host: //p')"
if [ -z "$sanitizer" ]; then
  sanitizer=address
  # -Zsanitizer=address links the toolchain's librustc-<channel>_rt.asan.a: rustup's toolchains
  # have it, Debian's rustc-web does not (the link fails).
  if ! compgen -G "$(rustc --print sysroot)/lib/rustlib/$triple/lib/librustc-*_rt.asan.a" >/dev/null; then
    sanitizer=none
    log "this Rust toolchain has no AddressSanitizer runtime: building without a sanitizer (FUZZ_SANITIZER=none)"
  fi
fi

case "$seconds" in '' | *[!0-9]*) echo "fuzz.sh: FUZZ_SECONDS must be a number of seconds" >&2; exit 2 ;; esac
case "$sanitizer" in address | none) ;; *) echo "fuzz.sh: FUZZ_SANITIZER must be address or none" >&2; exit 2 ;; esac
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
  [ -f "$fuzz_dir/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no fuzz target $t (have: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
started=$(date +%s)
log "building ${targets[*]} (sanitizer $sanitizer) in $target_dir"
if [ "$*" = "" ]; then
  cargo fuzz build --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --sanitizer "$sanitizer"
else
  for t in "${targets[@]}"; do
    cargo fuzz build --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --sanitizer "$sanitizer" "$t"
  done
fi
log "built in $(($(date +%s) - started)) s"

# What cargo fuzz run would set: ASan's ODR check trips over Rust's duplicate symbols.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
mkdir -p "$build/logs"

# run_target T: runs target T for $seconds seconds; its verdict goes to $build/logs/T.status.
run_target() {
  local t="$1" corpus="$build/corpus/$1" artifacts="$build/artifacts/$1" args
  mkdir -p "$corpus" "$artifacts"
  # Seeds (hand-written valid inputs) join the corpus; libFuzzer keeps what adds coverage.
  if [ -d "$fuzz_dir/seeds/$t" ]; then cp -n "$fuzz_dir/seeds/$t"/* "$corpus"/ 2>/dev/null || true; fi
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    -artifact_prefix="$artifacts/")
  [ -f "$fuzz_dir/dict/$t.dict" ] && args+=(-dict="$fuzz_dir/dict/$t.dict")
  if "$target_dir/$triple/release/$t" "${args[@]}" "$corpus" >"$build/logs/$t.log" 2>&1; then
    echo ok >"$build/logs/$t.status"
  else
    echo crash >"$build/logs/$t.status"
  fi
}

# Each target is one libFuzzer process on one core: as many at once as the machine has cores.
jobs="${FUZZ_JOBS:-$(nproc)}"
case "$jobs" in '' | *[!0-9]* | 0) die "FUZZ_JOBS must be a positive number" ;; esac
log "running ${#targets[@]} targets for ${seconds} s each, $jobs at a time (corpora in $build/corpus)"
running=0
for t in "${targets[@]}"; do
  rm -f "$build/logs/$t.status"
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  running=$((running + 1))
done
wait

failed=()
for t in "${targets[@]}"; do
  if [ "$(cat "$build/logs/$t.status" 2>/dev/null)" = ok ]; then
    log "$t: $(grep -E '^stat::number_of_executed_units' "$build/logs/$t.log" | awk '{print $2}') inputs, no crash"
  else
    failed+=("$t")
    log "$t: CRASH (log: $build/logs/$t.log)"
    grep -E '^(thread .* panicked|==[0-9]+==ERROR|SUMMARY|artifact_prefix|Test unit written)' \
      "$build/logs/$t.log" | head -n 20 >&2 || true
    log "reproduce: $target_dir/$triple/release/$t <crash file above>"
  fi
done

log "total $(($(date +%s) - started)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
