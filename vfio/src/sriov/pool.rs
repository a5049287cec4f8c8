//! The VF pool of a physical function, read from sysfs: the PF by PCI address or by network
//! interface name (`/sys/class/net/NAME/device`), its VFs (`virtfnN` links) and whether the host
//! uses a VF (bound to a host network driver, or its VFIO group open in some process).
//!
//! All paths are under a root directory: `/` on the host, a fake tree in tests.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use crate::host::{GroupHolder, Sysfs};
use rvmm_pci::bdf::shown;
use rvmm_pci::{Bdf, SYSFS_PCI_DEVICES};

const SYS_DEVICES: &str = "sys/bus/pci/devices";
const SYS_NET: &str = "sys/class/net";
const VFIO_DRIVER: &str = "vfio-pci";
/// Longest network interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// `IFF_UP` in `/sys/class/net/NAME/flags`.
const IFF_UP: u32 = 0x1;

/// How the user names a physical function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PfSpec {
    /// By PCI address.
    Pci(Bdf),
    /// By the name of its network interface.
    Netdev(String),
}

impl fmt::Display for PfSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PfSpec::Pci(bdf) => bdf.fmt(f),
            PfSpec::Netdev(name) => f.write_str(name),
        }
    }
}

/// A physical function reference that is neither a PCI address nor an interface name.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("invalid SR-IOV physical function '{given}': expected a PCI address like 0000:3b:00.0, {SYSFS_PCI_DEVICES}/0000:3b:00.0 or a network interface name of at most {MAX_IFNAME_LEN} characters")]
pub struct PfSpecError {
    /// What was given (cut to 80 characters).
    pub given: String,
}

impl FromStr for PfSpec {
    type Err = PfSpecError;

    /// A PCI address or sysfs directory (anything with `/` or `:`), else a network interface
    /// name as Linux accepts it (1 to 15 bytes, no `/`, `:` or white space, not `.` or `..`).
    fn from_str(s: &str) -> std::result::Result<Self, PfSpecError> {
        let invalid = || PfSpecError { given: shown(s) };
        if s.contains(['/', ':']) {
            return Bdf::from_sysfs(s).map(PfSpec::Pci).map_err(|_| invalid());
        }
        if valid_ifname(s) {
            Ok(PfSpec::Netdev(s.to_string()))
        } else {
            Err(invalid())
        }
    }
}

#[cfg(feature = "serde")]
rvmm_pci::serde_as_string!(PfSpec);

/// A virtual function of a PF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualFunction {
    /// Its index on the PF (the N of `virtfnN`).
    pub index: u16,
    /// Its PCI address.
    pub bdf: Bdf,
}

/// An SR-IOV physical function with VFs and a network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysicalFunction {
    /// Its PCI address.
    pub bdf: Bdf,
    /// Its network interface, through which its VFs are configured.
    pub netdev: String,
    /// That interface's index.
    pub ifindex: u32,
    /// Whether that interface is up (many PF drivers answer their VFs only when it is).
    pub up: bool,
    /// Most VFs the device supports.
    pub total_vfs: u16,
    /// Its VFs, by index.
    pub vfs: Vec<VirtualFunction>,
}

/// Why the host is using a VF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostUse {
    /// Bound to a host network driver that made an interface of it.
    Driver {
        /// The driver.
        driver: String,
        /// The interface.
        netdev: String,
    },
    /// Bound to vfio-pci with its VFIO group open in some process.
    GroupOpen {
        /// The IOMMU group.
        group: u32,
        /// The processes holding it (empty when we may not look).
        holders: Vec<GroupHolder>,
    },
}

impl fmt::Display for HostUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostUse::Driver { driver, netdev } => {
                write!(f, "used by the host as {netdev} (driver {driver})")
            }
            HostUse::GroupOpen { group, holders } if holders.is_empty() => {
                write!(f, "VFIO group {group} open in another process")
            }
            HostUse::GroupOpen { group, holders } => {
                let list: Vec<String> = holders.iter().map(ToString::to_string).collect();
                write!(f, "VFIO group {group} open in {}", list.join(", "))
            }
        }
    }
}

/// Errors of finding a PF and its VFs.
#[derive(Debug, Error)]
pub enum PoolError {
    /// The interface name cannot be a Linux interface.
    #[error(
        "invalid network interface name '{name}': 1 to 15 characters, no '/', not '.' or '..'"
    )]
    InvalidName {
        /// What was given.
        name: String,
    },
    /// No such PCI device.
    #[error("physical function {bdf} not found (no /sys/bus/pci/devices/{bdf}); list devices with `lspci -D`")]
    NoSuchDevice {
        /// The address.
        bdf: Bdf,
    },
    /// No such network interface.
    #[error("physical function {name} not found: there is no network interface {name}; list interfaces with `ip link`")]
    NoSuchInterface {
        /// The name.
        name: String,
    },
    /// The interface is not a PCI function (a bridge, a bond, a VLAN...).
    #[error("network interface {name} is not a PCI device, so it has no SR-IOV VFs")]
    NotPci {
        /// The name.
        name: String,
    },
    /// The device is itself a VF.
    #[error("{bdf} is a virtual function of {pf}; give its physical function {pf}")]
    IsVf {
        /// The address given.
        bdf: Bdf,
        /// Its PF.
        pf: String,
    },
    /// The device has no SR-IOV capability.
    #[error("{bdf} is not SR-IOV capable (no sriov_totalvfs in its sysfs directory)")]
    NotSriovCapable {
        /// The address.
        bdf: Bdf,
    },
    /// The PF has no VFs enabled.
    #[error("physical function {bdf} has no VFs; create them as root: echo N > /sys/bus/pci/devices/{bdf}/sriov_numvfs (N from 1 to {total})")]
    NoVfs {
        /// The address.
        bdf: Bdf,
        /// Most VFs it supports.
        total: u16,
    },
    /// The PF has no network interface to configure its VFs through.
    #[error("physical function {bdf} has no network interface (driver: {driver}); bind it to its network driver, through which rvmm sets its VFs' MAC address, VLAN, spoof checking and trust")]
    NoNetdev {
        /// The address.
        bdf: Bdf,
        /// Its driver, or "none".
        driver: String,
    },
    /// A sysfs file cannot be read or holds something unexpected.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Result of pool look-ups.
pub type Result<T> = std::result::Result<T, PoolError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PoolError + '_ {
    move |source| PoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The last component of the target of symlink `path`.
fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

/// The first entry of directory `dir`, by name.
fn first_entry(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Reads a decimal or `0x` hexadecimal number from a sysfs attribute.
fn read_number(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| PoolError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("'{text}' is not a number"),
        ),
    })
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// The host's PCI devices and network interfaces, for SR-IOV.
#[derive(Clone, Debug)]
pub struct PoolSysfs {
    root: PathBuf,
}

impl Default for PoolSysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl PoolSysfs {
    /// The real host (`/`).
    pub fn new() -> Self {
        Self::with_root("/")
    }

    /// A tree rooted at `root` (tests).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sysfs directory of PCI device `bdf`.
    pub fn device_dir(&self, bdf: &Bdf) -> PathBuf {
        self.root.join(SYS_DEVICES).join(bdf.to_string())
    }

    /// The driver bound to PCI device `bdf`, if any.
    pub fn driver(&self, bdf: &Bdf) -> Option<String> {
        link_name(&self.device_dir(bdf).join("driver"))
    }

    /// Resolves `spec` to an SR-IOV PF with VFs and a network interface.
    pub fn find_pf(&self, spec: &PfSpec) -> Result<PhysicalFunction> {
        let (bdf, named) = match spec {
            PfSpec::Pci(bdf) => (*bdf, None),
            PfSpec::Netdev(name) => (self.netdev_device(name)?, Some(name.as_str())),
        };
        let dir = self.device_dir(&bdf);
        if !dir.exists() {
            return Err(PoolError::NoSuchDevice { bdf });
        }
        if let Some(pf) = link_name(&dir.join("physfn")) {
            return Err(PoolError::IsVf { bdf, pf });
        }
        let total_path = dir.join("sriov_totalvfs");
        if !total_path.exists() {
            return Err(PoolError::NotSriovCapable { bdf });
        }
        let total = u16::try_from(read_number(&total_path)?).unwrap_or(u16::MAX);
        if total == 0 {
            return Err(PoolError::NotSriovCapable { bdf });
        }
        let num_path = dir.join("sriov_numvfs");
        let num = u16::try_from(read_number(&num_path)?).unwrap_or(u16::MAX);
        if num == 0 {
            return Err(PoolError::NoVfs { bdf, total });
        }
        let netdev = match named {
            Some(name) => name.to_string(),
            None => first_entry(&dir.join("net")).ok_or_else(|| PoolError::NoNetdev {
                bdf,
                driver: self.driver(&bdf).unwrap_or_else(|| "none".to_string()),
            })?,
        };
        let net_dir = self.root.join(SYS_NET).join(&netdev);
        let ifindex = read_number(&net_dir.join("ifindex"))?;
        let ifindex = u32::try_from(ifindex).map_err(|_| PoolError::Io {
            path: net_dir.join("ifindex"),
            source: io::Error::new(io::ErrorKind::InvalidData, "interface index out of range"),
        })?;
        let up = read_number(&net_dir.join("flags"))
            .map(|flags| flags & u64::from(IFF_UP) != 0)
            .unwrap_or(false);
        let mut vfs = Vec::new();
        for index in 0..num {
            let link = dir.join(format!("virtfn{index}"));
            match link_name(&link).map(|name| name.parse::<Bdf>()) {
                Some(Ok(vf_bdf)) => vfs.push(VirtualFunction { index, bdf: vf_bdf }),
                _ => log::debug!("physical function {bdf}: no usable {}", link.display()),
            }
        }
        if vfs.is_empty() {
            return Err(PoolError::NoVfs { bdf, total });
        }
        Ok(PhysicalFunction {
            bdf,
            netdev,
            ifindex,
            up,
            total_vfs: total,
            vfs,
        })
    }

    /// The PCI address behind network interface `name`.
    fn netdev_device(&self, name: &str) -> Result<Bdf> {
        if !valid_ifname(name) {
            return Err(PoolError::InvalidName {
                name: name.to_string(),
            });
        }
        let net_dir = self.root.join(SYS_NET).join(name);
        if !net_dir.exists() {
            return Err(PoolError::NoSuchInterface {
                name: name.to_string(),
            });
        }
        let device = net_dir.join("device");
        // A PCI function's interface links to its PCI device (named by its address); virtual
        // interfaces have no device, USB ones link to a USB interface.
        let subsystem = link_name(&device.join("subsystem"));
        link_name(&device)
            .filter(|_| subsystem.as_deref().is_none_or(|s| s == "pci"))
            .and_then(|target| target.parse().ok())
            .ok_or_else(|| PoolError::NotPci {
                name: name.to_string(),
            })
    }

    /// Whether the host uses `vf`: bound to a host driver with a network interface, or bound
    /// to vfio-pci with its VFIO group open in some process (this one included).
    pub fn host_use(&self, vf: &VirtualFunction) -> Option<HostUse> {
        let dir = self.device_dir(&vf.bdf);
        let driver = link_name(&dir.join("driver"))?;
        if driver != VFIO_DRIVER {
            let netdev = first_entry(&dir.join("net"))?;
            return Some(HostUse::Driver { driver, netdev });
        }
        let group = link_name(&dir.join("iommu_group"))?.parse::<u32>().ok()?;
        let holders = Sysfs::with_root(&self.root).group_holders(group);
        (!holders.is_empty()).then_some(HostUse::GroupOpen { group, holders })
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
