//! The kernel calls of the legacy VFIO interface: ioctl numbers and the group-level calls behind
//! [`GroupKernel`], so the group bookkeeping of [`super::LegacyContainer`] can be tested against
//! a fake.
//!
//! Every VFIO ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`: the argument size is not encoded in the
//! number, the structures carry their own `argsz`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use kvm_bindings::{
    kvm_device_attr, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::DeviceFd;
use vfio_bindings::bindings::vfio::{vfio_group_status, VFIO_TYPE1v2_IOMMU};

/// The ioctl numbers (include/uapi/linux/vfio.h).
pub(crate) mod nr {
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};

    vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
    vmm_sys_util::ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
    vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_UNSET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 5);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, VFIO_BASE + 6);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE as u32, VFIO_BASE + 9);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);
}

/// Where the group nodes live.
pub(crate) const VFIO_DEV_DIR: &str = "/dev/vfio";

/// Path of the node of group `group`.
pub(crate) fn group_path(group: u32) -> PathBuf {
    PathBuf::from(format!("{VFIO_DEV_DIR}/{group}"))
}

/// What `fstat` says about an fd: whether it is a character device, and which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdNode {
    /// Whether the fd is a character device.
    pub is_char: bool,
    /// Its device number (`st_rdev`).
    pub rdev: u64,
}

/// Turns an ioctl return value into a result, reading errno on failure.
pub(crate) fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The group-level kernel calls.
pub(crate) trait GroupKernel: Send + Sync {
    /// Opens the node of group `group`.
    fn open_group(&self, group: u32) -> io::Result<OwnedFd>;
    /// The device number of the node of group `group` (stat needs no permission on the node).
    fn group_node(&self, group: u32) -> io::Result<u64>;
    /// What `fd` is.
    fn fd_node(&self, fd: BorrowedFd<'_>) -> io::Result<FdNode>;
    /// VFIO_GROUP_GET_STATUS: the group flags.
    fn group_flags(&self, group: BorrowedFd<'_>) -> io::Result<u32>;
    /// VFIO_GROUP_SET_CONTAINER.
    fn set_container(&self, group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()>;
    /// VFIO_GROUP_UNSET_CONTAINER.
    fn unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()>;
    /// VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU) on the container.
    fn set_iommu(&self, container: BorrowedFd<'_>) -> io::Result<()>;
    /// Registers the group with the KVM VFIO device (a no-op without one).
    fn kvm_add(&self, group: BorrowedFd<'_>) -> io::Result<()>;
    /// Unregisters the group from the KVM VFIO device (a no-op without one).
    fn kvm_del(&self, group: BorrowedFd<'_>) -> io::Result<()>;
    /// VFIO_GROUP_GET_DEVICE_FD for the device named `name`.
    fn device_fd(&self, group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd>;
}

/// The real kernel, with the VM's KVM VFIO pseudo device if any.
pub(crate) struct HostKernel {
    kvm_vfio: Option<DeviceFd>,
}

impl HostKernel {
    /// Calls the kernel; registers groups with `kvm_vfio` if given.
    pub(crate) fn new(kvm_vfio: Option<DeviceFd>) -> Self {
        Self { kvm_vfio }
    }

    fn kvm_file(&self, group: BorrowedFd<'_>, attr: u32) -> io::Result<()> {
        let Some(kvm) = &self.kvm_vfio else {
            return Ok(());
        };
        let fd: i32 = group.as_raw_fd();
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: u64::from(attr),
            addr: &fd as *const i32 as u64,
        };
        kvm.set_device_attr(&attr)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl GroupKernel for HostKernel {
    fn open_group(&self, group: u32) -> io::Result<OwnedFd> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(group_path(group))?;
        Ok(file.into())
    }

    fn group_node(&self, group: u32) -> io::Result<u64> {
        Ok(std::fs::metadata(group_path(group))?.rdev())
    }

    fn fd_node(&self, fd: BorrowedFd<'_>) -> io::Result<FdNode> {
        // Stat through a duplicate so the caller's fd is never closed by the `File`.
        let file = std::fs::File::from(fd.try_clone_to_owned()?);
        let meta = file.metadata()?;
        Ok(FdNode {
            is_char: meta.file_type().is_char_device(),
            rdev: meta.rdev(),
        })
    }

    fn group_flags(&self, group: BorrowedFd<'_>) -> io::Result<u32> {
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `status`, which is that large.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &group,
                nr::VFIO_GROUP_GET_STATUS(),
                &mut status,
            )
        })?;
        Ok(status.flags)
    }

    fn set_container(&self, group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()> {
        let fd: i32 = container.as_raw_fd();
        // SAFETY: the kernel reads one int (the container fd) from `fd`.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&group, nr::VFIO_GROUP_SET_CONTAINER(), &fd)
        })
        .map(drop)
    }

    fn unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: the ioctl takes no argument and touches no memory of ours.
        check(unsafe { vmm_sys_util::ioctl::ioctl(&group, nr::VFIO_GROUP_UNSET_CONTAINER()) })
            .map(drop)
    }

    fn set_iommu(&self, container: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: the argument is a plain integer (the IOMMU type); no memory is passed.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(
                &container,
                nr::VFIO_SET_IOMMU(),
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        })
        .map(drop)
    }

    fn kvm_add(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        self.kvm_file(group, KVM_DEV_VFIO_FILE_ADD)
    }

    fn kvm_del(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        self.kvm_file(group, KVM_DEV_VFIO_FILE_DEL)
    }

    fn device_fd(&self, group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
        // SAFETY: `name` is a NUL-terminated string the kernel only reads.
        let fd = check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_ptr(
                &group,
                nr::VFIO_GROUP_GET_DEVICE_FD(),
                name.as_ptr(),
            )
        })?;
        // SAFETY: on success the ioctl returns a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
