//! The `hotplug_misc` run: an igb virtual function hot-added and removed (`vf`), then an NVMe
//! drive cold-plugged with `--device` (`cold`): requests rvmm must refuse without changing
//! anything while the VM has it, then its removal at runtime.

use super::*;

fn vf() -> Section<'static> {
    misc_run().section("vf")
}

fn cold() -> Section<'static> {
    misc_run().section("cold")
}

/// The refused requests happen in the `cold` run, while the cold-plugged drive is present.
fn errors() -> Section<'static> {
    misc_run().section("cold")
}

// --- an igb virtual function ----------------------------------------------------------------

#[test]
fn hot_added_vf_is_bound_by_igbvf_in_the_guest() {
    let run = vf();
    ctl_ok(&run, "add");

    let markers = between(&run, "add", "remove");

    let added = expect_guest(
        &run,
        &markers,
        "pci-added",
        GUEST_BDF,
        "the guest never saw the VF",
    );
    run.check(
        added.word(1) == Some("8086:10ca"),
        &format!("the guest's {GUEST_BDF} is not an igb VF: {}", added.value),
    );
    let net = expect_guest(
        &run,
        &markers,
        "net-added",
        "",
        "no interface appeared in the guest",
    );
    run.check(
        net.field("driver") == Some("igbvf"),
        &format!("the new interface is not igbvf's: {}", net.value),
    );
}

#[test]
fn info_shows_the_hot_added_vf_present_with_its_host_address() {
    let run = vf();
    let host = misc_run().all().expect_host("vf_device").value;

    let info = ctl_ok(&run, "info_added");

    run.check(
        json_value(info, "id") == Some("vf0")
            && json_value(info, "host_bdf") == Some(host)
            && json_value(info, "state") == Some("present"),
        &format!("info does not show vf0 ({host}) present: {info}"),
    );
}

#[test]
fn graceful_removal_of_the_vf_takes_its_interface_away_in_the_guest() {
    let run = vf();

    let answer = ctl_ok(&run, "remove");
    let markers = between(&run, "remove", "end");

    run.check(
        json_value(answer, "reason") == Some("guest-ejected"),
        &format!("the VF's removal did not end with the guest ejecting it: {answer}"),
    );
    expect_guest(
        &run,
        &markers,
        "net-removed",
        "",
        "the VF's interface stayed in the guest",
    );
    expect_guest(
        &run,
        &markers,
        "pci-removed",
        GUEST_BDF,
        "the VF stayed in the guest",
    );
}

#[test]
fn vf_removal_gives_back_the_root_port_and_the_device_resources() {
    let run = vf();

    assert_nothing_held(&run, "info_removed", "the VF's removal");
}

#[test]
fn guest_kernel_logs_no_oops_or_warning_after_the_vf_came_and_went() {
    assert_no_kernel_problems(&vf());
}

// --- a cold-plugged drive -------------------------------------------------------------------

#[test]
fn cold_plugged_drive_is_present_in_info_and_in_the_guest() {
    let run = cold();

    let info = ctl_ok(&run, "info_boot");

    run.check(
        json_value(info, "id") == Some("cold0") && json_value(info, "state") == Some("present"),
        &format!("info does not show cold0 present: {info}"),
    );
    let block = run.guest_all("block-added");
    run.check(
        block.iter().any(|marker| marker.value.starts_with("nvme")),
        "the guest never had the cold-plugged drive's namespace",
    );
}

#[test]
fn cold_plugged_drive_is_removed_gracefully_at_runtime() {
    let run = cold();

    let answer = ctl_ok(&run, "remove");
    let markers = between(&run, "remove", "end");

    run.check(
        json_value(answer, "reason") == Some("guest-ejected"),
        &format!("the cold-plugged drive's removal did not end guest-ejected: {answer}"),
    );
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
        "the drive stayed in the guest",
    );
}

#[test]
fn cold_plugged_drive_removal_is_reported_as_device_removed_guest_ejected() {
    assert_removed_event(&cold(), "cold0", "guest-ejected", 1);
}

#[test]
fn cold_plugged_drive_removal_leaves_no_device_in_info() {
    let run = cold();

    let info = ctl_ok(&run, "info_removed");

    run.check(
        info.contains("\"devices\": []") && json_u64(info, "used") == Some(0),
        &format!("info still shows the removed drive: {info}"),
    );
}

// --- refused requests -----------------------------------------------------------------------

/// Asserts that ctl call `label` failed with exit status 1 and a message containing every part
/// of `parts`; returns the message.
#[track_caller]
fn assert_ctl_refused(label: &str, parts: &[&str]) -> String {
    let run = errors();
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
    call.err
}

#[test]
fn removing_an_unknown_id_is_refused_with_404() {
    assert_ctl_refused("unknown_id", &["nosuchdisk", "(HTTP 404)"]);
}

#[test]
fn two_devices_in_one_add_call_are_refused_before_reaching_rvmm() {
    let run = errors();

    let call = ctl(&run, "two_devices");

    // A usage error of the client (clap's status 2): nothing is sent.
    run.check(
        call.rc == 2 && call.err.contains("one device per call"),
        &format!(
            "two devices were not refused as one device per call: exit {}: {}",
            call.rc, call.err
        ),
    );
}

#[test]
fn adding_a_device_the_host_does_not_have_is_refused_with_400_naming_it() {
    assert_ctl_refused("absent", &[ABSENT_BDF, "not found", "(HTTP 400)"]);
}

#[test]
fn adding_a_path_that_is_no_pci_device_is_refused_with_the_expected_form() {
    let run = errors();

    let call = ctl(&run, "not_pci");

    run.check(
        call.rc != 0
            && call.err.contains("/tmp/not-a-device")
            && call.err.contains("/sys/bus/pci/devices/"),
        &format!(
            "the path was not refused with the form rvmm expects: exit {}: {}",
            call.rc, call.err
        ),
    );
}

#[test]
fn adding_a_device_this_vm_already_has_is_refused_with_409() {
    assert_ctl_refused("in_use", &["already attached", "cold0", "(HTTP 409)"]);
}

#[test]
fn adding_a_device_not_bound_to_vfio_pci_is_refused_with_400_and_the_bind_commands() {
    let pf = misc_run().all().expect_host("pf_device").value;
    let override_path = format!("/sys/bus/pci/devices/{pf}/driver_override");

    assert_ctl_refused(
        "not_bound",
        &[
            &format!("{pf} is bound to igb, not vfio-pci"),
            &format!("echo vfio-pci > {override_path}"),
            "/sys/bus/pci/drivers_probe",
            "(HTTP 400)",
        ],
    );
}

#[test]
fn refused_requests_leave_info_unchanged() {
    let run = errors();

    let before = ctl_ok(&run, "info_boot");
    let after = ctl_ok(&run, "info_after");

    run.check(
        before == after,
        &format!("info changed across the refused requests:\nbefore: {before}\nafter:  {after}"),
    );
}

#[test]
fn refused_requests_leave_the_rvmm_fd_count_unchanged() {
    let run = errors();

    let fds: Vec<&str> = run.host_all("rvmm_fds").iter().map(|m| m.value).collect();

    let count = |label: &str| {
        fds.iter()
            .find_map(|value| value.strip_prefix(label)?.strip_prefix(' '))
            .unwrap_or("none")
    };
    run.check(
        count("before") != "none" && count("before") == count("after"),
        &format!(
            "rvmm had {} fds open before the refused requests and {} after",
            count("before"),
            count("after")
        ),
    );
}

#[test]
fn guest_keeps_its_device_through_refused_requests() {
    let run = errors();

    let markers = between(&run, "refusals", "stale_group");

    run.check(
        guest_marker(&markers, "block-removed", "").is_none()
            && guest_marker(&markers, "pci-removed", "").is_none(),
        "the guest lost a device while rvmm refused requests",
    );
}

// --- a group released while another device keeps the container ------------------------------

#[test]
fn vf_taken_back_by_the_host_beside_a_cold_plugged_drive_is_removed_as_host_request() {
    let run = cold();

    let unbind = run
        .host_all("timed")
        .into_iter()
        .find(|m| m.word(0) == Some("vf_unbind"));

    run.check(
        unbind.is_some_and(|m| m.field("rc") == Some("0")),
        "the test host's unbind of the VF from vfio-pci did not complete",
    );
    assert_removed_event(&run, "vf1", "host-request", 1);
}

#[test]
fn vf_can_be_added_again_after_the_host_took_it_back_while_the_container_stayed() {
    let run = cold();

    let answer = ctl_ok(&run, "vf_readd");
    let markers = between(&run, "stale_group", "remove");
    let added = markers
        .iter()
        .filter(|m| m.source == Source::Guest && m.key == "net-added")
        .count();

    run.check(
        json_value(answer, "state") == Some("present") && added == 2,
        &format!(
            "the VF re-added after the host took it back should reach the guest \
             (answer {answer}, {added} net-added in the guest)"
        ),
    );
}

// --- a hot-add whose client went away -------------------------------------------------------

fn abandon() -> Section<'static> {
    misc_run().section("abandon")
}

#[test]
fn hot_add_whose_client_went_away_is_rolled_back_and_the_drive_released() {
    let run = abandon();
    let killed = run.expect_host("abandon_killed");
    run.check(
        killed.field("guest_ready") == Some("0"),
        &format!(
            "the guest was up before the client was killed, so the add could have finished: {}",
            killed.value
        ),
    );

    let rolled_back = run.host_all("rvmm_log").into_iter().any(|m| {
        m.value
            .contains("hot-add of gone0 rolled back: its client went away")
    });
    let info = ctl_ok(&run, "info_abandoned");
    let blocks = run.expect_host("abandon_blocks");

    run.check(
        rolled_back,
        "rvmm never said it rolled the add of gone0 back",
    );
    run.check(
        !info.contains("gone0"),
        &format!("info still shows the abandoned device: {info}"),
    );
    run.check(
        blocks.value == "0",
        &format!(
            "the guest got a drive nobody waited for: {} block devices",
            blocks.value
        ),
    );
    run.check(
        events(&run, "device-added", "gone0").is_empty(),
        "a device-added event was published for the abandoned add",
    );
}

#[test]
fn drive_of_an_abandoned_hot_add_can_be_added_again() {
    let run = abandon();

    let answer = ctl_ok(&run, "readd");
    let markers = between(&run, "readd", "end");

    run.check(
        json_value(answer, "id") == Some("disk0"),
        &format!("the add after the abandoned one did not answer with disk0: {answer}"),
    );
    expect_guest(
        &run,
        &markers,
        "block-added",
        "",
        "the drive of the abandoned add never reached the guest when added again",
    );
}
