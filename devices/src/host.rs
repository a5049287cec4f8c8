//! Facts about the host that several parts of rvmm need, and the one rule for locked memory.

/// The host's base page size in bytes (4 KiB if `sysconf` cannot tell).
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// Why `needed` more bytes cannot be locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockShortfall {
    /// Bytes to lock.
    pub needed: u64,
    /// Bytes this process has locked already (they count against the same limit).
    pub locked: u64,
    /// The soft `RLIMIT_MEMLOCK`.
    pub limit: u64,
}

impl MemlockShortfall {
    /// What the limit still allows.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.locked)
    }

    /// The limit that would do: what is locked plus what is needed.
    pub fn limit_needed(&self) -> u64 {
        self.locked.saturating_add(self.needed)
    }
}

/// The one memlock rule of rvmm, as the kernel applies it to `mlock` and to VFIO's pinning of
/// DMA-mapped pages alike: `needed` more bytes may be locked when `locked` + `needed` stay within
/// the soft `RLIMIT_MEMLOCK` `limit` (`None`: unlimited), or when the process has
/// `CAP_IPC_LOCK`. Both count in the same `locked_vm`: guest RAM that is `mlock`ed (4 KiB pages)
/// and then DMA-mapped for passthrough counts twice.
pub fn check_memlock(
    needed: u64,
    limit: Option<u64>,
    locked: u64,
    cap_ipc_lock: bool,
) -> Result<(), MemlockShortfall> {
    match limit {
        Some(limit) if !cap_ipc_lock && locked.saturating_add(needed) > limit => {
            Err(MemlockShortfall {
                needed,
                locked,
                limit,
            })
        }
        _ => Ok(()),
    }
}

/// The value of a `<name>: <value>` line of a `/proc` text (`/proc/<pid>/status`,
/// `/proc/meminfo`), trimmed.
pub fn proc_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim())
    })
}

/// A `<name>: <n> kB` line of a `/proc` text, in bytes.
pub fn proc_kib_field(text: &str, name: &str) -> Option<u64> {
    let kib = proc_field(text, name)?.strip_suffix("kB")?.trim_end();
    kib.parse::<u64>().ok()?.checked_mul(1024)
}

/// `CAP_IPC_LOCK`'s bit number.
const CAP_IPC_LOCK: u32 = 14;

/// Whether `CapEff` (hexadecimal) of a `/proc/<pid>/status` text has `CAP_IPC_LOCK`; `None`
/// when the field is missing or not hexadecimal.
pub fn cap_ipc_lock(status: &str) -> Option<bool> {
    let caps = u64::from_str_radix(proc_field(status, "CapEff")?, 16).ok()?;
    Some(caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_size_is_a_power_of_two_of_at_least_4_kib() {
        let size = super::page_size();
        assert!(size >= 4096 && size.is_power_of_two(), "{size}");
    }

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn memory_locked_already_counts_against_the_limit() {
        assert!(check_memlock(512 * MIB, Some(1024 * MIB), 0, false).is_ok());
        assert_eq!(
            check_memlock(512 * MIB, Some(1024 * MIB), 768 * MIB, false),
            Err(MemlockShortfall {
                needed: 512 * MIB,
                locked: 768 * MIB,
                limit: 1024 * MIB
            })
        );
    }

    #[test]
    fn no_limit_or_cap_ipc_lock_allows_anything() {
        assert!(check_memlock(u64::MAX, None, u64::MAX, false).is_ok());
        assert!(check_memlock(u64::MAX, Some(0), u64::MAX, true).is_ok());
    }

    #[test]
    fn shortfall_names_the_limit_that_would_do() {
        let s = check_memlock(512 * MIB, Some(600 * MIB), 512 * MIB, false).unwrap_err();
        assert_eq!((s.available(), s.limit_needed()), (88 * MIB, 1024 * MIB));
    }

    #[test]
    fn status_fields_read_in_bytes() {
        let status = "Name:\trvmm\nVmLck:\t  524288 kB\nVmPin:\t0 kB\n";
        assert_eq!(proc_kib_field(status, "VmLck"), Some(512 * MIB));
        assert_eq!(proc_kib_field(status, "VmRSS"), None);
        assert_eq!(cap_ipc_lock("CapEff:\t0000000000004000\n"), Some(true));
        assert_eq!(cap_ipc_lock("CapEff:\tnot-hex\n"), None);
    }
}
