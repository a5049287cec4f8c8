use super::*;
use crate::placement::topology::NodeInfo;

const GIB: u64 = 1 << 30;

/// Two nodes, one CPU each; node 0 with 4 GiB free, node 1 with 1 GiB and 100 free 2M pages.
fn host() -> HostTopology {
    HostTopology {
        nodes: vec![
            NodeInfo {
                id: 0,
                cpus: CpuList::from_ids([0]),
                free_bytes: 4 * GIB,
                free_2m: 0,
                free_1g: 0,
            },
            NodeInfo {
                id: 1,
                cpus: CpuList::from_ids([1]),
                free_bytes: GIB,
                free_2m: 100,
                free_1g: 0,
            },
        ],
    }
}

fn allowed() -> CpuList {
    CpuList::from_ids([0, 1])
}

fn request<'a>(devices: &'a [(String, Option<u32>)]) -> PlacementRequest<'a> {
    PlacementRequest {
        mode: PlacementMode::Auto,
        host_node: None,
        affinity: None,
        memory_bytes: 512 << 20,
        hugepages: None,
        devices,
    }
}

fn devices(nodes: &[Option<u32>]) -> Vec<(String, Option<u32>)> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("disk{i}"), *n))
        .collect()
}

#[test]
fn devices_on_one_node_bind_ram_and_vcpus_there() {
    let devices = devices(&[Some(1), Some(1)]);

    let p = decide(&request(&devices), &host(), &allowed()).unwrap();

    assert_eq!(p.memory_policy, MemoryPolicy::Bind);
    assert_eq!(p.memory_node, Some(1));
    assert_eq!(p.vcpu_cpus, Some(CpuList::from_ids([1])));
    assert_eq!(p.prefault_cpus, CpuList::from_ids([1]));
    assert!(
        p.reason.contains("disk0, disk1 on host node 1"),
        "{}",
        p.reason
    );
}

#[test]
fn devices_on_two_nodes_are_not_placed_and_say_so() {
    let devices = devices(&[Some(0), Some(1)]);

    let p = decide(&request(&devices), &host(), &allowed()).unwrap();

    assert_eq!(p.memory_policy, MemoryPolicy::Default);
    assert_eq!(p.memory_node, None);
    assert_eq!(p.vcpu_cpus, None);
    assert!(
        p.reason
            .contains("span host nodes (node 0: disk0; node 1: disk1)"),
        "{}",
        p.reason
    );
    assert_eq!(p.prefault_cpus, allowed());
}

#[test]
fn unknown_device_node_is_no_locality() {
    let devices = devices(&[Some(1), None]);

    let p = decide(&request(&devices), &host(), &allowed()).unwrap();

    assert_eq!(p.memory_node, None);
    assert!(
        p.reason.contains("NUMA node of disk1 (numa_node -1)"),
        "{}",
        p.reason
    );
}

#[test]
fn no_devices_is_not_placed() {
    let p = decide(&request(&[]), &host(), &allowed()).unwrap();

    assert_eq!(p.memory_node, None);
    assert_eq!(p.vcpu_cpus, None);
    assert!(p.reason.contains("no passthrough device"));
}

#[test]
fn single_node_host_is_not_placed() {
    let devices = devices(&[Some(0)]);
    let mut one = host();
    one.nodes.truncate(1);

    let p = decide(&request(&devices), &one, &allowed()).unwrap();

    assert_eq!(p.memory_node, None);
    assert!(p.reason.contains("single NUMA node"));
}

#[test]
fn node_without_the_memory_is_preferred_not_bound() {
    let devices = devices(&[Some(1)]);
    let big = PlacementRequest {
        memory_bytes: 2 * GIB,
        ..request(&devices)
    };

    let p = decide(&big, &host(), &allowed()).unwrap();

    assert_eq!(p.memory_policy, MemoryPolicy::Preferred);
    assert_eq!(p.memory_node, Some(1));
    assert_eq!(p.vcpu_cpus, Some(CpuList::from_ids([1])));
    assert!(
        p.reason
            .contains("has 1024 MiB free (MemFree + FilePages) and guest RAM needs 2048 MiB"),
        "{}",
        p.reason
    );
}

#[test]
fn hugepages_are_checked_against_the_node_pool() {
    let devices = devices(&[Some(1)]);
    let fits = PlacementRequest {
        hugepages: Some(HugepageSize::Size2M),
        memory_bytes: 200 << 20,
        ..request(&devices)
    };
    let short = PlacementRequest {
        memory_bytes: 202 << 20,
        ..fits.clone()
    };

    assert_eq!(
        decide(&fits, &host(), &allowed()).unwrap().memory_policy,
        MemoryPolicy::Bind
    );
    assert_eq!(
        decide(&short, &host(), &allowed()).unwrap().memory_policy,
        MemoryPolicy::Preferred
    );
}

#[test]
fn placement_off_places_nothing_automatically() {
    let devices = devices(&[Some(1)]);
    let off = PlacementRequest {
        mode: PlacementMode::Off,
        ..request(&devices)
    };

    let p = decide(&off, &host(), &allowed()).unwrap();

    assert_eq!(p.memory_node, None);
    assert_eq!(p.vcpu_cpus, None);
    assert!(p.reason.contains("--placement off"));
}

#[test]
fn explicit_node_binds_strictly_and_puts_vcpus_there() {
    let devices = devices(&[Some(1)]);
    let explicit = PlacementRequest {
        host_node: Some(0),
        mode: PlacementMode::Off,
        ..request(&devices)
    };

    let p = decide(&explicit, &host(), &allowed()).unwrap();

    assert_eq!(p.memory_policy, MemoryPolicy::Bind);
    assert_eq!(p.memory_node, Some(0));
    assert_eq!(p.vcpu_cpus, Some(CpuList::from_ids([0])));
}

#[test]
fn explicit_node_too_small_is_refused_with_the_numbers() {
    let explicit = PlacementRequest {
        host_node: Some(1),
        memory_bytes: 2 * GIB,
        ..request(&[])
    };

    let err = decide(&explicit, &host(), &allowed()).unwrap_err();

    assert!(matches!(
        err,
        PlacementError::NodeTooSmall {
            node: 1,
            needed_mib: 2048,
            free_mib: 1024
        }
    ));
}

#[test]
fn explicit_node_short_of_hugepages_is_refused() {
    let explicit = PlacementRequest {
        host_node: Some(0),
        hugepages: Some(HugepageSize::Size2M),
        ..request(&[])
    };

    let err = decide(&explicit, &host(), &allowed()).unwrap_err();

    assert!(matches!(
        err,
        PlacementError::NodeHugepagesShort {
            node: 0,
            needed: 256,
            free: 0,
            ..
        }
    ));
}

#[test]
fn absent_node_is_refused_naming_the_nodes() {
    let explicit = PlacementRequest {
        host_node: Some(7),
        ..request(&[])
    };

    let err = decide(&explicit, &host(), &allowed()).unwrap_err();

    assert!(err
        .to_string()
        .starts_with("host node 7 does not exist (the host's nodes: 0-1)"));
}

#[test]
fn explicit_affinity_overrides_the_node_cpus() {
    let devices = devices(&[Some(1)]);
    let affinity = CpuList::from_ids([0]);
    let explicit = PlacementRequest {
        affinity: Some(&affinity),
        ..request(&devices)
    };

    let p = decide(&explicit, &host(), &allowed()).unwrap();

    assert_eq!(p.memory_node, Some(1));
    assert_eq!(p.vcpu_cpus, Some(affinity.clone()));
}

#[test]
fn affinity_outside_the_allowed_cpus_is_refused() {
    let affinity = CpuList::from_ids([1, 5]);
    let explicit = PlacementRequest {
        affinity: Some(&affinity),
        ..request(&[])
    };

    let err = decide(&explicit, &host(), &allowed()).unwrap_err();

    assert_eq!(
        err.to_string(),
        "--cpus affinity= names host CPUs 5 that rvmm may not run on; it may use 0-1"
    );
}
