//! Guest NUMA topology (`--numa guest_node=G,cpus=LIST,size=SIZE[,host_node=N]`): which vCPUs
//! and which part of guest RAM each guest node has, and the host node behind it.
//!
//! Guest RAM is given to the guest nodes in order of their number: node 0 gets the first `size`
//! bytes of guest RAM, node 1 the next, and so on, over the guest memory map (below the 32-bit
//! MMIO hole first, then from 4 GiB: [`crate::memory::ram_regions`]). A node's RAM may so be two
//! ranges, one on each side of the hole.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::cpulist::CpuList;
use crate::memory::{parse_size, ram_regions, MemoryConfig};

/// Granule of a guest node's size on base pages: 2 MiB, so that every node boundary is
/// hugepage- and (for Linux) section-friendly.
pub const NODE_GRANULE: u64 = 2 << 20;
/// Most guest nodes.
pub const MAX_GUEST_NODES: u32 = 64;
/// SLIT distance of a node to itself (ACPI: 10).
pub const LOCAL_DISTANCE: u8 = 10;
/// SLIT distance between two guest nodes on different or unknown host nodes, when the host does
/// not say better.
pub const REMOTE_DISTANCE: u8 = 20;

/// One `--numa` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNodeArg {
    /// `guest_node=`: the guest's node number (its proximity domain).
    pub guest_node: u32,
    /// `cpus=`: the vCPU indices of the node.
    pub cpus: CpuList,
    /// `size=`: its RAM in bytes.
    pub size: u64,
    /// `host_node=`: the host node its RAM is bound to and whose CPUs run its vCPUs.
    pub host_node: Option<u32>,
}

/// Errors of `--numa`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumaError {
    /// The argument is not understood.
    #[error(
        "--numa \"{given}\": {why}; give guest_node=G,cpus=LIST,size=SIZE[,host_node=N], e.g. \
         guest_node=0,cpus=0-1,size=1G,host_node=0"
    )]
    Syntax {
        /// The argument (cut).
        given: String,
        /// What is wrong.
        why: String,
    },
    /// Two `--numa` name the same guest node.
    #[error("guest node {0} is given twice in --numa")]
    DuplicateNode(u32),
    /// Guest node numbers leave a gap.
    #[error("guest nodes must be numbered 0 to {last} without gaps; guest node {missing} is missing from --numa")]
    NodeGap {
        /// The highest number expected.
        last: u32,
        /// The first missing number.
        missing: u32,
    },
    /// Too many guest nodes.
    #[error("{given} guest nodes given in --numa; at most {MAX_GUEST_NODES}")]
    TooManyNodes {
        /// Nodes given.
        given: usize,
    },
    /// A vCPU is in two nodes.
    #[error("vCPU {cpu} is in guest nodes {first} and {second}; give each vCPU to one node")]
    CpuTwice {
        /// The vCPU.
        cpu: u32,
        /// One node.
        first: u32,
        /// The other.
        second: u32,
    },
    /// A vCPU of a node does not exist.
    #[error("guest node {node} names vCPUs {missing} but the VM has {cpus} vCPUs (0 to {}); fix cpus= or --cpus", .cpus.saturating_sub(1))]
    NoSuchCpu {
        /// The node.
        node: u32,
        /// The vCPUs that do not exist.
        missing: CpuList,
        /// The VM's vCPU count.
        cpus: u8,
    },
    /// A vCPU is in no node.
    #[error("vCPUs {0} are in no guest node; give every vCPU of --cpus to one --numa cpus=")]
    CpuInNoNode(CpuList),
    /// The node sizes do not add up to the guest RAM.
    #[error(
        "the --numa sizes add up to {sum} MiB but --memory size is {memory} MiB; make them equal"
    )]
    SizeSum {
        /// The sum, in MiB.
        sum: u64,
        /// The guest RAM, in MiB.
        memory: u64,
    },
    /// A node's size is not a multiple of the granule.
    #[error("guest node {node} size={size} bytes is not a multiple of {granule} bytes (the page size of guest RAM, at least 2 MiB); round it")]
    Misaligned {
        /// The node.
        node: u32,
        /// Its size.
        size: u64,
        /// The granule.
        granule: u64,
    },
}

impl FromStr for GuestNodeArg {
    type Err = NumaError;

    /// Parses `guest_node=G,cpus=LIST,size=SIZE[,host_node=N]`; `LIST` is a kernel CPU list
    /// whose own commas are allowed (`cpus=0-1,4`).
    fn from_str(s: &str) -> Result<Self, NumaError> {
        let syntax = |why: String| NumaError::Syntax {
            given: s.chars().take(80).collect(),
            why,
        };
        let mut guest_node = None;
        let mut cpus: Option<String> = None;
        let mut size = None;
        let mut host_node = None;
        let mut last_key = "";
        for token in s.split(',') {
            let Some((key, value)) = token.split_once('=') else {
                // A bare item continues the CPU list of the `cpus=` just before it.
                match (last_key, cpus.as_mut()) {
                    ("cpus", Some(list)) => {
                        list.push(',');
                        list.push_str(token);
                        continue;
                    }
                    _ => return Err(syntax(format!("\"{token}\" is not key=value"))),
                }
            };
            last_key = match key {
                "guest_node" => {
                    let n = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n < MAX_GUEST_NODES && !value.starts_with('+'))
                        .ok_or_else(|| {
                            syntax(format!(
                                "guest_node={value} is not a node number 0 to {}",
                                MAX_GUEST_NODES - 1
                            ))
                        })?;
                    guest_node = Some(n);
                    "guest_node"
                }
                "cpus" => {
                    cpus = Some(value.to_owned());
                    "cpus"
                }
                "size" => {
                    size = Some(parse_size(value).map_err(|e| syntax(e.to_string()))?);
                    "size"
                }
                "host_node" => {
                    let n = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n < 1024 && !value.starts_with('+'))
                        .ok_or_else(|| {
                            syntax(format!("host_node={value} is not a node number 0 to 1023"))
                        })?;
                    host_node = Some(n);
                    "host_node"
                }
                other => return Err(syntax(format!("unknown key \"{other}\""))),
            };
        }
        let guest_node = guest_node.ok_or_else(|| syntax("guest_node= is missing".into()))?;
        let cpus: CpuList = cpus
            .ok_or_else(|| syntax("cpus= is missing".into()))?
            .parse()
            .map_err(|e: super::CpuListError| syntax(e.to_string()))?;
        if cpus.is_empty() {
            return Err(syntax("cpus= needs at least one vCPU".into()));
        }
        let size = size.ok_or_else(|| syntax("size= is missing".into()))?;
        if size == 0 {
            return Err(syntax("size= must not be 0".into()));
        }
        Ok(GuestNodeArg {
            guest_node,
            cpus,
            size,
            host_node,
        })
    }
}

impl fmt::Display for GuestNodeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest_node={},cpus={},size={}",
            self.guest_node, self.cpus, self.size
        )?;
        if let Some(n) = self.host_node {
            write!(f, ",host_node={n}")?;
        }
        Ok(())
    }
}

/// A checked guest NUMA topology: nodes in order of their number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNuma {
    /// The nodes, node `i` at index `i`.
    pub nodes: Vec<GuestNodeArg>,
}

/// A guest node's RAM: one range of guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRange {
    /// The guest node.
    pub guest_node: u32,
    /// First guest physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestNuma {
    /// Checks `args` against the VM's `cpus` vCPUs and `memory`: nodes numbered 0..n once
    /// each, every vCPU in exactly one node, sizes multiples of the page granule adding up to
    /// the guest RAM. `None` for no `--numa`.
    pub fn new(
        args: &[GuestNodeArg],
        cpus: u8,
        memory: &MemoryConfig,
    ) -> Result<Option<Self>, NumaError> {
        if args.is_empty() {
            return Ok(None);
        }
        if args.len() > MAX_GUEST_NODES as usize {
            return Err(NumaError::TooManyNodes { given: args.len() });
        }
        let mut nodes: Vec<GuestNodeArg> = args.to_vec();
        nodes.sort_by_key(|n| n.guest_node);
        for pair in nodes.windows(2) {
            if pair[0].guest_node == pair[1].guest_node {
                return Err(NumaError::DuplicateNode(pair[0].guest_node));
            }
        }
        let last = nodes.len() as u32 - 1;
        if let Some(missing) = (0..=last).find(|i| nodes.iter().all(|n| n.guest_node != *i)) {
            return Err(NumaError::NodeGap { last, missing });
        }
        let all = CpuList::from_ids(0..u32::from(cpus));
        let mut owner: Vec<Option<u32>> = vec![None; usize::from(cpus)];
        for node in &nodes {
            let missing = node.cpus.difference(&all);
            if !missing.is_empty() {
                return Err(NumaError::NoSuchCpu {
                    node: node.guest_node,
                    missing,
                    cpus,
                });
            }
            for cpu in node.cpus.iter() {
                if let Some(first) = owner[cpu as usize] {
                    return Err(NumaError::CpuTwice {
                        cpu,
                        first,
                        second: node.guest_node,
                    });
                }
                owner[cpu as usize] = Some(node.guest_node);
            }
        }
        let unowned =
            CpuList::from_ids((0..u32::from(cpus)).filter(|c| owner[*c as usize].is_none()));
        if !unowned.is_empty() {
            return Err(NumaError::CpuInNoNode(unowned));
        }
        let granule = memory.page_size().max(NODE_GRANULE);
        for node in &nodes {
            if node.size % granule != 0 {
                return Err(NumaError::Misaligned {
                    node: node.guest_node,
                    size: node.size,
                    granule,
                });
            }
        }
        let sum = nodes
            .iter()
            .try_fold(0u64, |acc, n| acc.checked_add(n.size))
            .unwrap_or(u64::MAX);
        if sum != memory.size {
            return Err(NumaError::SizeSum {
                sum: sum >> 20,
                memory: memory.size >> 20,
            });
        }
        Ok(Some(GuestNuma { nodes }))
    }

    /// The guest node of vCPU `cpu`.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(cpu))
            .map(|n| n.guest_node)
    }

    /// Every node's RAM as ranges of guest physical addresses, in address order: the nodes'
    /// sizes laid one after the other over [`ram_regions`] of their sum.
    pub fn ranges(&self) -> Vec<NodeRange> {
        let total = self.nodes.iter().map(|n| n.size).sum();
        let mut out = Vec::new();
        let mut regions = ram_regions(total).into_iter();
        let mut current = regions.next();
        // Offset into the current region.
        let mut used = 0u64;
        for node in &self.nodes {
            let mut left = node.size;
            while left > 0 {
                let Some((start, len)) = current else { break };
                let take = left.min(len - used);
                out.push(NodeRange {
                    guest_node: node.guest_node,
                    start: start.0 + used,
                    len: take,
                });
                left -= take;
                used += take;
                if used == len {
                    current = regions.next();
                    used = 0;
                }
            }
        }
        out
    }
}

/// A guest node as `info` shows it (`placement.guest_nodes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNodeInfo {
    /// The guest's node number.
    pub guest_node: u32,
    /// Its vCPUs.
    pub cpus: CpuList,
    /// Its RAM in bytes.
    pub memory_bytes: u64,
    /// The host node its RAM is bound to (absent: that of the VM's placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_node: Option<u32>,
    /// The host CPUs its vCPU threads run on (absent: not restricted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpus: Option<CpuList>,
}

#[cfg(test)]
#[path = "guest_numa_tests.rs"]
mod tests;
