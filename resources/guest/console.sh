# Console input of the rvmm test guest, sourced by /init (resources/guest/init) and by the
# harness's own tests (tests/tests/console_reader.rs) on the build machine.
#
# Why a reader of its own: busybox's `read -t SECS` takes a line one byte at a time and checks
# its deadline before every byte; when the deadline passes in the middle of a line, it returns
# without setting the variable and the bytes it already took are gone: "stop" typed as the pause
# ran out became a line "top", or "op", and the monitor never stopped (once in a few suite runs).
# A read without a deadline never drops what it took, so the console is read by a process that
# only blocks on it, and whoever waits with a deadline waits on something else.
# shellcheck shell=sh
# shellcheck disable=SC3043 # busybox sh has local

# console_reader STOP_FILE WAKE_FIFO: reads its standard input one whole line at a time, without
# a deadline, until end of file or the line "stop": then it creates STOP_FILE and writes a line
# to WAKE_FIFO (so that a wait on that FIFO ends at once) and returns. Every other line is
# echoed as "GUEST console_input <line>" (the console stress test counts them).
console_reader() {
  local line
  while IFS= read -r line; do
    if [ "$line" = stop ]; then
      : >"$1"
      echo stop >"$2"
      return 0
    fi
    printf 'GUEST console_input %s\n' "$line"
  done
}

# console_wait SECS WAKE_FIFO_FD: waits SECS seconds (fractions allowed), or less when the
# console reader writes to the wake FIFO open as descriptor WAKE_FIFO_FD. Shell builtins only.
# What the deadline may cut off here is a wake-up line, which carries no data.
console_wait() {
  # shellcheck disable=SC3045 # busybox read has -t and -u
  read -r -t "$1" -u "$2" _ || true
}

# console_drain WAKE_FIFO_FD: takes the wake-up lines already waiting on the wake FIFO (at most
# 64), without waiting for more: what a look about to start covers anyway. Shell builtins only.
# busybox's `read -t 0` waits forever; a millisecond returns at once when nothing is there.
console_drain() {
  local n=0
  # shellcheck disable=SC3045 # busybox read has -t and -u
  while [ "$n" -lt 64 ] && read -r -t 0.001 -u "$1" _; do
    n=$((n + 1))
  done
}
