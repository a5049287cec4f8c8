//! The two host calls of placement: a memory policy on a mapping (`mbind(2)`) and the CPU
//! affinity of the calling thread (`sched_setaffinity(2)`).

use std::io;

use super::cpulist::CpuList;
use super::MemoryPolicy;

/// `MPOL_PREFERRED` of `<linux/mempolicy.h>`.
const MPOL_PREFERRED: libc::c_ulong = 1;
/// `MPOL_BIND` of `<linux/mempolicy.h>`.
const MPOL_BIND: libc::c_ulong = 2;

/// Gives the `len` bytes at `addr` the memory policy `policy` on host node `node` (nothing for
/// [`MemoryPolicy::Default`]). Only pages faulted in later follow it: call it on a fresh
/// mapping, before the first touch.
///
/// # Safety
/// `addr..addr + len` must be a mapping of this process that nobody else changes meanwhile;
/// `addr` must be page-aligned.
pub unsafe fn bind_memory(
    addr: *mut u8,
    len: usize,
    policy: MemoryPolicy,
    node: u32,
) -> io::Result<()> {
    let mode = match policy {
        MemoryPolicy::Default => return Ok(()),
        MemoryPolicy::Bind => MPOL_BIND,
        MemoryPolicy::Preferred => MPOL_PREFERRED,
    };
    let mask = CpuList::from_ids([node]).to_mask();
    // The kernel reads `maxnode - 1` bits of the mask.
    let maxnode = mask.len() as libc::c_ulong * libc::c_ulong::from(libc::c_ulong::BITS) + 1;
    // SAFETY: the caller guarantees the range is a mapping of ours; the kernel only reads the
    // mask, which holds the `maxnode - 1` bits it is told; flags 0 moves no page.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            mode,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_ulong,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Restricts the calling thread to `cpus`.
pub fn set_thread_affinity(cpus: &CpuList) -> io::Result<()> {
    let mask = cpus.to_mask();
    // SAFETY: the kernel reads `size_of_val(mask)` bytes from the live mask; pid 0 is the
    // calling thread.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_sched_setaffinity,
            0,
            std::mem::size_of_val(mask.as_slice()),
            mask.as_ptr(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The memory policy of the page at `addr` and its node set (`get_mempolicy(2)` with
/// `MPOL_F_ADDR`), for checks.
pub fn policy_of(addr: *const u8) -> io::Result<(libc::c_int, CpuList)> {
    const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
    let mut mode: libc::c_int = 0;
    let mut mask = vec![0 as libc::c_ulong; 16];
    let maxnode = mask.len() as libc::c_ulong * libc::c_ulong::from(libc::c_ulong::BITS);
    // SAFETY: the kernel writes one int to `mode` and at most `maxnode` bits to `mask`, both
    // live; with MPOL_F_ADDR `addr` is only looked up, not accessed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            maxnode,
            addr as libc::c_ulong,
            MPOL_F_ADDR,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((mode, CpuList::from_mask(&mask)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::topology::{allowed_cpus, HostTopology};

    fn first_node() -> u32 {
        HostTopology::read(std::path::Path::new("/sys"))
            .unwrap()
            .nodes
            .first()
            .map_or(0, |n| n.id)
    }

    fn mapping(len: usize) -> *mut u8 {
        // SAFETY: a fresh anonymous mapping; the tests unmap it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        ptr.cast()
    }

    #[test]
    fn bound_mapping_reports_the_bind_policy_on_its_node() {
        let len = 1 << 20;
        let ptr = mapping(len);
        let node = first_node();

        // SAFETY: the fresh mapping above, page-aligned.
        unsafe { bind_memory(ptr, len, MemoryPolicy::Bind, node) }.unwrap();

        let (mode, nodes) = policy_of(ptr).unwrap();
        assert_eq!(mode as libc::c_ulong, MPOL_BIND);
        assert_eq!(nodes, CpuList::from_ids([node]));
        // SAFETY: unmaps the mapping made above, no longer used.
        unsafe { libc::munmap(ptr.cast(), len) };
    }

    #[test]
    fn default_policy_changes_nothing() {
        let len = 1 << 20;
        let ptr = mapping(len);

        // SAFETY: as above.
        unsafe { bind_memory(ptr, len, MemoryPolicy::Default, 0) }.unwrap();

        assert_eq!(policy_of(ptr).unwrap().0, 0);
        // SAFETY: as above.
        unsafe { libc::munmap(ptr.cast(), len) };
    }

    #[test]
    fn binding_to_an_absent_node_fails() {
        let len = 1 << 20;
        let ptr = mapping(len);

        // SAFETY: as above.
        let result = unsafe { bind_memory(ptr, len, MemoryPolicy::Bind, 4000) };

        assert!(result.is_err());
        // SAFETY: as above.
        unsafe { libc::munmap(ptr.cast(), len) };
    }

    #[test]
    fn thread_affinity_is_set_to_the_list() {
        let allowed = allowed_cpus().unwrap();
        let first = CpuList::from_ids(allowed.iter().take(1));

        let seen = std::thread::spawn(move || {
            set_thread_affinity(&first).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();

        assert_eq!(seen, CpuList::from_ids(allowed.iter().take(1)));
    }
}
