//! Host-side preparation of a passthrough device: resolving the user's device argument, checking
//! that it is bound to vfio-pci, that the IOMMU is on and its group is viable, finding who holds
//! a busy group, and checking the memlock limit. Every error names the device and the fix.
//!
//! All file access goes through [`Sysfs`], rooted at `/` in production and at a fake tree in
//! tests.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::container::ContainerError;
use crate::legacy::VfioError;
use rvmm_pci::Bdf;
use thiserror::Error;

const SYS_DEVICES: &str = "sys/bus/pci/devices";
const SYS_GROUPS: &str = "sys/kernel/iommu_groups";
const VFIO_DRIVER: &str = "vfio-pci";
/// Drivers the kernel tolerates on other devices of a group handed to VFIO.
const GROUP_SAFE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

/// A process holding a VFIO group open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupHolder {
    /// Process ID.
    pub pid: u32,
    /// Command name (`/proc/<pid>/comm`).
    pub comm: String,
}

impl fmt::Display for GroupHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)
    }
}

/// Another device of an IOMMU group and its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// Its address.
    pub bdf: String,
    /// Its driver, if bound.
    pub driver: Option<String>,
}

impl fmt::Display for GroupMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.driver {
            Some(d) => write!(f, "{} (driver {d})", self.bdf),
            None => write!(f, "{} (no driver)", self.bdf),
        }
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Errors of host preparation.
#[derive(Debug, Error)]
pub enum HostError {
    /// No such device.
    #[error("host PCI device {bdf} not found (no /sys/bus/pci/devices/{bdf}); list devices with `lspci -D`")]
    NotFound {
        /// The address.
        bdf: Bdf,
    },
    /// The device is not bound to vfio-pci.
    #[error("host device {bdf} is bound to {driver}, not vfio-pci; as root, run:\n{commands}")]
    NotBound {
        /// The address.
        bdf: Bdf,
        /// The current driver ("no driver" if none).
        driver: String,
        /// The commands that bind it to vfio-pci.
        commands: String,
    },
    /// The device has no IOMMU group.
    #[error("host device {bdf} has no IOMMU group: the IOMMU is off; enable VT-d/AMD-Vi in the firmware and boot the host with intel_iommu=on (or amd_iommu=on) iommu=pt")]
    NoIommuGroup {
        /// The address.
        bdf: Bdf,
    },
    /// Another device of the group is bound to a host driver.
    #[error("IOMMU group {group} of host device {bdf} is not viable: its other devices must be bound to vfio-pci or have no driver, but it has {}; bind them to vfio-pci too or use a slot with its own group", list(.others))]
    GroupNotViable {
        /// The address.
        bdf: Bdf,
        /// The group.
        group: u32,
        /// The offending devices.
        others: Vec<GroupMember>,
    },
    /// The group's device node is missing.
    #[error("/dev/vfio/{group} (IOMMU group of host device {bdf}) does not exist; check that vfio-pci bound the device and that /dev/vfio is populated")]
    NoGroupNode {
        /// The address.
        bdf: Bdf,
        /// The group.
        group: u32,
    },
    /// We may not open the group's device node.
    #[error("no permission to open /dev/vfio/{group} (IOMMU group of host device {bdf}); run as root or give this user the device node (chown or a udev rule)")]
    GroupPermission {
        /// The address.
        bdf: Bdf,
        /// The group.
        group: u32,
    },
    /// The group is open in another process.
    #[error("IOMMU group {group} of host device {bdf} is already open in {}; stop that process or release the device from it", if .holders.is_empty() { "another process (run as root to see which)".to_string() } else { list(.holders) })]
    GroupBusy {
        /// The address.
        bdf: Bdf,
        /// The group.
        group: u32,
        /// The processes holding `/dev/vfio/<group>`.
        holders: Vec<GroupHolder>,
    },
    /// The memlock limit cannot cover the DMA mapping of guest RAM on top of what is locked.
    #[error("RLIMIT_MEMLOCK is {limit} bytes but passthrough pins all {required} bytes of guest RAM for DMA on top of the {locked} bytes rvmm has locked already (guest RAM on 4 KiB pages counts twice); raise it to at least {} bytes (`ulimit -l unlimited`, LimitMEMLOCK=infinity in the systemd unit, or memlock in /etc/security/limits.conf) or grant CAP_IPC_LOCK", .locked.saturating_add(*.required))]
    MemlockTooLow {
        /// Bytes the DMA mapping pins.
        required: u64,
        /// Bytes locked already.
        locked: u64,
        /// The current soft limit.
        limit: u64,
    },
    /// A sysfs or procfs file cannot be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Result of host preparation.
pub type Result<T> = std::result::Result<T, HostError>;

/// A host device ready to be opened through VFIO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDevice {
    /// Its address.
    pub bdf: Bdf,
    /// Its sysfs directory (what VFIO opens).
    pub sysfs_path: PathBuf,
    /// Its IOMMU group.
    pub group: u32,
}

/// The commands that bind `bdf` to vfio-pci, given its current driver.
pub fn rebind_commands(bdf: &Bdf, driver: Option<&str>, vfio_loaded: bool) -> String {
    let mut lines = Vec::new();
    if !vfio_loaded {
        lines.push("modprobe vfio-pci".to_string());
    }
    lines.push(format!(
        "echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override"
    ));
    if driver.is_some() {
        lines.push(format!(
            "echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind"
        ));
    }
    lines.push(format!("echo {bdf} > /sys/bus/pci/drivers_probe"));
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks that `required` more bytes can be pinned for DMA under the soft memlock `limit`
/// (`None`: unlimited) with `locked` bytes locked already: [`rvmm_devices::host::check_memlock`],
/// the one rule, with this module's error.
pub fn check_memlock(
    required: u64,
    limit: Option<u64>,
    locked: u64,
    cap_ipc_lock: bool,
) -> Result<()> {
    rvmm_devices::host::check_memlock(required, limit, locked, cap_ipc_lock).map_err(|s| {
        HostError::MemlockTooLow {
            required: s.needed,
            locked: s.locked,
            limit: s.limit,
        }
    })
}

/// Whether the `CapEff:` line of a `/proc/<pid>/status` text includes `CAP_IPC_LOCK`.
pub fn has_cap_ipc_lock(status: &str) -> bool {
    rvmm_devices::host::cap_ipc_lock(status).unwrap_or(false)
}

/// The host's sysfs, procfs and /dev, under a root directory.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new()
    }
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

impl Sysfs {
    /// The real host (`/`).
    pub fn new() -> Self {
        Self::with_root("/")
    }

    /// A tree rooted at `root` (tests).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn device_dir(&self, bdf: &Bdf) -> PathBuf {
        self.root.join(SYS_DEVICES).join(bdf.to_string())
    }

    /// Checks that host device `bdf` can be opened through VFIO.
    pub fn prepare(&self, bdf: Bdf) -> Result<HostDevice> {
        let dir = self.device_dir(&bdf);
        if !dir.exists() {
            return Err(HostError::NotFound { bdf });
        }
        let driver = link_name(&dir.join("driver"));
        if driver.as_deref() != Some(VFIO_DRIVER) {
            let vfio_loaded = self.root.join("sys/bus/pci/drivers/vfio-pci").exists();
            return Err(HostError::NotBound {
                bdf,
                commands: rebind_commands(&bdf, driver.as_deref(), vfio_loaded),
                driver: driver.unwrap_or_else(|| "no driver".to_string()),
            });
        }
        let group = link_name(&dir.join("iommu_group"))
            .and_then(|g| g.parse::<u32>().ok())
            .ok_or(HostError::NoIommuGroup { bdf })?;
        let others = self.unsafe_group_members(&bdf, group)?;
        if !others.is_empty() {
            return Err(HostError::GroupNotViable { bdf, group, others });
        }
        if !self.root.join(format!("dev/vfio/{group}")).exists() {
            return Err(HostError::NoGroupNode { bdf, group });
        }
        Ok(HostDevice {
            bdf,
            sysfs_path: dir,
            group,
        })
    }

    /// The other devices of `group` bound to drivers that make the group unusable.
    fn unsafe_group_members(&self, bdf: &Bdf, group: u32) -> Result<Vec<GroupMember>> {
        let path = self
            .root
            .join(SYS_GROUPS)
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&path).map_err(|source| HostError::Io {
            path: path.clone(),
            source,
        })?;
        let me = bdf.to_string();
        let mut others = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == me {
                continue;
            }
            let driver = link_name(&entry.path().join("driver"));
            if driver
                .as_deref()
                .is_some_and(|d| !GROUP_SAFE_DRIVERS.contains(&d))
            {
                others.push(GroupMember { bdf: name, driver });
            }
        }
        others.sort_by(|a, b| a.bdf.cmp(&b.bdf));
        Ok(others)
    }

    /// The processes that have /dev/vfio/`group` open (those whose fds we may inspect).
    pub fn group_holders(&self, group: u32) -> Vec<GroupHolder> {
        let target = PathBuf::from(format!("/dev/vfio/{group}"));
        let mut holders = Vec::new();
        let Ok(procs) = fs::read_dir(self.root.join("proc")) else {
            return holders;
        };
        for proc_entry in procs.flatten() {
            let Some(pid) = proc_entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
                continue;
            };
            let holds = fds
                .flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == target));
            if holds {
                let comm = fs::read_to_string(proc_entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".to_string());
                holders.push(GroupHolder { pid, comm });
            }
        }
        holders.sort_by_key(|h| h.pid);
        holders
    }

    /// Turns a failure to open `device` into an actionable error when its cause is known: the
    /// group busy in another process, or not viable.
    pub fn explain_open_error(
        &self,
        device: &HostDevice,
        err: &ContainerError,
    ) -> Option<HostError> {
        let ContainerError::OpenDevice { source, .. } = err else {
            return None;
        };
        let busy = match source {
            VfioError::OpenGroup { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
            {
                return Some(HostError::GroupPermission {
                    bdf: device.bdf,
                    group: device.group,
                });
            }
            VfioError::OpenGroup { source, .. } | VfioError::GetDeviceFd { source, .. } => {
                source.raw_os_error() == Some(libc::EBUSY)
            }
            VfioError::GroupNotViable { .. } => {
                let others = self
                    .unsafe_group_members(&device.bdf, device.group)
                    .unwrap_or_default();
                return Some(HostError::GroupNotViable {
                    bdf: device.bdf,
                    group: device.group,
                    others,
                });
            }
            _ => false,
        };
        busy.then(|| HostError::GroupBusy {
            bdf: device.bdf,
            group: device.group,
            holders: self.group_holders(device.group),
        })
    }

    /// Checks that this process may pin `required` more bytes for DMA (RLIMIT_MEMLOCK, with
    /// what it has locked already, or CAP_IPC_LOCK).
    pub fn check_memlock(&self, required: u64) -> Result<()> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the valid `limit`.
        let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
        if ret != 0 {
            return Err(HostError::Io {
                path: PathBuf::from("RLIMIT_MEMLOCK"),
                source: io::Error::last_os_error(),
            });
        }
        let soft = (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur);
        let status_path = self.root.join("proc/self/status");
        let status = fs::read_to_string(&status_path).map_err(|source| HostError::Io {
            path: status_path,
            source,
        })?;
        let locked = rvmm_devices::host::proc_kib_field(&status, "VmLck").unwrap_or(0);
        check_memlock(required, soft, locked, has_cap_ipc_lock(&status))
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
