//! How a VM ends when asked from outside: the ACPI power button and the signals of `rvmm run`,
//! on real guests. One test host, four VMs one after another, each holding still with its
//! init watching the power button's input device (`rvmm.power_button=poweroff|ignore`, see
//! `resources/guest/init`), and each followed by `rvmm ctl events`:
//!
//! - `button`: `rvmm ctl power-button` → the guest sees the key press and powers off: exit 0,
//!   `vm-shutdown` reason `power-off`;
//! - `sigterm`: SIGTERM to rvmm (its console is a FIFO, not a terminal) → the same;
//! - `timeout`: a guest that ignores the button, SIGTERM with `--shutdown-timeout-ms 3000` →
//!   rvmm powers it off at the timeout: exit 5, reason `shutdown-timeout`;
//! - `twice`: a guest that ignores the button, SIGTERM, then SIGINT once the guest saw the
//!   button (default timeout, 30 s) → powered off at once: exit 5, reason `signal`.
//!
//! Every run must also remove its API socket (the clean way out), and the power button must be
//! the control-method one rvmm describes (`PNP0C0C`), not a fixed-feature one.

use std::time::Duration;

use rvmm_tests::{assert_clean_poweroff, GuestRun, Section, SharedRun, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// The rvmm command line of run `name`: a guest holding for 10 minutes (longer than the run
/// may take) whose init does `action` on the power button, with an API socket.
fn guest_args(name: &str, action: &str, extra: &[&str]) -> String {
    let mut run = GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .root_ports(2)
        .guest_scenario(
            "hold",
            &["rvmm.hold=600", &format!("rvmm.power_button={action}")],
        )
        .arg("--api-socket")
        .arg(&format!("/tmp/rvmm-{name}.sock"));
    for arg in extra {
        run = run.arg(arg);
    }
    run.rvmm_args()
}

fn scenario() -> String {
    let button = guest_args("button", "poweroff", &[]);
    let sigterm = guest_args("sigterm", "poweroff", &[]);
    let timeout = guest_args("timeout", "ignore", &["--shutdown-timeout-ms", "3000"]);
    let twice = guest_args("twice", "ignore", &[]);
    format!(
        r#"RVMM_TIMEOUT=150
# lifecycle_start NAME ARG...: starts run NAME, follows its events, waits for the guest's watcher.
lifecycle_start() {{
  rvmm_start_lines "$@"
  ctl_events "$1"
  rvmm_wait_output "$1" 'GUEST power_button watching' 120
}}
# lifecycle_end NAME: waits for the end of run NAME, then says whether its socket is gone.
lifecycle_end() {{
  rvmm_wait_lines "$1"
  if [ -e "$(api_socket "$1")" ]; then hmark socket_left "$1"; else hmark socket_removed "$1"; fi
}}
rvmm_signal() {{
  hmark signal "$1" "$2"
  kill -s "$2" "$(cat "/tmp/rvmm-$1.pid")"
}}

if lifecycle_start button {button}; then
  rvmm_ctl button press power-button
fi
lifecycle_end button

if lifecycle_start sigterm {sigterm}; then
  rvmm_signal sigterm TERM
fi
lifecycle_end sigterm

if lifecycle_start timeout {timeout}; then
  rvmm_signal timeout TERM
fi
lifecycle_end timeout

if lifecycle_start twice {twice}; then
  rvmm_signal twice TERM
  if rvmm_wait_output twice 'GUEST power_button pressed' 60; then
    rvmm_signal twice INT
  fi
fi
lifecycle_end twice
"#
    )
}

fn output() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("lifecycle")
                .nvme_drives(0)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(600),
    )
}

/// The `reason` of the run's `vm-shutdown` event, as `rvmm ctl events` printed it.
fn shutdown_reason(run: &Section<'_>) -> String {
    let events = run.host_all("event");
    let shutdown = events
        .iter()
        .find(|e| e.value.contains(r#""event":"vm-shutdown""#))
        .unwrap_or_else(|| run.fail("rvmm ctl events printed no vm-shutdown event"));
    let json: serde_json::Value = serde_json::from_str(shutdown.value)
        .unwrap_or_else(|e| run.fail(&format!("the vm-shutdown event is no JSON: {e}")));
    json["reason"].as_str().unwrap_or_default().to_owned()
}

/// Asserts that the guest of `run` watched the control-method power button and saw it pressed.
#[track_caller]
fn assert_button_seen(run: &Section<'_>, action: &str) {
    let watching = run.expect_guest("power_button");
    run.check(
        watching.word(0) == Some("watching")
            && watching.field("phys") == Some("PNP0C0C/button/input0"),
        "the guest did not find rvmm's control-method power button (PNP0C0C)",
    );
    let pressed = run
        .guest_all("power_button")
        .into_iter()
        .find(|m| m.word(0) == Some("pressed"));
    run.check(
        pressed.is_some_and(|m| m.field("action") == Some(action)),
        "the guest did not see the power button pressed",
    );
}

/// Asserts that run `name` removed its API socket when it ended.
#[track_caller]
fn assert_socket_removed(name: &str) {
    let all = output().all();
    let removed = all
        .host_all("socket_removed")
        .into_iter()
        .any(|m| m.word(0) == Some(name));
    all.check(removed, &format!("run {name} left its API socket behind"));
}

#[test]
fn ctl_power_button_powers_off_a_guest_that_handles_it() {
    let run = output().section("button");
    let press = run.expect_host("ctl");
    run.check(
        press.field("rc") == Some("0"),
        "rvmm ctl power-button failed",
    );
    assert_button_seen(&run, "poweroff");
    assert_clean_poweroff(
        &run,
        run.rvmm_exit(),
        &["power_button"],
        "after the power button",
    );
    run.check(
        shutdown_reason(&run) == "power-off",
        "vm-shutdown should say power-off",
    );
    assert_socket_removed("button");
}

#[test]
fn guest_kernel_takes_the_power_button_and_ged_without_acpi_complaints() {
    let run = output().section("button");
    for key in ["acpi_errors", "acpi_warnings"] {
        let count = run.expect_guest_u64(key);
        run.check(
            count == 0,
            &format!("the guest kernel logged {count} {key}"),
        );
    }
}

#[test]
fn sigterm_presses_the_power_button() {
    let run = output().section("sigterm");
    run.expect_host("signal");
    assert_button_seen(&run, "poweroff");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["power_button"], "after SIGTERM");
    run.check(
        shutdown_reason(&run) == "power-off",
        "vm-shutdown should say power-off",
    );
    assert_socket_removed("sigterm");
}

#[test]
fn guest_ignoring_the_button_is_powered_off_at_the_shutdown_timeout() {
    let run = output().section("timeout");
    run.expect_host("signal");
    assert_button_seen(&run, "ignore");
    run.check(
        !run.contains("GUEST hold_done"),
        "the guest ended its hold: the power-off was not rvmm's",
    );
    let exit = run.rvmm_exit();
    run.check(
        exit == 5,
        &format!("rvmm exited with {exit}, not 5 (powered off by rvmm)"),
    );
    run.check(
        shutdown_reason(&run) == "shutdown-timeout",
        "vm-shutdown should say shutdown-timeout",
    );
    assert_socket_removed("timeout");
}

#[test]
fn second_signal_powers_off_at_once() {
    let run = output().section("twice");
    let signals: Vec<_> = run
        .host_all("signal")
        .into_iter()
        .filter_map(|m| m.word(1))
        .collect();
    run.check(
        signals == ["TERM", "INT"],
        "the scenario did not send SIGTERM and then SIGINT",
    );
    assert_button_seen(&run, "ignore");
    let exit = run.rvmm_exit();
    run.check(
        exit == 5,
        &format!("rvmm exited with {exit}, not 5 (powered off by rvmm)"),
    );
    run.check(
        shutdown_reason(&run) == "signal",
        "vm-shutdown should say signal (the second signal), not shutdown-timeout",
    );
    assert_socket_removed("twice");
}
