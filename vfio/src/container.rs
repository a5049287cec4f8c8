//! The VM's VFIO container: one IOMMU domain every passthrough device of the VM shares, holding
//! the DMA mappings of guest RAM (IOVA = guest physical address).
//!
//! The IOMMU backend sits behind [`IommuBackend`] so a VFIO cdev/iommufd backend can replace the
//! legacy type1 container ([`Type1Iommu`]) later. [`Container`] keeps the list of RAM regions:
//! the kernel only accepts DMA mappings once a group is attached, and drops them all when the
//! last group leaves, so the regions are (re)mapped whenever the first device is attached.

use std::collections::BTreeMap;
use std::io;
use std::mem;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::{DeviceFd, VmFd};
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_info, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
};

use crate::legacy::{LegacyContainer, VfioDevice, VfioError};
use rvmm_devices::sync::MutexExt;

/// An IOVA range the IOMMU can translate (inclusive bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRange {
    /// First usable IOVA.
    pub start: u64,
    /// Last usable IOVA.
    pub end: u64,
}

/// What the IOMMU reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of supported IOMMU page sizes (zero if unknown).
    pub page_sizes: u64,
    /// The valid IOVA ranges, if the kernel reports them.
    pub iova_ranges: Option<Vec<IovaRange>>,
}

/// An IOMMU domain devices can be attached to.
pub trait IommuBackend: Send + Sync {
    /// Maps `[host_addr, host_addr + size)` for device DMA at `iova`.
    ///
    /// # Safety
    ///
    /// The host range must stay mapped (not unmapped or replaced) and pinned-able until
    /// [`IommuBackend::unmap_dma`] succeeded for it or the backend was dropped, and no Rust
    /// reference to it may exist while it is mapped (devices write it concurrently).
    unsafe fn map_dma(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()>;
    /// Removes the mapping at `iova` of `size` bytes.
    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<()>;
    /// Page sizes and valid IOVA ranges (meaningful once a device is attached).
    fn info(&self) -> io::Result<IommuInfo>;
    /// Opens the device at `sysfs_path` and attaches its group to this domain; `group`, if
    /// given, is a pre-opened fd of the device's group to use instead of opening the group node.
    fn open_device_with_group(
        &self,
        sysfs_path: &Path,
        group: Option<OwnedFd>,
    ) -> std::result::Result<VfioDevice, VfioError>;
    /// Opens the device at `sysfs_path` and attaches its group to this domain.
    fn open_device(&self, sysfs_path: &Path) -> std::result::Result<VfioDevice, VfioError> {
        self.open_device_with_group(sysfs_path, None)
    }
    /// Number of groups attached to this domain.
    fn attached_groups(&self) -> usize;
}

/// Errors of the container.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// The container cannot be opened, or lacks type1 v2 support.
    #[error("cannot set up the VM's VFIO container")]
    Open(#[source] VfioError),
    /// The KVM VFIO pseudo device cannot be created.
    #[error("cannot create the KVM VFIO device")]
    KvmDevice(#[source] kvm_ioctls::Error),
    /// A RAM region is empty or wraps the address space.
    #[error("invalid guest RAM region {gpa:#x}+{size:#x}")]
    InvalidRegion {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// A RAM region overlaps one already registered.
    #[error("guest RAM region {gpa:#x}+{size:#x} overlaps the registered region at {other:#x}")]
    Overlap {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// Start of the registered region.
        other: u64,
    },
    /// No RAM region starts at the address.
    #[error("no guest RAM region is registered at {gpa:#x}")]
    NotRegistered {
        /// Guest physical address.
        gpa: u64,
    },
    /// The IOMMU refused a mapping.
    #[error("cannot DMA-map guest RAM {gpa:#x}+{size:#x} (is RLIMIT_MEMLOCK large enough?)")]
    Map {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The IOMMU refused an unmapping.
    #[error("cannot DMA-unmap guest RAM {gpa:#x}+{size:#x}")]
    Unmap {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device cannot be opened through the container.
    #[error("cannot open VFIO device {path}")]
    OpenDevice {
        /// Sysfs path of the device.
        path: String,
        /// The error.
        #[source]
        source: VfioError,
    },
    /// The IOMMU information cannot be read.
    #[error("cannot query the IOMMU")]
    Info(#[source] io::Error),
}

/// Result of container operations.
pub type Result<T> = std::result::Result<T, ContainerError>;

/// Creates the KVM VFIO pseudo device (`KVM_DEV_TYPE_VFIO`) KVM uses to learn which groups the VM
/// owns (needed for coherent DMA and some interrupt paths).
pub fn create_kvm_vfio_device(vm: &VmFd) -> Result<DeviceFd> {
    let mut device = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    vm.create_device(&mut device)
        .map_err(ContainerError::KvmDevice)
}

/// The legacy VFIO type1 (v2) container.
pub struct Type1Iommu {
    container: Arc<LegacyContainer>,
}

impl Type1Iommu {
    /// Opens /dev/vfio/vfio. With `kvm_vfio` (see [`create_kvm_vfio_device`]) every attached
    /// group is registered with KVM.
    pub fn new(kvm_vfio: Option<DeviceFd>) -> Result<Self> {
        let container = LegacyContainer::open(kvm_vfio).map_err(ContainerError::Open)?;
        Ok(Self {
            container: Arc::new(container),
        })
    }

    /// Adopts a container fd (of /dev/vfio/vfio) opened by a privileged control plane. With
    /// `kvm_vfio` every attached group is registered with KVM.
    pub fn from_fd(container: OwnedFd, kvm_vfio: Option<DeviceFd>) -> Result<Self> {
        let container =
            LegacyContainer::from_fd(container, kvm_vfio).map_err(ContainerError::Open)?;
        Ok(Self {
            container: Arc::new(container),
        })
    }
}

fn word(buf: &[u8], offset: usize, len: usize) -> Option<u64> {
    let bytes = buf.get(offset..offset.checked_add(len)?)?;
    let mut value = [0u8; 8];
    value.get_mut(..len)?.copy_from_slice(bytes);
    Some(u64::from_le_bytes(value))
}

/// Decodes a `vfio_iommu_type1_info` buffer with its capability chain (as the kernel of a
/// little-endian host wrote it). Offsets are bounds-checked and the chain is walked once.
pub fn parse_iommu_info(buf: &[u8]) -> IommuInfo {
    let flags = word(buf, 4, 4).unwrap_or(0) as u32;
    let mut info = IommuInfo::default();
    if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        info.page_sizes = word(buf, 8, 8).unwrap_or(0);
    }
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return info;
    }
    let mut next = word(buf, 16, 4).unwrap_or(0) as usize;
    let mut visited = std::collections::BTreeSet::new();
    while next >= mem::size_of::<vfio_iommu_type1_info>() && visited.insert(next) {
        let (Some(id), Some(following)) = (word(buf, next, 2), word(buf, next + 4, 4)) else {
            break;
        };
        if id == u64::from(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
            let count = word(buf, next + 8, 4).unwrap_or(0) as usize;
            let mut ranges = Vec::new();
            for i in 0..count {
                let at = next + 16 + i * 16;
                match (word(buf, at, 8), word(buf, at + 8, 8)) {
                    (Some(start), Some(end)) if start <= end => {
                        ranges.push(IovaRange { start, end })
                    }
                    (Some(_), Some(_)) => {}
                    _ => break,
                }
            }
            info.iova_ranges = Some(ranges);
        }
        next = following as usize;
    }
    info
}

impl Type1Iommu {
    fn get_info(&self, buf: &mut [u64]) -> io::Result<()> {
        let argsz = u32::try_from(buf.len() * 8).map_err(|_| io::ErrorKind::InvalidInput)?;
        // `argsz` is the first u32 of the struct, `flags` (zero) the second.
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&argsz.to_ne_bytes());
        if let Some(first) = buf.first_mut() {
            *first = u64::from_ne_bytes(head);
        }
        self.container.iommu_info(buf)
    }
}

impl IommuBackend for Type1Iommu {
    unsafe fn map_dma(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        // SAFETY: the caller upholds the invariants documented on the trait, which are those of
        // `LegacyContainer::map_dma`.
        unsafe { self.container.map_dma(iova, size, host_addr) }
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<()> {
        self.container.unmap_dma(iova, size)
    }

    fn info(&self) -> io::Result<IommuInfo> {
        let words = mem::size_of::<vfio_iommu_type1_info>() / 8;
        let mut buf = vec![0u64; words];
        self.get_info(&mut buf)?;
        let head = buf.first().copied().unwrap_or(0).to_ne_bytes();
        let needed = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if needed > words * 8 {
            buf = vec![0u64; needed.div_ceil(8)];
            self.get_info(&mut buf)?;
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(parse_iommu_info(&bytes))
    }

    fn open_device_with_group(
        &self,
        sysfs_path: &Path,
        group: Option<OwnedFd>,
    ) -> std::result::Result<VfioDevice, VfioError> {
        self.container.open_device(sysfs_path, group)
    }

    fn attached_groups(&self) -> usize {
        self.container.attached_groups()
    }
}

#[derive(Clone, Copy, Debug)]
struct RamRegion {
    size: u64,
    host_addr: u64,
}

#[derive(Default)]
struct State {
    regions: BTreeMap<u64, RamRegion>,
    devices: usize,
    mapped: bool,
}

/// The VM's IOMMU domain and the guest RAM mapped into it.
pub struct Container {
    backend: Box<dyn IommuBackend>,
    state: Mutex<State>,
}

/// Proof that a device is attached to a [`Container`]; dropping it detaches the device (after the
/// device fd is closed).
pub struct DeviceAttachment {
    container: Arc<Container>,
}

impl Drop for DeviceAttachment {
    fn drop(&mut self) {
        let mut state = self.container.lock();
        state.devices = state.devices.saturating_sub(1);
        if state.devices == 0 {
            // The last group left the container: the kernel dropped its IOMMU domain.
            state.mapped = false;
        }
    }
}

impl Container {
    /// Creates a container over `backend`.
    pub fn new(backend: Box<dyn IommuBackend>) -> Arc<Self> {
        Arc::new(Self {
            backend,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Registers guest RAM `[gpa, gpa + size)` backed by host memory at `host_addr` and maps it
    /// for DMA now if a device is attached (else when the first one is).
    ///
    /// # Safety
    ///
    /// The host range must be a private mapping of this process that stays mapped, unmoved and
    /// unreplaced until [`Container::unmap_guest_ram`] returned for `gpa` or the container is
    /// dropped; devices read and write it at any time, so the VMM must access it only through
    /// raw pointers or volatile accesses (as guest memory is anyway), never through references.
    pub unsafe fn map_guest_ram(&self, gpa: u64, size: u64, host_addr: u64) -> Result<()> {
        if size == 0 || gpa.checked_add(size).is_none() || host_addr.checked_add(size).is_none() {
            return Err(ContainerError::InvalidRegion { gpa, size });
        }
        let mut state = self.lock();
        let end = gpa + size;
        if let Some((&other, r)) = state.regions.range(..end).next_back() {
            if other + r.size > gpa {
                return Err(ContainerError::Overlap { gpa, size, other });
            }
        }
        if state.mapped {
            // SAFETY: the caller guarantees the invariants of `map_dma` for this range.
            unsafe { self.backend.map_dma(gpa, size, host_addr) }
                .map_err(|source| ContainerError::Map { gpa, size, source })?;
        }
        state.regions.insert(gpa, RamRegion { size, host_addr });
        Ok(())
    }

    /// Unregisters (and unmaps) the RAM region starting at `gpa`.
    pub fn unmap_guest_ram(&self, gpa: u64) -> Result<()> {
        let mut state = self.lock();
        let region = *state
            .regions
            .get(&gpa)
            .ok_or(ContainerError::NotRegistered { gpa })?;
        if state.mapped {
            self.backend
                .unmap_dma(gpa, region.size)
                .map_err(|source| ContainerError::Unmap {
                    gpa,
                    size: region.size,
                    source,
                })?;
        }
        state.regions.remove(&gpa);
        Ok(())
    }

    /// Page sizes and valid IOVA ranges of the IOMMU (only known while a device is attached).
    pub fn info(&self) -> Result<IommuInfo> {
        self.backend.info().map_err(ContainerError::Info)
    }

    /// Bytes of guest RAM mapped for DMA now (all registered RAM while a device is attached,
    /// else none).
    pub fn mapped_bytes(&self) -> u64 {
        let state = self.lock();
        if !state.mapped {
            return 0;
        }
        state
            .regions
            .values()
            .fold(0u64, |a, r| a.saturating_add(r.size))
    }

    /// Number of attached devices.
    pub fn attached_devices(&self) -> usize {
        self.lock().devices
    }

    /// Number of VFIO groups attached (a group stays attached while one of its devices is open).
    pub fn attached_groups(&self) -> usize {
        self.backend.attached_groups()
    }

    /// Opens the device at `sysfs_path` into this container, mapping guest RAM if it is the
    /// first device.
    pub fn open_device(
        self: &Arc<Self>,
        sysfs_path: &Path,
    ) -> Result<(VfioDevice, DeviceAttachment)> {
        self.open_device_with_group(sysfs_path, None)
    }

    /// Like [`Container::open_device`], with `group`, if given, a pre-opened fd of the device's
    /// VFIO group (from a privileged control plane) used instead of opening `/dev/vfio/<group>`.
    /// The fd must be that group's; if the group is attached already, the fd is just closed.
    pub fn open_device_with_group(
        self: &Arc<Self>,
        sysfs_path: &Path,
        group: Option<OwnedFd>,
    ) -> Result<(VfioDevice, DeviceAttachment)> {
        let mut state = self.lock();
        let device = self
            .backend
            .open_device_with_group(sysfs_path, group)
            .map_err(|source| ContainerError::OpenDevice {
                path: sysfs_path.display().to_string(),
                source,
            })?;
        self.map_all(&mut state)?;
        state.devices += 1;
        drop(state);
        Ok((
            device,
            DeviceAttachment {
                container: self.clone(),
            },
        ))
    }

    /// Records an attachment without opening a device (tests only: a real IOMMU accepts
    /// mappings only once a device's group is attached).
    #[cfg(test)]
    fn attach(self: &Arc<Self>) -> Result<DeviceAttachment> {
        let mut state = self.lock();
        self.map_all(&mut state)?;
        state.devices += 1;
        Ok(DeviceAttachment {
            container: self.clone(),
        })
    }

    fn map_all(&self, state: &mut State) -> Result<()> {
        if state.mapped {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut done = Vec::new();
        for (&gpa, region) in &state.regions {
            // SAFETY: `map_guest_ram`'s caller guaranteed the invariants for every registered
            // region until it is unregistered or the container dropped.
            let mapped = unsafe { self.backend.map_dma(gpa, region.size, region.host_addr) };
            if let Err(source) = mapped {
                for (gpa, size) in done {
                    if let Err(e) = self.backend.unmap_dma(gpa, size) {
                        log::error!("cannot undo DMA mapping {gpa:#x}+{size:#x}: {e}");
                    }
                }
                return Err(ContainerError::Map {
                    gpa,
                    size: region.size,
                    source,
                });
            }
            done.push((gpa, region.size));
        }
        state.mapped = true;
        let bytes: u64 = done.iter().map(|&(_, size)| size).sum();
        log::info!(
            "DMA-mapped {} MiB of guest RAM in {} regions in {:?}",
            bytes >> 20,
            done.len(),
            started.elapsed()
        );
        Ok(())
    }
}

#[cfg(test)]
#[path = "container_tests.rs"]
mod tests;
