//! The device-side operations the passthrough model needs, behind a trait so the model can be
//! tested against a fake device; [`VfioBackend`] implements it over a VFIO device fd.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::EventFd;

use crate::container::DeviceAttachment;
use crate::layout::Mmappable;
use crate::legacy::VfioDevice;

/// What VFIO reports about one device region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (zero: the region is not implemented).
    pub size: u64,
    /// Whether the region can be read.
    pub readable: bool,
    /// Whether the region can be written.
    pub writable: bool,
    /// What may be mmapped.
    pub mmappable: Mmappable,
}

/// Operations on the host device. Region and IRQ indices are VFIO's
/// (`VFIO_PCI_*_REGION_INDEX`, `VFIO_PCI_*_IRQ_INDEX`).
pub trait DeviceBackend: Send {
    /// Information about region `index`, `None` if the device has no such region.
    fn region(&self, index: u32) -> Option<RegionInfo>;
    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` of region `index`.
    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Maps `size` bytes at `offset` of region `index` into our address space.
    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<MmapArea>;
    /// Number of interrupts of IRQ index `index` (zero if absent).
    fn irq_count(&self, index: u32) -> u32;
    /// Makes interrupts `0..fds.len()` of `index` signal `fds`.
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    /// Whether interrupts can be added to `index` while it is enabled
    /// ([`DeviceBackend::set_irq_trigger`]); when not, growing it means disabling it and
    /// enabling it again with more.
    fn irq_resizable(&self, index: u32) -> bool;
    /// Makes interrupt `vector` of the enabled index `index` signal `fd`, allocating it on the
    /// host if needed (only where [`DeviceBackend::irq_resizable`]).
    fn set_irq_trigger(&self, index: u32, vector: u32, fd: &EventFd) -> io::Result<()>;
    /// Disables all interrupts of `index`.
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// Sets the eventfd that unmasks INTx when signalled (KVM's resamplefd).
    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()>;
    /// Resets the device if it supports a function reset.
    fn reset(&self);
    /// Whether [`DeviceBackend::reset`] can reset the device (VFIO offers a reset).
    fn can_reset(&self) -> bool;
}

/// A shared, read-write mapping of device memory (or, in tests, anonymous memory). Unmapped on
/// drop.
#[derive(Debug)]
pub struct MmapArea {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only handed out as a raw
// address (for a KVM memory slot), never dereferenced by us, so moving it between threads is
// sound.
unsafe impl Send for MmapArea {}
// SAFETY: as above; `&MmapArea` only exposes the address and length.
unsafe impl Sync for MmapArea {}

impl MmapArea {
    fn map(fd: Option<RawFd>, offset: u64, len: u64, prot: i32) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let (flags, fd) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping at an address chosen by the kernel; it overlaps no Rust
        // object. The result is checked before use.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Self { addr, len })
    }

    /// Maps `len` bytes of `fd` at `offset`, shared.
    pub fn from_fd(fd: RawFd, offset: u64, len: u64, writable: bool) -> io::Result<Self> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        Self::map(Some(fd), offset, len, prot)
    }

    /// Maps `len` bytes of anonymous shared memory (for tests and fakes).
    pub fn anonymous(len: u64) -> io::Result<Self> {
        Self::map(None, 0, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Start of the mapping.
    pub fn addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Length of the mapping.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never: mappings are created non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` describe a mapping created by `map` and owned by this value.
        let ret = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        if ret != 0 {
            log::error!(
                "munmap of {:#x}+{:#x} failed: {}",
                self.addr(),
                self.len,
                io::Error::last_os_error()
            );
        }
    }
}

/// A VFIO device opened through a [`crate::Container`].
pub struct VfioBackend {
    // Declared before `_attachment` so the device fd closes before the container learns that
    // the device left.
    device: VfioDevice,
    _attachment: DeviceAttachment,
}

impl VfioBackend {
    /// Wraps an opened device and the container attachment that must outlive it.
    pub fn new(device: VfioDevice, attachment: DeviceAttachment) -> Self {
        Self {
            device,
            _attachment: attachment,
        }
    }

    fn region_size(&self, index: u32) -> u64 {
        self.device.region(index).map_or(0, |r| r.size)
    }

    fn bounds(&self, index: u32, offset: u64, len: usize) -> io::Result<u64> {
        let size = self.region_size(index);
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("access {offset:#x}+{len:#x} outside region {index} of {size:#x} bytes"),
            ));
        }
        self.device
            .region(index)
            .map_or(0, |r| r.offset)
            .checked_add(offset)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
    }
}

fn full_transfer(ret: isize, len: usize) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else if ret as usize != len {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short transfer: {ret} of {len} bytes"),
        ))
    } else {
        Ok(())
    }
}

impl DeviceBackend for VfioBackend {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        let raw = self.device.region(index)?;
        if raw.size == 0 && raw.flags == 0 {
            return None;
        }
        let mmappable = if raw.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            Mmappable::None
        } else if let Some(areas) = &raw.sparse {
            Mmappable::Sparse(areas.clone())
        } else {
            Mmappable::Whole
        };
        Some(RegionInfo {
            size: raw.size,
            readable: raw.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: raw.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmappable,
        })
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let pos = libc::off_t::try_from(self.bounds(index, offset, data.len())?)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `data` is a valid writable buffer of `data.len()` bytes; pread writes at most
        // that many.
        let ret =
            unsafe { libc::pread(self.device.fd(), data.as_mut_ptr().cast(), data.len(), pos) };
        full_transfer(ret, data.len())
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let pos = libc::off_t::try_from(self.bounds(index, offset, data.len())?)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `data` is a valid readable buffer of `data.len()` bytes; pwrite only reads it.
        let ret = unsafe { libc::pwrite(self.device.fd(), data.as_ptr().cast(), data.len(), pos) };
        full_transfer(ret, data.len())
    }

    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<MmapArea> {
        let pos = self.bounds(index, offset, usize::try_from(size).unwrap_or(usize::MAX))?;
        let writable = self
            .device
            .region(index)
            .is_some_and(|r| r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0);
        MmapArea::from_fd(self.device.fd(), pos, size, writable)
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.irq(index).map_or(0, |irq| irq.count)
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.device.enable_irq(index, &fds)
    }

    fn irq_resizable(&self, index: u32) -> bool {
        self.device.irq(index).is_some_and(|irq| !irq.noresize)
    }

    fn set_irq_trigger(&self, index: u32, vector: u32, fd: &EventFd) -> io::Result<()> {
        self.device.set_irq_trigger(index, vector, fd.as_raw_fd())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.device.disable_irq(index)
    }

    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()> {
        self.device.set_intx_unmask_fd(fd.as_raw_fd())
    }

    fn reset(&self) {
        self.device.reset();
    }

    fn can_reset(&self) -> bool {
        self.device.can_reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mapping_is_usable_and_unmapped_on_drop() {
        let area = MmapArea::anonymous(0x2000).unwrap();
        assert_eq!(area.len(), 0x2000);
        assert_ne!(area.addr(), 0);
    }

    #[test]
    fn empty_mapping_is_refused() {
        assert!(MmapArea::anonymous(0).is_err());
    }
}
