//! The legacy VFIO container: its fd, its groups, DMA mapping and the IOMMU information.

use std::ffi::{CStr, CString};
use std::io;
use std::mem;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::DeviceFd;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
};

use super::device_fd::{DeviceHandle, GroupOwner, GroupRef, VfioDevice};
use super::group::Groups;
use super::sys::{check, nr, GroupKernel, HostKernel};
use super::{Result, VfioError};
use rvmm_devices::sync::MutexExt;

const CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// Checks what a container fd answered to VFIO_GET_API_VERSION and
/// VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU).
pub fn check_container(version: i32, type1v2: i32) -> Result<()> {
    if i64::from(version) != i64::from(VFIO_API_VERSION) {
        return Err(VfioError::ApiVersion { version });
    }
    if type1v2 <= 0 {
        return Err(VfioError::NoType1v2);
    }
    Ok(())
}

/// A VFIO container (`/dev/vfio/vfio`) with the type1 v2 IOMMU and its attached groups.
pub struct LegacyContainer {
    fd: OwnedFd,
    groups: Mutex<Groups>,
}

impl LegacyContainer {
    /// Opens `/dev/vfio/vfio`. With `kvm_vfio`, every attached group is registered with KVM.
    pub fn open(kvm_vfio: Option<DeviceFd>) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTAINER_PATH)
            .map_err(|source| VfioError::OpenContainer {
                path: CONTAINER_PATH,
                source,
            })?;
        Self::from_fd(file.into(), kvm_vfio)
    }

    /// Adopts a container fd opened by someone else (a privileged control plane), after
    /// checking its API version and type1 v2 support.
    pub fn from_fd(fd: OwnedFd, kvm_vfio: Option<DeviceFd>) -> Result<Self> {
        // SAFETY: the ioctl takes no argument and touches no memory of ours.
        let version = check(unsafe { vmm_sys_util::ioctl::ioctl(&fd, nr::VFIO_GET_API_VERSION()) })
            .map_err(VfioError::NotAContainer)?;
        // SAFETY: the argument is a plain integer (the IOMMU type); no memory is passed.
        let type1v2 = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(
                &fd,
                nr::VFIO_CHECK_EXTENSION(),
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        };
        check_container(version, type1v2)?;
        Ok(Self::with_kernel(fd, Box::new(HostKernel::new(kvm_vfio))))
    }

    /// A container over `fd` whose group calls go to `kernel`.
    pub(crate) fn with_kernel(fd: OwnedFd, kernel: Box<dyn GroupKernel>) -> Self {
        Self {
            fd,
            groups: Mutex::new(Groups::new(kernel)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Groups> {
        self.groups.locked()
    }

    /// Number of groups attached (each holding at least one open device).
    pub fn attached_groups(&self) -> usize {
        self.lock().len()
    }

    /// Opens the device at `sysfs_path` (`/sys/bus/pci/devices/<bdf>`), attaching its group
    /// first if no device of it is open; `group`, if given, is a pre-opened fd of that group
    /// (checked to be it), used instead of opening `/dev/vfio/<group>`.
    pub fn open_device(
        self: &Arc<Self>,
        sysfs_path: &Path,
        group: Option<OwnedFd>,
    ) -> Result<VfioDevice> {
        let device = sysfs_path.display().to_string();
        let link = std::fs::read_link(sysfs_path.join("iommu_group")).map_err(|source| {
            VfioError::GroupOf {
                device: device.clone(),
                source,
            }
        })?;
        let group_id = link
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| VfioError::GroupOf {
                device: device.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("invalid group link {}", link.display()),
                ),
            })?;
        let name = sysfs_path
            .file_name()
            .and_then(|n| CString::new(n.as_bytes()).ok())
            .ok_or_else(|| VfioError::DeviceName {
                device: device.clone(),
            })?;
        let handle = self.attach_device(group_id, &name, group)?;
        VfioDevice::new(handle, &name.to_string_lossy())
    }

    /// Gets the fd of device `name` of group `group`, attaching the group if needed.
    pub(crate) fn attach_device(
        self: &Arc<Self>,
        group: u32,
        name: &CStr,
        preopened: Option<OwnedFd>,
    ) -> Result<DeviceHandle> {
        let device = name.to_string_lossy().into_owned();
        let mut groups = self.lock();
        groups.acquire(self.fd.as_fd(), group, preopened, &device)?;
        match groups.device_fd(group, name) {
            Ok(fd) => Ok(DeviceHandle::new(
                fd,
                GroupRef {
                    owner: self.clone(),
                    group,
                },
            )),
            Err(source) => {
                groups.release(group);
                Err(VfioError::GetDeviceFd {
                    device,
                    group,
                    source,
                })
            }
        }
    }

    /// Maps `[host_addr, host_addr + size)` for device DMA at `iova`.
    ///
    /// # Safety
    ///
    /// The host range must stay mapped until unmapped here or the container is closed, and no
    /// Rust reference to it may exist while it is mapped (devices write it concurrently).
    pub unsafe fn map_dma(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let map = vfio_iommu_type1_dma_map {
            argsz: mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: host_addr,
            iova,
            size,
        };
        // SAFETY: the kernel reads `map` only; the caller guarantees the mapped range's
        // invariants.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, nr::VFIO_IOMMU_MAP_DMA(), &map)
        })
        .map(drop)
    }

    /// Removes the mapping at `iova` of `size` bytes.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<()> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: the kernel reads `unmap` and writes back its `size` (no dirty bitmap is
        // requested, so nothing past the structure).
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &self.fd,
                nr::VFIO_IOMMU_UNMAP_DMA(),
                &mut unmap,
            )
        })?;
        if unmap.size != size {
            return Err(io::Error::other(format!(
                "unmapped {:#x} of {size:#x} bytes at {iova:#x}",
                unmap.size
            )));
        }
        Ok(())
    }

    /// VFIO_IOMMU_GET_INFO into `buf`, whose first u32 must be `argsz` (the buffer size).
    pub(crate) fn iommu_info(&self, buf: &mut [u64]) -> io::Result<()> {
        // SAFETY: the buffer is 8-byte aligned, starts with its size as argsz, and the kernel
        // writes at most argsz bytes into it.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(
                &self.fd,
                nr::VFIO_IOMMU_GET_INFO(),
                buf.as_mut_ptr(),
            )
        })
        .map(drop)
    }
}

impl GroupOwner for LegacyContainer {
    /// Called when a [`GroupRef`] is dropped.
    fn release(&self, group: u32) {
        self.lock().release(group);
    }
}

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
