//! Advanced Error Reporting on the root port: the AER extended capability with the root error
//! registers, and the error message a device in the slot sends up.
//!
//! Linux's AER service binds to a root port that has this capability when `_OSC` granted it
//! AER control; it enables the root error interrupts (Root Error Command) and, on the port's
//! interrupt, reads Root Error Status and Error Source Identification, finds the device by the
//! source ID and reads that device's own AER registers (see [`crate::aer::EndpointAer`]). The
//! interrupt is the port's single MSI vector, shared with pciehp (message number 0 in Root
//! Error Status bits 31:27); a handler that finds nothing of its own in its status returns
//! without acting, so the two do not disturb each other.

use log::debug;

use super::RootPort;
use crate::aer::{
    AER_CAP_ID, AER_CAP_LEN, AER_CAP_VERSION, COR_MASK, COR_MASK_DEFAULT, COR_STATUS,
    COR_SUPPORTED, ERR_SRC, ROOT_COMMAND, ROOT_COMMAND_FATAL, ROOT_COMMAND_NONFATAL,
    ROOT_COMMAND_WRITABLE, ROOT_STATUS, ROOT_STATUS_FATAL, ROOT_STATUS_FIRST_FATAL,
    ROOT_STATUS_MULTI_UNCOR, ROOT_STATUS_NONFATAL, ROOT_STATUS_RW1C, ROOT_STATUS_UNCOR, UNCOR_MASK,
    UNCOR_MASK_DEFAULT, UNCOR_SEVER, UNCOR_SEVER_DEFAULT, UNCOR_STATUS, UNCOR_SUPPORTED,
};
use crate::config::{ConfigSpace, Result};

/// What became of an error message the slot's device sent up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AerSignal {
    /// Recorded in Root Error Status and signalled (the MSI was sent, or is pending behind the
    /// guest's mask, or an earlier unhandled error's interrupt covers it).
    Signalled,
    /// Recorded, but the guest does not take error interrupts from this port: reporting of
    /// this severity is off in Root Error Command, or the port's MSI is disabled. No AER
    /// service is listening; nobody will recover the device.
    NotEnabled,
}

/// Adds the AER capability of a root port to `cfg`: endpoint registers (status RW1C, masks
/// and severity read-write with their reset values) and the root error registers. Returns its
/// offset.
pub(crate) fn add_capability(cfg: &mut ConfigSpace) -> Result<usize> {
    let aer = cfg.add_extended_capability(AER_CAP_ID, AER_CAP_VERSION, AER_CAP_LEN)?;
    cfg.set_rw1c_u32(aer + UNCOR_STATUS, UNCOR_SUPPORTED);
    cfg.set_u32(aer + UNCOR_MASK, UNCOR_MASK_DEFAULT);
    cfg.set_writable_u32(aer + UNCOR_MASK, UNCOR_SUPPORTED);
    cfg.set_u32(aer + UNCOR_SEVER, UNCOR_SEVER_DEFAULT);
    cfg.set_writable_u32(aer + UNCOR_SEVER, UNCOR_SUPPORTED);
    cfg.set_rw1c_u32(aer + COR_STATUS, COR_SUPPORTED);
    cfg.set_u32(aer + COR_MASK, COR_MASK_DEFAULT);
    cfg.set_writable_u32(aer + COR_MASK, COR_SUPPORTED);
    cfg.set_writable_u32(aer + ROOT_COMMAND, ROOT_COMMAND_WRITABLE);
    cfg.set_rw1c_u32(aer + ROOT_STATUS, ROOT_STATUS_RW1C);
    Ok(aer)
}

/// The Root Error Command enables that the reports in a Root Error Status value stand for.
fn enables_of(status: u32) -> u32 {
    let mut enables = 0;
    if status & ROOT_STATUS_NONFATAL != 0 {
        enables |= ROOT_COMMAND_NONFATAL;
    }
    if status & ROOT_STATUS_FATAL != 0 {
        enables |= ROOT_COMMAND_FATAL;
    }
    enables | (status & crate::aer::ROOT_STATUS_COR)
}

impl RootPort {
    /// Offset of the AER capability in the port's configuration space.
    pub fn aer_capability_offset(&self) -> usize {
        self.aer
    }

    /// The device in the slot sends ERR_NONFATAL (or ERR_FATAL when `fatal`) up to the port:
    /// Root Error Status records it with the device's requester ID (secondary bus, device 0,
    /// function 0) as the uncorrectable error source, and the port interrupts the guest when
    /// reporting of that severity is enabled and no earlier enabled report is still unhandled
    /// (PCIe base spec 6.2.4.1.2).
    pub fn report_uncorrectable(&mut self, fatal: bool) -> AerSignal {
        let aer = self.aer;
        let command = self.cfg.read_u32(aer + ROOT_COMMAND);
        let before = self.cfg.read_u32(aer + ROOT_STATUS);
        let mut status = before;
        let (received, enable) = if fatal {
            if before & ROOT_STATUS_UNCOR == 0 {
                status |= ROOT_STATUS_FIRST_FATAL;
            }
            (ROOT_STATUS_FATAL, ROOT_COMMAND_FATAL)
        } else {
            (ROOT_STATUS_NONFATAL, ROOT_COMMAND_NONFATAL)
        };
        status |= received;
        if before & ROOT_STATUS_UNCOR != 0 {
            status |= ROOT_STATUS_MULTI_UNCOR;
        } else {
            let source = u32::from(self.bus_numbers().secondary) << 8;
            let cor_source = self.cfg.read_u32(aer + ERR_SRC) & 0xffff;
            self.cfg.set_u32(aer + ERR_SRC, (source << 16) | cor_source);
        }
        status |= ROOT_STATUS_UNCOR;
        self.cfg.set_u32(aer + ROOT_STATUS, status);
        debug!(
            "slot {}: AER {} error reported, root error status {before:#x} -> {status:#x}",
            self.slot_number,
            if fatal { "fatal" } else { "non-fatal" }
        );

        if command & enable == 0 || !self.msi.state(&self.cfg).enabled {
            return AerSignal::NotEnabled;
        }
        if enables_of(before) & command == 0 {
            self.msi.trigger(&mut self.cfg);
        }
        AerSignal::Signalled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::aer::*;
    use crate::msi::tests::RecordingSender;
    use crate::root_port::slot::tests::NullEvents;
    use crate::root_port::{test_config, RootPort};
    use crate::PciDevice;

    use super::AerSignal;

    fn port() -> (RootPort, Arc<RecordingSender>) {
        let sender = Arc::new(RecordingSender::default());
        let port = RootPort::new(test_config(2), sender.clone(), Arc::new(NullEvents)).unwrap();
        (port, sender)
    }

    fn write_u32(port: &mut RootPort, offset: usize, value: u32) {
        port.write_config_register(offset / 4, 0, &value.to_le_bytes());
    }

    fn read_u32(port: &mut RootPort, offset: usize) -> u32 {
        port.read_config_register(offset / 4)
    }

    /// What Linux's MSI setup and AER service do: MSI enabled, root error reporting on.
    fn enable_aer(port: &mut RootPort) {
        let msi = port.msi_capability_offset();
        write_u32(port, msi + 4, 0xfee0_0000);
        write_u32(port, msi + 12, 0x41);
        port.write_config_register(msi / 4, 2, &1u16.to_le_bytes());
        let aer = port.aer_capability_offset();
        write_u32(port, aer + ROOT_COMMAND, ROOT_COMMAND_WRITABLE);
    }

    #[test]
    fn the_port_has_an_aer_capability_at_0x100() {
        let (port, _) = port();
        assert_eq!(port.aer_capability_offset(), 0x100);
        assert_eq!(
            port.cfg.extended_capabilities(),
            vec![(AER_CAP_ID, AER_CAP_VERSION, 0x100)]
        );
    }

    #[test]
    fn a_non_fatal_error_is_recorded_with_its_source_and_signalled() {
        let (mut port, sender) = port();
        enable_aer(&mut port);
        let aer = port.aer_capability_offset();

        assert_eq!(port.report_uncorrectable(false), AerSignal::Signalled);

        let status = read_u32(&mut port, aer + ROOT_STATUS);
        assert_eq!(status, ROOT_STATUS_UNCOR | ROOT_STATUS_NONFATAL);
        assert_eq!(
            read_u32(&mut port, aer + ERR_SRC) >> 16,
            0x0300,
            "bus 3, 00.0"
        );
        assert_eq!(sender.count(), 1);
        assert_eq!(status >> 27, 0, "message number 0: the port's one vector");
    }

    #[test]
    fn a_second_error_before_the_guest_cleared_the_first_sends_no_interrupt() {
        let (mut port, sender) = port();
        enable_aer(&mut port);
        port.report_uncorrectable(false);

        assert_eq!(port.report_uncorrectable(false), AerSignal::Signalled);

        let aer = port.aer_capability_offset();
        assert_ne!(
            read_u32(&mut port, aer + ROOT_STATUS) & ROOT_STATUS_MULTI_UNCOR,
            0
        );
        assert_eq!(sender.count(), 1);
    }

    #[test]
    fn the_guest_clears_root_error_status_and_the_next_error_interrupts_again() {
        let (mut port, sender) = port();
        enable_aer(&mut port);
        port.report_uncorrectable(false);
        let aer = port.aer_capability_offset();
        let status = read_u32(&mut port, aer + ROOT_STATUS);

        write_u32(&mut port, aer + ROOT_STATUS, status);
        assert_eq!(read_u32(&mut port, aer + ROOT_STATUS), 0);
        port.report_uncorrectable(false);

        assert_eq!(sender.count(), 2);
    }

    #[test]
    fn without_the_guests_aer_service_nothing_is_signalled() {
        let (mut port, sender) = port();

        assert_eq!(port.report_uncorrectable(false), AerSignal::NotEnabled);
        assert_eq!(sender.count(), 0);
    }

    #[test]
    fn a_fatal_error_needs_fatal_reporting_enabled() {
        let (mut port, sender) = port();
        enable_aer(&mut port);
        let aer = port.aer_capability_offset();
        write_u32(&mut port, aer + ROOT_COMMAND, ROOT_COMMAND_NONFATAL);

        assert_eq!(port.report_uncorrectable(true), AerSignal::NotEnabled);
        let status = read_u32(&mut port, aer + ROOT_STATUS);
        assert_ne!(status & ROOT_STATUS_FIRST_FATAL, 0);
        assert_eq!(sender.count(), 0);
    }

    #[test]
    fn the_root_error_registers_keep_only_their_writable_bits() {
        let (mut port, _) = port();
        let aer = port.aer_capability_offset();

        write_u32(&mut port, aer + ROOT_COMMAND, u32::MAX);
        write_u32(&mut port, aer + ERR_SRC, u32::MAX);
        write_u32(&mut port, aer + UNCOR_SEVER, u32::MAX);

        assert_eq!(
            read_u32(&mut port, aer + ROOT_COMMAND),
            ROOT_COMMAND_WRITABLE
        );
        assert_eq!(read_u32(&mut port, aer + ERR_SRC), 0);
        assert_eq!(read_u32(&mut port, aer + UNCOR_SEVER), UNCOR_SUPPORTED);
    }
}
