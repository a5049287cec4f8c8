//! Loading a Linux kernel into guest memory: bzImage (64-bit boot protocol) or ELF vmlinux (PVH).
//!
//! The kind of image is detected from its first bytes, never from the file name.

mod e820;
mod pvh;
mod zero_page;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

pub use e820::{memory_map, E820Entry, E820_RAM, E820_RESERVED};

use crate::machine::layout;

/// Errors of kernel loading.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}")]
    KernelRead {
        /// The file given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF executable.
    #[error(
        "{path} is not a Linux kernel: expected a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux"
    )]
    NotAKernel {
        /// The file given.
        path: PathBuf,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {reason}")]
    Load {
        /// The file given.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// An ELF kernel without the PVH entry note.
    #[error("ELF kernel {path} has no PVH entry point (build it with CONFIG_PVH=y, or boot its bzImage)")]
    NoPvhEntry {
        /// The file given.
        path: PathBuf,
    },
    /// The bzImage is too old for the 64-bit boot protocol.
    #[error(
        "bzImage {path} uses boot protocol {version:#x}; rvmm needs 2.12 or later (Linux 3.8+)"
    )]
    OldBootProtocol {
        /// The file given.
        path: PathBuf,
        /// The protocol version in its header.
        version: u16,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        /// The file given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest RAM below 4 GiB above the kernel.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory; give the VM more memory"
    )]
    InitramfsTooLarge {
        /// The file given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {max} are supported")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory at {addr:#x}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of boot loading.
pub type Result<T> = std::result::Result<T, BootError>;

/// What a loaded kernel needs from the vCPU setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit boot protocol: long mode, `rip` = entry, `rsi` = zero page.
    Linux64 {
        /// The 64-bit entry address.
        entry: u64,
        /// The zero page.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode without paging, `rip` = entry, `rbx` = start info.
    Pvh {
        /// The PVH entry address.
        entry: u64,
        /// The `hvm_start_info` structure.
        start_info: u64,
    },
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSource<'a> {
    /// Kernel image (bzImage or ELF).
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest address of the RSDP.
    pub rsdp: u64,
}

enum ImageKind {
    BzImage,
    Elf,
}

fn detect(file: &mut File, path: &Path) -> Result<ImageKind> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x206];
    let len = file.metadata().map_err(read_err)?.len();
    let n = (len as usize).min(head.len());
    file.read_exact(&mut head[..n]).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(ImageKind::Elf);
    }
    // The setup header magic "HdrS" at 0x202 and the boot flag 0xAA55 at 0x1fe.
    if n == head.len() && head[0x202..0x206] == *b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa] {
        return Ok(ImageKind::BzImage);
    }
    Err(BootError::NotAKernel {
        path: path.to_owned(),
    })
}

/// Loads kernel, initramfs and command line, writes the boot structures (zero page or PVH start
/// info with the memory map) and returns where the vCPU starts.
pub fn load(mem: &GuestMemoryMmap, src: &BootSource) -> Result<EntryPoint> {
    let path = src.kernel;
    let mut file = File::open(path).map_err(|source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    })?;
    let cmdline = src.cmdline.as_bytes();
    if cmdline.len() + 1 > layout::CMDLINE_MAX_SIZE || cmdline.contains(&0) {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut cmdline_bytes = cmdline.to_vec();
    cmdline_bytes.push(0);
    write(mem, "command line", layout::CMDLINE_START, &cmdline_bytes)?;
    match detect(&mut file, path)? {
        ImageKind::BzImage => load_bzimage(mem, src, &mut file),
        ImageKind::Elf => load_pvh_elf(mem, src, &mut file),
    }
}

/// The error of linux-loader for the kernel at `path`.
fn load_error(path: &Path) -> impl Fn(linux_loader::loader::Error) -> BootError + '_ {
    move |e| BootError::Load {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// A bzImage through the 64-bit boot protocol: kernel at 16 MiB, initramfs below its
/// `initrd_addr_max`, the zero page with the command line, E820 map and RSDP.
fn load_bzimage(mem: &GuestMemoryMmap, src: &BootSource, file: &mut File) -> Result<EntryPoint> {
    let path = src.kernel;
    let res = BzImage::load(
        mem,
        Some(GuestAddress(layout::KERNEL_START)),
        file,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(load_error(path))?;
    let hdr = res.setup_header.ok_or_else(|| BootError::NotAKernel {
        path: path.to_owned(),
    })?;
    if hdr.version < 0x020c {
        return Err(BootError::OldBootProtocol {
            path: path.to_owned(),
            version: hdr.version,
        });
    }
    let initrd = match src.initramfs {
        Some(p) => Some(load_initramfs(
            mem,
            p,
            res.kernel_end,
            u64::from(hdr.initrd_addr_max),
        )?),
        None => None,
    };
    zero_page::write(mem, hdr, src.cmdline.len(), initrd, src.rsdp)?;
    Ok(EntryPoint::Linux64 {
        // The 64-bit entry is 0x200 past the start of the protected-mode kernel.
        entry: res.kernel_load.raw_value() + 0x200,
        zero_page: layout::ZERO_PAGE_START,
    })
}

/// An ELF vmlinux through its PVH note: `hvm_start_info` with the memory map, the initramfs
/// module and the RSDP.
fn load_pvh_elf(mem: &GuestMemoryMmap, src: &BootSource, file: &mut File) -> Result<EntryPoint> {
    let path = src.kernel;
    let res = Elf::load(
        mem,
        None,
        file,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(load_error(path))?;
    let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
        return Err(BootError::NoPvhEntry {
            path: path.to_owned(),
        });
    };
    let initrd = match src.initramfs {
        Some(p) => Some(load_initramfs(mem, p, res.kernel_end, u64::from(u32::MAX))?),
        None => None,
    };
    pvh::write(mem, initrd, src.rsdp)?;
    Ok(EntryPoint::Pvh {
        entry: entry.raw_value(),
        start_info: layout::PVH_INFO_START,
    })
}

/// Places the initramfs at the top of RAM below `max_addr` (and below 4 GiB), page aligned,
/// above `kernel_end`. Returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<(u64, u64)> {
    let data = std::fs::read(path).map_err(|source| BootError::InitramfsRead {
        path: path.to_owned(),
        source,
    })?;
    let size = data.len() as u64;
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_owned(),
        size,
    };
    // Highest RAM byte below the 32-bit hole.
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&end| end <= layout::MMIO32_HOLE_START)
        .max()
        .ok_or_else(too_large)?;
    let top = low_end.min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(layout::HIGH_MEMORY_START) {
        return Err(too_large());
    }
    write(mem, "initramfs", addr, &data)?;
    Ok((addr, size))
}

fn write(mem: &GuestMemoryMmap, what: &'static str, addr: u64, data: &[u8]) -> Result<()> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, addr, source })
}
