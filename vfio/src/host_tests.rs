use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// A fake host tree in a temporary directory, removed on drop.
struct FakeHost {
    root: PathBuf,
}

impl FakeHost {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "rvmm-vfio-host-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(root.join("dev/vfio")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        Self { root }
    }

    /// Adds device `bdf` bound to `driver`, in `group`.
    fn device(&self, bdf: &str, driver: Option<&str>, group: Option<u32>) -> &Self {
        let dir = self.root.join("sys/bus/pci/devices").join(bdf);
        fs::create_dir_all(&dir).unwrap();
        if let Some(driver) = driver {
            symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                dir.join("driver"),
            )
            .unwrap();
        }
        if let Some(group) = group {
            let gdir = self
                .root
                .join(format!("sys/kernel/iommu_groups/{group}/devices"));
            fs::create_dir_all(&gdir).unwrap();
            symlink(&dir, gdir.join(bdf)).unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{group}"),
                dir.join("iommu_group"),
            )
            .unwrap();
            fs::write(self.root.join(format!("dev/vfio/{group}")), b"").unwrap();
        }
        self
    }

    /// Adds process `pid` named `comm` holding `target` open.
    fn process(&self, pid: u32, comm: &str, target: &str) {
        let dir = self.root.join(format!("proc/{pid}"));
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        symlink("/dev/null", dir.join("fd/0")).unwrap();
        symlink(target, dir.join("fd/7")).unwrap();
    }

    fn sysfs(&self) -> Sysfs {
        Sysfs::with_root(&self.root)
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn ready_device_is_prepared() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), Some(7));
    let dev = host.sysfs().prepare(bdf("01:00.0")).unwrap();
    assert_eq!(dev.group, 7);
    assert!(dev.sysfs_path.ends_with("sys/bus/pci/devices/0000:01:00.0"));
}

#[test]
fn missing_device_names_lspci() {
    let host = FakeHost::new();
    let err = host.sysfs().prepare(bdf("0000:02:00.0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "host PCI device 0000:02:00.0 not found (no /sys/bus/pci/devices/0000:02:00.0); list devices with `lspci -D`"
    );
}

#[test]
fn device_on_a_host_driver_gets_the_rebind_commands() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("nvme"), Some(7));
    let err = host.sysfs().prepare(bdf("0000:01:00.0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "host device 0000:01:00.0 is bound to nvme, not vfio-pci; as root, run:\n\
         \x20 echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override\n\
         \x20 echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind\n\
         \x20 echo 0000:01:00.0 > /sys/bus/pci/drivers_probe"
    );
}

#[test]
fn unbound_device_skips_unbind_and_loads_the_module_when_missing() {
    let commands = rebind_commands(&bdf("01:00.0"), None, false);
    assert!(commands.starts_with("  modprobe vfio-pci\n"));
    assert!(!commands.contains("unbind"));
}

#[test]
fn device_without_a_group_says_the_iommu_is_off() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), None);
    let err = host.sysfs().prepare(bdf("01:00.0")).unwrap_err();
    assert!(matches!(err, HostError::NoIommuGroup { .. }));
    assert!(err.to_string().contains("intel_iommu=on"));
}

#[test]
fn group_with_a_host_driver_lists_the_other_devices() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), Some(3))
        .device("0000:01:00.1", Some("ixgbe"), Some(3))
        .device("0000:01:00.2", None, Some(3))
        .device("0000:00:01.0", Some("pcieport"), Some(3));
    let err = host.sysfs().prepare(bdf("01:00.0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "IOMMU group 3 of host device 0000:01:00.0 is not viable: its other devices must be bound \
         to vfio-pci or have no driver, but it has 0000:01:00.1 (driver ixgbe); bind them to \
         vfio-pci too or use a slot with its own group"
    );
}

#[test]
fn missing_group_node_is_reported() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), Some(9));
    fs::remove_file(host.root.join("dev/vfio/9")).unwrap();
    assert!(matches!(
        host.sysfs().prepare(bdf("01:00.0")),
        Err(HostError::NoGroupNode { group: 9, .. })
    ));
}

#[test]
fn group_holders_are_found_in_proc() {
    let host = FakeHost::new();
    host.process(4242, "qemu-system-x86", "/dev/vfio/7");
    host.process(4243, "bash", "/dev/vfio/70");
    assert_eq!(
        host.sysfs().group_holders(7),
        [GroupHolder {
            pid: 4242,
            comm: "qemu-system-x86".to_string()
        }]
    );
}

#[test]
fn busy_group_error_names_the_holder() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), Some(7));
    host.process(4242, "qemu-system-x86", "/dev/vfio/7");
    let sysfs = host.sysfs();
    let dev = sysfs.prepare(bdf("01:00.0")).unwrap();
    let err = ContainerError::OpenDevice {
        path: dev.sysfs_path.display().to_string(),
        source: VfioError::OpenGroup {
            group: 7,
            path: "/dev/vfio/7".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        },
    };
    let explained = sysfs.explain_open_error(&dev, &err).unwrap();
    assert_eq!(
        explained.to_string(),
        "IOMMU group 7 of host device 0000:01:00.0 is already open in pid 4242 (qemu-system-x86); \
         stop that process or release the device from it"
    );
}

#[test]
fn busy_group_without_visible_holder_suggests_root() {
    let err = HostError::GroupBusy {
        bdf: bdf("01:00.0"),
        group: 7,
        holders: Vec::new(),
    };
    assert!(err
        .to_string()
        .contains("another process (run as root to see which)"));
}

#[test]
fn permission_denied_on_the_group_names_the_fix() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), Some(7));
    let sysfs = host.sysfs();
    let dev = sysfs.prepare(bdf("01:00.0")).unwrap();
    let err = ContainerError::OpenDevice {
        path: String::new(),
        source: VfioError::OpenGroup {
            group: 7,
            path: "/dev/vfio/7".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        },
    };
    let explained = sysfs.explain_open_error(&dev, &err).unwrap();
    assert!(matches!(
        explained,
        HostError::GroupPermission { group: 7, .. }
    ));
}

#[test]
fn other_open_errors_are_not_explained() {
    let host = FakeHost::new();
    host.device("0000:01:00.0", Some("vfio-pci"), Some(7));
    let sysfs = host.sysfs();
    let dev = sysfs.prepare(bdf("01:00.0")).unwrap();
    let err = ContainerError::OpenDevice {
        path: String::new(),
        source: VfioError::OpenGroup {
            group: 7,
            path: "/dev/vfio/7".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        },
    };
    assert!(sysfs.explain_open_error(&dev, &err).is_none());
}

#[test]
fn memlock_below_guest_ram_is_refused_with_the_numbers() {
    let err = check_memlock(2 << 30, Some(8 << 20), 0, false).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("RLIMIT_MEMLOCK is 8388608 bytes but passthrough pins all 2147483648 bytes"));
}

#[test]
fn dma_pinning_counts_on_top_of_locked_guest_ram() {
    // 1 GiB of 4 KiB-page guest RAM is mlocked: a 1.5 GiB limit does not cover its DMA map.
    let err = check_memlock(1 << 30, Some(3 << 29), 1 << 30, false).unwrap_err();

    let text = err.to_string();
    assert!(
        text.contains("on top of the 1073741824 bytes")
            && text.contains("at least 2147483648 bytes"),
        "{text}"
    );
    assert!(check_memlock(1 << 30, Some(2 << 30), 1 << 30, false).is_ok());
}

#[test]
fn unlimited_memlock_or_cap_ipc_lock_is_enough() {
    assert!(check_memlock(2 << 30, None, 0, false).is_ok());
    assert!(check_memlock(2 << 30, Some(0), 0, true).is_ok());
}

#[test]
fn cap_ipc_lock_is_read_from_the_effective_set() {
    assert!(has_cap_ipc_lock("Name:\tx\nCapEff:\t0000000000004000\n"));
    assert!(!has_cap_ipc_lock(
        "CapPrm:\t0000000000004000\nCapEff:\t0000000000000000\n"
    ));
    assert!(!has_cap_ipc_lock("CapEff:\tnot-hex\n"));
}
