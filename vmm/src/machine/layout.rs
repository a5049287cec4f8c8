//! The guest physical address map and the port I/O map of an rvmm machine.
//!
//! ```text
//! 0x0000_0000 ..             RAM (real-mode area, zero page, command line, page tables, ACPI)
//!   0x000E_0000 .. 0x000F_F000   ACPI tables (reserved in E820)
//!   0x000F_F000 .. 0x0010_0000   firmware page: the real-mode reset vector at 0xF_FFF0 (reserved)
//! ..0xC000_0000              RAM below the 32-bit hole
//! 0xC000_0000 .. 0xE000_0000 PCI 32-bit MMIO window (root-port windows carved from it)
//! 0xE000_0000 .. 0xF000_0000 PCIe ECAM (buses 0..=255)
//! 0xFEC0_0000                IOAPIC
//! 0xFEE0_0000                LAPIC
//! 0x1_0000_0000 ..           RAM above 4 GiB
//! align_up(end of RAM, 1 GiB) .. host physical address limit: PCI 64-bit MMIO window
//! ```
//!
//! Port I/O: 0x60/0x64 i8042, 0x70 CMOS, 0x3f8 COM1, 0x600 ACPI PM, 0x603 GED, 0x620 ACPI PCI
//! hotplug registers (`--hotplug acpi`), 0xcf8 PCI configuration.

/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// The zero page (`boot_params`) for the bzImage boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries follow the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer for the 64-bit boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity-mapped page tables used for the 64-bit bzImage entry.
pub const PML4_START: u64 = 0x9000;
/// PDPTE page.
pub const PDPTE_START: u64 = 0xa000;
/// PDE pages (4 pages: identity map of the first 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Start of the reserved area holding the ACPI tables.
pub const ACPI_START: u64 = 0xE_0000;
/// Size of the ACPI area (up to the firmware page).
pub const ACPI_SIZE: u64 = 0x1_F000;
/// The page below 1 MiB where a PC has its firmware; holds the real-mode reset vector.
pub const FIRMWARE_PAGE: u64 = 0xF_F000;
/// Where `ljmp $0xf000, $0xfff0` (a reboot "through the BIOS") lands.
pub const RESET_VECTOR: u64 = 0xF_FFF0;
/// End of the low 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Where the kernel image is loaded (bzImage protected-mode part, 16 MiB like most loaders).
pub const KERNEL_START: u64 = 0x100_0000;

/// Start of the 32-bit MMIO hole: RAM below 4 GiB ends here at the latest.
pub const MMIO32_HOLE_START: u64 = 0xC000_0000;
/// PCI 32-bit MMIO window.
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// Size of the PCI 32-bit MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM base.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// PCIe ECAM size (256 buses of 1 MiB).
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// LAPIC base.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Start of RAM above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Alignment of the 64-bit MMIO window's start.
pub const MMIO64_ALIGN: u64 = 0x4000_0000;

/// Legacy COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1 IRQ (ISA, also its GSI).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port; the command/status port is 0x64.
pub const I8042_DATA_PORT: u64 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// MC146818 RTC/CMOS index port; the data port follows.
pub const CMOS_PORT: u64 = 0x70;
/// PCI configuration mechanism #1 (0xCF8..0xCFF).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// ACPI hardware-reduced power management registers (sleep control, sleep status, reset).
pub const ACPI_PM_PORT: u64 = 0x600;
/// The ACPI Generic Event Device's event register (the power button), right after the PM block.
pub const GED_PORT: u64 = ACPI_PM_PORT + rvmm_devices::acpi_pm::ACPI_PM_PORT_COUNT;
/// The ACPI PCI hotplug registers (`--hotplug acpi`), after the GED's.
pub const PCI_HOTPLUG_PORT: u64 = 0x620;
/// The GED's ISA IRQ (also its GSI), edge-triggered: free of the serial port (4), the PIT (0,
/// on GSI 2), the RTC (8) and the i8042 lines (1, 12).
pub const GED_IRQ: u32 = 5;

/// First I/O port of the PCI I/O window: above every platform device's ports (serial 0x3f8,
/// i8042, CMOS, PCI configuration 0xcf8, ACPI PM and GED 0x600..0x604).
pub const PCI_IO_START: u64 = 0x1000;
/// Size of the PCI I/O window: the rest of the 64 KiB I/O space, 4 KiB for each of the first 15
/// root ports.
pub const PCI_IO_SIZE: u64 = 0x1_0000 - PCI_IO_START;
/// First IOAPIC input of the PCI INTx lines (the inputs above the ISA IRQs).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// IOAPIC inputs given to PCI INTx lines (16..=23).
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The IOAPIC input that INTA..INTD of the device behind root port `port` are routed to: the
/// ports take GSIs 16..=23 in turn, so up to 8 ports have a line of their own.
pub fn port_intx_gsi(port: usize) -> u32 {
    PCI_INTX_GSI_BASE + (port % PCI_INTX_GSI_COUNT as usize) as u32
}

/// The 64-bit MMIO window: from the first [`MMIO64_ALIGN`] boundary above RAM up to the host's
/// physical address limit (CPUID 0x80000008, which the guest sees too): GPU-sized BARs fit as
/// far as the host's address width allows. `ram_end` is one past the last RAM byte. Returns
/// (base, size); size 0 when the host's address space ends below the window.
pub fn mmio64_window(ram_end: u64, phys_bits: u8) -> (u64, u64) {
    let base = ram_end
        .max(HIGH_RAM_START)
        .checked_next_multiple_of(MMIO64_ALIGN)
        .unwrap_or(u64::MAX);
    let limit = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
    (base, limit.saturating_sub(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio64_window_starts_above_ram_aligned() {
        assert_eq!(
            mmio64_window(0x8000_0000, 40),
            (HIGH_RAM_START, (1 << 40) - HIGH_RAM_START)
        );
        assert_eq!(mmio64_window(0x1_2000_0000, 40).0, 0x1_4000_0000);
    }

    #[test]
    fn root_ports_share_out_the_pci_intx_gsis_in_turn() {
        assert_eq!(port_intx_gsi(0), 16);
        assert_eq!(port_intx_gsi(7), 23);
        assert_eq!(port_intx_gsi(8), 16);
        assert_eq!(port_intx_gsi(127), 23);
    }

    #[test]
    fn mmio64_window_reaches_the_end_of_a_wide_address_space() {
        let (base, size) = mmio64_window(0x8000_0000, 46);
        assert_eq!(base + size, 1 << 46);
        // Eight ports share 64 TiB: 128 GiB BARs fit each port's power-of-two share.
        assert!(size / 8 >= 128 << 30);
    }

    #[test]
    fn mmio64_window_is_capped_by_physical_address_bits() {
        let (base, size) = mmio64_window(0x8000_0000, 36);
        assert_eq!(base + size, 1 << 36);
        assert_eq!(mmio64_window(1 << 36, 36).1, 0);
    }
}
