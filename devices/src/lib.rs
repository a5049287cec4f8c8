//! Legacy and platform devices of rvmm and the bus they sit on.
//!
//! Devices never see eventfds or KVM: interrupts reach them through the small [`Interrupt`] trait
//! passed at construction, and VMM-level requests (reset, power-off) leave through [`VmEvents`].

pub mod bus;

pub use bus::{Bus, BusDevice, BusError, SharedBusDevice};

/// An interrupt line (edge) a device can raise.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self) -> std::io::Result<()>;
}

/// Requests a device makes to the VMM as a whole.
pub trait VmEvents: Send + Sync {
    /// The guest asked for a reset (i8042 pulse, ACPI reset register).
    fn reset(&self);
    /// The guest asked to power off (ACPI S5).
    fn power_off(&self);
}
