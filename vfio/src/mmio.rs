//! Placing a passthrough device's BARs in the guest: direct mappings (KVM memory slots over the
//! mmapped device memory) and trapped ranges (bus devices forwarding to the device model).

use std::io;
use std::sync::{Arc, Mutex, Weak};

use rvmm_devices::{BusDevice, SharedBusDevice};
use thiserror::Error;

use crate::backend::MmapArea;
use crate::layout::Area;
use rvmm_devices::sync::MutexExt;

/// Which guest address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Memory space (the MMIO bus).
    Mmio,
    /// I/O port space (the PIO bus).
    Pio,
}

/// A guest memory slot created by [`GuestMmio::map_direct`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId(pub u32);

/// The VMM's guest address space, as the device model needs it.
pub trait GuestMmio: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `gpa` (a KVM user memory
    /// slot). `gpa`, `size` and `host_addr` are multiples of the host page size.
    ///
    /// # Safety
    ///
    /// The caller guarantees that `[host_addr, host_addr + size)` is a mapping that stays valid
    /// until [`GuestMmio::unmap_direct`] returned for the slot.
    unsafe fn map_direct(&self, gpa: u64, size: u64, host_addr: u64) -> io::Result<SlotId>;
    /// Removes a slot created by [`GuestMmio::map_direct`].
    fn unmap_direct(&self, slot: SlotId) -> io::Result<()>;
    /// Routes guest accesses to `[gpa, gpa + len)` of `space` to `device`. The bus keeps only a
    /// weak reference; the device model owns `device`.
    fn add_trapped(
        &self,
        space: AddressSpace,
        gpa: u64,
        len: u64,
        device: &SharedBusDevice,
    ) -> io::Result<()>;
    /// Removes the trapped range starting at `gpa` of `space`.
    fn remove_trapped(&self, space: AddressSpace, gpa: u64) -> io::Result<()>;
}

/// Errors of BAR placement.
#[derive(Debug, Error)]
pub enum MmioError {
    /// The BAR would wrap the address space.
    #[error("BAR {bar} of {size:#x} bytes cannot be placed at {gpa:#x}")]
    BadAddress {
        /// Region index of the BAR.
        bar: usize,
        /// Requested guest address.
        gpa: u64,
        /// Guest size of the BAR.
        size: u64,
    },
    /// The VMM refused a direct mapping.
    #[error("cannot map BAR {bar} area {gpa:#x}+{size:#x} into the guest")]
    MapDirect {
        /// Region index of the BAR.
        bar: usize,
        /// Guest address of the area.
        gpa: u64,
        /// Length of the area.
        size: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The VMM refused a trapped range.
    #[error("cannot trap BAR {bar} range {gpa:#x}+{size:#x}")]
    AddTrapped {
        /// Region index of the BAR.
        bar: usize,
        /// Guest address of the range.
        gpa: u64,
        /// Length of the range.
        size: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The device side of trapped accesses.
pub trait TrapHandler: Send {
    /// A guest read of `data.len()` bytes at `offset` of region `bar`.
    fn trap_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` of region `bar`.
    fn trap_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The bus device registered for one trapped range of a BAR.
pub struct TrapRange<T: TrapHandler> {
    target: Weak<Mutex<T>>,
    bar: usize,
    bar_offset: u64,
}

impl<T: TrapHandler> BusDevice for TrapRange<T> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(target) = self.target.upgrade() else {
            return;
        };
        let Some(offset) = self.bar_offset.checked_add(offset) else {
            return;
        };
        target.locked().trap_read(self.bar, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(target) = self.target.upgrade() else {
            return;
        };
        let Some(offset) = self.bar_offset.checked_add(offset) else {
            return;
        };
        target.locked().trap_write(self.bar, offset, data);
    }
}

/// One BAR (or the ROM) of the device and where it is currently placed in the guest.
pub struct BarMap {
    bar: usize,
    space: AddressSpace,
    size: u64,
    page_size: u64,
    direct: Vec<(Area, MmapArea)>,
    trapped: Vec<Area>,
    mapped_at: Option<u64>,
    slots: Vec<SlotId>,
    traps: Vec<(u64, SharedBusDevice)>,
}

impl BarMap {
    /// Describes region `bar` of guest size `size`: `direct` areas are backed by the given
    /// mappings, `trapped` areas by the device model.
    pub fn new(
        bar: usize,
        space: AddressSpace,
        size: u64,
        page_size: u64,
        direct: Vec<(Area, MmapArea)>,
        trapped: Vec<Area>,
    ) -> Self {
        Self {
            bar,
            space,
            size,
            page_size,
            direct,
            trapped,
            mapped_at: None,
            slots: Vec::new(),
            traps: Vec::new(),
        }
    }

    /// Region index.
    pub fn bar(&self) -> usize {
        self.bar
    }

    /// The address space the BAR decodes.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    /// Guest address the BAR is placed at, if placed.
    pub fn mapped_at(&self) -> Option<u64> {
        self.mapped_at
    }

    /// The directly mapped areas.
    pub fn direct_areas(&self) -> impl Iterator<Item = Area> + '_ {
        self.direct.iter().map(|(a, _)| *a)
    }

    /// Moves the BAR to `gpa` (or removes it from the guest for `None`). On error the BAR is left
    /// unplaced.
    pub fn place<T: TrapHandler + 'static>(
        &mut self,
        gpa: Option<u64>,
        mmio: &dyn GuestMmio,
        target: &Weak<Mutex<T>>,
    ) -> Result<(), MmioError> {
        if gpa == self.mapped_at {
            return Ok(());
        }
        self.unplace(mmio);
        let Some(gpa) = gpa else {
            return Ok(());
        };
        if gpa.checked_add(self.size).is_none() || self.size == 0 {
            return Err(MmioError::BadAddress {
                bar: self.bar,
                gpa,
                size: self.size,
            });
        }
        self.mapped_at = Some(gpa);
        let result = self.place_at(gpa, mmio, target);
        if result.is_err() {
            self.unplace(mmio);
        }
        result
    }

    fn place_at<T: TrapHandler + 'static>(
        &mut self,
        gpa: u64,
        mmio: &dyn GuestMmio,
        target: &Weak<Mutex<T>>,
    ) -> Result<(), MmioError> {
        // Direct mappings need a page-aligned guest address; otherwise trap the whole BAR.
        let aligned = self.space == AddressSpace::Mmio
            && self.page_size.is_power_of_two()
            && gpa % self.page_size == 0;
        let trapped = if aligned {
            for (area, mapping) in &self.direct {
                let area_gpa = gpa + area.offset;
                // SAFETY: `mapping` is owned by `self` and never unmapped while a slot over it
                // exists: `unplace` keeps slots it could not remove, and `Drop` leaks the mappings
                // of a BAR that still has slots.
                let slot = unsafe { mmio.map_direct(area_gpa, area.size, mapping.addr()) }
                    .map_err(|source| MmioError::MapDirect {
                        bar: self.bar,
                        gpa: area_gpa,
                        size: area.size,
                        source,
                    })?;
                self.slots.push(slot);
            }
            self.trapped.clone()
        } else {
            vec![Area::new(0, self.size)]
        };
        for area in trapped {
            let area_gpa = gpa + area.offset;
            let device: SharedBusDevice = Arc::new(Mutex::new(TrapRange {
                target: target.clone(),
                bar: self.bar,
                bar_offset: area.offset,
            }));
            mmio.add_trapped(self.space, area_gpa, area.size, &device)
                .map_err(|source| MmioError::AddTrapped {
                    bar: self.bar,
                    gpa: area_gpa,
                    size: area.size,
                    source,
                })?;
            self.traps.push((area_gpa, device));
        }
        Ok(())
    }

    /// Removes the BAR from the guest. Errors are logged: removal must run to the end.
    pub fn unplace(&mut self, mmio: &dyn GuestMmio) {
        let bar = self.bar;
        // A slot that cannot be removed stays recorded, so its host mapping is never unmapped
        // under it (see `Drop`).
        self.slots.retain(|slot| match mmio.unmap_direct(*slot) {
            Ok(()) => false,
            Err(e) => {
                log::error!("cannot remove memory slot {slot:?} of BAR {bar}: {e}");
                true
            }
        });
        for (gpa, _device) in self.traps.drain(..) {
            if let Err(e) = mmio.remove_trapped(self.space, gpa) {
                log::error!(
                    "cannot remove trapped range {gpa:#x} of BAR {}: {e}",
                    self.bar
                );
            }
        }
        self.mapped_at = None;
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        if !self.slots.is_empty() {
            // Unmapping memory a KVM slot still points at would let a later mapping at the same
            // address leak into the guest: keep it mapped instead.
            log::error!(
                "BAR {} dropped while mapped into the guest; leaking its mappings",
                self.bar
            );
            for (_, mapping) in self.direct.drain(..) {
                std::mem::forget(mapping);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeMmio, MmioOp};

    struct Echo(Vec<(usize, u64)>);

    impl TrapHandler for Echo {
        fn trap_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.0.push((bar, offset));
            data.fill(0xab);
        }
        fn trap_write(&mut self, bar: usize, offset: u64, _data: &[u8]) {
            self.0.push((bar, offset));
        }
    }

    fn bar_with_hole() -> BarMap {
        let direct = vec![(Area::new(0, 0x1000), MmapArea::anonymous(0x1000).unwrap())];
        BarMap::new(
            0,
            AddressSpace::Mmio,
            0x2000,
            0x1000,
            direct,
            vec![Area::new(0x1000, 0x1000)],
        )
    }

    #[test]
    fn placing_maps_direct_areas_and_traps_the_rest() {
        let mmio = FakeMmio::default();
        let target = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut map = bar_with_hole();
        map.place(Some(0xe000_0000), &mmio, &Arc::downgrade(&target))
            .unwrap();
        assert_eq!(
            mmio.ops(),
            [
                MmioOp::Map(0xe000_0000, 0x1000),
                MmioOp::Trap(0xe000_1000, 0x1000)
            ]
        );
    }

    #[test]
    fn trapped_access_reaches_the_handler_with_the_bar_offset() {
        let mmio = FakeMmio::default();
        let target = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut map = bar_with_hole();
        map.place(Some(0xe000_0000), &mmio, &Arc::downgrade(&target))
            .unwrap();
        let mut data = [0u8; 4];
        assert!(mmio.read(0xe000_1010, &mut data));
        assert_eq!(data, [0xab; 4]);
        assert_eq!(target.lock().unwrap().0, [(0, 0x1010)]);
    }

    #[test]
    fn moving_a_bar_removes_the_old_placement() {
        let mmio = FakeMmio::default();
        let target = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut map = bar_with_hole();
        map.place(Some(0xe000_0000), &mmio, &Arc::downgrade(&target))
            .unwrap();
        map.place(Some(0xf000_0000), &mmio, &Arc::downgrade(&target))
            .unwrap();
        assert!(mmio.live_slots() == [0xf000_0000]);
        assert_eq!(map.mapped_at(), Some(0xf000_0000));
        map.place(None, &mmio, &Arc::downgrade(&target)).unwrap();
        assert!(mmio.live_slots().is_empty());
        assert!(mmio.live_traps().is_empty());
    }

    #[test]
    fn unaligned_guest_address_traps_the_whole_bar() {
        let mmio = FakeMmio::default();
        let target = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut map = bar_with_hole();
        map.place(Some(0xe000_0800), &mmio, &Arc::downgrade(&target))
            .unwrap();
        assert_eq!(mmio.ops(), [MmioOp::Trap(0xe000_0800, 0x2000)]);
    }

    #[test]
    fn wrapping_address_is_refused() {
        let mmio = FakeMmio::default();
        let target = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut map = bar_with_hole();
        let err = map
            .place(Some(u64::MAX - 0xfff), &mmio, &Arc::downgrade(&target))
            .unwrap_err();
        assert!(matches!(err, MmioError::BadAddress { .. }));
        assert_eq!(map.mapped_at(), None);
    }

    #[test]
    fn refused_trap_undoes_the_direct_mapping() {
        let mmio = FakeMmio::default();
        mmio.fail_traps();
        let target = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut map = bar_with_hole();
        assert!(map
            .place(Some(0xe000_0000), &mmio, &Arc::downgrade(&target))
            .is_err());
        assert!(mmio.live_slots().is_empty());
        assert_eq!(map.mapped_at(), None);
    }
}
