//! Host locality: where guest RAM and the vCPU threads go on a NUMA host.
//!
//! Decided before the first touch of guest RAM, in [`crate::Vm::new`]:
//!
//! 1. [`plan`] reads the host's nodes ([`topology`]), the node of each cold-plugged passthrough
//!    device and the CPUs this process may use, and [`decide`]s: explicit options
//!    (`--memory host_node=N`, `--cpus N,affinity=CPULIST`) are honoured or refused with the
//!    numbers; otherwise, with `--placement auto` (the default), guest RAM is bound to the node
//!    all devices share and the vCPU threads are restricted to its CPUs. Every other case (no
//!    device, one node, unknown or different nodes, a node without the memory) is said in the
//!    [`Placement`]'s reason, logged and shown by `info`.
//! 2. Guest RAM is mapped, given the memory policy with `mbind(2)` ([`policy::bind_memory`])
//!    and prefaulted by threads on the node's CPUs ([`crate::memory::reserve_placed`]).
//! 3. Each vCPU thread sets its affinity first thing, before its seccomp filter
//!    ([`policy::set_thread_affinity`]). All vCPU threads share the one CPU list: vCPU `i` is
//!    not pinned to the `i`-th CPU; the host scheduler moves them within the list.
//!
//! With `--numa`, [`guest_place::place_guest_nodes`] extends the placement per guest node: each
//! node's RAM range gets its own policy (bound to its `host_node=`) and prefault CPUs, each vCPU
//! its node's host CPUs; the guest topology goes to the ACPI tables (SRAT, SLIT, `_PXM`).

pub mod cpulist;
pub mod decide;
pub mod guest_numa;
pub mod guest_place;
pub mod policy;
pub mod topology;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use cpulist::{CpuList, CpuListError};
pub use decide::{decide, PlacementRequest};
pub use guest_numa::{GuestNodeArg, GuestNodeInfo, GuestNuma, NumaError};
pub use guest_place::{GuestTopology, RangePlacement};
pub use topology::{allowed_cpus, device_node, HostTopology, NodeInfo};

use crate::memory::HugepageSize;
use crate::vm::config::VmConfig;

/// The sysfs root on a real host.
pub const SYSFS: &str = "/sys";

/// `--placement`: whether rvmm places guest RAM and vCPUs by the devices' host node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    /// Place by the cold-plugged devices' node (the default).
    #[default]
    Auto,
    /// No automatic placement; explicit options still apply.
    Off,
}

impl FromStr for PlacementMode {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(PlacementMode::Auto),
            "off" => Ok(PlacementMode::Off),
            _ => Err(PlacementError::InvalidMode(s.chars().take(40).collect())),
        }
    }
}

impl fmt::Display for PlacementMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlacementMode::Auto => "auto",
            PlacementMode::Off => "off",
        })
    }
}

/// The memory policy of guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryPolicy {
    /// The host's default (the faulting thread's node first).
    #[default]
    Default,
    /// `MPOL_BIND`: only the node; an allocation it cannot serve fails.
    Bind,
    /// `MPOL_PREFERRED`: the node first, other nodes when it is full.
    Preferred,
}

/// Where guest RAM and the vCPU threads go, and why (`info`'s `placement`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `--placement`.
    pub mode: PlacementMode,
    /// The memory policy of guest RAM.
    pub memory_policy: MemoryPolicy,
    /// The host node of that policy (absent for the default policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_node: Option<u32>,
    /// The host CPUs every vCPU thread may run on (absent: not restricted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_cpus: Option<CpuList>,
    /// Why, in one line.
    pub reason: String,
    /// The guest NUMA nodes (`--numa`) and where each runs; absent without `--numa`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_nodes: Vec<GuestNodeInfo>,
    /// The CPUs the prefault threads run on (one thread per CPU, bounded).
    #[serde(skip)]
    pub prefault_cpus: CpuList,
    /// Ranges of guest RAM with their own policy (one per guest node range with `--numa`),
    /// in place of the policy above for the RAM they cover.
    #[serde(skip)]
    pub ranges: Vec<RangePlacement>,
    /// Host CPUs of vCPU `i` at index `i` (with `--numa`), in place of `vcpu_cpus`; empty
    /// without.
    #[serde(skip)]
    pub vcpu_affinity: Vec<Option<CpuList>>,
}

impl Placement {
    /// The host CPUs vCPU `index`'s thread may run on, if restricted.
    pub fn vcpu_cpus_of(&self, index: usize) -> Option<CpuList> {
        if self.vcpu_affinity.is_empty() {
            self.vcpu_cpus.clone()
        } else {
            self.vcpu_affinity.get(index).cloned().flatten()
        }
    }
}

/// Errors of placement: refused explicit options and unreadable host information.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// `--placement` has another value.
    #[error("invalid placement \"{0}\"; use auto or off")]
    InvalidMode(String),
    /// `host_node=` names a node the host does not have.
    #[error(
        "host node {node} does not exist (the host's nodes: {}); give one of them in \
         --memory host_node=, or drop host_node",
        if .nodes.is_empty() { "none, no NUMA support".to_owned() } else { .nodes.to_string() }
    )]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The nodes the host has.
        nodes: CpuList,
    },
    /// The node cannot hold guest RAM on base pages.
    #[error(
        "host node {node} cannot hold guest RAM: it needs {needed_mib} MiB and node {node} has \
         {free_mib} MiB free (MemFree + FilePages); give a smaller --memory, another \
         host_node, or free memory on node {node}"
    )]
    NodeTooSmall {
        /// The node.
        node: u32,
        /// Guest RAM in MiB (rounded up).
        needed_mib: u64,
        /// What the node has free, in MiB (rounded down).
        free_mib: u64,
    },
    /// The node's hugepage pool cannot hold guest RAM.
    #[error(
        "host node {node} cannot hold guest RAM: it needs {needed} {size} hugepages and node \
         {node}'s pool has {free} free; grow it with `echo N > \
         /sys/devices/system/node/node{node}/hugepages/hugepages-{}kB/nr_hugepages`, or give \
         another host_node",
        size.kib()
    )]
    NodeHugepagesShort {
        /// The node.
        node: u32,
        /// The hugepage size.
        size: HugepageSize,
        /// Pages guest RAM needs.
        needed: u64,
        /// Free pages in the node's pool.
        free: u64,
    },
    /// `affinity=` names CPUs this process may not run on (offline, absent or outside its
    /// cpuset).
    #[error(
        "--cpus affinity= names host CPUs {missing} that rvmm may not run on; it may use {allowed}"
    )]
    AffinityUnavailable {
        /// The CPUs that are not allowed.
        missing: CpuList,
        /// The CPUs this process may use.
        allowed: CpuList,
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
    /// A host information file has an unexpected format.
    #[error("cannot parse {field} in {}", .path.display())]
    HostParse {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
    },
    /// `--numa` is inconsistent.
    #[error(transparent)]
    Numa(#[from] NumaError),
    /// A guest node's host node has no CPU the vCPUs may run on.
    #[error(
        "guest node {guest_node} is on host node {host_node}, which has none of the CPUs rvmm may \
         use for vCPUs ({allowed}); give another host_node or widen --cpus affinity="
    )]
    GuestNodeNoCpus {
        /// The guest node.
        guest_node: u32,
        /// Its host node.
        host_node: u32,
        /// The CPUs rvmm may use.
        allowed: CpuList,
    },
    /// `sched_getaffinity` failed.
    #[error("cannot read the CPUs rvmm may run on")]
    Affinity(#[source] io::Error),
}

/// Result of placement.
pub type Result<T> = std::result::Result<T, PlacementError>;

/// Decides the placement of the VM of `config` on this host (sysfs under `sys`): reads the
/// host's nodes, the node of each cold-plugged device and this process's CPUs, then
/// [`decide`]s. Logs the decision.
pub fn plan(config: &VmConfig, sys: &Path) -> Result<(Placement, Option<GuestTopology>)> {
    let numa = GuestNuma::new(&config.numa, config.cpus, &config.memory)?;
    let host = HostTopology::read(sys)?;
    let devices = config
        .devices
        .iter()
        .map(|spec| Ok((device_label(spec), device_node(sys, spec)?)))
        .collect::<Result<Vec<_>>>()?;
    let allowed = allowed_cpus().map_err(PlacementError::Affinity)?;
    let placement = decide(
        &PlacementRequest {
            mode: config.placement,
            host_node: config.memory.host_node,
            affinity: config.cpu_affinity.as_ref(),
            memory_bytes: config.memory.size,
            hugepages: config
                .memory
                .hugepages
                .then_some(config.memory.hugepage_size),
            devices: &devices,
        },
        &host,
        &allowed,
    )?;
    let (placement, topology) = match &numa {
        Some(numa) => {
            let (placement, topology) = guest_place::place_guest_nodes(
                numa,
                placement,
                &host,
                &allowed,
                config.cpu_affinity.as_ref(),
                config
                    .memory
                    .hugepages
                    .then_some(config.memory.hugepage_size),
                &|a, b| guest_place::read_host_distance(sys, a, b),
            )?;
            (placement, Some(topology))
        }
        None => (placement, None),
    };
    let placed = placement.memory_node.is_some()
        || placement.vcpu_cpus.is_some()
        || placement.ranges.iter().any(|r| r.node.is_some());
    let unplaced_with_devices = !placed
        && config.placement == PlacementMode::Auto
        && !devices.is_empty()
        && host.nodes.len() > 1;
    if unplaced_with_devices || placement.memory_policy == MemoryPolicy::Preferred {
        log::warn!("placement: {}", placement.reason);
    } else {
        log::info!("placement: {}", placement.reason);
    }
    Ok((placement, topology))
}

/// How a device is named in the placement's reason: its id, else its address or PF.
fn device_label(spec: &crate::device::DeviceSpec) -> String {
    use crate::device::DeviceSource;
    let source = match &spec.source {
        DeviceSource::Host(bdf) => bdf.to_string(),
        DeviceSource::Vf(request) => format!("a VF of {}", request.pf),
    };
    match &spec.id {
        Some(id) => format!("{id} ({source})"),
        None => source,
    }
}
