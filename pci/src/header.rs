//! Type 0 (endpoint) and type 1 (PCI-to-PCI bridge) configuration headers.
//!
//! The helpers build a [`ConfigSpace`] with the identification registers and the spec's write
//! masks, and read or program a bridge's bus numbers and memory windows.

use crate::allocator::AddressRange;
use crate::config::ConfigSpace;

/// Vendor ID register.
pub const VENDOR_ID: usize = 0x00;
/// Device ID register.
pub const DEVICE_ID: usize = 0x02;
/// Command register.
pub const COMMAND: usize = 0x04;
/// Status register.
pub const STATUS: usize = 0x06;
/// Revision ID register (the class code follows in the same dword).
pub const REVISION_ID: usize = 0x08;
/// Cache Line Size register.
pub const CACHE_LINE_SIZE: usize = 0x0c;
/// Header Type register.
pub const HEADER_TYPE: usize = 0x0e;
/// Subsystem Vendor ID (type 0).
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID (type 0).
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Capabilities Pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt Line register.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt Pin register.
pub const INTERRUPT_PIN: usize = 0x3d;

/// Primary Bus Number (type 1).
pub const PRIMARY_BUS: usize = 0x18;
/// Secondary Bus Number (type 1).
pub const SECONDARY_BUS: usize = 0x19;
/// Subordinate Bus Number (type 1).
pub const SUBORDINATE_BUS: usize = 0x1a;
/// I/O Base (type 1).
pub const IO_BASE: usize = 0x1c;
/// I/O Limit (type 1).
pub const IO_LIMIT: usize = 0x1d;
/// I/O window granularity and alignment.
pub const IO_WINDOW_GRANULARITY: u64 = 0x1000;
/// Writable bits of the 8-bit I/O base/limit registers (address bits 15:12; bits 3:0 = 0 say
/// 16-bit decode, the upper 16 bits registers stay zero).
const IO_WINDOW_ADDR_MASK: u8 = 0xf0;
/// Secondary Status (type 1).
pub const SECONDARY_STATUS: usize = 0x1e;
/// Memory Base (type 1).
pub const MEMORY_BASE: usize = 0x20;
/// Memory Limit (type 1).
pub const MEMORY_LIMIT: usize = 0x22;
/// Prefetchable Memory Base (type 1).
pub const PREF_MEMORY_BASE: usize = 0x24;
/// Prefetchable Memory Limit (type 1).
pub const PREF_MEMORY_LIMIT: usize = 0x26;
/// Prefetchable Base Upper 32 Bits (type 1).
pub const PREF_BASE_UPPER: usize = 0x28;
/// Prefetchable Limit Upper 32 Bits (type 1).
pub const PREF_LIMIT_UPPER: usize = 0x2c;
/// Bridge Control (type 1).
pub const BRIDGE_CONTROL: usize = 0x3e;

/// Command: I/O Space Enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command: Memory Space Enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: Bus Master Enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: Parity Error Response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# Enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: Interrupt Disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status bits that are RW1C: Master Data Parity Error, Signaled/Received Target Abort,
/// Received Master Abort, Signaled System Error, Detected Parity Error.
pub const STATUS_RW1C: u16 = 0xf900;
/// Header Type: multi-function device.
pub const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;
/// Bridge Control: Secondary Bus Reset.
pub const BRIDGE_CONTROL_SECONDARY_BUS_RESET: u16 = 1 << 6;
/// Bridge Control bits we implement: Parity Error Response, SERR# Enable, Master Abort Mode,
/// Secondary Bus Reset.
pub const BRIDGE_CONTROL_WRITABLE: u16 = 0x0063;
/// Writable bits of the 16-bit memory base/limit registers (address bits 31:20).
const WINDOW_ADDR_MASK: u16 = 0xfff0;
/// Prefetchable base/limit type field: 64-bit addressing.
const PREF_64BIT: u16 = 0x1;
/// Bridge windows are 1 MiB granular.
pub const WINDOW_GRANULARITY: u64 = 1 << 20;

/// Identification of a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// 24-bit class code: class, subclass, programming interface.
    pub class_code: u32,
}

fn common_header(ids: &PciIds, header_type: u8, multi_function: bool) -> ConfigSpace {
    let mut cfg = ConfigSpace::new();
    cfg.set_u16(VENDOR_ID, ids.vendor_id);
    cfg.set_u16(DEVICE_ID, ids.device_id);
    cfg.set_u32(
        REVISION_ID,
        ((ids.class_code & 0x00ff_ffff) << 8) | u32::from(ids.revision),
    );
    let mf = if multi_function {
        HEADER_TYPE_MULTI_FUNCTION
    } else {
        0
    };
    cfg.set_u8(HEADER_TYPE, header_type | mf);
    cfg.set_rw1c_u16(STATUS, STATUS_RW1C);
    cfg.set_writable_u8(CACHE_LINE_SIZE, 0xff);
    cfg.set_writable_u8(INTERRUPT_LINE, 0xff);
    cfg
}

/// Builds a type 0 header without BARs, interrupt pin or capabilities. Command bits I/O,
/// memory, bus master, parity, SERR# and interrupt disable are writable.
pub fn type0(
    ids: &PciIds,
    subsystem_vendor_id: u16,
    subsystem_id: u16,
    multi_function: bool,
) -> ConfigSpace {
    let mut cfg = common_header(ids, 0, multi_function);
    cfg.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id);
    cfg.set_u16(SUBSYSTEM_ID, subsystem_id);
    cfg.set_writable_u16(
        COMMAND,
        COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE,
    );
    cfg
}

/// Builds a type 1 (bridge) header with writable bus numbers, a 16-bit I/O window, a 32-bit
/// memory window and a 64-bit prefetchable window. Command bits I/O, memory, bus master,
/// parity, SERR# and interrupt disable are writable; windows start closed (base above limit).
pub fn type1(ids: &PciIds, multi_function: bool) -> ConfigSpace {
    let mut cfg = common_header(ids, 1, multi_function);
    cfg.set_writable_u16(
        COMMAND,
        COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE,
    );
    cfg.set_writable_u8(IO_BASE, IO_WINDOW_ADDR_MASK);
    cfg.set_writable_u8(IO_LIMIT, IO_WINDOW_ADDR_MASK);
    set_io_window(&mut cfg, None);
    // Primary, secondary and subordinate bus; the secondary latency timer is zero on PCIe.
    for reg in [PRIMARY_BUS, SECONDARY_BUS, SUBORDINATE_BUS] {
        cfg.set_writable_u8(reg, 0xff);
    }
    cfg.set_rw1c_u16(SECONDARY_STATUS, STATUS_RW1C);
    cfg.set_writable_u16(MEMORY_BASE, WINDOW_ADDR_MASK);
    cfg.set_writable_u16(MEMORY_LIMIT, WINDOW_ADDR_MASK);
    cfg.set_writable_u16(PREF_MEMORY_BASE, WINDOW_ADDR_MASK);
    cfg.set_writable_u16(PREF_MEMORY_LIMIT, WINDOW_ADDR_MASK);
    cfg.set_writable_u32(PREF_BASE_UPPER, 0xffff_ffff);
    cfg.set_writable_u32(PREF_LIMIT_UPPER, 0xffff_ffff);
    cfg.set_writable_u16(BRIDGE_CONTROL, BRIDGE_CONTROL_WRITABLE);
    set_memory_window(&mut cfg, None);
    set_prefetchable_window(&mut cfg, None);
    cfg
}

/// Bus numbers of a bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusNumbers {
    /// Bus the bridge sits on.
    pub primary: u8,
    /// Bus directly behind the bridge.
    pub secondary: u8,
    /// Highest bus behind the bridge.
    pub subordinate: u8,
}

impl BusNumbers {
    /// Whether `bus` is behind the bridge (secondary..=subordinate). A bridge whose secondary
    /// bus is zero has not been assigned numbers and claims nothing.
    pub fn routes(&self, bus: u8) -> bool {
        self.secondary != 0 && (self.secondary..=self.subordinate).contains(&bus)
    }
}

/// Reads a bridge's bus numbers.
pub fn bus_numbers(cfg: &ConfigSpace) -> BusNumbers {
    BusNumbers {
        primary: cfg.read_u8(PRIMARY_BUS),
        secondary: cfg.read_u8(SECONDARY_BUS),
        subordinate: cfg.read_u8(SUBORDINATE_BUS),
    }
}

/// Programs a bridge's bus numbers.
pub fn set_bus_numbers(cfg: &mut ConfigSpace, buses: BusNumbers) {
    cfg.set_u8(PRIMARY_BUS, buses.primary);
    cfg.set_u8(SECONDARY_BUS, buses.secondary);
    cfg.set_u8(SUBORDINATE_BUS, buses.subordinate);
}

/// Whether `range` can be a bridge window: non-empty, 1 MiB aligned and sized, not wrapping.
pub fn is_valid_window(range: &AddressRange) -> bool {
    range.size != 0
        && range.base & (WINDOW_GRANULARITY - 1) == 0
        && range.size & (WINDOW_GRANULARITY - 1) == 0
        && range.last().is_some()
}

/// Programs the 32-bit memory window; `None` (or a range that is not a valid window below
/// 4 GiB) closes it.
pub fn set_memory_window(cfg: &mut ConfigSpace, range: Option<AddressRange>) {
    let window = range
        .filter(is_valid_window)
        .and_then(|r| Some((u32::try_from(r.base).ok()?, u32::try_from(r.last()?).ok()?)));
    let (base, limit) = match window {
        Some((base, last)) => ((base >> 16) as u16, (last >> 16) as u16),
        None => (WINDOW_ADDR_MASK, 0),
    };
    cfg.set_u16(MEMORY_BASE, base & WINDOW_ADDR_MASK);
    cfg.set_u16(MEMORY_LIMIT, limit & WINDOW_ADDR_MASK);
}

/// Whether `range` can be an I/O window: non-empty, 4 KiB aligned and sized, below 64 KiB.
pub fn is_valid_io_window(range: &AddressRange) -> bool {
    range.size != 0
        && range.base & (IO_WINDOW_GRANULARITY - 1) == 0
        && range.size & (IO_WINDOW_GRANULARITY - 1) == 0
        && range.last().is_some_and(|last| last <= 0xffff)
}

/// Programs the 16-bit I/O window; `None` (or a range that is not a valid I/O window) closes it.
pub fn set_io_window(cfg: &mut ConfigSpace, range: Option<AddressRange>) {
    let window = range
        .filter(is_valid_io_window)
        .and_then(|r| Some((r.base, r.last()?)));
    let (base, limit) = match window {
        Some((base, last)) => ((base >> 8) as u8, (last >> 8) as u8),
        None => (IO_WINDOW_ADDR_MASK, 0),
    };
    cfg.set_u8(IO_BASE, base & IO_WINDOW_ADDR_MASK);
    cfg.set_u8(IO_LIMIT, limit & IO_WINDOW_ADDR_MASK);
}

/// The I/O window as currently programmed; `None` when closed (base above limit).
pub fn io_window(cfg: &ConfigSpace) -> Option<AddressRange> {
    let base = u64::from(cfg.read_u8(IO_BASE) & IO_WINDOW_ADDR_MASK) << 8;
    let last = (u64::from(cfg.read_u8(IO_LIMIT) & IO_WINDOW_ADDR_MASK) << 8) | 0xfff;
    (base <= last).then(|| AddressRange::new(base, last - base + 1))
}

/// The 32-bit memory window as currently programmed; `None` when closed (base above limit).
pub fn memory_window(cfg: &ConfigSpace) -> Option<AddressRange> {
    let base = u64::from(cfg.read_u16(MEMORY_BASE) & WINDOW_ADDR_MASK) << 16;
    let last = (u64::from(cfg.read_u16(MEMORY_LIMIT) & WINDOW_ADDR_MASK) << 16) | 0xf_ffff;
    (base <= last).then(|| AddressRange::new(base, last - base + 1))
}

/// Programs the 64-bit prefetchable window; `None` (or an invalid window) closes it.
pub fn set_prefetchable_window(cfg: &mut ConfigSpace, range: Option<AddressRange>) {
    let window = range
        .filter(is_valid_window)
        .and_then(|r| Some((r.base, r.last()?)));
    let (base, last) = window.unwrap_or((u64::from(WINDOW_ADDR_MASK) << 16, 0));
    cfg.set_u16(
        PREF_MEMORY_BASE,
        ((base >> 16) as u16 & WINDOW_ADDR_MASK) | PREF_64BIT,
    );
    cfg.set_u16(
        PREF_MEMORY_LIMIT,
        ((last >> 16) as u16 & WINDOW_ADDR_MASK) | PREF_64BIT,
    );
    cfg.set_u32(PREF_BASE_UPPER, (base >> 32) as u32);
    cfg.set_u32(PREF_LIMIT_UPPER, (last >> 32) as u32);
}

/// The 64-bit prefetchable window as currently programmed; `None` when closed.
pub fn prefetchable_window(cfg: &ConfigSpace) -> Option<AddressRange> {
    let base = (u64::from(cfg.read_u32(PREF_BASE_UPPER)) << 32)
        | (u64::from(cfg.read_u16(PREF_MEMORY_BASE) & WINDOW_ADDR_MASK) << 16);
    let last = (u64::from(cfg.read_u32(PREF_LIMIT_UPPER)) << 32)
        | (u64::from(cfg.read_u16(PREF_MEMORY_LIMIT) & WINDOW_ADDR_MASK) << 16)
        | 0xf_ffff;
    (base <= last).then(|| AddressRange::new(base, last - base + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor_id: 0x1b36,
        device_id: 0x000c,
        revision: 2,
        class_code: 0x06_04_00,
    };

    fn write(cfg: &mut ConfigSpace, offset: usize, data: &[u8]) {
        cfg.write_register(offset / 4, (offset % 4) as u64, data);
    }

    #[test]
    fn identification_registers_are_read_only() {
        let mut cfg = type1(&IDS, false);
        write(&mut cfg, 0, &[0xff; 4]);
        write(&mut cfg, 8, &[0xff; 4]);
        assert_eq!(cfg.read_u32(0), 0x000c_1b36);
        assert_eq!(cfg.read_u32(8), 0x0604_0002);
    }

    #[test]
    fn multi_function_bit_is_set_in_header_type() {
        assert_eq!(type1(&IDS, true).read_u8(HEADER_TYPE), 0x81);
        assert_eq!(type1(&IDS, false).read_u8(HEADER_TYPE), 0x01);
        assert_eq!(type0(&IDS, 0, 0, false).read_u8(HEADER_TYPE), 0x00);
    }

    #[test]
    fn bridge_command_register_has_io_enable() {
        let mut cfg = type1(&IDS, false);
        write(&mut cfg, COMMAND, &[0xff, 0xff]);
        assert_eq!(
            cfg.read_u16(COMMAND),
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_BUS_MASTER
                | COMMAND_PARITY
                | COMMAND_SERR
                | COMMAND_INTX_DISABLE
        );
    }

    #[test]
    fn bus_numbers_are_guest_writable() {
        let mut cfg = type1(&IDS, false);
        write(&mut cfg, PRIMARY_BUS, &[0, 5, 9, 0xff]);
        assert_eq!(
            bus_numbers(&cfg),
            BusNumbers {
                primary: 0,
                secondary: 5,
                subordinate: 9
            }
        );
        assert_eq!(cfg.read_u8(0x1b), 0);
    }

    #[test]
    fn io_window_is_16_bit_and_starts_closed() {
        let mut cfg = type1(&IDS, false);
        assert_eq!(io_window(&cfg), None);
        write(&mut cfg, IO_BASE, &[0x2f, 0x3f]);
        write(&mut cfg, 0x30, &[0xff; 4]);
        assert_eq!(cfg.read_u16(IO_BASE), 0x3020);
        assert_eq!(cfg.read_u32(0x30), 0);
        assert_eq!(io_window(&cfg), Some(AddressRange::new(0x2000, 0x2000)));
    }

    #[test]
    fn io_window_round_trips_and_invalid_ones_close_it() {
        let mut cfg = type1(&IDS, false);
        let range = AddressRange::new(0xf000, 0x1000);
        set_io_window(&mut cfg, Some(range));
        assert_eq!(io_window(&cfg), Some(range));
        set_io_window(&mut cfg, Some(AddressRange::new(0x1800, 0x1000)));
        assert_eq!(io_window(&cfg), None);
        set_io_window(&mut cfg, Some(AddressRange::new(0xf000, 0x2000)));
        assert_eq!(io_window(&cfg), None);
    }

    #[test]
    fn memory_window_round_trips() {
        let mut cfg = type1(&IDS, false);
        let range = AddressRange::new(0xc010_0000, 0x20_0000);
        set_memory_window(&mut cfg, Some(range));
        assert_eq!(cfg.read_u16(MEMORY_BASE), 0xc010);
        assert_eq!(cfg.read_u16(MEMORY_LIMIT), 0xc020);
        assert_eq!(memory_window(&cfg), Some(range));
    }

    #[test]
    fn memory_window_low_nibbles_are_read_only() {
        let mut cfg = type1(&IDS, false);
        write(&mut cfg, MEMORY_BASE, &[0xff; 4]);
        assert_eq!(cfg.read_u32(MEMORY_BASE), 0xfff0_fff0);
    }

    #[test]
    fn prefetchable_window_is_64_bit_and_round_trips() {
        let mut cfg = type1(&IDS, false);
        let range = AddressRange::new(0x80_0000_0000, 0x4000_0000);
        set_prefetchable_window(&mut cfg, Some(range));
        assert_eq!(cfg.read_u16(PREF_MEMORY_BASE), 0x0001);
        assert_eq!(cfg.read_u16(PREF_MEMORY_LIMIT), 0x3ff1);
        assert_eq!(cfg.read_u32(PREF_BASE_UPPER), 0x80);
        assert_eq!(cfg.read_u32(PREF_LIMIT_UPPER), 0x80);
        assert_eq!(prefetchable_window(&cfg), Some(range));
    }

    #[test]
    fn prefetchable_type_nibble_survives_guest_writes() {
        let mut cfg = type1(&IDS, false);
        write(&mut cfg, PREF_MEMORY_BASE, &[0; 4]);
        assert_eq!(cfg.read_u32(PREF_MEMORY_BASE), 0x0001_0001);
    }

    #[test]
    fn new_bridge_windows_are_closed() {
        let cfg = type1(&IDS, false);
        assert_eq!(memory_window(&cfg), None);
        assert_eq!(prefetchable_window(&cfg), None);
    }

    #[test]
    fn invalid_window_closes_it() {
        let mut cfg = type1(&IDS, false);
        set_memory_window(&mut cfg, Some(AddressRange::new(0xfff0_0000, 0x20_0000)));
        assert_eq!(memory_window(&cfg), None);
        set_memory_window(&mut cfg, Some(AddressRange::new(0x1000, 0x10_0000)));
        assert_eq!(memory_window(&cfg), None);
    }

    #[test]
    fn bus_numbers_route_their_range_only() {
        let buses = BusNumbers {
            primary: 0,
            secondary: 3,
            subordinate: 5,
        };
        assert!(!buses.routes(2));
        assert!(buses.routes(3) && buses.routes(5));
        assert!(!buses.routes(6));
        let unassigned = BusNumbers {
            primary: 0,
            secondary: 0,
            subordinate: 0xff,
        };
        assert!(!unassigned.routes(0) && !unassigned.routes(1));
    }
}
