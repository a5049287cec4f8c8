//! Pause and resume of a running guest (`rvmm ctl pause|resume`), proven by the guest's own
//! clock-driven output. The guest runs the `ticker` scenario of `resources/guest/init`: it
//! prints `GUEST tick <n> <uptime>` every 0.2 s. The test host pauses the VM, waits, counts
//! the ticks on the console before and after the wait (no new one may appear while paused),
//! asks `info` (`state: paused`), tries a hot-add of a vfio-bound NVMe drive (refused with 409),
//! pauses again (answered, nothing changes), resumes, waits for the ticks to go on, hot-adds the
//! drive (hotplug works again), then stops the ticker: the guest powers off and rvmm exits 0.
//! A second VM (`pause_stop`) is first reset on request (`rvmm ctl reboot`: the guest comes up
//! a second time in the same process, `vm-rebooted`), then paused (a reset is now refused with
//! 409) and shut down through the API while paused: rvmm must end (the parked vCPUs leave) with
//! exit status 0.
//!
//! No timing is asserted: only counts before and after the pause, and that ticks continue.

use std::time::Duration;

use rvmm_tests::{assert_clean_poweroff, GuestRun, Section, SharedRun, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// Seconds the VM stays paused while the ticks are counted.
const PAUSED_SECS: u32 = 2;
/// Ticks the guest must print before the pause, and after the resume.
const TICKS_AROUND: u32 = 5;

/// The rvmm arguments of VM `name`: the ticker guest with its API socket.
fn ticker_args(name: &str) -> String {
    GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .root_ports(2)
        .guest_scenario("ticker", &["rvmm.hold=240"])
        .arg("--api-socket")
        .arg(&format!("/tmp/rvmm-{name}.sock"))
        .rvmm_args()
}

fn scenario() -> String {
    let args = ticker_args("pause");
    let stop_args = ticker_args("pause_stop");
    let add = "add-device \"path=/sys/bus/pci/devices/$NVME,id=disk0\"";
    format!(
        r#"NVME=$(pci_find 1b36:0010 | sed -n 1p)
vfio_bind "$NVME"
RVMM_TIMEOUT=280
rvmm_start_lines pause {args}
ctl_events pause
if rvmm_wait_output pause 'GUEST ticker ready' 120 && rvmm_wait_more pause 'GUEST tick ' {TICKS_AROUND} 60; then
  rvmm_ctl pause pause pause
  # What the guest printed before it stopped reaches the console file first.
  sleep 1
  hmark ticks paused_start "$(rvmm_count pause 'GUEST tick ')"
  rvmm_ctl pause info_paused info
  rvmm_ctl pause add_paused {add}
  rvmm_ctl pause pause_again pause
  sleep {PAUSED_SECS}
  paused_end=$(rvmm_count pause 'GUEST tick ')
  hmark ticks paused_end "$paused_end"
  rvmm_ctl pause resume resume
  rvmm_wait_more pause 'GUEST tick ' $((paused_end + {TICKS_AROUND})) 60
  hmark ticks resumed "$(rvmm_count pause 'GUEST tick ')"
  rvmm_ctl pause info_resumed info
  rvmm_ctl pause add_resumed {add}
fi
rvmm_stop_monitor pause
RVMM_TIMEOUT=200
rvmm_start_lines pause_stop {stop_args}
ctl_events pause_stop
if rvmm_wait_output pause_stop 'GUEST ticker ready' 120; then
  # A reset on request reboots the guest in place; refused while paused.
  rvmm_ctl pause_stop reboot reboot
  rvmm_wait_more pause_stop 'GUEST ticker ready' 1 120
  hmark boots "$(rvmm_count pause_stop 'GUEST ticker ready')"
  rvmm_ctl pause_stop pause pause
  rvmm_ctl pause_stop reboot_paused reboot
  rvmm_ctl pause_stop shutdown shutdown
fi
rvmm_wait_lines pause_stop
"#
    )
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("lifecycle_pause")
                .nvme_drives(1)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(480),
    )
}

/// The status line and answer of the `rvmm ctl` call `label`: (rc, answer, stderr).
#[track_caller]
fn ctl<'a>(run: &Section<'a>, label: &str) -> (i64, &'a str, String) {
    let rest = |key: &str| -> Vec<&'a str> {
        run.host_all(key)
            .into_iter()
            .filter_map(|m| m.value.split_once(' ').or(Some((m.value, ""))))
            .filter(|(first, _)| *first == label)
            .map(|(_, rest)| rest)
            .collect()
    };
    let Some(status) = rest("ctl").into_iter().next() else {
        run.fail(&format!(
            "the scenario never made the rvmm ctl call '{label}'"
        ));
    };
    let rc = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rc="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| run.fail(&format!("'HOST ctl {label} {status}' lacks rc=")));
    let out = rest("ctl_out").into_iter().next().unwrap_or("");
    (rc, out, rest("ctl_err").join("\n"))
}

/// Asserts that ctl call `label` succeeded; returns its answer.
#[track_caller]
fn ctl_ok<'a>(run: &Section<'a>, label: &str) -> &'a str {
    let (rc, out, err) = ctl(run, label);
    run.check(
        rc == 0,
        &format!("rvmm ctl '{label}' failed (exit {rc}): {err}"),
    );
    out
}

/// The tick count the scenario marked as `HOST ticks <label> <count>`.
#[track_caller]
fn ticks(run: &Section<'_>, label: &str) -> u64 {
    run.host_all("ticks")
        .into_iter()
        .find(|m| m.word(0) == Some(label))
        .and_then(|m| m.word(1)?.parse().ok())
        .unwrap_or_else(|| run.fail(&format!("no 'HOST ticks {label} <count>' marker")))
}

#[test]
fn no_tick_is_printed_while_the_vm_is_paused() {
    let run = run().section("pause");
    ctl_ok(&run, "pause");
    let (start, end) = (ticks(&run, "paused_start"), ticks(&run, "paused_end"));
    run.check(
        start >= u64::from(TICKS_AROUND) && start == end,
        &format!("{start} ticks when the pause began, {end} after {PAUSED_SECS} s paused"),
    );
}

#[test]
fn ticks_go_on_after_the_resume_in_sequence() {
    let run = run().section("pause");
    ctl_ok(&run, "resume");
    let end = ticks(&run, "paused_end");
    let resumed = ticks(&run, "resumed");
    run.check(
        resumed >= end + u64::from(TICKS_AROUND),
        &format!("{resumed} ticks after the resume, {end} when it came"),
    );
    let numbers: Vec<u64> = run
        .guest_all("tick")
        .into_iter()
        .filter_map(|m| m.as_u64())
        .collect();
    let in_sequence = numbers.iter().zip(1..).all(|(&n, want)| n == want);
    run.check(
        in_sequence,
        &format!("the guest's ticks are not 1, 2, 3, ...: {numbers:?}"),
    );
}

#[test]
fn info_reports_paused_then_running() {
    let run = run().section("pause");
    let paused = ctl_ok(&run, "info_paused");
    run.check(
        paused.contains(r#""state": "paused""#),
        &format!("info while paused: {paused}"),
    );
    let resumed = ctl_ok(&run, "info_resumed");
    run.check(
        resumed.contains(r#""state": "running""#),
        &format!("info after the resume: {resumed}"),
    );
}

#[test]
fn hot_add_while_paused_is_refused_with_409_and_works_after_the_resume() {
    let run = run().section("pause");
    let (rc, _, err) = ctl(&run, "add_paused");
    run.check(
        rc != 0 && err.contains("HTTP 409") && err.contains("while the VM is paused"),
        &format!("hot-add while paused: exit {rc}, {err}"),
    );
    let added = ctl_ok(&run, "add_resumed");
    run.check(
        added.contains(r#""state": "present""#),
        &format!("hot-add after the resume: {added}"),
    );
}

#[test]
fn pausing_a_paused_vm_is_answered() {
    let run = run().section("pause");
    ctl_ok(&run, "pause_again");
}

/// The `vm-*` events of `run`, in order.
fn vm_events<'a>(run: &Section<'a>) -> Vec<&'a str> {
    run.host_all("event")
        .into_iter()
        .filter_map(|m| {
            let start = m.value.find(r#""event":""#)? + r#""event":""#.len();
            m.value.get(start..)?.split('"').next()
        })
        .filter(|kind| kind.starts_with("vm-"))
        .collect()
}

#[test]
fn paused_and_resumed_events_are_published_once_each() {
    let run = run().section("pause");
    let kinds = vm_events(&run);
    run.check(
        kinds == ["vm-paused", "vm-resumed", "vm-shutdown"],
        &format!("VM events: {kinds:?}"),
    );
}

#[test]
fn the_guest_powers_off_cleanly_after_the_resume() {
    let run = run().section("pause");
    run.check(
        run.guest_all("ticker").iter().any(|m| m.value == "stop"),
        "the ticker never took the stop typed after the resume",
    );
    assert_clean_poweroff(&run, run.rvmm_exit(), &["up", "done"], "after the pause");
}

#[test]
fn a_paused_vm_can_be_shut_down() {
    let run = run().section("pause_stop");
    ctl_ok(&run, "pause");
    ctl_ok(&run, "shutdown");
    let exit = run.rvmm_exit();
    run.check(
        exit == 0,
        &format!("rvmm exited with {exit} after a shutdown while paused, not 0"),
    );
    run.check(
        run.guest("done").is_none(),
        "the guest powered off by itself: the VM was not paused",
    );
    let kinds = vm_events(&run);
    run.check(
        kinds == ["vm-rebooted", "vm-paused", "vm-shutdown"],
        &format!("VM events: {kinds:?}"),
    );
}

#[test]
fn a_reboot_on_request_restarts_the_guest_in_place_and_is_refused_while_paused() {
    let run = run().section("pause_stop");
    ctl_ok(&run, "reboot");
    let boots = run.expect_host("boots");
    run.check(
        boots.value == "2",
        &format!("the guest came up {} times, not twice", boots.value),
    );
    let (rc, _, err) = ctl(&run, "reboot_paused");
    run.check(
        rc != 0 && err.contains("HTTP 409") && err.contains("while the VM is paused"),
        &format!("reboot while paused: exit {rc}, {err}"),
    );
}
