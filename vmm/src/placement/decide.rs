//! The placement decision: a pure function of the devices' host nodes, the host's nodes and the
//! options, so that every case is unit-tested without a NUMA host.

use super::cpulist::CpuList;
use super::topology::HostTopology;
use super::{MemoryPolicy, Placement, PlacementError, PlacementMode, Result};
use crate::memory::HugepageSize;

const MIB: u64 = 1 << 20;

/// What the placement is decided from.
#[derive(Clone, Debug)]
pub struct PlacementRequest<'a> {
    /// `--placement`.
    pub mode: PlacementMode,
    /// `--memory host_node=`: strict binding of guest RAM to this node.
    pub host_node: Option<u32>,
    /// `--cpus affinity=`: the host CPUs of every vCPU thread.
    pub affinity: Option<&'a CpuList>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The hugepage size backing guest RAM, if hugetlb.
    pub hugepages: Option<HugepageSize>,
    /// Each cold-plugged passthrough device (its name) and its host node (`None`: unknown).
    pub devices: &'a [(String, Option<u32>)],
}

/// Decides where guest RAM and the vCPU threads go on `host`, where this process may run on
/// `allowed` CPUs. Explicit options that cannot be honoured are refused; the automatic
/// placement never refuses, it says what it did instead.
pub fn decide(
    request: &PlacementRequest<'_>,
    host: &HostTopology,
    allowed: &CpuList,
) -> Result<Placement> {
    if let Some(affinity) = request.affinity {
        let missing = affinity.difference(allowed);
        if !missing.is_empty() {
            return Err(PlacementError::AffinityUnavailable {
                missing,
                allowed: allowed.clone(),
            });
        }
    }
    let mut reasons = Vec::new();
    let (policy, node) = match request.host_node {
        Some(id) => {
            let node = host.node(id).ok_or_else(|| PlacementError::NoSuchNode {
                node: id,
                nodes: CpuList::from_ids(host.nodes.iter().map(|n| n.id)),
            })?;
            if let Some(shortfall) = shortfall(request, node) {
                return Err(shortfall.into_error(id));
            }
            reasons.push(format!(
                "guest RAM bound to host node {id} (--memory host_node={id})"
            ));
            (MemoryPolicy::Bind, Some(id))
        }
        None if request.mode == PlacementMode::Off => {
            reasons.push("automatic placement is off (--placement off)".to_owned());
            (MemoryPolicy::Default, None)
        }
        None => automatic(request, host, &mut reasons),
    };
    let node_cpus = node
        .and_then(|id| host.node(id))
        .map(|n| n.cpus.intersection(allowed));
    let vcpu_cpus = match (request.affinity, &node_cpus) {
        (Some(affinity), _) => {
            reasons.push(format!(
                "vCPU threads on host CPUs {affinity} (--cpus affinity=)"
            ));
            Some(affinity.clone())
        }
        (None, Some(cpus)) if !cpus.is_empty() => {
            reasons.push(format!(
                "vCPU threads on node {}'s CPUs {cpus}",
                node.unwrap_or_default()
            ));
            Some(cpus.clone())
        }
        (None, Some(_)) => {
            reasons.push(format!(
                "vCPU threads not restricted: node {} has no CPU this process may use",
                node.unwrap_or_default()
            ));
            None
        }
        (None, None) => None,
    };
    let prefault_cpus = match node_cpus {
        Some(cpus) if !cpus.is_empty() => cpus,
        _ => allowed.clone(),
    };
    Ok(Placement {
        mode: request.mode,
        memory_policy: policy,
        memory_node: node,
        vcpu_cpus,
        reason: reasons.join("; "),
        prefault_cpus,
        ..Placement::default()
    })
}

/// The automatic placement: on the node every device shares, else nowhere, with the reason.
fn automatic(
    request: &PlacementRequest<'_>,
    host: &HostTopology,
    reasons: &mut Vec<String>,
) -> (MemoryPolicy, Option<u32>) {
    let none = (MemoryPolicy::Default, None);
    if request.devices.is_empty() {
        reasons.push("no passthrough device at start: not placed".to_owned());
        return none;
    }
    if host.nodes.len() < 2 {
        reasons.push("the host has a single NUMA node: not placed".to_owned());
        return none;
    }
    let unknown: Vec<&str> = request
        .devices
        .iter()
        .filter(|(_, node)| node.is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    if !unknown.is_empty() {
        reasons.push(format!(
            "the host does not say the NUMA node of {} (numa_node -1): not placed, guest RAM \
             and vCPUs use every node",
            unknown.join(", ")
        ));
        return none;
    }
    let nodes = CpuList::from_ids(request.devices.iter().filter_map(|(_, n)| *n));
    let names = |id: u32| {
        request
            .devices
            .iter()
            .filter(|(_, n)| *n == Some(id))
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if nodes.len() > 1 {
        let spread: Vec<String> = nodes
            .iter()
            .map(|id| format!("node {id}: {}", names(id)))
            .collect();
        reasons.push(format!(
            "the passthrough devices span host nodes ({}): not placed, guest RAM and vCPUs use \
             every node",
            spread.join("; ")
        ));
        return none;
    }
    let Some(id) = nodes.iter().next() else {
        return none;
    };
    let Some(node) = host.node(id) else {
        reasons.push(format!(
            "{} on host node {id}, which the host does not list: not placed",
            names(id)
        ));
        return none;
    };
    match shortfall(request, node) {
        None => {
            reasons.push(format!(
                "{} on host node {id}: guest RAM bound to node {id}",
                names(id)
            ));
            (MemoryPolicy::Bind, Some(id))
        }
        Some(shortfall) => {
            reasons.push(format!(
                "{} on host node {id}, but node {id} {}: guest RAM preferred on node {id}, the \
                 rest on other nodes",
                names(id),
                shortfall.describe()
            ));
            (MemoryPolicy::Preferred, Some(id))
        }
    }
}

/// Why a node cannot hold guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shortfall {
    /// Base pages: bytes free on the node and bytes needed.
    Memory { free: u64, needed: u64 },
    /// Hugepages: free pages in the node's pool and pages needed.
    Hugepages {
        size: HugepageSize,
        free: u64,
        needed: u64,
    },
}

impl Shortfall {
    fn describe(self) -> String {
        match self {
            Shortfall::Memory { free, needed } => format!(
                "has {} MiB free (MemFree + FilePages) and guest RAM needs {} MiB",
                free / MIB,
                needed.div_ceil(MIB)
            ),
            Shortfall::Hugepages { size, free, needed } => {
                format!("has {free} free {size} hugepages and guest RAM needs {needed}")
            }
        }
    }

    pub(super) fn into_error(self, node: u32) -> PlacementError {
        match self {
            Shortfall::Memory { free, needed } => PlacementError::NodeTooSmall {
                node,
                needed_mib: needed.div_ceil(MIB),
                free_mib: free / MIB,
            },
            Shortfall::Hugepages { size, free, needed } => PlacementError::NodeHugepagesShort {
                node,
                size,
                needed,
                free,
            },
        }
    }
}

/// What `node` lacks to hold the guest RAM of `request`, if anything.
fn shortfall(
    request: &PlacementRequest<'_>,
    node: &super::topology::NodeInfo,
) -> Option<Shortfall> {
    shortfall_of(request.memory_bytes, request.hugepages, node)
}

/// What `node` lacks to hold `bytes` of guest RAM (on `hugepages` if set), if anything.
pub(super) fn shortfall_of(
    bytes: u64,
    hugepages: Option<HugepageSize>,
    node: &super::topology::NodeInfo,
) -> Option<Shortfall> {
    match hugepages {
        Some(size) => {
            let needed = bytes.div_ceil(size.bytes());
            let free = node.free_hugepages(size);
            (free < needed).then_some(Shortfall::Hugepages { size, free, needed })
        }
        None => (node.free_bytes < bytes).then_some(Shortfall::Memory {
            free: node.free_bytes,
            needed: bytes,
        }),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
