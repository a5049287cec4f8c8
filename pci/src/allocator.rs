//! Address ranges and an aligned allocator over one range, used to place device BARs inside a
//! root port's bridge window.

use std::collections::BTreeMap;

use thiserror::Error;

/// A half-open guest-physical address range `[base, base + size)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddressRange {
    /// First address of the range.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl AddressRange {
    /// Creates the range `[base, base + size)`.
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// Last address of the range; `None` for an empty range or one that wraps.
    pub fn last(&self) -> Option<u64> {
        self.size
            .checked_sub(1)
            .and_then(|len| self.base.checked_add(len))
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && self.last().is_some_and(|last| addr <= last)
    }

    /// Whether `other` lies entirely in this range.
    pub fn contains_range(&self, other: &AddressRange) -> bool {
        match (self.last(), other.last()) {
            (Some(last), Some(other_last)) => other.base >= self.base && other_last <= last,
            _ => false,
        }
    }
}

/// Errors of the address allocator.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllocatorError {
    /// The managed range is empty or wraps the address space.
    #[error("invalid allocator range: base {base:#x}, size {size:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Size of the rejected range.
        size: u64,
    },
    /// Sizes must be non-zero and alignments powers of two.
    #[error("invalid allocation request: size {size:#x}, alignment {align:#x}")]
    InvalidRequest {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// No free gap can hold the request.
    #[error("no free {size:#x}-byte block aligned to {align:#x} in {base:#x}+{range_size:#x}")]
    OutOfSpace {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
        /// Start of the managed range.
        base: u64,
        /// Size of the managed range.
        range_size: u64,
    },
    /// The requested fixed block is outside the range or overlaps an allocation.
    #[error("block {base:#x}+{size:#x} is not free")]
    NotFree {
        /// Start of the requested block.
        base: u64,
        /// Size of the requested block.
        size: u64,
    },
    /// Freeing an address that is not the start of an allocation.
    #[error("no allocation starts at {base:#x}")]
    NotAllocated {
        /// The address that was freed.
        base: u64,
    },
}

/// Result type of the allocator.
pub type Result<T> = std::result::Result<T, AllocatorError>;

/// A first-fit allocator of aligned blocks inside one address range.
#[derive(Debug)]
pub struct AddressAllocator {
    range: AddressRange,
    last: u64,
    /// Allocated blocks: base → size.
    used: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// Creates an allocator managing `range`.
    pub fn new(range: AddressRange) -> Result<Self> {
        let last = range.last().ok_or(AllocatorError::InvalidRange {
            base: range.base,
            size: range.size,
        })?;
        Ok(Self {
            range,
            last,
            used: BTreeMap::new(),
        })
    }

    /// The managed range.
    pub fn range(&self) -> AddressRange {
        self.range
    }

    /// Allocates the lowest free block of `size` bytes aligned to `align` (a power of two).
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64> {
        if size == 0 || !align.is_power_of_two() {
            return Err(AllocatorError::InvalidRequest { size, align });
        }
        let start = self
            .find_gap(size, align)
            .ok_or(AllocatorError::OutOfSpace {
                size,
                align,
                base: self.range.base,
                range_size: self.range.size,
            })?;
        self.used.insert(start, size);
        Ok(start)
    }

    /// Lowest aligned start of a free gap of `size` bytes.
    fn find_gap(&self, size: u64, align: u64) -> Option<u64> {
        let fits_before = |candidate: Option<u64>, limit: u64| {
            let start = align_up(candidate?, align)?;
            start
                .checked_add(size - 1)
                .filter(|&end| end <= limit)
                .map(|_| start)
        };
        let mut candidate = Some(self.range.base);
        for (&base, &len) in &self.used {
            if let Some(start) = base.checked_sub(1).and_then(|l| fits_before(candidate, l)) {
                return Some(start);
            }
            // `base + len - 1` was validated when the block was inserted.
            candidate = (base + (len - 1)).checked_add(1);
        }
        fits_before(candidate, self.last)
    }

    /// Allocates exactly the block `[base, base + size)`.
    pub fn allocate_at(&mut self, base: u64, size: u64) -> Result<()> {
        let block = AddressRange::new(base, size);
        let Some(last) = block.last().filter(|_| self.range.contains_range(&block)) else {
            return Err(AllocatorError::NotFree { base, size });
        };
        let overlaps = self
            .used
            .range(..=last)
            .next_back()
            .is_some_and(|(&b, &l)| b + (l - 1) >= base);
        if overlaps {
            return Err(AllocatorError::NotFree { base, size });
        }
        self.used.insert(base, size);
        Ok(())
    }

    /// Frees the block starting at `base`; returns its size.
    pub fn free(&mut self, base: u64) -> Result<u64> {
        self.used
            .remove(&base)
            .ok_or(AllocatorError::NotAllocated { base })
    }

    /// Iterates over the allocated blocks in address order.
    pub fn allocations(&self) -> impl Iterator<Item = AddressRange> + '_ {
        self.used
            .iter()
            .map(|(&base, &size)| AddressRange::new(base, size))
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    value.checked_add(mask).map(|v| v & !mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn allocator() -> AddressAllocator {
        AddressAllocator::new(AddressRange::new(0x1000_0000, 16 * MIB)).unwrap()
    }

    #[test]
    fn first_allocation_is_at_the_aligned_base() {
        let mut a = allocator();
        assert_eq!(a.allocate(0x4000, 0x4000), Ok(0x1000_0000));
    }

    #[test]
    fn allocation_respects_alignment() {
        let mut a = allocator();
        a.allocate(0x1000, 0x1000).unwrap();
        assert_eq!(a.allocate(MIB, MIB), Ok(0x1000_0000 + MIB));
    }

    #[test]
    fn freed_gap_is_reused() {
        let mut a = allocator();
        let x = a.allocate(MIB, MIB).unwrap();
        let y = a.allocate(MIB, MIB).unwrap();
        assert_eq!(a.free(x), Ok(MIB));
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(x));
        assert_ne!(y, x);
    }

    #[test]
    fn allocation_fills_the_whole_range() {
        let mut a = allocator();
        assert_eq!(a.allocate(16 * MIB, 16 * MIB), Ok(0x1000_0000));
        assert!(matches!(
            a.allocate(1, 1),
            Err(AllocatorError::OutOfSpace { .. })
        ));
    }

    #[test]
    fn too_large_allocation_is_refused() {
        let mut a = allocator();
        assert!(matches!(
            a.allocate(32 * MIB, 1),
            Err(AllocatorError::OutOfSpace { .. })
        ));
    }

    #[test]
    fn unaligned_base_loses_the_head_of_the_range() {
        let mut a = AddressAllocator::new(AddressRange::new(0x1000, 3 * 0x1000)).unwrap();
        assert!(a.allocate(0x2000, 0x2000).is_ok());
        assert!(matches!(
            a.allocate(0x2000, 0x2000),
            Err(AllocatorError::OutOfSpace { .. })
        ));
    }

    #[test]
    fn invalid_requests_are_refused() {
        let mut a = allocator();
        assert!(matches!(
            a.allocate(0, 1),
            Err(AllocatorError::InvalidRequest { .. })
        ));
        assert!(matches!(
            a.allocate(1, 3),
            Err(AllocatorError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn range_ending_at_the_top_of_the_address_space_is_usable() {
        let mut a = AddressAllocator::new(AddressRange::new(u64::MAX - 0xfff, 0x1000)).unwrap();
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(u64::MAX - 0xfff));
        assert!(a.allocate(1, 1).is_err());
    }

    #[test]
    fn invalid_range_is_refused() {
        assert!(AddressAllocator::new(AddressRange::new(0, 0)).is_err());
        assert!(AddressAllocator::new(AddressRange::new(u64::MAX, 2)).is_err());
    }

    #[test]
    fn fixed_allocation_refuses_overlap() {
        let mut a = allocator();
        a.allocate_at(0x1000_2000, 0x1000).unwrap();
        assert!(a.allocate_at(0x1000_2fff, 1).is_err());
        assert!(a.allocate_at(0x1000_1000, 0x1001).is_err());
        assert!(a.allocate_at(0x1000_1000, 0x1000).is_ok());
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x1000_0000));
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x1000_3000));
    }

    #[test]
    fn fixed_allocation_outside_the_range_is_refused() {
        let mut a = allocator();
        assert!(a.allocate_at(0x0fff_f000, 0x2000).is_err());
        assert!(a.allocate_at(0x1000_0000 + 16 * MIB, 1).is_err());
    }

    #[test]
    fn freeing_an_unknown_base_fails() {
        let mut a = allocator();
        assert_eq!(
            a.free(0x1000_0000),
            Err(AllocatorError::NotAllocated { base: 0x1000_0000 })
        );
    }

    #[test]
    fn allocations_are_listed_in_order() {
        let mut a = allocator();
        a.allocate_at(0x1000_4000, 0x1000).unwrap();
        a.allocate(0x1000, 0x1000).unwrap();
        let list: Vec<_> = a.allocations().collect();
        assert_eq!(
            list,
            vec![
                AddressRange::new(0x1000_0000, 0x1000),
                AddressRange::new(0x1000_4000, 0x1000)
            ]
        );
    }

    #[test]
    fn range_contains_checks_both_ends() {
        let r = AddressRange::new(0x1000, 0x1000);
        assert!(r.contains(0x1000) && r.contains(0x1fff));
        assert!(!r.contains(0x2000) && !r.contains(0xfff));
        assert!(r.contains_range(&AddressRange::new(0x1800, 0x800)));
        assert!(!r.contains_range(&AddressRange::new(0x1800, 0x801)));
        assert!(!r.contains_range(&AddressRange::new(0x1800, 0)));
    }
}
