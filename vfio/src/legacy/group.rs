//! The VFIO groups attached to a container: opening (or adopting a pre-opened fd), checking,
//! attaching and registering with KVM when the first device of a group is opened; unregistering,
//! detaching and closing when the last one is gone, whatever the kernel says on the way out.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use vfio_bindings::bindings::vfio::{VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE};

use super::sys::{group_path, FdNode, GroupKernel};
use super::{Result, VfioError};

/// Why a pre-opened fd is not the group it was given for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupFdMismatch {
    /// The fd does not answer VFIO_GROUP_GET_STATUS.
    NoStatus,
    /// The fd is not a character device.
    NotCharDevice,
    /// The fd is another character device than the group's node.
    OtherNode {
        /// The fd's device number.
        rdev: u64,
        /// The device number of the group's node.
        expected: u64,
    },
    /// The group is already attached to a container that is not ours.
    OtherContainer,
}

fn major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

impl fmt::Display for GroupFdMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoStatus => write!(f, "it does not answer VFIO_GROUP_GET_STATUS"),
            Self::NotCharDevice => write!(f, "it is not a character device"),
            Self::OtherNode { rdev, expected } => {
                let (major, minor) = major_minor(rdev);
                let (emajor, eminor) = major_minor(expected);
                write!(
                    f,
                    "it is device {major}:{minor}, the group node is {emajor}:{eminor}"
                )
            }
            Self::OtherContainer => write!(f, "the group is attached to another container"),
        }
    }
}

/// Decides whether a pre-opened fd is the group whose node has device number `expected_rdev`:
/// `node` is what fstat says about the fd, `flags` what VFIO_GROUP_GET_STATUS returned (`None`:
/// it failed), `attached_here` whether our container already holds the group.
pub fn check_group_fd(
    node: FdNode,
    expected_rdev: u64,
    flags: Option<u32>,
    attached_here: bool,
) -> std::result::Result<(), GroupFdMismatch> {
    if !node.is_char {
        return Err(GroupFdMismatch::NotCharDevice);
    }
    if node.rdev != expected_rdev {
        return Err(GroupFdMismatch::OtherNode {
            rdev: node.rdev,
            expected: expected_rdev,
        });
    }
    let flags = flags.ok_or(GroupFdMismatch::NoStatus)?;
    if flags & VFIO_GROUP_FLAGS_CONTAINER_SET != 0 && !attached_here {
        return Err(GroupFdMismatch::OtherContainer);
    }
    Ok(())
}

struct Attached {
    fd: OwnedFd,
    devices: usize,
}

/// The groups of one container and the devices open in each.
pub(crate) struct Groups {
    kernel: Box<dyn GroupKernel>,
    attached: BTreeMap<u32, Attached>,
}

impl Groups {
    pub(crate) fn new(kernel: Box<dyn GroupKernel>) -> Self {
        Self {
            kernel,
            attached: BTreeMap::new(),
        }
    }

    /// Number of attached groups.
    pub(crate) fn len(&self) -> usize {
        self.attached.len()
    }

    fn check_preopened(&self, group: u32, fd: &OwnedFd, device: &str) -> Result<()> {
        let path = group_path(group);
        let expected = self
            .kernel
            .group_node(group)
            .map_err(|source| VfioError::GroupNode {
                path: path.display().to_string(),
                device: device.to_owned(),
                source,
            })?;
        let node = self
            .kernel
            .fd_node(fd.as_fd())
            .map_err(|source| VfioError::GroupFdStat {
                fd: fd.as_raw_fd(),
                device: device.to_owned(),
                source,
            })?;
        // Only ask a character device with the right number: an ioctl on an arbitrary fd could
        // mean something else to its driver.
        let flags = if node.is_char && node.rdev == expected {
            self.kernel.group_flags(fd.as_fd()).ok()
        } else {
            None
        };
        check_group_fd(node, expected, flags, self.attached.contains_key(&group)).map_err(
            |reason| VfioError::ForeignGroupFd {
                fd: fd.as_raw_fd(),
                group,
                device: device.to_owned(),
                reason,
            },
        )
    }

    /// Counts one more device in `group`, attaching the group to `container` first if it is
    /// new (with `preopened` as its fd if given, else opening its node).
    pub(crate) fn acquire(
        &mut self,
        container: BorrowedFd<'_>,
        group: u32,
        preopened: Option<OwnedFd>,
        device: &str,
    ) -> Result<()> {
        if let Some(fd) = &preopened {
            self.check_preopened(group, fd, device)?;
        }
        if let Some(attached) = self.attached.get_mut(&group) {
            // The group is ours already: an extra fd of it is simply closed.
            attached.devices += 1;
            return Ok(());
        }
        let fd = match preopened {
            Some(fd) => fd,
            None => self
                .kernel
                .open_group(group)
                .map_err(|source| VfioError::OpenGroup {
                    group,
                    path: group_path(group).display().to_string(),
                    source,
                })?,
        };
        let flags = self
            .kernel
            .group_flags(fd.as_fd())
            .map_err(|source| VfioError::GroupStatus { group, source })?;
        if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable { group });
        }
        self.kernel
            .set_container(fd.as_fd(), container)
            .map_err(|source| VfioError::SetContainer { group, source })?;
        // The kernel drops the IOMMU with the last group of a container: a first group needs it
        // set (again).
        let setup = if self.attached.is_empty() {
            self.kernel
                .set_iommu(container)
                .map_err(|source| VfioError::SetIommu { group, source })
        } else {
            Ok(())
        };
        let setup = setup.and_then(|()| {
            self.kernel
                .kvm_add(fd.as_fd())
                .map_err(|source| VfioError::KvmAdd { group, source })
        });
        if let Err(e) = setup {
            self.detach(group, &fd, false);
            return Err(e);
        }
        self.attached.insert(group, Attached { fd, devices: 1 });
        Ok(())
    }

    /// Opens the device `name` of the attached `group`.
    pub(crate) fn device_fd(&self, group: u32, name: &CStr) -> io::Result<OwnedFd> {
        let attached = self
            .attached
            .get(&group)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        self.kernel.device_fd(attached.fd.as_fd(), name)
    }

    /// Counts one device less in `group`; the last one detaches and closes the group.
    pub(crate) fn release(&mut self, group: u32) {
        let Some(attached) = self.attached.get_mut(&group) else {
            log::error!("VFIO group {group} released but not attached");
            return;
        };
        attached.devices = attached.devices.saturating_sub(1);
        if attached.devices > 0 {
            return;
        }
        if let Some(attached) = self.attached.remove(&group) {
            self.detach(group, &attached.fd, true);
            log::info!("VFIO group {group} left the container");
        }
    }

    /// Unregisters the group from KVM (if `registered`) and detaches it from the container.
    /// Failures are logged only: a group whose device the host removed still has to go, and
    /// closing its fd (by the caller) detaches it anyway.
    fn detach(&self, group: u32, fd: &OwnedFd, registered: bool) {
        if registered {
            if let Err(e) = self.kernel.kvm_del(fd.as_fd()) {
                log::warn!("cannot unregister VFIO group {group} from KVM: {e}");
            }
        }
        if let Err(e) = self.kernel.unset_container(fd.as_fd()) {
            log::warn!("cannot detach VFIO group {group} from the container: {e}");
        }
    }
}
