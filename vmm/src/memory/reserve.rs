//! Mapping, prefaulting and locking guest RAM.

use std::io;
use std::time::Instant;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::limits::{preflight, HostProbe, SystemHost};
use super::prefault::{populate_write, prefault_parallel, thread_count, Span};
use super::size::DisplayBytes;
use super::{HugepageSize, MemoryConfig, MemoryError, Result};
use crate::machine::layout::{HIGH_RAM_START, MMIO32_HOLE_START};
use crate::placement::{
    allowed_cpus, policy::bind_memory, MemoryPolicy, Placement, RangePlacement,
};
use rvmm_devices::host::page_size as host_page_size;

/// Splits `size` bytes of guest RAM around the 32-bit MMIO hole: up to
/// [`MMIO32_HOLE_START`] from address 0, the rest from [`HIGH_RAM_START`].
///
/// Returns `(start, length)` pairs in address order; empty for a size of 0. Sizes so large that
/// the high region would pass the end of the address space are cut at its end (a validated
/// [`MemoryConfig`] is far below that).
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size == 0 {
        return Vec::new();
    }
    let low = size.min(MMIO32_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low)];
    let high = (size - low).min(u64::MAX - HIGH_RAM_START);
    if high > 0 {
        regions.push((GuestAddress(HIGH_RAM_START), high));
    }
    regions
}

/// Reserves guest RAM of `config` on this host: checks the host ([`preflight`]), then maps,
/// prefaults and locks every region of [`ram_regions`].
///
/// The returned memory owns its mappings: dropping it (and every clone of its regions) unmaps and
/// unlocks guest RAM. On error nothing stays mapped.
pub fn reserve(config: &MemoryConfig) -> Result<GuestMemoryMmap> {
    reserve_with(config, &SystemHost)
}

/// [`reserve`] with the host facts read by `host`: no memory policy, prefaulted by one thread per
/// CPU this process may use (bounded).
pub fn reserve_with(config: &MemoryConfig, host: &dyn HostProbe) -> Result<GuestMemoryMmap> {
    let placement = Placement {
        prefault_cpus: allowed_cpus().unwrap_or_default(),
        ..Placement::default()
    };
    reserve_placed(config, host, &placement)
}

/// [`reserve_with`] under `placement`: each region gets the placement's memory policy
/// (`mbind`) before its first touch, then is prefaulted by threads on the placement's prefault
/// CPUs (one per CPU, bounded: [`super::prefault::thread_count`]) and locked. All or nothing:
/// on any error every region made so far is unmapped.
pub fn reserve_placed(
    config: &MemoryConfig,
    host: &dyn HostProbe,
    placement: &Placement,
) -> Result<GuestMemoryMmap> {
    preflight(config, host)?;
    let backing = config.hugepages.then_some(config.hugepage_size);
    let started = Instant::now();
    let mut threads = 0;
    let regions = map_regions(&ram_regions(config.size), backing, placement, &mut threads)?;
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)?;
    let elapsed = started.elapsed();
    let policy = match (placement.memory_policy, placement.memory_node) {
        _ if !placement.ranges.is_empty() => {
            let nodes: Vec<String> = placement
                .ranges
                .iter()
                .map(|r| match r.node {
                    Some(node) => {
                        format!("{:#x}+{} on host node {node}", r.start, DisplayBytes(r.len))
                    }
                    None => format!("{:#x}+{} unbound", r.start, DisplayBytes(r.len)),
                })
                .collect();
            format!(", per guest node: {}", nodes.join(", "))
        }
        (MemoryPolicy::Bind, Some(node)) => format!(", bound to host node {node}"),
        (MemoryPolicy::Preferred, Some(node)) => format!(", preferring host node {node}"),
        _ => String::new(),
    };
    log::info!(
        "reserved {} of guest RAM on {} pages, prefaulted and locked in {:?} ({} prefault \
         threads{policy})",
        DisplayBytes(config.size),
        backing.map_or_else(
            || DisplayBytes(host_page_size()).to_string(),
            |s| s.to_string()
        ),
        elapsed,
        threads,
    );
    Ok(memory)
}

/// Maps, prefaults and locks each of `regions`; on the first failure the regions made so far are
/// dropped, which unmaps them. `threads` ends as the most prefault threads a region had.
fn map_regions(
    regions: &[(GuestAddress, u64)],
    backing: Option<HugepageSize>,
    placement: &Placement,
    threads: &mut usize,
) -> Result<Vec<GuestRegionMmap>> {
    regions
        .iter()
        .map(|&(start, size)| {
            let (region, used) = map_region(start, size, backing, placement, populate_write)?;
            *threads = (*threads).max(used);
            Ok(region)
        })
        .collect()
}

/// Maps one region of guest RAM (anonymous, private, hugetlb if `backing` is set), gives it the
/// placement's memory policy, prefaults it with `populate` in parallel and locks it; returns it
/// with the number of prefault threads.
fn map_region(
    start: GuestAddress,
    size: u64,
    backing: Option<HugepageSize>,
    placement: &Placement,
    populate: fn(Span) -> io::Result<()>,
) -> Result<(GuestRegionMmap, usize)> {
    let len = usize::try_from(size).map_err(|_| MemoryError::RegionTooLarge {
        start: start.0,
        size,
    })?;
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
    if let Some(hugepage) = backing {
        flags |= libc::MAP_HUGETLB
            | match hugepage {
                HugepageSize::Size2M => libc::MAP_HUGE_2MB,
                HugepageSize::Size1G => libc::MAP_HUGE_1GB,
            };
    }
    // The builder mmaps the region itself, so the MmapRegion owns the mapping and unmaps it on
    // drop, including when a later step of this function fails.
    let mapping = MmapRegionBuilder::<()>::new(len)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(backing.is_some())
        .build()
        .map_err(|e| MemoryError::Map {
            start: start.0,
            size,
            source: match e {
                vm_memory::mmap::MmapRegionError::Mmap(source) => source,
                other => io::Error::new(io::ErrorKind::InvalidInput, other),
            },
        })?;
    let page_size = backing.map_or_else(host_page_size, HugepageSize::bytes);
    let mut used = 0;
    for part in region_parts(start.0, size, placement) {
        // The parts cover the region with page-aligned boundaries (guest node sizes are
        // multiples of the page size), so the offsets fit the mapping.
        let offset = (part.start - start.0) as usize;
        let part_len = part.len as usize;
        // SAFETY: `mapping.as_ptr() + offset` is inside the mapping owned by `mapping`.
        let addr = unsafe { mapping.as_ptr().add(offset) };
        if let Some(node) = part.node {
            // SAFETY: the range is a part of the fresh mapping owned by `mapping` (page-aligned:
            // mmap'd base, page-multiple offset), untouched so far, so every page faulted in
            // below follows the policy.
            unsafe { bind_memory(addr, part_len, part.policy, node) }.map_err(|source| {
                MemoryError::Bind {
                    start: part.start,
                    size: part.len,
                    node,
                    source,
                }
            })?;
        }
        let span = Span {
            addr: addr as usize,
            len: part_len,
        };
        let threads = thread_count(part_len, part.prefault_cpus.len());
        let n = prefault_parallel(span, page_size, threads, &part.prefault_cpus, populate)
            .map_err(|source| MemoryError::Populate {
                start: part.start,
                size: part.len,
                source,
            })?;
        used = used.max(n);
    }
    lock(&mapping).map_err(|source| MemoryError::Lock {
        start: start.0,
        size,
        source,
    })?;
    log::debug!(
        "guest RAM {:#x}..{:#x} at host {:p}",
        start.0,
        start.0.saturating_add(size),
        mapping.as_ptr()
    );
    let region = GuestRegionMmap::new(mapping, start).ok_or(MemoryError::RegionTooLarge {
        start: start.0,
        size,
    })?;
    Ok((region, used))
}

/// The parts of the guest RAM region `start..start + size` with their memory policy and
/// prefault CPUs: the placement's ranges that meet it (with `--numa`, one per guest node
/// range), cut to the region, else the whole region under the placement's one policy.
fn region_parts(start: u64, size: u64, placement: &Placement) -> Vec<RangePlacement> {
    let end = start + size;
    let parts: Vec<RangePlacement> = placement
        .ranges
        .iter()
        .filter(|r| r.start < end && r.start + r.len > start)
        .map(|r| {
            let s = r.start.max(start);
            let e = (r.start + r.len).min(end);
            RangePlacement {
                start: s,
                len: e - s,
                ..r.clone()
            }
        })
        .collect();
    if parts.is_empty() {
        return vec![RangePlacement {
            start,
            len: size,
            policy: placement.memory_policy,
            node: placement.memory_node,
            prefault_cpus: placement.prefault_cpus.clone(),
        }];
    }
    parts
}

/// Locks all of `mapping` in memory.
fn lock(mapping: &MmapRegion) -> io::Result<()> {
    // SAFETY: the range is exactly the live mapping owned by `mapping`; mlock does not change its
    // contents. The lock ends when the mapping is unmapped on drop.
    let ret = unsafe { libc::mlock(mapping.as_ptr().cast::<libc::c_void>(), mapping.size()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::memory::limits::tests::FakeHost;
    use crate::memory::locked_memory;
    use crate::memory::prefault::{prefault, touch_pages};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Serialises the tests that lock memory, so that each sees `VmLck` change by its own
    /// reservation only.
    static VMLCK: Mutex<()> = Mutex::new(());

    fn vmlck_guard() -> MutexGuard<'static, ()> {
        VMLCK.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn config(size: u64) -> MemoryConfig {
        MemoryConfig {
            size,
            hugepages: false,
            hugepage_size: HugepageSize::Size2M,
            host_node: None,
        }
    }

    /// Whether every page of `mapping` is resident, according to mincore.
    fn all_resident(mapping: &MmapRegion) -> bool {
        let page = usize::try_from(host_page_size()).unwrap();
        let mut residency = vec![0u8; mapping.size().div_ceil(page)];
        // SAFETY: the range is the live mapping; `residency` has one byte per page of it.
        let ret = unsafe {
            libc::mincore(
                mapping.as_ptr().cast(),
                mapping.size(),
                residency.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0, "mincore: {}", io::Error::last_os_error());
        residency.iter().all(|r| r & 1 == 1)
    }

    fn unpopulated(size: usize) -> MmapRegion {
        MmapRegion::new(size).unwrap()
    }

    fn span(mapping: &MmapRegion) -> Span {
        Span {
            addr: mapping.as_ptr() as usize,
            len: mapping.size(),
        }
    }

    #[test]
    fn failed_parallel_prefault_releases_the_region() {
        let _guard = vmlck_guard();
        let before = locked_memory().unwrap();
        fn out_of_memory(_: Span) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOMEM))
        }
        let placement = Placement {
            prefault_cpus: crate::placement::CpuList::from_ids(0..4),
            ..Placement::default()
        };

        let result = map_region(GuestAddress(0), 128 * MIB, None, &placement, out_of_memory);

        assert!(matches!(result, Err(MemoryError::Populate { size, .. }) if size == 128 * MIB));
        assert_eq!(locked_memory().unwrap(), before);
    }

    #[test]
    fn placed_reservation_binds_ram_to_the_node() {
        let _guard = vmlck_guard();
        let node = crate::placement::HostTopology::read(std::path::Path::new("/sys"))
            .unwrap()
            .nodes
            .first()
            .map_or(0, |n| n.id);
        let placement = Placement {
            memory_policy: MemoryPolicy::Bind,
            memory_node: Some(node),
            prefault_cpus: allowed_cpus().unwrap(),
            ..Placement::default()
        };

        let memory = reserve_placed(&config(64 * MIB), &SystemHost, &placement).unwrap();

        let region = memory.iter().next().unwrap();
        let (mode, nodes) = crate::placement::policy::policy_of(region.as_ptr()).unwrap();
        assert_eq!(mode, 2, "MPOL_BIND");
        assert_eq!(nodes, crate::placement::CpuList::from_ids([node]));
        assert!(all_resident(&region.get_mmap()));
    }

    #[test]
    fn ram_below_hole_is_one_region_at_zero() {
        assert_eq!(ram_regions(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
    }

    #[test]
    fn ram_exactly_at_hole_is_one_region() {
        assert_eq!(
            ram_regions(MMIO32_HOLE_START),
            vec![(GuestAddress(0), MMIO32_HOLE_START)]
        );
    }

    #[test]
    fn ram_above_hole_continues_at_4g() {
        assert_eq!(
            ram_regions(4 * GIB),
            vec![
                (GuestAddress(0), 3 * GIB),
                (GuestAddress(HIGH_RAM_START), GIB)
            ]
        );
    }

    #[test]
    fn ram_one_page_above_hole_puts_one_page_high() {
        assert_eq!(
            ram_regions(MMIO32_HOLE_START + 4096)[1],
            (GuestAddress(HIGH_RAM_START), 4096)
        );
    }

    #[test]
    fn zero_ram_has_no_regions() {
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn huge_ram_size_does_not_overflow() {
        let regions = ram_regions(u64::MAX);
        assert_eq!(regions[1].0 .0.checked_add(regions[1].1), Some(u64::MAX));
    }

    #[test]
    fn reserve_locks_the_whole_size() {
        let _guard = vmlck_guard();
        let before = locked_memory().unwrap();

        let memory = reserve(&config(64 * MIB)).unwrap();

        assert_eq!(locked_memory().unwrap() - before, 64 * MIB);
        drop(memory);
    }

    #[test]
    fn reserved_memory_is_prefaulted() {
        let _guard = vmlck_guard();
        let memory = reserve(&config(64 * MIB)).unwrap();

        let region = memory.iter().next().unwrap();

        assert!(all_resident(&region.get_mmap()));
    }

    #[test]
    fn reserved_memory_covers_the_guest_range() {
        let _guard = vmlck_guard();

        let memory = reserve(&config(64 * MIB)).unwrap();

        assert_eq!(memory.num_regions(), 1);
        assert_eq!(memory.last_addr(), GuestAddress(64 * MIB - 1));
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(64 * MIB - 4))
            .unwrap();
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(64 * MIB - 4)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn dropping_reserved_memory_unlocks_it() {
        let _guard = vmlck_guard();
        let before = locked_memory().unwrap();
        let memory = reserve(&config(64 * MIB)).unwrap();

        drop(memory);

        assert_eq!(locked_memory().unwrap(), before);
    }

    #[test]
    fn reserve_refuses_before_allocating_when_memlock_is_short() {
        let _guard = vmlck_guard();
        let before = locked_memory().unwrap();
        let host = FakeHost {
            memlock_limit: Some(8 * MIB),
            ..FakeHost::roomy()
        };

        let result = reserve_with(&config(64 * MIB), &host);

        assert!(matches!(
            result,
            Err(MemoryError::MemlockTooLow {
                needed_mib: 64,
                available_mib: 8,
                ..
            })
        ));
        assert_eq!(locked_memory().unwrap(), before);
    }

    #[test]
    fn reserve_refuses_invalid_config() {
        assert!(matches!(
            reserve(&config(crate::memory::MIN_SIZE - 4096)),
            Err(MemoryError::SizeTooSmall { .. })
        ));
    }

    #[test]
    fn failed_region_releases_the_regions_already_mapped() {
        let _guard = vmlck_guard();
        let before = locked_memory().unwrap();
        // A zero-length mapping makes mmap fail with EINVAL after the first region was locked.
        let regions = [
            (GuestAddress(0), 16 * MIB),
            (GuestAddress(HIGH_RAM_START), 0),
        ];

        let result = map_regions(&regions, None, &Placement::default(), &mut 0);

        assert!(matches!(
            result,
            Err(MemoryError::Map { start: HIGH_RAM_START, size: 0, ref source })
                if source.raw_os_error() == Some(libc::EINVAL)
        ));
        assert_eq!(locked_memory().unwrap(), before);
    }

    #[test]
    fn map_error_names_region_and_size() {
        let err = map_regions(
            &[(GuestAddress(HIGH_RAM_START), 0)],
            None,
            &Placement::default(),
            &mut 0,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot map guest RAM region at 0x100000000 of 0 bytes"
        );
    }

    #[test]
    fn mapped_region_is_owned_by_vm_memory() {
        let _guard = vmlck_guard();

        let (region, _) = map_region(
            GuestAddress(0),
            4 * MIB,
            None,
            &Placement::default(),
            populate_write,
        )
        .unwrap();

        assert!(region.owned());
        assert_eq!(region.start_addr(), GuestAddress(0));
        assert_eq!(region.len(), 4 * MIB);
    }

    #[test]
    fn populate_write_faults_every_page_in() {
        let mapping = unpopulated(4 * MIB as usize);
        assert!(!all_resident(&mapping));

        populate_write(span(&mapping)).unwrap();

        assert!(all_resident(&mapping));
    }

    #[test]
    fn prefault_falls_back_to_touching_pages_on_einval() {
        let mapping = unpopulated(4 * MIB as usize);
        fn unsupported(_: Span) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
        assert!(!all_resident(&mapping));

        prefault(span(&mapping), host_page_size(), unsupported).unwrap();

        assert!(all_resident(&mapping));
    }

    #[test]
    fn prefault_reports_other_errors() {
        let mapping = unpopulated(4 * MIB as usize);
        fn out_of_memory(_: Span) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOMEM))
        }

        let result = prefault(span(&mapping), host_page_size(), out_of_memory);

        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn touching_pages_keeps_their_contents() {
        let mapping = unpopulated(64 * 1024);
        // SAFETY: offset 4097 is inside the 64 KiB mapping owned by `mapping`.
        unsafe { mapping.as_ptr().add(4097).write(0x5a) };

        touch_pages(span(&mapping), host_page_size());

        // SAFETY: as above.
        assert_eq!(unsafe { mapping.as_ptr().add(4097).read() }, 0x5a);
    }
}

#[cfg(test)]
mod parts_tests {
    use super::*;
    use crate::placement::CpuList;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_region_without_ranges_is_one_part_under_the_vm_policy() {
        let placement = Placement {
            memory_policy: MemoryPolicy::Bind,
            memory_node: Some(1),
            prefault_cpus: CpuList::from_ids([1]),
            ..Placement::default()
        };
        assert_eq!(
            region_parts(0, 512 * MIB, &placement),
            vec![RangePlacement {
                start: 0,
                len: 512 * MIB,
                policy: MemoryPolicy::Bind,
                node: Some(1),
                prefault_cpus: CpuList::from_ids([1]),
            }]
        );
    }

    #[test]
    fn ranges_are_cut_to_the_region() {
        let range = |start, len, node| RangePlacement {
            start,
            len,
            policy: MemoryPolicy::Bind,
            node: Some(node),
            prefault_cpus: CpuList::from_ids([node]),
        };
        let placement = Placement {
            ranges: vec![
                range(0, 2048 * MIB, 0),
                range(2048 * MIB, 1024 * MIB, 1),
                range(4096 * MIB, 1024 * MIB, 1),
            ],
            ..Placement::default()
        };
        assert_eq!(
            region_parts(0, 3072 * MIB, &placement),
            vec![range(0, 2048 * MIB, 0), range(2048 * MIB, 1024 * MIB, 1)]
        );
        assert_eq!(
            region_parts(4096 * MIB, 1024 * MIB, &placement),
            vec![range(4096 * MIB, 1024 * MIB, 1)]
        );
    }
}
