//! A PCI Express root port with one hot-plug slot.
//!
//! The port is a type 1 function (Red Hat's generic root port IDs, 1b36:000c, which Linux drives
//! without quirks) with a PCI Express capability describing a hot-plug slot, a single-vector
//! MSI capability that carries the hot-plug and error interrupts, and an AER extended
//! capability with the root error registers ([`aer`]). Its bus numbers and bridge windows are
//! pre-programmed by the constructor and stay guest-writable. Configuration accesses to the
//! secondary bus reach the slot's device at 00.0 while the link is active.
//!
//! The slot logic (state machine, guest handshake, interrupts) is in [`slot`].

pub mod aer;
mod reset;
pub mod slot;

use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::allocator::AddressRange;
use crate::config::{ConfigError, ConfigSpace};
use crate::device::{MsiSender, PciDevice};
use crate::header::{self, BusNumbers, PciIds};
use crate::msi::Msi;
use crate::pcie_cap::{self, LinkSpeed, LinkWidth, PcieCapParams, MAX_SLOT_NUMBER};
pub use aer::AerSignal;
use rvmm_devices::sync::MutexExt;
use slot::{Slot, SlotDevice, SlotEvents};

/// Vendor ID of the root port (Red Hat).
pub const ROOT_PORT_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the root port (QEMU's generic PCIe root port).
pub const ROOT_PORT_DEVICE_ID: u16 = 0x000c;
/// Class code of the root port: PCI-to-PCI bridge.
pub const ROOT_PORT_CLASS: u32 = 0x06_04_00;
/// What reads of an absent function return.
pub const ABSENT: u32 = 0xffff_ffff;

/// A shared handle on a root port, as the segment and the hot-plug manager hold it.
pub type SharedRootPort = Arc<Mutex<RootPort>>;

/// The bridge windows of a root port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortWindows {
    /// Non-prefetchable window below 4 GiB, 1 MiB aligned and sized.
    pub mmio32: AddressRange,
    /// 64-bit prefetchable window, aligned to its (power-of-two) size.
    pub mmio64: AddressRange,
    /// I/O window, 4 KiB aligned and sized below 64 KiB, or `None` when the I/O space had no
    /// room left for this port.
    pub io: Option<AddressRange>,
}

/// Construction parameters of a root port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPortConfig {
    /// Index of the port in its segment, passed back to [`SlotEvents::slot_changed`].
    pub index: usize,
    /// Initial bus numbers (guest-writable).
    pub buses: BusNumbers,
    /// Physical Slot Number (13 bits).
    pub slot_number: u16,
    /// Port Number advertised in Link Capabilities.
    pub port_number: u8,
    /// Initial bridge windows (guest-writable).
    pub windows: PortWindows,
    /// Link speed advertised and reported.
    pub link_speed: LinkSpeed,
    /// Link width advertised and reported.
    pub link_width: LinkWidth,
    /// Set the multi-function bit (function 0 of a device with several ports).
    pub multi_function: bool,
}

/// Errors of root port construction.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RootPortError {
    /// The Physical Slot Number field is 13 bits wide.
    #[error("physical slot number {slot} does not fit in 13 bits")]
    InvalidSlotNumber {
        /// The rejected slot number.
        slot: u16,
    },
    /// The secondary bus must be above the primary one and not above the subordinate one.
    #[error(
        "invalid bus numbers: primary {primary}, secondary {secondary}, subordinate {subordinate}"
    )]
    InvalidBusNumbers {
        /// Primary bus.
        primary: u8,
        /// Secondary bus.
        secondary: u8,
        /// Subordinate bus.
        subordinate: u8,
    },
    /// The 32-bit window must be 1 MiB aligned and sized and end below 4 GiB.
    #[error("32-bit window {base:#x}+{size:#x} is not a 1 MiB-aligned window below 4 GiB")]
    InvalidMmio32Window {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// The 64-bit window must be 1 MiB aligned and sized.
    #[error("64-bit window {base:#x}+{size:#x} is not a 1 MiB-aligned window")]
    InvalidMmio64Window {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// The I/O window must be 4 KiB aligned and sized, below 64 KiB.
    #[error("I/O window {base:#x}+{size:#x} is not a 4 KiB-aligned window below 64 KiB")]
    InvalidIoWindow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// Building the configuration space failed.
    #[error("failed to lay out the root port's configuration space")]
    Config(#[from] ConfigError),
}

/// Result type of root port construction.
pub type Result<T> = std::result::Result<T, RootPortError>;

/// A hot-plug capable PCI Express root port.
///
/// Lock order: a port's mutex is taken before the mutex of the device in its slot, never the
/// other way round.
pub struct RootPort {
    /// What the port was built from; a reset builds it again from this.
    pub(crate) config: RootPortConfig,
    pub(crate) index: usize,
    pub(crate) slot_number: u16,
    pub(crate) windows: PortWindows,
    pub(crate) cfg: ConfigSpace,
    /// Offset of the PCI Express capability.
    pub(crate) pcie: usize,
    /// Offset of the AER extended capability.
    pub(crate) aer: usize,
    pub(crate) msi: Msi,
    pub(crate) slot: Slot,
    pub(crate) events: Arc<dyn SlotEvents>,
}

impl RootPort {
    /// Creates a root port with an empty, powered-off slot. Hot-plug interrupts are sent
    /// through `msi`; guest changes of the slot's power, indicators, status or MSI enable are
    /// reported to `events`.
    pub fn new(
        config: RootPortConfig,
        msi: Arc<dyn MsiSender>,
        events: Arc<dyn SlotEvents>,
    ) -> Result<Self> {
        validate(&config)?;
        let (cfg, offsets, msi) = build_config_space(&config, msi)?;
        Ok(Self {
            config,
            index: config.index,
            slot_number: config.slot_number,
            windows: config.windows,
            cfg,
            pcie: offsets.pcie,
            aer: offsets.aer,
            msi,
            slot: Slot::default(),
            events,
        })
    }

    /// Index of the port in its segment.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Physical Slot Number of the port's slot.
    pub fn slot_number(&self) -> u16 {
        self.slot_number
    }

    /// The bridge windows given at construction (the guest may since have reprogrammed the
    /// registers; see [`RootPort::programmed_windows`]).
    pub fn windows(&self) -> PortWindows {
        self.windows
    }

    /// The windows as currently programmed by the guest: (32-bit, 64-bit prefetchable), each
    /// `None` when closed.
    pub fn programmed_windows(&self) -> (Option<AddressRange>, Option<AddressRange>) {
        (
            header::memory_window(&self.cfg),
            header::prefetchable_window(&self.cfg),
        )
    }

    /// The bus numbers as currently programmed.
    pub fn bus_numbers(&self) -> BusNumbers {
        header::bus_numbers(&self.cfg)
    }

    /// Offset of the PCI Express capability in the port's configuration space.
    pub fn pcie_capability_offset(&self) -> usize {
        self.pcie
    }

    /// Offset of the MSI capability in the port's configuration space.
    pub fn msi_capability_offset(&self) -> usize {
        self.msi.offset()
    }

    /// The function behind the port that a configuration access to `bus`/`device`/`function`
    /// reaches: only device 0 function 0 of the secondary bus, only while the link is active.
    fn downstream_target(
        &self,
        bus: u8,
        device: u8,
        function: u8,
    ) -> Option<MutexGuard<'_, dyn PciDevice + 'static>> {
        if bus != self.bus_numbers().secondary || device != 0 || function != 0 || !self.slot.link_up
        {
            return None;
        }
        self.slot.device.as_ref().map(|d| d.locked())
    }

    /// The device a configuration access to `bus`/`device`/`function` reaches, as a handle of
    /// its own: the caller can let go of the port's lock before it calls into the device (whose
    /// config writes may take long: MSI-X setup, BAR remapping), so that slot changes of the
    /// port are not held up. A device removed meanwhile still answers (all ones once released).
    pub fn downstream_device(&self, bus: u8, device: u8, function: u8) -> Option<SlotDevice> {
        if bus != self.bus_numbers().secondary || device != 0 || function != 0 || !self.slot.link_up
        {
            return None;
        }
        self.slot.device.clone()
    }

    /// Reads register `reg` of a function behind the port; absent functions read all ones.
    pub fn read_downstream(&self, bus: u8, device: u8, function: u8, reg: usize) -> u32 {
        match self.downstream_target(bus, device, function) {
            Some(mut dev) => dev.read_config_register(reg),
            None => ABSENT,
        }
    }

    /// Writes register `reg` of a function behind the port; writes to absent functions are
    /// dropped.
    pub fn write_downstream(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if let Some(mut dev) = self.downstream_target(bus, device, function) {
            dev.write_config_register(reg, offset, data);
        }
    }
}

/// Where [`build_config_space`] put the capabilities the port model works with.
pub(crate) struct CapOffsets {
    /// The PCI Express capability.
    pub(crate) pcie: usize,
    /// The AER extended capability.
    pub(crate) aer: usize,
}

/// The port's configuration space as at power-on: header with the initial bus numbers and
/// windows, PCI Express capability (empty, powered-off slot), MSI capability and AER extended
/// capability; returns the space, the capability offsets and the MSI capability.
fn build_config_space(
    config: &RootPortConfig,
    msi: Arc<dyn MsiSender>,
) -> Result<(ConfigSpace, CapOffsets, Msi)> {
    let ids = PciIds {
        vendor_id: ROOT_PORT_VENDOR_ID,
        device_id: ROOT_PORT_DEVICE_ID,
        revision: 0,
        class_code: ROOT_PORT_CLASS,
    };
    let mut cfg = header::type1(&ids, config.multi_function);
    header::set_bus_numbers(&mut cfg, config.buses);
    header::set_memory_window(&mut cfg, Some(config.windows.mmio32));
    header::set_prefetchable_window(&mut cfg, Some(config.windows.mmio64));
    header::set_io_window(&mut cfg, config.windows.io);
    let pcie = pcie_cap::add_root_port_capability(
        &mut cfg,
        &PcieCapParams {
            slot_number: config.slot_number,
            port_number: config.port_number,
            link_speed: config.link_speed,
            link_width: config.link_width,
        },
    )?;
    let msi = Msi::add_to(&mut cfg, msi)?;
    let aer = aer::add_capability(&mut cfg)?;
    Ok((cfg, CapOffsets { pcie, aer }, msi))
}

fn validate(config: &RootPortConfig) -> Result<()> {
    if config.slot_number > MAX_SLOT_NUMBER {
        return Err(RootPortError::InvalidSlotNumber {
            slot: config.slot_number,
        });
    }
    let BusNumbers {
        primary,
        secondary,
        subordinate,
    } = config.buses;
    if secondary <= primary || subordinate < secondary {
        return Err(RootPortError::InvalidBusNumbers {
            primary,
            secondary,
            subordinate,
        });
    }
    let mmio32 = config.windows.mmio32;
    let below_4g = mmio32
        .last()
        .is_some_and(|last| last <= u64::from(u32::MAX));
    if !header::is_valid_window(&mmio32) || !below_4g {
        return Err(RootPortError::InvalidMmio32Window {
            base: mmio32.base,
            size: mmio32.size,
        });
    }
    let mmio64 = config.windows.mmio64;
    if !header::is_valid_window(&mmio64) {
        return Err(RootPortError::InvalidMmio64Window {
            base: mmio64.base,
            size: mmio64.size,
        });
    }
    if let Some(io) = config
        .windows
        .io
        .filter(|io| !header::is_valid_io_window(io))
    {
        return Err(RootPortError::InvalidIoWindow {
            base: io.base,
            size: io.size,
        });
    }
    Ok(())
}

impl PciDevice for RootPort {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.cfg.read_register(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let before = self.snapshot();
        if let Some(access) = self.cfg.write_register(reg, offset, data) {
            self.after_guest_write(access, before);
        }
    }
}

/// Shorthand used by tests across the crate: a port with the given windows and buses.
#[cfg(test)]
pub(crate) fn test_config(index: usize) -> RootPortConfig {
    let mib = 1u64 << 20;
    RootPortConfig {
        index,
        buses: BusNumbers {
            primary: 0,
            secondary: index as u8 + 1,
            subordinate: index as u8 + 1,
        },
        slot_number: index as u16 + 1,
        port_number: index as u8 + 1,
        windows: PortWindows {
            mmio32: AddressRange::new(0xc000_0000 + index as u64 * 16 * mib, 16 * mib),
            mmio64: AddressRange::new(0x80_0000_0000 + index as u64 * 1024 * mib, 1024 * mib),
            io: Some(AddressRange::new(0x1000 + index as u64 * 0x1000, 0x1000)),
        },
        link_speed: LinkSpeed::Gen4,
        link_width: LinkWidth::X16,
        multi_function: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::*;
    use crate::msi::tests::RecordingSender;
    use crate::root_port::slot::tests::NullEvents;

    fn port() -> RootPort {
        RootPort::new(
            test_config(2),
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        )
        .unwrap()
    }

    fn write(port: &mut RootPort, offset: usize, data: &[u8]) {
        port.write_config_register(offset / 4, (offset % 4) as u64, data);
    }

    #[test]
    fn identifies_as_the_generic_root_port() {
        let mut port = port();
        assert_eq!(port.read_config_register(0), 0x000c_1b36);
        assert_eq!(port.read_config_register(2) >> 8, ROOT_PORT_CLASS);
        assert_eq!(port.cfg.read_u8(HEADER_TYPE), 1);
    }

    #[test]
    fn has_no_interrupt_pin() {
        let mut port = port();
        assert_eq!(port.read_config_register(0xf) & 0xff00, 0);
    }

    #[test]
    fn bus_numbers_are_pre_programmed() {
        let mut port = port();
        assert_eq!(port.read_config_register(6) & 0xff_ffff, 0x03_0300);
    }

    #[test]
    fn bus_numbers_follow_guest_writes() {
        let mut port = port();
        write(&mut port, PRIMARY_BUS, &[0, 7, 9, 0]);
        assert_eq!(port.bus_numbers().secondary, 7);
        assert_eq!(port.bus_numbers().subordinate, 9);
    }

    #[test]
    fn bridge_windows_are_pre_programmed() {
        let port = port();
        assert_eq!(port.cfg.read_u16(MEMORY_BASE), 0xc200);
        assert_eq!(port.cfg.read_u16(MEMORY_LIMIT), 0xc2f0);
        assert_eq!(port.cfg.read_u16(PREF_MEMORY_BASE), 0x8001);
        assert_eq!(port.cfg.read_u16(PREF_MEMORY_LIMIT), 0xbff1);
        assert_eq!(port.cfg.read_u32(PREF_BASE_UPPER), 0x80);
        assert_eq!(port.cfg.read_u32(PREF_LIMIT_UPPER), 0x80);
        let windows = port.windows();
        assert_eq!(
            port.programmed_windows(),
            (Some(windows.mmio32), Some(windows.mmio64))
        );
    }

    #[test]
    fn bridge_windows_are_guest_writable() {
        let mut port = port();
        write(&mut port, MEMORY_BASE, &0xd010_d000u32.to_le_bytes());
        write(&mut port, PREF_BASE_UPPER, &1u32.to_le_bytes());
        write(&mut port, PREF_LIMIT_UPPER, &1u32.to_le_bytes());
        write(&mut port, PREF_MEMORY_BASE, &0x0000_0000u32.to_le_bytes());
        let (mmio32, mmio64) = port.programmed_windows();
        assert_eq!(mmio32, Some(AddressRange::new(0xd000_0000, 0x20_0000)));
        assert_eq!(mmio64, Some(AddressRange::new(0x1_0000_0000, 0x10_0000)));
    }

    #[test]
    fn command_register_accepts_io_memory_bus_master_and_intx_disable() {
        let mut port = port();
        write(&mut port, COMMAND, &[0x0f, 0x04]);
        assert_eq!(
            port.cfg.read_u16(COMMAND),
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
    }

    #[test]
    fn bridge_control_keeps_only_implemented_bits() {
        let mut port = port();
        write(&mut port, BRIDGE_CONTROL, &[0xff, 0xff]);
        assert_eq!(port.cfg.read_u16(BRIDGE_CONTROL), BRIDGE_CONTROL_WRITABLE);
    }

    #[test]
    fn capabilities_are_pcie_then_msi_then_aer() {
        let port = port();
        let caps: Vec<u8> = port.cfg.capabilities().iter().map(|c| c.0).collect();
        assert_eq!(caps, vec![0x10, 0x05]);
        let ext: Vec<u16> = port
            .cfg
            .extended_capabilities()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(ext, vec![crate::aer::AER_CAP_ID]);
    }

    #[test]
    fn empty_slot_reads_all_ones_downstream() {
        let port = port();
        assert_eq!(port.read_downstream(3, 0, 0, 0), ABSENT);
    }

    #[test]
    fn invalid_slot_number_is_refused() {
        let mut config = test_config(0);
        config.slot_number = 0x2000;
        let err = RootPort::new(
            config,
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        );
        assert_eq!(
            err.err(),
            Some(RootPortError::InvalidSlotNumber { slot: 0x2000 })
        );
    }

    #[test]
    fn invalid_bus_numbers_are_refused() {
        let mut config = test_config(0);
        config.buses.secondary = 0;
        let err = RootPort::new(
            config,
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        );
        assert!(matches!(err, Err(RootPortError::InvalidBusNumbers { .. })));
    }

    #[test]
    fn mmio32_window_above_4g_is_refused() {
        let mut config = test_config(0);
        config.windows.mmio32 = AddressRange::new(0xfff0_0000, 0x20_0000);
        let err = RootPort::new(
            config,
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        );
        assert!(matches!(
            err,
            Err(RootPortError::InvalidMmio32Window { .. })
        ));
    }

    #[test]
    fn unaligned_mmio64_window_is_refused() {
        let mut config = test_config(0);
        config.windows.mmio64 = AddressRange::new(0x1_0008_0000, 0x10_0000);
        let err = RootPort::new(
            config,
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        );
        assert!(matches!(
            err,
            Err(RootPortError::InvalidMmio64Window { .. })
        ));
    }
}
