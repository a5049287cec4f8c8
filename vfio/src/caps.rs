//! Walking and re-linking the PCI capability lists of a config-space snapshot.
//!
//! Everything here works on a byte copy of the device's config space, so a device (or a
//! malicious host firmware) with looping or out-of-range pointers cannot make us loop or index
//! out of bounds: pointers are masked and bounds-checked, and each walk visits a capability at
//! most once.

use std::collections::BTreeSet;
use std::ops::Range;

/// Config offset of the capabilities pointer.
pub const CAP_POINTER: usize = 0x34;
/// Config offset of the first extended capability.
pub const EXT_CAP_START: usize = 0x100;
/// Size of PCIe config space.
pub const EXT_CONFIG_SIZE: usize = 0x1000;

const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u8 = 0x10;
const STD_CAP_MIN: usize = 0x40;
const STD_CONFIG_SIZE: usize = 0x100;

/// Power management.
pub const CAP_ID_PM: u8 = 0x01;
/// MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// PCI Express.
pub const CAP_ID_EXP: u8 = 0x10;
/// MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Advanced features (conventional PCI FLR).
pub const CAP_ID_AF: u8 = 0x13;

/// Alternative Routing-ID Interpretation.
pub const EXT_CAP_ID_ARI: u16 = 0x0e;
/// Single Root I/O Virtualization.
pub const EXT_CAP_ID_SRIOV: u16 = 0x10;
/// Resizable BAR.
pub const EXT_CAP_ID_REBAR: u16 = 0x15;
/// VF Resizable BAR.
pub const EXT_CAP_ID_VF_REBAR: u16 = 0x24;

/// A capability of the standard list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Capability ID.
    pub id: u8,
    /// Config offset of its header.
    pub offset: usize,
}

/// A capability of the extended list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtCap {
    /// Extended capability ID.
    pub id: u16,
    /// Capability version.
    pub version: u8,
    /// Config offset of its header.
    pub offset: usize,
}

fn byte(cfg: &[u8], offset: usize) -> u8 {
    cfg.get(offset).copied().unwrap_or(0)
}

fn dword(cfg: &[u8], offset: usize) -> u32 {
    cfg.get(offset..offset.saturating_add(4))
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

fn set_byte(cfg: &mut [u8], offset: usize, value: u8) {
    if let Some(b) = cfg.get_mut(offset) {
        *b = value;
    }
}

fn set_dword(cfg: &mut [u8], offset: usize, value: u32) {
    if let Some(b) = cfg.get_mut(offset..offset.saturating_add(4)) {
        b.copy_from_slice(&value.to_le_bytes());
    }
}

/// Walks the standard capability list of `cfg` (at least 256 bytes for a full walk).
pub fn walk(cfg: &[u8]) -> Vec<Cap> {
    let mut caps = Vec::new();
    if byte(cfg, STATUS) & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut seen = BTreeSet::new();
    let mut ptr = usize::from(byte(cfg, CAP_POINTER) & 0xfc);
    while (STD_CAP_MIN..STD_CONFIG_SIZE).contains(&ptr) && seen.insert(ptr) {
        caps.push(Cap {
            id: byte(cfg, ptr),
            offset: ptr,
        });
        ptr = usize::from(byte(cfg, ptr + 1) & 0xfc);
    }
    caps
}

/// Walks the extended capability list of `cfg` (empty for a 256-byte config space).
pub fn walk_ext(cfg: &[u8]) -> Vec<ExtCap> {
    let mut caps = Vec::new();
    let mut seen = BTreeSet::new();
    let mut ptr = EXT_CAP_START;
    let end = cfg.len().min(EXT_CONFIG_SIZE);
    while ptr >= EXT_CAP_START && ptr + 4 <= end && seen.insert(ptr) {
        let header = dword(cfg, ptr);
        if header == 0 || header == u32::MAX {
            break;
        }
        caps.push(ExtCap {
            id: (header & 0xffff) as u16,
            version: ((header >> 16) & 0xf) as u8,
            offset: ptr,
        });
        ptr = ((header >> 20) & 0xffc) as usize;
    }
    caps
}

/// The byte range each capability occupies: up to the next capability (in address order) or the
/// end of its config area, bounded by `known_len` when the capability's length is known (so that
/// vendor registers after a hidden capability stay visible).
fn extents(
    offsets: &[usize],
    area_end: usize,
    known_len: impl Fn(usize) -> Option<usize>,
) -> Vec<Range<usize>> {
    let sorted: BTreeSet<usize> = offsets.iter().copied().collect();
    offsets
        .iter()
        .map(|&off| {
            let next = sorted
                .range(off + 1..)
                .next()
                .copied()
                .unwrap_or(area_end)
                .min(area_end);
            let end = known_len(off).map_or(next, |len| next.min(off.saturating_add(len)));
            off..end.max(off)
        })
        .collect()
}

/// Byte ranges of the standard capabilities, in list order.
pub fn cap_extents(cfg: &[u8], caps: &[Cap]) -> Vec<Range<usize>> {
    let offsets: Vec<usize> = caps.iter().map(|c| c.offset).collect();
    extents(&offsets, STD_CONFIG_SIZE, |off| {
        match caps.iter().find(|c| c.offset == off).map(|c| c.id) {
            Some(CAP_ID_MSIX) => Some(12),
            Some(CAP_ID_AF) => Some(8),
            Some(CAP_ID_MSI) => Some(crate::msi::MsiCap::len_from_control(u16::from_le_bytes([
                byte(cfg, off + 2),
                byte(cfg, off + 3),
            ]))),
            _ => None,
        }
    })
}

/// Byte ranges of the extended capabilities, in list order.
pub fn ext_cap_extents(cfg: &[u8], caps: &[ExtCap]) -> Vec<Range<usize>> {
    let offsets: Vec<usize> = caps.iter().map(|c| c.offset).collect();
    extents(&offsets, cfg.len().min(EXT_CONFIG_SIZE), |off| {
        match caps.iter().find(|c| c.offset == off).map(|c| c.id) {
            Some(EXT_CAP_ID_ARI) => Some(8),
            Some(EXT_CAP_ID_SRIOV) => Some(0x40),
            Some(EXT_CAP_ID_REBAR | EXT_CAP_ID_VF_REBAR) => {
                // Bits 7:5 of the first control register: number of resizable BARs (1..=6).
                let bars = ((dword(cfg, off + 8) >> 5) & 0x7) as usize;
                Some(4 + 8 * if (1..=6).contains(&bars) { bars } else { 6 })
            }
            _ => None,
        }
    })
}

/// Re-links the standard list of `shadow` so that the capabilities for which `hide` is true are
/// skipped. Returns the byte ranges of the hidden capabilities (zeroed in `shadow`).
pub fn hide_caps(shadow: &mut [u8], hide: impl Fn(u8) -> bool) -> Vec<Range<usize>> {
    let caps = walk(shadow);
    if caps.is_empty() {
        return Vec::new();
    }
    let ranges = cap_extents(shadow, &caps);
    let visible: Vec<usize> = caps
        .iter()
        .filter(|c| !hide(c.id))
        .map(|c| c.offset)
        .collect();
    let mut prev_next = CAP_POINTER;
    for &off in &visible {
        set_byte(shadow, prev_next, off as u8);
        prev_next = off + 1;
    }
    set_byte(shadow, prev_next, 0);
    let hidden: Vec<Range<usize>> = caps
        .iter()
        .zip(ranges)
        .filter(|(c, _)| hide(c.id))
        .map(|(_, r)| r)
        .collect();
    for range in &hidden {
        if let Some(bytes) = shadow.get_mut(range.clone()) {
            bytes.fill(0);
        }
    }
    hidden
}

/// Re-links the extended list of `shadow` so that the capabilities for which `hide` is true are
/// skipped. A hidden capability at 0x100 (where the list must start) is replaced by a null
/// capability header pointing at the first visible one. Returns the hidden byte ranges (zeroed in
/// `shadow`); the header dword at 0x100 is never part of them.
pub fn hide_ext_caps(shadow: &mut [u8], hide: impl Fn(u16) -> bool) -> Vec<Range<usize>> {
    let caps = walk_ext(shadow);
    if caps.is_empty() {
        return Vec::new();
    }
    let ranges = ext_cap_extents(shadow, &caps);
    let hidden: Vec<Range<usize>> = caps
        .iter()
        .zip(ranges)
        .filter(|(c, _)| hide(c.id))
        .map(|(c, r)| {
            if c.offset == EXT_CAP_START {
                (EXT_CAP_START + 4).min(r.end)..r.end
            } else {
                r
            }
        })
        .collect();
    let visible: Vec<usize> = caps
        .iter()
        .filter(|c| !hide(c.id))
        .map(|c| c.offset)
        .collect();

    for range in &hidden {
        if let Some(bytes) = shadow.get_mut(range.clone()) {
            bytes.fill(0);
        }
    }
    // The list head at 0x100 is either the first visible capability or a null header.
    let mut chain: Vec<usize> = visible.clone();
    if visible.first() != Some(&EXT_CAP_START) {
        if visible.is_empty() {
            set_dword(shadow, EXT_CAP_START, 0);
            return hidden;
        }
        set_dword(shadow, EXT_CAP_START, 0);
        chain.insert(0, EXT_CAP_START);
    }
    for (i, &off) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(0) as u32;
        let header = dword(shadow, off);
        set_dword(shadow, off, (header & 0x000f_ffff) | (next << 20));
    }
    hidden
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a config space with the given standard caps `(offset, id)` and extended caps
    /// `(offset, id)`, each linked in the given order.
    pub(crate) fn config_with(std_caps: &[(usize, u8)], ext_caps: &[(usize, u16)]) -> Vec<u8> {
        let mut cfg = vec![0u8; EXT_CONFIG_SIZE];
        if !std_caps.is_empty() {
            cfg[STATUS] |= STATUS_CAP_LIST;
            cfg[CAP_POINTER] = std_caps[0].0 as u8;
        }
        for (i, &(off, id)) in std_caps.iter().enumerate() {
            cfg[off] = id;
            cfg[off + 1] = std_caps.get(i + 1).map_or(0, |c| c.0 as u8);
        }
        for (i, &(off, id)) in ext_caps.iter().enumerate() {
            let next = ext_caps.get(i + 1).map_or(0, |c| c.0 as u32);
            set_dword(&mut cfg, off, u32::from(id) | (1 << 16) | (next << 20));
        }
        cfg
    }

    #[test]
    fn walk_follows_the_standard_list() {
        let cfg = config_with(
            &[(0x40, CAP_ID_PM), (0x70, CAP_ID_EXP), (0x50, CAP_ID_MSIX)],
            &[],
        );
        let ids: Vec<u8> = walk(&cfg).iter().map(|c| c.id).collect();
        assert_eq!(ids, [CAP_ID_PM, CAP_ID_EXP, CAP_ID_MSIX]);
    }

    #[test]
    fn looping_standard_list_is_walked_once() {
        let mut cfg = config_with(&[(0x40, CAP_ID_PM), (0x50, CAP_ID_MSI)], &[]);
        cfg[0x51] = 0x40;
        assert_eq!(walk(&cfg).len(), 2);
    }

    #[test]
    fn pointer_into_the_header_ends_the_walk() {
        let mut cfg = config_with(&[(0x40, CAP_ID_PM)], &[]);
        cfg[0x41] = 0x10;
        assert_eq!(walk(&cfg).len(), 1);
    }

    #[test]
    fn list_without_the_status_bit_is_empty() {
        let mut cfg = config_with(&[(0x40, CAP_ID_PM)], &[]);
        cfg[STATUS] = 0;
        assert!(walk(&cfg).is_empty());
    }

    #[test]
    fn looping_extended_list_is_walked_once() {
        let mut cfg = config_with(&[], &[(0x100, 1), (0x140, 2)]);
        let header = dword(&cfg, 0x140);
        set_dword(&mut cfg, 0x140, (header & 0xfffff) | (0x100 << 20));
        assert_eq!(walk_ext(&cfg).len(), 2);
    }

    #[test]
    fn short_config_space_has_no_extended_list() {
        let cfg = config_with(&[], &[(0x100, 1)]);
        assert!(walk_ext(&cfg[..0x100]).is_empty());
    }

    #[test]
    fn hidden_standard_cap_is_skipped_and_zeroed() {
        let mut cfg = config_with(
            &[(0x40, CAP_ID_PM), (0x48, CAP_ID_AF), (0x50, CAP_ID_EXP)],
            &[],
        );
        let hidden = hide_caps(&mut cfg, |id| id == CAP_ID_AF);
        let ids: Vec<u8> = walk(&cfg).iter().map(|c| c.id).collect();
        assert_eq!(ids, [CAP_ID_PM, CAP_ID_EXP]);
        assert_eq!(hidden, vec![0x48..0x50]);
        assert_eq!(cfg[0x48], 0);
    }

    #[test]
    fn hiding_the_first_standard_cap_moves_the_pointer() {
        let mut cfg = config_with(&[(0x40, CAP_ID_AF), (0x50, CAP_ID_EXP)], &[]);
        hide_caps(&mut cfg, |id| id == CAP_ID_AF);
        assert_eq!(cfg[CAP_POINTER], 0x50);
    }

    #[test]
    fn hidden_ext_caps_are_unlinked() {
        let mut cfg = config_with(
            &[],
            &[
                (0x100, 1),
                (0x140, EXT_CAP_ID_ARI),
                (0x150, 0x19),
                (0x160, EXT_CAP_ID_SRIOV),
            ],
        );
        let hidden = hide_ext_caps(&mut cfg, |id| {
            id == EXT_CAP_ID_ARI || id == EXT_CAP_ID_SRIOV
        });
        let ids: Vec<u16> = walk_ext(&cfg).iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 0x19]);
        assert_eq!(hidden, [0x140..0x148, 0x160..0x1a0]);
    }

    #[test]
    fn hidden_first_ext_cap_becomes_a_null_header() {
        let mut cfg = config_with(&[], &[(0x100, EXT_CAP_ID_SRIOV), (0x200, 1)]);
        let hidden = hide_ext_caps(&mut cfg, |id| id == EXT_CAP_ID_SRIOV);
        assert_eq!(dword(&cfg, 0x100), 0x200 << 20);
        assert_eq!(hidden, vec![0x104..0x140]);
        let ids: Vec<u16> = walk_ext(&cfg).iter().map(|c| c.id).collect();
        assert_eq!(ids, [0, 1]);
    }

    #[test]
    fn hidden_rebar_covers_its_bar_entries_only() {
        let mut cfg = config_with(&[], &[(0x100, 1), (0x200, EXT_CAP_ID_REBAR)]);
        set_dword(&mut cfg, 0x208, 2 << 5);
        assert_eq!(
            hide_ext_caps(&mut cfg, |id| id == EXT_CAP_ID_REBAR),
            vec![0x200..0x214]
        );
    }

    #[test]
    fn vendor_registers_after_a_hidden_cap_stay_visible() {
        let mut cfg = config_with(&[(0x40, CAP_ID_AF)], &[]);
        assert_eq!(hide_caps(&mut cfg, |id| id == CAP_ID_AF), vec![0x40..0x48]);
    }

    #[test]
    fn hiding_every_ext_cap_empties_the_list() {
        let mut cfg = config_with(&[], &[(0x100, EXT_CAP_ID_REBAR)]);
        hide_ext_caps(&mut cfg, |id| id == EXT_CAP_ID_REBAR);
        assert!(walk_ext(&cfg).is_empty());
    }
}
