//! Pure decoders of what the VFIO device ioctls return, and the encoder of VFIO_DEVICE_SET_IRQS.
//!
//! Everything the kernel writes (sizes, offsets, counts) is treated as untrusted: offsets are
//! bounds-checked, capability chains are walked at most once per entry, truncated arrays yield
//! their complete elements.

use std::collections::BTreeSet;
use std::mem;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_region_info, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
};

use crate::layout::Area;

/// Most regions we look at (vfio-pci has 9 plus a few device-specific ones).
pub const MAX_REGIONS: u32 = 64;
/// Most interrupt indices we look at (vfio-pci has 5).
pub const MAX_IRQS: u32 = 64;
/// Largest region info buffer (with capabilities) we accept to allocate.
pub const MAX_REGION_INFO_SIZE: u32 = 64 * 1024;

const REGION_INFO_SIZE: usize = mem::size_of::<vfio_region_info>();
const CAP_HEADER_SIZE: usize = 8;
const SPARSE_AREAS_AT: usize = 16;
const SPARSE_AREA_SIZE: usize = 16;

/// Reads a native-endian integer of `N` bytes (at most 8) at `offset`, `None` past the end.
fn read<const N: usize>(buf: &[u8], offset: usize) -> Option<u64> {
    let bytes = buf.get(offset..offset.checked_add(N)?)?;
    let mut value = [0u8; 8];
    if cfg!(target_endian = "little") {
        value.get_mut(..N)?.copy_from_slice(bytes);
        Some(u64::from_le_bytes(value))
    } else {
        value.get_mut(8 - N..)?.copy_from_slice(bytes);
        Some(u64::from_be_bytes(value))
    }
}

/// What VFIO_DEVICE_GET_INFO says about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Whether VFIO_DEVICE_RESET is supported.
    pub reset: bool,
    /// Regions to query (clamped to [`MAX_REGIONS`]).
    pub regions: u32,
    /// Interrupt indices to query (clamped to [`MAX_IRQS`]).
    pub irqs: u32,
}

/// Decodes a device info; `None` if the device is not a vfio-pci device (no PCI flag, or fewer
/// regions than the config space index).
pub fn parse_device_info(raw: &vfio_device_info) -> Option<DeviceInfo> {
    if raw.flags & VFIO_DEVICE_FLAGS_PCI == 0 || raw.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
        return None;
    }
    Some(DeviceInfo {
        reset: raw.flags & VFIO_DEVICE_FLAGS_RESET != 0,
        regions: raw.num_regions.min(MAX_REGIONS),
        irqs: raw.num_irqs.min(MAX_IRQS),
    })
}

/// What VFIO_DEVICE_GET_IRQ_INFO says about one interrupt index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of interrupts that can be signalled through eventfds (zero: none).
    pub count: u32,
    /// Whether the interrupts can be masked.
    pub maskable: bool,
    /// Whether the kernel masks the interrupt when it fires (INTx: unmask to re-arm).
    pub automasked: bool,
    /// Whether the count cannot change while enabled (MSI: enable them all at once).
    pub noresize: bool,
}

/// Decodes the info of interrupt index `index`; an answer about another index, or an index
/// without eventfd signalling, has no usable interrupt.
pub fn parse_irq_info(raw: &vfio_irq_info, index: u32) -> IrqInfo {
    if raw.index != index || raw.flags & VFIO_IRQ_INFO_EVENTFD == 0 {
        return IrqInfo::default();
    }
    IrqInfo {
        count: raw.count,
        maskable: raw.flags & VFIO_IRQ_INFO_MASKABLE != 0,
        automasked: raw.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
        noresize: raw.flags & VFIO_IRQ_INFO_NORESIZE != 0,
    }
}

/// What VFIO_DEVICE_GET_REGION_INFO says about one region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionRaw {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// The mmappable areas of the sparse-mmap capability, if present (the last one wins).
    pub sparse: Option<Vec<Area>>,
}

/// The size a region info buffer must have according to its `argsz`, if larger than `buf` and
/// acceptable ([`MAX_REGION_INFO_SIZE`]).
pub fn region_info_needs(buf: &[u8]) -> Option<usize> {
    let argsz = read::<4>(buf, 0)? as usize;
    (argsz > buf.len() && argsz <= MAX_REGION_INFO_SIZE as usize).then_some(argsz)
}

/// Decodes a `vfio_region_info` buffer with its capability chain; `None` if the buffer is
/// shorter than the structure.
pub fn parse_region_info(buf: &[u8]) -> Option<RegionRaw> {
    let flags = read::<4>(buf, 4)? as u32;
    let mut region = RegionRaw {
        flags,
        size: read::<8>(buf, 16)?,
        offset: read::<8>(buf, 24)?,
        sparse: None,
    };
    if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 {
        return Some(region);
    }
    let mut next = read::<4>(buf, 12).unwrap_or(0) as usize;
    let mut visited = BTreeSet::new();
    while next >= REGION_INFO_SIZE && visited.insert(next) {
        let (Some(id), Some(following)) = (read::<2>(buf, next), read::<4>(buf, next + 4)) else {
            break;
        };
        if next
            .checked_add(CAP_HEADER_SIZE)
            .is_none_or(|end| end > buf.len())
        {
            break;
        }
        if id == u64::from(VFIO_REGION_INFO_CAP_SPARSE_MMAP) {
            region.sparse = Some(sparse_areas(buf, next));
        }
        next = following as usize;
    }
    Some(region)
}

/// The complete areas of the sparse-mmap capability at `at`.
fn sparse_areas(buf: &[u8], at: usize) -> Vec<Area> {
    let count = read::<4>(buf, at + CAP_HEADER_SIZE).unwrap_or(0);
    let mut areas = Vec::new();
    let mut offset = at + SPARSE_AREAS_AT;
    for _ in 0..count {
        let (Some(start), Some(size)) = (read::<8>(buf, offset), read::<8>(buf, offset + 8)) else {
            break;
        };
        areas.push(Area::new(start, size));
        offset += SPARSE_AREA_SIZE;
    }
    areas
}

/// Encodes a `vfio_irq_set` for `index`, interrupts `start..start + count` with `flags`, and
/// the eventfds `fds` as data (none for `VFIO_IRQ_SET_DATA_NONE`), in a buffer aligned for the
/// structure.
pub fn encode_irq_set(flags: u32, index: u32, start: u32, count: u32, fds: &[i32]) -> Vec<u64> {
    let header = mem::size_of::<vfio_irq_set>();
    let len = header + mem::size_of_val(fds);
    let mut bytes = Vec::with_capacity(len);
    let argsz = u32::try_from(len).unwrap_or(u32::MAX);
    for field in [argsz, flags, index, start, count] {
        bytes.extend_from_slice(&field.to_ne_bytes());
    }
    for fd in fds {
        bytes.extend_from_slice(&fd.to_ne_bytes());
    }
    bytes.resize(len.div_ceil(8) * 8, 0);
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            u64::from_ne_bytes(word)
        })
        .collect()
}

#[cfg(test)]
#[path = "info_tests.rs"]
mod tests;
