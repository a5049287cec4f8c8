//! vCPU state set up before the first run: CPUID, MSRs, registers, FPU and LAPIC.

mod cpuid;
pub mod pause;
mod regs;
pub mod reset;
pub mod vcpu;

pub use cpuid::configure_cpuid;
pub use regs::{configure_fpu, configure_lapic, configure_msrs, configure_registers};

use thiserror::Error;

/// Errors of vCPU configuration. Each names the KVM call that failed.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {cpu}: {what} failed")]
    Kvm {
        /// vCPU index.
        cpu: u8,
        /// The call.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Not every MSR was accepted.
    #[error("vCPU {cpu}: KVM accepted {set} of {total} boot MSRs")]
    Msrs {
        /// vCPU index.
        cpu: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
    },
    /// Writing the boot page tables or GDT failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of vCPU configuration.
pub type Result<T> = std::result::Result<T, CpuError>;
