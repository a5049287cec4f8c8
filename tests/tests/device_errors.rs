//! Device errors the guest recovers from (docs/hotplug.md, "Device errors"), proven on a real
//! guest: the test host's AER core reports an error below the NVMe drive's root port (the
//! kernel's `aer_inject`, `resources/host/host-lib.sh`), vfio-pci signals the VFIO error
//! interrupt, and rvmm forwards the error to the guest as an uncorrectable non-fatal AER error of
//! the drive on its root port.
//!
//! One test host run, three rvmm runs with the drive cold-plugged:
//! - `recover`: a non-fatal error; the guest's AER core and nvme driver recover the drive, it
//!   keeps working (a pattern written and read before and after) and rvmm reports
//!   `device-error` `recovered`.
//! - `unrecovered`: the same error, but the guest has no driver for the drive, so its AER
//!   recovery fails and leaves the error set: after rvmm's deadline the drive is
//!   surprise-removed (`device-error` `removed`) and the VM keeps running.
//! - `paused`: the non-fatal error arrives while the VM is paused and stays paused past rvmm's
//!   recovery deadline: the deadline waits for the guest, which recovers the drive after the
//!   resume (`recovered`, no removal).
//! - `fatal`: a fatal error; the test host's recovery resets the link below the port, so the
//!   drive lost what the guest set up: surprise removal (`device-error` `removed`).
//!
//! QEMU's own `pcie_aer_inject_error` needs a device with a QEMU id and an AER capability; the
//! test host's NVMe has none and its igb VFs have no id, while `aer_inject` works from inside
//! the test host on the drive's root port (which has AER): the host's recovery then reaches
//! every driver below the port, vfio-pci among them.

use std::time::Duration;

use rvmm_tests::{assert_clean_poweroff, token, GuestRun, Marker, Section, SharedRun, TestHost};

/// The device id the drive gets.
const ID: &str = "drive";
/// Completion Timeout: an uncorrectable error that is non-fatal by default.
const NON_FATAL: &str = "0x4000";
/// Data Link Protocol error: fatal by default.
const FATAL: &str = "0x10";
/// How the message of a non-zero exit status goes on (`assert_clean_poweroff`).
const POWERED_OFF: &str = "after the guest powered off";

static RUN: SharedRun = SharedRun::new();

/// The lines of one rvmm run: the drive cold-plugged, the events followed, the error injected
/// on the drive's root port once the guest is ready, the run waited for.
fn guest_run(name: &str, params: &[&str], status: &str) -> String {
    guest_run_with(name, params, &format!("aer_inject \"$PORT\" {status}"))
}

/// [`guest_run`] with `inject`, the lines that inject the error.
fn guest_run_with(name: &str, params: &[&str], inject: &str) -> String {
    let args = GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .root_ports(2)
        .guest_scenario("aer", params)
        .arg("--api-socket")
        .arg(&format!("/tmp/rvmm-{name}.sock"))
        .arg("--device")
        .shell_arg(&format!("\"$NVME,id={ID}\""))
        .rvmm_args();
    format!(
        "RVMM_TIMEOUT=240\n\
         rvmm_start_lines {name} {args}\n\
         ctl_events {name}\n\
         if rvmm_wait_output {name} 'GUEST aer_ready' 120; then\n\
         sleep 1\n\
         {inject}\n\
         fi\n\
         rvmm_wait_lines {name}\n"
    )
}

fn scenario() -> String {
    let pattern = format!("rvmm.pattern={}", token());
    let mut s = String::from(
        "NVME=$(pci_find 1b36:0010 | sed -n 1p)\n\
         PORT=$(upstream_port \"$NVME\")\n\
         hmark aer_devices \"$NVME\" \"$PORT\"\n\
         dmesg | grep -e 'AER' | while IFS= read -r line; do hmark host_aer_log \"$line\"; done\n\
         vfio_bind \"$NVME\"\n",
    );
    s += &guest_run("recover", &["rvmm.hold=60", &pattern], NON_FATAL);
    s += &guest_run(
        "unrecovered",
        &[
            "rvmm.hold=90",
            "rvmm.aer_driver=0",
            "rvmm.aer_until=removed",
        ],
        NON_FATAL,
    );
    // Paused longer than rvmm's 10 s recovery deadline.
    s += &guest_run_with(
        "paused",
        &["rvmm.hold=90", &pattern],
        &format!(
            "rvmm_ctl paused pause pause\n\
             aer_inject \"$PORT\" {NON_FATAL}\n\
             sleep 14\n\
             rvmm_ctl paused resume resume"
        ),
    );
    s += &guest_run(
        "fatal",
        &["rvmm.hold=90", "rvmm.aer_until=removed", &pattern],
        FATAL,
    );
    s += "dmesg | grep -e 'AER' -e 'vfio' | tail -n 40 | while IFS= read -r line; do \
          hmark host_log \"$line\"; done\n";
    s
}

fn output() -> &'static rvmm_tests::TestHostOutput {
    RUN.get(
        || {
            TestHost::new("device_errors")
                .nvme_drives(1)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(900),
    )
}

fn run(name: &str) -> Section<'static> {
    output().section(name)
}

/// The value of `"key":"..."` (or a number) in one JSON line.
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let start = json.find(&pattern)? + pattern.len();
    let rest = json.get(start..)?.trim_start();
    match rest.strip_prefix('"') {
        Some(string) => string.split('"').next(),
        None => rest.split([',', '}']).next(),
    }
}

/// The JSON of every `HOST event` of `run` of kind `event` for the drive.
fn events<'a>(run: &Section<'a>, event: &str) -> Vec<&'a str> {
    run.host_all("event")
        .into_iter()
        .map(|marker| marker.value)
        .filter(|json| {
            json_value(json, "event") == Some(event) && json_value(json, "id") == Some(ID)
        })
        .collect()
}

/// Asserts exactly one `device-error` event for the drive, with `outcome`.
#[track_caller]
fn assert_error_event(run: &Section<'_>, outcome: &str) {
    let errors = events(run, "device-error");
    run.check(
        errors.len() == 1 && json_value(errors[0], "outcome") == Some(outcome),
        &format!("expected one device-error event with outcome {outcome}, got {errors:?}"),
    );
}

#[track_caller]
fn assert_injected(run: &Section<'_>) {
    let inject = run.expect_host("aer_inject");
    run.check(
        inject.value.ends_with(" ok"),
        &format!("the test host could not inject the error: {}", inject.value),
    );
}

#[track_caller]
fn aer_end<'a>(run: &Section<'a>) -> Marker<'a> {
    run.expect_guest("aer_end")
}

// --- the test host ---------------------------------------------------------------------------

#[test]
fn the_test_hosts_aer_service_runs_on_the_drives_root_port() {
    let all = output().all();
    let devices = all.expect_host("aer_devices");
    let port = devices.word(1).unwrap_or("?");
    let enabled = all
        .host_all("host_aer_log")
        .iter()
        .any(|m| m.value.contains(port) && m.value.contains("enabled"));
    all.check(
        enabled,
        &format!("the test host's AER service is not enabled on {port}"),
    );
}

// --- the guest ------------------------------------------------------------------------------

#[test]
fn the_guest_gets_aer_control_and_its_aer_service_binds_the_drives_root_port() {
    let run = run("recover");
    let logs: Vec<&str> = run.guest_all("aer_log").iter().map(|m| m.value).collect();
    run.check(
        logs.iter()
            .any(|l| l.contains("_OSC: OS now controls") && l.contains(" AER ")),
        &format!("_OSC did not give the guest AER control: {logs:?}"),
    );
    run.check(
        logs.iter()
            .any(|l| l.contains("0000:00:01.0: AER: enabled")),
        &format!("the guest's AER service is not enabled on the first root port: {logs:?}"),
    );
}

// --- recover: a non-fatal error the guest recovers from --------------------------------------

#[test]
fn a_non_fatal_error_is_recovered_by_the_guest() {
    let run = run("recover");
    assert_injected(&run);
    let end = aer_end(&run);
    run.check(
        end.word(0) == Some("recovered"),
        &format!(
            "the guest's AER recovery did not succeed: aer_end {}",
            end.value
        ),
    );
    assert_error_event(&run, "recovered");
    run.check(
        events(&run, "device-removed").is_empty(),
        "the drive was removed although the guest recovered it",
    );
}

#[test]
fn the_guest_logs_an_aer_error_of_the_drive_and_its_recovery() {
    let run = run("recover");
    let logs: Vec<&str> = run.guest_all("aer_log").iter().map(|m| m.value).collect();
    let ready = run.expect_guest("aer_ready");
    let drive = ready.word(0).unwrap_or("?");
    run.check(
        logs.iter()
            .any(|l| l.contains("Uncorrectable (Non-Fatal)") && l.contains(drive)),
        &format!("the guest logged no non-fatal AER error from {drive}: {logs:?}"),
    );
    run.check(
        logs.iter()
            .any(|l| l.contains("device recovery successful")),
        &format!("the guest logged no successful recovery: {logs:?}"),
    );
}

#[test]
fn the_drive_keeps_working_after_the_recovery() {
    let run = run("recover");
    let patterns = run.guest_all("nvme_pattern");
    run.check(
        patterns.len() == 2 && patterns.iter().all(|m| m.word(1) == Some("ok")),
        &format!(
            "the pattern was not written and read back before and after the error: {:?}",
            patterns.iter().map(|m| m.value).collect::<Vec<_>>()
        ),
    );
    assert_clean_poweroff(&run, run.rvmm_exit(), &["up", "done"], POWERED_OFF);
}

// --- unrecovered: the guest cannot recover the drive ----------------------------------------

#[test]
fn an_error_the_guest_does_not_recover_ends_in_surprise_removal() {
    let run = run("unrecovered");
    assert_injected(&run);
    let end = aer_end(&run);
    run.check(
        end.word(0) == Some("removed"),
        &format!("the drive did not leave the guest: aer_end {}", end.value),
    );
    let removed = events(&run, "device-removed");
    run.check(
        removed.len() == 1 && json_value(removed[0], "reason") == Some("device-error"),
        &format!("expected one device-removed event with reason device-error: {removed:?}"),
    );
    assert_error_event(&run, "removed");
}

#[test]
fn the_guest_tried_and_failed_before_the_removal() {
    let run = run("unrecovered");
    let logs: Vec<&str> = run.guest_all("aer_log").iter().map(|m| m.value).collect();
    run.check(
        logs.iter().any(|l| l.contains("device recovery failed")),
        &format!("the guest did not log a failed recovery: {logs:?}"),
    );
}

#[test]
fn the_vm_keeps_running_after_an_unrecovered_error() {
    let run = run("unrecovered");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["aer_end", "done"], POWERED_OFF);
}

// --- fatal: the host resets the link ---------------------------------------------------------

#[test]
fn a_fatal_error_ends_in_surprise_removal() {
    let run = run("fatal");
    assert_injected(&run);
    let end = aer_end(&run);
    run.check(
        end.word(0) == Some("removed"),
        &format!("the drive did not leave the guest: aer_end {}", end.value),
    );
    assert_error_event(&run, "removed");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["aer_end", "done"], POWERED_OFF);
}

// --- paused: the error arrives while the VM is paused ----------------------------------------

#[test]
fn an_error_while_paused_waits_for_the_guest_and_is_recovered_after_the_resume() {
    let run = run("paused");
    assert_injected(&run);
    for label in ["pause", "resume"] {
        let call = run
            .host_all("ctl")
            .into_iter()
            .find(|m| m.word(0) == Some(label));
        run.check(
            call.is_some_and(|m| m.field("rc") == Some("0")),
            &format!("rvmm ctl {label} failed: {:?}", call.map(|m| m.value)),
        );
    }
    let end = aer_end(&run);
    run.check(
        end.word(0) == Some("recovered"),
        &format!(
            "the guest did not recover the drive after the resume: aer_end {}",
            end.value
        ),
    );
    assert_error_event(&run, "recovered");
    let removed = events(&run, "device-removed");
    run.check(
        removed.is_empty(),
        &format!("the drive was removed while the VM was paused: {removed:?}"),
    );
}
