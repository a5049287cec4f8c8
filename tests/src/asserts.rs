//! Assertions that several integration test files make on an rvmm run.

use crate::output::Section;

/// Asserts that rvmm refused the run of `run` (an `rvmm_capture` run) quickly and cleanly: a
/// non-zero exit status below 128 (not 137, the kill after the capture timeout; not another
/// signal), no panic, and a message on stderr. Returns that stderr, for the caller to check what
/// it says.
#[track_caller]
pub fn assert_refused(run: &Section<'_>) -> String {
    let exit = run.rvmm_exit();
    run.check(exit != 0, "rvmm exited with status 0 instead of refusing");
    run.check(exit != 137, "rvmm did not end within 30 s and was killed");
    run.check(
        exit < 128,
        &format!("rvmm died of a signal (exit status {exit}) instead of exiting with an error"),
    );
    let stderr = run.stderr();
    run.check(
        !stderr.contains("panicked"),
        "rvmm panicked instead of reporting an error",
    );
    run.check(!stderr.trim().is_empty(), "rvmm printed nothing on stderr");
    stderr
}

/// Asserts that the guest of `run` printed `GUEST <marker>` for each of `guest_markers`, checked
/// in the order given (`["up", "done"]`: it reached its init and powered off), and that `exit`,
/// the run's exit status (usually `run.rvmm_exit()`), is 0. A non-zero status fails with
/// `rvmm exited with {exit} {after}, not 0`, or `rvmm exited with {exit}, not 0` when `after` is
/// empty.
#[track_caller]
pub fn assert_clean_poweroff(run: &Section<'_>, exit: i64, guest_markers: &[&str], after: &str) {
    for marker in guest_markers {
        run.expect_guest(marker);
    }
    let message = if after.is_empty() {
        format!("rvmm exited with {exit}, not 0")
    } else {
        format!("rvmm exited with {exit} {after}, not 0")
    };
    run.check(exit == 0, &message);
}
