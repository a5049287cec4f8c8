//! The host bridge function at 00:00.0 of the segment.

use crate::config::ConfigSpace;
use crate::device::PciDevice;
use crate::header::{self, PciIds};

/// Vendor ID of the host bridge (Red Hat).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the host bridge (QEMU's generic PCIe host bridge).
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Class code of the host bridge.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

/// A type 0 host bridge function without BARs, interrupts or capabilities.
pub struct HostBridge {
    cfg: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// Creates the host bridge function.
    pub fn new() -> Self {
        let ids = PciIds {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision: 0,
            class_code: HOST_BRIDGE_CLASS,
        };
        Self {
            cfg: header::type0(&ids, HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, false),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.cfg.read_register(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.cfg.write_register(reg, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_as_a_host_bridge() {
        let mut hb = HostBridge::new();
        assert_eq!(hb.read_config_register(0), 0x0008_1b36);
        assert_eq!(hb.read_config_register(2), 0x0600_0000);
        assert_eq!(hb.read_config_register(3) >> 16 & 0xff, 0);
    }

    #[test]
    fn identity_survives_guest_writes() {
        let mut hb = HostBridge::new();
        for reg in 0..16 {
            hb.write_config_register(reg, 0, &[0xff; 4]);
        }
        assert_eq!(hb.read_config_register(0), 0x0008_1b36);
        assert_eq!(hb.read_config_register(4), 0);
    }
}
