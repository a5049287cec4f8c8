//! One VFIO device fd with the region and interrupt information read when it was opened.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_region_info, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_INTX_IRQ_INDEX,
};

use super::info::{
    encode_irq_set, parse_device_info, parse_irq_info, parse_region_info, region_info_needs,
    IrqInfo, RegionRaw,
};
use super::sys::{check, nr};
use super::{Result, VfioError};

/// What holds the groups devices belong to (the container): told when a device lets go of its
/// group.
pub(crate) trait GroupOwner: Send + Sync {
    /// Counts a device of `group` less; the group is released with its last device.
    fn release(&self, group: u32);
}

/// One device's share of an attached group; dropping it releases the group if it was the last.
pub(crate) struct GroupRef {
    pub(crate) owner: Arc<dyn GroupOwner>,
    pub(crate) group: u32,
}

impl Drop for GroupRef {
    fn drop(&mut self) {
        self.owner.release(self.group);
    }
}

/// A device fd and its group share, dropped in that order: the kernel refuses to detach a group
/// while one of its devices is open.
pub(crate) struct DeviceHandle {
    fd: OwnedFd,
    _group: GroupRef,
}

impl DeviceHandle {
    pub(crate) fn new(fd: OwnedFd, group: GroupRef) -> Self {
        Self { fd, _group: group }
    }
}

/// An open VFIO PCI device. Closing it (drop) releases its group if it was the group's last
/// open device.
pub struct VfioDevice {
    // Dropped first: the device fd, then the group share.
    handle: DeviceHandle,
    name: String,
    reset: bool,
    regions: Vec<RegionRaw>,
    irqs: Vec<IrqInfo>,
}

impl VfioDevice {
    /// Reads the device, region and interrupt information of the device behind `handle`.
    pub(crate) fn new(handle: DeviceHandle, name: &str) -> Result<Self> {
        let fd = handle.fd.as_fd();
        let mut raw = vfio_device_info {
            argsz: mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `raw`, which is that large.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &handle.fd,
                nr::VFIO_DEVICE_GET_INFO(),
                &mut raw,
            )
        })
        .map_err(|source| VfioError::DeviceInfo {
            device: name.to_owned(),
            source,
        })?;
        let info = parse_device_info(&raw).ok_or_else(|| VfioError::NotPci {
            device: name.to_owned(),
            flags: raw.flags,
            regions: raw.num_regions,
        })?;
        let regions = (0..info.regions)
            .map(|index| {
                region_info(fd, index).unwrap_or_else(|e| {
                    log::debug!("{name}: region {index} has no info: {e}");
                    RegionRaw::default()
                })
            })
            .collect();
        let irqs = (0..info.irqs)
            .map(|index| {
                irq_info(fd, index).unwrap_or_else(|e| {
                    log::debug!("{name}: interrupt index {index} has no info: {e}");
                    IrqInfo::default()
                })
            })
            .collect();
        Ok(Self {
            handle,
            name: name.to_owned(),
            reset: info.reset,
            regions,
            irqs,
        })
    }

    /// The device fd (for pread/pwrite/mmap at region offsets).
    pub fn fd(&self) -> RawFd {
        self.handle.fd.as_raw_fd()
    }

    /// The device name (its host PCI address).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the kernel reported about region `index` when the device was opened.
    pub fn region(&self, index: u32) -> Option<&RegionRaw> {
        self.regions.get(usize::try_from(index).ok()?)
    }

    /// What the kernel reported about interrupt index `index` when the device was opened.
    pub fn irq(&self, index: u32) -> Option<&IrqInfo> {
        self.irqs.get(usize::try_from(index).ok()?)
    }

    fn set_irqs(&self, words: &mut [u64]) -> io::Result<()> {
        // SAFETY: `words` is an 8-byte aligned `vfio_irq_set` whose argsz is at most its size
        // (see `encode_irq_set`); the kernel only reads it.
        check(unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(
                &self.handle.fd,
                nr::VFIO_DEVICE_SET_IRQS(),
                words.as_mut_ptr(),
            )
        })
        .map(drop)
    }

    /// Makes interrupts `0..fds.len()` of `index` signal the eventfds `fds`.
    pub fn enable_irq(&self, index: u32, fds: &[RawFd]) -> io::Result<()> {
        let count = u32::try_from(fds.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let available = self.irq(index).map_or(0, |irq| irq.count);
        if count == 0 || count > available {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{count} interrupts requested, index {index} has {available}"),
            ));
        }
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(&mut encode_irq_set(flags, index, 0, count, fds))
    }

    /// Makes interrupt `vector` of the enabled index `index` signal the eventfd `fd` (the
    /// kernel allocates the vector when the index supports dynamic allocation).
    pub fn set_irq_trigger(&self, index: u32, vector: u32, fd: RawFd) -> io::Result<()> {
        let available = self.irq(index).map_or(0, |irq| irq.count);
        if vector >= available {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interrupt {vector} requested, index {index} has {available}"),
            ));
        }
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(&mut encode_irq_set(flags, index, vector, 1, &[fd]))
    }

    /// Disables every interrupt of `index`.
    pub fn disable_irq(&self, index: u32) -> io::Result<()> {
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(&mut encode_irq_set(flags, index, 0, 0, &[]))
    }

    /// Makes a signal of `fd` unmask INTx (KVM's resamplefd).
    pub fn set_intx_unmask_fd(&self, fd: RawFd) -> io::Result<()> {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK;
        self.set_irqs(&mut encode_irq_set(
            flags,
            VFIO_PCI_INTX_IRQ_INDEX,
            0,
            1,
            &[fd],
        ))
    }

    /// Whether the device supports `VFIO_DEVICE_RESET` (the host kernel found a reset method).
    pub fn can_reset(&self) -> bool {
        self.reset
    }

    /// Resets the device if it supports VFIO_DEVICE_RESET; failures are logged.
    pub fn reset(&self) {
        if !self.reset {
            log::debug!("{}: no device reset available", self.name);
            return;
        }
        // SAFETY: the ioctl takes no argument and touches no memory of ours.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&self.handle.fd, nr::VFIO_DEVICE_RESET()) };
        if let Err(e) = check(ret) {
            log::warn!("{}: device reset failed: {e}", self.name);
        }
    }
}

/// VFIO_DEVICE_GET_REGION_INFO of region `index`, with its capabilities.
fn region_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<RegionRaw> {
    let base = mem::size_of::<vfio_region_info>();
    let mut words = query_region(fd, index, base)?;
    let mut bytes = to_bytes(&words);
    if let Some(needed) = region_info_needs(&bytes) {
        words = query_region(fd, index, needed)?;
        bytes = to_bytes(&words);
    }
    parse_region_info(&bytes).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
}

fn query_region(fd: BorrowedFd<'_>, index: u32, len: usize) -> io::Result<Vec<u64>> {
    let len = len.max(mem::size_of::<vfio_region_info>());
    let argsz = u32::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut words = vec![0u64; len.div_ceil(8)];
    let head = vfio_region_info {
        argsz,
        index,
        ..Default::default()
    };
    // SAFETY: `words` holds at least `size_of::<vfio_region_info>()` bytes and is 8-byte
    // aligned (the structure's alignment), so the write stays inside it.
    unsafe { words.as_mut_ptr().cast::<vfio_region_info>().write(head) };
    // SAFETY: the buffer starts with a `vfio_region_info` whose argsz is at most the buffer's
    // size; the kernel writes at most argsz bytes.
    check(unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ptr(
            &fd,
            nr::VFIO_DEVICE_GET_REGION_INFO(),
            words.as_mut_ptr(),
        )
    })?;
    Ok(words)
}

/// VFIO_DEVICE_GET_IRQ_INFO of interrupt index `index`.
fn irq_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfo> {
    let mut raw = vfio_irq_info {
        argsz: mem::size_of::<vfio_irq_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `raw`, which is that large.
    check(unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, nr::VFIO_DEVICE_GET_IRQ_INFO(), &mut raw)
    })?;
    Ok(parse_irq_info(&raw, index))
}

fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}
