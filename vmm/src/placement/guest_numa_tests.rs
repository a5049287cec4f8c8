use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn arg(s: &str) -> GuestNodeArg {
    s.parse().unwrap()
}

fn memory(size: &str) -> MemoryConfig {
    format!("size={size}").parse().unwrap()
}

#[test]
fn full_argument_is_parsed_with_commas_in_the_cpu_list() {
    assert_eq!(
        arg("guest_node=1,cpus=0-1,4,size=1G,host_node=3"),
        GuestNodeArg {
            guest_node: 1,
            cpus: CpuList::from_ids([0, 1, 4]),
            size: GIB,
            host_node: Some(3),
        }
    );
    assert_eq!(arg("size=512M,cpus=2,guest_node=0").host_node, None);
}

#[test]
fn bad_arguments_say_what_is_wrong() {
    for (s, why) in [
        ("cpus=0,size=1G", "guest_node= is missing"),
        ("guest_node=0,size=1G", "cpus= is missing"),
        ("guest_node=0,cpus=0", "size= is missing"),
        ("guest_node=0,cpus=0,size=0", "must not be 0"),
        ("guest_node=x,cpus=0,size=1G", "guest_node=x"),
        ("guest_node=0,cpus=0,size=1G,host_node=-1", "host_node=-1"),
        ("guest_node=0,cpus=0,size=1G,mem=2", "unknown key \"mem\""),
        ("guest_node=0,size=1G,4", "\"4\" is not key=value"),
        ("guest_node=0,cpus=3-1,size=1G", "backwards"),
    ] {
        let err = s.parse::<GuestNodeArg>().unwrap_err().to_string();
        assert!(err.contains(why), "{s}: {err}");
        assert!(err.contains("guest_node=G,cpus=LIST,size=SIZE"), "{err}");
    }
}

#[test]
fn display_round_trips() {
    let a = arg("guest_node=1,cpus=0-1,4,size=1G,host_node=3");
    assert_eq!(a.to_string().parse::<GuestNodeArg>().unwrap(), a);
}

#[test]
fn no_numa_is_none() {
    assert_eq!(GuestNuma::new(&[], 2, &memory("1G")), Ok(None));
}

#[test]
fn two_nodes_are_checked_and_sorted() {
    let numa = GuestNuma::new(
        &[
            arg("guest_node=1,cpus=1,size=512M,host_node=1"),
            arg("guest_node=0,cpus=0,size=512M"),
        ],
        2,
        &memory("1G"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(numa.nodes[0].guest_node, 0);
    assert_eq!(numa.nodes[1].host_node, Some(1));
    assert_eq!(numa.node_of_cpu(1), Some(1));
    assert_eq!(numa.node_of_cpu(2), None);
}

#[test]
fn inconsistent_topologies_are_refused() {
    let m = memory("1G");
    let check = |args: &[&str], cpus| {
        GuestNuma::new(&args.iter().map(|s| arg(s)).collect::<Vec<_>>(), cpus, &m).unwrap_err()
    };
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0,size=512M",
                "guest_node=0,cpus=1,size=512M"
            ],
            2
        ),
        NumaError::DuplicateNode(0)
    );
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0,size=512M",
                "guest_node=2,cpus=1,size=512M"
            ],
            2
        ),
        NumaError::NodeGap {
            last: 1,
            missing: 1
        }
    );
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0-1,size=512M",
                "guest_node=1,cpus=1,size=512M"
            ],
            2
        ),
        NumaError::CpuTwice {
            cpu: 1,
            first: 0,
            second: 1
        }
    );
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0,size=512M",
                "guest_node=1,cpus=1-2,size=512M"
            ],
            2
        ),
        NumaError::NoSuchCpu {
            node: 1,
            missing: CpuList::from_ids([2]),
            cpus: 2
        }
    );
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0,size=512M",
                "guest_node=1,cpus=1,size=512M"
            ],
            3
        ),
        NumaError::CpuInNoNode(CpuList::from_ids([2]))
    );
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0,size=512M",
                "guest_node=1,cpus=1,size=256M"
            ],
            2
        ),
        NumaError::SizeSum {
            sum: 768,
            memory: 1024
        }
    );
    assert_eq!(
        check(
            &[
                "guest_node=0,cpus=0,size=511M",
                "guest_node=1,cpus=1,size=513M"
            ],
            2
        ),
        NumaError::Misaligned {
            node: 0,
            size: 511 * MIB,
            granule: NODE_GRANULE
        }
    );
}

#[test]
fn errors_say_how_to_fix() {
    let e = NumaError::SizeSum {
        sum: 768,
        memory: 1024,
    };
    assert_eq!(
        e.to_string(),
        "the --numa sizes add up to 768 MiB but --memory size is 1024 MiB; make them equal"
    );
}

#[test]
fn nodes_fill_guest_ram_in_order_below_4g() {
    let numa = GuestNuma::new(
        &[
            arg("guest_node=0,cpus=0,size=256M"),
            arg("guest_node=1,cpus=1,size=256M"),
        ],
        2,
        &memory("512M"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        numa.ranges(),
        vec![
            NodeRange {
                guest_node: 0,
                start: 0,
                len: 256 * MIB
            },
            NodeRange {
                guest_node: 1,
                start: 256 * MIB,
                len: 256 * MIB
            },
        ]
    );
}

#[test]
fn a_node_across_the_mmio_hole_gets_two_ranges() {
    // 3 GiB below the hole, then RAM from 4 GiB.
    let numa = GuestNuma::new(
        &[
            arg("guest_node=0,cpus=0,size=2G"),
            arg("guest_node=1,cpus=1,size=2G"),
            arg("guest_node=2,cpus=2,size=1G"),
        ],
        3,
        &memory("5G"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        numa.ranges(),
        vec![
            NodeRange {
                guest_node: 0,
                start: 0,
                len: 2 * GIB
            },
            NodeRange {
                guest_node: 1,
                start: 2 * GIB,
                len: GIB
            },
            NodeRange {
                guest_node: 1,
                start: 4 * GIB,
                len: GIB
            },
            NodeRange {
                guest_node: 2,
                start: 5 * GIB,
                len: GIB
            },
        ]
    );
}
