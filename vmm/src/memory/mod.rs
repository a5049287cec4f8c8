//! Guest RAM: allocated whole at start, prefaulted and locked.
//!
//! A VM with VFIO passthrough needs every guest page resident and pinned: the device DMAs to guest
//! physical addresses at any time, so there must be no page fault, swap or migration behind them.
//! This module therefore reserves all of guest RAM before the VM is built:
//!
//! 1. [`MemoryConfig`] is parsed from the `--memory` value and validated (size, alignment).
//! 2. [`preflight`] checks the host before anything is allocated: `RLIMIT_MEMLOCK` (unless the
//!    process has `CAP_IPC_LOCK`), the hugepage pool or the host's available memory. A refusal
//!    names the numbers and the fix.
//! 3. [`reserve`] maps each region of [`ram_regions`] (anonymous, private, optionally hugetlb),
//!    gives it the memory policy of the VM's [`Placement`](crate::placement::Placement)
//!    ([`reserve_placed`]), prefaults it with `MADV_POPULATE_WRITE` (touching every page on
//!    kernels before 5.14) from several threads ([`prefault`]) and `mlock`s it.
//!
//! The mappings are created by vm-memory's `MmapRegionBuilder`, so each `MmapRegion` owns its
//! mapping and unmaps it when dropped; unmapping also drops the lock. Dropping the returned
//! [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) (and every clone of its regions) releases guest
//! RAM; a failed reservation releases the regions it already made before returning.
//!
//! # Limitations
//! - hugetlb pages are never swapped and the kernel does not account them in `VmLck` (see
//!   [`locked_memory`]); `mlock` still checks them against `RLIMIT_MEMLOCK`, so the same limit
//!   check applies to both backings.
//! - VFIO type1 accounts the pages it pins against `RLIMIT_MEMLOCK` again, on top of `mlock`. With
//!   passthrough devices and without `CAP_IPC_LOCK`, the limit must cover twice the guest size of
//!   4 KiB-backed RAM. The first passthrough device checks that before it DMA-maps guest RAM,
//!   with the one rule of [`rvmm_devices::host::check_memlock`] that [`check_memlock`] applies
//!   here (what is locked already counts).

mod config;
mod limits;
pub mod prefault;
mod reserve;
mod size;

use std::io;
use std::path::PathBuf;

pub use config::{HugepageSize, MemoryConfig, MAX_SIZE, MIN_SIZE};
pub use limits::{
    check_host_memory, check_hugepage_pool, check_memlock, locked_memory, preflight, HostMemory,
    HostProbe, HugepagePool, SystemHost,
};
pub use reserve::{ram_regions, reserve, reserve_placed, reserve_with};
pub use size::parse_size;

use size::DisplayBytes;

/// Errors of guest memory configuration and reservation.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A size is not a number with an optional binary suffix.
    #[error(
        "invalid size \"{value}\": expected a number with an optional K, M, G or T suffix, \
         e.g. 512M"
    )]
    InvalidSize {
        /// The rejected text.
        value: String,
    },
    /// A size does not fit in 64 bits.
    #[error("size \"{value}\" is too large to represent in bytes (more than 16 EiB)")]
    SizeOverflow {
        /// The rejected text.
        value: String,
    },
    /// The guest memory size is zero.
    #[error("guest memory size is 0; give a size such as size=512M")]
    ZeroSize,
    /// The guest memory size is below what a guest needs to boot.
    #[error(
        "guest memory size {} is below the minimum of {} needed to boot; use at least size=64M",
        DisplayBytes(*.size),
        DisplayBytes(*.minimum)
    )]
    SizeTooSmall {
        /// The requested size in bytes.
        size: u64,
        /// The minimum size in bytes.
        minimum: u64,
    },
    /// The guest memory size is above the supported maximum.
    #[error(
        "guest memory size {} is above the supported maximum of {}; use a smaller size",
        DisplayBytes(*.size),
        DisplayBytes(*.maximum)
    )]
    SizeTooLarge {
        /// The requested size in bytes.
        size: u64,
        /// The maximum size in bytes.
        maximum: u64,
    },
    /// The guest memory size is not a multiple of the backing page size.
    #[error(
        "guest memory size {} is not a multiple of the {} page size; round it to a multiple of {}",
        DisplayBytes(*.size),
        DisplayBytes(*.page_size),
        DisplayBytes(*.page_size)
    )]
    SizeNotAligned {
        /// The requested size in bytes.
        size: u64,
        /// The page size backing guest RAM, in bytes.
        page_size: u64,
    },
    /// The memory option string is empty.
    #[error("memory options are empty; give at least size=, e.g. size=512M")]
    EmptyOptions,
    /// An option between commas is empty.
    #[error("empty memory option in \"{options}\"; remove the extra comma")]
    EmptyOption {
        /// The whole option string.
        options: String,
    },
    /// An option is not of the form `key=value`.
    #[error("memory option \"{option}\" is not of the form key=value")]
    MissingValue {
        /// The rejected option.
        option: String,
    },
    /// An option key is not known.
    #[error(
        "unknown memory option \"{key}\"; valid options are size, hugepages, hugepage_size and \
         host_node"
    )]
    UnknownKey {
        /// The rejected key.
        key: String,
    },
    /// An option is given more than once.
    #[error("memory option \"{key}\" is given more than once; keep one")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// The `size` option is missing.
    #[error("memory options lack the size; add size=, e.g. size=512M")]
    MissingSize,
    /// An on/off option has another value.
    #[error("invalid value \"{value}\" for memory option {key}; use on or off")]
    InvalidSwitch {
        /// The option key.
        key: String,
        /// The rejected value.
        value: String,
    },
    /// A hugepage size other than 2M or 1G was requested.
    #[error("unsupported hugepage size \"{value}\"; use 2M or 1G")]
    UnsupportedHugepageSize {
        /// The rejected value.
        value: String,
    },
    /// `host_node` is not a node number.
    #[error("invalid host_node \"{value}\"; give a host NUMA node number, e.g. host_node=1")]
    InvalidHostNode {
        /// The rejected value.
        value: String,
    },
    /// `hugepage_size` was given without `hugepages=on`.
    #[error(
        "hugepage_size is set but hugepages is not on; add hugepages=on or drop hugepage_size"
    )]
    HugepageSizeWithoutHugepages,
    /// `RLIMIT_MEMLOCK` is too low to lock guest RAM.
    #[error(
        "guest memory needs {needed_mib} MiB locked but RLIMIT_MEMLOCK allows only \
         {available_mib} MiB more (limit {limit_mib} MiB, {locked_mib} MiB already locked); run \
         `ulimit -l unlimited`, give a smaller --memory, or run rvmm with CAP_IPC_LOCK"
    )]
    MemlockTooLow {
        /// Memory to lock, in MiB (rounded up).
        needed_mib: u64,
        /// What the limit still allows, in MiB (rounded down).
        available_mib: u64,
        /// The soft `RLIMIT_MEMLOCK`, in MiB (rounded down).
        limit_mib: u64,
        /// Memory this process has locked already, in MiB (rounded up).
        locked_mib: u64,
    },
    /// The host has no pool for the requested hugepage size.
    #[error(
        "{size} hugepages are not supported by this host ({} does not exist); use another \
         hugepage_size or hugepages=off",
        .path.display()
    )]
    HugepagesUnsupported {
        /// The requested hugepage size.
        size: HugepageSize,
        /// The sysfs directory that is missing.
        path: PathBuf,
    },
    /// The hugepage pool cannot hold guest RAM.
    #[error(
        "guest memory needs {needed} free {size} hugepages but only {available} are available \
         ({total} in the pool); grow the pool with `echo {suggested_total} > {}`{}",
        .nr_path.display(),
        boot_time_hint(*.size)
    )]
    HugepagePoolTooSmall {
        /// The hugepage size.
        size: HugepageSize,
        /// Pages guest RAM needs.
        needed: u64,
        /// Pages the pool can still hand out.
        available: u64,
        /// Pages in the pool (`nr_hugepages`).
        total: u64,
        /// Pool size that would hold guest RAM.
        suggested_total: u64,
        /// The sysfs file that sets the pool size.
        nr_path: PathBuf,
    },
    /// The host does not have enough available memory for guest RAM.
    #[error(
        "guest memory of {needed_mib} MiB exceeds the host's available memory of \
         {available_mib} MiB ({total_mib} MiB total); give a smaller --memory or free host memory"
    )]
    HostMemoryTooSmall {
        /// Guest RAM in MiB (rounded up).
        needed_mib: u64,
        /// The host's `MemAvailable` in MiB.
        available_mib: u64,
        /// The host's `MemTotal` in MiB.
        total_mib: u64,
    },
    /// A host information file cannot be read.
    #[error("cannot read {}", .path.display())]
    HostRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A host information file lacks a field or has it in an unexpected format.
    #[error("cannot parse {field} in {}", .path.display())]
    HostParse {
        /// The file.
        path: PathBuf,
        /// The missing or malformed field.
        field: &'static str,
    },
    /// `getrlimit(RLIMIT_MEMLOCK)` failed.
    #[error("cannot read RLIMIT_MEMLOCK")]
    MemlockLimit(#[source] io::Error),
    /// A guest RAM region does not fit in this host's address space.
    #[error(
        "guest RAM region at {start:#x} of {} does not fit in this host's address space",
        DisplayBytes(*.size)
    )]
    RegionTooLarge {
        /// Guest physical start address.
        start: u64,
        /// Region size in bytes.
        size: u64,
    },
    /// Mapping a guest RAM region failed.
    #[error("cannot map guest RAM region at {start:#x} of {}", DisplayBytes(*.size))]
    Map {
        /// Guest physical start address.
        start: u64,
        /// Region size in bytes.
        size: u64,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// Giving a guest RAM region its memory policy failed.
    #[error(
        "cannot bind guest RAM region at {start:#x} of {} to host node {node}",
        DisplayBytes(*.size)
    )]
    Bind {
        /// Guest physical start address.
        start: u64,
        /// Region size in bytes.
        size: u64,
        /// The host node.
        node: u32,
        /// The mbind error.
        #[source]
        source: io::Error,
    },
    /// Prefaulting a guest RAM region failed.
    #[error("cannot prefault guest RAM region at {start:#x} of {}", DisplayBytes(*.size))]
    Populate {
        /// Guest physical start address.
        start: u64,
        /// Region size in bytes.
        size: u64,
        /// The madvise error.
        #[source]
        source: io::Error,
    },
    /// Locking a guest RAM region failed.
    #[error("cannot lock guest RAM region at {start:#x} of {}", DisplayBytes(*.size))]
    Lock {
        /// Guest physical start address.
        start: u64,
        /// Region size in bytes.
        size: u64,
        /// The mlock error.
        #[source]
        source: io::Error,
    },
    /// The mapped regions cannot be assembled into guest memory.
    #[error("cannot assemble guest memory from the mapped regions")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// How to get pages of `size` when the running kernel cannot allocate them: 1 GiB pages usually
/// need contiguous memory only found at boot.
fn boot_time_hint(size: HugepageSize) -> &'static str {
    match size {
        HugepageSize::Size1G => {
            " (1G pages may only be allocatable at boot: add hugepagesz=1G hugepages=N to the \
             kernel command line)"
        }
        HugepageSize::Size2M => "",
    }
}

/// Result of guest memory operations.
pub type Result<T> = std::result::Result<T, MemoryError>;
