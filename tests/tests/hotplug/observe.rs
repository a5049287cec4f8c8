//! The `host_remove` run of `hotplug_nvme` seen through rvmm's own reports: its event log
//! (`--event-log`) against an events client, its counters (`rvmm ctl counters`) around the
//! guest's reads of the drive and after the host took the drive back twice, and its log file
//! (`--log-level info --log-file`).

use super::*;

fn host_remove() -> Section<'static> {
    nvme_run().section("host_remove")
}

/// The event log and rvmm's log file, printed after the `host_remove` run ended.
fn files() -> Section<'static> {
    nvme_run().section("host_remove_files")
}

/// Every line of the event log, in order (printed after rvmm's end).
fn event_log() -> Vec<&'static str> {
    let run = files();
    let lines: Vec<&str> = run
        .host_all("event_log")
        .into_iter()
        .map(|marker| marker.value)
        .collect();
    let count = run.expect_host_u64("event_log_lines");
    run.check(
        lines.len() as u64 == count,
        &format!(
            "{} event log lines reached the console, the file has {count}",
            lines.len()
        ),
    );
    lines
}

/// `event id reason` of an event line (missing parts empty).
fn summary(json: &str) -> String {
    [
        json_value(json, "event"),
        json_value(json, "id"),
        json_value(json, "reason"),
    ]
    .map(|v| v.unwrap_or(""))
    .join(" ")
    .trim_end()
    .to_owned()
}

/// The part of `json` from `"key": [` to its matching `]` (no nested arrays inside).
fn array<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\": [");
    let start = json.find(&pattern)? + pattern.len();
    let rest = json.get(start..)?;
    rest.get(..rest.find(']')?)
}

/// The sum of every number that follows `"key": ` in `json`.
fn sum_of(json: &str, key: &str) -> u64 {
    let pattern = format!("\"{key}\":");
    json.match_indices(&pattern)
        .filter_map(|(at, _)| json_u64(json.get(at..)?, key))
        .sum()
}

/// All KVM exits of all vCPUs in a counters answer.
fn total_exits(counters: &str) -> u64 {
    let mut total = 0;
    let mut rest = counters;
    while let Some(at) = rest.find("\"exits\": {") {
        let object = &rest[at..];
        let end = object.find('}').unwrap_or(object.len());
        total += object[..end]
            .split(',')
            .filter_map(|field| field.rsplit(':').next()?.trim().parse::<u64>().ok())
            .sum::<u64>();
        rest = &object[end..];
    }
    total
}

#[test]
fn event_log_holds_every_event_of_the_run_in_order() {
    let run = files();

    let log = event_log();

    let events: Vec<String> = log.iter().map(|json| summary(json)).collect();
    let expected = [
        "vm-started",
        "device-added disk0",
        "device-removed disk0 host-request",
        "device-added disk0",
        "device-removed disk0 host-request",
        "device-added disk0",
        "vm-shutdown  power-off",
    ];
    run.check(
        events == expected,
        &format!("the event log holds {events:?}, not {expected:?}"),
    );
    let stamps: Vec<u64> = log
        .iter()
        .filter_map(|json| json_u64(json, "timestamp_ms"))
        .collect();
    run.check(
        stamps.len() == log.len() && stamps.windows(2).all(|w| w[0] <= w[1]),
        &format!("event log timestamps missing or out of order: {stamps:?}"),
    );
}

#[test]
fn event_log_ends_with_exactly_what_an_events_client_connected_early_saw() {
    let run = host_remove();
    let log = event_log();

    let seen: Vec<&str> = run
        .host_all("event")
        .into_iter()
        .map(|marker| marker.value)
        .collect();

    // The client connects once the API socket exists, which may be after the first events:
    // the log has those too, and from there on the same lines byte for byte.
    run.check(
        seen.len() >= 5 && log.ends_with(&seen),
        &format!("the events client saw {seen:?}, the event log holds {log:?}"),
    );
}

#[test]
fn counters_grow_with_guest_reads_of_the_nvme() {
    let run = host_remove();
    let before = ctl_ok(&run, "counters_io1");
    let after = ctl_ok(&run, "counters_io2");

    let irqs = |json: &str| array(json, "interrupts").map(|a| sum_of(a, "count"));
    let vectors = |json: &str| array(json, "interrupts").map(|a| a.matches("\"msix\"").count());

    run.check(
        vectors(before).is_some_and(|n| n > 0),
        &format!("no MSI-X vector of the drive in the counters: {before}"),
    );
    run.check(
        irqs(after) > irqs(before),
        &format!(
            "the drive's host interrupts did not grow while the guest read it: {:?} then {:?}",
            irqs(before),
            irqs(after)
        ),
    );
    run.check(
        total_exits(after) > total_exits(before) && total_exits(before) > 0,
        &format!(
            "the vCPU exits did not grow while the guest wrote to its console: {} then {}",
            total_exits(before),
            total_exits(after)
        ),
    );
    run.check(
        json_u64(after, "uptime_ms") > json_u64(before, "uptime_ms"),
        &format!("uptime did not grow: {before} then {after}"),
    );
}

#[test]
fn counters_show_the_drive_dma_mapped_and_guest_ram_reserved_and_locked() {
    let run = host_remove();
    let counters = ctl_ok(&run, "counters_io1");
    let memory = 512 << 20;

    run.check(
        json_value(counters, "id") == Some("disk0")
            && json_value(counters, "host_bdf") == Some(host_nvme(nvme_run()))
            && json_u64(counters, "dma_mapped_bytes") == Some(memory),
        &format!("the drive is not shown with all guest RAM DMA-mapped: {counters}"),
    );
    run.check(
        json_u64(counters, "reserved_bytes") == Some(memory)
            && json_u64(counters, "locked_bytes").is_some_and(|l| l >= memory)
            && json_u64(counters, "page_size") == Some(4096)
            && json_u64(counters, "reboots") == Some(0),
        &format!("memory or reboots are not as configured: {counters}"),
    );
}

#[test]
fn counters_count_the_hotplug_operations_done() {
    let run = host_remove();
    let counters = ctl_ok(&run, "counters_end");
    let Some(hotplug) = array(counters, "hotplug") else {
        run.fail(&format!("no hotplug counters: {counters}"));
    };

    let kinds: Vec<(&str, Option<u64>)> = hotplug
        .split('{')
        .filter(|object| object.contains("\"kind\""))
        .map(|object| {
            (
                json_value(object, "kind").unwrap_or(""),
                json_u64(object, "count"),
            )
        })
        .collect();

    // The cold-plugged drive is no hotplug operation; the host took it back twice and it was
    // hot-added twice.
    run.check(
        kinds == [("add", Some(2)), ("host-remove", Some(2))],
        &format!("hotplug counters {kinds:?}: {counters}"),
    );
    run.check(
        json_u64(counters, "written").is_some_and(|n| n >= 6)
            && json_u64(counters, "dropped") == Some(0),
        &format!("the event log counters are not as expected: {counters}"),
    );
}

#[test]
fn log_file_lines_carry_a_timestamp_the_level_and_the_thread() {
    let run = host_remove();
    let lines: Vec<&str> = files()
        .host_all("log_file")
        .into_iter()
        .map(|marker| marker.value)
        .collect();

    let malformed: Vec<&&str> = lines
        .iter()
        .filter(|line| {
            let Some(header) = line.strip_prefix('[').and_then(|l| l.split_once(']')) else {
                return true;
            };
            let words: Vec<&str> = header.0.split_whitespace().collect();
            !(words.len() == 4
                && words[0].len() == 24
                && words[0].ends_with('Z')
                && words[0].get(10..11) == Some("T")
                && ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&words[1]))
        })
        .collect();
    run.check(
        !lines.is_empty() && malformed.is_empty(),
        &format!("log file lines without timestamp, level, thread and module: {malformed:?}"),
    );
    // At info level (the default is warn): the event loop's own report of each removal.
    run.check(
        lines
            .iter()
            .any(|line| line.contains(" INFO  rvmm-vmm ") && line.contains("removed: HostRequest")),
        &format!("no info line of the event loop thread about the removals: {lines:?}"),
    );
    run.check(
        run.host_all("rvmm_log").is_empty(),
        "rvmm logged to stderr although --log-file was given",
    );
}
