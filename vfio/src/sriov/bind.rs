//! Handing a VF to vfio-pci and back: `driver_override` makes vfio-pci the only driver that may
//! take it, the old driver lets go (`driver/unbind`), `drivers_probe` binds it. What was there
//! before (driver and override) is remembered and put back on release.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use rvmm_pci::Bdf;

use super::pool::PoolSysfs;

const VFIO_DRIVER: &str = "vfio-pci";
/// What `driver_override` reads when no override is set.
const NO_OVERRIDE: &str = "(null)";

/// Errors of binding a VF.
#[derive(Debug, Error)]
pub enum BindError {
    /// vfio-pci is not loaded.
    #[error("cannot bind VF {bdf} to vfio-pci: the vfio-pci driver is not loaded; run `modprobe vfio-pci`")]
    VfioPciMissing {
        /// The VF.
        bdf: Bdf,
    },
    /// A sysfs write failed.
    #[error("cannot bind VF {bdf}: writing {path} failed")]
    Write {
        /// The VF.
        bdf: Bdf,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// vfio-pci did not take the VF.
    #[error("VF {bdf} did not bind to vfio-pci (its driver is now: {driver}); see the kernel log (`dmesg`) for vfio-pci's reason, e.g. no IOMMU group (boot with intel_iommu=on or amd_iommu=on)")]
    NotBound {
        /// The VF.
        bdf: Bdf,
        /// Its driver now, or "none".
        driver: String,
    },
    /// The VF could not be given back to its previous driver.
    #[error("cannot give VF {bdf} back to its driver {driver}: writing {path} failed")]
    Restore {
        /// The VF.
        bdf: Bdf,
        /// The previous driver.
        driver: String,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Result of binding.
pub type Result<T> = std::result::Result<T, BindError>;

/// Which driver a VF has and which `driver_override` it carries: what rvmm records before it
/// binds the VF to vfio-pci, and puts back on release.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverState {
    /// The driver (`None`: none).
    pub driver: Option<String>,
    /// The `driver_override` (`None`: none).
    pub driver_override: Option<String>,
}

impl DriverState {
    /// The VF's driver and override now.
    pub fn read(sysfs: &PoolSysfs, bdf: &Bdf) -> Self {
        let driver_override = fs::read_to_string(sysfs.device_dir(bdf).join("driver_override"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != NO_OVERRIDE);
        Self {
            driver: sysfs.driver(bdf),
            driver_override,
        }
    }

    fn on_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_DRIVER)
    }
}

/// A VF bound to vfio-pci by us, with what to put back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    bdf: Bdf,
    /// The driver and override to put back.
    previous: DriverState,
    /// Whether release puts anything back (the VF was not on vfio-pci by itself).
    changed: bool,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

impl Binding {
    /// The VF.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The driver the VF had before, if any.
    pub fn previous_driver(&self) -> Option<&str> {
        self.previous.driver.as_deref()
    }

    /// A VF an earlier rvmm bound to vfio-pci and left behind: restoring it puts back
    /// `previous`, the driver state recorded before that rvmm bound it.
    pub fn recorded(bdf: Bdf, previous: DriverState) -> Self {
        Binding {
            bdf,
            changed: !previous.on_vfio(),
            previous,
        }
    }

    /// Binds VF `bdf` to vfio-pci unless it already is; release puts back `previous`, the
    /// driver state the VF had before any rvmm bound it (its state now on a first use; the
    /// recorded one for a VF a dead rvmm left on vfio-pci).
    pub fn to_vfio(sysfs: &PoolSysfs, bdf: Bdf, previous: DriverState) -> Result<Self> {
        let now = DriverState::read(sysfs, &bdf);
        let mut binding = Binding {
            bdf,
            changed: !previous.on_vfio(),
            previous,
        };
        if now.on_vfio() {
            return Ok(binding);
        }
        binding.changed = true;
        if !sysfs
            .root()
            .join("sys/bus/pci/drivers")
            .join(VFIO_DRIVER)
            .exists()
        {
            return Err(BindError::VfioPciMissing { bdf });
        }
        let dir = sysfs.device_dir(&bdf);
        let write_err = |path: PathBuf| move |source| BindError::Write { bdf, path, source };
        let override_path = dir.join("driver_override");
        write(&override_path, VFIO_DRIVER).map_err(write_err(override_path.clone()))?;
        if now.driver.is_some() {
            let unbind = dir.join("driver/unbind");
            if let Err(e) = write(&unbind, &bdf.to_string()) {
                binding.put_back(sysfs);
                return Err(write_err(unbind)(e));
            }
        }
        let probe = sysfs.root().join("sys/bus/pci/drivers_probe");
        if let Err(e) = write(&probe, &bdf.to_string()) {
            // drivers_probe fails when no driver takes the device; the check below says so.
            log::debug!("VF {bdf}: drivers_probe: {e}");
        }
        match sysfs.driver(&bdf) {
            Some(d) if d == VFIO_DRIVER => Ok(binding),
            now => {
                binding.put_back(sysfs);
                Err(BindError::NotBound {
                    bdf,
                    driver: now.unwrap_or_else(|| "none".to_string()),
                })
            }
        }
    }

    /// Gives the VF back: the previous `driver_override`, unbound from vfio-pci and bound to its
    /// previous driver (left without a driver if it had none). Nothing when it was on vfio-pci
    /// before.
    pub fn restore(&self, sysfs: &PoolSysfs) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let dir = sysfs.device_dir(&self.bdf);
        let bdf = self.bdf;
        let override_path = dir.join("driver_override");
        // A lone newline clears the override.
        let value = self.previous.driver_override.as_deref().unwrap_or("\n");
        write(&override_path, value).map_err(|source| BindError::Write {
            bdf,
            path: override_path,
            source,
        })?;
        if sysfs.driver(&bdf).as_deref() == Some(VFIO_DRIVER) {
            let unbind = dir.join("driver/unbind");
            write(&unbind, &bdf.to_string()).map_err(|source| BindError::Write {
                bdf,
                path: unbind,
                source,
            })?;
        }
        let Some(driver) = &self.previous.driver else {
            return Ok(());
        };
        let bind = sysfs
            .root()
            .join("sys/bus/pci/drivers")
            .join(driver)
            .join("bind");
        write(&bind, &bdf.to_string()).map_err(|source| BindError::Restore {
            bdf,
            driver: driver.clone(),
            path: bind,
            source,
        })
    }

    /// Best-effort undo after a failed bind.
    fn put_back(&self, sysfs: &PoolSysfs) {
        if let Err(e) = self.restore(sysfs) {
            log::warn!("VF {}: cannot undo a failed bind: {e}", self.bdf);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fake sysfs with one VF; writes land in plain files, so no driver ever changes.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new(driver: Option<&str>, vfio_loaded: bool) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "rvmm-bind-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let drivers = root.join("sys/bus/pci/drivers");
            fs::create_dir_all(drivers.join("igbvf")).unwrap();
            if vfio_loaded {
                fs::create_dir_all(drivers.join("vfio-pci")).unwrap();
            }
            let dev = root.join("sys/bus/pci/devices").join(vf().to_string());
            fs::create_dir_all(&dev).unwrap();
            fs::write(dev.join("driver_override"), "(null)\n").unwrap();
            if let Some(driver) = driver {
                symlink(drivers.join(driver), dev.join("driver")).unwrap();
            }
            Self(root)
        }

        fn sysfs(&self) -> PoolSysfs {
            PoolSysfs::with_root(&self.0)
        }

        fn read(&self, path: &str) -> String {
            fs::read_to_string(self.0.join(path)).unwrap_or_default()
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn vf() -> Bdf {
        "0000:01:10.0".parse().unwrap()
    }

    #[test]
    fn vf_already_on_vfio_pci_is_left_alone() {
        let fake = FakeSysfs::new(Some("vfio-pci"), true);

        let binding =
            Binding::to_vfio(&fake.sysfs(), vf(), DriverState::read(&fake.sysfs(), &vf())).unwrap();

        assert_eq!(
            fake.read("sys/bus/pci/devices/0000:01:10.0/driver_override"),
            "(null)\n"
        );
        assert!(binding.restore(&fake.sysfs()).is_ok());
        assert_eq!(
            fake.read("sys/bus/pci/devices/0000:01:10.0/driver_override"),
            "(null)\n"
        );
    }

    #[test]
    fn missing_vfio_pci_driver_says_to_load_it() {
        let fake = FakeSysfs::new(Some("igbvf"), false);

        let err = Binding::to_vfio(&fake.sysfs(), vf(), DriverState::read(&fake.sysfs(), &vf()))
            .unwrap_err();

        assert!(err.to_string().contains("modprobe vfio-pci"), "{err}");
    }

    #[test]
    fn bind_unbinds_the_host_driver_and_probes_with_an_override() {
        let fake = FakeSysfs::new(Some("igbvf"), true);

        // The fake kernel never binds: the attempt ends in NotBound, after these writes.
        let err = Binding::to_vfio(&fake.sysfs(), vf(), DriverState::read(&fake.sysfs(), &vf()))
            .unwrap_err();

        assert!(
            matches!(&err, BindError::NotBound { driver, .. } if driver == "igbvf"),
            "{err}"
        );
        assert_eq!(
            fake.read("sys/bus/pci/drivers/igbvf/unbind"),
            "0000:01:10.0"
        );
        assert_eq!(fake.read("sys/bus/pci/drivers_probe"), "0000:01:10.0");
    }

    #[test]
    fn failed_bind_clears_the_override_again() {
        let fake = FakeSysfs::new(None, true);

        let _ = Binding::to_vfio(&fake.sysfs(), vf(), DriverState::read(&fake.sysfs(), &vf()))
            .unwrap_err();

        assert_eq!(
            fake.read("sys/bus/pci/devices/0000:01:10.0/driver_override"),
            "\n"
        );
    }

    #[test]
    fn restore_rebinds_the_previous_driver() {
        let fake = FakeSysfs::new(Some("vfio-pci"), true);
        let binding = Binding {
            bdf: vf(),
            previous: DriverState {
                driver: Some("igbvf".into()),
                driver_override: None,
            },
            changed: true,
        };

        binding.restore(&fake.sysfs()).unwrap();

        assert_eq!(
            fake.read("sys/bus/pci/devices/0000:01:10.0/driver_override"),
            "\n"
        );
        assert_eq!(
            fake.read("sys/bus/pci/drivers/vfio-pci/unbind"),
            "0000:01:10.0"
        );
        assert_eq!(fake.read("sys/bus/pci/drivers/igbvf/bind"), "0000:01:10.0");
    }

    #[test]
    fn restore_puts_back_a_previous_override() {
        let fake = FakeSysfs::new(Some("vfio-pci"), true);
        let binding = Binding {
            bdf: vf(),
            previous: DriverState {
                driver: None,
                driver_override: Some("pci-stub".into()),
            },
            changed: true,
        };

        binding.restore(&fake.sysfs()).unwrap();

        assert_eq!(
            fake.read("sys/bus/pci/devices/0000:01:10.0/driver_override"),
            "pci-stub"
        );
    }

    #[test]
    fn vf_left_on_vfio_pci_goes_back_to_its_recorded_driver() {
        // A dead rvmm left the VF on vfio-pci; its claim recorded igbvf as the VF's driver.
        let fake = FakeSysfs::new(Some("vfio-pci"), true);
        let recorded = DriverState {
            driver: Some("igbvf".into()),
            driver_override: None,
        };

        let binding = Binding::to_vfio(&fake.sysfs(), vf(), recorded).unwrap();
        binding.restore(&fake.sysfs()).unwrap();

        assert_eq!(fake.read("sys/bus/pci/drivers/igbvf/bind"), "0000:01:10.0");
    }
}
