//! The event register of the ACPI Generic Event Device (GED): how a hardware-reduced machine
//! tells the guest about platform events, here the power button.
//!
//! A hardware-reduced platform has no fixed power button and no GPE blocks. The DSDT describes a
//! GED (`ACPI0013`) with one edge-triggered interrupt and an `_EVT` method that reads this
//! one-byte register and notifies the device of each bit set (bit 0: the power button device
//! `PNP0C0C`, which Linux's `button` driver reports as a power key press; bit 1: a PCI hotplug
//! slot changed, with `--hotplug acpi`). The VMM calls
//! [`Ged::notify`] (or [`Ged::press_power_button`]): the bit is latched and the interrupt
//! raised; the guest's read returns the latched bits and clears them, so every event is seen
//! once, and events that come before the guest reads are reported together.
//!
//! An event raised before the guest has set up its GED interrupt is not lost from the register,
//! but the guest only looks at it on the next interrupt (a later event), as with a real button
//! pressed before the OS runs.

use std::sync::Arc;

use log::debug;

use crate::throttle::LogThrottle;
use crate::warn_throttled;
use crate::{BusDevice, Interrupt};

/// Bus range length of the register block: the one event register.
pub const GED_PORT_COUNT: u64 = 1;
/// Offset of the event register from the base.
pub const EVENT_OFFSET: u64 = 0;
/// Event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Event bit: a PCI hotplug slot changed (ACPI hotplug: `_EVT` calls the DSDT's `PCNT`, which
/// reads the [`crate::pci_hotplug`] registers).
pub const EVENT_PCI_HOTPLUG: u8 = 1 << 1;
/// Every event bit the GED's `_EVT` method handles.
pub const EVENTS_HANDLED: u8 = EVENT_POWER_BUTTON | EVENT_PCI_HOTPLUG;

/// The GED's event register and interrupt line.
pub struct Ged {
    pending: u8,
    irq: Arc<dyn Interrupt>,
    throttle: LogThrottle,
}

impl Ged {
    /// Creates the register block raising `irq` (an edge-triggered line) for each event.
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Self {
            pending: 0,
            irq,
            throttle: LogThrottle::default(),
        }
    }

    /// Latches `events` (bits of [`EVENTS_HANDLED`]) and raises the interrupt. The bits stay
    /// latched when the interrupt cannot be raised, and the error is returned.
    pub fn notify(&mut self, events: u8) -> std::io::Result<()> {
        self.pending |= events & EVENTS_HANDLED;
        self.irq.trigger()
    }

    /// Presses (and releases) the power button.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.notify(EVENT_POWER_BUTTON)
    }

    /// Drops the latched events (a reset of the machine: the next guest starts with none).
    pub fn reset(&mut self) {
        self.pending = 0;
    }

    /// The events latched and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

impl BusDevice for Ged {
    /// A one-byte read of the event register returns the latched events and clears them;
    /// anything else reads zero and clears nothing.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 || offset != EVENT_OFFSET {
            warn_throttled!(
                self.throttle,
                "ged: ignored read of {} bytes at offset {offset:#x}",
                data.len()
            );
            return;
        }
        if let Some(byte) = data.first_mut() {
            *byte = std::mem::take(&mut self.pending);
            if *byte != 0 {
                debug!("ged: the guest read events {:#04x}", *byte);
            }
        }
    }

    /// The register is read-only.
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        debug!(
            "ged: ignored write of {} bytes at offset {offset:#x}",
            data.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingInterrupt;

    fn fixture() -> (Ged, Arc<RecordingInterrupt>) {
        let irq = Arc::new(RecordingInterrupt::default());
        (Ged::new(irq.clone()), irq)
    }

    fn read(ged: &mut Ged) -> u8 {
        let mut data = [0xffu8];
        ged.read(0, EVENT_OFFSET, &mut data);
        data[0]
    }

    #[test]
    fn power_button_latches_its_bit_and_raises_the_interrupt() {
        let (mut ged, irq) = fixture();

        ged.press_power_button().unwrap();

        assert_eq!(ged.pending(), EVENT_POWER_BUTTON);
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn read_returns_the_events_and_clears_them() {
        let (mut ged, _) = fixture();
        ged.press_power_button().unwrap();

        assert_eq!(read(&mut ged), EVENT_POWER_BUTTON);
        assert_eq!(read(&mut ged), 0);
    }

    #[test]
    fn presses_before_a_read_are_reported_once() {
        let (mut ged, irq) = fixture();
        ged.press_power_button().unwrap();
        ged.press_power_button().unwrap();

        assert_eq!(read(&mut ged), EVENT_POWER_BUTTON);
        assert_eq!(read(&mut ged), 0);
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn unknown_event_bits_are_not_latched() {
        let (mut ged, _) = fixture();

        ged.notify(!EVENTS_HANDLED).unwrap();

        assert_eq!(read(&mut ged), 0);
    }

    #[test]
    fn wide_read_reads_zero_and_keeps_the_events() {
        let (mut ged, _) = fixture();
        ged.press_power_button().unwrap();
        let mut data = [0xffu8; 2];

        ged.read(0, EVENT_OFFSET, &mut data);

        assert_eq!(data, [0, 0]);
        assert_eq!(ged.pending(), EVENT_POWER_BUTTON);
    }

    #[test]
    fn write_does_not_clear_the_events() {
        let (mut ged, _) = fixture();
        ged.press_power_button().unwrap();

        ged.write(0, EVENT_OFFSET, &[0xff]);

        assert_eq!(read(&mut ged), EVENT_POWER_BUTTON);
    }

    #[test]
    fn failed_interrupt_keeps_the_event_latched() {
        struct Broken;
        impl Interrupt for Broken {
            fn trigger(&self) -> std::io::Result<()> {
                Err(std::io::Error::other("no line"))
            }
        }
        let mut ged = Ged::new(Arc::new(Broken));

        assert!(ged.press_power_button().is_err());

        assert_eq!(read(&mut ged), EVENT_POWER_BUTTON);
    }
}
