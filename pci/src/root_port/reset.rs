//! A root port back to its power-on state for a reboot of the VM in place.
//!
//! The guest that booted last programmed the port: bus numbers, windows, command, slot control
//! (power, indicators, interrupt enables), MSI. After a platform reset the next guest must find
//! the port as the first one did at cold boot. The configuration space is built again from the
//! port's construction parameters, and a device in the slot is put back the way
//! [`RootPort::insert_device_at_boot`] puts a cold-plugged one: present, powered, link up, power
//! indicator on, no event pending. A device hot-added before the reboot is then indistinguishable
//! from a cold-plugged one, as on real hardware after a reset.

use super::{build_config_space, Result, RootPort};
use crate::root_port::slot::{Slot, SlotDevice};

impl RootPort {
    /// Resets the port to its power-on state, keeping the device in its slot (as present at
    /// boot). Returns whether the slot holds a device.
    pub fn reset_to_power_on(&mut self) -> Result<bool> {
        let (cfg, offsets, msi) = build_config_space(&self.config, self.msi.sender())?;
        let device = self.slot.device.take();
        self.cfg = cfg;
        self.pcie = offsets.pcie;
        self.aer = offsets.aer;
        self.msi = msi;
        self.slot = Slot::default();
        let Some(device) = device else {
            return Ok(false);
        };
        // The slot was emptied just above: the insertion cannot find it occupied.
        if let Err(e) = self.insert_device_at_boot(device) {
            log::error!("root port {}: cannot put its device back: {e}", self.index);
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes the device out of the slot without telling the guest (there is none: the machine
    /// is being reset) and resets the port to its power-on state with an empty slot. For a
    /// hot-add or a removal that a reset interrupted.
    pub fn take_device_at_reset(&mut self) -> Result<Option<SlotDevice>> {
        let device = self.slot.device.take();
        self.reset_to_power_on()?;
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::msi::tests::RecordingSender;
    use crate::pcie_cap::{LNKSTA, LNKSTA_DLLLA, SLTCTL, SLTSTA_PDS};
    use crate::root_port::slot::tests::{NullEvents, TestDevice};
    use crate::root_port::slot::SlotState;
    use crate::root_port::{test_config, RootPort};
    use crate::PciDevice;

    fn port() -> RootPort {
        RootPort::new(
            test_config(2),
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        )
        .unwrap()
    }

    fn write_u32(port: &mut RootPort, reg: usize, value: u32) {
        port.write_config_register(reg, 0, &value.to_le_bytes());
    }

    #[test]
    fn guest_programming_is_undone_by_a_reset() {
        let mut port = port();
        let fresh: Vec<u32> = (0..64).map(|r| port.read_config_register(r)).collect();
        // Command, bus numbers, memory window: what a booting guest rewrites.
        write_u32(&mut port, 1, 0x0000_0007);
        write_u32(&mut port, 6, 0x0009_0900);
        write_u32(&mut port, 8, 0xfff0_fff0);

        assert!(!port.reset_to_power_on().unwrap());

        let after: Vec<u32> = (0..64).map(|r| port.read_config_register(r)).collect();
        assert_eq!(after, fresh);
    }

    #[test]
    fn a_device_in_the_slot_is_present_at_boot_after_a_reset() {
        let mut port = port();
        let device = TestDevice::shared(0x1234_8086);
        port.insert_device_at_boot(device.clone()).unwrap();
        let booted: Vec<u32> = (0..64).map(|r| port.read_config_register(r)).collect();
        // The guest turns slot power off (as during a removal it then abandoned).
        let pcie = port.pcie_capability_offset();
        let control = port.slot_control() | crate::pcie_cap::SLTCTL_PCC;
        port.write_config_register(
            (pcie + SLTCTL) / 4,
            ((pcie + SLTCTL) % 4) as u64,
            &control.to_le_bytes(),
        );

        assert!(port.reset_to_power_on().unwrap());

        let after: Vec<u32> = (0..64).map(|r| port.read_config_register(r)).collect();
        assert_eq!(after, booted);
        assert_eq!(port.slot_state(), SlotState::Present);
        assert!(port.link_active());
        assert_ne!(port.slot_status() & SLTSTA_PDS, 0);
        assert_ne!(
            port.cfg.read_u16(pcie + LNKSTA) & LNKSTA_DLLLA,
            0,
            "link reported active"
        );
    }

    #[test]
    fn a_device_taken_at_reset_leaves_an_empty_power_on_slot() {
        let mut port = port();
        let empty: Vec<u32> = (0..64).map(|r| port.read_config_register(r)).collect();
        port.insert_device_at_boot(TestDevice::shared(0x1234_8086))
            .unwrap();

        assert!(port.take_device_at_reset().unwrap().is_some());

        let after: Vec<u32> = (0..64).map(|r| port.read_config_register(r)).collect();
        assert_eq!(after, empty);
        assert_eq!(port.slot_state(), SlotState::Empty);
        assert!(port.device().is_none());
    }

    #[test]
    fn a_hot_added_device_is_cold_plugged_after_a_reset() {
        let mut cold = port();
        cold.insert_device_at_boot(TestDevice::shared(0x1234_8086))
            .unwrap();
        let expected: Vec<u32> = (0..64).map(|r| cold.read_config_register(r)).collect();
        let mut hot = port();
        // A device that arrived while the guest ran: the slot went through Adding.
        hot.slot.device = Some(TestDevice::shared(0x1234_8086));
        hot.slot.state = SlotState::Adding;

        assert!(hot.reset_to_power_on().unwrap());

        let after: Vec<u32> = (0..64).map(|r| hot.read_config_register(r)).collect();
        assert_eq!(after, expected);
        assert_eq!(hot.slot_state(), SlotState::Present);
    }
}
