//! The configuration-space model shared by every emulated PCI function.
//!
//! A [`ConfigSpace`] is 4 KiB of registers with two masks per byte: the bits the guest may write
//! and the bits it clears by writing one (RW1C). Everything else is read-only: the model sets it
//! with the `set_*` methods, which bypass the masks. Guest accesses arrive as (dword register,
//! byte offset, data) and are validated by [`ConfigAccess::new`]: lengths other than 1, 2 and 4,
//! accesses crossing a dword and registers past the end are ignored on write and read as zero.
//!
//! The capability builder lays out standard capabilities from 0x40 upwards and extended
//! capabilities from 0x100 upwards, linking each `next` pointer and setting the Capabilities
//! List bit of the Status register.

use log::{debug, warn};
use thiserror::Error;

/// Size of a PCI Express configuration space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Number of 32-bit registers in a configuration space.
pub const CONFIG_REGISTER_COUNT: usize = CONFIG_SPACE_SIZE / 4;

/// Offset of the Status register.
const STATUS: usize = 0x06;
/// Status register: a capability list is present.
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Offset of the Capabilities Pointer.
const CAPABILITIES_POINTER: usize = 0x34;
/// First offset available to standard capabilities.
const STANDARD_CAP_START: usize = 0x40;
/// End (exclusive) of the standard capability area.
const STANDARD_CAP_END: usize = 0x100;
/// First offset of the extended configuration space.
const EXTENDED_CAP_START: usize = 0x100;
/// Upper bound on capability-list walks, so a guest-corrupted list cannot loop forever.
const MAX_CAP_WALK: usize = (CONFIG_SPACE_SIZE - STANDARD_CAP_START) / 4;

/// Errors of the capability builder.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A standard capability must hold at least its 2-byte header, an extended one its 4 bytes.
    #[error("capability {id:#x} of {len} bytes is shorter than its header")]
    CapabilityTooShort {
        /// Capability ID.
        id: u16,
        /// Requested length.
        len: usize,
    },
    /// The capability does not fit in the remaining space of its area.
    #[error("capability {id:#x} of {len} bytes does not fit at offset {offset:#x} (area ends at {end:#x})")]
    NoSpace {
        /// Capability ID.
        id: u16,
        /// Requested length.
        len: usize,
        /// The next free offset in the area.
        offset: usize,
        /// End (exclusive) of the area.
        end: usize,
    },
    /// Extended capability versions are 4-bit.
    #[error("extended capability {id:#x} has version {version}, more than 4 bits")]
    InvalidVersion {
        /// Capability ID.
        id: u16,
        /// Requested version.
        version: u8,
    },
}

/// Result type of configuration-space building.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// A validated guest access: a byte offset in configuration space and a length of 1, 2 or 4
/// that does not cross a dword boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAccess {
    offset: usize,
    len: usize,
}

impl ConfigAccess {
    /// Validates an access of `len` bytes at byte `offset` of dword register `reg`.
    /// Returns `None` for a register past the end, a length other than 1, 2 or 4, or an
    /// access that crosses the dword.
    pub fn new(reg: usize, offset: u64, len: usize) -> Option<Self> {
        if reg >= CONFIG_REGISTER_COUNT || !matches!(len, 1 | 2 | 4) {
            return None;
        }
        let offset = usize::try_from(offset).ok()?;
        if offset.checked_add(len)? > 4 {
            return None;
        }
        Some(Self {
            offset: reg * 4 + offset,
            len,
        })
    }

    /// Byte offset of the access in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Size of the access in bytes (1, 2 or 4).
    pub fn size(&self) -> usize {
        self.len
    }

    /// Whether the access touches any byte of `[start, start + len)`.
    pub fn overlaps(&self, start: usize, len: usize) -> bool {
        self.offset < start.saturating_add(len) && start < self.offset + self.len
    }

    /// Extracts this access's bytes (little endian) from the dword `value` of its register.
    pub fn extract(&self, value: u32) -> u32 {
        let shift = (self.offset % 4) * 8;
        let value = value >> shift;
        match self.len {
            1 => value & 0xff,
            2 => value & 0xffff,
            _ => value,
        }
    }
}

/// A 4 KiB configuration space with per-bit write masks.
pub struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
    rw1c: Vec<u8>,
    last_cap: Option<usize>,
    next_cap: usize,
    last_ext_cap: Option<usize>,
    next_ext_cap: usize,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    /// Creates an all-zero, all-read-only configuration space.
    pub fn new() -> Self {
        Self {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            writable: vec![0; CONFIG_SPACE_SIZE],
            rw1c: vec![0; CONFIG_SPACE_SIZE],
            last_cap: None,
            next_cap: STANDARD_CAP_START,
            last_ext_cap: None,
            next_ext_cap: EXTENDED_CAP_START,
        }
    }

    /// Reads dword register `reg`; registers past the end read as zero.
    pub fn read_register(&self, reg: usize) -> u32 {
        match reg.checked_mul(4) {
            Some(offset) if offset < CONFIG_SPACE_SIZE => self.read_u32(offset),
            _ => 0,
        }
    }

    /// Applies a guest write of `data` at byte `offset` of register `reg` through the masks:
    /// writable bits take the written value, RW1C bits written as one are cleared, all other
    /// bits keep their value. Returns the decoded access, or `None` (and changes nothing) when
    /// the access is invalid.
    pub fn write_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<ConfigAccess> {
        let Some(access) = ConfigAccess::new(reg, offset, data.len()) else {
            // The config front-ends drop (and log, throttled) invalid guest accesses before they
            // get here; this is a caller's bug, not a guest's doing.
            debug!(
                "ignoring config write of {} bytes at register {reg:#x} offset {offset}",
                data.len()
            );
            return None;
        };
        for (i, value) in data.iter().enumerate() {
            let at = access.offset + i;
            let (Some(byte), Some(&w), Some(&c)) = (
                self.bytes.get_mut(at),
                self.writable.get(at),
                self.rw1c.get(at),
            ) else {
                return None;
            };
            *byte = ((*byte & !w) | (value & w)) & !(value & c);
        }
        Some(access)
    }

    fn get(&self, offset: usize, len: usize) -> u32 {
        let Some(bytes) = offset
            .checked_add(len)
            .and_then(|end| self.bytes.get(offset..end))
        else {
            return 0;
        };
        bytes
            .iter()
            .rev()
            .fold(0u32, |acc, &b| (acc << 8) | u32::from(b))
    }

    fn put(buf: &mut [u8], offset: usize, len: usize, value: u32) {
        let Some(bytes) = offset
            .checked_add(len)
            .and_then(|end| buf.get_mut(offset..end))
        else {
            warn!("config space model write of {len} bytes at {offset:#x} is out of range");
            return;
        };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (value >> (8 * i)) as u8;
        }
    }

    /// Reads the byte at `offset` (zero past the end).
    pub fn read_u8(&self, offset: usize) -> u8 {
        self.get(offset, 1) as u8
    }

    /// Reads the little-endian word at `offset` (zero past the end).
    pub fn read_u16(&self, offset: usize) -> u16 {
        self.get(offset, 2) as u16
    }

    /// Reads the little-endian dword at `offset` (zero past the end).
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.get(offset, 4)
    }

    /// Sets the byte at `offset`, bypassing the masks (model side).
    pub fn set_u8(&mut self, offset: usize, value: u8) {
        Self::put(&mut self.bytes, offset, 1, value.into());
    }

    /// Sets the word at `offset`, bypassing the masks (model side).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        Self::put(&mut self.bytes, offset, 2, value.into());
    }

    /// Sets the dword at `offset`, bypassing the masks (model side).
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        Self::put(&mut self.bytes, offset, 4, value);
    }

    /// Sets the bits of `mask` in the word at `offset` when `on`, clears them otherwise.
    pub fn update_u16(&mut self, offset: usize, mask: u16, on: bool) {
        let value = self.read_u16(offset);
        self.set_u16(offset, if on { value | mask } else { value & !mask });
    }

    /// Sets which bits of the byte at `offset` the guest may write.
    pub fn set_writable_u8(&mut self, offset: usize, mask: u8) {
        Self::put(&mut self.writable, offset, 1, mask.into());
    }

    /// Sets which bits of the word at `offset` the guest may write.
    pub fn set_writable_u16(&mut self, offset: usize, mask: u16) {
        Self::put(&mut self.writable, offset, 2, mask.into());
    }

    /// Sets which bits of the dword at `offset` the guest may write.
    pub fn set_writable_u32(&mut self, offset: usize, mask: u32) {
        Self::put(&mut self.writable, offset, 4, mask);
    }

    /// Sets which bits of the word at `offset` the guest clears by writing one.
    pub fn set_rw1c_u16(&mut self, offset: usize, mask: u16) {
        Self::put(&mut self.rw1c, offset, 2, mask.into());
    }

    /// Sets which bits of the dword at `offset` the guest clears by writing one.
    pub fn set_rw1c_u32(&mut self, offset: usize, mask: u32) {
        Self::put(&mut self.rw1c, offset, 4, mask);
    }

    /// Appends a standard capability of `len` bytes (header included) with ID `id`.
    ///
    /// The capability is placed at the next free dword-aligned offset at or above 0x40, its
    /// header is written (`next` = 0), the previous capability (or the Capabilities Pointer)
    /// is linked to it and the Capabilities List bit of the Status register is set. The body is
    /// zero and read-only; fill it with the `set_*` methods. Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, len: usize) -> Result<usize> {
        if len < 2 {
            return Err(ConfigError::CapabilityTooShort { id: id.into(), len });
        }
        let offset = self.next_cap;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= STANDARD_CAP_END)
            .ok_or(ConfigError::NoSpace {
                id: id.into(),
                len,
                offset,
                end: STANDARD_CAP_END,
            })?;
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        // `offset` is below 0x100, so it fits the 8-bit pointers.
        match self.last_cap {
            Some(prev) => self.set_u8(prev + 1, offset as u8),
            None => self.set_u8(CAPABILITIES_POINTER, offset as u8),
        }
        self.update_u16(STATUS, STATUS_CAPABILITIES_LIST, true);
        self.last_cap = Some(offset);
        self.next_cap = end.next_multiple_of(4);
        Ok(offset)
    }

    /// Appends an extended capability of `len` bytes (header included) with ID `id` and
    /// `version`, at the next free dword-aligned offset at or above 0x100, linking the previous
    /// extended capability to it. Returns the capability's offset.
    pub fn add_extended_capability(&mut self, id: u16, version: u8, len: usize) -> Result<usize> {
        if len < 4 {
            return Err(ConfigError::CapabilityTooShort { id, len });
        }
        if version > 0xf {
            return Err(ConfigError::InvalidVersion { id, version });
        }
        let offset = self.next_ext_cap;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
            .ok_or(ConfigError::NoSpace {
                id,
                len,
                offset,
                end: CONFIG_SPACE_SIZE,
            })?;
        self.set_u32(offset, u32::from(id) | (u32::from(version) << 16));
        if let Some(prev) = self.last_ext_cap {
            let header = self.read_u32(prev) & 0x000f_ffff;
            // `offset` is below 0x1000, so it fits the 12-bit next field.
            self.set_u32(prev, header | ((offset as u32) << 20));
        }
        self.last_ext_cap = Some(offset);
        self.next_ext_cap = end.next_multiple_of(4);
        Ok(offset)
    }

    /// Walks the standard capability list: (ID, offset) of each capability, in list order.
    /// Stops at a pointer outside 0x40..0x100 and after a bounded number of steps.
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut caps = Vec::new();
        if self.read_u16(STATUS) & STATUS_CAPABILITIES_LIST == 0 {
            return caps;
        }
        let mut next = usize::from(self.read_u8(CAPABILITIES_POINTER) & !3);
        while (STANDARD_CAP_START..STANDARD_CAP_END).contains(&next) && caps.len() < MAX_CAP_WALK {
            caps.push((self.read_u8(next), next));
            next = usize::from(self.read_u8(next + 1) & !3);
        }
        caps
    }

    /// Walks the extended capability list: (ID, version, offset) of each capability.
    pub fn extended_capabilities(&self) -> Vec<(u16, u8, usize)> {
        let mut caps = Vec::new();
        let mut next = EXTENDED_CAP_START;
        while (EXTENDED_CAP_START..CONFIG_SPACE_SIZE).contains(&next) && caps.len() < MAX_CAP_WALK {
            let header = self.read_u32(next);
            if header == 0 {
                break;
            }
            caps.push(((header & 0xffff) as u16, ((header >> 16) & 0xf) as u8, next));
            next = (header >> 20) as usize & !3;
        }
        caps
    }

    /// Offset of the first standard capability with ID `id`.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        self.capabilities()
            .into_iter()
            .find(|&(cap, _)| cap == id)
            .map(|(_, offset)| offset)
    }

    /// Offset of the first extended capability with ID `id`.
    pub fn find_extended_capability(&self, id: u16) -> Option<usize> {
        self.extended_capabilities()
            .into_iter()
            .find(|&(cap, _, _)| cap == id)
            .map(|(_, _, offset)| offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space_with_masks() -> ConfigSpace {
        let mut cfg = ConfigSpace::new();
        cfg.set_u32(0x40, 0xaaaa_5555);
        cfg.set_writable_u32(0x40, 0x0000_ff0f);
        cfg.set_u16(0x44, 0x00f3);
        cfg.set_rw1c_u16(0x44, 0x00f0);
        cfg
    }

    #[test]
    fn read_only_bits_keep_their_value() {
        let mut cfg = space_with_masks();
        cfg.write_register(0x10, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(cfg.read_register(0x10), 0xaaaa_ff5f);
        cfg.write_register(0x10, 0, &0u32.to_le_bytes());
        assert_eq!(cfg.read_register(0x10), 0xaaaa_0050);
    }

    #[test]
    fn rw1c_bit_is_cleared_by_writing_one() {
        let mut cfg = space_with_masks();
        cfg.write_register(0x11, 0, &[0x10]);
        assert_eq!(cfg.read_u16(0x44), 0x00e3);
    }

    #[test]
    fn rw1c_bit_is_untouched_by_writing_zero() {
        let mut cfg = space_with_masks();
        cfg.write_register(0x11, 0, &[0x00]);
        assert_eq!(cfg.read_u16(0x44), 0x00f3);
    }

    #[test]
    fn rw1c_bit_cannot_be_set_by_the_guest() {
        let mut cfg = ConfigSpace::new();
        cfg.set_rw1c_u16(0x44, 0xffff);
        cfg.write_register(0x11, 0, &[0xff, 0xff]);
        assert_eq!(cfg.read_u16(0x44), 0);
    }

    #[test]
    fn byte_write_changes_only_its_byte() {
        let mut cfg = ConfigSpace::new();
        cfg.set_writable_u32(0x40, 0xffff_ffff);
        cfg.write_register(0x10, 2, &[0xab]);
        assert_eq!(cfg.read_register(0x10), 0x00ab_0000);
    }

    #[test]
    fn word_write_at_upper_half_changes_only_that_word() {
        let mut cfg = ConfigSpace::new();
        cfg.set_writable_u32(0x40, 0xffff_ffff);
        cfg.set_u32(0x40, 0x1111_2222);
        cfg.write_register(0x10, 2, &[0xcd, 0xab]);
        assert_eq!(cfg.read_register(0x10), 0xabcd_2222);
    }

    #[test]
    fn dword_write_changes_the_register() {
        let mut cfg = ConfigSpace::new();
        cfg.set_writable_u32(0x40, 0xffff_ffff);
        cfg.write_register(0x10, 0, &0x1234_5678u32.to_le_bytes());
        assert_eq!(cfg.read_u32(0x40), 0x1234_5678);
    }

    #[test]
    fn write_crossing_a_dword_is_ignored() {
        let mut cfg = ConfigSpace::new();
        cfg.set_writable_u32(0x40, 0xffff_ffff);
        assert!(cfg.write_register(0x10, 3, &[1, 2]).is_none());
        assert!(cfg.write_register(0x10, 1, &[1, 2, 3, 4]).is_none());
        assert_eq!(cfg.read_register(0x10), 0);
    }

    #[test]
    fn write_of_wrong_size_is_ignored() {
        let mut cfg = ConfigSpace::new();
        cfg.set_writable_u32(0x40, 0xffff_ffff);
        assert!(cfg.write_register(0x10, 0, &[1, 2, 3]).is_none());
        assert!(cfg.write_register(0x10, 0, &[]).is_none());
        assert!(cfg.write_register(0x10, 0, &[1; 8]).is_none());
        assert_eq!(cfg.read_register(0x10), 0);
    }

    #[test]
    fn register_past_the_end_reads_zero_and_ignores_writes() {
        let mut cfg = ConfigSpace::new();
        assert_eq!(cfg.read_register(CONFIG_REGISTER_COUNT), 0);
        assert_eq!(cfg.read_register(usize::MAX), 0);
        assert!(cfg.write_register(usize::MAX, 0, &[1]).is_none());
        assert!(cfg.write_register(0, u64::MAX, &[1]).is_none());
    }

    #[test]
    fn access_extract_returns_the_addressed_bytes() {
        let value = 0x1122_3344;
        assert_eq!(ConfigAccess::new(0, 1, 1).unwrap().extract(value), 0x33);
        assert_eq!(ConfigAccess::new(0, 2, 2).unwrap().extract(value), 0x1122);
        assert_eq!(ConfigAccess::new(0, 0, 4).unwrap().extract(value), value);
    }

    #[test]
    fn access_overlap_is_detected_at_the_edges() {
        let access = ConfigAccess::new(0x10, 2, 2).unwrap();
        assert!(access.overlaps(0x43, 1));
        assert!(access.overlaps(0x40, 3));
        assert!(!access.overlaps(0x40, 2));
        assert!(!access.overlaps(0x44, 4));
    }

    #[test]
    fn first_capability_is_linked_from_the_pointer_and_sets_status() {
        let mut cfg = ConfigSpace::new();
        let offset = cfg.add_capability(0x10, 0x3c).unwrap();
        assert_eq!(offset, 0x40);
        assert_eq!(cfg.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_ne!(cfg.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
    }

    #[test]
    fn capability_chain_walk_follows_next_pointers() {
        let mut cfg = ConfigSpace::new();
        let a = cfg.add_capability(0x10, 0x3c).unwrap();
        let b = cfg.add_capability(0x05, 0x18).unwrap();
        let c = cfg.add_capability(0x0d, 7).unwrap();
        assert_eq!(cfg.capabilities(), vec![(0x10, a), (0x05, b), (0x0d, c)]);
        assert_eq!(b, 0x7c);
        assert_eq!(c, 0x94);
        assert_eq!(cfg.read_u8(c + 1), 0);
        assert_eq!(cfg.find_capability(0x05), Some(b));
        assert_eq!(cfg.find_capability(0x11), None);
    }

    #[test]
    fn capability_that_does_not_fit_is_refused() {
        let mut cfg = ConfigSpace::new();
        cfg.add_capability(0x10, 0xb0).unwrap();
        assert_eq!(
            cfg.add_capability(0x05, 0x18),
            Err(ConfigError::NoSpace {
                id: 5,
                len: 0x18,
                offset: 0xf0,
                end: 0x100
            })
        );
        assert_eq!(cfg.add_capability(0x05, 0x10), Ok(0xf0));
    }

    #[test]
    fn too_short_capability_is_refused() {
        let mut cfg = ConfigSpace::new();
        assert!(matches!(
            cfg.add_capability(1, 1),
            Err(ConfigError::CapabilityTooShort { .. })
        ));
        assert!(matches!(
            cfg.add_extended_capability(1, 1, 3),
            Err(ConfigError::CapabilityTooShort { .. })
        ));
    }

    #[test]
    fn extended_capability_chain_walk_follows_next_pointers() {
        let mut cfg = ConfigSpace::new();
        let a = cfg.add_extended_capability(0x0001, 2, 0x48).unwrap();
        let b = cfg.add_extended_capability(0x000d, 1, 8).unwrap();
        assert_eq!(a, 0x100);
        assert_eq!(b, 0x148);
        assert_eq!(cfg.read_u32(a) >> 20, 0x148);
        assert_eq!(
            cfg.extended_capabilities(),
            vec![(0x0001, 2, a), (0x000d, 1, b)]
        );
        assert_eq!(cfg.find_extended_capability(0x000d), Some(b));
    }

    #[test]
    fn extended_capability_with_wide_version_is_refused() {
        let mut cfg = ConfigSpace::new();
        assert!(matches!(
            cfg.add_extended_capability(1, 0x10, 8),
            Err(ConfigError::InvalidVersion { .. })
        ));
    }

    #[test]
    fn corrupted_capability_loop_walk_terminates() {
        let mut cfg = ConfigSpace::new();
        let a = cfg.add_capability(0x10, 4).unwrap();
        cfg.set_u8(a + 1, a as u8);
        assert_eq!(cfg.capabilities().len(), MAX_CAP_WALK);
    }

    #[test]
    fn empty_space_has_no_capabilities() {
        let cfg = ConfigSpace::new();
        assert!(cfg.capabilities().is_empty());
        assert!(cfg.extended_capabilities().is_empty());
    }
}
