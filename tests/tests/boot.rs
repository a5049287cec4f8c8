//! Booting the Debian guest under rvmm inside the test host: bzImage and vmlinux (PVH) entry,
//! CPUs, memory (locked, or on hugepages), PCIe root ports served by pciehp, clean ACPI, clean
//! poweroff. One test host run boots the guest three times; each test asserts one behaviour on
//! the section of the rvmm run it is about.

use std::time::Duration;

use rvmm_tests::{GuestKernel, GuestRun, Section, SharedRun, TestHost, TestHostOutput};

const GUEST_CPUS: u64 = 2;
const GUEST_RAM_MIB: u64 = 512;
const ROOT_PORTS: u64 = 4;
/// 2 MiB hugepages in the test host's pool for the hugepage run (guest RAM plus spare).
const HUGEPAGE_POOL: u64 = GUEST_RAM_MIB / 2 + 44;

static RUN: SharedRun = SharedRun::new();

fn guest(name: &str, kernel: GuestKernel, memory: &str) -> GuestRun {
    GuestRun::new(name)
        .kernel(kernel)
        .cpus(2)
        .memory(memory)
        .root_ports(4)
        .timeout_secs(150)
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            let memory = format!("size={GUEST_RAM_MIB}M");
            let hugepages = format!("size={GUEST_RAM_MIB}M,hugepages=on");
            // The guest holds still for a few seconds so the test host can read rvmm's
            // /proc/<pid>/status and the hugepage pool while the guest runs.
            let bzimage = guest("bzimage", GuestKernel::BzImage, &memory)
                .guest_scenario("hold", &["rvmm.hold=5"])
                .while_running("GUEST hold ", "rvmm_report_process bzimage");
            let vmlinux = guest("vmlinux", GuestKernel::Vmlinux, &memory);
            let hugepage = guest("hugepages", GuestKernel::BzImage, &hugepages)
                .guest_scenario("hold", &["rvmm.hold=5"])
                .while_running(
                    "GUEST hold ",
                    "hugepages_report\nrvmm_report_process hugepages",
                );
            let scenario = format!(
                "{}{}hugepages_set {HUGEPAGE_POOL}\n{}hugepages_set 0\n",
                bzimage.script(),
                vmlinux.script(),
                hugepage.script()
            );
            TestHost::new("boot")
                .nvme_drives(0)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario)
        },
        Duration::from_secs(600),
    )
}

fn section(name: &str) -> Section<'static> {
    run().section(name)
}

/// Asserts that the guest of `run` reached its init and powered off, and rvmm exited with 0.
fn assert_clean_boot_and_poweroff(run: &Section<'_>) {
    run.expect_guest("up");
    run.expect_guest("done");
    let exit = run.rvmm_exit();
    run.check(
        exit == 0,
        &format!(
            "rvmm exited with {exit} after the guest powered off, not 0 \
             (rvmm: 3 = guest reset, e.g. a guest panic with panic=-1; 4 = guest crash)"
        ),
    );
}

fn assert_guest_sees_two_cpus(run: &Section<'_>) {
    let cpus = run.expect_guest_u64("cpus");
    run.check(
        cpus == GUEST_CPUS,
        &format!("the guest sees {cpus} CPUs, not {GUEST_CPUS}"),
    );
}

fn assert_guest_sees_its_ram(run: &Section<'_>) {
    // The e820 map covers all of RAM but the legacy hole below 1 MiB; MemTotal is smaller by
    // what the kernel keeps for itself.
    let e820 = run.expect_guest_u64("e820_ram_kb");
    let ram_kib = GUEST_RAM_MIB * 1024;
    run.check(
        (ram_kib - 1024..=ram_kib).contains(&e820),
        &format!("the e820 map gives the guest {e820} KiB of RAM, not about {ram_kib} KiB"),
    );
    let total = run.expect_guest_u64("memtotal_kb");
    run.check(
        (ram_kib * 8 / 10..=ram_kib).contains(&total),
        &format!("the guest's MemTotal is {total} KiB, not 80-100% of {ram_kib} KiB"),
    );
}

fn assert_every_root_port_is_a_pciehp_slot(run: &Section<'_>) {
    let ports = run.guest_all("port");
    run.check(
        u64::try_from(ports.len()) == Ok(ROOT_PORTS),
        &format!(
            "the guest sees {} root ports, not {ROOT_PORTS}",
            ports.len()
        ),
    );
    for port in &ports {
        run.check(
            port.field("pciehp") == Some("bound"),
            &format!("pciehp does not serve root port {}", port.value),
        );
    }
    let slots = run.expect_guest_u64("slots");
    run.check(
        slots == ROOT_PORTS,
        &format!("the guest has {slots} hotplug slots, not {ROOT_PORTS}"),
    );
}

fn assert_no_acpi_errors(run: &Section<'_>) {
    let errors = run.expect_guest_u64("acpi_errors");
    run.check(
        errors == 0,
        &format!("the guest kernel logged {errors} ACPI errors"),
    );
}

#[test]
fn bzimage_guest_boots_and_powers_off_with_exit_status_zero() {
    assert_clean_boot_and_poweroff(&section("bzimage"));
}

#[test]
fn vmlinux_guest_boots_through_pvh_and_powers_off_with_exit_status_zero() {
    assert_clean_boot_and_poweroff(&section("vmlinux"));
}

#[test]
fn bzimage_guest_sees_two_cpus() {
    assert_guest_sees_two_cpus(&section("bzimage"));
}

#[test]
fn vmlinux_guest_sees_two_cpus() {
    assert_guest_sees_two_cpus(&section("vmlinux"));
}

#[test]
fn bzimage_guest_sees_512_mib() {
    assert_guest_sees_its_ram(&section("bzimage"));
}

#[test]
fn vmlinux_guest_sees_512_mib() {
    assert_guest_sees_its_ram(&section("vmlinux"));
}

#[test]
fn bzimage_guest_has_every_root_port_as_a_pciehp_slot() {
    assert_every_root_port_is_a_pciehp_slot(&section("bzimage"));
}

#[test]
fn vmlinux_guest_has_every_root_port_as_a_pciehp_slot() {
    assert_every_root_port_is_a_pciehp_slot(&section("vmlinux"));
}

#[test]
fn bzimage_guest_logs_no_acpi_errors() {
    assert_no_acpi_errors(&section("bzimage"));
}

#[test]
fn vmlinux_guest_logs_no_acpi_errors() {
    assert_no_acpi_errors(&section("vmlinux"));
}

#[test]
fn guest_kernel_logs_no_oops_or_warning() {
    let run = section("bzimage");

    let problems = run.expect_guest_u64("kernel_problems");

    run.check(
        problems == 0,
        &format!("the guest kernel logged {problems} oopses/warnings"),
    );
}

#[test]
fn guest_ram_is_locked_in_the_rvmm_process() {
    let run = section("bzimage");

    let locked = run.expect_host_u64("vmlck_kb");

    let ram_kib = GUEST_RAM_MIB * 1024;
    run.check(
        locked == ram_kib,
        &format!("rvmm has {locked} KiB locked (VmLck), not the guest's {ram_kib} KiB"),
    );
}

#[test]
fn hugepage_backed_guest_boots_and_powers_off() {
    assert_clean_boot_and_poweroff(&section("hugepages"));
}

#[test]
fn hugepage_backed_guest_ram_comes_from_the_pool() {
    let run = section("hugepages");

    let total = run.expect_host_u64("hugepages_total");
    let free = run.expect_host_u64("hugepages_free");

    let needed = GUEST_RAM_MIB / 2;
    run.check(
        total.saturating_sub(free) >= needed,
        &format!(
            "while the guest ran only {} of {total} hugepages were in use, not >= {needed}",
            total.saturating_sub(free)
        ),
    );
}

#[test]
fn hugepage_backed_guest_sees_512_mib() {
    assert_guest_sees_its_ram(&section("hugepages"));
}
