//! Emulation of the MSI capability of a passthrough device.
//!
//! The guest's view of the capability is kept here and never written to the device: the host
//! kernel owns the real MSI registers and programs them when VFIO enables MSI. Guest writes turn
//! into [`MsiWrite`] notifications the interrupt code acts on.

use rvmm_pci::MsiMessage;

use crate::access::merge_write;

const CTRL_ENABLE: u16 = 0x1;
const CTRL_MME_SHIFT: u16 = 4;
const CTRL_MME_MASK: u16 = 0x7 << CTRL_MME_SHIFT;
const CTRL_64BIT: u16 = 0x80;
const CTRL_PVM: u16 = 0x100;

/// What a guest write to the capability changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiWrite {
    /// Nothing the interrupt setup depends on.
    None,
    /// The enable bit or the number of enabled vectors.
    Control,
    /// The message address or data.
    Message,
    /// The per-vector mask bits.
    Mask,
}

/// The emulated MSI capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsiCap {
    offset: usize,
    header: u16,
    ctrl: u16,
    addr_lo: u32,
    addr_hi: u32,
    data: u16,
    mask: u32,
}

impl MsiCap {
    /// Length in bytes (dword-rounded) of a capability with control word `ctrl`.
    pub fn len_from_control(ctrl: u16) -> usize {
        let base = if ctrl & CTRL_64BIT != 0 { 0x10 } else { 0x0c };
        if ctrl & CTRL_PVM != 0 {
            base + 8
        } else {
            base
        }
    }

    /// Creates the emulated capability at config `offset` from the device's header dword (ID,
    /// next pointer, control). The guest starts with MSI disabled and every vector unmasked.
    pub fn new(offset: usize, header_dword: u32) -> Self {
        let ctrl = (header_dword >> 16) as u16 & (CTRL_64BIT | CTRL_PVM | 0xe);
        Self {
            offset,
            header: header_dword as u16,
            ctrl,
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            mask: 0,
        }
    }

    /// Config offset of the capability.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        Self::len_from_control(self.ctrl)
    }

    /// Whether the capability is zero length (never: present for API symmetry with `len`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Sets the header (ID and virtual next pointer) the guest reads.
    pub fn set_header(&mut self, header: u16) {
        self.header = header;
    }

    fn is_64(&self) -> bool {
        self.ctrl & CTRL_64BIT != 0
    }

    fn has_mask(&self) -> bool {
        self.ctrl & CTRL_PVM != 0
    }

    fn data_offset(&self) -> usize {
        if self.is_64() {
            0x0c
        } else {
            0x08
        }
    }

    fn mask_offset(&self) -> Option<usize> {
        self.has_mask().then_some(self.data_offset() + 4)
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self) -> bool {
        self.ctrl & CTRL_ENABLE != 0
    }

    /// Number of vectors the guest enabled (1, 2, 4, .. 32).
    pub fn vectors(&self) -> u32 {
        let mmc = (self.ctrl >> 1) & 0x7;
        let mme = ((self.ctrl & CTRL_MME_MASK) >> CTRL_MME_SHIFT)
            .min(mmc)
            .min(5);
        1 << mme
    }

    /// The message of vector `v` (the low data bits carry the vector number).
    pub fn message(&self, v: u32) -> MsiMessage {
        let n = self.vectors();
        let low = v & (n - 1);
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: (u32::from(self.data) & !(n - 1)) | low,
        }
    }

    /// Whether vector `v` is masked by the per-vector mask bits.
    pub fn masked(&self, v: u32) -> bool {
        self.has_mask() && v < 32 && self.mask & (1 << v) != 0
    }

    /// Reads the dword at `rel` bytes from the capability start; `pending` supplies the pending
    /// bits of the vectors.
    pub fn read(&self, rel: usize, pending: u32) -> u32 {
        match rel {
            0 => u32::from(self.header) | (u32::from(self.ctrl) << 16),
            4 => self.addr_lo,
            8 if self.is_64() => self.addr_hi,
            r if r == self.data_offset() => u32::from(self.data),
            r if Some(r) == self.mask_offset() => self.mask,
            r if Some(r) == self.mask_offset().map(|m| m + 4) => pending & self.valid_bits(),
            _ => 0,
        }
    }

    fn valid_bits(&self) -> u32 {
        let n = self.vectors();
        if n >= 32 {
            u32::MAX
        } else {
            (1 << n) - 1
        }
    }

    /// Writes `data` at byte `offset` of the dword at `rel` bytes from the capability start.
    pub fn write(&mut self, rel: usize, offset: u64, data: &[u8]) -> MsiWrite {
        let old = self.read(rel, 0);
        let Some(value) = merge_write(old, offset, data) else {
            return MsiWrite::None;
        };
        match rel {
            0 => {
                let mmc = (self.ctrl >> 1) & 0x7;
                let wanted = ((value >> 16) as u16 & CTRL_MME_MASK) >> CTRL_MME_SHIFT;
                let mme = wanted.min(mmc) << CTRL_MME_SHIFT;
                let ctrl = (self.ctrl & !(CTRL_ENABLE | CTRL_MME_MASK))
                    | ((value >> 16) as u16 & CTRL_ENABLE)
                    | mme;
                let changed = ctrl != self.ctrl;
                self.ctrl = ctrl;
                if changed {
                    MsiWrite::Control
                } else {
                    MsiWrite::None
                }
            }
            4 => {
                self.addr_lo = value & !0x3;
                MsiWrite::Message
            }
            8 if self.is_64() => {
                self.addr_hi = value;
                MsiWrite::Message
            }
            r if r == self.data_offset() => {
                self.data = value as u16;
                MsiWrite::Message
            }
            r if Some(r) == self.mask_offset() => {
                self.mask = value;
                MsiWrite::Mask
            }
            _ => MsiWrite::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64-bit, per-vector masking, 8 vectors capable.
    fn cap() -> MsiCap {
        MsiCap::new(
            0x50,
            0x05 | ((u32::from(CTRL_64BIT | CTRL_PVM) | (3 << 1)) << 16),
        )
    }

    #[test]
    fn enable_write_reports_a_control_change() {
        let mut c = cap();
        assert_eq!(c.write(0, 2, &[1, 0]), MsiWrite::Control);
        assert!(c.enabled());
    }

    #[test]
    fn multiple_message_enable_is_capped_at_capable() {
        let mut c = cap();
        c.write(0, 2, &[0x71, 0]);
        assert_eq!(c.vectors(), 8);
    }

    #[test]
    fn read_only_control_bits_survive_writes() {
        let mut c = cap();
        c.write(0, 0, &[0; 4]);
        assert_eq!(
            c.read(0, 0) >> 16,
            u32::from(CTRL_64BIT | CTRL_PVM) | (3 << 1)
        );
    }

    #[test]
    fn vector_message_carries_the_vector_in_data() {
        let mut c = cap();
        c.write(0, 2, &[0x21, 0]);
        c.write(4, 0, &0xfee0_1000u32.to_le_bytes());
        c.write(8, 0, &1u32.to_le_bytes());
        c.write(0xc, 0, &0x4043u32.to_le_bytes());
        assert_eq!(
            c.message(2),
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4042
            }
        );
    }

    #[test]
    fn mask_bits_mask_vectors() {
        let mut c = cap();
        assert_eq!(c.write(0x10, 0, &2u32.to_le_bytes()), MsiWrite::Mask);
        assert!(c.masked(1));
        assert!(!c.masked(0));
        assert!(!c.masked(40));
    }

    #[test]
    fn pending_bits_are_limited_to_enabled_vectors() {
        let mut c = cap();
        c.write(0, 2, &[0x11, 0]);
        assert_eq!(c.read(0x14, u32::MAX), 0x3);
    }

    #[test]
    fn thirty_two_bit_cap_has_data_at_eight() {
        let mut c = MsiCap::new(0x50, 0x05);
        c.write(8, 0, &0x41u32.to_le_bytes());
        assert_eq!(c.message(0).data, 0x41);
        assert_eq!(c.len(), 0x0c);
    }

    #[test]
    fn garbage_write_is_ignored() {
        let mut c = cap();
        assert_eq!(c.write(4, 3, &[1, 2]), MsiWrite::None);
        assert_eq!(c.write(0x40, 0, &[1]), MsiWrite::None);
        assert_eq!(c.read(4, 0), 0);
    }
}
