//! One test host run shared by several tests of a test binary, each asserting one behaviour on
//! its console: a test host boot costs seconds of TCG time, an assertion costs nothing.

use std::sync::OnceLock;
use std::time::Duration;

use crate::error::chain;
use crate::output::TestHostOutput;
use crate::testhost::TestHost;

/// A test host run made by the first test that needs it and reused by the others. A run that
/// could not take place fails every test that uses it, with the same message, without retrying.
/// A run during which a kernel reported RCU stalls ([`TestHostOutput::rcu_stalls`]: a test host
/// CPU stopped taking timer interrupts under QEMU's TCG, freezing rvmm's or the guest's threads
/// for reasons outside rvmm) is made once more; its console is kept as
/// `build/logs/<name>.stalled.log` and the tests assert on the second run.
///
/// ```no_run
/// use std::time::Duration;
/// use rvmm_tests::{SharedRun, TestHost};
///
/// static RUN: SharedRun = SharedRun::new();
///
/// fn run() -> &'static rvmm_tests::TestHostOutput {
///     RUN.get(|| TestHost::new("example").scenario("hmark hello"), Duration::from_secs(120))
/// }
/// ```
#[derive(Debug, Default)]
pub struct SharedRun {
    cell: OnceLock<Result<TestHostOutput, String>>,
}

impl SharedRun {
    /// A run not made yet.
    pub const fn new() -> Self {
        SharedRun {
            cell: OnceLock::new(),
        }
    }

    /// The run's output; the first caller runs `host()` with `timeout`, the others wait for it.
    /// Panics loudly if the run could not take place or its test host was unusable.
    #[track_caller]
    pub fn get(&self, host: impl FnOnce() -> TestHost, timeout: Duration) -> &TestHostOutput {
        let outcome = self.cell.get_or_init(|| {
            let host = host();
            let first = host.try_run(timeout).map_err(|error| chain(&error))?;
            let stalls = first.rcu_stalls();
            if stalls == 0 {
                return Ok(first);
            }
            let kept = first.log_path().with_extension("stalled.log");
            let _ = std::fs::copy(first.log_path(), &kept);
            eprintln!(
                "note: {stalls} RCU stall reports in test host run {} (a test host CPU stopped \
                 taking timer interrupts under QEMU's TCG); its console is {}; running it again",
                first.name(),
                kept.display()
            );
            host.try_run(timeout).map_err(|error| chain(&error))
        });
        match outcome {
            Ok(output) => output,
            Err(message) => panic!("{message}"),
        }
    }
}
