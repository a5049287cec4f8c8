//! The address bus that vCPU exits are dispatched on.
//!
//! One [`Bus`] serves port I/O and one serves MMIO. Devices are registered over an address range;
//! the bus keeps only [`Weak`] references, the device manager owns the devices. Unplugging a device
//! is dropping its strong reference and removing its ranges; a vCPU racing with the removal simply
//! fails to upgrade the reference and treats the access as unclaimed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::sync::{MutexExt, RwLockExt};
use thiserror::Error;

/// A device that answers reads and writes on a [`Bus`].
///
/// `base` is the start of the range the access hit (as registered), `offset` the distance from it.
/// Implementations must tolerate any `offset` inside the registered length and any access size:
/// an access they do not understand is logged and ignored, and reads of such leave `data` zeroed.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Writes `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between its owner and the bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus registration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero or one that wraps the address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range overlaps one already registered.
    #[error(
        "bus range {base:#x}+{len:#x} overlaps the registered range {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the range it overlaps.
        other_base: u64,
        /// Length of the range it overlaps.
        other_len: u64,
    },
    /// No range starts at the given base.
    #[error("no device is registered at {base:#x}")]
    NotFound {
        /// The base that was looked up.
        base: u64,
    },
}

/// Result type of bus operations.
pub type Result<T> = std::result::Result<T, BusError>;

struct Entry {
    len: u64,
    device: Weak<Mutex<dyn BusDevice>>,
}

/// An address bus: ranges mapped to devices. Read-mostly: vCPUs take the read lock on every
/// access, hotplug takes the write lock to change the map.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` over `[base, base + len)`.
    pub fn insert(&self, device: &SharedBusDevice, base: u64, len: u64) -> Result<()> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let mut ranges = self.ranges.write_locked();
        // The range starting at or before `base + len - 1` with the highest start is the only one
        // that can overlap from below; any range starting inside ours overlaps too.
        if let Some((&other_base, other)) = ranges.range(..=base + (len - 1)).next_back() {
            if other_base + (other.len - 1) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(
            base,
            Entry {
                len,
                device: Arc::downgrade(device),
            },
        );
        Ok(())
    }

    /// Removes the range starting at `base`.
    pub fn remove(&self, base: u64) -> Result<()> {
        let mut ranges = self.ranges.write_locked();
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound { base })
    }

    /// Finds the device whose range holds `addr`: (range base, device).
    fn resolve(&self, addr: u64) -> Option<(u64, SharedBusDevice)> {
        let ranges = self.ranges.read_locked();
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        if addr - base >= entry.len {
            return None;
        }
        entry.device.upgrade().map(|d| (base, d))
    }

    /// Dispatches a read. Returns false (and leaves `data` untouched) when nothing claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.locked().read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when nothing claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.locked().write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn device() -> (Arc<Mutex<Recorder>>, SharedBusDevice) {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let shared: SharedBusDevice = d.clone();
        (d, shared)
    }

    #[test]
    fn access_reaches_device_with_offset() {
        let bus = Bus::new();
        let (rec, dev) = device();
        bus.insert(&dev, 0x100, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x105, &mut buf));
        assert_eq!(buf, [5, 5]);
        assert!(bus.write(0x10f, &[7]));
        assert_eq!(rec.lock().unwrap().last, Some((0x100, 0xf, vec![7])));
    }

    #[test]
    fn access_outside_ranges_is_unclaimed() {
        let bus = Bus::new();
        let (_rec, dev) = device();
        bus.insert(&dev, 0x100, 0x10).unwrap();
        let mut buf = [0u8; 1];
        assert!(!bus.read(0x110, &mut buf));
        assert!(!bus.read(0xff, &mut buf));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let bus = Bus::new();
        let (_rec, dev) = device();
        bus.insert(&dev, 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(&dev, 0x10f, 1),
            Err(BusError::Overlap {
                other_base: 0x100,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(&dev, 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(&dev, 0x110, 1).is_ok());
        assert!(bus.insert(&dev, 0xf0, 0x10).is_ok());
    }

    #[test]
    fn invalid_ranges_are_refused() {
        let bus = Bus::new();
        let (_rec, dev) = device();
        assert!(matches!(
            bus.insert(&dev, 0, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(&dev, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(bus.insert(&dev, u64::MAX, 1).is_ok());
    }

    #[test]
    fn dropped_device_is_unclaimed() {
        let bus = Bus::new();
        let (rec, dev) = device();
        bus.insert(&dev, 0x100, 0x10).unwrap();
        drop(rec);
        drop(dev);
        assert!(!bus.write(0x100, &[1]));
    }

    #[test]
    fn removed_range_is_unclaimed() {
        let bus = Bus::new();
        let (_rec, dev) = device();
        bus.insert(&dev, 0x100, 0x10).unwrap();
        bus.remove(0x100).unwrap();
        assert!(!bus.write(0x100, &[1]));
        assert_eq!(bus.remove(0x100), Err(BusError::NotFound { base: 0x100 }));
    }
}
