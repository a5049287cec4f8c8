//! The test host itself: everything rvmm's integration tests rely on is there. No rvmm involved:
//! when these fail, the environment is broken, not the VMM.

use std::collections::HashSet;
use std::time::Duration;

use rvmm_tests::{Marker, RunEnd, SharedRun, TestHost, TestHostOutput};

const NVME_ID: &str = "1b36:0010";
const IGB_PF_ID: &str = "8086:10c9";
const IGB_VF_ID: &str = "8086:10ca";

const SCENARIO: &str = r#"
if grep -q '^kvm_amd ' /proc/modules; then hmark kvm_amd loaded; else hmark kvm_amd missing; fi
nvme=$(pci_find 1b36:0010)
igb=$(pci_find 8086:10c9)
hmark nvme_device "${nvme:-none}"
hmark igb_device "${igb:-none}"
# The host nvme driver exposes the namespace before the device is handed to VFIO.
for _ in $(seq 50); do [ -b /dev/nvme0n1 ] && break; sleep 0.2; done
if [ -b /dev/nvme0n1 ]; then hmark host_block nvme0n1; else hmark host_block none; fi
[ -n "$nvme" ] && vfio_bind "$nvme"
if [ -n "$igb" ]; then
  sriov_enable "$igb" 2
  for vf in $(pci_find 8086:10ca); do vfio_bind "$vf"; done
fi
hmark vfio_nodes "$(ls /dev/vfio | tr '\n' ' ')"
"#;

static RUN: SharedRun = SharedRun::new();

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("testhost")
                .nvme_drives(1)
                .igb(true)
                .scenario(SCENARIO)
        },
        Duration::from_secs(300),
    )
}

/// The `HOST pci` marker of the device with `id` (vendor:device), failing loudly if absent.
fn pci_device(output: &'static TestHostOutput, id: &str) -> Marker<'static> {
    let device = output
        .all()
        .host_all("pci")
        .into_iter()
        .find(|marker| marker.word(1) == Some(id));
    match device {
        Some(marker) => marker,
        None => output
            .all()
            .fail(&format!("no PCI device {id} in the test host")),
    }
}

#[test]
fn test_host_powers_off_after_its_scenario() {
    let output = run();

    output.all().check(
        output.host("scenario_exit").is_some() && output.host("poweroff").is_some(),
        "the test host did not finish its scenario and power off",
    );
}

#[test]
fn kvm_amd_provides_dev_kvm_in_the_test_host() {
    let all = run().all();

    assert_eq!(all.expect_host("svm").value, "yes", "{}", all.context());
    assert_eq!(
        all.expect_host("kvm_amd").value,
        "loaded",
        "{}",
        all.context()
    );
    assert_eq!(all.expect_host("kvm").value, "ok", "{}", all.context());
}

#[test]
fn vfio_stack_is_loaded() {
    let all = run().all();

    assert_eq!(all.expect_host("vfio").value, "ok", "{}", all.context());
    all.check(
        all.host_all("modprobe_failed").is_empty(),
        "a test host module failed to load",
    );
}

#[test]
fn every_emulated_device_has_its_own_iommu_group() {
    let output = run();
    let all = output.all();
    let nvme = pci_device(output, NVME_ID);
    let igb = pci_device(output, IGB_PF_ID);

    let nvme_group = nvme.field("iommu_group");
    let igb_group = igb.field("iommu_group");

    all.check(
        nvme_group.is_some_and(|group| group != "none"),
        "the NVMe device has no IOMMU group",
    );
    all.check(
        igb_group.is_some_and(|group| group != "none"),
        "the igb device has no IOMMU group",
    );
    all.check(nvme_group != igb_group, "NVMe and igb share an IOMMU group");
    all.check(
        all.expect_host_u64("iommu_groups") >= 4,
        "fewer IOMMU groups than devices",
    );
}

#[test]
fn emulated_nvme_is_driven_by_the_host_nvme_driver() {
    let output = run();
    let nvme = pci_device(output, NVME_ID);

    assert_eq!(nvme.field("driver"), Some("nvme"), "{}", output.context());
    assert_eq!(
        output.expect_host("host_block").value,
        "nvme0n1",
        "{}",
        output.context()
    );
}

#[test]
fn emulated_nvme_binds_to_vfio_pci() {
    let output = run();
    let all = output.all();
    let bdf = output.expect_host("nvme_device").value;

    let bind = all
        .host_all("vfio_bind")
        .into_iter()
        .find(|marker| marker.word(0) == Some(bdf));

    all.check(
        bind.is_some_and(|marker| marker.word(1) == Some("ok")),
        &format!("the NVMe device {bdf} did not bind to vfio-pci"),
    );
}

#[test]
fn igb_is_driven_by_the_igb_driver() {
    let output = run();
    let igb = pci_device(output, IGB_PF_ID);

    assert_eq!(igb.field("driver"), Some("igb"), "{}", output.context());
}

#[test]
fn sriov_numvfs_creates_two_vfs() {
    let output = run();
    let all = output.all();

    let sriov = all.expect_host("sriov");

    assert_eq!(sriov.field("numvfs"), Some("2"), "{}", all.context());
    assert_eq!(sriov.field("totalvfs"), Some("7"), "{}", all.context());
    let vfs = all.host_all("vf");
    all.check(vfs.len() == 2, "not exactly two 'HOST vf' markers");
    all.check(
        vfs.iter().all(|vf| vf.word(2) == Some(IGB_VF_ID)),
        "a VF is not an 82576 VF (8086:10ca)",
    );
}

#[test]
fn vfs_have_their_own_iommu_groups() {
    let output = run();
    let all = output.all();
    let pf_group = pci_device(output, IGB_PF_ID).field("iommu_group");

    let groups: Vec<Option<&str>> = all
        .host_all("vf")
        .iter()
        .map(|vf| vf.field("iommu_group"))
        .collect();

    all.check(groups.len() == 2, "not exactly two VFs");
    all.check(
        groups
            .iter()
            .all(|group| group.is_some_and(|group| group != "none")),
        "a VF has no IOMMU group",
    );
    let distinct: HashSet<Option<&str>> = groups.iter().copied().collect();
    all.check(distinct.len() == groups.len(), "VFs share an IOMMU group");
    all.check(
        !distinct.contains(&pf_group),
        "a VF shares the PF's IOMMU group",
    );
}

#[test]
fn vfs_bind_to_vfio_pci() {
    let output = run();
    let all = output.all();

    for vf in all.host_all("vf") {
        // HOST vf <pf> <vf> <vendor:device> ...
        let bdf = vf.word(1);
        let bound = all
            .host_all("vfio_bind")
            .into_iter()
            .any(|marker| marker.word(0) == bdf && marker.word(1) == Some("ok"));
        all.check(bound, &format!("VF {} did not bind to vfio-pci", vf.value));
    }
    all.check(!all.host_all("vf").is_empty(), "no VFs to bind");
}

/// Stops the heartbeat (the process writing to the second serial port) as a frozen test host's
/// would stop, then waits far beyond the watcher's 30 s.
const STALLED_HEARTBEAT: &str = r#"
for proc in /proc/[0-9]*; do
  [ "$(readlink "$proc/fd/1" 2>/dev/null)" = /dev/ttyS1 ] && kill -STOP "${proc#/proc/}"
done
hmark heartbeat stopped
sleep 200
hmark heartbeat outlived
"#;

#[test]
fn a_test_host_whose_heartbeat_stops_is_ended_early_as_frozen_with_its_state() {
    let output = TestHost::new("testhost_stalled")
        .nvme_drives(0)
        .igb(false)
        .needs_rvmm(false)
        .scenario(STALLED_HEARTBEAT)
        .run(Duration::from_secs(300));
    let all = output.all();

    all.check(
        output.end() == RunEnd::Froze,
        "the watcher did not end the test host as frozen",
    );
    all.check(
        all.host("heartbeat").is_some_and(|m| m.value == "stopped"),
        "the scenario did not stop the heartbeat",
    );
    all.check(
        !all.contains("HOST heartbeat outlived"),
        "the test host ran on past its stopped heartbeat",
    );
    all.check(
        all.contains("its heartbeat stopped") && all.contains("dumping local APIC state"),
        "the console log lacks the watcher's report (why, the CPU state)",
    );
}
