//! A fake SR-IOV host for tests: a sysfs tree in a temporary directory with PFs, VFs, drivers
//! and interfaces laid out as Linux does, and a recording [`VfControl`].

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use super::claim::ClaimDir;
use super::netlink::{NetlinkError, VfControl};
use super::policy::{VfSetting, VfSettings};
use super::pool::PoolSysfs;

/// A fake host tree, removed on drop.
pub(super) struct FakeHost {
    pub(super) root: PathBuf,
}

impl FakeHost {
    pub(super) fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "rvmm-sriov-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        for driver in ["vfio-pci", "igb", "igbvf"] {
            fs::create_dir_all(root.join("sys/bus/pci/drivers").join(driver)).unwrap();
        }
        fs::create_dir_all(root.join("sys/class/net")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        Self { root }
    }

    fn device_dir(&self, bdf: &str) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(bdf)
    }

    /// Adds PCI device `bdf` bound to `driver`.
    pub(super) fn device(&self, bdf: &str, driver: Option<&str>) -> &Self {
        let dir = self.device_dir(bdf);
        fs::create_dir_all(&dir).unwrap();
        symlink(self.root.join("sys/bus/pci"), dir.join("subsystem")).unwrap();
        fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        if let Some(driver) = driver {
            symlink(
                self.root.join("sys/bus/pci/drivers").join(driver),
                dir.join("driver"),
            )
            .unwrap();
        }
        self
    }

    /// Gives PCI device `bdf` network interface `name` with index `ifindex`, up or down.
    pub(super) fn netdev(&self, bdf: &str, name: &str, ifindex: u32, up: bool) -> &Self {
        let dir = self.device_dir(bdf);
        fs::create_dir_all(dir.join("net").join(name)).unwrap();
        let class = self.root.join("sys/class/net").join(name);
        fs::create_dir_all(&class).unwrap();
        symlink(&dir, class.join("device")).unwrap();
        fs::write(class.join("ifindex"), format!("{ifindex}\n")).unwrap();
        fs::write(
            class.join("flags"),
            if up { "0x1003\n" } else { "0x1002\n" },
        )
        .unwrap();
        self
    }

    /// Makes `bdf` an SR-IOV PF supporting `total` VFs, with `vfs` (address, driver) enabled.
    pub(super) fn sriov(&self, bdf: &str, total: u16, vfs: &[(&str, Option<&str>)]) -> &Self {
        let dir = self.device_dir(bdf);
        fs::write(dir.join("sriov_totalvfs"), format!("{total}\n")).unwrap();
        fs::write(dir.join("sriov_numvfs"), format!("{}\n", vfs.len())).unwrap();
        for (index, (vf, driver)) in vfs.iter().enumerate() {
            self.device(vf, *driver);
            symlink(format!("../{vf}"), dir.join(format!("virtfn{index}"))).unwrap();
            symlink(format!("../{bdf}"), self.device_dir(vf).join("physfn")).unwrap();
        }
        self
    }

    /// The usual test PF: 0000:01:00.0 (igb, eth0, index 3, up) with VFs 0000:01:10.0,
    /// 0000:01:10.2 and 0000:01:10.4 on `vf_driver`, of 7 possible.
    pub(super) fn igb(vf_driver: Option<&str>) -> Self {
        let host = Self::new();
        host.device(PF, Some("igb"))
            .netdev(PF, "eth0", 3, true)
            .sriov(
                PF,
                7,
                &[
                    (VFS[0], vf_driver),
                    (VFS[1], vf_driver),
                    (VFS[2], vf_driver),
                ],
            );
        host
    }

    pub(super) fn sysfs(&self) -> PoolSysfs {
        PoolSysfs::with_root(&self.root)
    }

    pub(super) fn claims(&self) -> ClaimDir {
        ClaimDir::with_paths(self.root.join("run/rvmm/vf"), self.root.join("proc"))
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The PF of [`FakeHost::igb`].
pub(super) const PF: &str = "0000:01:00.0";
/// Its VFs.
pub(super) const VFS: [&str; 3] = ["0000:01:10.0", "0000:01:10.2", "0000:01:10.4"];

/// The settings of a VF nobody configured: no MAC address, no VLAN, spoof checking on, not
/// trusted (the PF drivers' defaults).
pub(super) const PRISTINE: VfSettings = VfSettings {
    mac: super::policy::MacAddress([0; 6]),
    vlan: 0,
    qos: 0,
    spoofchk: true,
    trust: false,
};

/// A [`VfControl`] that keeps settings in memory (a VF starts [`PRISTINE`]), records what is
/// applied and refuses what it is told to.
#[derive(Default)]
pub(super) struct FakeControl {
    pub(super) settings: Mutex<HashMap<(u32, u16), VfSettings>>,
    pub(super) applied: Mutex<Vec<(u16, VfSetting)>>,
    /// A setting refused with this errno.
    pub(super) refuse: Mutex<Option<(VfSetting, i32)>>,
}

impl VfControl for FakeControl {
    fn settings(&self, ifindex: u32, vf: u16) -> Result<VfSettings, NetlinkError> {
        Ok(self
            .settings
            .lock()
            .unwrap()
            .get(&(ifindex, vf))
            .copied()
            .unwrap_or(PRISTINE))
    }

    fn apply(&self, ifindex: u32, vf: u16, setting: VfSetting) -> Result<(), NetlinkError> {
        if let Some((refused, errno)) = *self.refuse.lock().unwrap() {
            if refused == setting {
                return Err(NetlinkError::Refused(io::Error::from_raw_os_error(errno)));
            }
        }
        self.applied.lock().unwrap().push((vf, setting));
        let mut all = self.settings.lock().unwrap();
        let entry = all.entry((ifindex, vf)).or_insert(PRISTINE);
        *entry = entry.with(setting);
        Ok(())
    }
}
