//! What the kernel says about a device region, as rvmm's VFIO layer reads it: an arbitrary
//! `vfio_region_info` buffer with an arbitrary capability chain (sizes, offsets, loops, truncated
//! sparse-mmap capabilities) goes through `region_info_needs` and `parse_region_info`, and the
//! mmappable areas it yields go through `bar_layout` for a BAR of the region's size, as when a
//! device is opened.
//!
//! Invariants: nothing panics; a buffer size asked for is larger than the buffer and bounded;
//! the layout's direct and trapped areas lie inside the BAR, are sorted and disjoint, and
//! together cover it whole; direct areas are page-aligned and never cover an MSI-X hole.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvmm_vfio::layout::{bar_layout, Area, Mmappable};
use rvmm_vfio::legacy::info::{parse_region_info, region_info_needs};

const PAGE: u64 = 4096;
/// Largest BAR laid out: bigger regions are clamped (a real BAR is at most this in a guest
/// window; the layout's cost grows with the number of areas, not the size).
const MAX_BAR: u64 = 1 << 40;

#[derive(Arbitrary, Debug)]
struct Input {
    buffer: Vec<u8>,
    /// An MSI-X table/PBA hole inside the BAR: (offset, size), clamped to it.
    hole: Option<(u64, u64)>,
}

fn check_layout(bar: u64, mmappable: &Mmappable, holes: &[Area]) {
    let layout = bar_layout(bar, PAGE, mmappable, holes);
    let mut all: Vec<(Area, bool)> = layout
        .direct
        .iter()
        .map(|a| (*a, true))
        .chain(layout.trapped.iter().map(|a| (*a, false)))
        .collect();
    all.sort_by_key(|(a, _)| a.offset);
    let mut end = 0u64;
    for (area, direct) in &all {
        assert_eq!(
            area.offset, end,
            "gap or overlap before {area:?} in {layout:?}"
        );
        end = area
            .offset
            .checked_add(area.size)
            .unwrap_or_else(|| panic!("{area:?} wraps"));
        assert!(area.size > 0, "empty area in {layout:?}");
        if *direct {
            assert_eq!(area.offset % PAGE, 0, "unaligned direct {area:?}");
            assert_eq!(area.size % PAGE, 0, "unaligned direct {area:?}");
            for hole in holes {
                let overlap =
                    area.offset < hole.offset.saturating_add(hole.size) && hole.offset < end;
                assert!(!overlap, "direct {area:?} covers the hole {hole:?}");
            }
        }
    }
    assert_eq!(
        end, bar,
        "the layout {layout:?} does not cover the BAR of {bar:#x}"
    );
}

fuzz_target!(|input: Input| {
    if let Some(needed) = region_info_needs(&input.buffer) {
        assert!(
            needed > input.buffer.len(),
            "asked for {needed} bytes, has {}",
            input.buffer.len()
        );
        assert!(needed <= 1 << 16, "asked for {needed} bytes");
    }
    let Some(region) = parse_region_info(&input.buffer) else {
        return;
    };
    let bar = region.size.min(MAX_BAR);
    if bar == 0 || !bar.is_power_of_two() || bar < PAGE {
        return;
    }
    let mmappable = match region.sparse {
        Some(areas) => Mmappable::Sparse(areas),
        None => Mmappable::Whole,
    };
    let holes: Vec<Area> = input
        .hole
        .map(|(offset, size)| {
            let offset = offset % bar;
            Area::new(offset, size.min(bar - offset).max(1))
        })
        .into_iter()
        .collect();
    check_layout(bar, &mmappable, &holes);
});
