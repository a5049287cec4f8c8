//! The guest's physical memory map, shared by the zero page (E820) and PVH (memmap).

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::machine::layout;

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved (ACPI tables, ECAM).
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// Builds the memory map from the guest RAM regions: the first 640 KiB and the RAM above 1 MiB
/// as usable, the ACPI area and the ECAM as reserved.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start < layout::HIGH_MEMORY_START {
            // Real-mode RAM, then the legacy hole where the ACPI tables and the reset vector
            // live.
            map.push(E820Entry {
                addr: start,
                size: 0xA_0000 - start,
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: layout::ACPI_START,
                size: layout::HIGH_MEMORY_START - layout::ACPI_START,
                kind: E820_RESERVED,
            });
            if end > layout::HIGH_MEMORY_START {
                map.push(E820Entry {
                    addr: layout::HIGH_MEMORY_START,
                    size: end - layout::HIGH_MEMORY_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map.push(E820Entry {
        addr: layout::PCI_ECAM_START,
        size: layout::PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}
