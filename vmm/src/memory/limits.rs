//! Host limits checked before guest RAM is allocated: `RLIMIT_MEMLOCK`, `CAP_IPC_LOCK`, the
//! hugepage pool and available memory.
//!
//! The checks are pure functions of numbers; [`HostProbe`] reads the numbers, so the whole
//! [`preflight`] can run against a fake host in tests.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rvmm_devices::host::{cap_ipc_lock, proc_kib_field};

use super::{HugepageSize, MemoryConfig, MemoryError, Result};

/// Where the kernel exposes the hugepage pools, one `hugepages-<kB>kB` directory per size.
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages";
/// Status of the running process (`VmLck`, `CapEff`).
const PROC_SELF_STATUS: &str = "/proc/self/status";
/// Host memory statistics (`MemTotal`, `MemAvailable`).
const PROC_MEMINFO: &str = "/proc/meminfo";
/// Capability bit of `CAP_IPC_LOCK`.
const MIB: u64 = 1 << 20;

/// The host's memory, from `/proc/meminfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal` in bytes.
    pub total: u64,
    /// `MemAvailable` in bytes: what can be allocated without swapping.
    pub available: u64,
}

/// One hugepage pool, from `/sys/kernel/mm/hugepages/hugepages-<kB>kB/`. Counts are in pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HugepagePool {
    /// `nr_hugepages`: pages in the persistent pool.
    pub total: u64,
    /// `free_hugepages`: pages not faulted in yet (reserved ones included).
    pub free: u64,
    /// `resv_hugepages`: free pages already promised to existing mappings.
    pub reserved: u64,
    /// `nr_overcommit_hugepages`: surplus pages the kernel may allocate beyond the pool.
    pub overcommit: u64,
    /// `surplus_hugepages`: surplus pages in use.
    pub surplus: u64,
}

impl HugepagePool {
    /// Pages a new mapping can still get: free unreserved pages plus the unused overcommit.
    pub fn available(&self) -> u64 {
        self.free
            .saturating_sub(self.reserved)
            .saturating_add(self.overcommit.saturating_sub(self.surplus))
    }

    /// Reads the pool from its sysfs directory; `None` if the directory does not exist (the size
    /// is not supported by the host).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let read = |name: &'static str| -> Result<u64> {
            let path = dir.join(name);
            let text = fs::read_to_string(&path).map_err(|source| MemoryError::HostRead {
                path: path.clone(),
                source,
            })?;
            text.trim()
                .parse()
                .map_err(|_| MemoryError::HostParse { path, field: name })
        };
        Ok(Some(HugepagePool {
            total: read("nr_hugepages")?,
            free: read("free_hugepages")?,
            reserved: read("resv_hugepages")?,
            overcommit: read("nr_overcommit_hugepages")?,
            surplus: read("surplus_hugepages")?,
        }))
    }
}

/// The sysfs directory of the hugepage pool of `size`.
pub(crate) fn hugepage_dir(size: HugepageSize) -> PathBuf {
    Path::new(HUGEPAGES_SYSFS).join(format!("hugepages-{}kB", size.kib()))
}

/// Reads the host facts the reservation checks. [`SystemHost`] reads the real ones; tests inject
/// fakes.
pub trait HostProbe {
    /// The soft `RLIMIT_MEMLOCK` in bytes; `None` when unlimited.
    fn memlock_limit(&self) -> Result<Option<u64>>;
    /// Whether the process has `CAP_IPC_LOCK` in its effective set.
    fn has_cap_ipc_lock(&self) -> Result<bool>;
    /// Memory the process has locked already, in bytes.
    fn locked_bytes(&self) -> Result<u64>;
    /// The host's total and available memory.
    fn memory(&self) -> Result<HostMemory>;
    /// The hugepage pool of `size`; `None` when the host does not support that size.
    fn hugepage_pool(&self, size: HugepageSize) -> Result<Option<HugepagePool>>;
}

/// The running process on the running host.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemHost;

impl HostProbe for SystemHost {
    fn memlock_limit(&self) -> Result<Option<u64>> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid, writable rlimit that outlives the call.
        let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
        if ret != 0 {
            return Err(MemoryError::MemlockLimit(io::Error::last_os_error()));
        }
        Ok((limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur))
    }

    fn has_cap_ipc_lock(&self) -> Result<bool> {
        let status = read_host_file(PROC_SELF_STATUS)?;
        cap_ipc_lock(&status).ok_or_else(|| MemoryError::HostParse {
            path: PROC_SELF_STATUS.into(),
            field: "CapEff",
        })
    }

    fn locked_bytes(&self) -> Result<u64> {
        locked_memory()
    }

    fn memory(&self) -> Result<HostMemory> {
        let meminfo = read_host_file(PROC_MEMINFO)?;
        let field = |name: &'static str| {
            proc_kib_field(&meminfo, name).ok_or_else(|| MemoryError::HostParse {
                path: PROC_MEMINFO.into(),
                field: name,
            })
        };
        Ok(HostMemory {
            total: field("MemTotal")?,
            available: field("MemAvailable")?,
        })
    }

    fn hugepage_pool(&self, size: HugepageSize) -> Result<Option<HugepagePool>> {
        HugepagePool::read(&hugepage_dir(size))
    }
}

/// Memory locked by the running process (`VmLck` of `/proc/self/status`), in bytes.
///
/// hugetlb mappings never count here, even when `mlock`ed: the kernel does not account them as
/// locked since they cannot be swapped anyway.
pub fn locked_memory() -> Result<u64> {
    let status = read_host_file(PROC_SELF_STATUS)?;
    proc_kib_field(&status, "VmLck").ok_or_else(|| MemoryError::HostParse {
        path: PROC_SELF_STATUS.into(),
        field: "VmLck",
    })
}

/// Checks that the host can hold and lock guest RAM of `config`, before anything is allocated.
///
/// Validates `config`, then checks `RLIMIT_MEMLOCK` (skipped with `CAP_IPC_LOCK`) and either the
/// hugepage pool or the host's available memory.
pub fn preflight(config: &MemoryConfig, host: &dyn HostProbe) -> Result<()> {
    config.validate()?;
    let has_cap = host.has_cap_ipc_lock()?;
    if !has_cap {
        check_memlock(
            config.size,
            host.memlock_limit()?,
            host.locked_bytes()?,
            has_cap,
        )?;
    }
    if config.hugepages {
        check_hugepage_pool(
            config.size,
            config.hugepage_size,
            host.hugepage_pool(config.hugepage_size)?,
        )
    } else {
        check_host_memory(config.size, host.memory()?)
    }
}

/// Checks that `needed` more bytes can be locked under the soft `RLIMIT_MEMLOCK` `limit`
/// (`None`: unlimited) with `locked` bytes locked already: [`rvmm_devices::host::check_memlock`],
/// the one rule, with this module's error.
pub fn check_memlock(
    needed: u64,
    limit: Option<u64>,
    locked: u64,
    has_cap_ipc_lock: bool,
) -> Result<()> {
    rvmm_devices::host::check_memlock(needed, limit, locked, has_cap_ipc_lock).map_err(|s| {
        MemoryError::MemlockTooLow {
            needed_mib: s.needed.div_ceil(MIB),
            available_mib: s.available() / MIB,
            limit_mib: s.limit / MIB,
            locked_mib: s.locked.div_ceil(MIB),
        }
    })
}

/// Checks that the hugepage `pool` of `size` (`None`: not supported by the host) can back
/// `needed` bytes.
pub fn check_hugepage_pool(
    needed: u64,
    size: HugepageSize,
    pool: Option<HugepagePool>,
) -> Result<()> {
    let Some(pool) = pool else {
        return Err(MemoryError::HugepagesUnsupported {
            size,
            path: hugepage_dir(size),
        });
    };
    let needed_pages = needed.div_ceil(size.bytes());
    let available = pool.available();
    if needed_pages <= available {
        return Ok(());
    }
    Err(MemoryError::HugepagePoolTooSmall {
        size,
        needed: needed_pages,
        available,
        total: pool.total,
        suggested_total: pool.total.saturating_add(needed_pages - available),
        nr_path: hugepage_dir(size).join("nr_hugepages"),
    })
}

/// Checks that the host's available memory can hold `needed` bytes of 4 KiB-backed guest RAM,
/// which will be locked and so can never be swapped out to make room.
pub fn check_host_memory(needed: u64, memory: HostMemory) -> Result<()> {
    if needed <= memory.available {
        return Ok(());
    }
    Err(MemoryError::HostMemoryTooSmall {
        needed_mib: needed.div_ceil(MIB),
        available_mib: memory.available / MIB,
        total_mib: memory.total / MIB,
    })
}

fn read_host_file(path: &str) -> Result<String> {
    fs::read_to_string(path).map_err(|source| MemoryError::HostRead {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use vmm_sys_util::tempdir::TempDir;

    const GIB: u64 = 1 << 30;

    /// A host with fixed facts.
    pub(crate) struct FakeHost {
        pub(crate) memlock_limit: Option<u64>,
        pub(crate) cap_ipc_lock: bool,
        pub(crate) locked: u64,
        pub(crate) memory: HostMemory,
        pub(crate) pool: Option<HugepagePool>,
    }

    impl FakeHost {
        /// A host where every check passes: 64 GiB free, unlimited memlock, 2M pages only.
        pub(crate) fn roomy() -> Self {
            FakeHost {
                memlock_limit: None,
                cap_ipc_lock: false,
                locked: 0,
                memory: HostMemory {
                    total: 64 * GIB,
                    available: 64 * GIB,
                },
                pool: Some(HugepagePool {
                    total: 32768,
                    free: 32768,
                    ..Default::default()
                }),
            }
        }
    }

    impl HostProbe for FakeHost {
        fn memlock_limit(&self) -> Result<Option<u64>> {
            Ok(self.memlock_limit)
        }

        fn has_cap_ipc_lock(&self) -> Result<bool> {
            Ok(self.cap_ipc_lock)
        }

        fn locked_bytes(&self) -> Result<u64> {
            Ok(self.locked)
        }

        fn memory(&self) -> Result<HostMemory> {
            Ok(self.memory)
        }

        fn hugepage_pool(&self, size: HugepageSize) -> Result<Option<HugepagePool>> {
            Ok(self.pool.filter(|_| size == HugepageSize::Size2M))
        }
    }

    fn config(size: u64, hugepages: Option<HugepageSize>) -> MemoryConfig {
        MemoryConfig {
            size,
            hugepages: hugepages.is_some(),
            hugepage_size: hugepages.unwrap_or_default(),
            host_node: None,
        }
    }

    #[test]
    fn preflight_passes_on_a_roomy_host() {
        assert!(preflight(&config(GIB, None), &FakeHost::roomy()).is_ok());
    }

    #[test]
    fn preflight_refuses_short_memlock() {
        let host = FakeHost {
            memlock_limit: Some(64 * MIB),
            ..FakeHost::roomy()
        };
        assert!(matches!(
            preflight(&config(GIB, None), &host),
            Err(MemoryError::MemlockTooLow { .. })
        ));
    }

    #[test]
    fn preflight_counts_already_locked_memory() {
        let host = FakeHost {
            memlock_limit: Some(GIB),
            locked: MIB,
            ..FakeHost::roomy()
        };
        assert!(matches!(
            preflight(&config(GIB, None), &host),
            Err(MemoryError::MemlockTooLow { locked_mib: 1, .. })
        ));
    }

    #[test]
    fn preflight_with_cap_ipc_lock_skips_memlock() {
        let host = FakeHost {
            memlock_limit: Some(0),
            cap_ipc_lock: true,
            ..FakeHost::roomy()
        };
        assert!(preflight(&config(GIB, None), &host).is_ok());
    }

    #[test]
    fn preflight_checks_memlock_for_hugepages_too() {
        let host = FakeHost {
            memlock_limit: Some(64 * MIB),
            ..FakeHost::roomy()
        };
        assert!(matches!(
            preflight(&config(GIB, Some(HugepageSize::Size2M)), &host),
            Err(MemoryError::MemlockTooLow { .. })
        ));
    }

    #[test]
    fn preflight_refuses_more_than_available_host_memory() {
        let host = FakeHost {
            memory: HostMemory {
                total: 2 * GIB,
                available: GIB,
            },
            ..FakeHost::roomy()
        };
        assert!(matches!(
            preflight(&config(2 * GIB, None), &host),
            Err(MemoryError::HostMemoryTooSmall { .. })
        ));
    }

    #[test]
    fn preflight_uses_the_hugepage_pool_not_host_memory_for_hugepages() {
        let host = FakeHost {
            memory: HostMemory {
                total: 2 * GIB,
                available: 0,
            },
            ..FakeHost::roomy()
        };
        assert!(preflight(&config(GIB, Some(HugepageSize::Size2M)), &host).is_ok());
    }

    #[test]
    fn preflight_refuses_small_hugepage_pool() {
        let host = FakeHost {
            pool: Some(HugepagePool {
                total: 16,
                free: 16,
                ..Default::default()
            }),
            ..FakeHost::roomy()
        };
        assert!(matches!(
            preflight(&config(GIB, Some(HugepageSize::Size2M)), &host),
            Err(MemoryError::HugepagePoolTooSmall {
                needed: 512,
                available: 16,
                ..
            })
        ));
    }

    #[test]
    fn preflight_refuses_unsupported_hugepage_size() {
        assert!(matches!(
            preflight(&config(GIB, Some(HugepageSize::Size1G)), &FakeHost::roomy()),
            Err(MemoryError::HugepagesUnsupported {
                size: HugepageSize::Size1G,
                ..
            })
        ));
    }

    #[test]
    fn preflight_validates_the_config_first() {
        assert!(matches!(
            preflight(&config(0, None), &FakeHost::roomy()),
            Err(MemoryError::ZeroSize)
        ));
    }

    #[test]
    fn memlock_within_limit_passes() {
        assert!(check_memlock(512 * MIB, Some(GIB), 0, false).is_ok());
    }

    #[test]
    fn memlock_exactly_at_limit_passes() {
        assert!(check_memlock(GIB, Some(GIB), 0, false).is_ok());
    }

    #[test]
    fn memlock_over_limit_is_refused_with_numbers() {
        let err = check_memlock(GIB, Some(8 * MIB), 0, false).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::MemlockTooLow {
                needed_mib: 1024,
                available_mib: 8,
                limit_mib: 8,
                locked_mib: 0
            }
        ));
    }

    #[test]
    fn memlock_counts_memory_already_locked() {
        let err = check_memlock(512 * MIB, Some(GIB), 768 * MIB, false).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::MemlockTooLow {
                needed_mib: 512,
                available_mib: 256,
                limit_mib: 1024,
                locked_mib: 768
            }
        ));
    }

    #[test]
    fn memlock_with_more_locked_than_limit_has_nothing_available() {
        let err = check_memlock(64 * MIB, Some(8 * MIB), 16 * MIB, false).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::MemlockTooLow {
                available_mib: 0,
                ..
            }
        ));
    }

    #[test]
    fn memlock_unlimited_passes() {
        assert!(check_memlock(u64::MAX, None, 0, false).is_ok());
    }

    #[test]
    fn memlock_with_cap_ipc_lock_ignores_limit() {
        assert!(check_memlock(GIB, Some(0), 0, true).is_ok());
    }

    #[test]
    fn memlock_refusal_names_the_fixes() {
        let message = check_memlock(GIB, Some(64 * MIB), 0, false)
            .unwrap_err()
            .to_string();
        assert!(message.contains("needs 1024 MiB"), "{message}");
        assert!(message.contains("only 64 MiB"), "{message}");
        assert!(message.contains("ulimit -l unlimited"), "{message}");
        assert!(message.contains("--memory"), "{message}");
        assert!(message.contains("CAP_IPC_LOCK"), "{message}");
    }

    #[test]
    fn hugepage_pool_large_enough_passes() {
        let pool = HugepagePool {
            total: 512,
            free: 512,
            ..Default::default()
        };
        assert!(check_hugepage_pool(GIB, HugepageSize::Size2M, Some(pool)).is_ok());
    }

    #[test]
    fn hugepage_pool_too_small_is_refused_with_numbers() {
        let pool = HugepagePool {
            total: 300,
            free: 100,
            ..Default::default()
        };
        let err = check_hugepage_pool(GIB, HugepageSize::Size2M, Some(pool)).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::HugepagePoolTooSmall {
                needed: 512,
                available: 100,
                total: 300,
                suggested_total: 712,
                ..
            }
        ));
    }

    #[test]
    fn hugepage_pool_reserved_pages_are_not_available() {
        let pool = HugepagePool {
            total: 512,
            free: 512,
            reserved: 1,
            ..Default::default()
        };
        let err = check_hugepage_pool(GIB, HugepageSize::Size2M, Some(pool)).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::HugepagePoolTooSmall { available: 511, .. }
        ));
    }

    #[test]
    fn hugepage_overcommit_headroom_is_available() {
        let pool = HugepagePool {
            total: 0,
            free: 0,
            overcommit: 600,
            surplus: 88,
            reserved: 0,
        };
        assert!(check_hugepage_pool(GIB, HugepageSize::Size2M, Some(pool)).is_ok());
    }

    #[test]
    fn missing_hugepage_pool_means_unsupported_size() {
        let err = check_hugepage_pool(GIB, HugepageSize::Size1G, None).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::HugepagesUnsupported { size: HugepageSize::Size1G, ref path }
                if path == Path::new("/sys/kernel/mm/hugepages/hugepages-1048576kB")
        ));
    }

    #[test]
    fn hugepage_refusal_names_the_sysfs_fix() {
        let pool = HugepagePool {
            total: 0,
            free: 0,
            ..Default::default()
        };
        let message = check_hugepage_pool(2 * GIB, HugepageSize::Size1G, Some(pool))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("echo 2 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"),
            "{message}"
        );
        assert!(message.contains("hugepagesz=1G"), "{message}");
    }

    #[test]
    fn host_memory_large_enough_passes() {
        let memory = HostMemory {
            total: 16 * GIB,
            available: 8 * GIB,
        };
        assert!(check_host_memory(8 * GIB, memory).is_ok());
    }

    #[test]
    fn host_memory_too_small_is_refused_with_numbers() {
        let memory = HostMemory {
            total: 16 * GIB,
            available: 8 * GIB,
        };
        let err = check_host_memory(9 * GIB, memory).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::HostMemoryTooSmall {
                needed_mib: 9216,
                available_mib: 8192,
                total_mib: 16384
            }
        ));
    }

    #[test]
    fn hugepage_pool_is_read_from_sysfs_files() {
        let dir = TempDir::new().unwrap();
        for (name, value) in [
            ("nr_hugepages", "10\n"),
            ("free_hugepages", "8\n"),
            ("resv_hugepages", "2\n"),
            ("nr_overcommit_hugepages", "4\n"),
            ("surplus_hugepages", "1\n"),
        ] {
            fs::write(dir.as_path().join(name), value).unwrap();
        }
        let pool = HugepagePool::read(dir.as_path()).unwrap().unwrap();
        assert_eq!(
            pool,
            HugepagePool {
                total: 10,
                free: 8,
                reserved: 2,
                overcommit: 4,
                surplus: 1
            }
        );
        assert_eq!(pool.available(), 9);
    }

    #[test]
    fn missing_hugepage_dir_reads_as_unsupported() {
        let dir = TempDir::new().unwrap();
        assert_eq!(
            HugepagePool::read(&dir.as_path().join("hugepages-4kB")).unwrap(),
            None
        );
    }

    #[test]
    fn unreadable_hugepage_file_is_an_error() {
        let dir = TempDir::new().unwrap();
        assert!(matches!(
            HugepagePool::read(dir.as_path()),
            Err(MemoryError::HostRead { .. })
        ));
    }

    #[test]
    fn kib_field_is_parsed_to_bytes() {
        let status = "Name:\trvmm\nVmLck:\t   65536 kB\nVmPin:\t       0 kB\n";
        assert_eq!(proc_kib_field(status, "VmLck"), Some(64 * MIB));
    }

    #[test]
    fn kib_field_missing_is_none() {
        assert_eq!(proc_kib_field("Name:\trvmm\n", "VmLck"), None);
    }

    #[test]
    fn kib_field_prefix_does_not_match_longer_key() {
        assert_eq!(proc_kib_field("VmLckX:\t 4 kB\n", "VmLck"), None);
    }

    #[test]
    fn cap_eff_with_bit_14_has_cap_ipc_lock() {
        assert_eq!(cap_ipc_lock("CapEff:\t0000000000004000\n"), Some(true));
    }

    #[test]
    fn cap_eff_without_bit_14_lacks_cap_ipc_lock() {
        assert_eq!(cap_ipc_lock("CapEff:\t000001ffffffbfff\n"), Some(false));
    }

    #[test]
    fn malformed_cap_eff_is_none() {
        assert_eq!(cap_ipc_lock("CapEff:\tzz\n"), None);
    }

    #[test]
    fn system_host_reports_memory() {
        let memory = SystemHost.memory().unwrap();
        assert!(memory.total > 0 && memory.available <= memory.total);
    }

    #[test]
    fn system_host_reads_cap_ipc_lock() {
        assert!(SystemHost.has_cap_ipc_lock().is_ok());
    }

    #[test]
    fn system_host_reads_memlock_limit() {
        assert!(SystemHost.memlock_limit().is_ok());
    }
}
