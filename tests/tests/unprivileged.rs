//! An unprivileged rvmm given its devices by a privileged control plane: rvmm runs as `nobody`,
//! which may not open `/dev/vfio/<group>`; root opens the group and hands the descriptor over —
//! inherited for a boot device (`--device path=BDF,group-fd=5`), sent over the API socket for a
//! hot-add (`rvmm ctl add-device path=BDF,group-fd=6`, as `SCM_RIGHTS` data). Two NVMe drives in
//! two IOMMU groups. First two quick runs that must fail (a descriptor number that is not open, a
//! descriptor of the other drive's group), then the VM (`unpriv`): boot drive, hot-add and removal
//! of the second drive, a hot-add without a descriptor.

use std::time::Duration;

use rvmm_tests::{GuestRun, Section, SharedRun, Source, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// rvmm's arguments for a guest running the hotplug monitor with an API socket.
fn guest_args(name: &str) -> String {
    GuestRun::new(name)
        .cpus(2)
        .memory("size=512M")
        .root_ports(4)
        .guest_scenario("monitor", &["rvmm.hold=200"])
        .arg("--api-socket")
        .arg(&format!("/tmp/rvmm-{name}.sock"))
        .rvmm_args()
}

fn scenario() -> String {
    let quick = guest_args("quick");
    let vm = guest_args("unpriv");
    format!(
        r#"NVME1=$(pci_find 1b36:0010 | sed -n 1p)
NVME2=$(pci_find 1b36:0010 | sed -n 2p)
vfio_bind "$NVME1"
vfio_bind "$NVME2"
G1=$(iommu_group_of "/sys/bus/pci/devices/$NVME1")
G2=$(iommu_group_of "/sys/bus/pci/devices/$NVME2")
hmark groups "$G1" "$G2"
# The guests' stdin, opened in this shell before the subshell below uses it.
rvmm_stdin
# What the control plane grants the VMM user: KVM and locked memory, not the VFIO groups.
chmod 0666 /dev/kvm
ulimit -l unlimited
if su -s /bin/sh -c "exec 3<>/dev/vfio/$G1" nobody 2>/dev/null; then
  hmark nobody_open allowed
else
  hmark nobody_open denied
fi
(
  RVMM_AS_USER=nobody
  rvmm_capture closed_fd {quick} --device "path=$NVME1,group-fd=42"
  rvmm_capture wrong_group {quick} --device "path=$NVME1,group-fd=5" 5<>"/dev/vfio/$G2"
)
RVMM_TIMEOUT=230
RVMM_AS_USER=nobody
RVMM_FD5="/dev/vfio/$G1"
rvmm_start_lines unpriv {vm} --device "path=$NVME1,id=boot0,group-fd=5"
RVMM_AS_USER=
RVMM_FD5=
ctl_events unpriv
if rvmm_wait_output unpriv 'GUEST monitor ready' 120; then
  rvmm_wait_more unpriv 'GUEST block-added' 0 30
  hmark step hot_add
  rvmm_ctl unpriv hot_add add-device "path=$NVME2,id=hot0,group-fd=6" 6<>"/dev/vfio/$G2"
  rvmm_wait_more unpriv 'GUEST block-added' 1 30
  rvmm_ctl unpriv info info
  hmark step remove
  rvmm_ctl unpriv remove remove-device hot0
  rvmm_wait_more unpriv 'GUEST block-removed' 0 30
  if (exec 7<>"/dev/vfio/$G2") 2>/dev/null; then hmark group_reopen ok; else hmark group_reopen busy; fi
  hmark step no_fd
  rvmm_ctl unpriv no_fd add-device "path=$NVME2,id=hot1"
  rvmm_ctl unpriv info_after info
  hmark step end
fi
rvmm_stop_monitor unpriv
"#
    )
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("unprivileged")
                .nvme_drives(2)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(420),
    )
}

/// The `HOST ctl LABEL rc=N` exit status and the `HOST ctl_out`/`ctl_err` text of one call.
fn ctl(section: &Section<'_>, label: &str) -> (Option<u64>, String) {
    let rc = section
        .host_all("ctl")
        .into_iter()
        .find(|m| m.word(0) == Some(label))
        .and_then(|m| m.field("rc"))
        .and_then(|rc| rc.parse().ok());
    let text: Vec<&str> = section
        .markers()
        .filter(|m| {
            m.source == Source::Host
                && (m.key == "ctl_out" || m.key == "ctl_err")
                && m.word(0) == Some(label)
        })
        .map(|m| m.value)
        .collect();
    (rc, text.join("\n"))
}

#[test]
fn nobody_cannot_open_the_vfio_group_itself() {
    let all = run().all();
    let marker = all.expect_host("nobody_open");
    all.check(
        marker.word(0) == Some("denied"),
        "nobody could open /dev/vfio/<group>: the test would not show that rvmm uses the \
         descriptor it was given",
    );
}

#[test]
fn boot_device_from_an_inherited_group_descriptor_reaches_the_guest() {
    let run = run().section("unpriv");
    let user = run.expect_host("rvmm_user");
    run.check(user.word(0) == Some("nobody"), "rvmm did not run as nobody");
    let markers: Vec<_> = run.markers().collect();
    let boot_block = markers
        .iter()
        .position(|m| m.source == Source::Guest && m.key == "block-added");
    let hot_add = markers
        .iter()
        .position(|m| m.source == Source::Host && m.key == "step" && m.value == "hot_add");
    run.check(
        boot_block.is_some() && (hot_add.is_none() || boot_block < hot_add),
        "the guest had no block device before the hot-add: the boot drive did not reach it",
    );
}

#[test]
fn hot_add_with_the_descriptor_sent_over_the_api_reaches_the_guest() {
    let run = run().section("unpriv");
    let (rc, text) = ctl(&run, "hot_add");
    run.check(rc == Some(0), &format!("the hot-add failed: {text}"));
    run.check(
        run.guest_all("block-added").len() >= 2,
        "the guest did not get a second block device after the hot-add",
    );
    let (_, info) = ctl(&run, "info");
    run.check(
        info.contains("\"hot0\"") && info.contains("\"boot0\""),
        &format!("info does not list boot0 and hot0: {info}"),
    );
}

#[test]
fn removal_closes_the_group_so_the_host_can_open_it_again() {
    let run = run().section("unpriv");
    let (rc, text) = ctl(&run, "remove");
    run.check(rc == Some(0), &format!("the removal failed: {text}"));
    run.check(
        run.expect_host("group_reopen").word(0) == Some("ok"),
        "rvmm still holds the second drive's VFIO group after removing it",
    );
}

#[test]
fn hot_add_without_a_descriptor_names_the_permission_fix_and_changes_nothing() {
    let run = run().section("unpriv");
    let (rc, text) = ctl(&run, "no_fd");
    run.check(
        rc.is_some_and(|rc| rc != 0) && text.contains("no permission to open /dev/vfio/"),
        &format!("a hot-add rvmm cannot open should fail naming the permission: {text}"),
    );
    let (_, before) = ctl(&run, "info");
    let (_, after) = ctl(&run, "info_after");
    run.check(
        !after.contains("\"hot1\"") && after.contains("\"boot0\"") && !before.is_empty(),
        &format!("info after the refused add: {after}"),
    );
}

#[test]
fn group_descriptor_number_that_is_not_open_is_refused_clearly() {
    let run = run().section("closed_fd");
    run.check(
        run.rvmm_exit() == 1
            && run
                .stderr()
                .contains("group-fd=42: rvmm has no descriptor 42 open"),
        &format!("rvmm should exit 1 naming descriptor 42: {}", run.stderr()),
    );
}

#[test]
fn descriptor_of_another_group_is_refused_naming_both_groups() {
    let output = run();
    let groups = output.all().expect_host("groups");
    let run = output.section("wrong_group");
    let stderr = run.stderr();
    let (g1, g2) = (groups.word(0).unwrap_or("?"), groups.word(1).unwrap_or("?"));
    run.check(
        run.rvmm_exit() == 1 && stderr.contains(g1) && stderr.contains(g2),
        &format!("rvmm should exit 1 naming groups {g1} and {g2}: {stderr}"),
    );
}

#[test]
fn unprivileged_vm_powers_off_cleanly() {
    let run = run().section("unpriv");
    run.check(
        run.rvmm_exit() == 0 && run.guest("done").is_some(),
        &format!(
            "rvmm exited {} (guest done: {})",
            run.rvmm_exit(),
            run.guest("done").is_some()
        ),
    );
}
