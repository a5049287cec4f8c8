//! The `hotplug_acpi` run: the NVMe drive through ACPI hotplug (`--hotplug acpi`), served by the
//! guest's acpiphp: hot-add, graceful removal (Eject Request, `_EJ0`), re-add, surprise removal
//! (Bus Check), re-add and a host-initiated removal in VM `acpi`; a cold-plugged drive removed
//! gracefully and a hot-add after it in VM `acpi_cold`.

use super::*;

fn acpi() -> Section<'static> {
    acpi_run().section("acpi")
}

fn acpi_cold() -> Section<'static> {
    acpi_run().section("acpi_cold")
}

/// The guest's `acpiphp_log` lines (its kernel log lines of acpiphp) of `run`.
fn acpiphp_lines<'a>(run: &Section<'a>) -> Vec<&'a str> {
    run.guest_all("acpiphp_log")
        .iter()
        .map(|marker| marker.value)
        .collect()
}

#[test]
fn info_says_the_vm_uses_acpi_hotplug() {
    let run = acpi();
    let info = ctl_ok(&run, "info_boot");
    run.check(
        json_value(info, "hotplug") == Some("acpi"),
        &format!("info does not say hotplug acpi: {info}"),
    );
}

#[test]
fn acpiphp_not_pciehp_serves_the_slots() {
    let run = acpi();
    assert_clean_stop(&run);
    let acpiphp = acpiphp_lines(&run);
    run.check(
        acpiphp
            .iter()
            .any(|line| line.contains("Slot [1] registered")),
        &format!("the guest's acpiphp registered no slot 1: {acpiphp:?}"),
    );
    let pciehp: Vec<&str> = run
        .guest_all("hotplug_log")
        .iter()
        .map(|marker| marker.value)
        .filter(|line| line.contains("pciehp"))
        .collect();
    run.check(
        pciehp.is_empty(),
        &format!("pciehp handled slots of an ACPI hotplug VM: {pciehp:?}"),
    );
}

#[test]
fn hot_add_answers_once_the_guest_has_the_drive_and_it_reads_back_its_pattern() {
    let run = acpi();
    let answer = ctl_ok(&run, "add");
    for (key, want) in [("id", "disk0"), ("bdf", GUEST_BDF), ("state", "present")] {
        run.check(
            json_value(answer, key) == Some(want),
            &format!(
                "add-device answered {key} {:?}, not {want}: {answer}",
                json_value(answer, key)
            ),
        );
    }
    let markers = between(&run, "add", "graceful");
    let pattern = expect_guest(
        &run,
        &markers,
        "nvme_pattern",
        "nvme",
        "the guest never wrote its pattern to the drive added through ACPI",
    );
    run.check(
        pattern.word(1) == Some("ok"),
        &format!(
            "the guest read back something else than it wrote: {}",
            pattern.value
        ),
    );
}

#[test]
fn graceful_removal_is_ejected_by_the_guest() {
    let run = acpi();
    let answer = ctl_ok(&run, "remove");
    run.check(
        json_value(answer, "reason") == Some("guest-ejected"),
        &format!("the graceful removal was not the guest's eject: {answer}"),
    );
    let markers = between(&run, "graceful", "readd");
    expect_guest(
        &run,
        &markers,
        "block-removed",
        "nvme",
        "the guest never dropped the block device on the graceful removal",
    );
    assert_nothing_held(&run, "info_removed", "the graceful removal");
}

#[test]
fn re_added_drive_reads_back_its_pattern() {
    let run = acpi();
    ctl_ok(&run, "readd");
    let markers = between(&run, "readd", "surprise");
    let pattern = expect_guest(
        &run,
        &markers,
        "nvme_pattern",
        "nvme",
        "no pattern after the re-add",
    );
    run.check(
        pattern.word(1) == Some("ok"),
        &format!(
            "the guest read back something else than it wrote: {}",
            pattern.value
        ),
    );
}

#[test]
fn surprise_removal_makes_the_guest_drop_the_drive() {
    let run = acpi();
    let answer = ctl_ok(&run, "surprise");
    run.check(
        json_value(answer, "reason") == Some("surprise"),
        &format!("the surprise removal answered {answer}"),
    );
    let markers = between(&run, "surprise", "readd2");
    expect_guest(
        &run,
        &markers,
        "pci-removed",
        GUEST_BDF,
        "the guest kept the PCI device after the surprise removal (no Bus Check?)",
    );
    assert_nothing_held(&run, "info_surprise", "the surprise removal");
    ctl_ok(&run, "readd2");
    let markers = between(&run, "readd2", "unbind");
    let pattern = expect_guest(
        &run,
        &markers,
        "nvme_pattern",
        "nvme",
        "no pattern after the re-add",
    );
    run.check(
        pattern.word(1) == Some("ok"),
        &format!(
            "the guest read back something else than it wrote: {}",
            pattern.value
        ),
    );
}

#[test]
fn host_initiated_removal_takes_the_drive_from_the_guest() {
    let run = acpi();
    let markers = between(&run, "unbind", "end");
    expect_guest(
        &run,
        &markers,
        "pci-removed",
        GUEST_BDF,
        "the guest kept the drive the host took back",
    );
    assert_removed_event(&run, "disk0", "host-request", 1);
    assert_nothing_held(&run, "info_unbind", "the host took the drive back");
}

#[test]
fn guest_kernel_has_no_problems_with_acpi_hotplug() {
    assert_no_kernel_problems(&acpi());
}

#[test]
fn cold_plugged_drive_is_removed_gracefully_and_another_added() {
    let run = acpi_cold();
    let answer = ctl_ok(&run, "remove");
    run.check(
        json_value(answer, "reason") == Some("guest-ejected"),
        &format!("the cold-plugged drive's removal was not the guest's eject: {answer}"),
    );
    assert_nothing_held(&run, "info_removed", "the cold-plugged drive's removal");
    ctl_ok(&run, "readd");
    let markers = between(&run, "readd", "end");
    expect_guest(
        &run,
        &markers,
        "block-added",
        "nvme",
        "the drive added after the cold-plugged one left never reached the guest",
    );
    assert_clean_stop(&run);
}

#[test]
fn refusals_hold_in_acpi_mode() {
    let run = acpi_cold();
    for (label, parts) in [
        ("unknown_id", ["nosuchdisk", "(HTTP 404)"]),
        ("in_use", ["already attached", "(HTTP 409)"]),
    ] {
        let call = ctl(&run, label);
        run.check(
            call.rc == 1,
            &format!(
                "rvmm ctl '{label}' exited with {}, not 1: {}",
                call.rc, call.err
            ),
        );
        for part in parts {
            run.check(
                call.err.contains(part),
                &format!("rvmm ctl '{label}' did not say '{part}': {}", call.err),
            );
        }
    }
}

#[test]
fn vf_is_hot_added_and_ejected_gracefully() {
    let run = acpi_cold();
    ctl_ok(&run, "vf_add");
    let answer = ctl_ok(&run, "vf_remove");
    run.check(
        json_value(answer, "reason") == Some("guest-ejected"),
        &format!("the VF's graceful removal was not the guest's eject: {answer}"),
    );
    let markers = between(&run, "vf", "cycles");
    expect_guest(
        &run,
        &markers,
        "net-added",
        "",
        "the VF never became a network interface",
    );
    expect_guest(
        &run,
        &markers,
        "net-removed",
        "",
        "the guest kept the VF's interface",
    );
}

#[test]
fn add_remove_cycles_all_succeed_and_leave_the_same_resources() {
    let run = acpi_cold();
    let marker = run.expect_host("acpi_cycles");
    let field = |name: &str| marker.field(name).and_then(|v| v.parse::<u64>().ok());
    let failures: Vec<&str> = run.host_all("cycle_fail").iter().map(|m| m.value).collect();
    run.check(
        field("done") == Some(ACPI_CYCLES) && field("failed") == Some(0),
        &format!("ACPI cycles: {} ({failures:?})", marker.value),
    );
    run.check(
        field("guest_ejected") == Some(ACPI_CYCLES / 2),
        &format!(
            "the graceful removals among the cycles were not all ejected: {}",
            marker.value
        ),
    );
    let before = footprint(ctl_ok(&run, "info_before"));
    let after = footprint(ctl_ok(&run, "info_after"));
    run.check(
        before == after,
        &format!("resources before the cycles {before:?}, after {after:?}"),
    );
}
