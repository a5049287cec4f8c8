//! Prefaulting guest RAM with several threads: the mapping is cut into page-aligned slices, one
//! per thread, and each thread, restricted to the CPUs of the node the RAM goes to, write-faults
//! its slice (`MADV_POPULATE_WRITE`). The memory policy of the mapping, set before, decides the
//! node; running on that node's CPUs keeps the zeroing of each page local. Either every slice is
//! faulted in or the caller gets the first error (and drops the mapping, which unmaps it all).

use std::io;

use crate::placement::policy::set_thread_affinity;
use crate::placement::CpuList;

/// Most prefault threads per region, whatever the number of CPUs.
pub const MAX_PREFAULT_THREADS: usize = 16;
/// Smallest slice worth a thread of its own.
pub const MIN_SLICE: usize = 32 << 20;

/// `madvise` advice that write-faults every page of a range (Linux 5.14+, `<linux/mman.h>`); the
/// libc crate does not export it.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// A range of a live mapping, to be prefaulted; plain numbers so that it can go to a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Its first address.
    pub addr: usize,
    /// Its length in bytes.
    pub len: usize,
}

impl Span {
    /// The part `offset..offset + len` of this span.
    fn part(self, offset: usize, len: usize) -> Span {
        Span {
            addr: self.addr + offset,
            len,
        }
    }
}

/// How many threads prefault `len` bytes with `cpus` CPUs to run on: one per CPU, at most
/// [`MAX_PREFAULT_THREADS`], at least [`MIN_SLICE`] each, at least one.
pub fn thread_count(len: usize, cpus: usize) -> usize {
    cpus.min(MAX_PREFAULT_THREADS).min(len / MIN_SLICE).max(1)
}

/// Cuts `len` bytes into `parts` slices of whole `align`-byte pages, as equal as pages allow,
/// in address order; `(offset, length)` pairs covering `0..len` exactly, none empty.
pub fn slices(len: usize, align: usize, parts: usize) -> Vec<(usize, usize)> {
    let align = align.max(1);
    let pages = len.div_ceil(align);
    let parts = parts.clamp(1, pages.max(1));
    let mut out = Vec::with_capacity(parts);
    let mut offset = 0;
    for i in 0..parts {
        // Pages before slice i + 1, spread evenly.
        let end_page = pages * (i + 1) / parts;
        let end = (end_page * align).min(len);
        if end > offset {
            out.push((offset, end - offset));
        }
        offset = end;
    }
    out
}

/// Write-faults every page of `span` with `threads` threads (each restricted to `cpus` when it
/// is not empty), slices of whole `page_size` pages. Returns the number of threads; the first
/// error of any thread (or of starting one) otherwise, after every started thread has ended.
pub fn prefault_parallel(
    span: Span,
    page_size: u64,
    threads: usize,
    cpus: &CpuList,
    populate: fn(Span) -> io::Result<()>,
) -> io::Result<usize> {
    let page = usize::try_from(page_size).unwrap_or(usize::MAX);
    let parts = slices(span.len, page, threads);
    if parts.len() <= 1 {
        prefault(span, page_size, populate)?;
        return Ok(1);
    }
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(parts.len());
        let mut first_error = None;
        for (i, &(offset, len)) in parts.iter().enumerate() {
            let slice = span.part(offset, len);
            let spawned = std::thread::Builder::new()
                .name(format!("rvmm-prefault{i}"))
                .spawn_scoped(scope, move || {
                    if !cpus.is_empty() {
                        if let Err(e) = set_thread_affinity(cpus) {
                            log::debug!("prefault thread {i}: cannot set its CPUs {cpus}: {e}");
                        }
                    }
                    prefault(slice, page_size, populate)
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        for handle in handles {
            let result = handle
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a prefault thread panicked")));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(parts.len()),
        }
    })
}

/// Write-faults every page of `span` with `populate`, or by touching every `page_size`-th byte
/// when `populate` reports `EINVAL` (a kernel before 5.14 that does not know the advice).
pub fn prefault(
    span: Span,
    page_size: u64,
    populate: fn(Span) -> io::Result<()>,
) -> io::Result<()> {
    match populate(span) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::debug!("MADV_POPULATE_WRITE not supported, touching every page instead");
            touch_pages(span, page_size);
            Ok(())
        }
        result => result,
    }
}

/// Prefaults `span` with `madvise(MADV_POPULATE_WRITE)`.
pub fn populate_write(span: Span) -> io::Result<()> {
    // SAFETY: the span is part of a live mapping of guest RAM that its owner keeps while the
    // prefault runs; the advice only faults pages in and changes neither contents nor mapping.
    let ret = unsafe {
        libc::madvise(
            span.addr as *mut libc::c_void,
            span.len,
            MADV_POPULATE_WRITE,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Write-faults every page of `span` by rewriting the first byte of each page with its value.
///
/// Only used on a fresh mapping nobody else accesses yet; on hugetlb the pool was reserved by
/// `mmap` (no `MAP_NORESERVE`), so the faults cannot run out of pages.
pub(super) fn touch_pages(span: Span, page_size: u64) {
    let base = span.addr as *mut u8;
    let step = usize::try_from(page_size).unwrap_or(usize::MAX).max(1);
    for offset in (0..span.len).step_by(step) {
        // SAFETY: `offset` is below the length of the span, part of a live, readable and
        // writable mapping; rewriting its own value keeps the contents, and volatile accesses
        // keep the compiler from eliding the write that faults the page in.
        unsafe {
            let byte = base.add(offset);
            byte.write_volatile(byte.read_volatile());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn covered(parts: &[(usize, usize)]) -> usize {
        parts.iter().map(|p| p.1).sum()
    }

    #[test]
    fn slices_cover_the_range_in_whole_pages() {
        let parts = slices(10 * MIB, 2 * MIB, 3);

        assert_eq!(
            parts,
            vec![(0, 2 * MIB), (2 * MIB, 4 * MIB), (6 * MIB, 4 * MIB)]
        );
        assert_eq!(covered(&parts), 10 * MIB);
    }

    #[test]
    fn slices_never_outnumber_pages() {
        let parts = slices(3 * 4096, 4096, 8);

        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.1 == 4096));
    }

    #[test]
    fn one_slice_is_the_whole_range() {
        assert_eq!(slices(5 * MIB, 4096, 1), vec![(0, 5 * MIB)]);
    }

    #[test]
    fn contiguous_slices_without_gaps() {
        let parts = slices(1000 * 4096, 4096, 7);

        for pair in parts.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0);
        }
        assert_eq!(covered(&parts), 1000 * 4096);
    }

    #[test]
    fn thread_count_is_one_per_cpu_bounded() {
        assert_eq!(thread_count(4096 * MIB, 4), 4);
        assert_eq!(thread_count(4096 * MIB, 64), MAX_PREFAULT_THREADS);
        assert_eq!(thread_count(64 * MIB, 8), 2);
        assert_eq!(thread_count(MIB, 8), 1);
        assert_eq!(thread_count(4096 * MIB, 0), 1);
    }

    /// Where the mapping of `any_failing_slice_fails_the_whole_prefault` starts.
    static FIRST_SLICE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn fails_past_the_first_slice(span: Span) -> io::Result<()> {
        if span.addr != FIRST_SLICE.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        populate_write(span)
    }

    fn span_of(region: &vm_memory::MmapRegion) -> Span {
        Span {
            addr: region.as_ptr() as usize,
            len: region.size(),
        }
    }

    #[test]
    fn any_failing_slice_fails_the_whole_prefault() {
        let region = vm_memory::MmapRegion::<()>::new(8 * MIB).unwrap();
        let span = span_of(&region);
        FIRST_SLICE.store(span.addr, std::sync::atomic::Ordering::SeqCst);

        let result = prefault_parallel(
            span,
            4096,
            4,
            &CpuList::default(),
            fails_past_the_first_slice,
        );

        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn parallel_prefault_faults_every_slice_in() {
        let region = vm_memory::MmapRegion::<()>::new(8 * MIB).unwrap();
        let span = span_of(&region);

        let threads =
            prefault_parallel(span, 4096, 4, &CpuList::default(), populate_write).unwrap();

        assert_eq!(threads, 4);
        let mut residency = vec![0u8; 8 * MIB / 4096];
        // SAFETY: the range is the live mapping; one byte per 4 KiB page of it.
        let ret = unsafe { libc::mincore(region.as_ptr().cast(), 8 * MIB, residency.as_mut_ptr()) };
        assert_eq!(ret, 0);
        assert!(residency.iter().all(|r| r & 1 == 1));
    }
}
