//! PCI Express Advanced Error Reporting: the register layout, and the endpoint registers as a
//! small model that a device emulation can put in its configuration space.
//!
//! rvmm reports a host error on a passthrough device to the guest as an uncorrectable non-fatal
//! error of that device (docs/hotplug.md, "Device errors"). Linux's AER core then reads the
//! device's own AER capability: Uncorrectable Error Status & ~Mask must be non-zero or it does
//! nothing. [`EndpointAer`] holds those registers for the guest: an error is
//! [injected](EndpointAer::inject_nonfatal), the guest's recovery ends by clearing the status
//! (RW1C, `pci_aer_clear_nonfatal_status`), which is what the VMM watches for.

/// Extended capability ID of AER.
pub const AER_CAP_ID: u16 = 0x0001;
/// Capability version rvmm advertises.
pub const AER_CAP_VERSION: u8 = 2;
/// Length of the capability with the root port registers and the TLP prefix log.
pub const AER_CAP_LEN: usize = 0x48;

/// Uncorrectable Error Status (RW1C).
pub const UNCOR_STATUS: usize = 0x04;
/// Uncorrectable Error Mask.
pub const UNCOR_MASK: usize = 0x08;
/// Uncorrectable Error Severity (set: fatal).
pub const UNCOR_SEVER: usize = 0x0c;
/// Correctable Error Status (RW1C).
pub const COR_STATUS: usize = 0x10;
/// Correctable Error Mask.
pub const COR_MASK: usize = 0x14;
/// Advanced Error Capabilities and Control (First Error Pointer in bits 4:0).
pub const CAP_CTL: usize = 0x18;
/// Header Log (four dwords).
pub const HEADER_LOG: usize = 0x1c;
/// Root Error Command (root ports).
pub const ROOT_COMMAND: usize = 0x2c;
/// Root Error Status (root ports; RW1C bits 6:0, message number in 31:27).
pub const ROOT_STATUS: usize = 0x30;
/// Error Source Identification (root ports: correctable source 15:0, uncorrectable 31:16).
pub const ERR_SRC: usize = 0x34;

/// Uncorrectable errors rvmm's models implement: Data Link Protocol, Surprise Down, Poisoned
/// TLP, Flow Control Protocol, Completion Timeout, Completer Abort, Unexpected Completion,
/// Receiver Overflow, Malformed TLP, ECRC, Unsupported Request, ACS Violation, Uncorrectable
/// Internal Error.
pub const UNCOR_SUPPORTED: u32 = 0x007f_f030;
/// Severity at reset (PCIe base spec): DLP, Surprise Down, FCP, Receiver Overflow, Malformed
/// TLP and Uncorrectable Internal Error are fatal.
pub const UNCOR_SEVER_DEFAULT: u32 = 0x0046_2030;
/// Mask at reset: Uncorrectable Internal Error masked.
pub const UNCOR_MASK_DEFAULT: u32 = 0x0040_0000;
/// Correctable errors implemented: Receiver Error, Bad TLP, Bad DLLP, Replay Rollover, Replay
/// Timer Timeout, Advisory Non-Fatal, Corrected Internal, Header Log Overflow.
pub const COR_SUPPORTED: u32 = 0x0000_f1c1;
/// Correctable mask at reset: Advisory Non-Fatal and Corrected Internal masked.
pub const COR_MASK_DEFAULT: u32 = 0x0000_6000;

/// Uncorrectable Error Status: Completion Timeout (non-fatal by default).
pub const UNCOR_COMPLETION_TIMEOUT: u32 = 1 << 14;
/// Uncorrectable Error Status: Completer Abort (non-fatal by default).
pub const UNCOR_COMPLETER_ABORT: u32 = 1 << 15;
/// Uncorrectable Error Status: Unexpected Completion (non-fatal by default).
pub const UNCOR_UNEXPECTED_COMPLETION: u32 = 1 << 16;
/// Uncorrectable Error Status: Unsupported Request (non-fatal by default).
pub const UNCOR_UNSUPPORTED_REQUEST: u32 = 1 << 20;

/// The errors a forwarded host error may be reported as, in order of preference: the first one
/// the guest has neither masked nor made fatal is used. Completion Timeout first: it is what a
/// device that stopped answering looks like, and Linux logs no TLP header for it.
const FORWARDED: [u32; 4] = [
    UNCOR_COMPLETION_TIMEOUT,
    UNCOR_COMPLETER_ABORT,
    UNCOR_UNEXPECTED_COMPLETION,
    UNCOR_UNSUPPORTED_REQUEST,
];

/// Root Error Command: correctable, non-fatal and fatal error reporting enables.
pub const ROOT_COMMAND_WRITABLE: u32 = 0x7;
/// Root Error Command: Non-Fatal Error Reporting Enable.
pub const ROOT_COMMAND_NONFATAL: u32 = 1 << 1;
/// Root Error Command: Fatal Error Reporting Enable.
pub const ROOT_COMMAND_FATAL: u32 = 1 << 2;
/// Root Error Status: ERR_COR received.
pub const ROOT_STATUS_COR: u32 = 1 << 0;
/// Root Error Status: ERR_FATAL/NONFATAL received.
pub const ROOT_STATUS_UNCOR: u32 = 1 << 2;
/// Root Error Status: multiple ERR_FATAL/NONFATAL received.
pub const ROOT_STATUS_MULTI_UNCOR: u32 = 1 << 3;
/// Root Error Status: first uncorrectable was fatal.
pub const ROOT_STATUS_FIRST_FATAL: u32 = 1 << 4;
/// Root Error Status: non-fatal error messages received.
pub const ROOT_STATUS_NONFATAL: u32 = 1 << 5;
/// Root Error Status: fatal error messages received.
pub const ROOT_STATUS_FATAL: u32 = 1 << 6;
/// Root Error Status bits the guest clears by writing one.
pub const ROOT_STATUS_RW1C: u32 = 0x7f;

/// The endpoint registers of an AER capability (offsets 0x04..0x48 from its header), emulated:
/// status registers RW1C over the implemented errors, masks and severity read-write, the
/// capabilities and control register read-only with the First Error Pointer, the logs zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointAer {
    uncor_status: u32,
    uncor_mask: u32,
    uncor_sever: u32,
    cor_status: u32,
    cor_mask: u32,
    first_error: u32,
}

impl Default for EndpointAer {
    fn default() -> Self {
        Self {
            uncor_status: 0,
            uncor_mask: UNCOR_MASK_DEFAULT,
            uncor_sever: UNCOR_SEVER_DEFAULT,
            cor_status: 0,
            cor_mask: COR_MASK_DEFAULT,
            first_error: 0,
        }
    }
}

impl EndpointAer {
    /// Reads the dword at `offset` from the capability's header (a multiple of 4; anything but
    /// the registers above reads zero).
    pub fn read(&self, offset: usize) -> u32 {
        match offset {
            UNCOR_STATUS => self.uncor_status,
            UNCOR_MASK => self.uncor_mask,
            UNCOR_SEVER => self.uncor_sever,
            COR_STATUS => self.cor_status,
            COR_MASK => self.cor_mask,
            CAP_CTL => self.first_error,
            _ => 0,
        }
    }

    /// A guest write of `value` to the bits `bytes` (a mask of whole bytes) of the dword at
    /// `offset` from the capability's header.
    pub fn write(&mut self, offset: usize, value: u32, bytes: u32) {
        let value = value & bytes;
        match offset {
            UNCOR_STATUS => self.uncor_status &= !value,
            UNCOR_MASK => {
                self.uncor_mask = (self.uncor_mask & !bytes) | (value & UNCOR_SUPPORTED);
            }
            UNCOR_SEVER => {
                self.uncor_sever = (self.uncor_sever & !bytes) | (value & UNCOR_SUPPORTED);
            }
            COR_STATUS => self.cor_status &= !value,
            COR_MASK => self.cor_mask = (self.cor_mask & !bytes) | (value & COR_SUPPORTED),
            _ => {}
        }
        if self.uncor_status & (1 << self.first_error) == 0 {
            self.first_error = 0;
        }
    }

    /// Records an uncorrectable non-fatal error: the first implemented one the guest has
    /// neither masked nor made fatal. Returns its status bit, or `None` when the guest left no
    /// such error reportable (it would not see or not recover a non-fatal one).
    pub fn inject_nonfatal(&mut self) -> Option<u32> {
        let bit = FORWARDED
            .into_iter()
            .find(|&bit| (self.uncor_mask | self.uncor_sever) & bit == 0)?;
        if self.uncor_status == 0 {
            self.first_error = bit.trailing_zeros();
        }
        self.uncor_status |= bit;
        Some(bit)
    }

    /// The Uncorrectable Error Status register.
    pub fn uncorrectable_status(&self) -> u32 {
        self.uncor_status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_start_at_their_reset_values() {
        let aer = EndpointAer::default();
        assert_eq!(aer.read(UNCOR_STATUS), 0);
        assert_eq!(aer.read(UNCOR_MASK), UNCOR_MASK_DEFAULT);
        assert_eq!(aer.read(UNCOR_SEVER), UNCOR_SEVER_DEFAULT);
        assert_eq!(aer.read(COR_MASK), COR_MASK_DEFAULT);
        assert_eq!(aer.read(HEADER_LOG), 0);
    }

    #[test]
    fn an_injected_error_is_a_non_fatal_completion_timeout() {
        let mut aer = EndpointAer::default();

        let bit = aer.inject_nonfatal();

        assert_eq!(bit, Some(UNCOR_COMPLETION_TIMEOUT));
        assert_eq!(aer.read(UNCOR_STATUS), UNCOR_COMPLETION_TIMEOUT);
        assert_eq!(aer.read(UNCOR_SEVER) & UNCOR_COMPLETION_TIMEOUT, 0);
        assert_eq!(aer.read(CAP_CTL) & 0x1f, 14, "first error pointer");
    }

    #[test]
    fn status_is_cleared_by_writing_one() {
        let mut aer = EndpointAer::default();
        let bit = aer.inject_nonfatal().unwrap();

        aer.write(UNCOR_STATUS, 0, u32::MAX);
        assert_eq!(aer.uncorrectable_status(), bit, "writing zero keeps it");
        aer.write(UNCOR_STATUS, u32::MAX, u32::MAX);

        assert_eq!(aer.uncorrectable_status(), 0);
        assert_eq!(aer.read(CAP_CTL), 0);
    }

    #[test]
    fn a_write_outside_its_bytes_changes_nothing() {
        let mut aer = EndpointAer::default();
        aer.inject_nonfatal().unwrap();

        // Bit 14 is in byte 1; a write of byte 0 with all ones does not clear it.
        aer.write(UNCOR_STATUS, u32::MAX, 0xff);

        assert_eq!(aer.uncorrectable_status(), UNCOR_COMPLETION_TIMEOUT);
    }

    #[test]
    fn an_error_the_guest_masked_is_not_used() {
        let mut aer = EndpointAer::default();
        aer.write(UNCOR_MASK, UNCOR_COMPLETION_TIMEOUT, u32::MAX);

        assert_eq!(aer.inject_nonfatal(), Some(UNCOR_COMPLETER_ABORT));
    }

    #[test]
    fn a_guest_that_made_every_candidate_fatal_gets_nothing() {
        let mut aer = EndpointAer::default();
        aer.write(UNCOR_SEVER, UNCOR_SUPPORTED, u32::MAX);

        assert_eq!(aer.inject_nonfatal(), None);
        assert_eq!(aer.uncorrectable_status(), 0);
    }

    #[test]
    fn unimplemented_mask_bits_stay_zero() {
        let mut aer = EndpointAer::default();
        aer.write(UNCOR_MASK, u32::MAX, u32::MAX);
        aer.write(COR_MASK, u32::MAX, u32::MAX);

        assert_eq!(aer.read(UNCOR_MASK), UNCOR_SUPPORTED);
        assert_eq!(aer.read(COR_MASK), COR_SUPPORTED);
    }
}
