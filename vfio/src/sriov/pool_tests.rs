use std::os::unix::fs::symlink;

use super::*;
use crate::sriov::fake::{FakeHost, PF, VFS};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn pf_by_address_lists_its_vfs_in_index_order() {
    let host = FakeHost::igb(None);

    let pf = host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap();

    assert_eq!(pf.netdev, "eth0");
    assert_eq!(pf.ifindex, 3);
    assert_eq!(pf.total_vfs, 7);
    let vfs: Vec<(u16, String)> = pf
        .vfs
        .iter()
        .map(|vf| (vf.index, vf.bdf.to_string()))
        .collect();
    assert_eq!(
        vfs,
        vec![
            (0, VFS[0].to_string()),
            (1, VFS[1].to_string()),
            (2, VFS[2].to_string())
        ]
    );
}

#[test]
fn pf_by_interface_name_is_the_same_pf() {
    let host = FakeHost::igb(None);

    let by_name = host
        .sysfs()
        .find_pf(&PfSpec::Netdev("eth0".into()))
        .unwrap();

    assert_eq!(
        by_name,
        host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap()
    );
}

#[test]
fn pf_that_is_down_is_reported_down() {
    let host = FakeHost::new();
    host.device(PF, Some("igb"))
        .netdev(PF, "eth0", 3, false)
        .sriov(PF, 7, &[(VFS[0], None)]);

    let pf = host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap();

    assert!(!pf.up);
}

#[test]
fn missing_pci_device_is_not_found() {
    let host = FakeHost::new();

    let err = host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap_err();

    assert!(matches!(err, PoolError::NoSuchDevice { .. }), "{err}");
}

#[test]
fn missing_interface_is_not_found() {
    let host = FakeHost::new();

    let err = host
        .sysfs()
        .find_pf(&PfSpec::Netdev("eth9".into()))
        .unwrap_err();

    assert!(
        err.to_string().contains("no network interface eth9"),
        "{err}"
    );
}

#[test]
fn interface_name_with_a_slash_is_refused_before_any_lookup() {
    let host = FakeHost::new();

    let err = host
        .sysfs()
        .find_pf(&PfSpec::Netdev("../../x".into()))
        .unwrap_err();

    assert!(matches!(err, PoolError::InvalidName { .. }), "{err}");
}

#[test]
fn virtual_interface_is_not_pci() {
    let host = FakeHost::new();
    std::fs::create_dir_all(host.root.join("sys/class/net/br0")).unwrap();

    let err = host
        .sysfs()
        .find_pf(&PfSpec::Netdev("br0".into()))
        .unwrap_err();

    assert!(matches!(err, PoolError::NotPci { .. }), "{err}");
}

#[test]
fn device_without_sriov_capability_is_refused() {
    let host = FakeHost::new();
    host.device(PF, Some("e1000e")).netdev(PF, "eth0", 3, true);

    let err = host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap_err();

    assert!(matches!(err, PoolError::NotSriovCapable { .. }), "{err}");
}

#[test]
fn pf_without_vfs_says_how_to_create_them() {
    let host = FakeHost::new();
    host.device(PF, Some("igb"))
        .netdev(PF, "eth0", 3, true)
        .sriov(PF, 7, &[]);

    let err = host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap_err();

    assert!(
        err.to_string()
            .contains("echo N > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs (N from 1 to 7)"),
        "{err}"
    );
}

#[test]
fn vf_given_as_pf_names_its_pf() {
    let host = FakeHost::igb(None);

    let err = host.sysfs().find_pf(&PfSpec::Pci(bdf(VFS[1]))).unwrap_err();

    assert!(
        matches!(&err, PoolError::IsVf { pf, .. } if pf == PF),
        "{err}"
    );
}

#[test]
fn pf_without_interface_says_to_bind_its_driver() {
    let host = FakeHost::new();
    host.device(PF, None).sriov(PF, 7, &[(VFS[0], None)]);

    let err = host.sysfs().find_pf(&PfSpec::Pci(bdf(PF))).unwrap_err();

    assert!(
        matches!(&err, PoolError::NoNetdev { driver, .. } if driver == "none"),
        "{err}"
    );
}

#[test]
fn vf_without_driver_is_not_in_use() {
    let host = FakeHost::igb(None);
    let vf = VirtualFunction {
        index: 0,
        bdf: bdf(VFS[0]),
    };

    assert_eq!(host.sysfs().host_use(&vf), None);
}

#[test]
fn vf_with_a_host_interface_is_in_use() {
    let host = FakeHost::igb(Some("igbvf"));
    host.netdev(VFS[1], "eth1", 4, false);
    let vf = VirtualFunction {
        index: 1,
        bdf: bdf(VFS[1]),
    };

    assert_eq!(
        host.sysfs().host_use(&vf),
        Some(HostUse::Driver {
            driver: "igbvf".into(),
            netdev: "eth1".into()
        })
    );
}

#[test]
fn vf_on_vfio_pci_with_its_group_open_is_in_use() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let dir = host.root.join("sys/bus/pci/devices").join(VFS[0]);
    symlink("../../../kernel/iommu_groups/12", dir.join("iommu_group")).unwrap();
    let proc_dir = host.root.join("proc/777");
    std::fs::create_dir_all(proc_dir.join("fd")).unwrap();
    std::fs::write(proc_dir.join("comm"), "qemu\n").unwrap();
    symlink("/dev/vfio/12", proc_dir.join("fd/9")).unwrap();
    let vf = VirtualFunction {
        index: 0,
        bdf: bdf(VFS[0]),
    };

    let using = host.sysfs().host_use(&vf).expect("in use");

    assert_eq!(using.to_string(), "VFIO group 12 open in pid 777 (qemu)");
}

#[test]
fn vf_on_vfio_pci_with_its_group_closed_is_free() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let dir = host.root.join("sys/bus/pci/devices").join(VFS[0]);
    symlink("../../../kernel/iommu_groups/12", dir.join("iommu_group")).unwrap();
    let vf = VirtualFunction {
        index: 0,
        bdf: bdf(VFS[0]),
    };

    assert_eq!(host.sysfs().host_use(&vf), None);
}

#[test]
fn pf_spec_is_an_address_a_sysfs_directory_or_an_interface() {
    assert_eq!("0000:3b:00.0".parse(), Ok(PfSpec::Pci(bdf("0000:3b:00.0"))));
    assert_eq!(
        "/sys/bus/pci/devices/0000:3b:00.0".parse(),
        Ok(PfSpec::Pci(bdf("0000:3b:00.0")))
    );
    assert_eq!("enp59s0f0".parse(), Ok(PfSpec::Netdev("enp59s0f0".into())));
}

#[test]
fn pf_spec_rejects_bad_interface_names() {
    for s in ["", ".", "..", "a b", "sixteen-chars-xx", "3b:00"] {
        assert!(s.parse::<PfSpec>().is_err(), "{s:?} was accepted");
    }
}
