//! The zero page (`boot_params`) of the Linux x86 boot protocol.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{memory_map, BootError, Result};
use crate::machine::layout;

/// `type_of_loader`: undefined boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the heap end pointer is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// Magic of the boot flag.
const BOOT_FLAG: u16 = 0xaa55;
/// Magic of the header.
const HDRS_MAGIC: u32 = 0x5372_6448;

/// Writes the zero page for a loaded bzImage.
pub fn write(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = initrd {
        // Both fit in 32 bits: the initramfs is placed below the 32-bit hole.
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = memory_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    // The map has at most a handful of entries; the table holds 128.
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            addr: layout::ZERO_PAGE_START,
            source,
        })
}
