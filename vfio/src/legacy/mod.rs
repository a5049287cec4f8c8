//! A small hand-written layer over the legacy VFIO interface (container `/dev/vfio/vfio`, groups
//! `/dev/vfio/<group>`, type1 v2 IOMMU).
//!
//! We write it ourselves rather than use vfio-ioctls because:
//! - a privileged control plane may hand us pre-opened container and group fds (our VMM may not
//!   be allowed to open the nodes), and the cdev/iommufd interface that takes fds is not
//!   available on every host kernel;
//! - a group whose KVM unregistration fails (the host already removed or unbound the device)
//!   must still leave the container, so the container stays usable for other groups and the same
//!   group can be opened again.
//!
//! - [`LegacyContainer`]: the container fd, its groups (shared by the devices of a group,
//!   released with the last one), DMA mapping and the IOMMU information.
//! - [`VfioDevice`]: one device fd with its region and interrupt information, read at open.
//! - [`info`]: the pure parsers of what the kernel returns (untrusted: every offset and count is
//!   bounds-checked).

mod container;
mod device_fd;
mod group;
pub mod info;
mod sys;

use std::io;
use std::os::fd::RawFd;

use thiserror::Error;
use vfio_bindings::bindings::vfio::VFIO_API_VERSION;

pub use container::LegacyContainer;
pub use device_fd::VfioDevice;
pub use group::GroupFdMismatch;

/// Errors of the legacy VFIO layer.
#[derive(Debug, Error)]
pub enum VfioError {
    /// The container node cannot be opened.
    #[error("cannot open the VFIO container {path} (is the vfio module loaded?)")]
    OpenContainer {
        /// The node.
        path: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The container fd does not answer VFIO_GET_API_VERSION.
    #[error("the container fd does not answer VFIO_GET_API_VERSION (is it /dev/vfio/vfio?)")]
    NotAContainer(#[source] io::Error),
    /// The container speaks another API version.
    #[error("the VFIO container speaks API version {version}, expected {VFIO_API_VERSION}")]
    ApiVersion {
        /// What the kernel reported.
        version: i32,
    },
    /// The container lacks the type1 v2 IOMMU.
    #[error("the VFIO container does not support the type1 v2 IOMMU")]
    NoType1v2,
    /// The device's IOMMU group cannot be found.
    #[error("cannot find the IOMMU group of {device} (is the IOMMU enabled?)")]
    GroupOf {
        /// The device (sysfs path).
        device: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device's sysfs path does not end in a device name.
    #[error("{device} does not name a device")]
    DeviceName {
        /// The device (sysfs path).
        device: String,
    },
    /// The group node cannot be opened.
    #[error("cannot open VFIO group {group} ({path})")]
    OpenGroup {
        /// The group.
        group: u32,
        /// Its node.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The group node cannot be stat'ed (to check a pre-opened group fd).
    #[error("cannot stat {path} to check the group fd of {device}")]
    GroupNode {
        /// The node.
        path: String,
        /// The device.
        device: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A pre-opened group fd cannot be stat'ed.
    #[error("cannot stat the group descriptor given for {device}")]
    GroupFdStat {
        /// The fd (this process's copy; the caller's number may differ).
        fd: RawFd,
        /// The device.
        device: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A pre-opened fd is not the device's group.
    #[error("the descriptor given for {device} is not its VFIO group {group}: {reason}")]
    ForeignGroupFd {
        /// The fd (this process's copy; the caller's number may differ).
        fd: RawFd,
        /// The expected group.
        group: u32,
        /// The device.
        device: String,
        /// Why.
        reason: GroupFdMismatch,
    },
    /// VFIO_GROUP_GET_STATUS failed.
    #[error("cannot query the status of VFIO group {group}")]
    GroupStatus {
        /// The group.
        group: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Some device of the group is bound to a host driver.
    #[error(
        "group {group} is not viable: bind every device of the group to vfio-pci or unbind it"
    )]
    GroupNotViable {
        /// The group.
        group: u32,
    },
    /// VFIO_GROUP_SET_CONTAINER failed.
    #[error("cannot attach VFIO group {group} to the container")]
    SetContainer {
        /// The group.
        group: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// VFIO_SET_IOMMU failed.
    #[error("cannot enable the type1 v2 IOMMU of the container for VFIO group {group}")]
    SetIommu {
        /// The group that was attached first.
        group: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// KVM_DEV_VFIO_FILE_ADD failed.
    #[error("cannot register VFIO group {group} with KVM")]
    KvmAdd {
        /// The group.
        group: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// VFIO_GROUP_GET_DEVICE_FD failed.
    #[error("cannot get the fd of VFIO device {device} from group {group}")]
    GetDeviceFd {
        /// The device name.
        device: String,
        /// The group.
        group: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// VFIO_DEVICE_GET_INFO failed.
    #[error("cannot query VFIO device {device}")]
    DeviceInfo {
        /// The device name.
        device: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device is not a PCI device with the regions of one.
    #[error("VFIO device {device} is not a PCI device (flags {flags:#x}, {regions} regions)")]
    NotPci {
        /// The device name.
        device: String,
        /// Its device flags.
        flags: u32,
        /// Its number of regions.
        regions: u32,
    },
}

/// Result of the legacy VFIO layer.
pub type Result<T> = std::result::Result<T, VfioError>;
