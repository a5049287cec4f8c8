//! The real-mode reset vector: what a guest finds at `F000:FFF0` when it reboots through "the
//! BIOS".
//!
//! rvmm boots the kernel directly and has no firmware, yet Linux may end a reboot by jumping to
//! the BIOS reset entry in real mode (`machine_real_restart`): on a hardware-reduced ACPI machine
//! without EFI runtime services, its default reboot method is "EFI", which does nothing there and
//! falls through to "BIOS". Without code at that address the vCPU would run whatever the low
//! memory holds and never reset. A physical machine has its firmware there; rvmm puts the one
//! thing the firmware would do: write the FADT's reset value to the reset register (the same
//! register the ACPI reboot method uses), then halt until the VMM resets the VM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Physical address the real-mode jump `ljmp $0xf000, $0xfff0` reaches.
pub const RESET_VECTOR: u64 = layout::RESET_VECTOR;

// The code lives in the firmware page, above the ACPI tables.
const _: () = assert!(
    layout::FIRMWARE_PAGE >= layout::ACPI_START + layout::ACPI_SIZE
        && RESET_VECTOR >= layout::FIRMWARE_PAGE
);

/// The 16-bit code at the reset vector: `mov dx, port; mov al, value; out dx, al; cli; hlt;
/// jmp hlt` (10 bytes, within the 16 bytes below 1 MiB).
pub fn code(port: u16, value: u8) -> [u8; 10] {
    let [lo, hi] = port.to_le_bytes();
    [
        0xba, lo, hi, // mov dx, port
        0xb0, value, // mov al, value
        0xee,  // out dx, al
        0xfa,  // cli
        0xf4,  // hlt
        0xeb, 0xfd, // jmp short back to hlt
    ]
}

/// Writes the reset code at [`RESET_VECTOR`], to reset through I/O port `port` with `value`.
pub fn write(
    mem: &GuestMemoryMmap,
    port: u16,
    value: u8,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&code(port, value), GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_fits_below_1_mib() {
        let code = code(0x604, 1);
        assert!(RESET_VECTOR + code.len() as u64 <= layout::HIGH_MEMORY_START);
    }

    #[test]
    fn code_writes_the_value_to_the_port_then_halts_forever() {
        let code = code(0x0604, 0x5a);
        assert_eq!(&code[..3], &[0xba, 0x04, 0x06]);
        assert_eq!(&code[3..5], &[0xb0, 0x5a]);
        assert_eq!(code[5], 0xee);
        // The jump lands on the hlt: its target is the end of the jump plus the displacement.
        let hlt = code.iter().position(|&b| b == 0xf4).unwrap();
        let after_jmp = code.len() as i64;
        assert_eq!(after_jmp + i64::from(code[9] as i8), hlt as i64);
    }
}
