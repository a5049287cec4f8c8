# shellcheck shell=sh
# Helpers for test host scenarios (sourced by the test host's /init before /scenario.sh runs).
#
# Output conventions, parsed by the Rust harness (tests/src/):
#   HOST <key> <value...>     a marker of the test host
#   GUEST <key> <value...>    a marker of an rvmm guest (its serial console, passed through)
#   HOST begin <name> ... HOST end <name>
#                             one rvmm run; markers in between belong to it, among them
#                             HOST rvmm_exit <code> (137: killed by the run's timeout)
#
# Scenario API:
#   guest_cmdline SCENARIO [PARAM...]   kernel command line for the test guest
#   rvmm_run NAME ARG...                runs `rvmm ARG...` to its end, console passed through
#   rvmm_start NAME ARG... / rvmm_wait NAME
#                                       the same split in two, to act while the guest runs
#   rvmm_wait_output NAME TEXT [SECS]   waits until the run's console shows TEXT
#   rvmm_report_process NAME            HOST vmlck_kb / vmrss_kb / vmhwm_kb / threads of the run
#   rvmm_capture NAME ARG...            runs `rvmm ARG...` expecting a quick end; each output line
#                                       as HOST stdout / HOST stderr; RVMM_AS_USER=nobody runs it
#                                       without root's capabilities
#   vfio_bind BDF, sriov_enable PF N, pci_find VENDOR:DEVICE, hugepages_set N
# shellcheck disable=SC3043,SC3045 # busybox sh has local and ulimit -l
# shellcheck disable=SC2034 # the constants are for the scenarios

RVMM=/bin/rvmm
GUEST_BZIMAGE=/guest/vmlinuz
GUEST_VMLINUX=/guest/vmlinux
GUEST_INITRAMFS=/guest/initramfs.cpio.gz
# Seconds after which an rvmm run is killed (rvmm_run, rvmm_start) / a quick run is (rvmm_capture).
RVMM_TIMEOUT=${RVMM_TIMEOUT:-300}
RVMM_CAPTURE_TIMEOUT=${RVMM_CAPTURE_TIMEOUT:-60}

hmark() { echo "HOST $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

driver_of() {
  if [ -e "$1/driver" ]; then basename "$(readlink "$1/driver")"; else echo none; fi
}

iommu_group_of() {
  if [ -e "$1/iommu_group" ]; then basename "$(readlink "$1/iommu_group")"; else echo none; fi
}

pci_id_of() {
  echo "$(sed 's/^0x//' "$1/vendor"):$(sed 's/^0x//' "$1/device")"
}

report_host_pci() {
  local dev
  for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev" ] || continue
    hmark pci "$(basename "$dev")" "$(pci_id_of "$dev")" "class=$(cat "$dev/class")" \
      "driver=$(driver_of "$dev")" "iommu_group=$(iommu_group_of "$dev")"
  done
}

# pci_find VENDOR:DEVICE: prints the BDF of every PCI device with that ID (hex, no 0x).
pci_find() {
  local dev
  for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev" ] || continue
    [ "$(pci_id_of "$dev")" = "$1" ] && basename "$dev"
  done
  return 0
}

# vfio_bind BDF: hands the device to vfio-pci (driver_override, unbind, drivers_probe).
vfio_bind() {
  local bdf="$1" dev="/sys/bus/pci/devices/$1" driver group
  if [ ! -e "$dev" ]; then
    hmark vfio_bind "$bdf" fail no_such_device
    return 1
  fi
  echo vfio-pci >"$dev/driver_override"
  if [ -e "$dev/driver" ]; then echo "$bdf" >"$dev/driver/unbind"; fi
  echo "$bdf" >/sys/bus/pci/drivers_probe 2>/dev/null
  driver=$(driver_of "$dev")
  group=$(iommu_group_of "$dev")
  if [ "$driver" = vfio-pci ] && [ -c "/dev/vfio/$group" ]; then
    hmark vfio_bind "$bdf" ok "group=$group"
  else
    hmark vfio_bind "$bdf" fail "driver=$driver" "group=$group"
    return 1
  fi
}

# sriov_enable PF N: creates N virtual functions on the PF and reports each (HOST vf ...).
sriov_enable() {
  local pf="$1" dev="/sys/bus/pci/devices/$1" vf
  if ! echo "$2" >"$dev/sriov_numvfs"; then
    hmark sriov "$pf" fail "totalvfs=$(cat "$dev/sriov_totalvfs" 2>/dev/null || echo none)"
    return 1
  fi
  hmark sriov "$pf" "numvfs=$(cat "$dev/sriov_numvfs")" "totalvfs=$(cat "$dev/sriov_totalvfs")"
  for vf in "$dev"/virtfn*; do
    [ -e "$vf" ] || continue
    hmark vf "$pf" "$(basename "$(readlink "$vf")")" "$(pci_id_of "$vf")" \
      "iommu_group=$(iommu_group_of "$vf")" "driver=$(driver_of "$vf")"
  done
}

# hugepages_set N: sizes the default (2 MiB) hugepage pool.
hugepages_set() {
  echo "$1" >/proc/sys/vm/nr_hugepages
  hugepages_report
}

hugepages_report() {
  hmark hugepages_total "$(awk '/^HugePages_Total:/ { print $2 }' /proc/meminfo)"
  hmark hugepages_free "$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)"
}

# guest_cmdline SCENARIO [PARAM...]: the test guest's kernel command line.
guest_cmdline() {
  local scenario="$1"
  shift
  echo "console=ttyS0 quiet panic=-1 rvmm.scenario=$scenario $*"
}

# An rvmm run's stdin: a FIFO held open read-write, so it never reports end of file nor data.
rvmm_stdin() {
  if [ ! -p /run/rvmm-stdin ]; then
    mkfifo /run/rvmm-stdin
    exec 9<>/run/rvmm-stdin
  fi
}

# rvmm_start NAME ARG...: starts rvmm in the background; its console goes to ours (through tee)
# and to /tmp/rvmm-NAME.out. The run is killed after RVMM_TIMEOUT seconds.
rvmm_start() {
  local name="$1"
  shift
  rvmm_stdin
  hmark begin "$name"
  hmark rvmm_args "$*"
  rm -f "/tmp/rvmm-$name.fifo" "/tmp/rvmm-$name.out"
  mkfifo "/tmp/rvmm-$name.fifo"
  tee "/tmp/rvmm-$name.out" <"/tmp/rvmm-$name.fifo" &
  echo $! >"/tmp/rvmm-$name.tee"
  # busybox timeout execs the program in its own process: $! is rvmm's pid.
  timeout -s KILL "$RVMM_TIMEOUT" "$RVMM" "$@" >"/tmp/rvmm-$name.fifo" 2>&1 <&9 &
  echo $! >"/tmp/rvmm-$name.pid"
  hmark rvmm_pid "$!"
}

# rvmm_wait NAME: waits for the run started by rvmm_start to end; returns its exit code.
rvmm_wait() {
  local name="$1" rc
  wait "$(cat "/tmp/rvmm-$name.pid")"
  rc=$?
  wait "$(cat "/tmp/rvmm-$name.tee")"
  # The guest's last line may lack its newline: end it so the next marker starts a line.
  echo
  hmark rvmm_exit "$rc"
  hmark end "$name"
  return "$rc"
}

# rvmm_run NAME ARG...: runs rvmm to its end with its console passed through.
rvmm_run() {
  rvmm_start "$@"
  rvmm_wait "$1"
}

# rvmm_wait_output NAME TEXT [SECS]: waits until the console of run NAME contains TEXT (fixed
# string), at most SECS seconds (default 120) or until rvmm exits.
rvmm_wait_output() {
  local name="$1" text="$2" limit="${3:-120}" deadline pid
  pid=$(cat "/tmp/rvmm-$name.pid")
  deadline=$(($(date +%s) + limit))
  while ! grep -qF -- "$text" "/tmp/rvmm-$name.out" 2>/dev/null; do
    if [ "$(date +%s)" -gt "$deadline" ] || [ ! -d "/proc/$pid" ]; then
      hmark wait_output "$text" timeout
      return 1
    fi
    sleep 0.2
  done
  hmark wait_output "$text" ok
}

# rvmm_report_process NAME: memory figures of the running rvmm process of run NAME.
rvmm_report_process() {
  local pid status
  pid=$(cat "/tmp/rvmm-$1.pid")
  status="/proc/$pid/status"
  if [ ! -r "$status" ]; then
    hmark process gone
    return 1
  fi
  hmark vmlck_kb "$(awk '/^VmLck:/ { print $2 }' "$status")"
  hmark vmrss_kb "$(awk '/^VmRSS:/ { print $2 }' "$status")"
  hmark vmhwm_kb "$(awk '/^VmHWM:/ { print $2 }' "$status")"
  hmark threads "$(awk '/^Threads:/ { print $2 }' "$status")"
}

# rvmm_capture NAME ARG...: runs rvmm expecting it to end quickly (within RVMM_CAPTURE_TIMEOUT
# seconds), then prints its output as HOST stdout / HOST stderr lines and its exit code.
# With RVMM_AS_USER set, rvmm runs as that user (no CAP_IPC_LOCK, so RLIMIT_MEMLOCK applies).
rvmm_capture() {
  local name="$1" rc line
  shift
  rvmm_stdin
  hmark begin "$name"
  hmark rvmm_args "$*"
  if [ -n "${RVMM_AS_USER:-}" ]; then
    hmark rvmm_user "$RVMM_AS_USER" "memlock_kb=$(ulimit -l)"
    # shellcheck disable=SC2016 # expanded by su's shell, not here
    # "--" ends su's options: busybox su would take rvmm's for its own.
    timeout -s KILL "$RVMM_CAPTURE_TIMEOUT" su -s /bin/sh -c 'exec "$0" "$@"' -- "$RVMM_AS_USER" \
      "$RVMM" "$@" >/tmp/rvmm.stdout 2>/tmp/rvmm.stderr <&9
  else
    timeout -s KILL "$RVMM_CAPTURE_TIMEOUT" "$RVMM" "$@" >/tmp/rvmm.stdout 2>/tmp/rvmm.stderr <&9
  fi
  rc=$?
  while IFS= read -r line || [ -n "$line" ]; do hmark stdout "$line"; done </tmp/rvmm.stdout
  while IFS= read -r line || [ -n "$line" ]; do hmark stderr "$line"; done </tmp/rvmm.stderr
  hmark rvmm_exit "$rc"
  hmark end "$name"
  return "$rc"
}
