//! Harness for integration tests that boot rvmm guests in a QEMU test host.
//!
//! The build machine has no usable KVM for a stock Linux guest, no IOMMU and no VFIO, so real
//! guests are booted one level down: `resources/testhost.sh` starts a QEMU/TCG machine (the
//! *test host*) with nested SVM, an Intel IOMMU, emulated NVMe drives and an igb NIC. Its
//! initramfs (`resources/build-host-initramfs.sh`) carries rvmm, the guest kernel and the guest
//! initramfs; a test passes a *scenario* (a busybox `sh` script run as `/scenario.sh`) that
//! drives rvmm with the helpers of `resources/host/host-lib.sh`.
//!
//! Everything of interest is printed on the console as markers: `HOST <key> <value>` from the
//! test host, `GUEST <key> <value>` from an rvmm guest (its serial console passes through), and
//! `HOST begin <name>` / `HOST end <name>` around each rvmm run. Tests assert on those:
//!
//! ```no_run
//! use std::time::Duration;
//! use rvmm_tests::{GuestRun, TestHost};
//!
//! let run = GuestRun::new("boot").cpus(2).memory("size=512M");
//! let output = TestHost::new("boot_example")
//!     .needs_rvmm(true)
//!     .scenario(&run.script())
//!     .run(Duration::from_secs(300));
//! let boot = output.section("boot");
//! assert_eq!(boot.expect_guest_u64("cpus"), 2);
//! ```
//!
//! Failures are loud: a missing prerequisite (QEMU, kernel, rvmm binary, `/dev/kvm` in the test
//! host) panics with the reason, and every failed expectation prints the path of the saved
//! console log (`build/logs/<test>.log`) and its relevant tail. Nothing is skipped.

mod asserts;
mod error;
mod output;
pub mod paths;
mod prepare;
mod scenario;
mod shared;
mod testhost;
mod token;

pub use asserts::{assert_clean_poweroff, assert_refused};
pub use error::{Error, Result};
pub use output::{Line, Marker, RunEnd, Section, Source, TestHostOutput};
pub use scenario::{shell_quote, GuestKernel, GuestRun};
pub use shared::SharedRun;
pub use testhost::TestHost;
pub use token::token;
