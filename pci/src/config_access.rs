//! Bus front-ends to a [`PciSegment`]'s configuration space: configuration mechanism #1
//! (ports 0xCF8/0xCFC) and ECAM (memory mapped).

use std::sync::Arc;

use rvmm_devices::BusDevice;
use rvmm_devices::{warn_throttled, LogThrottle};

use crate::config::ConfigAccess;
use crate::segment::{PciSegment, ECAM_BUS_SIZE};

/// First I/O port of configuration mechanism #1.
pub const PIO_CONFIG_BASE: u64 = 0xcf8;
/// Number of I/O ports of configuration mechanism #1 (address dword, data dword).
pub const PIO_CONFIG_LEN: u64 = 8;
/// Address register: configuration space access enable.
const ADDRESS_ENABLE: u32 = 1 << 31;

/// One decoded config access: function, dword register and byte offset in it.
#[derive(Clone, Copy, Debug)]
struct Target {
    bus: u8,
    device: u8,
    function: u8,
    reg: usize,
    byte: u64,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{} register {:#x} offset {}",
            self.bus, self.device, self.function, self.reg, self.byte
        )
    }
}

/// Reads the target register and extracts the bytes of the access into `data`; an invalid
/// access size or a dword crossing reads as zero (and is logged, throttled).
fn read_into(segment: &PciSegment, throttle: &mut LogThrottle, t: Target, data: &mut [u8]) {
    data.fill(0);
    let Some(access) = ConfigAccess::new(t.reg, t.byte, data.len()) else {
        warn_throttled!(
            throttle,
            "ignoring config read of {} bytes at {t}",
            data.len()
        );
        return;
    };
    let value = access.extract(segment.read_config(t.bus, t.device, t.function, t.reg));
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (value >> (8 * i)) as u8;
    }
}

/// Writes `data` into the target register; an invalid access size or a dword crossing is
/// dropped (and logged, throttled).
fn write_from(segment: &PciSegment, throttle: &mut LogThrottle, t: Target, data: &[u8]) {
    if ConfigAccess::new(t.reg, t.byte, data.len()).is_none() {
        warn_throttled!(
            throttle,
            "ignoring config write of {} bytes at {t}",
            data.len()
        );
        return;
    }
    segment.write_config(t.bus, t.device, t.function, t.reg, t.byte, data);
}

/// Configuration mechanism #1: an address dword at 0xCF8 selects bus, device, function and
/// register (with bit 31 enabling the access); 0xCFC..0xCFF carry the data at any width and
/// byte offset. Accesses with the enable bit clear read all ones and write nothing.
pub struct PioConfigAccess {
    segment: Arc<PciSegment>,
    address: u32,
    throttle: LogThrottle,
}

impl PioConfigAccess {
    /// Creates the front-end; register it at [`PIO_CONFIG_BASE`] for [`PIO_CONFIG_LEN`] ports.
    pub fn new(segment: Arc<PciSegment>) -> Self {
        Self {
            segment,
            address: 0,
            throttle: LogThrottle::default(),
        }
    }

    /// The function and register selected by the address register, at data port byte `byte`.
    fn target(&self, byte: u64) -> Target {
        let a = self.address;
        Target {
            bus: (a >> 16) as u8,
            device: ((a >> 11) & 0x1f) as u8,
            function: ((a >> 8) & 0x7) as u8,
            reg: ((a >> 2) & 0x3f) as usize,
            byte,
        }
    }
}

impl BusDevice for PioConfigAccess {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if self.address & ADDRESS_ENABLE == 0 => data.fill(0xff),
            4..=7 => {
                let target = self.target(offset - 4);
                read_into(&self.segment, &mut self.throttle, target, data);
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 => match <[u8; 4]>::try_from(data) {
                Ok(bytes) => self.address = u32::from_le_bytes(bytes),
                Err(_) => warn_throttled!(
                    self.throttle,
                    "ignoring {}-byte write to the PCI config address port",
                    data.len()
                ),
            },
            4..=7 if self.address & ADDRESS_ENABLE != 0 => {
                let target = self.target(offset - 4);
                write_from(&self.segment, &mut self.throttle, target, data);
            }
            _ => {}
        }
    }
}

/// ECAM: offset `bus << 20 | device << 15 | function << 12 | register`, relative to the
/// segment's first bus. Register it at the segment's ECAM base for
/// [`PciSegment::ecam_size`] bytes.
pub struct EcamAccess {
    segment: Arc<PciSegment>,
    throttle: LogThrottle,
}

impl EcamAccess {
    /// Creates the front-end.
    pub fn new(segment: Arc<PciSegment>) -> Self {
        Self {
            segment,
            throttle: LogThrottle::default(),
        }
    }

    /// The function, register and byte an ECAM offset selects, `None` past the segment's
    /// buses.
    fn decode(&self, offset: u64) -> Option<Target> {
        let bus = u8::try_from(offset / ECAM_BUS_SIZE)
            .ok()
            .and_then(|rel| self.segment.config().bus_start.checked_add(rel))
            .filter(|&bus| bus <= self.segment.config().bus_end)?;
        Some(Target {
            bus,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
            reg: ((offset >> 2) & 0x3ff) as usize,
            byte: offset & 3,
        })
    }
}

impl BusDevice for EcamAccess {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.decode(offset) {
            Some(target) => read_into(&self.segment, &mut self.throttle, target, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(target) = self.decode(offset) {
            write_from(&self.segment, &mut self.throttle, target, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::{insert, segment};

    const ENABLE: u32 = 0x8000_0000;

    fn pio(ports: usize) -> PioConfigAccess {
        PioConfigAccess::new(Arc::new(segment(ports)))
    }

    fn select(pio: &mut PioConfigAccess, bus: u32, device: u32, function: u32, reg: u32) {
        let address = ENABLE | bus << 16 | device << 11 | function << 8 | reg << 2;
        pio.write(PIO_CONFIG_BASE, 0, &address.to_le_bytes());
    }

    fn read(dev: &mut dyn BusDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        dev.read(0, offset, &mut data);
        data
    }

    #[test]
    fn pio_address_register_reads_back() {
        let mut pio = pio(1);
        select(&mut pio, 1, 2, 3, 4);
        assert_eq!(read(&mut pio, 0, 4), 0x8001_1310u32.to_le_bytes());
    }

    #[test]
    fn pio_dword_read_returns_the_selected_register() {
        let mut pio = pio(1);
        select(&mut pio, 0, 1, 0, 0);
        assert_eq!(read(&mut pio, 4, 4), 0x000c_1b36u32.to_le_bytes());
    }

    #[test]
    fn pio_data_port_honours_byte_offsets() {
        let mut pio = pio(1);
        select(&mut pio, 0, 1, 0, 0);
        assert_eq!(read(&mut pio, 6, 2), [0x0c, 0x00]);
        assert_eq!(read(&mut pio, 5, 1), [0x1b]);
        select(&mut pio, 0, 1, 0, 2);
        assert_eq!(read(&mut pio, 7, 1), [0x06]);
    }

    #[test]
    fn pio_write_at_byte_offset_reaches_the_register() {
        let mut pio = pio(1);
        select(&mut pio, 0, 1, 0, 6);
        pio.write(PIO_CONFIG_BASE, 5, &[0x09]);
        assert_eq!(read(&mut pio, 4, 4), [0x00, 0x09, 0x01, 0x00]);
    }

    #[test]
    fn pio_disabled_address_reads_all_ones() {
        let mut pio = pio(1);
        pio.write(PIO_CONFIG_BASE, 0, &0x0000_0800u32.to_le_bytes());
        assert_eq!(read(&mut pio, 4, 4), [0xff; 4]);
        assert_eq!(read(&mut pio, 6, 1), [0xff]);
    }

    #[test]
    fn pio_disabled_address_ignores_writes() {
        let mut pio = pio(1);
        pio.write(PIO_CONFIG_BASE, 0, &0x0000_0818u32.to_le_bytes());
        pio.write(PIO_CONFIG_BASE, 4, &[0, 9, 9, 0]);
        select(&mut pio, 0, 1, 0, 6);
        assert_eq!(read(&mut pio, 4, 4), [0x00, 0x01, 0x01, 0x00]);
    }

    #[test]
    fn pio_non_dword_address_write_is_ignored() {
        let mut pio = pio(1);
        select(&mut pio, 0, 1, 0, 0);
        pio.write(PIO_CONFIG_BASE, 0, &[0x00, 0x00]);
        pio.write(PIO_CONFIG_BASE, 1, &[0xff]);
        assert_eq!(read(&mut pio, 0, 4), 0x8000_0800u32.to_le_bytes());
    }

    #[test]
    fn pio_data_access_crossing_the_dword_reads_zero() {
        let mut pio = pio(1);
        select(&mut pio, 0, 1, 0, 0);
        assert_eq!(read(&mut pio, 7, 2), [0, 0]);
        assert_eq!(read(&mut pio, 4, 3), [0, 0, 0]);
    }

    #[test]
    fn pio_absent_function_reads_all_ones() {
        let mut pio = pio(1);
        select(&mut pio, 0, 9, 0, 0);
        assert_eq!(read(&mut pio, 4, 4), [0xff; 4]);
    }

    #[test]
    fn pio_reaches_a_device_behind_a_port() {
        let seg = Arc::new(segment(2));
        insert(&seg, 1, 0x7777_8086);
        let mut pio = PioConfigAccess::new(seg);
        select(&mut pio, 2, 0, 0, 0);
        assert_eq!(read(&mut pio, 4, 4), 0x7777_8086u32.to_le_bytes());
    }

    fn ecam_offset(bus: u64, device: u64, function: u64, byte: u64) -> u64 {
        bus << 20 | device << 15 | function << 12 | byte
    }

    #[test]
    fn ecam_decodes_bus_device_function_and_register() {
        let seg = Arc::new(segment(10));
        insert(&seg, 9, 0x8888_8086);
        let mut ecam = EcamAccess::new(seg);
        assert_eq!(
            read(&mut ecam, ecam_offset(0, 2, 1, 0), 4),
            0x000c_1b36u32.to_le_bytes()
        );
        assert_eq!(
            read(&mut ecam, ecam_offset(10, 0, 0, 0), 4),
            0x8888_8086u32.to_le_bytes()
        );
        assert_eq!(
            read(&mut ecam, ecam_offset(0, 0, 0, 8), 4),
            0x0600_0000u32.to_le_bytes()
        );
    }

    #[test]
    fn ecam_honours_byte_and_word_offsets() {
        let mut ecam = EcamAccess::new(Arc::new(segment(1)));
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 0, 2), 2), [0x0c, 0x00]);
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 0, 0xb), 1), [0x06]);
    }

    #[test]
    fn ecam_reaches_extended_config_space() {
        let mut ecam = EcamAccess::new(Arc::new(segment(1)));
        // The port's AER capability header: ID 1, version 2, last in the list.
        assert_eq!(
            read(&mut ecam, ecam_offset(0, 1, 0, 0x100), 4),
            [1, 0, 2, 0]
        );
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 1, 0xffc), 4), [0xff; 4]);
    }

    #[test]
    fn ecam_write_reaches_the_port() {
        let mut ecam = EcamAccess::new(Arc::new(segment(1)));
        ecam.write(0, ecam_offset(0, 1, 0, 0x19), &[0x05]);
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 0, 0x18), 4), [0, 5, 1, 0]);
    }

    #[test]
    fn ecam_invalid_sizes_read_zero_and_write_nothing() {
        let mut ecam = EcamAccess::new(Arc::new(segment(1)));
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 0, 0), 8), [0; 8]);
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 0, 3), 2), [0; 2]);
        ecam.write(0, ecam_offset(0, 1, 0, 0x18), &[0, 7, 7]);
        assert_eq!(read(&mut ecam, ecam_offset(0, 1, 0, 0x18), 4), [0, 1, 1, 0]);
    }

    #[test]
    fn ecam_offset_past_the_bus_range_reads_all_ones() {
        let mut ecam = EcamAccess::new(Arc::new(segment(1)));
        assert_eq!(read(&mut ecam, 256 << 20, 4), [0xff; 4]);
        assert_eq!(read(&mut ecam, u64::MAX - 3, 4), [0xff; 4]);
        ecam.write(0, u64::MAX, &[1]);
    }

    /// Every register of the host bridge, both ports and the device behind one, written with
    /// several patterns at every offset and size through ECAM: nothing may panic.
    #[test]
    fn ecam_writes_of_any_pattern_never_panic() {
        let seg = Arc::new(segment(2));
        insert(&seg, 0, 0x9999_8086);
        let mut ecam = EcamAccess::new(seg.clone());
        let functions = [(0, 0, 0), (0, 1, 0), (0, 1, 1), (1, 0, 0), (0, 1, 2)];
        for pattern in [0xffu8, 0x00, 0x5a] {
            for &(bus, device, function) in &functions {
                for byte in 0..4096u64 {
                    for len in [1usize, 2, 4] {
                        let at = ecam_offset(bus, device, function, byte);
                        ecam.write(0, at, &vec![pattern; len]);
                        read(&mut ecam, at, len);
                    }
                }
            }
        }
        assert_eq!(seg.read_config(0, 0, 0, 0), 0x0008_1b36);
        assert_eq!(seg.read_config(0, 1, 1, 0), 0x000c_1b36);
    }
}
