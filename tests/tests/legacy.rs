//! Legacy PCI features through passthrough, proven inside the test host with an emulated e1000
//! (`8086:100e`: no MSI, an I/O BAR) and a peer e1000 the test host drives, joined by a QEMU
//! hub (`resources/testhost.sh --e1000`): the guest's e1000 driver runs on its INTx line (an
//! IOAPIC input of the root port's `_PRT`, re-armed through KVM's resample irqfd), reads the
//! NIC through its I/O BAR in the root port's I/O window, and pings the test host, with the NIC
//! cold-plugged and hot-added (and hot-removed). And guest-initiated resets: the guest resets
//! a passed-through NVMe drive through sysfs while its driver runs (an FLR, which rvmm
//! advertises and carries out with `VFIO_DEVICE_RESET`), and I/O works after it; then its
//! driver is rebound twice, first with MSI forbidden (it runs on INTx), then with MSI allowed
//! again (MSI-X): the interrupt mode switches at run time, with I/O on each.
//!
//! One test host run, three rvmm runs: `cold` (`--device` at boot), `hot` (`add-device` and
//! `remove-device` through the API while the guest waits for it) and `reset` (the NVMe).

use std::time::Duration;

use rvmm_tests::{assert_clean_poweroff, token, GuestRun, Marker, Section, SharedRun, TestHost};

/// Where the guest finds the NIC: behind the first root port (secondary bus 1).
const GUEST_BDF: &str = "0000:01:00.0";
/// The first root port's I/O window (rvmm's layout: 4 KiB per port from 0x1000).
const PORT0_IO_WINDOW: std::ops::Range<u64> = 0x1000..0x2000;
/// The test host's address on its e1000, and the guests' addresses.
const HOST_IP: &str = "10.0.7.1";
const COLD_IP: &str = "rvmm.ip=10.0.7.2/24";
const HOT_IP: &str = "rvmm.ip=10.0.7.3/24";
/// How the message of a non-zero exit status goes on (`assert_clean_poweroff`).
const POWERED_OFF: &str = "after the guest powered off";

static RUN: SharedRun = SharedRun::new();

fn guest(name: &str, params: &[&str]) -> GuestRun {
    GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .root_ports(4)
        .guest_scenario("e1000", params)
        .timeout_secs(300)
}

fn scenario() -> String {
    let ping = format!("rvmm.ping={HOST_IP}");
    let cold = guest("cold", &["rvmm.wait=30", COLD_IP, &ping])
        .arg("--device")
        .shell_arg("\"$E1000\"");
    let hot = guest(
        "hot",
        &["rvmm.wait=150", HOT_IP, &ping, "rvmm.await_removal=1"],
    )
    .arg("--api-socket")
    .arg("/tmp/rvmm-hot.sock")
    // The API answers go to a file, printed after the run: on the shared console they would
    // cut the guest's lines.
    .while_running(
        "GUEST scenario e1000 begin",
        "rvmm_ctl hot add add-device \"$E1000,id=nic0\" >>/tmp/hot-ctl.marks",
    )
    .while_running(
        "GUEST e1000_await_removal",
        "rvmm_ctl hot remove remove-device nic0 >>/tmp/hot-ctl.marks",
    );
    let mut s = String::from(
        "E1000=$(pci_find 8086:100e | sed -n 1p)\n\
         PEER=$(pci_find 8086:100e | sed -n 2p)\n\
         hmark e1000_devices \"$E1000\" \"$PEER\"\n\
         hmark e1000_host_bars \"$(head -n 2 \"/sys/bus/pci/devices/$E1000/resource\" | tr '\\n' ' ')\"\n\
         vfio_bind \"$E1000\"\n",
    );
    s += &format!("link_up \"$(netdev_of \"$PEER\")\" {HOST_IP}/24\n");
    s += &cold.script();
    s += &hot.script();
    s += "hmark begin hot_ctl\ncat /tmp/hot-ctl.marks\nhmark end hot_ctl\n";
    let pattern = format!("rvmm.pattern={}", token());
    let reset = GuestRun::new("reset")
        .cpus(2)
        .memory("size=512M")
        .guest_scenario("nvme_reset", &[&pattern])
        .arg("--device")
        .shell_arg("\"$NVME\"")
        .timeout_secs(300);
    s += "NVME=$(pci_find 1b36:0010 | sed -n 1p)\nvfio_bind \"$NVME\"\n";
    s += &reset.script();
    s
}

fn run(name: &str) -> Section<'static> {
    RUN.get(
        || {
            TestHost::new("legacy")
                .nvme_drives(1)
                .igb(false)
                .e1000_pair()
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(900),
    )
    .section(name)
}

fn number(run: &Section<'_>, marker: &Marker<'_>, field: &str) -> u64 {
    let value = marker.field(field).and_then(|v| {
        v.strip_prefix("0x")
            .map_or_else(|| v.parse().ok(), |hex| u64::from_str_radix(hex, 16).ok())
    });
    match value {
        Some(value) => value,
        None => run.fail(&format!(
            "'{field}=' of '{}' is missing or not a number",
            marker.value
        )),
    }
}

fn assert_bound(run: &Section<'_>) {
    let bound = run.expect_guest("e1000");
    run.check(
        bound.word(0) == Some(GUEST_BDF) && bound.word(1) == Some("bound"),
        &format!(
            "the guest's e1000 driver did not bind {GUEST_BDF}: 'GUEST e1000 {}'",
            bound.value
        ),
    );
}

/// The NIC runs on INTx (no MSI vectors) and its line took interrupts; the line is an IOAPIC
/// input, level-triggered (fasteoi).
fn assert_intx(run: &Section<'_>) {
    let mode = run
        .guest_all("irq_mode")
        .into_iter()
        .rev()
        .find(|m| m.word(0) == Some(GUEST_BDF))
        .unwrap_or_else(|| run.fail("the guest reported no interrupt mode for the NIC"));
    run.check(
        mode.field("driver") == Some("e1000") && mode.field("mode") == Some("intx"),
        &format!("the NIC does not run on INTx with e1000: {}", mode.value),
    );
    let fired = number(run, &mode, "fired");
    run.check(
        fired > 0,
        &format!(
            "no interrupt reached the guest on the NIC's INTx line: {}",
            mode.value
        ),
    );
    let line = run.expect_guest("irq_line");
    run.check(
        line.value.contains("IO-APIC") && line.value.contains("fasteoi"),
        &format!(
            "the NIC's line is not a level-triggered IOAPIC input: '{}'",
            line.value
        ),
    );
}

/// The guest's I/O BAR lies in the first root port's I/O window and a read through it reaches
/// the device: QEMU's e1000 answers 0 (it implements no I/O registers), where a port nobody
/// decodes (the one just past the BAR) reads all ones.
fn assert_io_bar(run: &Section<'_>) {
    let io = run.expect_guest("e1000_io");
    let port = number(run, &io, "port");
    run.check(
        PORT0_IO_WINDOW.contains(&port),
        &format!(
            "the NIC's I/O BAR at {port:#x} is not in the port's I/O window {PORT0_IO_WINDOW:#x?}"
        ),
    );
    run.check(
        number(run, &io, "io") == 0,
        &format!(
            "a read through the I/O BAR did not reach the NIC: {}",
            io.value
        ),
    );
    run.check(
        number(run, &io, "outside") == 0xffff_ffff,
        &format!("the port past the I/O BAR is decoded: {}", io.value),
    );
}

fn assert_ping(run: &Section<'_>) {
    let ping = run.expect_guest("ping");
    let received = number(run, &ping, "received");
    run.check(
        received > 0,
        &format!(
            "the guest got no answer from the test host's e1000: {}",
            ping.value
        ),
    );
}

// --- cold-plugged ---------------------------------------------------------------------------

#[test]
fn cold_plugged_e1000_is_driven_by_the_guest() {
    assert_bound(&run("cold"));
}

#[test]
fn cold_plugged_e1000_takes_its_interrupts_on_intx() {
    assert_intx(&run("cold"));
}

#[test]
fn cold_plugged_e1000_io_bar_reaches_the_device() {
    assert_io_bar(&run("cold"));
}

#[test]
fn cold_plugged_e1000_exchanges_traffic_with_the_test_host() {
    assert_ping(&run("cold"));
}

#[test]
fn cold_plugged_e1000_guest_powers_off_and_rvmm_exits_zero() {
    let run = run("cold");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["e1000"], POWERED_OFF);
}

// --- hot-added and hot-removed --------------------------------------------------------------

#[test]
fn hot_added_e1000_is_driven_by_the_guest() {
    let ctl = run("hot_ctl");
    let add = ctl
        .host_all("ctl")
        .into_iter()
        .find(|m| m.word(0) == Some("add"))
        .unwrap_or_else(|| ctl.fail("the test host never asked for the hot-add"));
    ctl.check(
        add.field("rc") == Some("0"),
        &format!("add-device failed: {}", add.value),
    );
    assert_bound(&run("hot"));
}

#[test]
fn hot_added_e1000_takes_its_interrupts_on_intx() {
    assert_intx(&run("hot"));
}

#[test]
fn hot_added_e1000_io_bar_reaches_the_device() {
    assert_io_bar(&run("hot"));
}

#[test]
fn hot_added_e1000_exchanges_traffic_with_the_test_host() {
    assert_ping(&run("hot"));
}

#[test]
fn hot_added_e1000_is_removed_from_the_guest() {
    let ctl = run("hot_ctl");
    let remove = ctl
        .host_all("ctl")
        .into_iter()
        .find(|m| m.word(0) == Some("remove"))
        .unwrap_or_else(|| ctl.fail("the test host never asked for the removal"));
    ctl.check(
        remove.field("rc") == Some("0"),
        &format!("remove-device failed: {}", remove.value),
    );
    let run = run("hot");
    let removed = run.expect_guest("e1000_removed");
    run.check(
        removed.word(1) == Some("yes"),
        &format!(
            "the NIC is still in the guest after remove-device: '{}'",
            removed.value
        ),
    );
}

// --- a guest reset of a passed-through NVMe drive --------------------------------------------

#[test]
fn guest_resets_the_nvme_through_sysfs_with_an_flr() {
    let run = run("reset");
    let reset = run.expect_guest("nvme_reset");
    run.check(
        reset.field("rc") == Some("0"),
        &format!("the guest's reset of the NVMe failed: {}", reset.value),
    );
    run.check(
        reset
            .field("method")
            .is_some_and(|m| m.split(',').next() == Some("flr")),
        &format!(
            "the guest does not reset the NVMe with an FLR first (rvmm advertises it): {}",
            reset.value
        ),
    );
}

#[test]
fn nvme_io_works_after_the_guest_reset_it() {
    let run = run("reset");
    run.expect_guest("nvme_reset");
    // The first two: before and after the reset (the interrupt switches follow).
    let patterns = run.guest_all("nvme_pattern");
    run.check(
        patterns.len() >= 2 && patterns.iter().take(2).all(|p| p.word(1) == Some("ok")),
        &format!(
            "the pattern before and after the reset were not both read back: {:?}",
            patterns.iter().map(|p| p.value).collect::<Vec<_>>()
        ),
    );
}

#[test]
fn nvme_driver_switches_from_msix_to_intx_and_back_at_run_time_with_io_on_each() {
    let run = run("reset");
    let switches = run.guest_all("irq_switch");
    let values: Vec<&str> = switches.iter().map(|m| m.value).collect();
    run.check(
        switches.len() == 2,
        &format!("the guest did not switch the drive's interrupts twice: {values:?}"),
    );
    let fired = |m: &Marker<'_>| m.field("fired").and_then(|f| f.parse::<u64>().ok());
    let intx = &switches[0];
    run.check(
        intx.field("msi_bus") == Some("0")
            && intx.field("mode") == Some("intx")
            && fired(intx).is_some_and(|n| n > 0)
            && intx.field("io") == Some("ok"),
        &format!(
            "without MSI the driver did not run its I/O on the INTx line: {}",
            intx.value
        ),
    );
    let msix = &switches[1];
    run.check(
        msix.field("msi_bus") == Some("1")
            && msix.field("mode") == Some("msix")
            && fired(msix).is_some_and(|n| n > 0)
            && msix.field("io") == Some("ok"),
        &format!(
            "back on MSI-X the driver did not run its I/O: {}",
            msix.value
        ),
    );
}

#[test]
fn nvme_reset_guest_powers_off_and_rvmm_exits_zero() {
    let run = run("reset");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["nvme_reset"], POWERED_OFF);
}
