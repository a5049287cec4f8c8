#!/usr/bin/env bash
# THE test command of rvmm (README and CI call it). From a clean clone on a Debian 12 machine,
# as root: installs the packages (and Debian's Rust toolchain when there is no rustup one, see
# use_cargo in lib.sh), builds rvmm in release mode, prepares the kernel and the images (cached;
# rebuilt when their inputs change), runs the unit tests of every crate and a short fuzzing run,
# then the integration tests, which boot test hosts under QEMU/TCG (one vCPU each,
# tests/README.md says why), one per core at a time (resources/run-integration-tests.sh).
# Exits non-zero if anything failed. Extra arguments go to the integration test binaries (a test
# name filter, --nocapture, ...).
#
# Environment: CARGO_TARGET_DIR (default <workspace>/target), RVMM_BIN (default
# <target>/release/rvmm), RVMM_BUILD_DIR (default <workspace>/build), FUZZ_SECONDS (seconds per
# fuzz target, default 10 here; 0 skips fuzzing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=resources/lib.sh
. "$root/resources/lib.sh"
use_cargo

bash resources/install-deps.sh
cargo build --release -p rvmm --bins --examples
RVMM_BIN="$(rvmm_binary)"
export RVMM_BIN
bash resources/prepare-images.sh

status=0
cargo test --workspace --exclude rvmm-tests --no-fail-fast || status=1
# A short run of every fuzz target (tests/fuzz, docs/fuzzing.md); FUZZ_SECONDS=0 skips it.
export FUZZ_SECONDS="${FUZZ_SECONDS:-10}"
if [ "$FUZZ_SECONDS" != 0 ]; then
  bash resources/fuzz.sh || status=1
fi
bash resources/run-integration-tests.sh "$@" || status=1
if [ "$status" -ne 0 ]; then
  echo "run-tests.sh: FAILED (test host console logs: ${RVMM_BUILD_DIR:-$root/build}/logs/)" >&2
fi
exit "$status"
