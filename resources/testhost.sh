#!/usr/bin/env bash
# Boots the test host: a QEMU q35 machine under TCG with AMD SVM (so /dev/kvm works inside), an
# Intel IOMMU (a real VFIO stack), N emulated NVMe drives and an igb NIC (SR-IOV), each on its own
# PCIe root port. Its serial console (and the consoles of the rvmm guests it runs) goes to stdout.
# The test host runs --scenario FILE as /scenario.sh (appended to the initramfs as a second cpio
# archive) and powers off; QEMU then exits. This script is the one place that knows the QEMU
# command line: the Rust harness (tests/src/) and resources/demo.sh call it.
#
# Usage: testhost.sh [OPTIONS] [-- EXTRA_QEMU_ARGS...]
#   --scenario FILE    test host scenario, a busybox sh script (default: none; the host reports
#                      and powers off)
#   --memory SIZE      test host RAM (default 3G)
#   --nvme N           emulated NVMe drives on raw image files (default 1)
#   --nvme-size SIZE   size of each drive (default 64M)
#   --igb | --no-igb   an igb NIC (SR-IOV PF, 7 VFs) on its own root port (default: yes)
#   --spare-ports N    additional empty root ports (default 0)
#   --e1000            two e1000 NICs (8086:100e: INTx only, an I/O BAR), each on its own root
#                      port, joined by a QEMU hub: pass one through, drive the other on the host
#   --timeout SECS     hard limit: QEMU is killed after it (default 600; exit status 124)
#   --workdir DIR      scratch dir for drive images and the combined initrd
#                      (default build/run/testhost)
#   --initramfs FILE   test host initramfs (default build/images/host-initramfs.cpio)
#   --kernel FILE      test host kernel (default build/kernel/current/vmlinuz)
#   --append STR       more test host kernel parameters
#   --cpus N           test host vCPUs (default 1). With two, QEMU 10.0's multi-threaded TCG
#                      running nested SVM guests has, once in a few runs, aborted on an
#                      iotlb_to_section assertion and stopped a CPU's timer interrupts; one
#                      vCPU (one TCG thread) has not. Give 2 only where two host CPUs are the
#                      point (--numa, parallel prefault). A test host with more than one vCPU
#                      runs with idle=poll: with two, an idle test host CPU (halted, waiting for
#                      its timer) has stopped taking timer interrupts for good (RCU: "timer
#                      wakeup didn't happen ... on cpu=N", that CPU idle) in 2 of 7 --numa
#                      runs; polling CPUs never halt. (That is the lost interrupt request the
#                      periodic tick below makes good; idle=poll has stayed.) It keeps a core
#                      of the machine busy per vCPU. One TCG thread for all vCPUs
#                      (-accel tcg,thread=single) is no way out: rvmm's guests then hang early
#                      in their boot.
#   --numa             two host NUMA nodes (needs --cpus 2: one CPU and half the RAM each) and
#                      one more NVMe drive (serial nvme-node1) on a root port behind a PCIe
#                      expander bus (pxb-pcie, buses 0x80..) on node 1. QEMU emulates the nodes
#                      without any distance between them.
# Exit status: QEMU's (0 after the test host powered off), 124 on timeout, 125 when the test
#              host froze (its heartbeat stopped for 30 s; see resources/testhost-watch.py).
set -euo pipefail
# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

scenario=""
memory=3G
nvme=1
nvme_size=64M
igb=1
spare_ports=0
e1000=0
timeout_s=600
workdir="$BUILD_DIR/run/testhost"
initramfs="$IMAGES_DIR/host-initramfs.cpio"
kernel="$KERNEL_DIR/vmlinuz"
append=""
cpus=1
numa=0
extra=()

usage() { sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --scenario) scenario="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --nvme) nvme="$2"; shift 2 ;;
    --nvme-size) nvme_size="$2"; shift 2 ;;
    --igb) igb=1; shift ;;
    --no-igb) igb=0; shift ;;
    --spare-ports) spare_ports="$2"; shift 2 ;;
    --e1000) e1000=1; shift ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --initramfs) initramfs="$2"; shift 2 ;;
    --kernel) kernel="$2"; shift 2 ;;
    --append) append="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --numa) numa=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) echo "testhost.sh: unknown option $1" >&2; usage ;;
  esac
done

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing: run resources/install-deps.sh"
[ -s "$kernel" ] || die "test host kernel $kernel is missing: run resources/guest-kernel.sh"
[ -s "$initramfs" ] || die "test host initramfs $initramfs is missing: run resources/prepare-images.sh"
[ -z "$scenario" ] || [ -f "$scenario" ] || die "scenario $scenario does not exist"
case "$cpus$nvme$spare_ports$timeout_s" in *[!0-9]*) die "--cpus, --nvme, --spare-ports and --timeout take numbers" ;; esac
[ "$cpus" -ge 1 ] || die "--cpus takes at least 1"

mkdir -p "$workdir"
initrd="$workdir/initrd.cpio"
if [ -n "$scenario" ]; then
  # The scenario goes into a second archive after the big one: the kernel unpacks both.
  rm -rf "$workdir/scenario-root"
  mkdir -p "$workdir/scenario-root"
  install -m 0755 "$scenario" "$workdir/scenario-root/scenario.sh"
  (cd "$workdir/scenario-root" && echo scenario.sh | cpio -o -H newc -R 0:0 --quiet) >"$workdir/scenario.cpio"
  cat "$initramfs" "$workdir/scenario.cpio" >"$initrd"
  rm -rf "$workdir/scenario-root"
else
  cp "$initramfs" "$initrd"
fi

# Test host CPUs poll when idle if there are several (see --cpus).
idle=""
[ "$cpus" -eq 1 ] || idle="idle=poll"
# A periodic timer tick (no dynamic ticks, no high-resolution timers: the local APIC timer in
# periodic mode, 250 Hz). QEMU 10.0's nested SVM emulation sets a CPU's interrupt requests in
# helper_vmrun (`cs->interrupt_request |= CPU_INTERRUPT_VIRQ`, target/i386/tcg/system/
# svm_helper.c) on the CPU's thread without the lock under which QEMU's main thread raises the
# APIC timer's request: once in a long while the request is lost. The vector then waits in the
# APIC for good; with a one-shot timer nothing raises it again and the test host freezes (its
# CPU halted, or spinning in a nested guest). A periodic timer delivers again at the next tick,
# and each delivery raises the request anew: a lost one costs 4 ms, not the run. Nested guests'
# timers fire on the test host's ticks then (4 ms granularity).
tick="nohz=off highres=off"
numa_args=""

# phys-bits=36: with QEMU's default of 40, the kernel places the igb VF BARs at 0xc000000000 and
# QEMU 10.0's igb leaves them unmapped there (VF registers read 0, "PF still in reset state");
# below 64 GiB they work.
# shellcheck disable=SC2054 # the commas belong to QEMU option values
args=(
  -machine q35,accel=tcg -cpu EPYC-Milan,+svm,phys-bits=36 -smp "$cpus" -m "$memory"
  -nodefaults -nographic -serial mon:stdio -no-reboot
  -device intel-iommu,intremap=on,caching-mode=on
)
port=0
add_port() {
  port=$((port + 1))
  args+=(-device "pcie-root-port,id=rp$port,slot=$port,chassis=$port")
}
for ((i = 0; i < nvme; i++)); do
  add_port
  rm -f "$workdir/nvme$i.img"
  truncate -s "$nvme_size" "$workdir/nvme$i.img"
  args+=(-drive "file=$workdir/nvme$i.img,if=none,format=raw,id=nv$i"
    -device "nvme,serial=nvme$i,drive=nv$i,bus=rp$port")
done
if [ "$igb" = 1 ]; then
  add_port
  # shellcheck disable=SC2054
  args+=(-device "igb,bus=rp$port,netdev=n0,romfile=" -netdev user,id=n0,restrict=on)
fi
if [ "$e1000" = 1 ]; then
  for i in 1 2; do
    add_port
    # shellcheck disable=SC2054
    args+=(-device "e1000,bus=rp$port,netdev=e1000h$i,romfile=" -netdev "hubport,id=e1000h$i,hubid=7")
  done
fi
for ((i = 0; i < spare_ports; i++)); do add_port; done
if [ "$numa" = 1 ]; then
  [ "$cpus" = 2 ] || die "--numa needs --cpus 2 (one CPU per node)"
  case "$memory" in
    *[Gg]) memory_mib=$((${memory%[Gg]} * 1024)) ;;
    *[Mm]) memory_mib=${memory%[Mm]} ;;
    *) die "--numa needs --memory in M or G (e.g. 3G)" ;;
  esac
  case "$memory_mib" in '' | *[!0-9]*) die "--numa needs --memory in whole M or G" ;; esac
  node0_mib=$((memory_mib / 2))
  # No automatic NUMA balancing in the test host: its hinting faults unmap and remap the pages
  # of rvmm's guests (and so their nested page tables) all the time, which nothing here needs.
  # With it (and idle=poll), the test host kernel still died once in 5 runs of the placement
  # test (stack corruption, its guest having triple-faulted); without it, 0 in 11.
  numa_args="numa_balancing=disable"
  rm -f "$workdir/nvme-node1.img"
  truncate -s "$nvme_size" "$workdir/nvme-node1.img"
  # shellcheck disable=SC2054
  args+=(-object "memory-backend-ram,id=mem0,size=${node0_mib}M"
    -object "memory-backend-ram,id=mem1,size=$((memory_mib - node0_mib))M"
    -numa node,nodeid=0,cpus=0,memdev=mem0 -numa node,nodeid=1,cpus=1,memdev=mem1
    -device pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0
    -device pcie-root-port,id=rpnode1,bus=pxb1,chassis=200,slot=200
    -drive "file=$workdir/nvme-node1.img,if=none,format=raw,id=nvnode1"
    -device nvme,serial=nvme-node1,drive=nvnode1,bus=rpnode1)
fi
args+=(-kernel "$kernel" -initrd "$initrd"
  -append "console=ttyS0 quiet intel_iommu=on no_timer_check panic=-1 $tick $idle $numa_args $append" "${extra[@]}")

# A monitor socket that only the watcher below uses, and the test host's heartbeat: its /init
# writes its uptime to its second serial port (ttyS1) once a second, into this file.
monitor="$workdir/monitor.sock"
heartbeat="$workdir/heartbeat"
rm -f "$monitor" "$heartbeat"
# shellcheck disable=SC2054
args+=(-monitor "unix:$monitor,server=on,wait=off"
  -chardev "file,id=heartbeat,path=$heartbeat" -device isa-serial,chardev=heartbeat)

log "qemu-system-x86_64 ${args[*]}"
report_at=$((timeout_s > 30 ? timeout_s - 15 : timeout_s))
# The watcher (resources/testhost-watch.py) ends a test host whose heartbeat stopped for 30 s (a
# freeze that got past the periodic tick above, or a hung kernel) instead of at the timeout, and
# prints where the CPU stood, also for a run that nears its timeout. It ends with QEMU; it holds
# none of our output beyond that.
froze="$workdir/froze"
rm -f "$froze"
python3 "$(dirname "${BASH_SOURCE[0]}")/testhost-watch.py" "$monitor" "$heartbeat" "$report_at" 30 "$froze" &
watcher=$!
# --foreground: QEMU keeps the terminal when run interactively (resources/demo.sh).
status=0
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 "${args[@]}" || status=$?
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
if [ -e "$froze" ]; then
  echo "testhost.sh: $(cat "$froze")" >&2
  rm -f "$froze"
  status=125
fi
rm -f "$monitor" "$heartbeat"
# The combined initrd is a copy of the big archive: do not keep one per test.
rm -f "$initrd" "$workdir/scenario.cpio"
exit "$status"
