//! Emulation of the MSI-X capability, table and PBA of a passthrough device.
//!
//! The guest programs vectors in an emulated table (the real table belongs to the host kernel,
//! which fills it when VFIO enables MSI-X). Every guest access is bounds-checked; accesses that are
//! not naturally aligned dwords or qwords inside the table are ignored (reads return zero), as
//! the PCI spec lets a device do.

use rvmm_pci::MsiMessage;

use crate::access::{merge_write, read_le};
use crate::layout::Area;

const CTRL_ENABLE: u16 = 0x8000;
const CTRL_FUNCTION_MASK: u16 = 0x4000;
const CTRL_TABLE_SIZE: u16 = 0x07ff;
const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;

/// Where the table and PBA live, decoded from the capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixInfo {
    /// Config offset of the capability.
    pub cap_offset: usize,
    /// Number of table entries (1..=2048).
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table inside its BAR.
    pub table_offset: u64,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA inside its BAR.
    pub pba_offset: u64,
}

impl MsixInfo {
    /// Decodes the capability at `cap_offset` from its three dwords.
    pub fn parse(cap_offset: usize, dwords: [u32; 3]) -> Self {
        let ctrl = (dwords[0] >> 16) as u16;
        Self {
            cap_offset,
            table_size: (ctrl & CTRL_TABLE_SIZE) + 1,
            table_bar: (dwords[1] & 0x7) as u8,
            table_offset: u64::from(dwords[1] & !0x7),
            pba_bar: (dwords[2] & 0x7) as u8,
            pba_offset: u64::from(dwords[2] & !0x7),
        }
    }

    /// The table's byte range in its BAR.
    pub fn table_area(&self) -> Area {
        Area::new(self.table_offset, u64::from(self.table_size) * ENTRY_SIZE)
    }

    /// The PBA's byte range in its BAR (one bit per vector, in qwords).
    pub fn pba_area(&self) -> Area {
        Area::new(self.pba_offset, u64::from(self.table_size).div_ceil(64) * 8)
    }

    /// The MSI-X areas (table, PBA) that live in BAR `bar`.
    pub fn holes_in(&self, bar: usize) -> Vec<Area> {
        let mut holes = Vec::new();
        if usize::from(self.table_bar) == bar {
            holes.push(self.table_area());
        }
        if usize::from(self.pba_bar) == bar {
            holes.push(self.pba_area());
        }
        holes
    }
}

/// One table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address, low dword.
    pub addr_lo: u32,
    /// Message address, high dword.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub ctrl: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctrl: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Which vectors a guest write may have changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixWrite {
    /// None.
    None,
    /// One vector's message or mask.
    Vector(u16),
    /// The enable or function-mask bit: every vector.
    Control,
}

/// The emulated MSI-X capability control and table.
#[derive(Clone, Debug)]
pub struct MsixState {
    info: MsixInfo,
    header: u16,
    ctrl: u16,
    dwords: [u32; 2],
    entries: Vec<MsixEntry>,
}

impl MsixState {
    /// Creates the state from the capability's three dwords, MSI-X disabled and all vectors
    /// masked (the reset state).
    pub fn new(cap_offset: usize, dwords: [u32; 3]) -> Self {
        let info = MsixInfo::parse(cap_offset, dwords);
        Self {
            info,
            header: dwords[0] as u16,
            ctrl: (dwords[0] >> 16) as u16 & CTRL_TABLE_SIZE,
            dwords: [dwords[1], dwords[2]],
            entries: vec![MsixEntry::default(); usize::from(info.table_size)],
        }
    }

    /// Table and PBA placement.
    pub fn info(&self) -> &MsixInfo {
        &self.info
    }

    /// Sets the header (ID and virtual next pointer) the guest reads.
    pub fn set_header(&mut self, header: u16) {
        self.header = header;
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.ctrl & CTRL_ENABLE != 0
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.ctrl & CTRL_FUNCTION_MASK != 0
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.info.table_size
    }

    /// Whether vector `v` is masked (its own bit or the function mask). Out-of-range vectors are
    /// masked.
    pub fn masked(&self, v: u16) -> bool {
        self.function_masked()
            || self
                .entries
                .get(usize::from(v))
                .is_none_or(|e| e.ctrl & VECTOR_MASKED != 0)
    }

    /// The message of vector `v`.
    pub fn message(&self, v: u16) -> MsiMessage {
        self.entries
            .get(usize::from(v))
            .map(MsixEntry::message)
            .unwrap_or_default()
    }

    /// Reads the capability dword at `rel` bytes from its start.
    pub fn read_cap(&self, rel: usize) -> u32 {
        match rel {
            0 => u32::from(self.header) | (u32::from(self.ctrl) << 16),
            4 => self.dwords[0],
            8 => self.dwords[1],
            _ => 0,
        }
    }

    /// Writes the capability dword at `rel`; only enable and function mask are writable.
    pub fn write_cap(&mut self, rel: usize, offset: u64, data: &[u8]) -> MsixWrite {
        if rel != 0 {
            return MsixWrite::None;
        }
        let Some(value) = merge_write(self.read_cap(0), offset, data) else {
            return MsixWrite::None;
        };
        let writable = CTRL_ENABLE | CTRL_FUNCTION_MASK;
        let ctrl = (self.ctrl & !writable) | ((value >> 16) as u16 & writable);
        if ctrl == self.ctrl {
            return MsixWrite::None;
        }
        self.ctrl = ctrl;
        MsixWrite::Control
    }

    /// Decodes a table access at byte `offset` of the table: (entry index, dword in entry,
    /// number of dwords). Only aligned 4- and 8-byte accesses inside the table are valid.
    fn decode(&self, offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        let dwords = match len {
            4 if offset % 4 == 0 => 1,
            8 if offset % 8 == 0 => 2,
            _ => return None,
        };
        let index = usize::try_from(offset / ENTRY_SIZE).ok()?;
        if index >= self.entries.len() {
            return None;
        }
        Some((index, (offset % ENTRY_SIZE / 4) as usize, dwords))
    }

    /// Reads `data.len()` bytes at byte `offset` of the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((index, first, count)) = self.decode(offset, data.len()) else {
            log::debug!(
                "ignored MSI-X table read at {offset:#x}, {} bytes",
                data.len()
            );
            return;
        };
        let Some(e) = self.entries.get(index) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        let value = (first..first + count).rev().fold(0u64, |acc, i| {
            (acc << 32) | u64::from(words.get(i).copied().unwrap_or(0))
        });
        read_le(value, 0, data);
    }

    /// Writes `data` at byte `offset` of the table.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> MsixWrite {
        let Some((index, first, count)) = self.decode(offset, data.len()) else {
            log::debug!(
                "ignored MSI-X table write at {offset:#x}, {} bytes",
                data.len()
            );
            return MsixWrite::None;
        };
        let Some(e) = self.entries.get_mut(index) else {
            return MsixWrite::None;
        };
        let before = *e;
        for (i, chunk) in (first..first + count).zip(data.chunks_exact(4)) {
            let mut word = [0u8; 4];
            word.copy_from_slice(chunk);
            let word = u32::from_le_bytes(word);
            match i {
                0 => e.addr_lo = word & !0x3,
                1 => e.addr_hi = word,
                2 => e.data = word,
                _ => e.ctrl = (e.ctrl & !VECTOR_MASKED) | (word & VECTOR_MASKED),
            }
        }
        if *e == before {
            MsixWrite::None
        } else {
            // The index came from a bounds-checked entry lookup, so it fits in u16 (≤ 2048).
            MsixWrite::Vector(index as u16)
        }
    }

    /// Reads `data.len()` bytes at byte `offset` of the PBA; `pending(v)` tells whether vector
    /// `v` has an interrupt waiting. Only masked vectors report pending bits.
    pub fn read_pba(&self, offset: u64, data: &mut [u8], pending: impl Fn(u16) -> bool) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        let Some(first_bit) = offset.checked_mul(8) else {
            return;
        };
        let bits = data.len() as u64 * 8;
        let mut value = 0u64;
        for bit in 0..bits {
            let Some(v) = first_bit
                .checked_add(bit)
                .and_then(|v| u16::try_from(v).ok())
            else {
                break;
            };
            if v >= self.vectors() {
                break;
            }
            if self.masked(v) && pending(v) {
                value |= 1 << bit;
            }
        }
        read_le(value, 0, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 vectors, table in BAR 0 at 0x2000, PBA in BAR 0 at 0x3000.
    fn state() -> MsixState {
        MsixState::new(0x70, [0x0003_0011, 0x2000, 0x3000])
    }

    fn write32(s: &mut MsixState, offset: u64, v: u32) -> MsixWrite {
        s.write_table(offset, &v.to_le_bytes())
    }

    fn read32(s: &MsixState, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        s.read_table(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn info_decodes_table_and_pba() {
        let info = MsixInfo::parse(0x70, [0x0007_0011, 0x2002, 0x3003]);
        assert_eq!(info.table_size, 8);
        assert_eq!((info.table_bar, info.table_offset), (2, 0x2000));
        assert_eq!((info.pba_bar, info.pba_offset), (3, 0x3000));
        assert_eq!(info.table_area(), Area::new(0x2000, 0x80));
        assert_eq!(info.pba_area(), Area::new(0x3000, 8));
    }

    #[test]
    fn entries_start_masked() {
        let s = state();
        assert!(s.masked(0));
        assert_eq!(read32(&s, 12), 1);
    }

    #[test]
    fn entry_writes_set_the_message() {
        let mut s = state();
        assert_eq!(write32(&mut s, 16, 0xfee0_0000), MsixWrite::Vector(1));
        write32(&mut s, 20, 0);
        write32(&mut s, 24, 0x4021);
        assert_eq!(
            s.message(1),
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x4021
            }
        );
    }

    #[test]
    fn qword_write_sets_address_halves() {
        let mut s = state();
        s.write_table(0, &0x0000_0001_fee0_0000u64.to_le_bytes());
        assert_eq!(s.message(0).address, 0x1_fee0_0000);
    }

    #[test]
    fn unmasking_a_vector_reports_it() {
        let mut s = state();
        assert_eq!(write32(&mut s, 3 * 16 + 12, 0), MsixWrite::Vector(3));
        assert!(!s.masked(3));
    }

    #[test]
    fn reserved_vector_control_bits_are_not_stored() {
        let mut s = state();
        write32(&mut s, 12, 0xffff_fffe);
        assert_eq!(read32(&s, 12), 0);
    }

    #[test]
    fn partial_table_accesses_are_ignored() {
        let mut s = state();
        assert_eq!(s.write_table(12, &[0]), MsixWrite::None);
        assert_eq!(s.write_table(14, &[0, 0]), MsixWrite::None);
        assert_eq!(s.write_table(2, &[0; 4]), MsixWrite::None);
        assert!(s.masked(0));
        let mut b = [0xffu8; 2];
        s.read_table(12, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn access_past_the_table_is_ignored() {
        let mut s = state();
        assert_eq!(write32(&mut s, 4 * 16, 0), MsixWrite::None);
        assert_eq!(write32(&mut s, u64::MAX - 3, 0), MsixWrite::None);
        assert_eq!(read32(&s, 4 * 16 + 12), 0);
    }

    #[test]
    fn function_mask_masks_every_vector() {
        let mut s = state();
        write32(&mut s, 12, 0);
        assert_eq!(s.write_cap(0, 2, &[0, 0xc0]), MsixWrite::Control);
        assert!(s.enabled());
        assert!(s.masked(0));
    }

    #[test]
    fn table_size_is_read_only() {
        let mut s = state();
        s.write_cap(0, 0, &[0xff; 4]);
        assert_eq!(s.read_cap(0) >> 16, 0xc003);
        assert_eq!(s.write_cap(4, 0, &[0; 4]), MsixWrite::None);
        assert_eq!(s.read_cap(4), 0x2000);
    }

    #[test]
    fn pba_reports_pending_masked_vectors_only() {
        let mut s = state();
        write32(&mut s, 16 + 12, 0);
        let mut b = [0u8; 8];
        s.read_pba(0, &mut b, |_| true);
        assert_eq!(u64::from_le_bytes(b), 0b1101);
    }

    #[test]
    fn pba_read_past_the_vectors_is_zero() {
        let s = state();
        let mut b = [0xffu8; 8];
        s.read_pba(8, &mut b, |_| true);
        assert_eq!(b, [0; 8]);
        let mut b = [0xffu8; 4];
        s.read_pba(2, &mut b, |_| true);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn pba_upper_dword_covers_vectors_32_to_63() {
        let s = MsixState::new(0x70, [0x003f_0011, 0, 0x1000]);
        let mut b = [0u8; 4];
        s.read_pba(4, &mut b, |v| v == 33);
        assert_eq!(u32::from_le_bytes(b), 0b10);
    }
}
