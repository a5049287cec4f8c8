//! The guest-visible BAR and expansion-ROM registers of a passthrough device.
//!
//! The guest never sees the host addresses: each BAR register is a local copy holding the address
//! the guest (or the VMM, acting as firmware) assigned, with the read-only type bits of the real
//! BAR. Sizing works like hardware: address bits below the BAR size read as zero, so writing all
//! ones reads back the size mask.

use thiserror::Error;

use crate::access::merge_write;

/// Number of BAR registers in a type 0 header.
pub const NUM_BARS: usize = 6;
/// Config register (dword) index of BAR 0.
pub const BAR0_REG: usize = 4;
/// Config register (dword) index of the expansion ROM BAR.
pub const ROM_REG: usize = 12;

const MEM_FLAGS_MASK: u32 = 0xf;
const IO_FLAGS_MASK: u32 = 0x3;
const ROM_ENABLE: u32 = 1;
const ROM_ADDR_MASK: u32 = 0xffff_f800;
const MIN_MEM_BAR: u64 = 16;
const MIN_IO_BAR: u64 = 4;
const MIN_ROM: u64 = 2048;

/// Errors of BAR probing.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BarError {
    /// A BAR is larger than its type can decode.
    #[error("BAR {index} of {size:#x} bytes does not fit its {kind:?} register")]
    TooLarge {
        /// BAR index.
        index: usize,
        /// Size reported by VFIO.
        size: u64,
        /// Type of the BAR.
        kind: BarKind,
    },
}

/// The kind of a BAR, decoded from the low bits of the real register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory.
    Mem32 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// 64-bit memory, occupying this register and the next.
    Mem64 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
}

impl BarKind {
    fn decode(raw: u32) -> Self {
        if raw & 1 == 1 {
            return BarKind::Io;
        }
        let prefetchable = raw & 0x8 != 0;
        if (raw >> 1) & 0x3 == 0x2 {
            BarKind::Mem64 { prefetchable }
        } else {
            BarKind::Mem32 { prefetchable }
        }
    }

    /// Whether the BAR decodes memory (as opposed to I/O) space.
    pub fn is_memory(&self) -> bool {
        !matches!(self, BarKind::Io)
    }
}

/// One implemented BAR as the VMM's allocator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index (0..6); a 64-bit BAR also uses `index + 1`.
    pub index: usize,
    /// Type.
    pub kind: BarKind,
    /// Guest-visible size: the host size rounded up to a power of two (and the minimum the
    /// type allows). The BAR must be placed at a multiple of it.
    pub size: u64,
    /// Size of the host region backing it (at most `size`).
    pub host_size: u64,
}

/// The guest-visible BAR registers and expansion ROM register.
#[derive(Clone, Debug)]
pub struct Bars {
    regs: [u32; NUM_BARS],
    bars: [Option<BarInfo>; NUM_BARS],
    rom_reg: u32,
    rom: Option<(u64, u64)>,
}

fn guest_size(host_size: u64, min: u64) -> Option<u64> {
    host_size.max(min).checked_next_power_of_two()
}

impl Bars {
    /// Builds the BARs from the real registers `raw` (for their type bits), the VFIO region sizes
    /// of BARs 0..6 and of the ROM region. A BAR whose region size is zero is unimplemented; a
    /// 64-bit BAR in the last slot is treated as unimplemented.
    pub fn new(
        raw: [u32; NUM_BARS],
        sizes: [u64; NUM_BARS],
        rom_size: u64,
    ) -> Result<Self, BarError> {
        let mut bars = [None; NUM_BARS];
        let mut regs = [0u32; NUM_BARS];
        let mut index = 0;
        while index < NUM_BARS {
            let kind = BarKind::decode(raw[index]);
            let host_size = sizes[index];
            let step = if matches!(kind, BarKind::Mem64 { .. }) {
                2
            } else {
                1
            };
            if host_size == 0 {
                index += step;
                continue;
            }
            if step == 2 && index + 1 >= NUM_BARS {
                log::warn!("64-bit BAR {index} has no upper half; hiding it");
                break;
            }
            let min = if kind.is_memory() {
                MIN_MEM_BAR
            } else {
                MIN_IO_BAR
            };
            let limit = match kind {
                BarKind::Mem64 { .. } => 1u64 << 63,
                _ => 1u64 << 31,
            };
            let size =
                guest_size(host_size, min)
                    .filter(|&s| s <= limit)
                    .ok_or(BarError::TooLarge {
                        index,
                        size: host_size,
                        kind,
                    })?;
            regs[index] = raw[index]
                & if kind.is_memory() {
                    MEM_FLAGS_MASK
                } else {
                    IO_FLAGS_MASK & 1
                };
            bars[index] = Some(BarInfo {
                index,
                kind,
                size,
                host_size,
            });
            index += step;
        }
        let rom = if rom_size == 0 {
            None
        } else {
            let size = guest_size(rom_size, MIN_ROM)
                .filter(|&s| s <= 1 << 31)
                .ok_or(BarError::TooLarge {
                    index: NUM_BARS,
                    size: rom_size,
                    kind: BarKind::Mem32 {
                        prefetchable: false,
                    },
                })?;
            Some((size, rom_size))
        };
        Ok(Self {
            regs,
            bars,
            rom_reg: 0,
            rom,
        })
    }

    /// The implemented BARs, in index order.
    pub fn infos(&self) -> impl Iterator<Item = &BarInfo> {
        self.bars.iter().flatten()
    }

    /// The BAR starting at `index`, if implemented.
    pub fn info(&self, index: usize) -> Option<&BarInfo> {
        self.bars.get(index).and_then(Option::as_ref)
    }

    /// The guest-visible size and the host size of the expansion ROM, if present.
    pub fn rom_size(&self) -> Option<(u64, u64)> {
        self.rom
    }

    /// Which BAR a register belongs to: (BAR index, whether it is the upper half of a 64-bit BAR).
    fn owner(&self, bar_reg: usize) -> Option<(BarInfo, bool)> {
        if let Some(info) = self.info(bar_reg) {
            return Some((*info, false));
        }
        let lower = self.info(bar_reg.checked_sub(1)?)?;
        matches!(lower.kind, BarKind::Mem64 { .. }).then_some((*lower, true))
    }

    /// Reads BAR register `bar_reg` (0..6).
    pub fn read(&self, bar_reg: usize) -> u32 {
        if self.owner(bar_reg).is_none() {
            return 0;
        }
        self.regs.get(bar_reg).copied().unwrap_or(0)
    }

    /// Writes `data` at byte `offset` of BAR register `bar_reg`. Returns whether the register
    /// value changed.
    pub fn write(&mut self, bar_reg: usize, offset: u64, data: &[u8]) -> bool {
        let Some((info, upper)) = self.owner(bar_reg) else {
            return false;
        };
        let Some(old) = self.regs.get(bar_reg).copied() else {
            return false;
        };
        let Some(value) = merge_write(old, offset, data) else {
            return false;
        };
        let addr_mask = !(info.size - 1);
        let new = if upper {
            value & (addr_mask >> 32) as u32
        } else {
            let flags = if info.kind.is_memory() {
                MEM_FLAGS_MASK
            } else {
                IO_FLAGS_MASK
            };
            (value & addr_mask as u32 & !flags) | (old & flags)
        };
        if let Some(reg) = self.regs.get_mut(bar_reg) {
            *reg = new;
        }
        new != old
    }

    /// The guest address BAR `index` currently holds (as programmed, whether or not decoding is
    /// enabled).
    pub fn address(&self, index: usize) -> Option<u64> {
        let info = self.info(index)?;
        let low = self.regs.get(index).copied()?;
        let flags = if info.kind.is_memory() {
            MEM_FLAGS_MASK
        } else {
            IO_FLAGS_MASK
        };
        let mut addr = u64::from(low & !flags);
        if matches!(info.kind, BarKind::Mem64 { .. }) {
            addr |= u64::from(self.regs.get(index + 1).copied()?) << 32;
        }
        Some(addr)
    }

    /// Programs BAR `index` to `addr` as firmware would (the VMM's allocator placing it).
    /// Bits below the BAR size are dropped. Returns false for an unimplemented BAR.
    pub fn set_address(&mut self, index: usize, addr: u64) -> bool {
        let Some(info) = self.info(index).copied() else {
            return false;
        };
        let low = (addr as u32).to_le_bytes();
        self.write(index, 0, &low);
        if matches!(info.kind, BarKind::Mem64 { .. }) {
            self.write(index + 1, 0, &((addr >> 32) as u32).to_le_bytes());
        }
        true
    }

    /// Reads the expansion ROM register.
    pub fn read_rom(&self) -> u32 {
        if self.rom.is_some() {
            self.rom_reg
        } else {
            0
        }
    }

    /// Writes the expansion ROM register. Returns whether its value changed.
    pub fn write_rom(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some((size, _)) = self.rom else {
            return false;
        };
        let Some(value) = merge_write(self.rom_reg, offset, data) else {
            return false;
        };
        let new = value & ((!(size - 1) as u32 & ROM_ADDR_MASK) | ROM_ENABLE);
        let changed = new != self.rom_reg;
        self.rom_reg = new;
        changed
    }

    /// The guest address of the expansion ROM when its enable bit is set.
    pub fn rom_address(&self) -> Option<u64> {
        (self.rom.is_some() && self.rom_reg & ROM_ENABLE != 0)
            .then_some(u64::from(self.rom_reg & ROM_ADDR_MASK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_ONES: [u8; 4] = [0xff; 4];

    fn bars(raw: [u32; 6], sizes: [u64; 6], rom: u64) -> Bars {
        Bars::new(raw, sizes, rom).unwrap()
    }

    #[test]
    fn sizing_a_32_bit_bar_reads_back_its_size_mask() {
        let mut b = bars([0, 0, 0, 0, 0, 0], [0x4000, 0, 0, 0, 0, 0], 0);
        b.write(0, 0, &ALL_ONES);
        assert_eq!(b.read(0), 0xffff_c000);
    }

    #[test]
    fn sizing_keeps_the_prefetchable_bit() {
        let mut b = bars([0x8, 0, 0, 0, 0, 0], [0x100000, 0, 0, 0, 0, 0], 0);
        b.write(0, 0, &ALL_ONES);
        assert_eq!(b.read(0), 0xfff0_0008);
    }

    #[test]
    fn sizing_a_64_bit_bar_uses_both_registers() {
        let mut b = bars([0xc, 0, 0, 0, 0, 0], [0x2_0000_0000, 0, 0, 0, 0, 0], 0);
        b.write(0, 0, &ALL_ONES);
        b.write(1, 0, &ALL_ONES);
        assert_eq!(b.read(0), 0x0000_000c);
        assert_eq!(b.read(1), 0xffff_fffe);
    }

    #[test]
    fn relocating_a_64_bit_bar_reports_the_full_address() {
        let mut b = bars([0x4, 0, 0, 0, 0, 0], [0x4000, 0, 0, 0, 0, 0], 0);
        assert!(b.write(0, 0, &0xfebf_0000u32.to_le_bytes()));
        assert!(b.write(1, 0, &0x1u32.to_le_bytes()));
        assert_eq!(b.address(0), Some(0x1_febf_0000));
    }

    #[test]
    fn address_bits_below_the_size_are_dropped() {
        let mut b = bars([0, 0, 0, 0, 0, 0], [0x1000, 0, 0, 0, 0, 0], 0);
        b.write(0, 0, &0xfebf_0ff0u32.to_le_bytes());
        assert_eq!(b.address(0), Some(0xfebf_0000));
    }

    #[test]
    fn unimplemented_bar_reads_zero_and_ignores_writes() {
        let mut b = bars([0, 0, 0, 0, 0, 0], [0x1000, 0, 0, 0, 0, 0], 0);
        assert!(!b.write(2, 0, &ALL_ONES));
        assert_eq!(b.read(2), 0);
        assert_eq!(b.read(17), 0);
    }

    #[test]
    fn host_size_not_a_power_of_two_is_rounded_up() {
        let b = bars([0, 0, 0, 0, 0, 0], [0x3000, 0, 0, 0, 0, 0], 0);
        assert_eq!(b.info(0).map(|i| i.size), Some(0x4000));
    }

    #[test]
    fn io_bar_sizing_keeps_the_io_bit() {
        let mut b = bars([0x1, 0, 0, 0, 0, 0], [0x20, 0, 0, 0, 0, 0], 0);
        b.write(0, 0, &ALL_ONES);
        assert_eq!(b.read(0), 0xffff_ffe1);
    }

    #[test]
    fn sixty_four_bit_bar_in_the_last_slot_is_hidden() {
        let b = bars([0, 0, 0, 0, 0, 0x4], [0, 0, 0, 0, 0, 0x1000], 0);
        assert_eq!(b.infos().count(), 0);
    }

    #[test]
    fn oversized_32_bit_bar_is_refused() {
        let err = Bars::new([0; 6], [1 << 33, 0, 0, 0, 0, 0], 0).unwrap_err();
        assert!(matches!(err, BarError::TooLarge { index: 0, .. }));
    }

    #[test]
    fn byte_write_to_a_bar_merges_with_the_current_value() {
        let mut b = bars([0, 0, 0, 0, 0, 0], [0x1000, 0, 0, 0, 0, 0], 0);
        b.set_address(0, 0xfe00_0000);
        b.write(0, 3, &[0xfd]);
        assert_eq!(b.address(0), Some(0xfd00_0000));
    }

    #[test]
    fn rom_sizing_reads_back_the_size_mask_without_enable() {
        let mut b = bars([0; 6], [0; 6], 0x10000);
        b.write_rom(0, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(b.read_rom(), 0xffff_0000);
        assert_eq!(b.rom_address(), None);
    }

    #[test]
    fn enabled_rom_reports_its_address() {
        let mut b = bars([0; 6], [0; 6], 0x8000);
        b.write_rom(0, &0xfeb0_0001u32.to_le_bytes());
        assert_eq!(b.rom_address(), Some(0xfeb0_0000));
    }

    #[test]
    fn absent_rom_reads_zero() {
        let mut b = bars([0; 6], [0; 6], 0);
        assert!(!b.write_rom(0, &ALL_ONES));
        assert_eq!(b.read_rom(), 0);
    }
}
