use super::*;
use crate::memory::MemoryConfig;
use crate::placement::guest_numa::GuestNodeArg;
use crate::placement::topology::NodeInfo;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Two nodes: node 0 with CPUs 0-1 and 4 GiB free, node 1 with CPUs 2-3 and 1 GiB free.
fn host() -> HostTopology {
    HostTopology {
        nodes: vec![
            NodeInfo {
                id: 0,
                cpus: CpuList::from_ids([0, 1]),
                free_bytes: 4 * GIB,
                free_2m: 0,
                free_1g: 0,
            },
            NodeInfo {
                id: 1,
                cpus: CpuList::from_ids([2, 3]),
                free_bytes: GIB,
                free_2m: 0,
                free_1g: 0,
            },
        ],
    }
}

fn allowed() -> CpuList {
    CpuList::from_ids([0, 1, 2, 3])
}

fn numa(args: &[&str], cpus: u8, memory: &str) -> GuestNuma {
    let args: Vec<GuestNodeArg> = args.iter().map(|a| a.parse().unwrap()).collect();
    let memory: MemoryConfig = format!("size={memory}").parse().unwrap();
    GuestNuma::new(&args, cpus, &memory).unwrap().unwrap()
}

fn base() -> Placement {
    Placement {
        reason: "base".into(),
        prefault_cpus: allowed(),
        ..Placement::default()
    }
}

fn no_distance(_: u32, _: u32) -> Option<u8> {
    None
}

fn place(numa: &GuestNuma, affinity: Option<&CpuList>) -> Result<(Placement, GuestTopology)> {
    place_guest_nodes(
        numa,
        base(),
        &host(),
        &allowed(),
        affinity,
        None,
        &no_distance,
    )
}

#[test]
fn each_guest_node_is_bound_to_its_host_node_with_its_cpus() {
    let numa = numa(
        &[
            "guest_node=0,cpus=0,size=512M,host_node=0",
            "guest_node=1,cpus=1,size=512M,host_node=1",
        ],
        2,
        "1G",
    );
    let (p, topology) = place(&numa, None).unwrap();
    assert_eq!(
        p.ranges,
        vec![
            RangePlacement {
                start: 0,
                len: 512 * MIB,
                policy: MemoryPolicy::Bind,
                node: Some(0),
                prefault_cpus: CpuList::from_ids([0, 1]),
            },
            RangePlacement {
                start: 512 * MIB,
                len: 512 * MIB,
                policy: MemoryPolicy::Bind,
                node: Some(1),
                prefault_cpus: CpuList::from_ids([2, 3]),
            },
        ]
    );
    assert_eq!(p.vcpu_cpus_of(0), Some(CpuList::from_ids([0, 1])));
    assert_eq!(p.vcpu_cpus_of(1), Some(CpuList::from_ids([2, 3])));
    assert_eq!(p.guest_nodes.len(), 2);
    assert_eq!(p.guest_nodes[1].host_node, Some(1));
    assert!(p
        .reason
        .contains("guest node 1 (vCPUs 1, 512 MiB) on host node 1, CPUs 2-3"));
    assert_eq!(topology.distances, vec![vec![10, 20], vec![20, 10]]);
    assert_eq!(topology.host_node(1), Some(1));
    assert_eq!(
        topology.ranges,
        vec![(0, 0, 512 * MIB), (1, 512 * MIB, 512 * MIB)]
    );
}

#[test]
fn host_distance_is_used_when_known() {
    let numa = numa(
        &[
            "guest_node=0,cpus=0,size=512M,host_node=0",
            "guest_node=1,cpus=1,size=512M,host_node=1",
        ],
        2,
        "1G",
    );
    let (_, topology) =
        place_guest_nodes(&numa, base(), &host(), &allowed(), None, None, &|a, b| {
            Some(if a == b { 10 } else { 31 })
        })
        .unwrap();
    assert_eq!(topology.distances, vec![vec![10, 31], vec![31, 10]]);
}

#[test]
fn a_guest_node_without_host_node_follows_the_vm_placement() {
    let numa = numa(
        &[
            "guest_node=0,cpus=0,size=512M",
            "guest_node=1,cpus=1,size=512M,host_node=1",
        ],
        2,
        "1G",
    );
    let mut vm = base();
    vm.memory_policy = MemoryPolicy::Preferred;
    vm.memory_node = Some(0);
    vm.vcpu_cpus = Some(CpuList::from_ids([0]));
    let (p, topology) =
        place_guest_nodes(&numa, vm, &host(), &allowed(), None, None, &no_distance).unwrap();
    assert_eq!(p.ranges[0].policy, MemoryPolicy::Preferred);
    assert_eq!(p.ranges[0].node, Some(0));
    assert_eq!(p.vcpu_cpus_of(0), Some(CpuList::from_ids([0])));
    assert_eq!(p.vcpu_cpus_of(1), Some(CpuList::from_ids([2, 3])));
    assert_eq!(topology.nodes[0].host_node, Some(0));
    assert!(p.reason.starts_with("base; guest node 0"), "{}", p.reason);
    assert_eq!(p.memory_node, Some(0));
}

#[test]
fn affinity_narrows_a_node_cpus() {
    let numa = numa(
        &[
            "guest_node=0,cpus=0,size=512M,host_node=0",
            "guest_node=1,cpus=1,size=512M,host_node=1",
        ],
        2,
        "1G",
    );
    let (p, _) = place(&numa, Some(&CpuList::from_ids([1, 3]))).unwrap();
    assert_eq!(p.vcpu_cpus_of(0), Some(CpuList::from_ids([1])));
    assert_eq!(p.vcpu_cpus_of(1), Some(CpuList::from_ids([3])));
}

#[test]
fn options_that_cannot_be_honoured_are_refused() {
    let missing = numa(
        &[
            "guest_node=0,cpus=0,size=512M,host_node=0",
            "guest_node=1,cpus=1,size=512M,host_node=7",
        ],
        2,
        "1G",
    );
    assert!(matches!(
        place(&missing, None),
        Err(PlacementError::NoSuchNode { node: 7, .. })
    ));
    // Both guest nodes on host node 1, which has 1 GiB free: 1.5 GiB does not fit.
    let too_big = numa(
        &[
            "guest_node=0,cpus=0,size=768M,host_node=1",
            "guest_node=1,cpus=1,size=768M,host_node=1",
        ],
        2,
        "1536M",
    );
    assert!(matches!(
        place(&too_big, None),
        Err(PlacementError::NodeTooSmall {
            node: 1,
            needed_mib: 1536,
            free_mib: 1024
        })
    ));
    let no_cpus = numa(
        &[
            "guest_node=0,cpus=0,size=512M,host_node=0",
            "guest_node=1,cpus=1,size=512M,host_node=1",
        ],
        2,
        "1G",
    );
    let err = place(&no_cpus, Some(&CpuList::from_ids([0]))).unwrap_err();
    assert!(
        matches!(
            err,
            PlacementError::GuestNodeNoCpus {
                guest_node: 1,
                host_node: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn host_distance_file_is_read_by_index() {
    let dir = std::env::temp_dir().join(format!("rvmm-distance-{}", std::process::id()));
    let node = dir.join("devices/system/node/node1");
    std::fs::create_dir_all(&node).unwrap();
    std::fs::write(node.join("distance"), "21 10\n").unwrap();
    assert_eq!(read_host_distance(&dir, 1, 0), Some(21));
    assert_eq!(read_host_distance(&dir, 1, 1), Some(10));
    assert_eq!(read_host_distance(&dir, 1, 2), None);
    assert_eq!(read_host_distance(&dir, 0, 1), None);
    std::fs::remove_dir_all(&dir).unwrap();
}
