//! The counters the VM keeps as it runs: KVM exits per vCPU by reason (relaxed atomics the vCPU
//! threads bump), reboots, and when the VM was built and started.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Why `KVM_RUN` returned to rvmm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// A port read.
    IoIn,
    /// A port write.
    IoOut,
    /// An MMIO read nobody mapped into the guest.
    MmioRead,
    /// An MMIO write nobody mapped into the guest.
    MmioWrite,
    /// `hlt` (with an in-kernel LAPIC KVM handles most of them itself).
    Hlt,
    /// A signal kicked the vCPU out (`KVM_EXIT_INTR`, or `KVM_RUN` failed with EINTR/EAGAIN).
    Intr,
    /// A triple fault.
    Shutdown,
    /// A system event: power off, reset, crash.
    SystemEvent,
    /// VM entry failed.
    FailEntry,
    /// KVM internal error.
    InternalError,
    /// Any other exit.
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`VcpuExits`]' fields.
    pub const ALL: [ExitReason; 11] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Intr,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::FailEntry,
        ExitReason::InternalError,
        ExitReason::Other,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One vCPU's exit counts: bumped by its own thread with relaxed atomics (one uncontended add
/// per exit), read by anyone.
#[derive(Debug, Default)]
pub struct ExitCounters {
    counts: [AtomicU64; ExitReason::ALL.len()],
}

impl ExitCounters {
    /// Counts one exit of `reason`.
    #[inline]
    pub fn count(&self, reason: ExitReason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as they are now.
    pub fn snapshot(&self) -> VcpuExits {
        let c = |r: ExitReason| self.counts[r.index()].load(Ordering::Relaxed);
        VcpuExits {
            io_in: c(ExitReason::IoIn),
            io_out: c(ExitReason::IoOut),
            mmio_read: c(ExitReason::MmioRead),
            mmio_write: c(ExitReason::MmioWrite),
            hlt: c(ExitReason::Hlt),
            intr: c(ExitReason::Intr),
            shutdown: c(ExitReason::Shutdown),
            system_event: c(ExitReason::SystemEvent),
            fail_entry: c(ExitReason::FailEntry),
            internal_error: c(ExitReason::InternalError),
            other: c(ExitReason::Other),
        }
    }
}

/// KVM exits of one vCPU by reason, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuExits {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads that reached rvmm.
    pub mmio_read: u64,
    /// MMIO writes that reached rvmm.
    pub mmio_write: u64,
    /// `hlt` exits.
    pub hlt: u64,
    /// Signal kicks (`KVM_EXIT_INTR`, EINTR).
    pub intr: u64,
    /// Triple faults.
    pub shutdown: u64,
    /// System events (power off, reset).
    pub system_event: u64,
    /// Failed VM entries.
    pub fail_entry: u64,
    /// KVM internal errors.
    pub internal_error: u64,
    /// Any other exit.
    pub other: u64,
}

impl VcpuExits {
    /// All exits.
    pub fn total(&self) -> u64 {
        [
            self.io_in,
            self.io_out,
            self.mmio_read,
            self.mmio_write,
            self.hlt,
            self.intr,
            self.shutdown,
            self.system_event,
            self.fail_entry,
            self.internal_error,
            self.other,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// What the VM counts for its whole life, shared by the vCPU threads, the event loop (which
/// answers `GET /v1/vm/counters`) and the code that reboots the VM.
#[derive(Debug)]
pub struct VmCounters {
    vcpus: Vec<ExitCounters>,
    reboots: AtomicU64,
    built: Instant,
    started: OnceLock<Instant>,
}

impl VmCounters {
    /// Counters for a VM of `cpus` vCPUs, built now.
    pub fn new(cpus: u8) -> Self {
        Self {
            vcpus: (0..cpus).map(|_| ExitCounters::default()).collect(),
            reboots: AtomicU64::new(0),
            built: Instant::now(),
            started: OnceLock::new(),
        }
    }

    /// The exit counters of vCPU `index`, `None` past the last vCPU.
    pub fn vcpu(&self, index: usize) -> Option<&ExitCounters> {
        self.vcpus.get(index)
    }

    /// Every vCPU's exits, by index.
    pub fn vcpu_exits(&self) -> Vec<VcpuExits> {
        self.vcpus.iter().map(ExitCounters::snapshot).collect()
    }

    /// Records that the vCPUs started (the first time only: a reboot in place keeps it).
    pub fn mark_started(&self) {
        let _ = self.started.set(Instant::now());
    }

    /// Time since the vCPUs first started (zero before).
    pub fn uptime(&self) -> Duration {
        self.started.get().map(Instant::elapsed).unwrap_or_default()
    }

    /// Time since the VM began to be built.
    pub fn since_built(&self) -> Duration {
        self.built.elapsed()
    }

    /// Counts one reboot in place (the reboot path calls this once the vCPUs run again).
    pub fn count_reboot(&self) {
        self.reboots.fetch_add(1, Ordering::Relaxed);
    }

    /// Reboots in place so far.
    pub fn reboots(&self) -> u64 {
        self.reboots.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_reason() {
        let counters = VmCounters::new(2);
        let vcpu1 = counters.vcpu(1).expect("two vCPUs");

        vcpu1.count(ExitReason::IoOut);
        vcpu1.count(ExitReason::IoOut);
        vcpu1.count(ExitReason::MmioRead);

        let exits = counters.vcpu_exits();
        assert_eq!(exits[0], VcpuExits::default());
        assert_eq!(exits[1].io_out, 2);
        assert_eq!(exits[1].mmio_read, 1);
        assert_eq!(exits[1].total(), 3);
    }

    #[test]
    fn every_reason_has_its_own_field() {
        let c = ExitCounters::default();
        for (n, reason) in ExitReason::ALL.iter().enumerate() {
            for _ in 0..=n {
                c.count(*reason);
            }
        }
        let s = c.snapshot();
        let fields = [
            s.io_in,
            s.io_out,
            s.mmio_read,
            s.mmio_write,
            s.hlt,
            s.intr,
            s.shutdown,
            s.system_event,
            s.fail_entry,
            s.internal_error,
            s.other,
        ];
        assert_eq!(fields, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn no_vcpu_past_the_last() {
        assert!(VmCounters::new(1).vcpu(1).is_none());
    }

    #[test]
    fn uptime_is_zero_before_start_and_reboots_count() {
        let c = VmCounters::new(1);
        assert_eq!(c.uptime(), Duration::ZERO);
        c.mark_started();
        c.count_reboot();
        assert_eq!(c.reboots(), 1);
    }
}
