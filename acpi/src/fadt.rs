//! FADT (Fixed ACPI Description Table), revision 6, for a hardware-reduced ACPI machine.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::Aml;

use crate::description::MachineDescription;
use crate::{oem_table_id, OEM_ID, OEM_REVISION};

/// IAPC_BOOT_ARCH: the motherboard has an 8042 keyboard controller.
pub(crate) const BOOT_ARCH_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH: VGA not present, the guest must not probe for it.
pub(crate) const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: the guest must not enable PCIe ASPM.
pub(crate) const BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// IAPC_BOOT_ARCH: CMOS RTC not present.
pub(crate) const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Hypervisor vendor identity reported in the FADT.
pub(crate) const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"RVMM\0\0\0\0";

/// Size of the FADT in bytes.
pub(crate) fn len() -> usize {
    acpi_tables::fadt::FADT::len()
}

/// An 8-bit I/O port register.
fn io_port_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The IAPC_BOOT_ARCH flags of the machine.
fn boot_arch_flags(desc: &MachineDescription) -> u16 {
    let mut flags = BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_PCIE_ASPM_CONTROLS;
    if desc.legacy.i8042 {
        flags |= BOOT_ARCH_8042;
    }
    if !desc.legacy.cmos_rtc {
        flags |= BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    }
    flags
}

/// Builds the FADT pointing at the DSDT at `dsdt_address`.
pub(crate) fn build(desc: &MachineDescription, dsdt_address: u64) -> Vec<u8> {
    // No fixed-feature buttons: the power button, when there is one, is a control-method
    // device in the DSDT (a hardware-reduced machine has no fixed events), and there is no
    // sleep button. Without these flags Linux adds fixed power and sleep button devices that
    // never fire.
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_address)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = boot_arch_flags(desc).into();
    fadt.reset_reg = io_port_register(desc.pm.reset_port);
    fadt.reset_value = desc.pm.reset_value;
    fadt.sleep_control_reg = io_port_register(desc.pm.sleep_control_port);
    fadt.sleep_status_reg = io_port_register(desc.pm.sleep_status_port);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();

    let mut bytes = Vec::with_capacity(len());
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::tests::example;
    use crate::tests::{read_u16, read_u32, read_u64, sum};

    // Offsets of FADT fields (ACPI 6.5, table 5.9).
    const MAJOR_REVISION: usize = 8;
    const IAPC_BOOT_ARCH: usize = 109;
    const FLAGS: usize = 112;
    const RESET_REG: usize = 116;
    const RESET_VALUE: usize = 128;
    const MINOR_REVISION: usize = 131;
    const DSDT: usize = 40;
    const X_DSDT: usize = 140;
    const SLEEP_CONTROL_REG: usize = 244;
    const SLEEP_STATUS_REG: usize = 256;
    const HYPERVISOR_VENDOR_IDENTITY: usize = 268;

    /// IAPC_BOOT_ARCH: MSI not supported. Never set: Linux requests native PCIe hot-plug
    /// through `_OSC` only when MSI is usable.
    const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;

    const FLAG_PWR_BUTTON: u32 = 1 << 4;
    const FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

    fn fadt() -> Vec<u8> {
        build(&example(), 0x1234_5678)
    }

    /// Asserts that `bytes` holds an 8-bit system-I/O generic address of `port`.
    fn assert_io_register(bytes: &[u8], offset: usize, port: u16) {
        assert_eq!(bytes[offset], 1, "address space is system I/O");
        assert_eq!(bytes[offset + 1], 8, "register bit width");
        assert_eq!(bytes[offset + 2], 0, "register bit offset");
        assert_eq!(bytes[offset + 3], 1, "byte access");
        assert_eq!(read_u64(bytes, offset + 4), u64::from(port));
    }

    #[test]
    fn fadt_is_revision_6_with_valid_length_and_checksum() {
        let bytes = fadt();
        assert_eq!(&bytes[0..4], b"FACP");
        assert_eq!(bytes[MAJOR_REVISION], 6);
        assert_eq!(bytes[MINOR_REVISION], 5);
        assert_eq!(read_u32(&bytes, 4) as usize, bytes.len());
        assert_eq!(bytes.len(), len());
        assert_eq!(sum(&bytes), 0);
    }

    #[test]
    fn fadt_flags_are_hw_reduced_with_reset_register_and_no_fixed_buttons() {
        let flags = read_u32(&fadt(), FLAGS);
        assert_eq!(
            flags,
            FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON
        );
    }

    #[test]
    fn dsdt_is_given_only_as_64_bit_address() {
        let bytes = fadt();
        assert_eq!(read_u32(&bytes, DSDT), 0);
        assert_eq!(read_u64(&bytes, X_DSDT), 0x1234_5678);
    }

    #[test]
    fn reset_register_is_io_port_with_reset_value() {
        let bytes = fadt();
        assert_io_register(&bytes, RESET_REG, 0x602);
        assert_eq!(bytes[RESET_VALUE], 0x1);
    }

    #[test]
    fn sleep_registers_are_io_ports() {
        let bytes = fadt();
        assert_io_register(&bytes, SLEEP_CONTROL_REG, 0x600);
        assert_io_register(&bytes, SLEEP_STATUS_REG, 0x601);
    }

    #[test]
    fn boot_arch_says_no_vga_no_aspm_and_allows_msi() {
        let flags = read_u16(&fadt(), IAPC_BOOT_ARCH);
        assert_ne!(flags & BOOT_ARCH_VGA_NOT_PRESENT, 0);
        assert_ne!(flags & BOOT_ARCH_PCIE_ASPM_CONTROLS, 0);
        assert_eq!(flags & BOOT_ARCH_MSI_NOT_SUPPORTED, 0);
    }

    #[test]
    fn absent_cmos_rtc_and_8042_are_announced() {
        let flags = read_u16(&fadt(), IAPC_BOOT_ARCH);
        assert_ne!(flags & BOOT_ARCH_CMOS_RTC_NOT_PRESENT, 0);
        assert_eq!(flags & BOOT_ARCH_8042, 0);
    }

    #[test]
    fn present_cmos_rtc_and_8042_are_announced() {
        let mut desc = example();
        desc.legacy.cmos_rtc = true;
        desc.legacy.i8042 = true;
        let flags = read_u16(&build(&desc, 0), IAPC_BOOT_ARCH);
        assert_eq!(flags & BOOT_ARCH_CMOS_RTC_NOT_PRESENT, 0);
        assert_ne!(flags & BOOT_ARCH_8042, 0);
    }

    #[test]
    fn hypervisor_vendor_identity_is_rvmm() {
        let bytes = fadt();
        assert_eq!(
            &bytes[HYPERVISOR_VENDOR_IDENTITY..HYPERVISOR_VENDOR_IDENTITY + 8],
            &HYPERVISOR_VENDOR_ID
        );
    }
}
