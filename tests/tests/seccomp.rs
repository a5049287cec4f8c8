//! Seccomp filters in a real run: rvmm filters its vCPU, event-loop and API threads by default
//! (and not the thread that started it), `--seccomp off` filters nothing, and a forbidden syscall
//! is reported by name. The forbidden syscall comes from rvmm's test-only self-test
//! (`RVMM_SECCOMP_SELFTEST=1`: the event-loop thread calls `getppid` right after installing its
//! filter). One test host run holds four rvmm runs; each test asserts one behaviour.

use std::time::Duration;

use rvmm_tests::{assert_clean_poweroff, GuestRun, Section, SharedRun, TestHost, TestHostOutput};

/// The self-test's report, as rvmm prints it on stderr.
const SELFTEST_REPORT: &str = "rvmm: seccomp blocked syscall getppid (110) on thread rvmm-vmm; \
                               run with --seccomp log to find every missing syscall";

/// Scenario helpers: `seccomp_threads RUN` prints `HOST seccomp_thread <name> mode=<0|2>` for
/// every thread of run RUN's rvmm (the `Seccomp:` line of each task's status: 0 unfiltered,
/// 2 filtered); `seccomp_ctl_info SOCKET` asks that API for `info`: `HOST seccomp_ctl ok <json
/// without blanks>` or `HOST seccomp_ctl fail <stderr>`.
const HELPERS: &str = r#"
seccomp_ctl_info() {
  if "$RVMM" ctl --api-socket "$1" info >/tmp/seccomp-ctl.out 2>/tmp/seccomp-ctl.err; then
    hmark seccomp_ctl ok "$(tr -d ' \n' </tmp/seccomp-ctl.out)"
  else
    hmark seccomp_ctl fail "$(tr '\n' ' ' </tmp/seccomp-ctl.err)"
  fi
}
seccomp_threads() {
  local pid task
  pid=$(cat "/tmp/rvmm-$1.pid")
  for task in /proc/"$pid"/task/*; do
    hmark seccomp_thread "$(cat "$task/comm")" "mode=$(awk '/^Seccomp:/ { print $2 }' "$task/status")"
  done
}
"#;

static RUN: SharedRun = SharedRun::new();

fn guest(name: &str) -> GuestRun {
    GuestRun::new(name)
        .cpus(2)
        .memory("size=256M")
        .timeout_secs(150)
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            // Default mode, with the control API: one request while the guest holds still,
            // then the threads' seccomp state.
            let filtered = guest("filtered")
                .arg("--api-socket")
                .arg("/tmp/rvmm-filtered.sock")
                .guest_scenario("hold", &["rvmm.hold=4"])
                .while_running(
                    "GUEST hold ",
                    "seccomp_ctl_info /tmp/rvmm-filtered.sock\nseccomp_threads filtered",
                );
            let unfiltered = guest("unfiltered")
                .arg("--seccomp")
                .arg("off")
                .guest_scenario("hold", &["rvmm.hold=3"])
                .while_running("GUEST hold ", "seccomp_threads unfiltered");
            let selftest = guest("selftest");
            let selftest_log = guest("selftest_log").arg("--seccomp").arg("log");
            let scenario = format!(
                "{HELPERS}{}{}export RVMM_SECCOMP_SELFTEST=1\nrvmm_capture selftest {}\n{}\
                 unset RVMM_SECCOMP_SELFTEST\n",
                filtered.script(),
                unfiltered.script(),
                selftest.rvmm_args(),
                selftest_log.script(),
            );
            TestHost::new("seccomp")
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

/// (thread name, seccomp mode) of every `HOST seccomp_thread` marker of `run`.
fn threads(run: &Section<'_>) -> Vec<(String, String)> {
    run.host_all("seccomp_thread")
        .iter()
        .map(|m| {
            (
                m.word(0).unwrap_or_default().to_string(),
                m.field("mode").unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn mode_of(run: &Section<'_>, thread: &str) -> String {
    let all = threads(run);
    match all.iter().find(|(name, _)| name == thread) {
        Some((_, mode)) => mode.clone(),
        None => run.fail(&format!("no thread {thread} in rvmm: {all:?}")),
    }
}

#[test]
fn guest_boots_and_powers_off_with_filters_on_by_default() {
    let run = section("filtered");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["up", "done"], "");
    run.check(
        !run.contains("seccomp blocked"),
        "a filter blocked a syscall rvmm needs",
    );
}

#[test]
fn vcpu_event_loop_and_api_threads_are_filtered() {
    let run = section("filtered");
    for thread in ["vcpu0", "vcpu1", "rvmm-vmm", "rvmm-api"] {
        let mode = mode_of(&run, thread);
        run.check(
            mode == "2",
            &format!("thread {thread} has Seccomp: {mode}, not 2 (filtered)"),
        );
    }
}

#[test]
fn the_thread_that_started_rvmm_is_not_filtered() {
    let run = section("filtered");
    let mode = mode_of(&run, "rvmm");
    run.check(
        mode == "0",
        &format!("rvmm's main thread has Seccomp: {mode}, not 0"),
    );
}

#[test]
fn control_api_answers_through_filtered_threads() {
    let run = section("filtered");
    let ctl = run.expect_host("seccomp_ctl");
    run.check(
        ctl.word(0) == Some("ok"),
        "rvmm ctl info should succeed against the filtered API threads",
    );
    run.check(
        ctl.value.contains("\"cpus\":2"),
        "the info answer should report the VM's 2 vCPUs",
    );
}

#[test]
fn seccomp_off_runs_every_thread_unfiltered() {
    let run = section("unfiltered");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["up", "done"], "");
    let all = threads(&run);
    run.check(
        !all.is_empty() && all.iter().all(|(_, mode)| mode == "0"),
        &format!("with --seccomp off no thread should be filtered: {all:?}"),
    );
}

#[test]
fn blocked_syscall_is_reported_by_name_and_thread() {
    let run = section("selftest");
    let stderr = run.stderr();
    run.check(
        stderr.contains(SELFTEST_REPORT),
        &format!("rvmm should report the blocked syscall as\n{SELFTEST_REPORT}\nstderr:\n{stderr}"),
    );
    run.check(
        !stderr.contains("Bad system call"),
        "the report must replace the shell's bare 'Bad system call'",
    );
}

#[test]
fn blocked_syscall_ends_rvmm_with_exit_code_1() {
    let run = section("selftest");
    let exit = run.rvmm_exit();
    run.check(
        exit == 1,
        &format!("rvmm exited with {exit} after a blocked syscall, not 1"),
    );
}

#[test]
fn log_mode_lets_the_forbidden_syscall_through() {
    let run = section("selftest_log");
    assert_clean_poweroff(&run, run.rvmm_exit(), &["up", "done"], "");
    run.check(
        !run.contains("seccomp blocked"),
        "--seccomp log must not end rvmm on a syscall outside the filter",
    );
}
