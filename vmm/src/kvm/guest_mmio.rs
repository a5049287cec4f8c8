//! The guest physical address space as device models change it at runtime: KVM memory slots for
//! directly mapped device memory, and trapped ranges on the buses. Implements the VFIO device
//! model's [`GuestMmio`].

use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use rvmm_devices::sync::MutexExt;
use rvmm_devices::{Bus, SharedBusDevice};
use rvmm_vfio::mmio::{AddressSpace, GuestMmio, SlotId};

struct Slots {
    free: Vec<u32>,
    next: u32,
    /// Live slots: (slot, guest address, size).
    live: Vec<(u32, u64, u64)>,
}

/// Memory slots above the RAM slots, and the buses.
pub struct KvmGuestMmio {
    vm_fd: Arc<VmFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    max_slots: u32,
    slots: Mutex<Slots>,
}

impl KvmGuestMmio {
    /// `first_slot` is the first KVM slot not used by RAM; `max_slots` KVM's limit.
    pub fn new(
        vm_fd: Arc<VmFd>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        first_slot: u32,
        max_slots: u32,
    ) -> Self {
        Self {
            vm_fd,
            pio,
            mmio,
            max_slots,
            slots: Mutex::new(Slots {
                free: Vec::new(),
                next: first_slot,
                live: Vec::new(),
            }),
        }
    }

    /// Number of device memory slots in use.
    pub fn slots_in_use(&self) -> usize {
        self.slots.locked().live.len()
    }

    fn bus(&self, space: AddressSpace) -> &Bus {
        match space {
            AddressSpace::Mmio => &self.mmio,
            AddressSpace::Pio => &self.pio,
        }
    }
}

impl GuestMmio for KvmGuestMmio {
    unsafe fn map_direct(&self, gpa: u64, size: u64, host_addr: u64) -> io::Result<SlotId> {
        let mut s = self.slots.locked();
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None if s.next < self.max_slots => {
                s.next += 1;
                s.next - 1
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("all {} KVM memory slots are in use", self.max_slots),
                ))
            }
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped until unmap_direct.
        match unsafe { self.vm_fd.set_user_memory_region(region) } {
            Ok(()) => {
                s.live.push((slot, gpa, size));
                Ok(SlotId(slot))
            }
            Err(e) => {
                s.free.push(slot);
                Err(io::Error::from_raw_os_error(e.errno()))
            }
        }
    }

    fn unmap_direct(&self, slot: SlotId) -> io::Result<()> {
        let mut s = self.slots.locked();
        let Some(pos) = s.live.iter().position(|&(n, _, _)| n == slot.0) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("KVM memory slot {} is not mapped", slot.0),
            ));
        };
        let (n, gpa, _) = s.live[pos];
        let region = kvm_userspace_memory_region {
            slot: n,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.vm_fd.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        s.live.swap_remove(pos);
        s.free.push(n);
        Ok(())
    }

    fn add_trapped(
        &self,
        space: AddressSpace,
        gpa: u64,
        len: u64,
        device: &SharedBusDevice,
    ) -> io::Result<()> {
        self.bus(space)
            .insert(device, gpa, len)
            .map_err(|e| io::Error::new(io::ErrorKind::AlreadyExists, e))
    }

    fn remove_trapped(&self, space: AddressSpace, gpa: u64) -> io::Result<()> {
        self.bus(space)
            .remove(gpa)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))
    }
}
