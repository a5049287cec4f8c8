//! ACPI hardware-reduced power management registers: sleep control, sleep status and reset.
//!
//! A hardware-reduced platform (FADT flag `HW_REDUCED_ACPI`) has no PM1 blocks; the OS enters a
//! sleep state through the FADT's `SLEEP_CONTROL_REG` and resets through `RESET_REG`. This device
//! provides the three as byte registers at consecutive ports from its base ([`ACPI_PM_PORT_COUNT`]
//! long); the FADT must describe them as 8-bit system I/O registers at those offsets, and the
//! DSDT's `_S5` package must carry [`SLEEP_TYPE_S5`].
//!
//! Only S5 (soft off) is implemented: it asks the VMM to power off. A request for another sleep
//! state is logged and ignored, so the DSDT must not offer one.

use std::sync::Arc;

use log::debug;

use crate::throttle::LogThrottle;
use crate::warn_throttled;
use crate::{BusDevice, VmEvents};

/// Offset of the sleep control register from the base.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register from the base.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register from the base.
pub const RESET_OFFSET: u64 = 2;
/// Bus range length of the register block.
pub const ACPI_PM_PORT_COUNT: u64 = 3;
/// Width of each register in bits (the FADT generic address `bit_width`).
pub const REGISTER_BIT_WIDTH: u8 = 8;

/// Sleep control: SLP_EN, write 1 to enter the sleep state in SLP_TYP.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// Sleep control: position of the 3-bit SLP_TYP field.
pub const SLEEP_CONTROL_SLP_TYP_SHIFT: u32 = 2;
/// Sleep control: mask of the SLP_TYP field.
pub const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0b111 << SLEEP_CONTROL_SLP_TYP_SHIFT;
/// The SLP_TYP value of S5 (soft off); the `_S5` package in the DSDT carries it.
pub const SLEEP_TYPE_S5: u8 = 5;
/// Sleep status: WAK_STS, set by the platform when it wakes from a sleep state.
pub const SLEEP_STATUS_WAK_STS: u8 = 1 << 7;
/// The value that, written to the reset register, resets the VM (the FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 1;

/// The hardware-reduced ACPI PM register block.
pub struct AcpiPm {
    events: Arc<dyn VmEvents>,
    throttle: LogThrottle,
}

impl AcpiPm {
    /// Creates the register block; power-off and reset requests go to `events`.
    pub fn new(events: Arc<dyn VmEvents>) -> Self {
        Self {
            events,
            throttle: LogThrottle::default(),
        }
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLEEP_CONTROL_SLP_EN == 0 {
            debug!("acpi-pm: sleep control write {value:#04x} without SLP_EN");
            return;
        }
        let sleep_type = (value & SLEEP_CONTROL_SLP_TYP_MASK) >> SLEEP_CONTROL_SLP_TYP_SHIFT;
        if sleep_type == SLEEP_TYPE_S5 {
            debug!("acpi-pm: guest entered S5");
            self.events.power_off();
        } else {
            warn_throttled!(
                self.throttle,
                "acpi-pm: ignored request for unsupported sleep type {sleep_type}"
            );
        }
    }

    fn write_reset(&mut self, value: u8) {
        if value == RESET_VALUE {
            debug!("acpi-pm: guest wrote the reset value");
            self.events.reset();
        } else {
            debug!("acpi-pm: ignored reset register write {value:#04x}");
        }
    }

    /// Checks an access is one byte wide, logging it otherwise.
    fn is_byte_access(&mut self, offset: u64, len: usize, what: &str) -> bool {
        if len != 1 {
            warn_throttled!(
                self.throttle,
                "acpi-pm: ignored {what} of {len} bytes at offset {offset:#x}"
            );
        }
        len == 1
    }
}

impl BusDevice for AcpiPm {
    /// Every register reads zero: sleep control and reset are write-only, and the VM never
    /// sleeps, so WAK_STS in sleep status is never set.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        self.is_byte_access(offset, data.len(), "read");
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if !self.is_byte_access(offset, data.len(), "write") {
            return;
        }
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => self.write_sleep_control(value),
            // Write-1-to-clear of WAK_STS, which is never set.
            SLEEP_STATUS_OFFSET => {}
            RESET_OFFSET => self.write_reset(value),
            _ => debug!("acpi-pm: ignored write of {value:#04x} at offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingVmEvents;

    fn fixture() -> (AcpiPm, Arc<RecordingVmEvents>) {
        let events = Arc::new(RecordingVmEvents::default());
        (AcpiPm::new(events.clone()), events)
    }

    fn sleep_control(sleep_type: u8) -> u8 {
        SLEEP_CONTROL_SLP_EN | (sleep_type << SLEEP_CONTROL_SLP_TYP_SHIFT)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, events) = fixture();

        pm.write(0, SLEEP_CONTROL_OFFSET, &[sleep_control(SLEEP_TYPE_S5)]);

        assert_eq!(events.power_offs(), 1);
        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn s5_without_slp_en_does_not_power_off() {
        let (mut pm, events) = fixture();

        pm.write(
            0,
            SLEEP_CONTROL_OFFSET,
            &[SLEEP_TYPE_S5 << SLEEP_CONTROL_SLP_TYP_SHIFT],
        );

        assert_eq!(events.power_offs(), 0);
    }

    #[test]
    fn other_sleep_types_do_not_power_off() {
        let (mut pm, events) = fixture();

        for sleep_type in (0..8).filter(|&t| t != SLEEP_TYPE_S5) {
            pm.write(0, SLEEP_CONTROL_OFFSET, &[sleep_control(sleep_type)]);
        }

        assert_eq!(events.power_offs(), 0);
        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn s5_value_on_other_registers_does_not_power_off() {
        let (mut pm, events) = fixture();

        pm.write(0, SLEEP_STATUS_OFFSET, &[sleep_control(SLEEP_TYPE_S5)]);
        pm.write(0, RESET_OFFSET, &[sleep_control(SLEEP_TYPE_S5)]);

        assert_eq!(events.power_offs(), 0);
    }

    #[test]
    fn wide_s5_write_is_ignored() {
        let (mut pm, events) = fixture();

        pm.write(0, SLEEP_CONTROL_OFFSET, &[sleep_control(SLEEP_TYPE_S5), 0]);

        assert_eq!(events.power_offs(), 0);
    }

    #[test]
    fn reset_value_resets() {
        let (mut pm, events) = fixture();

        pm.write(0, RESET_OFFSET, &[RESET_VALUE]);

        assert_eq!(events.resets(), 1);
        assert_eq!(events.power_offs(), 0);
    }

    #[test]
    fn other_reset_values_do_not_reset() {
        let (mut pm, events) = fixture();

        for value in (0..=u8::MAX).filter(|&v| v != RESET_VALUE) {
            pm.write(0, RESET_OFFSET, &[value]);
        }

        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn reset_value_on_sleep_registers_does_not_reset() {
        let (mut pm, events) = fixture();

        pm.write(0, SLEEP_CONTROL_OFFSET, &[RESET_VALUE]);
        pm.write(0, SLEEP_STATUS_OFFSET, &[RESET_VALUE]);

        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn sleep_status_reads_wak_sts_clear() {
        let (mut pm, _) = fixture();
        let mut data = [0xffu8];

        pm.read(0, SLEEP_STATUS_OFFSET, &mut data);

        assert_eq!(data[0] & SLEEP_STATUS_WAK_STS, 0);
    }

    #[test]
    fn wide_read_reads_zero() {
        let (mut pm, _) = fixture();
        let mut data = [0xffu8; 4];

        pm.read(0, SLEEP_CONTROL_OFFSET, &mut data);

        assert_eq!(data, [0; 4]);
    }
}
