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
#   host_driver_bind BDF                gives a device back to the host driver (HOST host_bind)
#   nvme_host_namespace BDF [SECS], nvme_host_readback BDF
#                                       an NVMe's namespace / the MiB the guest's nvme scenarios
#                                       write, read through the host nvme driver
#   netdev_of BDF, link_up IF [ADDR/LEN], vf_of PF INDEX, vf_set_mac PF INDEX MAC, vf_report PF
#   kvm_stat NAME STAT, kvm_report NAME LABEL
#                                       KVM debugfs counters (exits, ...) of the VM of run NAME
# shellcheck disable=SC3043,SC3045 # busybox sh has local and ulimit -l
# shellcheck disable=SC2034 # the constants are for the scenarios

RVMM=/bin/rvmm
GUEST_BZIMAGE=/guest/vmlinuz
GUEST_VMLINUX=/guest/vmlinux
GUEST_INITRAMFS=/guest/initramfs.cpio.gz
# Seconds after which an rvmm run is killed (rvmm_run, rvmm_start) / a quick run is (rvmm_capture).
RVMM_TIMEOUT=${RVMM_TIMEOUT:-300}
RVMM_CAPTURE_TIMEOUT=${RVMM_CAPTURE_TIMEOUT:-60}
# iproute2's ip (busybox ip cannot configure virtual functions), put into the test host by
# build-host-initramfs.sh.
IPROUTE2=${IPROUTE2:-/usr/sbin/ip}

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

# upstream_port BDF: the BDF of the bridge above device BDF (its root port).
upstream_port() {
  basename "$(dirname "$(readlink -f "/sys/bus/pci/devices/$1")")"
}

# le_bytes VALUE COUNT: writes VALUE as COUNT little-endian bytes to stdout (zero bytes from
# /dev/zero: printf cannot be trusted with NUL).
le_bytes() {
  local value=$(($1)) i=0 byte
  while [ "$i" -lt "$2" ]; do
    byte=$((value & 255))
    if [ "$byte" = 0 ]; then
      head -c 1 /dev/zero
    else
      # shellcheck disable=SC2059 # the format is the escape of one byte
      printf "\\$(printf %03o "$byte")"
    fi
    value=$((value >> 8))
    i=$((i + 1))
  done
}

# aer_inject BDF UNCOR_STATUS: makes the kernel's AER core see an uncorrectable error with
# status UNCOR_STATUS (0x4000 Completion Timeout: non-fatal by default; 0x10 Data Link
# Protocol: fatal) reported by device BDF, through aer_inject (/dev/aer_inject): it fakes the
# AER registers of BDF and of its root port and raises the port's AER interrupt. The recovery
# that follows reaches every driver below the port, vfio-pci's error_detected (the VFIO error
# interrupt) among them. HOST aer_inject <bdf> <status> ok, or failed <error>.
aer_inject() {
  local bdf="$1" status="$2" rest domain bus dev fn
  domain=$((0x${bdf%%:*}))
  rest=${bdf#*:}
  bus=$((0x${rest%%:*}))
  rest=${rest#*:}
  dev=$((0x${rest%%.*}))
  fn=$((${rest#*.}))
  # struct aer_error_inj: u8 bus, dev, fn, a pad byte, u32 uncor_status, cor_status,
  # header_log0..3, domain: 32 bytes, written at once.
  {
    le_bytes "$bus" 1
    le_bytes "$dev" 1
    le_bytes "$fn" 1
    le_bytes 0 1
    le_bytes "$status" 4
    le_bytes 0 20
    le_bytes "$domain" 4
  } >/tmp/aer_inject.bin
  if dd if=/tmp/aer_inject.bin of=/dev/aer_inject bs=32 count=1 2>/tmp/aer_inject.err; then
    hmark aer_inject "$bdf" "$status" ok
  else
    hmark aer_inject "$bdf" "$status" failed "$(tail -n 1 /tmp/aer_inject.err)"
    return 1
  fi
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

# host_driver_bind BDF: gives the device back to the driver the host kernel picks for it (clears
# driver_override, unbinds, drivers_probe): HOST host_bind BDF driver=<driver>.
host_driver_bind() {
  local bdf="$1" dev="/sys/bus/pci/devices/$1"
  if [ ! -e "$dev" ]; then
    hmark host_bind "$bdf" fail no_such_device
    return 1
  fi
  # An empty line clears the override.
  echo >"$dev/driver_override"
  if [ -e "$dev/driver" ]; then echo "$bdf" >"$dev/driver/unbind"; fi
  echo "$bdf" >/sys/bus/pci/drivers_probe 2>/dev/null
  hmark host_bind "$bdf" "driver=$(driver_of "$dev")"
}

# nvme_host_namespace BDF [SECS]: prints the namespace block device of the NVMe controller at BDF
# once its /dev node exists, waiting up to SECS seconds (default 30). The controller's sysfs
# directory holds nvme<ctrl>n<ns> without native multipath, the path devices
# nvme<subsys>c<ctrl>n<ns> with it (whose block device is the head nvme<subsys>n<ns>).
nvme_host_namespace() {
  local dev="/sys/bus/pci/devices/$1" deadline entry name
  deadline=$(($(date +%s) + ${2:-30}))
  while [ "$(date +%s)" -le "$deadline" ]; do
    for entry in "$dev"/nvme/nvme*/nvme*; do
      [ -e "$entry" ] || continue
      name=$(basename "$entry")
      case "$name" in
        nvme*c*n*) name="${name%%c*}n${name##*n}" ;;
        nvme*n*) ;;
        *) continue ;;
      esac
      if [ -b "/dev/$name" ]; then
        echo "$name"
        return 0
      fi
    done
    sleep 0.2
  done
  return 1
}

# nvme_host_readback BDF: reads the MiB at offset 1 MiB (where the guest's nvme scenarios write
# their pattern) of the NVMe at BDF through the host's nvme driver, uncached:
# HOST nvme_readback BDF dev=<name> md5=<md5> and HOST nvme_readback_head BDF <first line>.
nvme_host_readback() {
  local name
  if ! name=$(nvme_host_namespace "$1"); then
    hmark nvme_readback "$1" fail no_namespace "driver=$(driver_of "/sys/bus/pci/devices/$1")"
    return 1
  fi
  if ! dd if="/dev/$name" of=/tmp/readback bs=1048576 skip=1 count=1 iflag=direct 2>/tmp/dd.err; then
    hmark nvme_readback "$1" fail "$(tail -n1 /tmp/dd.err)"
    return 1
  fi
  hmark nvme_readback "$1" "dev=$name" "md5=$(md5sum </tmp/readback | cut -d' ' -f1)"
  hmark nvme_readback_head "$1" "$(head -n1 /tmp/readback)"
}

# netdev_of BDF: prints the network interface of the PCI device at BDF.
netdev_of() {
  local net
  for net in /sys/bus/pci/devices/"$1"/net/*; do
    [ -e "$net" ] || continue
    basename "$net"
    return 0
  done
  return 1
}

# link_up IF [ADDR/LEN]: sets interface IF up (with that address), waits up to 10 s for carrier:
# HOST link IF carrier=<0|1> operstate=<state> mac=<mac>.
link_up() {
  local net="/sys/class/net/$1" deadline
  ip link set "$1" up || return 1
  if [ -n "${2:-}" ]; then ip addr add "$2" dev "$1" || return 1; fi
  deadline=$(($(date +%s) + 10))
  while [ "$(cat "$net/carrier" 2>/dev/null)" != 1 ] && [ "$(date +%s)" -le "$deadline" ]; do
    sleep 0.2
  done
  hmark link "$1" "carrier=$(cat "$net/carrier" 2>/dev/null || echo 0)" \
    "operstate=$(cat "$net/operstate")" "mac=$(cat "$net/address")"
}

# vf_of PF INDEX: prints the BDF of virtual function INDEX (from 0) of PF.
vf_of() {
  local link="/sys/bus/pci/devices/$1/virtfn$2"
  [ -e "$link" ] || return 1
  basename "$(readlink "$link")"
}

# vf_set_mac PF INDEX MAC: has the PF driver assign MAC to its virtual function INDEX (netlink
# IFLA_VF_MAC, through iproute2): HOST vf_mac PF INDEX MAC ok, or fail with the reason.
vf_set_mac() {
  local pf="$1" index="$2" mac="$3" net
  if [ ! -x "$IPROUTE2" ]; then
    hmark vf_mac "$pf" "$index" "$mac" fail "no_iproute2 ($IPROUTE2 is missing)"
    return 1
  fi
  if ! net=$(netdev_of "$pf"); then
    hmark vf_mac "$pf" "$index" "$mac" fail no_pf_interface
    return 1
  fi
  if "$IPROUTE2" link set dev "$net" vf "$index" mac "$mac" 2>/tmp/ip.err; then
    hmark vf_mac "$pf" "$index" "$mac" ok
  else
    hmark vf_mac "$pf" "$index" "$mac" fail "$(cat /tmp/ip.err)"
    return 1
  fi
}

# vf_report PF: the PF driver's view of its virtual functions (iproute2's ip link show):
# HOST vf_view PF INDEX mac=<mac> for each.
vf_report() {
  local net
  if [ ! -x "$IPROUTE2" ] || ! net=$(netdev_of "$1"); then
    hmark vf_view "$1" none "no iproute2 or no PF interface"
    return 1
  fi
  "$IPROUTE2" link show dev "$net" | awk -v pf="$1" \
    '$1 == "vf" { print "HOST vf_view " pf " " $2 " mac=" $4 }'
}

# kvm_stat NAME STAT: prints the KVM debugfs counter STAT (exits, mmio_exits, io_exits,
# halt_exits, irq_exits, ...) of the VM of the running rvmm run NAME, summed over its vCPUs by
# KVM (directory /sys/kernel/debug/kvm/<pid>-<vm fd>). Mounts debugfs if needed.
kvm_stat() {
  local pid dir
  [ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
  pid=$(cat "/tmp/rvmm-$1.pid")
  for dir in /sys/kernel/debug/kvm/"$pid"-*; do
    if [ -r "$dir/$2" ]; then
      cat "$dir/$2"
      return 0
    fi
  done
  return 1
}

# kvm_report NAME LABEL: HOST kvm_stats LABEL uptime=<test host uptime> exits=<n> mmio_exits=<n>
# io_exits=<n> halt_exits=<n> irq_exits=<n> for the VM of run NAME.
kvm_report() {
  local stat line
  line="uptime=$(uptime_s)"
  for stat in exits mmio_exits io_exits halt_exits irq_exits; do
    line="$line $stat=$(kvm_stat "$1" "$stat" || echo none)"
  done
  hmark kvm_stats "$2" "$line"
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

# --- hotplug: whole-line consoles, the control API, timings ----------------------------------
#   api_socket NAME                     the control API socket of run NAME (for --api-socket)
#   rvmm_start_lines NAME ARG... / rvmm_wait_lines NAME
#                                       rvmm_start / rvmm_wait for runs the scenario talks to
#                                       while the guest prints: whole console lines only
#   rvmm_ctl NAME LABEL ARG...          `rvmm ctl` on run NAME: HOST ctl / ctl_out / ctl_err
#   ctl_events NAME                     follows run NAME's events: HOST event <json>
#   rvmm_count NAME TEXT, rvmm_wait_more NAME TEXT COUNT [SECS]
#                                       lines of run NAME's console with TEXT / waits for more
#   rvmm_arrival_ms NAME TEXT N         when the Nth console line with TEXT arrived (uptime ms)
#   rvmm_fds NAME LABEL                 open fds of run NAME's rvmm process
#   guest_input LINE                    types LINE on the running guest's console (rvmm's stdin)
#   guest_type_lines PREFIX FIRST LAST  types numbered lines on it in one burst
#   rvmm_stop_monitor NAME              types "stop" for the monitor scenario, waits for the end
#   uptime_ms, read_uptime_ms, timed LABEL COMMAND
#                                       uptime (ms) printed / in UPTIME_MS; wall time of a command
#   pci_rescan BDF                      brings a removed host device back
#   console_attach NAME N, console_type LINE, console_wait N TEXT [SECS], console_detach N,
#   console_report N                    `rvmm ctl console` on run NAME's socket console

# read_uptime_ms: sets UPTIME_MS to the test host's uptime in milliseconds (10 ms resolution;
# shell builtins only, and no command substitution: no process at all).
read_uptime_ms() {
  local up
  read -r up _ </proc/uptime
  UPTIME_MS=$((${up%.*} * 1000 + (1${up#*.} - 100) * 10))
}

# uptime_ms: prints the test host's uptime in milliseconds (read_uptime_ms).
uptime_ms() {
  read_uptime_ms
  echo "$UPTIME_MS"
}

# msix_table_size BDF: the MSI-X table size of device BDF, read from its config space by walking
# the capability list (0 when it has no MSI-X capability).
msix_table_size() {
  od -An -v -tu1 "/sys/bus/pci/devices/$1/config" | awk '
    { for (i = 1; i <= NF; i++) b[n++] = $i }
    END {
      p = b[52] - b[52] % 4
      guard = 0
      while (p >= 64 && guard++ < 48) {
        if (b[p] == 17) { print b[p + 2] + (b[p + 3] % 8) * 256 + 1; exit }
        p = b[p + 1] - b[p + 1] % 4
      }
      print 0
    }'
}

# api_poller SOCKET FILE: until killed, asks the rvmm at SOCKET for info every half second and
# appends "rc=<ctl's exit status> ms=<time to the answer>" to FILE (prints nothing itself).
api_poller() {
  local start rc
  while :; do
    start=$(uptime_ms)
    timeout -s KILL 30 "$RVMM" ctl --api-socket "$1" info >/dev/null 2>&1
    rc=$?
    echo "rc=$rc ms=$(($(uptime_ms) - start))" >>"$2"
    sleep 0.5
  done
}

# api_socket NAME: the control API socket of run NAME.
api_socket() { echo "/tmp/rvmm-$1.sock"; }

# rvmm_start_lines NAME ARG...: rvmm_start for a run during which the scenario prints markers
# while the guest prints its own. rvmm writes the guest's console a byte at a time, so a marker
# printed meanwhile could land inside a guest line; here the guest's console reaches ours (and
# /tmp/rvmm-NAME.out) one whole line at a time, and rvmm's stderr comes as HOST rvmm_log lines.
# End the run with rvmm_wait_lines. RVMM_AS_USER=USER runs rvmm as USER (a control plane that
# drops privileges); RVMM_FD5=PATH opens PATH read-write as rvmm's descriptor 5 first (as root:
# the way such a control plane hands over a VFIO group). Every line of both also goes to
# /tmp/rvmm-NAME.stamped after the test host's uptime in milliseconds when it arrived (10 ms
# resolution; rvmm's stderr lines after "rvmm_log"): when the guest saw something, without the
# granularity of a wait's polling (rvmm_arrival_ms).
rvmm_start_lines() {
  local name="$1" run="/tmp/rvmm-$1"
  shift
  rvmm_stdin
  hmark begin "$name"
  hmark rvmm_args "$*"
  rm -f "$run.fifo" "$run.errfifo" "$run.events.pid" "$(api_socket "$name")"
  : >"$run.out"
  : >"$run.stamped"
  mkfifo "$run.fifo" "$run.errfifo"
  awk -v out="$run.out" -v stamped="$run.stamped" "$AWK_UPTIME_MS"'
    { print; fflush(); print >>out; fflush(out); print uptime_ms() " " $0 >>stamped; fflush(stamped) }' <"$run.fifo" &
  echo $! >"$run.tee"
  awk -v stamped="$run.stamped" "$AWK_UPTIME_MS"'
    { print "HOST rvmm_log " $0; fflush(); print uptime_ms() " rvmm_log " $0 >>stamped; fflush(stamped) }' <"$run.errfifo" &
  echo $! >"$run.errtee"
  if [ -n "${RVMM_AS_USER:-}" ]; then
    hmark rvmm_user "$RVMM_AS_USER" "memlock_kb=$(ulimit -l)"
    # shellcheck disable=SC2016 # expanded by su's shell, not here
    set -- su -s /bin/sh -c 'exec "$0" "$@"' -- "$RVMM_AS_USER" "$RVMM" "$@"
  else
    set -- "$RVMM" "$@"
  fi
  # busybox timeout, su and sh -c exec in turn: $! is rvmm's pid either way.
  if [ -n "${RVMM_FD5:-}" ]; then
    timeout -s KILL "$RVMM_TIMEOUT" "$@" >"$run.fifo" 2>"$run.errfifo" <&9 5<>"$RVMM_FD5" &
  else
    timeout -s KILL "$RVMM_TIMEOUT" "$@" >"$run.fifo" 2>"$run.errfifo" <&9 &
  fi
  echo $! >"$run.pid"
  hmark rvmm_pid "$!"
}

# rvmm_wait_lines NAME: waits for the run started by rvmm_start_lines, its console and its events
# follower to end: HOST rvmm_exit <code>, HOST end NAME. Returns rvmm's exit code.
rvmm_wait_lines() {
  local run="/tmp/rvmm-$1" rc
  wait "$(cat "$run.pid")"
  rc=$?
  wait "$(cat "$run.tee")"
  wait "$(cat "$run.errtee")"
  if [ -f "$run.events.pid" ]; then wait "$(cat "$run.events.pid")"; fi
  hmark rvmm_exit "$rc"
  hmark end "$1"
  return "$rc"
}

# Seconds after which an `rvmm ctl` call of rvmm_ctl is killed (exit status 137): longer than any
# answer rvmm may take (a hot-add waits up to 55 s), shorter than ctl's own 300 s.
RVMM_CTL_TIMEOUT=${RVMM_CTL_TIMEOUT:-90}

# rvmm_ctl NAME LABEL ARG...: runs `rvmm ctl --api-socket <socket of run NAME> ARG...`:
# HOST ctl LABEL rc=<exit status> ms=<wall time>, the answer on one line as HOST ctl_out LABEL
# <json>, each stderr line as HOST ctl_err LABEL <line>. Returns ctl's exit status.
rvmm_ctl() {
  local name="$1" label="$2" start rc line
  shift 2
  start=$(uptime_ms)
  timeout -s KILL "$RVMM_CTL_TIMEOUT" "$RVMM" ctl --api-socket "$(api_socket "$name")" "$@" \
    >/tmp/ctl.out 2>/tmp/ctl.err
  rc=$?
  hmark ctl "$label" "rc=$rc" "ms=$(($(uptime_ms) - start))"
  # Pretty JSON never has a line break inside a string: joined lines are the same JSON.
  if [ -s /tmp/ctl.out ]; then hmark ctl_out "$label" "$(sed 's/^ *//' /tmp/ctl.out | tr -d '\n')"; fi
  while IFS= read -r line || [ -n "$line" ]; do hmark ctl_err "$label" "$line"; done </tmp/ctl.err
  return "$rc"
}

# ctl_events NAME: once run NAME's API socket exists (at most 30 s), follows its events until the
# VM ends, each as HOST event <json>; rvmm_wait_lines waits for the follower.
ctl_events() {
  local sock deadline
  sock=$(api_socket "$1")
  deadline=$(($(uptime_ms) + 30000))
  until [ -S "$sock" ]; do
    if [ "$(uptime_ms)" -gt "$deadline" ]; then
      hmark events "$1" no_socket
      return 1
    fi
    sleep 0.1
  done
  "$RVMM" ctl --api-socket "$sock" events 2>&1 | awk '{ print "HOST event " $0; fflush() }' &
  echo $! >"/tmp/rvmm-$1.events.pid"
}

# rvmm_count NAME TEXT: how many lines of run NAME's console contain TEXT (fixed string).
rvmm_count() { grep -cF -- "$2" "/tmp/rvmm-$1.out" 2>/dev/null || true; }

# AWK_UPTIME_MS: an awk function uptime_ms(), the test host's uptime in milliseconds (10 ms
# resolution), as uptime_ms does it.
AWK_UPTIME_MS='function uptime_ms(  line, f) {
  getline line <"/proc/uptime"; close("/proc/uptime"); split(line, f, " ")
  return int(f[1] * 100 + 0.5) * 10
}'

# rvmm_arrival_ms NAME TEXT N: when (test host uptime, ms) the Nth line of run NAME's console
# output with TEXT arrived (see rvmm_start_lines), or nothing.
rvmm_arrival_ms() {
  grep -F -- "$2" "/tmp/rvmm-$1.stamped" 2>/dev/null | sed -n "${3}p" | cut -d' ' -f1
}

# rvmm_wait_more NAME TEXT COUNT [SECS [POLL]]: waits until more than COUNT lines of run NAME's
# console contain TEXT, at most SECS seconds (default 60) or until rvmm exits, looking every POLL
# seconds (default 0.05; each look forks, and the test host's one CPU is the guest's too: a
# caller that takes the line's arrival from rvmm_arrival_ms can look less often): HOST wait_more
# ok ms=<waited> <TEXT>, or HOST wait_more timeout <TEXT>.
rvmm_wait_more() {
  local name="$1" text="$2" count="$3" start deadline pid
  pid=$(cat "/tmp/rvmm-$name.pid")
  start=$(uptime_ms)
  deadline=$((start + ${4:-60} * 1000))
  while [ "$(rvmm_count "$name" "$text")" -le "$count" ]; do
    if [ "$(uptime_ms)" -gt "$deadline" ] || [ ! -d "/proc/$pid" ]; then
      hmark wait_more timeout "$text"
      return 1
    fi
    sleep "${5:-0.05}"
  done
  hmark wait_more ok "ms=$(($(uptime_ms) - start))" "$text"
}

# rvmm_fds NAME LABEL: HOST rvmm_fds LABEL <file descriptors open in run NAME's rvmm process>.
rvmm_fds() {
  local fd count=0
  for fd in /proc/"$(cat "/tmp/rvmm-$1.pid")"/fd/*; do
    [ -e "$fd" ] || [ -L "$fd" ] || continue
    count=$((count + 1))
  done
  hmark rvmm_fds "$2" "$count"
}

# guest_input LINE: types LINE on the console of the guest that runs now (rvmm's stdin, the
# FIFO of rvmm_stdin), e.g. "stop" for the guest's monitor scenario: HOST guest_input LINE.
guest_input() {
  rvmm_stdin
  echo "$1" >/run/rvmm-stdin
  hmark guest_input "$1"
}

# rvmm_stop_monitor NAME: types "stop" once on the console of run NAME (a guest running the
# monitor scenario, which then reports its kernel log and powers off) and waits for the run to
# end; if the guest has not ended within 60 s, reports the VM's KVM counters (HOST kvm_stats
# no_done: did the vCPUs still run?) and shuts it down through the API.
rvmm_stop_monitor() {
  guest_input stop
  if ! rvmm_wait_output "$1" 'GUEST done' 60; then
    kvm_report "$1" no_done
    rvmm_ctl "$1" shutdown shutdown
  fi
  rvmm_wait_lines "$1"
}

# guest_type_lines PREFIX FIRST LAST: types the lines PREFIX-FIRST .. PREFIX-LAST on the console
# of the guest that runs now, in one write burst: HOST guest_typed PREFIX FIRST LAST.
guest_type_lines() {
  local n="$2"
  rvmm_stdin
  {
    while [ "$n" -le "$3" ]; do
      echo "$1-$n"
      n=$((n + 1))
    done
  } >/run/rvmm-stdin
  hmark guest_typed "$1" "$2" "$3"
}

# timed LABEL COMMAND: runs the shell command line COMMAND in this shell: HOST timed LABEL
# rc=<status> ms=<wall time>, and its stderr as HOST timed_err LABEL <line>.
timed() {
  local start rc line
  start=$(uptime_ms)
  eval "$2" 2>/tmp/timed.err
  rc=$?
  hmark timed "$1" "rc=$rc" "ms=$(($(uptime_ms) - start))"
  while IFS= read -r line || [ -n "$line" ]; do hmark timed_err "$1" "$line"; done </tmp/timed.err
  return "$rc"
}

# pci_rescan BDF: rescans the host's PCI buses until device BDF is back (at most 10 s), e.g. after
# echo 1 >.../remove: HOST rescan BDF driver=<the driver that took it>.
pci_rescan() {
  local dev="/sys/bus/pci/devices/$1" deadline
  echo 1 >/sys/bus/pci/rescan
  deadline=$(($(uptime_ms) + 10000))
  until [ -e "$dev" ]; do
    if [ "$(uptime_ms)" -gt "$deadline" ]; then
      hmark rescan "$1" fail no_such_device
      return 1
    fi
    sleep 0.1
  done
  hmark rescan "$1" "driver=$(driver_of "$dev")"
}

# --- socket consoles (rvmm run --serial socket=PATH) -------------------------------------------

# console_attach NAME N: attaches `rvmm ctl console` (non-interactive: stdin is no terminal) to
# run NAME's socket console, found through its API socket, as attachment N: its stdin is the
# FIFO /tmp/console-N.in, held open for writing as this shell's descriptor 4 (console_type), its
# output goes to /tmp/console-N.out: HOST console_attach N.
console_attach() {
  local fifo="/tmp/console-$2.in"
  rm -f "$fifo" "/tmp/console-$2.out" "/tmp/console-$2.err"
  mkfifo "$fifo"
  timeout -s KILL 300 "$RVMM" ctl --api-socket "$(api_socket "$1")" console <"$fifo" \
    >"/tmp/console-$2.out" 2>"/tmp/console-$2.err" &
  echo $! >"/tmp/console-$2.pid"
  exec 4>"$fifo"
  hmark console_attach "$2"
}

# console_type LINE: types LINE into the attached console (descriptor 4): HOST console_type LINE.
console_type() {
  echo "$1" >&4
  hmark console_type "$1"
}

# console_wait N TEXT [SECS]: waits until attachment N's output contains TEXT (fixed string), at
# most SECS seconds (default 60): HOST console_wait N ok|timeout TEXT.
console_wait() {
  local deadline=$(($(uptime_ms) + ${3:-60} * 1000))
  until grep -qF -- "$2" "/tmp/console-$1.out" 2>/dev/null; do
    if [ "$(uptime_ms)" -gt "$deadline" ]; then
      hmark console_wait "$1" timeout "$2"
      return 1
    fi
    sleep 0.1
  done
  hmark console_wait "$1" ok "$2"
}

# console_detach N: ends attachment N's stdin (which detaches it) and waits for it to exit:
# HOST console_detach N rc=<exit status>, then console_report N.
console_detach() {
  local rc
  exec 4>&-
  wait "$(cat "/tmp/console-$1.pid")"
  rc=$?
  hmark console_detach "$1" "rc=$rc"
  console_report "$1"
}

# console_report N: attachment N's output as HOST console_out N <line> (carriage returns
# removed) and its stderr as HOST console_err N <line>.
console_report() {
  local line
  tr -d '\r' <"/tmp/console-$1.out" | while IFS= read -r line || [ -n "$line" ]; do
    hmark console_out "$1" "$line"
  done
  while IFS= read -r line || [ -n "$line" ]; do hmark console_err "$1" "$line"; done \
    <"/tmp/console-$1.err"
}
