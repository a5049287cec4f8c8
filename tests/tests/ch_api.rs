//! Cloud Hypervisor's REST API on a real guest: an rvmm started with only an API socket
//! (`rvmm run --api-socket PATH`, no VM) driven through `/api/v1/...` alone, with request bodies
//! as that API's clients send them (every field of its OpenAPI document at its default value
//! where rvmm has no value of its own). One test host run, one rvmm process:
//!
//! ping; info without a VM (404); create (the guest's `monitor` scenario, an NVMe drive bound to
//! vfio-pci on the test host for later); info (`Created`); boot; info (`Running`); add-device of
//! the NVMe drive (`{id, bdf}` once the guest has it) and a pattern written and read back by the
//! guest; info with the device; remove-device (204 once released) and the guest's view of it;
//! counters; shutdown; info (`Shutdown`); delete; info (404); creates refused with 400 naming the
//! field (a disk, a net, a vsock, a device with `iommu: true`, `max_vcpus` above
//! `boot_vcpus`); create again, add the drive before boot (that API's cold add, 204) and boot a
//! second guest in the same process, which finds the drive at start and does I/O on it;
//! vmm.shutdown (rvmm exits 0).
//!
//! The test host has no HTTP client for unix sockets (busybox `nc` has no `-U`), so the requests
//! go through `rvmm ctl raw METHOD PATH [BODY]`, which sends them as given and prints the
//! status and the body (`HOST ctl_out LABEL HTTP <status> <body>`).

use std::time::Duration;

use rvmm_tests::{token, Section, SharedRun, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// `vm.create`'s body: the guest's kernel, initramfs and command line from the test host's
/// variables, `$DEVICES` and `$EXTRA` (top-level fields, each with a leading comma) from the
/// scenario.
const CREATE_BODY: &str = r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": false, "max_phys_bits": 46, "nested": true, "core_scheduling": "Vm"}, "memory": {"size": 536870912, "mergeable": false, "hotplug_method": "Acpi", "shared": false, "hugepages": false, "prefault": false, "reserve": false, "thp": true}, "payload": {"kernel": "%s", "initramfs": "%s", "cmdline": "%s"}, "rng": {"src": "/dev/urandom", "iommu": false}, "serial": {"mode": "Tty"}, "console": {"mode": "Off", "iommu": false}, "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false, "platform": {"num_pci_segments": 1, "tdx": false, "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true}%s}"#;

fn scenario() -> String {
    let pattern = format!("rvmm.pattern={}", token());
    format!(
        r#"NVME=$(pci_find 1b36:0010 | sed -n 1p)
hmark nvme_device "$NVME"
vfio_bind "$NVME"
SOCK=$(api_socket chapi)
# create_body CMDLINE EXTRA: vm.create's body for the test guest.
create_body() {{
  printf '{CREATE_BODY}' "$GUEST_BZIMAGE" "$GUEST_INITRAMFS" "$1" "$2"
}}
# ch LABEL METHOD PATH [BODY]: one request of Cloud Hypervisor's API.
ch() {{
  local label="$1" method="$2" path="$3"
  shift 3
  rvmm_ctl chapi "$label" raw "$method" "/api/v1/$path" "$@"
}}
CMDLINE=$(guest_cmdline monitor rvmm.hold=300 rvmm.io=pattern {pattern})
DEVICE="{{\"path\": \"/sys/bus/pci/devices/$NVME\", \"id\": \"disk0\", \"iommu\": false, \"pci_segment\": 0}}"
RVMM_TIMEOUT=500
rvmm_start_lines chapi run --api-socket "$SOCK"
deadline=$(($(uptime_ms) + 30000))
until [ -S "$SOCK" ] || [ "$(uptime_ms)" -gt "$deadline" ]; do sleep 0.1; done
ch ping GET vmm.ping
ch info_empty GET vm.info
ch create PUT vm.create "$(create_body "$CMDLINE" '')"
ch info_created GET vm.info
ch boot PUT vm.boot
if rvmm_wait_output chapi 'GUEST monitor ready' 120; then
  ch info_running GET vm.info
  ch add PUT vm.add-device "$DEVICE"
  rvmm_wait_more chapi 'GUEST nvme_pattern ' 0 60
  ch info_added GET vm.info
  ch remove PUT vm.remove-device '{{"id": "disk0"}}'
  rvmm_wait_more chapi 'GUEST block-removed' 0 30
  ch info_removed GET vm.info
  ch counters GET vm.counters
fi
ch shutdown PUT vm.shutdown
ch info_shutdown GET vm.info
ch delete PUT vm.delete
ch info_deleted GET vm.info
ch refused_disks PUT vm.create "$(create_body "$CMDLINE" ', "disks": [{{"path": "/tmp/disk.img", "readonly": false}}]')"
ch refused_net PUT vm.create "$(create_body "$CMDLINE" ', "net": [{{"tap": "tap0"}}]')"
ch refused_vsock PUT vm.create "$(create_body "$CMDLINE" ', "vsock": {{"cid": 3, "socket": "/tmp/vsock"}}')"
ch refused_iommu PUT vm.create "$(create_body "$CMDLINE" ", \"devices\": [{{\"path\": \"/sys/bus/pci/devices/$NVME\", \"iommu\": true}}]")"
ch refused_max_vcpus PUT vm.create "$(create_body "$CMDLINE" '' | sed 's/"max_vcpus": 2/"max_vcpus": 4/')"
ch info_after_refusals GET vm.info
ch create_again PUT vm.create "$(create_body "$CMDLINE" '')"
ch cold_add PUT vm.add-device "{{\"path\": \"/sys/bus/pci/devices/$NVME\", \"id\": \"cold0\"}}"
ch info_cold GET vm.info
ch boot_again PUT vm.boot
if rvmm_wait_more chapi 'GUEST monitor ready' 1 120; then
  rvmm_wait_more chapi 'GUEST nvme_pattern ' 1 60
  ch info_again GET vm.info
fi
ch vmm_shutdown PUT vmm.shutdown
rvmm_wait_lines chapi
"#
    )
}

fn output() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("ch_api")
                .nvme_drives(1)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(900),
    )
}

/// The answer of request `label`: its status and body.
#[track_caller]
fn answer(run: &Section<'_>, label: &str) -> (u16, serde_json::Value) {
    let out = run
        .host_all("ctl_out")
        .into_iter()
        .find(|m| m.word(0) == Some(label))
        .unwrap_or_else(|| run.fail(&format!("no answer to {label}")));
    let rest = out.value.strip_prefix(label).unwrap_or_default().trim();
    let rest = rest
        .strip_prefix("HTTP ")
        .unwrap_or_else(|| run.fail(&format!("{label}: not an HTTP answer: {rest}")));
    let (status, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = status
        .parse()
        .unwrap_or_else(|_| run.fail(&format!("{label}: bad status {status}")));
    let body = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body)
            .unwrap_or_else(|e| run.fail(&format!("{label}: body is no JSON: {e}")))
    };
    (status, body)
}

#[track_caller]
fn assert_status(label: &str, status: u16) -> serde_json::Value {
    let run = output().section("chapi");
    let (got, body) = answer(&run, label);
    run.check(
        got == status,
        &format!("{label} answered {got}, expected {status}: {body}"),
    );
    body
}

#[test]
fn ping_answers_the_version_and_pid() {
    let body = assert_status("ping", 200);
    let run = output().section("chapi");
    run.check(
        body["version"].as_str() == Some(env!("CARGO_PKG_VERSION")),
        &format!("ping's version: {body}"),
    );
    let pid = run.expect_host("rvmm_pid");
    run.check(
        body["pid"].as_u64().map(|p| p.to_string()).as_deref() == pid.word(0),
        "ping's pid is not rvmm's",
    );
}

#[test]
fn without_a_vm_info_is_404() {
    assert_status("info_empty", 404);
    assert_status("info_deleted", 404);
}

#[test]
fn create_then_boot_run_the_guest() {
    assert!(assert_status("create", 204).is_null());
    let created = assert_status("info_created", 200);
    let run = output().section("chapi");
    run.check(created["state"] == "Created", &format!("{created}"));
    run.check(
        created["config"]["cpus"]["boot_vcpus"] == 2
            && created["config"]["memory"]["size"] == 536_870_912u64,
        &format!("info's config: {created}"),
    );
    assert_status("boot", 204);
    let running = assert_status("info_running", 200);
    run.check(running["state"] == "Running", &format!("{running}"));
    run.check(
        run.contains("GUEST monitor ready"),
        "the guest did not come up",
    );
}

#[test]
fn add_device_answers_id_and_bdf_and_the_guest_does_io_on_it() {
    let added = assert_status("add", 200);
    let run = output().section("chapi");
    run.check(
        added["id"] == "disk0"
            && added["bdf"]
                .as_str()
                .is_some_and(|b| b.starts_with("0000:")),
        &format!("add-device's answer: {added}"),
    );
    let pattern = run
        .guest_all("nvme_pattern")
        .into_iter()
        .any(|m| m.word(1) == Some("ok"));
    run.check(pattern, "the guest did not write and read back its pattern");
    let info = assert_status("info_added", 200);
    run.check(
        info["device_tree"]["disk0"]["pci_bdf"] == added["bdf"],
        &format!("info's device tree lacks disk0: {info}"),
    );
    run.check(
        info["config"]["devices"][0]["id"] == "disk0",
        &format!("info's config lacks disk0: {info}"),
    );
}

#[test]
fn remove_device_answers_204_once_the_device_is_gone() {
    assert!(assert_status("remove", 204).is_null());
    let run = output().section("chapi");
    run.check(
        run.contains("GUEST block-removed"),
        "the guest did not see the drive go",
    );
    let info = assert_status("info_removed", 200);
    run.check(
        info["device_tree"]
            .as_object()
            .is_some_and(|t| t.is_empty()),
        &format!("the device is still in info: {info}"),
    );
}

#[test]
fn counters_come_in_named_groups() {
    let counters = assert_status("counters", 200);
    let run = output().section("chapi");
    run.check(
        counters["vm"]["uptime_ms"].as_u64().is_some_and(|u| u > 0)
            && counters["vcpu0"].is_object(),
        &format!("counters: {counters}"),
    );
}

#[test]
fn shutdown_then_delete_forget_the_vm() {
    assert_status("shutdown", 204);
    let info = assert_status("info_shutdown", 200);
    let run = output().section("chapi");
    run.check(info["state"] == "Shutdown", &format!("{info}"));
    assert_status("delete", 204);
}

#[test]
fn unsupported_fields_are_refused_by_name() {
    for (label, field) in [
        ("refused_disks", "disks"),
        ("refused_net", "net"),
        ("refused_vsock", "vsock"),
        ("refused_iommu", "devices[0].iommu"),
        ("refused_max_vcpus", "cpus.max_vcpus"),
    ] {
        let body = assert_status(label, 400);
        let run = output().section("chapi");
        run.check(
            body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with(&format!("{field}:"))),
            &format!("{label} does not name {field}: {body}"),
        );
    }
    assert_status("info_after_refusals", 404);
}

#[test]
fn a_new_vm_boots_in_the_same_process_after_delete() {
    assert_status("create_again", 204);
    assert_status("boot_again", 204);
    let info = assert_status("info_again", 200);
    let run = output().section("chapi");
    run.check(info["state"] == "Running", &format!("{info}"));
    let pids = run.host_all("rvmm_pid");
    run.check(pids.len() == 1, "rvmm was started more than once");
}

#[test]
fn a_device_added_between_create_and_boot_is_there_when_the_guest_starts() {
    assert!(assert_status("cold_add", 204).is_null());
    let created = assert_status("info_cold", 200);
    let run = output().section("chapi");
    run.check(
        created["state"] == "Created" && created["device_tree"]["cold0"].is_object(),
        &format!("info before boot lacks cold0: {created}"),
    );
    let info = assert_status("info_again", 200);
    run.check(
        info["device_tree"]["cold0"]["pci_bdf"].is_string(),
        &format!("the booted VM lacks cold0: {info}"),
    );
    let patterns = run
        .guest_all("nvme_pattern")
        .into_iter()
        .filter(|m| m.word(1) == Some("ok"))
        .count();
    run.check(
        patterns == 2,
        &format!("the second guest did no I/O on the cold-added drive ({patterns} patterns ok)"),
    );
}

#[test]
fn vmm_shutdown_ends_rvmm_with_exit_0() {
    assert_status("vmm_shutdown", 204);
    let run = output().section("chapi");
    run.check(
        run.rvmm_exit() == 0,
        "rvmm did not exit 0 after vmm.shutdown",
    );
}
