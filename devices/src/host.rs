//! Facts about the host that several parts of rvmm need.

/// The host's base page size in bytes (4 KiB if `sysconf` cannot tell).
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_size_is_a_power_of_two_of_at_least_4_kib() {
        let size = super::page_size();
        assert!(size >= 4096 && size.is_power_of_two(), "{size}");
    }
}
