//! Placement of a guest NUMA topology (`--numa`): each guest node's RAM bound to its host node
//! and its vCPU threads on that node's CPUs. A pure function of the topology, the host and the
//! VM's overall placement, which guest nodes without `host_node=` follow.

use std::path::Path;

use super::cpulist::CpuList;
use super::decide::shortfall_of;
use super::guest_numa::{GuestNodeInfo, GuestNuma, LOCAL_DISTANCE, REMOTE_DISTANCE};
use super::topology::HostTopology;
use super::{MemoryPolicy, Placement, PlacementError, Result};
use crate::memory::HugepageSize;

/// One range of guest RAM with its own memory policy and prefault CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangePlacement {
    /// First guest physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its memory policy.
    pub policy: MemoryPolicy,
    /// The host node of the policy (none for the default policy).
    pub node: Option<u32>,
    /// The CPUs its prefault threads run on.
    pub prefault_cpus: CpuList,
}

/// The guest topology as placed: what ACPI describes and where each node runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestTopology {
    /// The guest nodes as `info` shows them, in order.
    pub nodes: Vec<GuestNodeInfo>,
    /// Each node's RAM ranges, (guest node, start, length), in address order.
    pub ranges: Vec<(u32, u64, u64)>,
    /// SLIT distances, `distances[i][j]` from guest node `i` to `j`.
    pub distances: Vec<Vec<u8>>,
}

impl GuestTopology {
    /// The host node behind guest node `node`, if it has one.
    pub fn host_node(&self, node: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.guest_node == node)
            .and_then(|n| n.host_node)
    }
}

/// Places `numa` on `host` under the VM's overall `base` placement: a guest node with
/// `host_node=N` gets its RAM bound to N (refused when N does not exist or, with every guest
/// node on it, cannot hold it) and its vCPUs on N's CPUs that this process may use (and that
/// `affinity` allows); a guest node without follows `base`. `host_distance(a, b)` is the host's
/// SLIT distance between two host nodes, if known. Returns `base` extended with the per-range
/// and per-vCPU placement, and the guest topology.
pub fn place_guest_nodes(
    numa: &GuestNuma,
    base: Placement,
    host: &HostTopology,
    allowed: &CpuList,
    affinity: Option<&CpuList>,
    hugepages: Option<HugepageSize>,
    host_distance: &dyn Fn(u32, u32) -> Option<u8>,
) -> Result<(Placement, GuestTopology)> {
    let nodes_list = || CpuList::from_ids(host.nodes.iter().map(|n| n.id));
    // Every host node must exist and hold all guest nodes bound to it.
    for id in numa.nodes.iter().filter_map(|n| n.host_node) {
        let info = host.node(id).ok_or_else(|| PlacementError::NoSuchNode {
            node: id,
            nodes: nodes_list(),
        })?;
        let needed: u64 = numa
            .nodes
            .iter()
            .filter(|n| n.host_node == Some(id))
            .map(|n| n.size)
            .sum();
        if let Some(short) = shortfall_of(needed, hugepages, info) {
            return Err(short.into_error(id));
        }
    }
    let mut placement = base;
    let mut infos = Vec::with_capacity(numa.nodes.len());
    let mut node_cpus: Vec<Option<CpuList>> = Vec::with_capacity(numa.nodes.len());
    let mut reasons = Vec::new();
    for node in &numa.nodes {
        let (host_node, cpus) = match node.host_node {
            Some(id) => {
                let mut cpus = host
                    .node(id)
                    .map(|n| n.cpus.intersection(allowed))
                    .unwrap_or_default();
                if let Some(affinity) = affinity {
                    cpus = cpus.intersection(affinity);
                }
                if cpus.is_empty() {
                    return Err(PlacementError::GuestNodeNoCpus {
                        guest_node: node.guest_node,
                        host_node: id,
                        allowed: affinity.cloned().unwrap_or_else(|| allowed.clone()),
                    });
                }
                reasons.push(format!(
                    "guest node {} (vCPUs {}, {} MiB) on host node {id}, CPUs {cpus}",
                    node.guest_node,
                    node.cpus,
                    node.size >> 20
                ));
                (Some(id), Some(cpus))
            }
            None => {
                reasons.push(format!(
                    "guest node {} (vCPUs {}, {} MiB) follows the VM's placement",
                    node.guest_node,
                    node.cpus,
                    node.size >> 20
                ));
                (placement.memory_node, placement.vcpu_cpus.clone())
            }
        };
        infos.push(GuestNodeInfo {
            guest_node: node.guest_node,
            cpus: node.cpus.clone(),
            memory_bytes: node.size,
            host_node,
            host_cpus: cpus.clone(),
        });
        node_cpus.push(cpus);
    }
    let ranges = numa.ranges();
    placement.ranges = ranges
        .iter()
        .map(|r| {
            let node = &numa.nodes[r.guest_node as usize];
            match node.host_node {
                Some(id) => RangePlacement {
                    start: r.start,
                    len: r.len,
                    policy: MemoryPolicy::Bind,
                    node: Some(id),
                    prefault_cpus: node_cpus[r.guest_node as usize].clone().unwrap_or_default(),
                },
                None => RangePlacement {
                    start: r.start,
                    len: r.len,
                    policy: placement.memory_policy,
                    node: placement.memory_node,
                    prefault_cpus: placement.prefault_cpus.clone(),
                },
            }
        })
        .collect();
    placement.vcpu_affinity = (0..numa.nodes.iter().map(|n| n.cpus.len()).sum::<usize>() as u32)
        .map(|cpu| {
            numa.node_of_cpu(cpu)
                .and_then(|g| node_cpus[g as usize].clone())
        })
        .collect();
    if numa.nodes.iter().all(|n| n.host_node.is_some()) {
        // Nothing follows the VM-wide decision: say only what was done, per guest node.
        placement.memory_policy = MemoryPolicy::Bind;
        placement.memory_node = None;
        placement.vcpu_cpus = None;
        placement.reason = format!("--numa: {}", reasons.join("; "));
    } else {
        placement.reason = format!("{}; {}", placement.reason, reasons.join("; "));
    }
    let distances = infos
        .iter()
        .map(|a| {
            infos
                .iter()
                .map(|b| guest_distance(a, b, host_distance))
                .collect()
        })
        .collect();
    placement.guest_nodes = infos.clone();
    let topology = GuestTopology {
        nodes: infos,
        ranges: ranges
            .iter()
            .map(|r| (r.guest_node, r.start, r.len))
            .collect(),
        distances,
    };
    Ok((placement, topology))
}

/// The SLIT distance between guest nodes `a` and `b`: 10 to itself; the host's distance between
/// their host nodes when both have one and the host says it; 20 otherwise.
fn guest_distance(
    a: &GuestNodeInfo,
    b: &GuestNodeInfo,
    host_distance: &dyn Fn(u32, u32) -> Option<u8>,
) -> u8 {
    if a.guest_node == b.guest_node {
        return LOCAL_DISTANCE;
    }
    match (a.host_node, b.host_node) {
        (Some(x), Some(y)) => host_distance(x, y)
            .filter(|d| *d > LOCAL_DISTANCE && *d < 255)
            .unwrap_or(REMOTE_DISTANCE),
        _ => REMOTE_DISTANCE,
    }
}

/// The host's SLIT distance from host node `a` to `b` (`nodeA/distance` under the sysfs root
/// `sys`), if readable.
pub fn read_host_distance(sys: &Path, a: u32, b: u32) -> Option<u8> {
    let text =
        std::fs::read_to_string(sys.join(format!("devices/system/node/node{a}/distance"))).ok()?;
    let index = b as usize;
    text.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
#[path = "guest_place_tests.rs"]
mod tests;
