//! Splitting a memory BAR into the areas mapped straight into the guest and the areas whose
//! accesses are trapped.
//!
//! A BAR area can be mapped into the guest only if the host lets us mmap it (the VFIO region has
//! the mmap flag, possibly restricted by a sparse-mmap capability), it is whole host pages, and it
//! holds no MSI-X table or PBA: those must be emulated, so the pages holding them are trapped.

/// A byte range inside a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Area {
    /// Offset of the first byte from the start of the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Area {
    /// Creates an area.
    pub const fn new(offset: u64, size: u64) -> Self {
        Self { offset, size }
    }

    /// One past the last byte, saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }

    /// Whether `offset` lies inside the area.
    pub fn contains(&self, offset: u64) -> bool {
        offset >= self.offset && offset < self.end()
    }
}

/// What the host allows to be mmapped of a VFIO region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mmappable {
    /// Nothing (the region lacks the mmap flag).
    None,
    /// The whole region.
    Whole,
    /// Only these areas (the sparse-mmap capability).
    Sparse(Vec<Area>),
}

/// The split of one BAR.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BarLayout {
    /// Page-aligned areas mapped directly into the guest, sorted and disjoint.
    pub direct: Vec<Area>,
    /// The rest of the BAR, sorted and disjoint: accesses trap to the VMM.
    pub trapped: Vec<Area>,
}

fn align_down(value: u64, page: u64) -> u64 {
    value & !(page - 1)
}

fn align_up(value: u64, page: u64) -> Option<u64> {
    value.checked_add(page - 1).map(|v| align_down(v, page))
}

/// Removes `[hole_start, hole_end)` from every interval of `ranges`.
fn subtract(ranges: Vec<(u64, u64)>, hole_start: u64, hole_end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for (start, end) in ranges {
        if hole_end <= start || hole_start >= end {
            out.push((start, end));
            continue;
        }
        if start < hole_start {
            out.push((start, hole_start));
        }
        if hole_end < end {
            out.push((hole_end, end));
        }
    }
    out
}

/// Computes the layout of a BAR of `bar_size` bytes.
///
/// `page_size` is the host page size (a power of two; anything else maps nothing directly).
/// `holes` are the MSI-X table and PBA when they live in this BAR; they may be unaligned, share a
/// page, or lie partly or wholly outside the BAR (device-provided values are not trusted).
pub fn bar_layout(
    bar_size: u64,
    page_size: u64,
    mmappable: &Mmappable,
    holes: &[Area],
) -> BarLayout {
    let mut direct: Vec<(u64, u64)> = Vec::new();
    if page_size.is_power_of_two() {
        let candidates: Vec<Area> = match mmappable {
            Mmappable::None => Vec::new(),
            Mmappable::Whole => vec![Area::new(0, bar_size)],
            Mmappable::Sparse(areas) => areas.clone(),
        };
        for area in candidates {
            let end = area.end().min(bar_size);
            let Some(start) = align_up(area.offset, page_size) else {
                continue;
            };
            let end = align_down(end, page_size);
            if start < end {
                direct.push((start, end));
            }
        }
        for hole in holes {
            if hole.size == 0 || hole.offset >= bar_size {
                continue;
            }
            let start = align_down(hole.offset, page_size);
            let end = align_up(hole.end().min(bar_size), page_size).unwrap_or(u64::MAX);
            direct = subtract(direct, start, end);
        }
        direct.sort_unstable();
        direct = merge(direct);
    }

    let mut trapped = Vec::new();
    let mut cursor = 0u64;
    for &(start, end) in &direct {
        if start > cursor {
            trapped.push(Area::new(cursor, start - cursor));
        }
        cursor = end;
    }
    if cursor < bar_size {
        trapped.push(Area::new(cursor, bar_size - cursor));
    }

    BarLayout {
        direct: direct
            .into_iter()
            .map(|(start, end)| Area::new(start, end - start))
            .collect(),
        trapped,
    }
}

/// Merges sorted intervals that overlap or touch.
fn merge(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (start, end) in sorted {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 0x1000;
    const K64: u64 = 0x10000;

    fn areas(list: &[(u64, u64)]) -> Vec<Area> {
        list.iter().map(|&(o, s)| Area::new(o, s)).collect()
    }

    #[test]
    fn bar_without_msix_is_mapped_whole() {
        let l = bar_layout(0x4000, K4, &Mmappable::Whole, &[]);
        assert_eq!(l.direct, areas(&[(0, 0x4000)]));
        assert!(l.trapped.is_empty());
    }

    #[test]
    fn table_mid_bar_splits_the_mapping() {
        let l = bar_layout(0x10000, K4, &Mmappable::Whole, &[Area::new(0x8000, 0x100)]);
        assert_eq!(l.direct, areas(&[(0, 0x8000), (0x9000, 0x7000)]));
        assert_eq!(l.trapped, areas(&[(0x8000, 0x1000)]));
    }

    #[test]
    fn unaligned_table_crossing_a_page_traps_both_pages() {
        let l = bar_layout(0x10000, K4, &Mmappable::Whole, &[Area::new(0x2f80, 0x100)]);
        assert_eq!(l.direct, areas(&[(0, 0x2000), (0x4000, 0xc000)]));
        assert_eq!(l.trapped, areas(&[(0x2000, 0x2000)]));
    }

    #[test]
    fn table_and_pba_sharing_a_page_trap_one_page() {
        let holes = [Area::new(0x3000, 0x40), Area::new(0x3800, 8)];
        let l = bar_layout(0x4000, K4, &Mmappable::Whole, &holes);
        assert_eq!(l.direct, areas(&[(0, 0x3000)]));
        assert_eq!(l.trapped, areas(&[(0x3000, 0x1000)]));
    }

    #[test]
    fn sixty_four_kib_pages_trap_the_whole_large_page() {
        let holes = [Area::new(0x2000, 0x100), Area::new(0x3000, 8)];
        let l = bar_layout(0x40000, K64, &Mmappable::Whole, &holes);
        assert_eq!(l.direct, areas(&[(0x10000, 0x30000)]));
        assert_eq!(l.trapped, areas(&[(0, 0x10000)]));
    }

    #[test]
    fn bar_smaller_than_a_page_is_trapped_whole() {
        let l = bar_layout(0x4000, K64, &Mmappable::Whole, &[]);
        assert!(l.direct.is_empty());
        assert_eq!(l.trapped, areas(&[(0, 0x4000)]));
    }

    #[test]
    fn table_covering_the_whole_bar_maps_nothing() {
        let l = bar_layout(0x2000, K4, &Mmappable::Whole, &[Area::new(0, 0x2000)]);
        assert!(l.direct.is_empty());
        assert_eq!(l.trapped, areas(&[(0, 0x2000)]));
    }

    #[test]
    fn sparse_areas_are_shrunk_to_whole_pages() {
        let sparse = Mmappable::Sparse(areas(&[(0x800, 0x2000), (0x5000, 0x3000)]));
        let l = bar_layout(0x8000, K4, &sparse, &[]);
        assert_eq!(l.direct, areas(&[(0x1000, 0x1000), (0x5000, 0x3000)]));
        assert_eq!(l.trapped, areas(&[(0, 0x1000), (0x2000, 0x3000)]));
    }

    #[test]
    fn sparse_areas_past_the_bar_are_clipped() {
        let sparse = Mmappable::Sparse(areas(&[(0x1000, u64::MAX), (u64::MAX - 1, 2)]));
        let l = bar_layout(0x4000, K4, &sparse, &[]);
        assert_eq!(l.direct, areas(&[(0x1000, 0x3000)]));
    }

    #[test]
    fn adjacent_sparse_areas_are_merged() {
        let sparse = Mmappable::Sparse(areas(&[(0x2000, 0x2000), (0, 0x2000)]));
        let l = bar_layout(0x4000, K4, &sparse, &[]);
        assert_eq!(l.direct, areas(&[(0, 0x4000)]));
    }

    #[test]
    fn region_without_mmap_is_trapped_whole() {
        let l = bar_layout(0x4000, K4, &Mmappable::None, &[]);
        assert!(l.direct.is_empty());
        assert_eq!(l.trapped, areas(&[(0, 0x4000)]));
    }

    #[test]
    fn holes_outside_the_bar_are_ignored() {
        let holes = [Area::new(0x10000, 0x100), Area::new(u64::MAX - 4, 0x100)];
        let l = bar_layout(0x4000, K4, &Mmappable::Whole, &holes);
        assert_eq!(l.direct, areas(&[(0, 0x4000)]));
    }

    #[test]
    fn hole_running_past_the_bar_end_traps_to_the_end() {
        let l = bar_layout(
            0x4000,
            K4,
            &Mmappable::Whole,
            &[Area::new(0x3000, u64::MAX)],
        );
        assert_eq!(l.direct, areas(&[(0, 0x3000)]));
        assert_eq!(l.trapped, areas(&[(0x3000, 0x1000)]));
    }

    #[test]
    fn invalid_page_size_maps_nothing() {
        let l = bar_layout(0x4000, 0x3000, &Mmappable::Whole, &[]);
        assert!(l.direct.is_empty());
        let l = bar_layout(0x4000, 0, &Mmappable::Whole, &[]);
        assert!(l.direct.is_empty());
    }
}
