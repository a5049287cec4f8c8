//! [`Sriov::take`] and [`VfLease::release`] on a fake host whose VFs are on vfio-pci already
//! (the fake kernel binds nothing) with an in-memory PF driver.

use std::fs;
use std::sync::Arc;

use crate::sriov::fake::{FakeControl, FakeHost, PF, PRISTINE, VFS};
use crate::sriov::*;
use rvmm_devices::error_chain;

/// Interface index of the fake PF.
const IFINDEX: u32 = 3;

fn request(policy: VfPolicy) -> VfRequest {
    VfRequest {
        pf: PfSpec::Pci(PF.parse().unwrap()),
        policy,
    }
}

fn owner(vm: &str) -> VfOwner {
    VfOwner {
        vm: vm.into(),
        device: "net0".into(),
    }
}

fn sriov(host: &FakeHost, control: &Arc<FakeControl>) -> Sriov {
    Sriov::with_parts(host.sysfs(), host.claims(), control.clone())
}

fn mac(last: u8) -> MacAddress {
    MacAddress([0x52, 0x54, 0, 0, 0, last])
}

#[test]
fn two_takes_get_different_vfs() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let pool = sriov(&host, &control);

    let a = pool
        .take(&request(VfPolicy::default()), &owner("a"))
        .unwrap();
    let b = pool
        .take(&request(VfPolicy::default()), &owner("b"))
        .unwrap();

    assert_eq!(a.vf().bdf.to_string(), VFS[0]);
    assert_eq!(b.vf().bdf.to_string(), VFS[1]);
}

#[test]
fn vf_used_by_the_host_is_skipped() {
    let host = FakeHost::igb(Some("vfio-pci"));
    fs::remove_file(
        host.root
            .join("sys/bus/pci/devices")
            .join(VFS[0])
            .join("driver"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        host.root.join("sys/bus/pci/drivers/igbvf"),
        host.root
            .join("sys/bus/pci/devices")
            .join(VFS[0])
            .join("driver"),
    )
    .unwrap();
    host.netdev(VFS[0], "eth1", 4, true);
    let control = Arc::new(FakeControl::default());

    let lease = sriov(&host, &control)
        .take(&request(VfPolicy::default()), &owner("a"))
        .unwrap();

    assert_eq!(lease.vf().index, 1);
}

#[test]
fn policy_is_applied_with_the_derived_mac_when_none_is_given() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let policy = VfPolicy {
        vlan: Some(100),
        spoofchk: Some(true),
        trust: Some(true),
        ..VfPolicy::default()
    };

    let lease = sriov(&host, &control)
        .take(&request(policy), &owner("web1"))
        .unwrap();

    let expected = VfSettings {
        mac: derive_mac("web1", "net0"),
        vlan: 100,
        qos: 0,
        spoofchk: true,
        trust: true,
    };
    assert_eq!(lease.settings(), expected);
    assert_eq!(control.settings(IFINDEX, 0).unwrap(), expected);
}

#[test]
fn settings_already_in_place_are_not_touched_except_the_mac() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let policy = VfPolicy {
        mac: Some(mac(1)),
        vlan: Some(0),
        trust: Some(false),
        ..VfPolicy::default()
    };

    let _lease = sriov(&host, &control)
        .take(&request(policy), &owner("a"))
        .unwrap();

    assert_eq!(
        *control.applied.lock().unwrap(),
        vec![(0, VfSetting::Mac(mac(1)))]
    );
}

#[test]
fn release_restores_previous_settings_newest_first() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let before = VfSettings {
        mac: mac(9),
        vlan: 5,
        qos: 0,
        spoofchk: true,
        trust: false,
    };
    control
        .settings
        .lock()
        .unwrap()
        .insert((IFINDEX, 0), before);
    let policy = VfPolicy {
        mac: Some(mac(1)),
        vlan: Some(100),
        spoofchk: Some(false),
        ..VfPolicy::default()
    };
    let lease = sriov(&host, &control)
        .take(&request(policy), &owner("a"))
        .unwrap();
    control.applied.lock().unwrap().clear();

    lease.release().unwrap();

    assert_eq!(
        *control.applied.lock().unwrap(),
        vec![
            (0, VfSetting::SpoofCheck(true)),
            (0, VfSetting::Vlan { vlan: 5, qos: 0 }),
            (0, VfSetting::Mac(mac(9))),
        ]
    );
    assert_eq!(control.settings(IFINDEX, 0).unwrap(), before);
}

#[test]
fn released_vf_can_be_taken_again() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let pool = sriov(&host, &control);
    let first = pool
        .take(&request(VfPolicy::default()), &owner("a"))
        .unwrap();

    first.release().unwrap();
    let again = pool
        .take(&request(VfPolicy::default()), &owner("b"))
        .unwrap();

    assert_eq!(again.vf().index, 0);
}

#[test]
fn dropped_lease_restores_and_releases_too() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let pool = sriov(&host, &control);
    let lease = pool
        .take(
            &request(VfPolicy {
                mac: Some(mac(1)),
                ..VfPolicy::default()
            }),
            &owner("a"),
        )
        .unwrap();

    drop(lease);

    assert_eq!(control.settings(IFINDEX, 0).unwrap(), PRISTINE);
    assert_eq!(
        pool.take(&request(VfPolicy::default()), &owner("b"))
            .unwrap()
            .vf()
            .index,
        0
    );
}

#[test]
fn no_free_vf_names_every_holder() {
    let host = FakeHost::igb(Some("vfio-pci"));
    fs::create_dir_all(host.root.join(format!("proc/{}", std::process::id()))).unwrap();
    fs::write(
        host.root.join(format!("proc/{}/comm", std::process::id())),
        "rvmm\n",
    )
    .unwrap();
    let control = Arc::new(FakeControl::default());
    let pool = sriov(&host, &control);
    let _held: Vec<VfLease> = ["a", "b", "c"]
        .iter()
        .map(|vm| {
            pool.take(&request(VfPolicy::default()), &owner(vm))
                .unwrap()
        })
        .collect();

    let err = pool
        .take(&request(VfPolicy::default()), &owner("d"))
        .unwrap_err();

    let text = err.to_string();
    let pid = std::process::id();
    for (index, vm) in ["a", "b", "c"].iter().enumerate() {
        let expected = format!(
            "VF {index} ({}) claimed by pid {pid} (rvmm), VM {vm} as net0",
            VFS[index]
        );
        assert!(text.contains(&expected), "{text}");
    }
}

#[test]
fn refused_setting_names_it_with_the_errno_and_undoes_the_rest() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    *control.refuse.lock().unwrap() = Some((VfSetting::Trust(true), libc::EOPNOTSUPP));
    let policy = VfPolicy {
        mac: Some(mac(1)),
        vlan: Some(7),
        trust: Some(true),
        ..VfPolicy::default()
    };

    let err = sriov(&host, &control)
        .take(&request(policy), &owner("a"))
        .unwrap_err();

    let text = error_chain(&err);
    assert!(
        text.contains("refused trust on on VF 0")
            && text.contains(&std::io::Error::from_raw_os_error(libc::EOPNOTSUPP).to_string()),
        "{text}"
    );
    assert_eq!(control.settings(IFINDEX, 0).unwrap(), PRISTINE);
}

#[test]
fn refused_setting_releases_the_claim() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    *control.refuse.lock().unwrap() = Some((VfSetting::Vlan { vlan: 7, qos: 0 }, libc::EINVAL));
    let pool = sriov(&host, &control);
    let policy = VfPolicy {
        vlan: Some(7),
        ..VfPolicy::default()
    };
    let _ = pool.take(&request(policy), &owner("a")).unwrap_err();

    let lease = pool
        .take(&request(VfPolicy::default()), &owner("b"))
        .unwrap();

    assert_eq!(lease.vf().index, 0);
}

#[test]
fn unbindable_vf_is_an_error_that_releases_the_claim() {
    // No driver and a fake kernel that never binds: vfio-pci "refuses" the VF.
    let host = FakeHost::igb(None);
    let control = Arc::new(FakeControl::default());
    let pool = sriov(&host, &control);

    let err = pool
        .take(&request(VfPolicy::default()), &owner("a"))
        .unwrap_err();

    assert!(
        matches!(err, SriovError::Bind(BindError::NotBound { .. })),
        "{err}"
    );
    assert!(matches!(
        host.claims()
            .try_claim(
                &VFS[0].parse().unwrap(),
                &ClaimRecord::this_process("x", "y")
            )
            .unwrap(),
        claim::ClaimOutcome::Claimed(_)
    ));
    assert_eq!(control.settings(IFINDEX, 0).unwrap(), PRISTINE);
}

/// The claim file a holder leaves when it dies without releasing VF `vf` (SIGKILL, abort): its
/// holder lines and the baseline it recorded before changing anything.
fn left_by_dead_holder(host: &FakeHost, vf: &str, baseline: &claim::Baseline) {
    let file = claim::ClaimFile {
        holder: None,
        baseline: Some(baseline.clone()),
        quarantined: None,
    };
    let dead = ClaimRecord {
        pid: 999_999,
        vm: "tenant-a".into(),
        device: "net0".into(),
    };
    let path = host.claims().path_of(&vf.parse().unwrap());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, file.text_for(Some(&dead))).unwrap();
}

/// What tenant A left on VF 0: its MAC, VLAN 77, trust on, spoof checking off.
fn tenant_a_leftovers(control: &FakeControl) {
    control.settings.lock().unwrap().insert(
        (IFINDEX, 0),
        VfSettings {
            mac: mac(0xa),
            vlan: 77,
            qos: 0,
            spoofchk: false,
            trust: true,
        },
    );
}

fn pristine_baseline() -> claim::Baseline {
    claim::Baseline {
        settings: PRISTINE,
        driver: DriverState::default(),
    }
}

#[test]
fn vf_left_by_a_dead_holder_is_restored_then_given_only_what_is_asked() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    tenant_a_leftovers(&control);
    left_by_dead_holder(&host, VFS[0], &pristine_baseline());

    let lease = sriov(&host, &control)
        .take(&request(VfPolicy::default()), &owner("tenant-b"))
        .unwrap();

    assert_eq!(lease.vf().index, 0);
    assert_eq!(lease.previous(), PRISTINE);
    assert_eq!(
        control.settings(IFINDEX, 0).unwrap(),
        VfSettings {
            mac: derive_mac("tenant-b", "net0"),
            ..PRISTINE
        }
    );
}

#[test]
fn request_without_policy_gets_the_pf_defaults_not_leftovers() {
    // No claim file: whatever the VF has now is its baseline, but not what the tenant gets.
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    tenant_a_leftovers(&control);

    let lease = sriov(&host, &control)
        .take(&request(VfPolicy::default()), &owner("tenant-b"))
        .unwrap();

    let now = control.settings(IFINDEX, 0).unwrap();
    assert_eq!((now.vlan, now.spoofchk, now.trust), (0, true, false));
    assert_eq!(lease.settings(), now);
}

#[test]
fn release_leaves_the_baseline_and_no_holder_in_the_claim_file() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let lease = sriov(&host, &control)
        .take(
            &request(VfPolicy {
                vlan: Some(77),
                ..VfPolicy::default()
            }),
            &owner("a"),
        )
        .unwrap();
    let path = host.claims().path_of(&VFS[0].parse().unwrap());
    let held = claim::ClaimFile::parse(&fs::read_to_string(&path).unwrap());
    assert!(held.holder.is_some() && held.baseline.is_some(), "{held:?}");

    lease.release().unwrap();

    let left = claim::ClaimFile::parse(&fs::read_to_string(&path).unwrap());
    assert_eq!(left.holder, None);
    assert_eq!(left.baseline.map(|b| b.settings), Some(PRISTINE));
    assert_eq!(control.settings(IFINDEX, 0).unwrap(), PRISTINE);
}

#[test]
fn vf_that_cannot_be_restored_is_quarantined_and_never_handed_out() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    tenant_a_leftovers(&control);
    left_by_dead_holder(&host, VFS[0], &pristine_baseline());
    *control.refuse.lock().unwrap() = Some((VfSetting::Vlan { vlan: 0, qos: 0 }, libc::EIO));
    let pool = sriov(&host, &control);

    let lease = pool
        .take(&request(VfPolicy::default()), &owner("tenant-b"))
        .unwrap();
    *control.refuse.lock().unwrap() = None;
    let _others: Vec<VfLease> = ["c", "d"]
        .iter()
        .filter_map(|vm| pool.take(&request(VfPolicy::default()), &owner(vm)).ok())
        .collect();
    let err = pool
        .take(&request(VfPolicy::default()), &owner("e"))
        .unwrap_err();

    assert_eq!(lease.vf().index, 1);
    let path = host.claims().path_of(&VFS[0].parse().unwrap());
    let file = claim::ClaimFile::parse(&fs::read_to_string(&path).unwrap());
    assert!(file.quarantined.is_some(), "{file:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("VF 0 ({}) quarantined", VFS[0]))
            && text.contains(&format!("remove {}", path.display())),
        "{text}"
    );
}

#[test]
fn vf_left_on_vfio_pci_by_a_dead_holder_goes_back_to_its_recorded_driver() {
    let host = FakeHost::igb(Some("vfio-pci"));
    let control = Arc::new(FakeControl::default());
    let baseline = claim::Baseline {
        settings: PRISTINE,
        driver: DriverState {
            driver: Some("igbvf".into()),
            driver_override: None,
        },
    };
    left_by_dead_holder(&host, VFS[0], &baseline);
    let lease = sriov(&host, &control)
        .take(&request(VfPolicy::default()), &owner("b"))
        .unwrap();

    lease.release().unwrap();

    let bind = host.root.join("sys/bus/pci/drivers/igbvf/bind");
    assert_eq!(fs::read_to_string(bind).unwrap(), VFS[0]);
}
