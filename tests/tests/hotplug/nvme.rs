//! The `hotplug_nvme` run: hot-add, graceful removal and re-add of an NVMe drive (`add`, read
//! back by the test host in `readback`), then removals the test host starts itself while the
//! guest reads the drive (`host_remove`).

use super::*;

/// The test host's NVMe drive (QEMU's default 64 MiB image) in sectors of 512 bytes.
const NVME_SECTORS: &str = "131072";
/// How long a re-add right after a removal may take: no waiting for the slot (~0.5 s measured).
const READD_LIMIT_MS: u64 = 10_000;

fn add() -> Section<'static> {
    nvme_run().section("add")
}

fn host_remove() -> Section<'static> {
    nvme_run().section("host_remove")
}

/// Whether the guest reported driver `driver` on device `bdf` among `markers`.
fn guest_bound(markers: &[Marker<'_>], bdf: &str, driver: &str) -> bool {
    markers.iter().any(|marker| {
        marker.source == Source::Guest
            && (marker.key == "pci-added" || marker.key == "pci-bound")
            && marker.word(0) == Some(bdf)
            && marker.field("driver") == Some(driver)
    })
}

// --- hot-add --------------------------------------------------------------------------------

#[test]
fn hot_added_nvme_namespace_appears_as_a_guest_block_device_of_the_drive_size() {
    let run = add();
    ctl_ok(&run, "add");

    let markers = between(&run, "add", "graceful");

    let block = expect_guest(
        &run,
        &markers,
        "block-added",
        "nvme",
        "the hot-added drive never became a block device in the guest",
    );
    run.check(
        block.field("sectors") == Some(NVME_SECTORS),
        &format!(
            "the guest's namespace is '{}', not {NVME_SECTORS} sectors",
            block.value
        ),
    );
}

#[test]
fn hot_added_nvme_is_bound_by_the_guest_nvme_driver_at_the_first_free_slot() {
    let run = add();

    let markers = between(&run, "add", "graceful");

    let added = expect_guest(
        &run,
        &markers,
        "pci-added",
        GUEST_BDF,
        "the guest never enumerated the hot-added drive",
    );
    run.check(
        added.word(1) == Some("1b36:0010"),
        &format!(
            "the guest's {GUEST_BDF} is not the NVMe drive: {}",
            added.value
        ),
    );
    run.check(
        guest_bound(&markers, GUEST_BDF, "nvme"),
        &format!("the guest's nvme driver never bound {GUEST_BDF}"),
    );
}

#[test]
fn hot_add_answers_with_the_device_present() {
    let run = add();
    let host = host_nvme(nvme_run());

    let answer = ctl_ok(&run, "add");

    for (key, want) in [
        ("id", "disk0"),
        ("bdf", GUEST_BDF),
        ("host_bdf", host),
        ("state", "present"),
    ] {
        run.check(
            json_value(answer, key) == Some(want),
            &format!(
                "add-device answered {key} {:?}, not {want}: {answer}",
                json_value(answer, key)
            ),
        );
    }
}

#[test]
fn guest_reads_back_the_pattern_it_wrote_to_the_hot_added_nvme() {
    let run = add();

    let markers = between(&run, "add", "graceful");

    let pattern = expect_guest(
        &run,
        &markers,
        "nvme_pattern",
        "nvme",
        "the guest never wrote its pattern to the hot-added drive",
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
fn pattern_the_guest_wrote_to_the_hot_added_nvme_is_on_the_drive() {
    let guest = add();
    let host = nvme_run().section("readback");
    let bdf = host_nvme(nvme_run());
    let written = guest.expect_guest("nvme_pattern_md5");

    let readback = host.expect_host("nvme_readback");
    let head = host.expect_host("nvme_readback_head");

    host.check(
        readback.field("md5") == written.word(1),
        &format!(
            "the test host reads {} at 1 MiB of {bdf}, not what the guest wrote ({})",
            readback.value, written.value
        ),
    );
    let expected = format!("{bdf} rvmm nvme pattern {}", token());
    host.check(
        head.value == expected,
        &format!(
            "the first line at 1 MiB is '{}', not '{expected}'",
            head.value
        ),
    );
}

#[test]
fn info_shows_the_hot_added_nvme_present_in_the_slot_the_guest_sees() {
    let run = add();
    let markers = between(&run, "add", "graceful");
    let added = expect_guest(
        &run,
        &markers,
        "pci-added",
        GUEST_BDF,
        "no hot-added device",
    );

    let info = ctl_ok(&run, "info_added");

    let guest_slot = added.field("slot").unwrap_or("none");
    run.check(
        json_value(info, "id") == Some("disk0") && json_value(info, "state") == Some("present"),
        &format!("info does not show disk0 present: {info}"),
    );
    run.check(
        json_value(info, "slot") == Some(guest_slot),
        &format!(
            "info puts disk0 in slot {:?}, the guest in slot {guest_slot}: {info}",
            json_value(info, "slot")
        ),
    );
    run.check(
        json_u64(info, "used") == Some(1) && json_u64(info, "total") == Some(ROOT_PORTS),
        &format!("info does not show 1 of {ROOT_PORTS} root ports used: {info}"),
    );
}

#[test]
fn host_vectors_of_the_hot_added_nvme_are_those_the_guest_driver_uses() {
    let run = add();
    let table = nvme_run().all().expect_host_u64("msix_table");
    let info = ctl_ok(&run, "info_added");
    let markers = between(&run, "add", "graceful");

    let guest = markers
        .iter()
        .rev()
        .find(|m| m.source == Source::Guest && m.key == "irq_mode" && m.word(0) == Some(GUEST_BDF))
        .unwrap_or_else(|| {
            run.fail(&format!(
                "the guest reported no interrupt mode of {GUEST_BDF}"
            ))
        });
    let guest_vectors: Option<u64> = guest.field("vectors").and_then(|v| v.parse().ok());
    let host_vectors = json_u64(info, "host_vectors");

    run.check(
        guest.field("mode") == Some("msix"),
        &format!(
            "the guest's nvme driver does not use MSI-X: {}",
            guest.value
        ),
    );
    run.check(
        host_vectors.is_some() && host_vectors == guest_vectors,
        &format!(
            "rvmm has {host_vectors:?} vectors live on the host, the guest's driver uses \
             {guest_vectors:?} ({})",
            guest.value
        ),
    );
    run.check(
        host_vectors.is_some_and(|n| n < table),
        &format!(
            "{host_vectors:?} host vectors for a table of {table}: the test proves nothing \
             unless the driver uses fewer vectors than the table has"
        ),
    );
}

#[test]
fn each_hot_add_is_reported_as_a_device_added_event() {
    let run = add();

    let added = events(&run, "device-added", "disk0");

    run.check(
        added.len() == 2,
        &format!(
            "{} device-added events for the add and the re-add, not 2: {added:?}",
            added.len()
        ),
    );
    // The first add goes to the first root port. The re-add follows a removal at once, when
    // the guest's pciehp still ignores the slot it just powered off (for a second): it goes to
    // the next free root port, which can take it at once.
    let port_bdfs: Vec<String> = (1..=ROOT_PORTS)
        .map(|bus| format!("0000:{bus:02x}:00.0"))
        .collect();
    for (i, event) in added.iter().enumerate() {
        let bdf = json_value(event, "bdf").unwrap_or_default();
        let where_ok = if i == 0 {
            bdf == GUEST_BDF
        } else {
            port_bdfs.iter().any(|b| b == bdf)
        };
        run.check(
            json_value(event, "state") == Some("present") && where_ok,
            &format!(
                "device-added event {i} does not show the device present behind a root port \
                 (the first at {GUEST_BDF}): {event}"
            ),
        );
    }
}

// --- graceful removal -----------------------------------------------------------------------

#[test]
fn graceful_removal_is_answered_as_guest_ejected_before_the_timeout() {
    let run = add();

    let answer = ctl_ok(&run, "remove");

    run.check(
        json_value(answer, "reason") == Some("guest-ejected"),
        &format!("the removal did not end with the guest ejecting the device: {answer}"),
    );
    let duration = json_u64(answer, "duration_ms").unwrap_or(u64::MAX);
    run.check(
        duration < REMOVE_TIMEOUT_MS,
        &format!("the graceful removal took {duration} ms, not less than {REMOVE_TIMEOUT_MS}"),
    );
}

#[test]
fn graceful_removal_makes_the_block_device_and_the_pci_device_disappear_in_the_guest() {
    let run = add();

    let markers = between(&run, "graceful", "readd");

    expect_guest(
        &run,
        &markers,
        "block-removed",
        "nvme",
        "the namespace stayed in the guest",
    );
    expect_guest(
        &run,
        &markers,
        "pci-removed",
        GUEST_BDF,
        "the PCI device stayed in the guest",
    );
}

#[test]
fn graceful_removal_is_reported_as_device_removed_guest_ejected() {
    assert_removed_event(&add(), "disk0", "guest-ejected", 1);
}

#[test]
fn graceful_removal_gives_back_the_root_port_and_the_device_resources() {
    let run = add();

    assert_nothing_held(&run, "info_removed", "the removal");
}

#[test]
fn gracefully_removed_nvme_can_be_added_again_at_once() {
    let run = add();

    let answer = ctl_ok(&run, "readd");
    let took = ctl(&run, "readd").ms;
    let markers = between(&run, "readd", "end");

    run.check(
        json_value(answer, "state") == Some("present"),
        &format!("the re-add did not answer present: {answer}"),
    );
    run.check(
        took < READD_LIMIT_MS,
        &format!(
            "the re-add right after the removal took {took} ms, not less than {READD_LIMIT_MS}"
        ),
    );
    expect_guest(
        &run,
        &markers,
        "block-added",
        "nvme",
        "the re-added drive never reached the guest",
    );
}

#[test]
fn vm_shut_down_through_the_api_exits_zero() {
    assert_clean_shutdown(&add());
}

// --- removals started by the test host ------------------------------------------------------

/// The two ways the test host takes its device back: (step, the step after it, timed label).
const SYSFS_REMOVE: (&str, &str, &str) = ("sysfs_remove", "readd_after_remove", "sysfs_remove");
const UNBIND: (&str, &str, &str) = ("unbind", "readd_after_unbind", "unbind");

fn assert_host_command_is_quick((_, _, label): (&str, &str, &str)) {
    let run = host_remove();
    let timed = labelled(&run, "timed", label);
    let Some(status) = timed.first() else {
        run.fail(&format!("the test host never ran its '{label}' command"));
    };

    let field = |name: &str| {
        status
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
    };

    run.check(
        field("rc") == Some("0"),
        &format!("the test host's '{label}' command failed: {status}"),
    );
    let ms: u64 = field("ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(u64::MAX);
    run.check(
        ms <= HOST_REMOVAL_LIMIT_MS,
        &format!(
            "the test host's '{label}' command took {ms} ms, not at most {HOST_REMOVAL_LIMIT_MS}: \
             rvmm did not give the device back when the host asked for it"
        ),
    );
}

fn assert_guest_drops_the_device((step, next, _): (&str, &str, &str)) {
    let run = host_remove();
    let markers = between(&run, step, next);
    expect_guest(
        &run,
        &markers,
        "block-removed",
        "nvme",
        "the namespace stayed in the guest",
    );
    expect_guest(
        &run,
        &markers,
        "pci-removed",
        GUEST_BDF,
        "the PCI device stayed in the guest",
    );
}

fn assert_guest_io_fails((step, next, _): (&str, &str, &str)) {
    let run = host_remove();
    let markers = between(&run, step, next);
    let stopped = expect_guest(
        &run,
        &markers,
        "io-stopped",
        "nvme",
        "the guest's reads of the removed drive never ended",
    );
    run.check(
        stopped
            .field("error")
            .is_some_and(|error| !error.is_empty()),
        &format!(
            "the guest's reads ended without an error: {}",
            stopped.value
        ),
    );
}

fn assert_host_request_event((step, next, _): (&str, &str, &str)) {
    let run = host_remove();
    let markers = between(&run, step, next);
    let event = markers.iter().find(|marker| {
        marker.source == Source::Host
            && marker.key == "event"
            && json_value(marker.value, "event") == Some("device-removed")
    });
    match event {
        Some(event) => run.check(
            json_value(event.value, "reason") == Some("host-request")
                && json_value(event.value, "id") == Some("disk0"),
            &format!(
                "the removal is not reported as disk0 removed on host request: {}",
                event.value
            ),
        ),
        None => run.fail(&format!("no device-removed event after step '{step}'")),
    }
}

fn assert_info_answers_without_the_device(label: &str) {
    let run = host_remove();
    let info = ctl_ok(&run, label);
    run.check(
        info.contains("\"devices\": []") && json_u64(info, "used") == Some(0),
        &format!("info still shows the device the host took back: {info}"),
    );
}

fn assert_guest_keeps_running((step, next, _): (&str, &str, &str)) {
    let run = host_remove();
    let markers = between(&run, step, next);
    let removed = markers
        .iter()
        .position(|marker| marker.source == Source::Guest && marker.key == "block-removed");
    let alive = markers.iter().rposition(|marker| {
        marker.source == Source::Guest
            && marker.key == "monitor"
            && marker.value.starts_with("alive")
    });
    run.check(
        removed.is_some() && alive > removed,
        "the guest printed no 'GUEST monitor alive' after it dropped the device",
    );
}

fn assert_added_again((_, next, _): (&str, &str, &str), label: &str, until: &str) {
    let run = host_remove();
    let answer = ctl_ok(&run, label);
    let markers = between(&run, next, until);
    run.check(
        json_value(answer, "state") == Some("present"),
        &format!("the re-add did not answer present: {answer}"),
    );
    expect_guest(
        &run,
        &markers,
        "block-added",
        "nvme",
        "the re-added drive never reached the guest",
    );
}

#[test]
fn host_sysfs_remove_of_a_passed_through_device_completes_within_a_second() {
    assert_host_command_is_quick(SYSFS_REMOVE);
}

#[test]
fn host_unbind_from_vfio_pci_of_a_passed_through_device_completes_within_a_second() {
    assert_host_command_is_quick(UNBIND);
}

#[test]
fn guest_drops_the_device_the_host_removed_through_sysfs() {
    assert_guest_drops_the_device(SYSFS_REMOVE);
}

#[test]
fn guest_drops_the_device_the_host_unbound_from_vfio_pci() {
    assert_guest_drops_the_device(UNBIND);
}

#[test]
fn guest_reads_of_the_device_the_host_removed_fail_instead_of_hanging() {
    assert_guest_io_fails(SYSFS_REMOVE);
}

#[test]
fn guest_reads_of_the_device_the_host_unbound_fail_instead_of_hanging() {
    assert_guest_io_fails(UNBIND);
}

#[test]
fn host_sysfs_remove_is_reported_as_device_removed_host_request() {
    assert_host_request_event(SYSFS_REMOVE);
}

#[test]
fn host_unbind_is_reported_as_device_removed_host_request() {
    assert_host_request_event(UNBIND);
}

#[test]
fn rvmm_answers_info_without_the_device_after_the_host_removed_it() {
    assert_info_answers_without_the_device("info_after_remove");
}

#[test]
fn rvmm_answers_info_without_the_device_after_the_host_unbound_it() {
    assert_info_answers_without_the_device("info_after_unbind");
}

#[test]
fn guest_keeps_running_after_the_host_removed_its_device() {
    assert_guest_keeps_running(SYSFS_REMOVE);
}

#[test]
fn guest_keeps_running_after_the_host_unbound_its_device() {
    assert_guest_keeps_running(UNBIND);
}

#[test]
fn device_the_host_removed_can_be_added_again_after_a_rescan() {
    assert_added_again(SYSFS_REMOVE, "add_after_remove", "unbind");
}

#[test]
fn device_the_host_unbound_can_be_added_again_after_rebinding_it_to_vfio_pci() {
    assert_added_again(UNBIND, "add_after_unbind", "end");
}

#[test]
fn guest_kernel_logs_no_oops_or_warning_after_the_host_took_its_device_back_twice() {
    assert_no_kernel_problems(&host_remove());
}

#[test]
fn vm_whose_device_the_host_took_back_twice_powers_off_cleanly() {
    assert_clean_stop(&host_remove());
}
