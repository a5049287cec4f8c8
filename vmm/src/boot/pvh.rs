//! The PVH start info (`hvm_start_info`), its module list and memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::{memory_map, BootError, Result};
use crate::machine::layout;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain-old-data repr(C) struct of integers; any byte pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModEntry(hvm_modlist_entry);
// SAFETY: plain-old-data repr(C) struct of integers; any byte pattern is valid.
unsafe impl ByteValued for ModEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: plain-old-data repr(C) struct of integers; any byte pattern is valid.
unsafe impl ByteValued for MemmapEntry {}

fn put<T: ByteValued>(mem: &GuestMemoryMmap, what: &'static str, addr: u64, v: T) -> Result<()> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, addr, source })
}

/// Writes the start info, the memory map after it and the initramfs module entry.
pub fn write(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>, rsdp: u64) -> Result<()> {
    let map = memory_map(mem);
    let entry_size = std::mem::size_of::<MemmapEntry>() as u64;
    for (i, e) in map.iter().enumerate() {
        put(
            mem,
            "PVH memory map",
            layout::PVH_MEMMAP_START + i as u64 * entry_size,
            MemmapEntry(hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.kind,
                reserved: 0,
            }),
        )?;
    }
    let modlist = layout::PVH_MEMMAP_START + map.len() as u64 * entry_size;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        put(
            mem,
            "PVH module list",
            modlist,
            ModEntry(hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            }),
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist;
    }
    put(
        mem,
        "PVH start info",
        layout::PVH_INFO_START,
        StartInfo(info),
    )
}
