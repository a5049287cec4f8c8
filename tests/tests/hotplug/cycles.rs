//! The `hotplug_cycles` run: `CYCLES` add/remove cycles of one NVMe drive (surprise removal,
//! every `GRACEFUL_EVERY`th graceful) leave rvmm holding what it held before, and the guest still
//! takes the drive on the add after them.

use super::*;

fn cycles() -> Section<'static> {
    cycles_run().section("cycles")
}

/// The `name=` number of the `HOST cycles` marker.
fn cycles_field(run: &Section<'_>, name: &str) -> u64 {
    let marker = run.expect_host("cycles");
    match marker.field(name).and_then(|value| value.parse().ok()) {
        Some(value) => value,
        None => run.fail(&format!(
            "'HOST cycles {}' has no number {name}=",
            marker.value
        )),
    }
}

#[test]
fn every_call_of_a_hundred_add_remove_cycles_succeeds() {
    let run = cycles();

    let done = cycles_field(&run, "done");
    let failed = cycles_field(&run, "failed");

    let failures: Vec<&str> = run.host_all("cycle_fail").iter().map(|m| m.value).collect();
    run.check(
        done == CYCLES && failed == 0,
        &format!("{failed} of the calls of {done} cycles failed: {failures:?}"),
    );
}

#[test]
fn graceful_removals_among_the_cycles_end_guest_ejected_and_the_others_surprise() {
    let run = cycles();

    let ejected = cycles_field(&run, "guest_ejected");
    let surprise = cycles_field(&run, "surprise");

    let graceful = CYCLES / GRACEFUL_EVERY;
    run.check(
        ejected == graceful && surprise == CYCLES - graceful,
        &format!(
            "{ejected} removals ended guest-ejected and {surprise} surprise, not {graceful} and {}",
            CYCLES - graceful
        ),
    );
}

#[test]
fn resources_and_root_ports_in_info_are_the_same_after_a_hundred_cycles() {
    let run = cycles();

    let before = footprint(ctl_ok(&run, "info_before"));
    let after = footprint(ctl_ok(&run, "info_after"));

    run.check(
        before.iter().all(|(_, value)| value.is_some()),
        &format!("info before the cycles lacks a figure: {before:?}"),
    );
    run.check(
        before == after,
        &format!("info before the cycles: {before:?}; after: {after:?}"),
    );
}

#[test]
fn rvmm_process_has_as_many_open_fds_after_a_hundred_cycles() {
    let run = cycles();

    let fds = run.host_all("rvmm_fds");
    let count = |label: &str| {
        fds.iter()
            .find(|marker| marker.word(0) == Some(label))
            .and_then(|marker| marker.word(1))
            .and_then(|count| count.parse::<u64>().ok())
    };

    let (before, after) = (count("before"), count("after"));
    run.check(
        before.is_some() && before == after,
        &format!("rvmm had {before:?} fds open before the cycles and {after:?} after"),
    );
}

#[test]
fn guest_takes_the_drive_on_the_add_after_a_hundred_cycles() {
    let run = cycles();

    let answer = ctl_ok(&run, "last_add");
    let markers = between(&run, "last_add", "end");

    run.check(
        json_value(answer, "state") == Some("present"),
        &format!("the add after the cycles did not answer present: {answer}"),
    );
    let added = markers
        .iter()
        .rposition(|marker| marker.source == Source::Guest && marker.key == "block-added");
    let removed = markers
        .iter()
        .rposition(|marker| marker.source == Source::Guest && marker.key == "block-removed");
    run.check(
        added.is_some() && removed < added,
        "the guest does not have the drive's namespace after the add that followed the cycles",
    );
}

#[test]
fn guest_kernel_logs_no_oops_or_warning_in_a_hundred_cycles() {
    assert_no_kernel_problems(&cycles());
}

#[test]
fn vm_powers_off_cleanly_after_a_hundred_cycles() {
    assert_clean_stop(&cycles());
}
