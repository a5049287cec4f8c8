//! A single-vector, 64-bit MSI capability with per-vector masking, delivering through an
//! [`MsiSender`].
//!
//! The registers live in the function's [`ConfigSpace`]; [`Msi`] only remembers where the
//! capability is and whom to send to. A message raised while the vector is masked sets the
//! Pending bit and is sent when the guest unmasks the vector; a message raised while MSI is
//! disabled is dropped (the owner re-evaluates its interrupt condition when MSI is enabled).

use std::sync::Arc;

use log::warn;

use crate::config::{ConfigAccess, ConfigSpace, Result};
use crate::device::{MsiMessage, MsiSender};

/// Capability ID of MSI.
pub const MSI_CAP_ID: u8 = 0x05;
/// Length of a 64-bit MSI capability with per-vector masking.
pub const MSI_CAP_LEN: usize = 0x18;

/// Message Control.
const CONTROL: usize = 0x02;
/// Message Address (low 32 bits).
const ADDRESS_LO: usize = 0x04;
/// Message Address (high 32 bits).
const ADDRESS_HI: usize = 0x08;
/// Message Data.
const DATA: usize = 0x0c;
/// Mask Bits.
const MASK: usize = 0x10;
/// Pending Bits.
const PENDING: usize = 0x14;

/// Message Control: MSI Enable.
pub const CONTROL_ENABLE: u16 = 1 << 0;
/// Message Control: Multiple Message Enable field.
const CONTROL_MME: u16 = 7 << 4;
/// Message Control: 64-bit Address Capable.
const CONTROL_64BIT: u16 = 1 << 7;
/// Message Control: Per-Vector Masking Capable.
const CONTROL_PVM: u16 = 1 << 8;

/// The MSI state that decides delivery, captured around a guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiState {
    /// MSI Enable is set.
    pub enabled: bool,
    /// Vector 0 is masked.
    pub masked: bool,
}

/// A single-vector MSI capability in a function's configuration space.
pub struct Msi {
    offset: usize,
    sender: Arc<dyn MsiSender>,
}

impl Msi {
    /// Adds the capability to `cfg`; messages are delivered through `sender`.
    pub fn add_to(cfg: &mut ConfigSpace, sender: Arc<dyn MsiSender>) -> Result<Self> {
        let offset = cfg.add_capability(MSI_CAP_ID, MSI_CAP_LEN)?;
        cfg.set_u16(offset + CONTROL, CONTROL_64BIT | CONTROL_PVM);
        cfg.set_writable_u16(offset + CONTROL, CONTROL_ENABLE | CONTROL_MME);
        cfg.set_writable_u32(offset + ADDRESS_LO, 0xffff_fffc);
        cfg.set_writable_u32(offset + ADDRESS_HI, 0xffff_ffff);
        cfg.set_writable_u16(offset + DATA, 0xffff);
        cfg.set_writable_u32(offset + MASK, 1);
        Ok(Self { offset, sender })
    }

    /// Where the capability's messages are delivered.
    pub fn sender(&self) -> Arc<dyn MsiSender> {
        self.sender.clone()
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Whether `access` touches the capability.
    pub fn is_hit_by(&self, access: &ConfigAccess) -> bool {
        access.overlaps(self.offset, MSI_CAP_LEN)
    }

    /// The current enable and mask state.
    pub fn state(&self, cfg: &ConfigSpace) -> MsiState {
        MsiState {
            enabled: cfg.read_u16(self.offset + CONTROL) & CONTROL_ENABLE != 0,
            masked: cfg.read_u32(self.offset + MASK) & 1 != 0,
        }
    }

    /// The message the guest programmed.
    pub fn message(&self, cfg: &ConfigSpace) -> MsiMessage {
        MsiMessage {
            address: (u64::from(cfg.read_u32(self.offset + ADDRESS_HI)) << 32)
                | u64::from(cfg.read_u32(self.offset + ADDRESS_LO)),
            data: u32::from(cfg.read_u16(self.offset + DATA)),
        }
    }

    /// Whether a masked message is pending.
    pub fn pending(&self, cfg: &ConfigSpace) -> bool {
        cfg.read_u32(self.offset + PENDING) & 1 != 0
    }

    /// Raises the vector: sends the message if enabled and unmasked, marks it pending if
    /// enabled and masked, drops it if disabled. Returns whether a message was sent.
    pub fn trigger(&self, cfg: &mut ConfigSpace) -> bool {
        let state = self.state(cfg);
        if !state.enabled {
            return false;
        }
        if state.masked {
            cfg.set_u32(self.offset + PENDING, 1);
            return false;
        }
        self.send(cfg)
    }

    /// Completes a guest write given the state captured before it: unmasking an enabled vector
    /// with a pending message sends it; disabling MSI drops the pending message.
    pub fn after_write(&self, cfg: &mut ConfigSpace, before: MsiState) -> bool {
        let now = self.state(cfg);
        if !now.enabled {
            cfg.set_u32(self.offset + PENDING, 0);
            return false;
        }
        if before.masked && !now.masked && self.pending(cfg) {
            cfg.set_u32(self.offset + PENDING, 0);
            return self.send(cfg);
        }
        false
    }

    fn send(&self, cfg: &ConfigSpace) -> bool {
        match self.sender.send(self.message(cfg)) {
            Ok(()) => true,
            Err(e) => {
                warn!("failed to send MSI: {e}");
                false
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An [`MsiSender`] that records what it is asked to send.
    #[derive(Default)]
    pub(crate) struct RecordingSender {
        pub(crate) sent: Mutex<Vec<MsiMessage>>,
    }

    impl RecordingSender {
        pub(crate) fn count(&self) -> usize {
            self.sent.lock().unwrap().len()
        }
    }

    impl MsiSender for RecordingSender {
        fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
            self.sent.lock().unwrap().push(msg);
            Ok(())
        }
    }

    fn msi() -> (ConfigSpace, Msi, Arc<RecordingSender>) {
        let mut cfg = ConfigSpace::new();
        let sender = Arc::new(RecordingSender::default());
        let msi = Msi::add_to(&mut cfg, sender.clone()).unwrap();
        (cfg, msi, sender)
    }

    fn guest_write(cfg: &mut ConfigSpace, msi: &Msi, offset: usize, data: &[u8]) -> bool {
        let before = msi.state(cfg);
        let at = msi.offset() + offset;
        cfg.write_register(at / 4, (at % 4) as u64, data);
        msi.after_write(cfg, before)
    }

    fn program(cfg: &mut ConfigSpace, msi: &Msi) {
        guest_write(cfg, msi, ADDRESS_LO, &0xfee0_1004u32.to_le_bytes());
        guest_write(cfg, msi, ADDRESS_HI, &0x1u32.to_le_bytes());
        guest_write(cfg, msi, DATA, &0x4041u16.to_le_bytes());
        guest_write(cfg, msi, CONTROL, &CONTROL_ENABLE.to_le_bytes());
    }

    #[test]
    fn control_advertises_64bit_single_vector_with_masking() {
        let (cfg, msi, _) = msi();
        assert_eq!(cfg.read_u8(msi.offset()), MSI_CAP_ID);
        assert_eq!(cfg.read_u16(msi.offset() + CONTROL), 0x0180);
    }

    #[test]
    fn message_is_assembled_from_the_programmed_registers() {
        let (mut cfg, msi, _) = msi();
        program(&mut cfg, &msi);
        assert_eq!(
            msi.message(&cfg),
            MsiMessage {
                address: 0x1_fee0_1004,
                data: 0x4041
            }
        );
    }

    #[test]
    fn address_low_bits_are_read_only() {
        let (mut cfg, msi, _) = msi();
        guest_write(&mut cfg, &msi, ADDRESS_LO, &[0xff; 4]);
        assert_eq!(cfg.read_u32(msi.offset() + ADDRESS_LO), 0xffff_fffc);
    }

    #[test]
    fn trigger_sends_when_enabled() {
        let (mut cfg, msi, sender) = msi();
        program(&mut cfg, &msi);
        assert!(msi.trigger(&mut cfg));
        assert_eq!(sender.sent.lock().unwrap()[0].data, 0x4041);
    }

    #[test]
    fn trigger_is_dropped_when_disabled() {
        let (mut cfg, msi, sender) = msi();
        assert!(!msi.trigger(&mut cfg));
        assert_eq!(sender.count(), 0);
        assert!(!msi.pending(&cfg));
    }

    #[test]
    fn masked_trigger_is_pending_and_sent_on_unmask() {
        let (mut cfg, msi, sender) = msi();
        program(&mut cfg, &msi);
        guest_write(&mut cfg, &msi, MASK, &[1, 0, 0, 0]);
        assert!(!msi.trigger(&mut cfg));
        assert!(msi.pending(&cfg));
        assert_eq!(sender.count(), 0);
        assert!(guest_write(&mut cfg, &msi, MASK, &[0, 0, 0, 0]));
        assert_eq!(sender.count(), 1);
        assert!(!msi.pending(&cfg));
    }

    #[test]
    fn unmask_without_pending_sends_nothing() {
        let (mut cfg, msi, sender) = msi();
        program(&mut cfg, &msi);
        guest_write(&mut cfg, &msi, MASK, &[1, 0, 0, 0]);
        guest_write(&mut cfg, &msi, MASK, &[0, 0, 0, 0]);
        assert_eq!(sender.count(), 0);
    }

    #[test]
    fn disabling_msi_drops_the_pending_message() {
        let (mut cfg, msi, sender) = msi();
        program(&mut cfg, &msi);
        guest_write(&mut cfg, &msi, MASK, &[1, 0, 0, 0]);
        msi.trigger(&mut cfg);
        guest_write(&mut cfg, &msi, CONTROL, &[0, 0]);
        assert!(!msi.pending(&cfg));
        guest_write(&mut cfg, &msi, CONTROL, &CONTROL_ENABLE.to_le_bytes());
        guest_write(&mut cfg, &msi, MASK, &[0, 0, 0, 0]);
        assert_eq!(sender.count(), 0);
    }

    #[test]
    fn pending_bits_are_read_only() {
        let (mut cfg, msi, _) = msi();
        guest_write(&mut cfg, &msi, PENDING, &[0xff; 4]);
        assert!(!msi.pending(&cfg));
    }
}
