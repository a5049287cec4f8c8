//! Legacy and platform devices of rvmm and the bus they sit on.
//!
//! Devices never see eventfds or KVM: interrupts reach them through the small [`Interrupt`] trait
//! passed at construction, and VMM-level requests (reset, power-off) leave through [`VmEvents`].
//!
//! | device | module | ports |
//! |---|---|---|
//! | 16550A UART | [`serial`] | 8 from the COM base (0x3f8) |
//! | i8042 (reset line only) | [`i8042`] | 0x60..0x65 |
//! | ACPI hardware-reduced PM registers | [`acpi_pm`] | 3 from the PM base (0x600) |
//! | ACPI Generic Event Device event register (power button) | [`ged`] | 1 after the PM block (0x603) |
//! | ACPI PCI hotplug registers (`--hotplug acpi`) | [`pci_hotplug`] | 0x48 from 0x620 |
//! | MC146818 RTC / CMOS | [`cmos`] | 0x70..0x72 |

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod ged;
pub mod host;
pub mod i8042;
pub mod pci_hotplug;
pub mod report;
pub mod serial;
pub mod sync;
pub mod throttle;

pub use acpi_pm::AcpiPm;
pub use bus::{Bus, BusDevice, BusError, SharedBusDevice};
pub use cmos::Cmos;
pub use ged::Ged;
pub use i8042::I8042;
pub use pci_hotplug::PciHotplug;
pub use report::error_chain;
pub use serial::Serial;
pub use throttle::LogThrottle;

use vmm_sys_util::eventfd::EventFd;

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

/// An eventfd registered as a KVM irqfd (or watched by the event loop) is an interrupt line:
/// raising it adds one to the counter. Create it with `EFD_NONBLOCK`, so that a counter nobody
/// drains fails the trigger instead of blocking the vCPU.
impl Interrupt for EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// Recording doubles of [`Interrupt`] and [`VmEvents`] shared by the device tests.
#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{Interrupt, VmEvents};

    /// Counts how often it was raised.
    #[derive(Default)]
    pub(crate) struct RecordingInterrupt {
        count: AtomicUsize,
    }

    impl RecordingInterrupt {
        pub(crate) fn count(&self) -> usize {
            self.count.load(Ordering::SeqCst)
        }
    }

    impl Interrupt for RecordingInterrupt {
        fn trigger(&self) -> std::io::Result<()> {
            self.count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Counts reset and power-off requests.
    #[derive(Default)]
    pub(crate) struct RecordingVmEvents {
        resets: AtomicUsize,
        power_offs: AtomicUsize,
    }

    impl RecordingVmEvents {
        pub(crate) fn resets(&self) -> usize {
            self.resets.load(Ordering::SeqCst)
        }

        pub(crate) fn power_offs(&self) -> usize {
            self.power_offs.load(Ordering::SeqCst)
        }
    }

    impl VmEvents for RecordingVmEvents {
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }

        fn power_off(&self) {
            self.power_offs.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::test_utils::{RecordingInterrupt, RecordingVmEvents};

    #[test]
    fn eventfd_trigger_adds_one_to_the_counter() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();

        evt.trigger().unwrap();
        evt.trigger().unwrap();

        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn devices_share_the_io_bus_at_their_pc_ports() {
        let bus = Bus::new();
        let events = Arc::new(RecordingVmEvents::default());
        let serial: SharedBusDevice = Arc::new(Mutex::new(Serial::new(
            Arc::new(RecordingInterrupt::default()),
            Box::new(std::io::sink()),
        )));
        let i8042: SharedBusDevice = Arc::new(Mutex::new(I8042::new(events.clone())));
        let cmos: SharedBusDevice = Arc::new(Mutex::new(Cmos::new()));
        let pm: SharedBusDevice = Arc::new(Mutex::new(AcpiPm::new(events.clone())));

        bus.insert(&serial, 0x3f8, serial::SERIAL_PORT_COUNT)
            .unwrap();
        bus.insert(&i8042, 0x60, i8042::I8042_PORT_COUNT).unwrap();
        bus.insert(&cmos, 0x70, cmos::CMOS_PORT_COUNT).unwrap();
        bus.insert(&pm, 0x600, acpi_pm::ACPI_PM_PORT_COUNT).unwrap();
        assert!(bus.write(0x64, &[i8042::I8042_RESET_COMMAND]));
        assert!(bus.write(0x602, &[acpi_pm::RESET_VALUE]));

        assert_eq!(events.resets(), 2);
    }
}
