//! The guest's view of a passthrough device's AER capability.
//!
//! When the host reports an error on the device (VFIO's error interrupt), rvmm tells the guest
//! through an AER error message on the device's root port; Linux's AER core then reads the
//! device's own AER registers and acts only on an unmasked uncorrectable status. Those
//! registers are therefore the guest's, not the device's: the host's AER core owns the real ones
//! (it logs and clears them before rvmm hears of the error), and a guest write must not change
//! how the host sees errors. So the capability is emulated ([`rvmm_pci::aer::EndpointAer`]):
//!
//! - over the device's own AER capability, keeping its place in the extended list (its header
//!   stays; every register after it is virtual);
//! - or, for a PCI Express device without one whose extended list is empty (QEMU's NVMe), as a
//!   new capability at 0x100, the head of the list.
//!
//! A device with other extended capabilities but no AER gets none (rvmm does not guess which
//! bytes of its extended space are free): its errors end in surprise removal.

use std::ops::Range;

use rvmm_pci::aer::{EndpointAer, AER_CAP_ID, AER_CAP_LEN, AER_CAP_VERSION};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

use crate::caps::{self, EXT_CAP_START};
use crate::config::COMMAND_BUS_MASTER;
use crate::VfioPciDevice;

/// What a passthrough device looks like after the host reported an error on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceHealth {
    /// It answers and keeps what the guest programmed.
    Usable,
    /// Its config space does not answer (reads fail or return all ones), or it was released:
    /// the device is gone.
    Gone,
    /// It answers but lost the guest's Bus Master Enable: it was reset behind the guest's back
    /// (the host's recovery of a fatal error resets the link below the root port).
    Reset,
}

impl VfioPciDevice {
    /// Records an uncorrectable non-fatal error in the guest's view of the device's AER
    /// capability ([`EndpointAer::inject_nonfatal`]). Returns the status bit set, or `None`
    /// when the device has no AER capability or the guest left no non-fatal error reportable.
    pub fn inject_aer_nonfatal(&self) -> Option<u32> {
        self.lock()
            .config
            .aer_mut()
            .and_then(|aer| aer.registers_mut().inject_nonfatal())
    }

    /// The Uncorrectable Error Status the guest sees, if the device has an AER capability.
    pub fn aer_uncorrectable_status(&self) -> Option<u32> {
        self.lock()
            .config
            .aer()
            .map(|aer| aer.registers().uncorrectable_status())
    }

    /// Looks at the real device through VFIO: does it answer, and does it still have the
    /// Bus Master Enable the guest set?
    pub fn health(&self) -> DeviceHealth {
        let inner = self.lock();
        let Some(backend) = inner.backend.as_deref() else {
            return DeviceHealth::Gone;
        };
        let mut bytes = [0u8; 4];
        if backend
            .read(VFIO_PCI_CONFIG_REGION_INDEX, 4, &mut bytes)
            .is_err()
        {
            return DeviceHealth::Gone;
        }
        let command_status = u32::from_le_bytes(bytes);
        if command_status == u32::MAX {
            return DeviceHealth::Gone;
        }
        let guest_master = inner.config.command() & COMMAND_BUS_MASTER != 0;
        let real_master = command_status as u16 & COMMAND_BUS_MASTER != 0;
        if guest_master && !real_master {
            DeviceHealth::Reset
        } else {
            DeviceHealth::Usable
        }
    }
}

/// Where the emulated capability came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AerPlacement {
    /// Over the device's own AER capability.
    Device,
    /// Provided by rvmm at 0x100 (the device has none).
    Provided,
}

/// The emulated AER capability of a passthrough device.
#[derive(Clone, Debug)]
pub struct VirtualAer {
    offset: usize,
    /// The bytes after the header that the emulation answers.
    body: Range<usize>,
    placement: AerPlacement,
    regs: EndpointAer,
}

impl VirtualAer {
    /// Places the capability in `shadow` (the virtual config space after hidden capabilities
    /// were unlinked): over the device's AER capability, or at 0x100 when `pcie` (the device
    /// has a PCI Express capability) and the extended list is empty. Returns `None` when the
    /// device gets no AER capability.
    pub fn place(shadow: &mut [u8], pcie: bool) -> Option<Self> {
        let ext = caps::walk_ext(shadow);
        if let Some(index) = ext.iter().position(|c| c.id == AER_CAP_ID) {
            let extents = caps::ext_cap_extents(shadow, &ext);
            let offset = ext.get(index)?.offset;
            let end = extents
                .get(index)
                .map_or(offset, |r| r.end)
                .min(offset + AER_CAP_LEN);
            return Some(Self {
                offset,
                body: offset + 4..end.max(offset + 4),
                placement: AerPlacement::Device,
                regs: EndpointAer::default(),
            });
        }
        let end = EXT_CAP_START + AER_CAP_LEN;
        if !pcie || !ext.is_empty() || shadow.len() < end {
            return None;
        }
        let header = u32::from(AER_CAP_ID) | (u32::from(AER_CAP_VERSION) << 16);
        shadow
            .get_mut(EXT_CAP_START..end)?
            .iter_mut()
            .for_each(|b| *b = 0);
        shadow
            .get_mut(EXT_CAP_START..EXT_CAP_START + 4)?
            .copy_from_slice(&header.to_le_bytes());
        Some(Self {
            offset: EXT_CAP_START,
            body: EXT_CAP_START + 4..end,
            placement: AerPlacement::Provided,
            regs: EndpointAer::default(),
        })
    }

    /// Offset of the capability's header.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Where the capability came from.
    pub fn placement(&self) -> AerPlacement {
        self.placement
    }

    /// The bytes of the config space the emulation owns: the header and the registers.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.body.end
    }

    /// Whether the dword at config offset `offset` is one of the emulated registers.
    pub fn covers(&self, offset: usize) -> bool {
        self.body.contains(&offset)
    }

    /// Reads the register dword at config offset `offset` (see [`VirtualAer::covers`]).
    pub fn read(&self, offset: usize) -> u32 {
        self.regs.read(offset.saturating_sub(self.offset))
    }

    /// A guest write of `value` to the bits `bytes` of the register dword at `offset`.
    pub fn write(&mut self, offset: usize, value: u32, bytes: u32) {
        self.regs
            .write(offset.saturating_sub(self.offset), value, bytes);
    }

    /// The registers.
    pub fn registers(&self) -> &EndpointAer {
        &self.regs
    }

    /// The registers, to inject an error.
    pub fn registers_mut(&mut self) -> &mut EndpointAer {
        &mut self.regs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::caps::tests::config_with;
    use crate::testing::{put32, FakeDevice, FakeMmio, FakeRouter};
    use crate::DeviceConfig;
    use rvmm_pci::aer::{UNCOR_COMPLETION_TIMEOUT, UNCOR_SEVER, UNCOR_SEVER_DEFAULT, UNCOR_STATUS};
    use rvmm_pci::PciDevice;

    fn device(fake: &FakeDevice) -> VfioPciDevice {
        VfioPciDevice::with_backend(
            "0000:01:00.0".to_string(),
            Box::new(fake.clone()),
            DeviceConfig { intx_gsi: None },
            Arc::new(FakeRouter::default()),
            Arc::new(FakeMmio::default()),
        )
        .unwrap()
    }

    fn write32(dev: &mut VfioPciDevice, offset: usize, value: u32) {
        dev.write_config_register(offset / 4, 0, &value.to_le_bytes());
    }

    #[test]
    fn an_injected_error_is_what_the_guest_reads_and_clears() {
        let fake = FakeDevice::nvme_like();
        let mut dev = device(&fake);

        assert_eq!(dev.inject_aer_nonfatal(), Some(UNCOR_COMPLETION_TIMEOUT));
        assert_eq!(
            dev.read_config_register((0x100 + UNCOR_STATUS) / 4),
            UNCOR_COMPLETION_TIMEOUT
        );
        write32(&mut dev, 0x100 + UNCOR_STATUS, UNCOR_COMPLETION_TIMEOUT);

        assert_eq!(dev.aer_uncorrectable_status(), Some(0));
        assert!(
            fake.config_writes().iter().all(|(at, _)| *at != 0x104),
            "the device's own AER registers are not touched"
        );
    }

    #[test]
    fn clearing_the_error_signals_the_recovery_notifier() {
        let fake = FakeDevice::nvme_like();
        let mut dev = device(&fake);
        let bit = dev.inject_aer_nonfatal().unwrap();
        let notifier = dev.aer_cleared_event().unwrap().try_clone().unwrap();
        assert!(notifier.read().is_err(), "nothing before the guest clears");

        write32(&mut dev, 0x100 + UNCOR_STATUS, bit);

        assert_eq!(notifier.read().unwrap(), 1);
    }

    #[test]
    fn a_write_clearing_nothing_does_not_signal() {
        let fake = FakeDevice::nvme_like();
        let mut dev = device(&fake);
        dev.inject_aer_nonfatal().unwrap();

        write32(&mut dev, 0x100 + UNCOR_STATUS, 0);

        assert!(dev.aer_cleared_event().unwrap().read().is_err());
    }

    #[test]
    fn the_devices_real_aer_status_is_not_shown_to_the_guest() {
        let fake = FakeDevice::nvme_like();
        fake.with_config(|cfg| put32(cfg, 0x104, 1 << 20));
        let mut dev = device(&fake);

        assert_eq!(dev.read_config_register(0x104 / 4), 0);
    }

    #[test]
    fn a_device_that_answers_with_its_bus_master_is_usable() {
        let fake = FakeDevice::nvme_like();
        let mut dev = device(&fake);
        write32(&mut dev, 4, u32::from(COMMAND_BUS_MASTER));

        assert_eq!(dev.health(), DeviceHealth::Usable);
    }

    #[test]
    fn a_device_that_lost_the_guests_bus_master_was_reset() {
        let fake = FakeDevice::nvme_like();
        let mut dev = device(&fake);
        write32(&mut dev, 4, u32::from(COMMAND_BUS_MASTER));

        fake.with_config(|cfg| put32(cfg, 4, 0));

        assert_eq!(dev.health(), DeviceHealth::Reset);
    }

    #[test]
    fn a_device_reading_all_ones_is_gone() {
        let fake = FakeDevice::nvme_like();
        let dev = device(&fake);

        fake.with_config(|cfg| put32(cfg, 4, u32::MAX));

        assert_eq!(dev.health(), DeviceHealth::Gone);
    }

    #[test]
    fn a_released_device_is_gone() {
        let fake = FakeDevice::nvme_like();
        let dev = device(&fake);

        dev.release();

        assert_eq!(dev.health(), DeviceHealth::Gone);
    }

    #[test]
    fn the_devices_own_capability_is_taken_over() {
        let mut shadow = config_with(&[(0x40, 0x10)], &[(0x100, 0x0001), (0x140, 0x0003)]);

        let aer = VirtualAer::place(&mut shadow, true).unwrap();

        assert_eq!(aer.placement(), AerPlacement::Device);
        assert_eq!(
            aer.range(),
            0x100..0x140,
            "ends where the next capability starts"
        );
        assert!(aer.covers(0x104));
        assert!(!aer.covers(0x100), "the header stays the device's");
    }

    #[test]
    fn a_device_without_extended_capabilities_gets_one_at_0x100() {
        let mut shadow = config_with(&[(0x40, 0x10)], &[]);

        let aer = VirtualAer::place(&mut shadow, true).unwrap();

        assert_eq!(aer.placement(), AerPlacement::Provided);
        let ext = caps::walk_ext(&shadow);
        assert_eq!(ext.len(), 1);
        assert_eq!((ext[0].id, ext[0].version, ext[0].offset), (1, 2, 0x100));
        assert_eq!(aer.range(), 0x100..0x148);
        assert_eq!(aer.read(0x100 + UNCOR_SEVER), UNCOR_SEVER_DEFAULT);
    }

    #[test]
    fn a_device_with_other_extended_capabilities_gets_none() {
        let mut shadow = config_with(&[(0x40, 0x10)], &[(0x100, 0x0003)]);

        assert!(VirtualAer::place(&mut shadow, true).is_none());
    }

    #[test]
    fn a_conventional_pci_device_gets_none() {
        let mut shadow = config_with(&[], &[]);

        assert!(VirtualAer::place(&mut shadow, false).is_none());
    }

    #[test]
    fn a_256_byte_config_space_gets_none() {
        let mut shadow = vec![0u8; 0x100];

        assert!(VirtualAer::place(&mut shadow, true).is_none());
    }

    #[test]
    fn the_guest_clears_an_injected_error() {
        let mut shadow = config_with(&[(0x40, 0x10)], &[]);
        let mut aer = VirtualAer::place(&mut shadow, true).unwrap();
        let bit = aer.registers_mut().inject_nonfatal().unwrap();
        assert_eq!(aer.read(0x100 + UNCOR_STATUS), bit);

        aer.write(0x100 + UNCOR_STATUS, bit, u32::MAX);

        assert_eq!(aer.registers().uncorrectable_status(), 0);
    }
}
