//! A passthrough device back to the state of a freshly attached one, for a reboot of the VM in
//! place: what the last guest set up is undone (BARs it placed, MSI/MSI-X vectors with their
//! irqfds and routes), the host device is reset through VFIO, and the virtual configuration
//! space is read again from the reset device with the BAR addresses the VMM gave it at attach
//! (as firmware would). The device stays open, its DMA mappings and its mmaps stay.

use crate::config::VirtualConfig;
use crate::device::{quiesce, region_sizes, DeviceError, Inner, Result, VfioPciDevice};
use crate::interrupts::IrqMode;

impl VfioPciDevice {
    /// Resets the device for a reboot of the VM: BARs out of the guest, interrupts back to INTx
    /// (or off without a line), decode and bus master off, `VFIO_DEVICE_RESET` (the host
    /// kernel picks FLR, PM or bus reset, as listed in the device's `reset_method` in sysfs),
    /// then the virtual config space as at attach. A released device is left alone.
    pub fn reset_for_reboot(&self) -> Result<()> {
        let mut guard = self.lock();
        if guard.backend.is_none() {
            return Ok(());
        }
        guard.reset_function()?;
        log::info!("{}: reset for the reboot (VFIO_DEVICE_RESET)", guard.name);
        Ok(())
    }
}

impl Inner {
    /// Resets the function: BARs out of the guest, interrupts off, decode and bus master off,
    /// `VFIO_DEVICE_RESET`, the virtual config space read again from the reset device with the
    /// BAR addresses the VMM gave at attach, INTx armed again when the device has a line. For a
    /// reboot, and for the guest's own resets (FLR, secondary bus reset), after which the guest
    /// finds the function as after a reset and restores what it saved.
    pub(crate) fn reset_function(&mut self) -> Result<()> {
        let Some(backend) = self.backend.as_deref() else {
            return Ok(());
        };
        for map in &mut self.maps {
            map.unplace(&*self.mmio);
        }
        // Off first, then INTx again: a line the last guest left masked starts unmasked.
        let intx = self.irqs.has_intx();
        let name = self.name.clone();
        let interrupts = |source| DeviceError::Interrupts {
            name: name.to_string(),
            source,
        };
        self.irqs
            .switch(IrqMode::Off, backend, &*self.router)
            .map_err(interrupts)?;
        quiesce(backend, &self.name);
        backend.reset();
        let (bar_sizes, rom_size) = region_sizes(backend);
        self.config = VirtualConfig::new(backend, bar_sizes, rom_size, intx).map_err(|source| {
            DeviceError::Config {
                name: self.name.to_string(),
                source,
            }
        })?;
        quiesce(backend, &self.name);
        if intx {
            self.irqs
                .switch(IrqMode::Intx, backend, &*self.router)
                .map_err(interrupts)?;
        }
        for &(index, gpa) in &self.firmware_bars {
            self.config.bars_mut().set_address(index, gpa);
        }
        self.sync_bars();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rvmm_pci::PciDevice;

    use crate::config::{COMMAND_BUS_MASTER, COMMAND_MEMORY};
    use crate::device::{DeviceConfig, VfioPciDevice};
    use crate::interrupts::IrqMode;
    use crate::testing::{get32, FakeDevice, FakeMmio, FakeRouter};

    const BAR0: u64 = 0xe000_0000;
    const BAR2: u64 = 0xe001_0000;

    fn device() -> (VfioPciDevice, FakeDevice, Arc<FakeRouter>, Arc<FakeMmio>) {
        let dev = FakeDevice::nvme_like();
        let router = Arc::new(FakeRouter::default());
        let mmio = Arc::new(FakeMmio::default());
        let vfio = VfioPciDevice::with_backend(
            "0000:01:00.0".to_string(),
            Box::new(dev.clone()),
            DeviceConfig { intx_gsi: Some(20) },
            router.clone(),
            mmio.clone(),
        )
        .unwrap();
        vfio.set_bar_address(0, BAR0);
        vfio.set_bar_address(2, BAR2);
        (vfio, dev, router, mmio)
    }

    fn cfg_write(vfio: &mut VfioPciDevice, offset: usize, data: &[u8]) {
        vfio.write_config_register(offset / 4, (offset % 4) as u64, data);
    }

    /// What a booted guest does: moves BAR 2, enables decode and bus master and MSI-X.
    fn boot_guest(vfio: &mut VfioPciDevice) {
        cfg_write(vfio, 0x18, &0xe800_0000u32.to_le_bytes());
        cfg_write(
            vfio,
            4,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        cfg_write(vfio, 0xb2, &0x8000u16.to_le_bytes());
    }

    #[test]
    fn a_reset_device_reads_as_freshly_attached() {
        let (mut fresh, _, _, _) = device();
        let expected: Vec<u32> = (0..64).map(|r| fresh.read_config_register(r)).collect();
        let (mut vfio, _, _, _) = device();
        boot_guest(&mut vfio);

        vfio.reset_for_reboot().unwrap();

        let after: Vec<u32> = (0..64).map(|r| vfio.read_config_register(r)).collect();
        assert_eq!(after, expected);
    }

    #[test]
    fn a_reset_undoes_bars_and_vectors_and_resets_the_host_device() {
        let (mut vfio, dev, router, mmio) = device();
        boot_guest(&mut vfio);
        assert!(matches!(vfio.irq_mode(), IrqMode::Msix(_)));
        let resets = dev.resets();

        vfio.reset_for_reboot().unwrap();

        assert_eq!(dev.resets(), resets + 1);
        assert!(mmio.live_slots().is_empty());
        assert!(mmio.live_traps().is_empty());
        assert!(vfio.placed_bars().is_empty());
        assert!(router.live_gsis().is_empty());
        assert_eq!(vfio.irq_mode(), IrqMode::Intx);
        assert_eq!(get32(&dev.config(), 4) & 0x7, 0);
    }

    #[test]
    fn the_next_guest_finds_the_bars_where_the_vmm_put_them() {
        let (mut vfio, _, _, mmio) = device();
        boot_guest(&mut vfio);

        vfio.reset_for_reboot().unwrap();
        cfg_write(&mut vfio, 4, &COMMAND_MEMORY.to_le_bytes());

        assert_eq!(mmio.live_slots(), [BAR0, BAR2]);
    }

    #[test]
    fn a_released_device_is_left_alone() {
        let (vfio, dev, _, _) = device();
        vfio.release();
        let resets = dev.resets();

        vfio.reset_for_reboot().unwrap();

        assert_eq!(dev.resets(), resets);
    }
}
