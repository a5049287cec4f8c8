//! VFIO passthrough at boot (`rvmm run --device ...`), proven from the guest's own view inside
//! the test host: an emulated NVMe drive the guest's nvme driver runs with MSI-X, whose data the
//! test host reads back through its own nvme driver after the VM is gone; two drives behind two
//! root ports; an igb virtual function; and the refusals (a device another rvmm owns, a device
//! bound to a host driver, a device that does not exist).
//!
//! Two test host runs: one with two NVMe drives for every NVMe case (five rvmm runs, in order:
//! one drive, the refusals, two drives, a device owned by a running VM), one with the igb NIC for
//! the virtual function. Each test asserts one behaviour on the section of the rvmm run it is
//! about.

use std::time::Duration;

use rvmm_tests::{
    assert_clean_poweroff, assert_refused, token, GuestRun, Marker, Section, SharedRun, TestHost,
    TestHostOutput,
};

/// Each NVMe drive of the test host (QEMU's syntax) and its sectors of 512 bytes.
const NVME_SIZE: &str = "64M";
const NVME_SECTORS: u64 = 64 * 1024 * 1024 / 512;
/// Where the guest finds the first and the second passthrough device: behind the root ports
/// whose secondary buses are 1 and 2.
const FIRST_GUEST_BDF: &str = "0000:01:00.0";
const SECOND_GUEST_BDF: &str = "0000:02:00.0";
/// A PCI address the test host does not have.
const ABSENT_BDF: &str = "0000:7e:1f.7";
/// The MAC address the test host has the PF assign to the virtual function it passes through.
const VF_MAC: &str = "52:54:00:00:0f:01";
/// The test host's CPU for the igb run: resources/testhost.sh's, with 36 physical address bits.
const TEST_HOST_CPU: &str = "EPYC-Milan,+svm,phys-bits=36";
/// `IFF_UP` in `/sys/class/net/<if>/flags`.
const IFF_UP: u64 = 0x1;
/// How the message of a non-zero exit status goes on (`assert_clean_poweroff`).
const POWERED_OFF: &str = "after the guest powered off";

/// Arguments of a valid guest run for the refusal cases, which add one `--device`.
const VALID: &str = r#"--kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" --cmdline "$(guest_cmdline basic)" --memory size=512M --serial stdio"#;

static NVME_RUN: SharedRun = SharedRun::new();
static IGB_RUN: SharedRun = SharedRun::new();

/// The `rvmm.pattern=` token of guest run `run`.
fn pattern_token(run: &str) -> String {
    format!("{}-{run}", token())
}

/// A guest with 2 CPUs and 512 MiB running guest scenario `scenario`.
fn guest(name: &str, scenario: &str, params: &[&str]) -> GuestRun {
    GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .guest_scenario(scenario, params)
        .timeout_secs(150)
}

fn nvme_scenario() -> String {
    let single_pattern = format!("rvmm.pattern={}", pattern_token("single"));
    let single = guest("single", "nvme", &[&single_pattern])
        .arg("--device")
        .shell_arg("\"path=/sys/bus/pci/devices/$NVME0,id=disk0\"");

    let two_pattern = format!("rvmm.pattern={}", pattern_token("two"));
    let two = guest("two", "nvme_all", &["rvmm.nvme_count=2", &two_pattern])
        .arg("--device")
        .shell_arg("\"path=/sys/bus/pci/devices/$NVME0,id=disk0\"")
        .arg("--device")
        .shell_arg("\"$NVME1,id=disk1\"");

    // The owner holds still while a second rvmm asks for its device, then uses the device.
    let owner_pattern = format!("rvmm.pattern={}", pattern_token("owner"));
    let owner = guest("owner", "hold_nvme", &["rvmm.hold=6", &owner_pattern])
        .arg("--device")
        .shell_arg("\"$NVME0\"")
        .while_running(
            "GUEST hold ",
            &format!("rvmm_capture second run {VALID} --device \"$NVME0\""),
        );

    let mut scenario = String::from(
        "RVMM_CAPTURE_TIMEOUT=30\n\
         NVME0=$(pci_find 1b36:0010 | sed -n 1p)\n\
         NVME1=$(pci_find 1b36:0010 | sed -n 2p)\n\
         hmark nvme_devices \"$NVME0\" \"$NVME1\"\n\
         vfio_bind \"$NVME0\"\n",
    );
    scenario += &single.script();
    // The drive back with the test host's nvme driver, which reads what the guest wrote.
    scenario += "hmark begin host_readback\n\
                 host_driver_bind \"$NVME0\"\n\
                 nvme_host_readback \"$NVME0\"\n\
                 hmark end host_readback\n";
    // Still bound to nvme: refused, with the commands that bind it to vfio-pci, which the test
    // host then runs as printed.
    scenario += &format!("rvmm_capture not_bound run {VALID} --device \"$NVME0\"\n");
    scenario += "hmark begin bind_commands\n\
                 grep -E '^ *(echo|modprobe) ' /tmp/rvmm.stderr >/tmp/bind.sh\n\
                 while IFS= read -r line; do hmark command \"$line\"; done </tmp/bind.sh\n\
                 sh /tmp/bind.sh\n\
                 hmark device_driver \"$NVME0\" \"$(driver_of \"/sys/bus/pci/devices/$NVME0\")\"\n\
                 hmark end bind_commands\n";
    scenario += &format!("rvmm_capture not_found run {VALID} --device {ABSENT_BDF}\n");
    scenario += "vfio_bind \"$NVME0\"\nvfio_bind \"$NVME1\"\n";
    scenario += &two.script();
    scenario += &owner.script();
    scenario
}

fn nvme_run() -> &'static TestHostOutput {
    NVME_RUN.get(
        || {
            TestHost::new("passthrough_nvme")
                .nvme_drives(2)
                .nvme_size(NVME_SIZE)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&nvme_scenario())
        },
        Duration::from_secs(600),
    )
}

fn igb_scenario() -> String {
    let vf = guest(
        "igbvf",
        "igbvf",
        &["rvmm.wait=10", "rvmm.ip=10.0.0.2/24", "rvmm.ping=10.0.0.1"],
    )
    .arg("--device")
    .shell_arg("\"$VF0\"");
    // The VFs exist before the PF comes up: igb tells them the PF reset is done when it opens.
    // The PF assigns VF 0 its MAC through netlink: iproute2's ip, which the test host has.
    let mut scenario = format!(
        "PF=$(pci_find 8086:10c9 | sed -n 1p)\n\
         sriov_enable \"$PF\" 2\n\
         vf_set_mac \"$PF\" 0 {VF_MAC}\n\
         link_up \"$(netdev_of \"$PF\")\" 10.0.0.1/24\n\
         vf_report \"$PF\"\n\
         VF0=$(vf_of \"$PF\" 0)\n\
         hmark vf_bar0 \"$VF0\" \"$(head -n1 \"/sys/bus/pci/devices/$VF0/resource\")\"\n\
         vfio_bind \"$VF0\"\n"
    );
    scenario += &vf.script();
    scenario
}

fn igb_run() -> &'static TestHostOutput {
    IGB_RUN.get(
        || {
            TestHost::new("passthrough_igbvf")
                .nvme_drives(0)
                .igb(true)
                .needs_rvmm(true)
                // QEMU 10.0 registers igb's VF BARs as 32-bit: programmed above 4 GiB (where
                // the firmware puts the 64-bit window with 40 physical address bits) they stay
                // unmapped and the VFs are dead. With 36 bits the window, and the VF BARs, land
                // below 4 GiB. The last -cpu wins.
                .qemu_arg("-cpu")
                .qemu_arg(TEST_HOST_CPU)
                .scenario(&igb_scenario())
        },
        Duration::from_secs(400),
    )
}

fn nvme(name: &str) -> Section<'static> {
    nvme_run().section(name)
}

/// The test host's BDF of NVMe drive `index` (0 or 1), from `HOST nvme_devices`.
fn host_nvme_bdf(index: usize) -> &'static str {
    let all = nvme_run().all();
    let devices = all.expect_host("nvme_devices");
    match devices.word(index) {
        Some(bdf) => bdf,
        None => all.fail(&format!(
            "the test host found no NVMe drive {index}: 'HOST nvme_devices {}'",
            devices.value
        )),
    }
}

/// The last `GUEST irq_mode <bdf> ...` marker of the run (the guest reports after its I/O).
fn irq_mode<'a>(run: &Section<'a>, bdf: &str) -> Marker<'a> {
    let marker = run
        .guest_all("irq_mode")
        .into_iter()
        .rev()
        .find(|marker| marker.word(0) == Some(bdf));
    match marker {
        Some(marker) => marker,
        None => run.fail(&format!(
            "the guest reported no interrupt mode for {bdf}: no driver bound it"
        )),
    }
}

fn number(run: &Section<'_>, marker: &Marker<'_>, field: &str) -> u64 {
    match marker.field(field).and_then(|value| value.parse().ok()) {
        Some(value) => value,
        None => run.fail(&format!(
            "'{field}=' of '{}' is missing or not a number",
            marker.value
        )),
    }
}

/// Asserts that `driver` runs the guest's device `bdf` with MSI-X; with `fired`, that its
/// vectors took interrupts.
fn assert_msix(run: &Section<'_>, bdf: &str, driver: &str, fired: bool) {
    let mode = irq_mode(run, bdf);
    run.check(
        mode.field("driver") == Some(driver),
        &format!("{driver} does not drive the guest's {bdf}: {}", mode.value),
    );
    run.check(
        mode.field("mode") == Some("msix"),
        &format!("{driver} does not use MSI-X for {bdf}: {}", mode.value),
    );
    let vectors = number(run, &mode, "vectors");
    run.check(
        vectors >= 2,
        &format!("{driver} has {vectors} MSI-X vectors for {bdf}, not at least 2"),
    );
    if fired {
        let count = number(run, &mode, "fired");
        run.check(
            count > 0,
            &format!("no interrupt reached the guest through the MSI-X vectors of {bdf}"),
        );
    }
}

// --- one NVMe drive -------------------------------------------------------------------------

#[test]
fn passthrough_nvme_is_driven_by_the_guest_nvme_driver_with_msix() {
    assert_msix(&nvme("single"), FIRST_GUEST_BDF, "nvme", true);
}

#[test]
fn passthrough_nvme_namespace_is_a_guest_block_device_of_the_drive_size() {
    let run = nvme("single");

    let block = run.expect_guest("nvme_block");

    let sectors = number(&run, &block, "sectors");
    run.check(
        block.word(0).is_some_and(|name| name.starts_with("nvme")),
        &format!("the guest's NVMe block device is '{}'", block.value),
    );
    run.check(
        sectors == NVME_SECTORS,
        &format!("the guest's namespace has {sectors} sectors, not {NVME_SECTORS}"),
    );
}

#[test]
fn passthrough_nvme_returns_the_pattern_the_guest_wrote() {
    let run = nvme("single");

    let pattern = run.expect_guest("nvme_pattern");

    run.check(
        pattern.word(1) == Some("ok"),
        &format!(
            "the guest read back something else than it wrote: {}",
            pattern.value
        ),
    );
}

#[test]
fn pattern_the_guest_wrote_is_on_the_drive_for_the_host_nvme_driver() {
    let guest = nvme("single");
    let host = nvme("host_readback");
    let bdf = host_nvme_bdf(0);
    let written = guest.expect_guest("nvme_pattern_md5");

    let bind = host.expect_host("host_bind");
    let readback = host.expect_host("nvme_readback");
    let head = host.expect_host("nvme_readback_head");

    host.check(
        bind.value == format!("{bdf} driver=nvme"),
        &format!(
            "the test host's nvme driver did not take the drive back: {}",
            bind.value
        ),
    );
    host.check(
        readback.field("md5") == written.word(1),
        &format!(
            "the test host reads {} at 1 MiB of {bdf}, not the guest's {}",
            readback.value, written.value
        ),
    );
    let expected = format!("{bdf} rvmm nvme pattern {}", pattern_token("single"));
    host.check(
        head.value == expected,
        &format!(
            "the first line at 1 MiB is '{}', not '{expected}'",
            head.value
        ),
    );
}

#[test]
fn passthrough_nvme_guest_powers_off_and_rvmm_exits_zero() {
    let run = nvme("single");

    assert_clean_poweroff(&run, run.rvmm_exit(), &["done"], POWERED_OFF);
}

// --- two NVMe drives ------------------------------------------------------------------------

#[test]
fn two_passthrough_nvme_controllers_sit_behind_their_own_root_ports() {
    let run = nvme("two");

    let controllers = run.guest_all("nvme_ctrl");

    let mut addresses: Vec<&str> = controllers
        .iter()
        .filter_map(|controller| controller.field("address"))
        .collect();
    addresses.sort_unstable();
    run.check(
        addresses == [FIRST_GUEST_BDF, SECOND_GUEST_BDF],
        &format!(
            "the guest's NVMe controllers are at {addresses:?}, not {FIRST_GUEST_BDF} and \
             {SECOND_GUEST_BDF}"
        ),
    );
    for controller in &controllers {
        run.check(
            controller.field("state") == Some("live"),
            &format!("an NVMe controller is not live: {}", controller.value),
        );
    }
    for bus in ["1", "2"] {
        run.check(
            run.guest_all("port")
                .iter()
                .any(|port| port.field("secondary_bus") == Some(bus)),
            &format!("no guest root port has secondary bus {bus}"),
        );
    }
}

#[test]
fn two_passthrough_nvme_namespaces_each_return_their_pattern() {
    let run = nvme("two");

    let patterns = run.guest_all("nvme_pattern");

    let ok: Vec<&str> = patterns
        .iter()
        .filter(|pattern| pattern.word(1) == Some("ok"))
        .filter_map(|pattern| pattern.word(0))
        .collect();
    run.check(
        ok.len() == 2 && ok.first() != ok.get(1),
        &format!(
            "the pattern came back on {ok:?}, not on two namespaces; all: {:?}",
            patterns.iter().map(|p| p.value).collect::<Vec<_>>()
        ),
    );
}

#[test]
fn two_passthrough_nvme_controllers_both_use_msix() {
    let run = nvme("two");

    for bdf in [FIRST_GUEST_BDF, SECOND_GUEST_BDF] {
        assert_msix(&run, bdf, "nvme", true);
    }
}

#[test]
fn two_passthrough_nvme_guest_powers_off_and_rvmm_exits_zero() {
    let run = nvme("two");

    assert_clean_poweroff(&run, run.rvmm_exit(), &["done"], POWERED_OFF);
}

// --- a device another rvmm owns -------------------------------------------------------------

#[test]
fn second_rvmm_asking_for_an_owned_device_is_refused_naming_the_owner() {
    let owner = nvme("owner");
    let second = nvme("second");
    let pid = owner.expect_host("rvmm_pid");
    let bdf = host_nvme_bdf(0);

    let stderr = assert_refused(&second);

    let holder = format!("already open in pid {} (rvmm)", pid.value);
    second.check(
        stderr.contains(&holder),
        &format!("rvmm's message does not say '{holder}'"),
    );
    second.check(
        stderr.contains(bdf) && stderr.contains("IOMMU group"),
        &format!("rvmm's message names neither host device {bdf} nor its IOMMU group"),
    );
}

#[test]
fn owner_vm_keeps_using_its_device_after_a_second_rvmm_was_refused() {
    let owner = nvme("owner");
    let lines = owner.lines();
    let position = |text: &str| lines.iter().position(|line| line.text.contains(text));

    let refused = position("HOST end second");
    let pattern = position("GUEST nvme_pattern ");

    owner.check(
        refused.is_some(),
        "the second rvmm never ran while the owner held its device",
    );
    owner.check(
        pattern > refused,
        "the owner's guest did not use its NVMe after the second rvmm was refused",
    );
    let result = owner.expect_guest("nvme_pattern");
    owner.check(
        result.word(1) == Some("ok"),
        &format!(
            "the owner's guest did not read back its pattern after the second rvmm was \
             refused: {}",
            result.value
        ),
    );
}

#[test]
fn owner_vm_exits_zero_after_a_second_rvmm_was_refused() {
    let owner = nvme("owner");

    // The second rvmm's status is in the owner's section too: the owner's is the last one.
    let exits = owner.host_all("rvmm_exit");
    let exit = exits
        .last()
        .and_then(|marker| marker.as_u64())
        .and_then(|code| i64::try_from(code).ok());

    match exit {
        Some(exit) => assert_clean_poweroff(&owner, exit, &["done"], POWERED_OFF),
        None => owner.fail("the owner's rvmm run has no exit status"),
    }
}

// --- a device bound to a host driver, a device that does not exist --------------------------

#[test]
fn device_bound_to_a_host_driver_is_refused_with_the_commands_that_bind_it() {
    let run = nvme("not_bound");
    let bdf = host_nvme_bdf(0);

    let stderr = assert_refused(&run);

    run.check(
        stderr.contains(&format!("{bdf} is bound to nvme, not vfio-pci")),
        &format!("rvmm's message does not say that {bdf} is bound to nvme, not vfio-pci"),
    );
    let has_line = |parts: &[&str]| {
        stderr
            .lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    };
    let override_path = format!("/sys/bus/pci/devices/{bdf}/driver_override");
    let unbind_path = format!("/sys/bus/pci/devices/{bdf}/driver/unbind");
    for parts in [
        &["vfio-pci", override_path.as_str()][..],
        &[bdf, unbind_path.as_str()][..],
        &[bdf, "/sys/bus/pci/drivers_probe"][..],
    ] {
        run.check(
            has_line(parts),
            &format!("rvmm's message has no command line with all of {parts:?}"),
        );
    }
}

#[test]
fn printed_bind_commands_bind_the_device_to_vfio_pci() {
    let run = nvme("bind_commands");
    let bdf = host_nvme_bdf(0);

    let commands = run.host_all("command");
    let driver = run.expect_host("device_driver");

    run.check(
        !commands.is_empty(),
        "rvmm's message held no command to run",
    );
    run.check(
        driver.value == format!("{bdf} vfio-pci"),
        &format!(
            "after running rvmm's commands the device is bound to '{}', not vfio-pci",
            driver.value
        ),
    );
}

#[test]
fn nonexistent_device_is_refused_as_not_found() {
    let run = nvme("not_found");

    let stderr = assert_refused(&run);

    run.check(
        stderr.contains(ABSENT_BDF) && stderr.contains("not found"),
        &format!("rvmm's message does not say that {ABSENT_BDF} is not found"),
    );
}

// --- an igb virtual function ----------------------------------------------------------------

#[test]
fn passthrough_igb_vf_is_driven_by_the_guest_igbvf_driver_with_msix() {
    let run = igb_run().section("igbvf");

    let bound = run.expect_guest("igbvf");

    run.check(
        bound.value == format!("{FIRST_GUEST_BDF} bound"),
        &format!(
            "igbvf did not bind the guest's {FIRST_GUEST_BDF}: {}",
            bound.value
        ),
    );
    assert_msix(&run, FIRST_GUEST_BDF, "igbvf", true);
}

#[test]
fn passthrough_igb_vf_interface_is_set_up_in_the_guest() {
    let run = igb_run().section("igbvf");

    let link = run.expect_guest("igbvf_link");

    let flags = link
        .field("flags")
        .and_then(|flags| u64::from_str_radix(flags.trim_start_matches("0x"), 16).ok());
    run.check(
        flags.is_some_and(|flags| flags & IFF_UP != 0),
        &format!("the guest's VF interface is not up: {}", link.value),
    );
}

#[test]
fn passthrough_igb_vf_guest_powers_off_and_rvmm_exits_zero() {
    let run = igb_run().section("igbvf");

    assert_clean_poweroff(&run, run.rvmm_exit(), &["done"], POWERED_OFF);
}

#[test]
fn passthrough_igb_vf_gets_the_mac_the_pf_assigned() {
    let run = igb_run().section("igbvf");
    let all = igb_run().all();
    let assigned = all.expect_host("vf_mac");
    let pf_view = all
        .host_all("vf_view")
        .into_iter()
        .find(|view| view.word(1) == Some("0"));

    let link = run.expect_guest("igbvf_link");

    run.check(
        assigned.value.ends_with(" ok"),
        &format!("the PF did not assign the VF a MAC: {}", assigned.value),
    );
    run.check(
        pf_view.is_some_and(|view| view.field("mac") == Some(VF_MAC)),
        &format!("the PF driver does not hold {VF_MAC} for VF 0: {pf_view:?}"),
    );
    run.check(
        !run.contains("Assigning random MAC address"),
        "igbvf in the guest assigned a random MAC instead of the PF's",
    );
    run.check(
        link.field("mac") == Some(VF_MAC),
        &format!(
            "the guest's VF has MAC {:?}, not the {VF_MAC} the PF assigned",
            link.field("mac")
        ),
    );
}

#[test]
fn passthrough_igb_vf_link_has_carrier_in_the_guest() {
    let run = igb_run().section("igbvf");

    let link = run.expect_guest("igbvf_link");

    run.check(
        link.field("carrier") == Some("1"),
        &format!("the guest's VF has no carrier: {}", link.value),
    );
}

#[test]
fn passthrough_igb_vf_guest_pings_the_pf() {
    let run = igb_run().section("igbvf");

    let ping = run.expect_guest("ping");

    run.check(
        ping.field("received")
            .is_some_and(|received| received != "0" && !received.is_empty()),
        &format!("the guest got no answer from the PF: {}", ping.value),
    );
}
