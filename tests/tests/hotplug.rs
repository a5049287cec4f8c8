//! Runtime hotplug through the control API (`rvmm run --api-socket`, `rvmm ctl`), proven from
//! the guest's own view inside the test host. The guest runs the `monitor` scenario of
//! `resources/guest/init`: it stays up and prints `GUEST pci-added` / `pci-bound` /
//! `pci-removed`, `GUEST block-added` / `block-removed` and `GUEST net-added` / `net-removed` as
//! devices come and go, and acts on each new NVMe namespace as `rvmm.io=` says (`pattern`: write
//! and read back a pattern; `load`: read it over and over). The test host drives rvmm with
//! `rvmm ctl` (`HOST ctl <label> rc= ms=`, `HOST ctl_out <label> <json>`, `HOST ctl_err`), follows
//! its events (`HOST event <json>`), marks each step (`HOST step <name>`) and times what it does
//! itself (`HOST timed <label> rc= ms=`).
//!
//! Four test host runs: `hotplug_acpi` (the NVMe scenarios through ACPI hotplug, see
//! [`acpi_scenario`]), `hotplug_nvme` (hot-add, graceful removal and re-add of an NVMe drive,
//! then host-initiated removals while the guest reads the drive), `hotplug_cycles` (100
//! add/remove cycles of one drive) and `hotplug_misc` (an igb VF; a cold-plugged drive, requests
//! the API must refuse while the VM has it, and its removal at runtime; a hot-add whose client
//! goes away). Each test asserts one behaviour.
//!
//! Not covered: a malformed JSON body and two devices in one JSON body sent as raw HTTP. The
//! test host's busybox `nc` cannot connect to a unix socket (no `-U`), so requests only reach
//! rvmm through `rvmm ctl`, which refuses two devices itself (tested) and never sends malformed
//! JSON. The API server's own refusals are covered by its unit tests.

use std::time::Duration;

use rvmm_tests::{token, GuestRun, Marker, Section, SharedRun, Source, TestHost, TestHostOutput};

/// Where the guest finds a device hot-added into the first free root port (secondary bus 1).
const GUEST_BDF: &str = "0000:01:00.0";
/// Root ports of every VM (hotplug slots 1 to 4).
const ROOT_PORTS: u64 = 4;
/// Add/remove cycles of the cycle run; every `GRACEFUL_EVERY`th removal is graceful.
const CYCLES: u64 = 100;
const GRACEFUL_EVERY: u64 = 25;
/// Add/remove cycles of the ACPI hotplug run; every second removal is graceful (about a
/// second a cycle in the test host).
const ACPI_CYCLES: u64 = 100;
/// How long the test host's own command may take when it takes a device back from a VM.
const HOST_REMOVAL_LIMIT_MS: u64 = 1000;
/// The default graceful removal timeout of `rvmm ctl remove-device`.
const REMOVE_TIMEOUT_MS: u64 = 10_000;
/// A PCI address the test host does not have.
const ABSENT_BDF: &str = "0000:7e:1f.7";
/// The `--event-log` and `--log-file` of the `host_remove` run.
const EVENT_LOG: &str = "/tmp/host_remove.events";
const LOG_FILE: &str = "/tmp/host_remove.rvmm.log";

static NVME_RUN: SharedRun = SharedRun::new();
static CYCLES_RUN: SharedRun = SharedRun::new();
static MISC_RUN: SharedRun = SharedRun::new();
static ACPI_RUN: SharedRun = SharedRun::new();

// --- scenarios ------------------------------------------------------------------------------

/// The scenario lines that start VM `name` (guest scenario `monitor` with `params`, its API
/// socket at `/tmp/rvmm-<name>.sock`, `extra` appended to the command line unquoted), follow its
/// events and open an `if` that runs the steps once the monitor is ready; [`finish_shutdown`] or
/// [`finish_stop`] closes it.
fn start(name: &str, params: &[&str], extra: &str, timeout_secs: u32) -> String {
    let args = GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .root_ports(4)
        .guest_scenario("monitor", params)
        .arg("--api-socket")
        .arg(&format!("/tmp/rvmm-{name}.sock"))
        .rvmm_args();
    format!(
        "RVMM_TIMEOUT={timeout_secs}\n\
         rvmm_start_lines {name} {args} {extra}\n\
         ctl_events {name}\n\
         if rvmm_wait_output {name} 'GUEST monitor ready' 120; then\n"
    )
}

/// Closes [`start`]: shuts the VM down through the API and waits for rvmm to end.
fn finish_shutdown(name: &str) -> String {
    format!("fi\nrvmm_ctl {name} shutdown shutdown\nrvmm_wait_lines {name}\n")
}

/// Closes [`start`]: tells the guest's monitor to stop (it reports its kernel log, and the guest
/// powers off), or shuts the VM down through the API if the guest does not end within 60 s
/// (`rvmm_stop_monitor`). `stop` is typed once: the guest reads its console without a deadline
/// (resources/guest/console.sh), so a typed line is never lost.
fn finish_stop(name: &str) -> String {
    format!("fi\nrvmm_stop_monitor {name}\n")
}

/// Hot-add, graceful removal and re-add of the NVMe drive (`add`), the drive read back through
/// the test host's nvme driver (`readback`), then removals the test host starts itself while
/// the guest reads the drive (`host_remove`): sysfs `remove`, then an unbind from vfio-pci.
/// `host_remove` cold-plugs the drive, writes its event log and rvmm's log (level info) to
/// files, which the scenario prints after rvmm's end, and reads the counters twice while the
/// guest reads the drive (around a console line of the guest) and once at the end.
fn nvme_scenario() -> String {
    let add_device = "add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\"";
    let pattern = format!("rvmm.pattern={}", token());
    let mut s = String::from(
        "NVME=$(pci_find 1b36:0010 | sed -n 1p)\nhmark nvme_device \"$NVME\"\nvfio_bind \"$NVME\"\n\
         hmark msix_table \"$(msix_table_size \"$NVME\")\"\n",
    );
    s += &start(
        "add",
        &["rvmm.hold=300", "rvmm.io=pattern", &pattern],
        "",
        330,
    );
    s += &format!(
        "hmark step add\n\
         rvmm_ctl add add {add_device}\n\
         rvmm_wait_more add 'GUEST nvme_pattern ' 0 60\n\
         rvmm_ctl add info_added info\n\
         hmark step graceful\n\
         rvmm_ctl add remove remove-device disk0\n\
         rvmm_wait_more add 'GUEST block-removed' 0 30\n\
         rvmm_ctl add info_removed info\n\
         hmark step readd\n\
         rvmm_ctl add readd {add_device}\n\
         rvmm_wait_more add 'GUEST nvme_pattern ' 1 60\n\
         hmark step end\n"
    );
    s += &finish_shutdown("add");
    s += "hmark begin readback\n\
          host_driver_bind \"$NVME\"\n\
          nvme_host_readback \"$NVME\"\n\
          vfio_bind \"$NVME\"\n\
          hmark end readback\n";
    s += &start(
        "host_remove",
        &["rvmm.hold=300", "rvmm.io=load", "rvmm.alive=2"],
        &format!(
            "--device \"path=/sys/bus/pci/devices/$NVME,id=disk0\" --event-log {EVENT_LOG} \
             --log-level info --log-file {LOG_FILE}"
        ),
        330,
    );
    s += &format!(
        "rvmm_wait_more host_remove 'GUEST io-started' 0 60\n\
         hmark step counters\n\
         rvmm_ctl host_remove counters_io1 counters\n\
         rvmm_wait_more host_remove 'GUEST monitor alive' \"$(rvmm_count host_remove 'GUEST monitor alive')\" 10\n\
         rvmm_ctl host_remove counters_io2 counters\n\
         hmark step sysfs_remove\n\
         timed sysfs_remove \"echo 1 >/sys/bus/pci/devices/$NVME/remove\"\n\
         rvmm_wait_more host_remove 'GUEST block-removed' 0 30\n\
         rvmm_wait_more host_remove 'GUEST io-stopped' 0 30\n\
         rvmm_ctl host_remove info_after_remove info\n\
         rvmm_wait_more host_remove 'GUEST monitor alive' \"$(rvmm_count host_remove 'GUEST monitor alive')\" 10\n\
         pci_rescan \"$NVME\"\n\
         vfio_bind \"$NVME\"\n\
         hmark step readd_after_remove\n\
         rvmm_ctl host_remove add_after_remove {add_device}\n\
         rvmm_wait_more host_remove 'GUEST io-started' 1 60\n\
         sleep 1\n\
         hmark step unbind\n\
         timed unbind \"echo $NVME >/sys/bus/pci/drivers/vfio-pci/unbind\"\n\
         rvmm_wait_more host_remove 'GUEST block-removed' 1 30\n\
         rvmm_wait_more host_remove 'GUEST io-stopped' 1 30\n\
         rvmm_ctl host_remove info_after_unbind info\n\
         rvmm_wait_more host_remove 'GUEST monitor alive' \"$(rvmm_count host_remove 'GUEST monitor alive')\" 10\n\
         vfio_bind \"$NVME\"\n\
         hmark step readd_after_unbind\n\
         rvmm_ctl host_remove add_after_unbind {add_device}\n\
         rvmm_wait_more host_remove 'GUEST block-added' 2 60\n\
         rvmm_ctl host_remove counters_end counters\n\
         hmark step end\n"
    );
    s += &finish_stop("host_remove");
    // After rvmm's end: the event log and rvmm's own log as it left them.
    s += &format!(
        "hmark begin host_remove_files\n\
         hmark event_log_lines \"$(grep -c . {EVENT_LOG})\"\n\
         while IFS= read -r line; do hmark event_log \"$line\"; done <{EVENT_LOG}\n\
         hmark log_file_lines \"$(grep -c . {LOG_FILE})\"\n\
         tail -n 300 {LOG_FILE} | while IFS= read -r line; do hmark log_file \"$line\"; done\n\
         hmark end host_remove_files\n"
    );
    s
}

/// One warm-up cycle (the VM's VFIO container lives from the first device on), the resources
/// before, `CYCLES` add/remove cycles without waiting for the guest (`HOST cycles done=<complete
/// cycles> ...`; the first failed call stops them with `HOST cycle_fail <n> <what> <message>`),
/// the resources after, and a last add the guest must see.
fn cycles_scenario() -> String {
    let add_device = "add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\"";
    let mut s = String::from("NVME=$(pci_find 1b36:0010 | sed -n 1p)\nvfio_bind \"$NVME\"\n");
    s += &start("cycles", &["rvmm.hold=600", "pciehp.dyndbg=+p"], "", 630);
    s += &format!(
        "rvmm_ctl cycles warm_add {add_device}\n\
         rvmm_ctl cycles warm_remove remove-device disk0 --surprise\n\
         rvmm_ctl cycles info_before info\n\
         rvmm_fds cycles before\n\
         i=1; failed=0; surprise=0; ejected=0; start_ms=$(uptime_ms)\n\
         while [ \"$i\" -le {CYCLES} ]; do\n\
           blocks=$(rvmm_count cycles 'GUEST block-added')\n\
           if ! timeout -s KILL \"$RVMM_CTL_TIMEOUT\" \"$RVMM\" ctl --api-socket \"$(api_socket cycles)\" {add_device} >/tmp/cycle.out 2>/tmp/cycle.err; then\n\
             failed=$((failed + 1)); hmark cycle_fail \"$i\" add \"$(head -n1 /tmp/cycle.err)\"; break\n\
           fi\n\
           # Remove only once the guest's driver has the namespace: a removal racing the\n\
           # driver's probe exercises the guest kernel, not rvmm.\n\
           if ! rvmm_wait_more cycles 'GUEST block-added' \"$blocks\" 30 >/dev/null; then\n\
             failed=$((failed + 1)); hmark cycle_fail \"$i\" guest no_block_device; break\n\
           fi\n\
           if [ $((i % {GRACEFUL_EVERY})) -eq 0 ]; then\n\
             timeout -s KILL \"$RVMM_CTL_TIMEOUT\" \"$RVMM\" ctl --api-socket \"$(api_socket cycles)\" remove-device disk0 >/tmp/cycle.out 2>/tmp/cycle.err\n\
           else\n\
             timeout -s KILL \"$RVMM_CTL_TIMEOUT\" \"$RVMM\" ctl --api-socket \"$(api_socket cycles)\" remove-device disk0 --surprise >/tmp/cycle.out 2>/tmp/cycle.err\n\
           fi || {{ failed=$((failed + 1)); hmark cycle_fail \"$i\" remove \"$(head -n1 /tmp/cycle.err)\"; break; }}\n\
           case \"$(cat /tmp/cycle.out)\" in\n\
             *'\"guest-ejected\"'*) ejected=$((ejected + 1)) ;;\n\
             *'\"surprise\"'*) surprise=$((surprise + 1)) ;;\n\
           esac\n\
           i=$((i + 1))\n\
         done\n\
         hmark cycles \"done=$((i - 1))\" \"failed=$failed\" \"surprise=$surprise\" \"guest_ejected=$ejected\" \"ms=$(($(uptime_ms) - start_ms))\"\n\
         rvmm_ctl cycles info_after info\n\
         rvmm_fds cycles after\n\
         sleep 3\n\
         blocks=$(rvmm_count cycles 'GUEST block-added')\n\
         hmark step last_add\n\
         rvmm_ctl cycles last_add {add_device}\n\
         rvmm_wait_more cycles 'GUEST block-added' \"$blocks\" 60\n\
         hmark step end\n"
    );
    s += &finish_stop("cycles");
    s
}

/// An igb VF hot-added and removed gracefully (`vf`), then an NVMe drive cold-plugged with
/// `--device` (`cold`): requests rvmm must refuse while the VM has it; the VF hot-added beside
/// it, taken back by the host (unbound from vfio-pci) and added again while the drive keeps the
/// VM's VFIO container alive (`stale_group`); then the drive's graceful removal at runtime.
fn misc_scenario() -> String {
    let nvme_path = "path=/sys/bus/pci/devices/$NVME";
    let mut s = String::from(
        "NVME=$(pci_find 1b36:0010 | sed -n 1p)\nhmark nvme_device \"$NVME\"\nvfio_bind \"$NVME\"\n\
         PF=$(pci_find 8086:10c9 | sed -n 1p)\n\
         sriov_enable \"$PF\" 1\n\
         link_up \"$(netdev_of \"$PF\")\" 10.0.0.1/24\n\
         VF0=$(vf_of \"$PF\" 0)\n\
         hmark vf_device \"$VF0\"\n\
         hmark pf_device \"$PF\"\n\
         vfio_bind \"$VF0\"\n",
    );
    s += &start("vf", &["rvmm.hold=200"], "", 230);
    s += "hmark step add\n\
          rvmm_ctl vf add add-device \"path=/sys/bus/pci/devices/$VF0,id=vf0\"\n\
          rvmm_wait_more vf 'GUEST net-added' 0 30\n\
          rvmm_ctl vf info_added info\n\
          hmark step remove\n\
          rvmm_ctl vf remove remove-device vf0\n\
          rvmm_wait_more vf 'GUEST net-removed' 0 30\n\
          rvmm_ctl vf info_removed info\n\
          hmark step end\n";
    s += &finish_stop("vf");
    s += &start(
        "cold",
        &["rvmm.hold=200"],
        &format!("--device \"{nvme_path},id=cold0\""),
        230,
    );
    s += &format!(
        "rvmm_wait_more cold 'GUEST block-added' 0 30\n\
         rvmm_ctl cold info_boot info\n\
         rvmm_fds cold before\n\
         hmark step refusals\n\
         rvmm_ctl cold unknown_id remove-device nosuchdisk\n\
         rvmm_ctl cold two_devices add-device \"path=$NVME,path=$PF\"\n\
         rvmm_ctl cold absent add-device \"path=/sys/bus/pci/devices/{ABSENT_BDF},id=absent\"\n\
         rvmm_ctl cold not_pci add-device \"path=/tmp/not-a-device,id=nopci\"\n\
         rvmm_ctl cold in_use add-device \"{nvme_path},id=disk1\"\n\
         rvmm_ctl cold not_bound add-device \"path=/sys/bus/pci/devices/$PF,id=pf\"\n\
         sleep 1\n\
         rvmm_ctl cold info_after info\n\
         rvmm_fds cold after\n\
         hmark step stale_group\n\
         rvmm_ctl cold vf_add add-device \"path=/sys/bus/pci/devices/$VF0,id=vf1\"\n\
         rvmm_wait_more cold 'GUEST net-added' 0 30\n\
         timed vf_unbind \"echo $VF0 >/sys/bus/pci/drivers/vfio-pci/unbind\"\n\
         rvmm_wait_more cold 'GUEST net-removed' 0 30\n\
         vfio_bind \"$VF0\"\n\
         rvmm_ctl cold vf_readd add-device \"path=/sys/bus/pci/devices/$VF0,id=vf2\"\n\
         rvmm_wait_more cold 'GUEST net-added' 1 30\n\
         rvmm_ctl cold vf_readd_remove remove-device vf2 --surprise\n\
         hmark step remove\n\
         rvmm_ctl cold remove remove-device cold0\n\
         rvmm_wait_more cold 'GUEST block-removed' 0 30\n\
         rvmm_ctl cold info_removed info\n\
         hmark step end\n"
    );
    s += &finish_stop("cold");
    s += &abandon_lines();
    s
}

/// A hot-add whose client is killed before the answer (`abandon`): the request is sent while
/// the guest is still booting (its pciehp not ready, so the add waits for the slot) and its
/// `rvmm ctl` is killed half a second later. rvmm must roll the add back (the guest never gets
/// the drive, `info` shows nothing) and release the drive, which a later add then gets.
fn abandon_lines() -> String {
    let args = GuestRun::new("abandon")
        .cpus(2)
        .memory("size=512M")
        .root_ports(4)
        .guest_scenario("monitor", &["rvmm.hold=200"])
        .arg("--api-socket")
        .arg("/tmp/rvmm-abandon.sock")
        .rvmm_args();
    format!(
        "RVMM_TIMEOUT=230\n\
         rvmm_start_lines abandon {args}\n\
         ctl_events abandon\n\
         hmark step abandon\n\
         timeout -s KILL 60 \"$RVMM\" ctl --api-socket \"$(api_socket abandon)\" add-device \"path=/sys/bus/pci/devices/$NVME,id=gone0\" >/tmp/abandon.out 2>&1 &\n\
         abandon_pid=$!\n\
         sleep 0.5\n\
         kill -KILL \"$abandon_pid\"\n\
         hmark abandon_killed \"guest_ready=$(rvmm_count abandon 'GUEST monitor ready')\"\n\
         if rvmm_wait_output abandon 'GUEST monitor ready' 120; then\n\
           sleep 2\n\
           rvmm_ctl abandon info_abandoned info\n\
           hmark abandon_blocks \"$(rvmm_count abandon 'GUEST block-added')\"\n\
           hmark step readd\n\
           rvmm_ctl abandon readd add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\"\n\
           rvmm_wait_more abandon 'GUEST block-added' 0 30\n\
           hmark step end\n\
         {}",
        finish_stop("abandon")
    )
}

/// The same NVMe drive through ACPI hotplug (`--hotplug acpi`, the guest's acpiphp): hot-add,
/// graceful removal, re-add, surprise removal, re-add and a removal the test host starts itself
/// (unbind from vfio-pci) in one VM (`acpi`); then the drive cold-plugged and removed gracefully
/// at runtime (`acpi_cold`), requests rvmm must refuse, an igb VF hot-added and removed
/// gracefully, and `ACPI_CYCLES` add/remove cycles of the drive.
fn acpi_scenario() -> String {
    let add_device = "add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\"";
    let pattern = format!("rvmm.pattern={}", token());
    let mut s = String::from(
        "NVME=$(pci_find 1b36:0010 | sed -n 1p)\nhmark nvme_device \"$NVME\"\nvfio_bind \"$NVME\"\n\
         PF=$(pci_find 8086:10c9 | sed -n 1p)\n\
         sriov_enable \"$PF\" 1\n\
         link_up \"$(netdev_of \"$PF\")\" 10.0.0.1/24\n\
         VF0=$(vf_of \"$PF\" 0)\n\
         vfio_bind \"$VF0\"\n",
    );
    s += &start(
        "acpi",
        &["rvmm.hold=300", "rvmm.io=pattern", &pattern],
        "--hotplug acpi",
        330,
    );
    s += &format!(
        "rvmm_ctl acpi info_boot info\n\
         hmark step add\n\
         rvmm_ctl acpi add {add_device}\n\
         rvmm_wait_more acpi 'GUEST nvme_pattern ' 0 60\n\
         rvmm_ctl acpi info_added info\n\
         hmark step graceful\n\
         rvmm_ctl acpi remove remove-device disk0\n\
         rvmm_wait_more acpi 'GUEST block-removed' 0 30\n\
         rvmm_ctl acpi info_removed info\n\
         hmark step readd\n\
         rvmm_ctl acpi readd {add_device}\n\
         rvmm_wait_more acpi 'GUEST nvme_pattern ' 1 60\n\
         hmark step surprise\n\
         rvmm_ctl acpi surprise remove-device disk0 --surprise\n\
         rvmm_wait_more acpi 'GUEST block-removed' 1 30\n\
         rvmm_wait_more acpi 'GUEST pci-removed' 1 30\n\
         rvmm_ctl acpi info_surprise info\n\
         hmark step readd2\n\
         rvmm_ctl acpi readd2 {add_device}\n\
         rvmm_wait_more acpi 'GUEST nvme_pattern ' 2 60\n\
         hmark step unbind\n\
         timed unbind \"echo $NVME >/sys/bus/pci/drivers/vfio-pci/unbind\"\n\
         rvmm_wait_more acpi 'GUEST block-removed' 2 30\n\
         rvmm_wait_more acpi 'GUEST pci-removed' 2 30\n\
         rvmm_ctl acpi info_unbind info\n\
         vfio_bind \"$NVME\"\n\
         hmark step end\n"
    );
    s += &finish_stop("acpi");
    s += &start(
        "acpi_cold",
        &["rvmm.hold=500"],
        "--hotplug acpi --device \"path=/sys/bus/pci/devices/$NVME,id=cold0\"",
        530,
    );
    s += "rvmm_wait_more acpi_cold 'GUEST block-added' 0 30\n\
          hmark step remove\n\
          rvmm_ctl acpi_cold remove remove-device cold0\n\
          rvmm_wait_more acpi_cold 'GUEST block-removed' 0 30\n\
          rvmm_ctl acpi_cold info_removed info\n\
          hmark step readd\n\
          rvmm_ctl acpi_cold readd add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\"\n\
          rvmm_wait_more acpi_cold 'GUEST block-added' 1 60\n\
          hmark step refusals\n\
          rvmm_ctl acpi_cold unknown_id remove-device nosuchdisk\n\
          rvmm_ctl acpi_cold in_use add-device \"path=/sys/bus/pci/devices/$NVME,id=disk1\"\n\
          hmark step vf\n\
          rvmm_ctl acpi_cold vf_add add-device \"path=/sys/bus/pci/devices/$VF0,id=vf0\"\n\
          rvmm_wait_more acpi_cold 'GUEST net-added' 0 30\n\
          rvmm_ctl acpi_cold vf_remove remove-device vf0\n\
          rvmm_wait_more acpi_cold 'GUEST net-removed' 0 30\n\
          hmark step cycles\n\
          rvmm_ctl acpi_cold cycles_first_remove remove-device disk0 --surprise\n\
          rvmm_ctl acpi_cold info_before info\n";
    s += &format!(
        "i=1; failed=0; ejected=0; start_ms=$(uptime_ms)\n\
         while [ \"$i\" -le {ACPI_CYCLES} ]; do\n\
           blocks=$(rvmm_count acpi_cold 'GUEST block-added')\n\
           if ! timeout -s KILL \"$RVMM_CTL_TIMEOUT\" \"$RVMM\" ctl --api-socket \"$(api_socket acpi_cold)\" add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\" >/tmp/cycle.out 2>/tmp/cycle.err; then\n\
             failed=$((failed + 1)); hmark cycle_fail \"$i\" add \"$(head -n1 /tmp/cycle.err)\"; break\n\
           fi\n\
           if ! rvmm_wait_more acpi_cold 'GUEST block-added' \"$blocks\" 30 >/dev/null; then\n\
             failed=$((failed + 1)); hmark cycle_fail \"$i\" guest no_block_device; break\n\
           fi\n\
           if [ $((i % 2)) -eq 0 ]; then set -- ; else set -- --surprise; fi\n\
           timeout -s KILL \"$RVMM_CTL_TIMEOUT\" \"$RVMM\" ctl --api-socket \"$(api_socket acpi_cold)\" remove-device disk0 \"$@\" >/tmp/cycle.out 2>/tmp/cycle.err \
             || {{ failed=$((failed + 1)); hmark cycle_fail \"$i\" remove \"$(head -n1 /tmp/cycle.err)\"; break; }}\n\
           case \"$(cat /tmp/cycle.out)\" in *'\"guest-ejected\"'*) ejected=$((ejected + 1)) ;; esac\n\
           i=$((i + 1))\n\
         done\n\
         hmark acpi_cycles \"done=$((i - 1))\" \"failed=$failed\" \"guest_ejected=$ejected\" \"ms=$(($(uptime_ms) - start_ms))\"\n\
         sleep 2\n\
         rvmm_ctl acpi_cold info_after info\n\
         hmark step end\n"
    );
    s += &finish_stop("acpi_cold");
    s
}

/// Notes on stderr (shown with a failing test) when the test host's own kernel reported RCU
/// stalls: one of its CPUs stopped taking timer interrupts, which freezes whatever ran there
/// (rvmm's threads, the guest's vCPUs) and makes later steps time out for reasons outside rvmm.
fn note_test_host_stalls(output: &'static TestHostOutput) -> &'static TestHostOutput {
    let stalls = output.rcu_stalls();
    if stalls > 0 {
        eprintln!(
            "note: the test host's kernel reported {stalls} RCU stalls in {}: a test host CPU \
             stopped taking timer interrupts (seen with QEMU's TCG running nested SVM guests); \
             steps after the first stall may fail for that reason",
            output.log_path().display()
        );
    }
    output
}

fn nvme_run() -> &'static TestHostOutput {
    note_test_host_stalls(NVME_RUN.get(
        || {
            TestHost::new("hotplug_nvme")
                .nvme_drives(1)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&nvme_scenario())
        },
        Duration::from_secs(600),
    ))
}

fn cycles_run() -> &'static TestHostOutput {
    note_test_host_stalls(CYCLES_RUN.get(
        || {
            // Hundreds of device remaps in the test host: with two vCPUs, QEMU's TCG has hit
            // `iotlb_to_section` assertions there (one, whatever RVMM_TESTHOST_CPUS says).
            TestHost::new("hotplug_cycles")
                .cpus(1)
                .nvme_drives(1)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&cycles_scenario())
        },
        Duration::from_secs(720),
    ))
}

fn misc_run() -> &'static TestHostOutput {
    note_test_host_stalls(MISC_RUN.get(
        || {
            TestHost::new("hotplug_misc")
                .nvme_drives(1)
                .igb(true)
                .needs_rvmm(true)
                .scenario(&misc_scenario())
        },
        Duration::from_secs(600),
    ))
}

fn acpi_run() -> &'static TestHostOutput {
    note_test_host_stalls(ACPI_RUN.get(
        || {
            TestHost::new("hotplug_acpi")
                .nvme_drives(1)
                .igb(true)
                .needs_rvmm(true)
                .scenario(&acpi_scenario())
        },
        Duration::from_secs(900),
    ))
}

// --- reading the console --------------------------------------------------------------------

/// One `rvmm ctl` call of the scenario.
struct Ctl<'a> {
    rc: u64,
    ms: u64,
    /// The answer (JSON on one line), empty when there was none.
    out: &'a str,
    /// What ctl printed on stderr, one line each.
    err: String,
}

/// The value of the first marker `key` of `run` whose first word is `label`, without that word.
fn labelled<'a>(run: &Section<'a>, key: &str, label: &str) -> Vec<&'a str> {
    run.host_all(key)
        .into_iter()
        .filter_map(|marker| marker.value.split_once(' ').or(Some((marker.value, ""))))
        .filter(|(first, _)| *first == label)
        .map(|(_, rest)| rest)
        .collect()
}

/// The `rvmm ctl` call `label` of `run`; fails loudly if it never ran.
#[track_caller]
fn ctl<'a>(run: &Section<'a>, label: &str) -> Ctl<'a> {
    let Some(status) = labelled(run, "ctl", label).into_iter().next() else {
        run.fail(&format!(
            "the scenario never made the rvmm ctl call '{label}'"
        ));
    };
    let field = |name: &str| {
        status
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
    };
    let (Some(rc), Some(ms)) = (field("rc"), field("ms")) else {
        run.fail(&format!("'HOST ctl {label} {status}' lacks rc= or ms="));
    };
    Ctl {
        rc,
        ms,
        out: labelled(run, "ctl_out", label)
            .into_iter()
            .next()
            .unwrap_or(""),
        err: labelled(run, "ctl_err", label).join("\n"),
    }
}

/// Asserts that ctl call `label` succeeded and returns its answer.
#[track_caller]
fn ctl_ok<'a>(run: &Section<'a>, label: &str) -> &'a str {
    let call = ctl(run, label);
    run.check(
        call.rc == 0,
        &format!("rvmm ctl '{label}' failed (exit {}): {}", call.rc, call.err),
    );
    call.out
}

/// The text after `"key":` in `json` up to the end of its value (a string without escapes or a
/// number); the first occurrence.
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let start = json.find(&pattern)? + pattern.len();
    let rest = json.get(start..)?.trim_start();
    if let Some(string) = rest.strip_prefix('"') {
        string.split('"').next()
    } else {
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest.get(..end)
    }
}

fn json_u64(json: &str, key: &str) -> Option<u64> {
    json_value(json, key)?.parse().ok()
}

/// The `resources` and `root_ports` of an `info` answer: what must not change.
fn footprint(info: &str) -> [(&'static str, Option<u64>); 6] {
    [
        ("open_fds", json_u64(info, "open_fds")),
        ("memory_slots", json_u64(info, "memory_slots")),
        ("msi_routes", json_u64(info, "msi_routes")),
        ("msi_gsis", json_u64(info, "msi_gsis")),
        ("host_vectors", json_u64(info, "host_vectors")),
        ("root_ports used", json_u64(info, "used")),
    ]
}

/// Asserts that the answer of ctl call `label` (an `info` after `what`) lists no device and
/// that no memory slot, MSI route or GSI, and no root port is in use any more.
#[track_caller]
fn assert_nothing_held(run: &Section<'_>, label: &str, what: &str) {
    let info = ctl_ok(run, label);
    run.check(
        info.contains("\"devices\": []"),
        &format!("info still lists a device after {what}: {info}"),
    );
    for (name, value) in footprint(info).into_iter().skip(1) {
        run.check(
            value == Some(0),
            &format!("after {what} info shows {name} {value:?}, not 0: {info}"),
        );
    }
}

/// The markers of `run` after `HOST step <from>` up to `HOST step <to>` (or the end).
#[track_caller]
fn between<'a>(run: &Section<'a>, from: &str, to: &str) -> Vec<Marker<'a>> {
    let markers: Vec<Marker<'a>> = run.markers().collect();
    let step = |name: &str| {
        markers.iter().position(|marker| {
            marker.source == Source::Host && marker.key == "step" && marker.value == name
        })
    };
    let Some(begin) = step(from) else {
        run.fail(&format!("the scenario never reached step '{from}'"));
    };
    let rest = markers.get(begin + 1..).unwrap_or_default();
    let end = step(to).map_or(rest.len(), |end| end.saturating_sub(begin + 1));
    rest.get(..end).unwrap_or(rest).to_vec()
}

/// The first guest marker `key` in `markers` whose value starts with `prefix`.
fn guest_marker<'a>(markers: &[Marker<'a>], key: &str, prefix: &str) -> Option<Marker<'a>> {
    markers
        .iter()
        .find(|marker| {
            marker.source == Source::Guest && marker.key == key && marker.value.starts_with(prefix)
        })
        .copied()
}

/// Asserts that the guest printed `key` (value starting with `prefix`) among `markers`.
#[track_caller]
fn expect_guest<'a>(
    run: &Section<'a>,
    markers: &[Marker<'a>],
    key: &str,
    prefix: &str,
    what: &str,
) -> Marker<'a> {
    match guest_marker(markers, key, prefix) {
        Some(marker) => marker,
        None => run.fail(&format!("{what}: no 'GUEST {key} {prefix}...' marker")),
    }
}

/// The JSON of every `HOST event` of `run` of kind `event` for device `id`.
fn events<'a>(run: &Section<'a>, event: &str, id: &str) -> Vec<&'a str> {
    run.host_all("event")
        .into_iter()
        .map(|marker| marker.value)
        .filter(|json| {
            json_value(json, "event") == Some(event) && json_value(json, "id") == Some(id)
        })
        .collect()
}

/// Asserts a `device-removed` event for `id` with `reason` (`count` of them).
#[track_caller]
fn assert_removed_event(run: &Section<'_>, id: &str, reason: &str, count: usize) {
    let removed = events(run, "device-removed", id);
    let matching = removed
        .iter()
        .filter(|json| json_value(json, "reason") == Some(reason))
        .count();
    run.check(
        matching == count,
        &format!(
            "{matching} device-removed events for {id} with reason {reason}, not {count}; all: \
             {removed:?}"
        ),
    );
}

/// Asserts that the VM was shut down through the API and rvmm exited with 0.
#[track_caller]
fn assert_clean_shutdown(run: &Section<'_>) {
    ctl_ok(run, "shutdown");
    let exit = run.rvmm_exit();
    run.check(
        exit == 0,
        &format!("rvmm exited with {exit} after the API shut the VM down, not 0"),
    );
}

/// Asserts that the guest's monitor stopped when told, the guest powered off and rvmm exited
/// with 0.
#[track_caller]
fn assert_clean_stop(run: &Section<'_>) {
    run.check(
        run.guest_all("monitor")
            .iter()
            .any(|marker| marker.value == "stop"),
        "the guest's monitor never took the stop command",
    );
    let other: Vec<&str> = run
        .guest_all("console_input")
        .iter()
        .map(|marker| marker.value)
        .collect();
    run.check(
        other.is_empty(),
        &format!("the guest read console lines nobody typed (a line cut in parts?): {other:?}"),
    );
    run.expect_guest("done");
    let exit = run.rvmm_exit();
    run.check(
        exit == 0,
        &format!("rvmm exited with {exit} after the guest powered off, not 0"),
    );
}

/// Asserts that the guest's kernel logged no oops, BUG or warning up to the end of the monitor
/// (which reports its kernel log then; the guest init's own report at boot does not count).
#[track_caller]
fn assert_no_kernel_problems(run: &Section<'_>) {
    let markers: Vec<Marker<'_>> = run.markers().collect();
    let Some(end) = markers.iter().position(|marker| {
        marker.source == Source::Guest
            && marker.key == "monitor"
            && marker.value.starts_with("done")
    }) else {
        run.fail("the guest's monitor never ended, so it never reported its kernel log");
    };
    let after = markers.get(end..).unwrap_or_default();
    let problems = after
        .iter()
        .find(|marker| marker.source == Source::Guest && marker.key == "kernel_problems")
        .and_then(Marker::as_u64);
    let lines: Vec<&str> = after
        .iter()
        .filter(|marker| marker.source == Source::Guest && marker.key == "kernel_problem")
        .map(|marker| marker.value)
        .collect();
    run.check(
        problems == Some(0),
        &format!("the guest kernel logged {problems:?} oopses/warnings: {lines:?}"),
    );
}

/// The test host's BDF of its NVMe drive (`HOST nvme_device`).
fn host_nvme(output: &TestHostOutput) -> &str {
    output.all().expect_host("nvme_device").value
}

// The tests, one module per test host run (files under hotplug/: this file is a crate root).
#[path = "hotplug/acpi.rs"]
mod acpi;
#[path = "hotplug/cycles.rs"]
mod cycles;
#[path = "hotplug/misc.rs"]
mod misc;
#[path = "hotplug/nvme.rs"]
mod nvme;
#[path = "hotplug/observe.rs"]
mod observe;
