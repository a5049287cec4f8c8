//! rvmm as a library: the `hotplug` example (vmm/examples/hotplug.rs) boots the guest, hot-adds an
//! NVMe through `Vm::handle`, waits for the event, removes it and shuts the VM down — run in the
//! test host against the emulated NVMe. The example's `EXAMPLE ...` lines become `HOST example_...`
//! markers.

use std::time::Duration;

use rvmm_tests::{SharedRun, TestHost, TestHostOutput};

const SCENARIO: &str = r#"
nvme=$(pci_find 1b36:0010)
vfio_bind "$nvme"
if [ -x /bin/rvmm-example-hotplug ]; then
  hmark example present
  /bin/rvmm-example-hotplug "$GUEST_BZIMAGE" "$GUEST_INITRAMFS" "$nvme" \
    "$(guest_cmdline hold rvmm.hold=120)" </dev/null >/tmp/example.out 2>&1
  hmark example_exit $?
  # The guest's console shares the example's stdout: a line of the example can follow a part of
  # a guest line (seen once: the EXAMPLE removed line was lost to a ^ anchor).
  sed -n 's/.*EXAMPLE /HOST example_/p' /tmp/example.out
  grep -E '^(example|rvmm):|ERROR' /tmp/example.out | sed 's/^/HOST example_error /'
else
  hmark example missing
fi
"#;

static RUN: SharedRun = SharedRun::new();

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("embedding")
                .nvme_drives(1)
                .igb(false)
                .needs_rvmm(true)
                .scenario(SCENARIO)
        },
        Duration::from_secs(400),
    )
}

#[test]
fn example_is_in_the_test_host() {
    let all = run().all();
    let m = all.expect_host("example");
    all.check(
        m.word(0) == Some("present"),
        "the hotplug example binary is not in the test host: build it with \
         `cargo build --release -p rvmm --examples` (resources/run-tests.sh does)",
    );
}

#[test]
fn example_hot_adds_the_device_through_the_library() {
    let all = run().all();
    let added = all.expect_host("example_added");
    all.check(
        added.word(0) == Some("example0") && added.word(3) == Some("0000:01:00.0"),
        "the example should add device example0 at guest 0000:01:00.0",
    );
    all.expect_host("example_event");
}

#[test]
fn example_removes_the_device_gracefully() {
    let all = run().all();
    let removed = all.expect_host("example_removed");
    all.check(
        removed.word(1) == Some("(GuestEjected,"),
        "the guest should have ejected the device after the attention button",
    );
}

#[test]
fn example_shuts_the_vm_down_and_exits_zero() {
    let all = run().all();
    let exit = all.expect_host("example_vm");
    all.check(
        exit.word(1) == Some("PowerOff"),
        "the VM should end with PowerOff after handle.shutdown()",
    );
    all.check(
        all.expect_host_u64("example_exit") == 0,
        "the example should exit 0",
    );
}
