//! Registers, segments, boot page tables, FPU, MSRs and LAPIC of a vCPU at boot.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{CpuError, Result};
use crate::boot::EntryPoint;
use crate::machine::layout;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PDE_PRESENT_RW: u64 = 0x3;
const PDE_PS: u64 = 0x80;

/// A GDT entry from flags, base and limit (the classic packed layout).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment for GDT entry `entry` at `index`.
fn segment(entry: u64, index: u8) -> kvm_segment {
    let flag = |shift: u32, bits: u64| ((entry >> shift) & bits) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = flag(55, 1);
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g,
        avl: flag(52, 1),
        unusable: if flag(47, 1) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn guest_write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    v: T,
) -> Result<()> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| CpuError::GuestWrite { what, source })
}

/// Identity-maps the first 4 GiB with 2 MiB pages for the 64-bit boot protocol.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    guest_write(
        mem,
        "PML4",
        layout::PML4_START,
        layout::PDPTE_START | PDE_PRESENT_RW,
    )?;
    for i in 0..4u64 {
        let pd = layout::PDE_START + i * 0x1000;
        guest_write(
            mem,
            "PDPTE",
            layout::PDPTE_START + i * 8,
            pd | PDE_PRESENT_RW,
        )?;
        for j in 0..512u64 {
            let addr = ((i << 9) + j) << 21;
            guest_write(mem, "PDE", pd + j * 8, addr | PDE_PRESENT_RW | PDE_PS)?;
        }
    }
    Ok(())
}

/// Sets segments, control registers (and for the 64-bit protocol page tables) and general
/// registers so the vCPU starts at the kernel's entry point. Application processors only get
/// their segments reset: they wait for INIT/SIPI.
pub fn configure_registers(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    cpu: u8,
) -> Result<()> {
    let kvm = |what: &'static str| move |source| CpuError::Kvm { cpu, what, source };
    if cpu != 0 {
        return Ok(());
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let (code_flags, data_flags) = match entry {
        EntryPoint::Linux64 { .. } => (0xa09b, 0xc093),
        EntryPoint::Pvh { .. } => (0xc09b, 0xc093),
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(data_flags, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        guest_write(mem, "GDT", layout::BOOT_GDT_START + i as u64 * 8, *e)?;
    }
    guest_write(mem, "IDT", layout::BOOT_IDT_START, 0u64)?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64 { entry, zero_page } => {
            write_page_tables(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
        EntryPoint::Pvh { entry, start_info } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// x87 control word and MXCSR at their reset values.
pub fn configure_fpu(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| CpuError::Kvm {
        cpu,
        what: "KVM_SET_FPU",
        source,
    })
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Boot MSRs: syscall MSRs cleared, TSC at 0, fast strings, MTRRs enabled with write-back default.
pub fn configure_msrs(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| CpuError::Msrs {
        cpu,
        set: 0,
        total: list.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| CpuError::Kvm {
        cpu,
        what: "KVM_SET_MSRS",
        source,
    })?;
    if set != list.len() {
        return Err(CpuError::Msrs {
            cpu,
            set,
            total: list.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware leaves them.
pub fn configure_lapic(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let kvm = |what: &'static str| move |source| CpuError::Kvm { cpu, what, source };
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let regs = &mut lapic.regs;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = regs[off + i] as u8;
        }
        let val = set_delivery_mode(u32::from_le_bytes(b), mode);
        for (i, v) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *v as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_round_trips_through_segment() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.l, 1);
        assert_eq!(s.g, 1);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.present, 1);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn delivery_mode_replaces_only_mode_bits() {
        assert_eq!(set_delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
    }
}
