//! Reboot in place on a real guest (`--on-reboot restart`, the default): a guest with a
//! cold-plugged NVMe drive reboots itself three times (`rvmm.reboots=3`, scenario `reboot` of
//! `resources/guest/init`; its boot count lives on the drive). On its first boot an igb VF is
//! hot-added from the PF's pool (`add-device vf=PF`), and `info` and `counters` are read; the
//! guest then reboots (`reboot -f`, with the kernel's default reboot method: on this
//! hardware-reduced ACPI machine without EFI it stops every CPU, then jumps to the BIOS reset
//! entry, where rvmm's reset vector writes the ACPI reset register), and every boot must find both
//! devices again; on the last boot `info` is read again before the guest powers off.
//!
//! Asserted: one rvmm process the whole time (the run's pid alive at the last boot), exit 0 at
//! the guest's power-off, `vm-rebooted` three times in the events (reboots 1, 2, 3, nothing
//! rolled back or removed), `counters` reboots 3, the pattern written on the first boot read
//! back on the last, the VF in the same slot at every boot, and `info.resources` at the last
//! boot equal to the first boot's (no fd, memory slot, MSI route or vector leaked).

use std::time::Duration;

use rvmm_tests::{token, GuestRun, Section, SharedRun, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// How often the guest reboots itself.
const REBOOTS: u64 = 3;
/// The VF's MAC address (the lease's policy, kept across reboots).
const VF_MAC: &str = "02:00:00:00:52:01";

fn scenario() -> String {
    let pattern = format!("rvmm.pattern={}", token());
    let reboots = format!("rvmm.reboots={REBOOTS}");
    let args = GuestRun::new("reboot")
        .cpus(2)
        .memory("size=512M")
        .root_ports(4)
        .guest_scenario(
            "reboot",
            // No reboot= option: the guest's own default reboot method, which on rvmm's
            // hardware-reduced ACPI machine ends at the real-mode reset vector.
            &[&pattern, &reboots, "rvmm.wait=60", "rvmm.hold=120"],
        )
        .arg("--device")
        .shell_arg("\"$NVME,id=nvme0\"")
        .arg("--api-socket")
        .arg("/tmp/rvmm-reboot.sock")
        .arg("--on-reboot")
        .arg("restart")
        // Each reboot's steps in the log (HOST rvmm_log lines) to tell where one stopped.
        .arg("--log-level")
        .arg("info")
        .rvmm_args();
    format!(
        r#"NVME=$(pci_find 1b36:0010 | sed -n 1p)
hmark nvme_device "$NVME"
vfio_bind "$NVME"
PF=$(pci_find 8086:10c9 | sed -n 1p)
hmark pf_device "$PF"
sriov_enable "$PF" 1
RVMM_TIMEOUT=720
rvmm_start_lines reboot {args}
ctl_events reboot
if rvmm_wait_output reboot 'GUEST reboot_boot 0' 240; then
  rvmm_ctl reboot vf_add add-device "vf=$PF,id=vf0,mac={VF_MAC}"
  if rvmm_wait_output reboot 'GUEST reboot_ready 0' 120; then
    rvmm_ctl reboot info_first info
    guest_input stop
  fi
  if rvmm_wait_output reboot 'GUEST reboot_ready {REBOOTS}' 420; then
    pid=$(cat /tmp/rvmm-reboot.pid)
    if [ -d "/proc/$pid" ]; then hmark same_process "$pid"; fi
    rvmm_ctl reboot info_last info
    rvmm_ctl reboot counters counters
    guest_input stop
  fi
fi
if ! rvmm_wait_output reboot 'GUEST done' 120; then rvmm_ctl reboot shutdown shutdown; fi
rvmm_wait_lines reboot
"#
    )
}

fn output() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("reboot")
                .nvme_drives(1)
                .igb(true)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(1200),
    )
}

fn run() -> Section<'static> {
    output().section("reboot")
}

/// The answer of `rvmm ctl` call `label` (its `HOST ctl_out` line); fails if the call failed.
#[track_caller]
fn ctl_out<'a>(run: &Section<'a>, label: &str) -> &'a str {
    let status = run
        .host_all("ctl")
        .into_iter()
        .find_map(|m| m.value.strip_prefix(label)?.strip_prefix(' '))
        .unwrap_or_else(|| run.fail(&format!("the scenario never made the ctl call '{label}'")));
    run.check(
        status.starts_with("rc=0 "),
        &format!("rvmm ctl '{label}' failed: {status}"),
    );
    run.host_all("ctl_out")
        .into_iter()
        .find_map(|m| m.value.strip_prefix(label)?.strip_prefix(' '))
        .unwrap_or_else(|| run.fail(&format!("rvmm ctl '{label}' printed nothing")))
}

#[track_caller]
fn json(run: &Section<'_>, text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| run.fail(&format!("not JSON ({e}): {text}")))
}

/// The JSON of every event `rvmm ctl events` printed.
fn events(run: &Section<'_>) -> Vec<serde_json::Value> {
    run.host_all("event")
        .into_iter()
        .filter_map(|m| serde_json::from_str(m.value).ok())
        .collect()
}

#[test]
fn the_guest_reboots_in_the_same_process_and_powers_off_cleanly() {
    let run = run();
    run.check(
        run.host("same_process").is_some(),
        "the rvmm process that started the VM was not running at the last boot",
    );
    let boots = run.guest_all("reboot_boot");
    let counts: Vec<&str> = boots.iter().map(|m| m.value).collect();
    let expected: Vec<String> = (0..=REBOOTS).map(|n| n.to_string()).collect();
    run.check(
        counts == expected,
        &format!("the guest's boots counted {counts:?}, not {expected:?}"),
    );
    run.expect_guest("done");
    let exit = run.rvmm_exit();
    run.check(
        exit == 0,
        &format!("rvmm exited with {exit} after the guest's last power-off, not 0"),
    );
}

#[test]
fn every_reboot_is_an_event_and_counted() {
    let run = run();
    let rebooted: Vec<serde_json::Value> = events(&run)
        .into_iter()
        .filter(|e| e["event"] == "vm-rebooted")
        .collect();
    run.check(
        rebooted.len() as u64 == REBOOTS,
        &format!(
            "{} vm-rebooted events, not {REBOOTS}: {rebooted:?}",
            rebooted.len()
        ),
    );
    for (n, event) in rebooted.iter().enumerate() {
        run.check(
            event["reboots"] == n as u64 + 1
                && event["rolled_back"] == serde_json::json!([])
                && event["removed"] == serde_json::json!([]),
            &format!("vm-rebooted number {} is {event}", n + 1),
        );
    }
    let counters = json(&run, ctl_out(&run, "counters"));
    run.check(
        counters["reboots"] == REBOOTS,
        &format!("counters at the last boot: reboots is not {REBOOTS}: {counters}"),
    );
}

#[test]
fn the_drive_keeps_its_data_and_both_devices_come_back_at_every_boot() {
    let run = run();
    run.check(
        run.guest("nvme_pattern")
            .is_some_and(|m| m.value.ends_with(" ok")),
        "the guest could not write its pattern on the first boot",
    );
    let pattern = run.expect_guest("reboot_pattern");
    run.check(
        pattern.value == "ok",
        &format!(
            "the pattern written before the first reboot was not read back after the last: {}",
            pattern.value
        ),
    );
    let nvme = run.guest_all("reboot_nvme");
    run.check(
        nvme.len() as u64 == REBOOTS + 1,
        &format!(
            "the guest found its NVMe drive on {} of {} boots",
            nvme.len(),
            REBOOTS + 1
        ),
    );
    let vfs: Vec<&str> = run.guest_all("reboot_vf").iter().map(|m| m.value).collect();
    let first = vfs.first().copied().unwrap_or("none");
    run.check(
        vfs.len() as u64 == REBOOTS + 1
            && !first.starts_with("none")
            && vfs.iter().all(|v| *v == first),
        &format!("the hot-added VF at each boot (bdf, interface): {vfs:?}"),
    );
}

#[test]
fn no_resource_is_leaked_by_the_reboots() {
    let run = run();
    let first = json(&run, ctl_out(&run, "info_first"));
    let last = json(&run, ctl_out(&run, "info_last"));
    let mut first_resources = first["resources"].clone();
    let mut last_resources = last["resources"].clone();
    for r in [&mut first_resources, &mut last_resources] {
        // The descriptor limit is no use; everything else must match.
        if let Some(map) = r.as_object_mut() {
            map.remove("fd_limit");
        }
    }
    run.check(
        first_resources.is_object() && first_resources == last_resources,
        &format!(
            "info.resources at the first boot {first_resources} and at the last {last_resources}"
        ),
    );
    let ids = |info: &serde_json::Value| -> Vec<(String, String)> {
        info["devices"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|d| (d["id"].to_string(), d["bdf"].to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    run.check(
        ids(&first).len() == 2 && ids(&first) == ids(&last),
        &format!(
            "devices at the first boot {:?} and at the last {:?}",
            ids(&first),
            ids(&last)
        ),
    );
    let vf = last["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "vf0"))
        .cloned()
        .unwrap_or_default();
    run.check(
        vf["vf"]["mac"] == VF_MAC,
        &format!("the VF lease's MAC after the reboots: {vf}"),
    );
}
