//! The hot-plug slot of a root port under a hostile guest racing the hot-plug manager: guest
//! writes to Slot Control / Slot Status, Link Control, the MSI capability and anywhere in the
//! port's config space (through the segment, as ECAM and 0xCF8 do), interleaved with the
//! manager's insert / attention button / surprise removal / take, with a recording MSI sender.
//!
//! Invariants checked after every step: the slot is empty exactly when it holds no device;
//! Presence Detect State and Data Link Layer Link Active mirror the device and the link; the link
//! is only up with a device, and the device is reachable downstream exactly while it is; an MSI is
//! only ever sent while MSI is enabled and unmasked, with the message the guest programmed; the
//! manager's operations succeed or fail as the slot's state says they must.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvmm_fuzz::{segment, CountingEvents, Data, RecordingSender, MAX_OPS};
use rvmm_pci::pcie_cap::{
    LNKCTL, LNKSTA, LNKSTA_DLLLA, SLTCTL, SLTCTL_ABPE, SLTCTL_CCIE, SLTCTL_DLLSCE, SLTCTL_HPIE,
    SLTCTL_PCC, SLTCTL_PIC_OFF, SLTCTL_PIC_ON, SLTSTA, SLTSTA_ABP, SLTSTA_PDS,
};
use rvmm_pci::root_port::ABSENT;
use rvmm_pci::{MsiMessage, PciDevice, PciSegment, SlotDevice, SlotError, SlotState};

/// The port under test is port 0, function 1:0 of the root bus.
const PORT_DEVICE: u8 = 1;
const DEVICE_ID: u32 = 0x5a5a_8086;

/// An endpoint that only answers its identity.
struct IdDevice;

impl PciDevice for IdDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == 0 {
            DEVICE_ID
        } else {
            0
        }
    }

    fn write_config_register(&mut self, _reg: usize, _offset: u64, _data: &[u8]) {}
}

/// Registers of the MSI capability (offsets from its start).
#[derive(Arbitrary, Clone, Copy, Debug)]
enum MsiReg {
    Control,
    AddressLow,
    AddressHigh,
    Data,
    Mask,
    Pending,
}

impl MsiReg {
    /// (offset, width in bytes).
    fn at(self) -> (usize, usize) {
        match self {
            MsiReg::Control => (0x02, 2),
            MsiReg::AddressLow => (0x04, 4),
            MsiReg::AddressHigh => (0x08, 4),
            MsiReg::Data => (0x0c, 2),
            MsiReg::Mask => (0x10, 4),
            MsiReg::Pending => (0x14, 4),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Guest: a Slot Control write.
    SlotControl(u16),
    /// Guest: a Slot Status write (RW1C).
    SlotStatus(u16),
    /// Guest: Slot Control and Status in one dword.
    SlotDword(u32),
    /// Guest: a Link Control write.
    LinkControl(u16),
    /// Guest: an MSI capability register.
    Msi { reg: MsiReg, value: u32 },
    /// Guest: any write to the port's config space.
    Write { byte: u16, data: Data },
    /// Guest: what Linux pciehp does at probe: MSI programmed and enabled, notifications on.
    GuestEnables,
    /// Guest: pciehp powering the slot on and lighting the power indicator.
    GuestPowerOn,
    /// Guest: pciehp powering the slot off and turning the indicator off.
    GuestPowerOff,
    /// Manager: hot-add a device.
    Insert,
    /// Manager: put a device in before the guest runs.
    InsertAtBoot,
    /// Manager: press the attention button.
    Attention,
    /// Manager: surprise removal.
    Surprise,
    /// Manager: take out a device the guest powered off.
    Take,
}

struct Machine {
    segment: PciSegment,
    sender: Arc<RecordingSender>,
    pcie: usize,
    msi: usize,
}

/// What the invariants compare against.
struct Before {
    present: bool,
    state: SlotState,
    powered_off: bool,
    sent: usize,
}

impl Machine {
    fn new() -> Self {
        let sender = Arc::new(RecordingSender::default());
        let segment = segment(2, sender.clone(), Arc::new(CountingEvents::default()));
        let (pcie, msi) = {
            let port = Self::port_of(&segment);
            (port.pcie_capability_offset(), port.msi_capability_offset())
        };
        Self {
            segment,
            sender,
            pcie,
            msi,
        }
    }

    fn port_of(segment: &PciSegment) -> std::sync::MutexGuard<'_, rvmm_pci::RootPort> {
        match segment.port(0) {
            Some(port) => port.lock().unwrap_or_else(|e| e.into_inner()),
            None => panic!("the segment has no port 0"),
        }
    }

    fn port(&self) -> std::sync::MutexGuard<'_, rvmm_pci::RootPort> {
        Self::port_of(&self.segment)
    }

    /// A guest write of `data` at config byte `at` of the port, as ECAM and 0xCF8 hand it on.
    fn write(&self, at: usize, data: &[u8]) {
        self.segment
            .write_config(0, PORT_DEVICE, 0, at / 4, (at % 4) as u64, data);
    }

    fn write_u16(&self, at: usize, value: u16) {
        self.write(at, &value.to_le_bytes());
    }

    fn write_u32(&self, at: usize, value: u32) {
        self.write(at, &value.to_le_bytes());
    }

    fn read_u32(&self, at: usize) -> u32 {
        self.segment.read_config(0, PORT_DEVICE, 0, at / 4)
    }

    fn read_u16(&self, at: usize) -> u16 {
        (self.read_u32(at & !3) >> ((at % 4) * 8)) as u16
    }

    fn slot_control(&self) -> u16 {
        self.read_u16(self.pcie + SLTCTL)
    }

    fn before(&self) -> Before {
        let port = self.port();
        Before {
            present: port.device().is_some(),
            state: port.slot_state(),
            powered_off: port.guest_powered_off(),
            sent: self.sender.count(),
        }
    }

    fn device() -> SlotDevice {
        Arc::new(Mutex::new(IdDevice))
    }

    fn apply(&self, op: &Op, before: &Before) {
        match op {
            Op::SlotControl(v) => self.write_u16(self.pcie + SLTCTL, *v),
            Op::SlotStatus(v) => self.write_u16(self.pcie + SLTSTA, *v),
            Op::SlotDword(v) => self.write_u32(self.pcie + SLTCTL, *v),
            Op::LinkControl(v) => self.write_u16(self.pcie + LNKCTL, *v),
            Op::Msi { reg, value } => {
                let (offset, width) = reg.at();
                let bytes = value.to_le_bytes();
                self.write(self.msi + offset, bytes.get(..width).unwrap_or(&bytes));
            }
            Op::Write { byte, data } => {
                let at = usize::from(byte & 0xfff);
                self.write(at, &data.bytes());
            }
            Op::GuestEnables => {
                self.write_u32(self.msi + 0x04, 0xfee0_0000);
                self.write_u32(self.msi + 0x08, 0);
                self.write_u16(self.msi + 0x0c, 0x0041);
                self.write_u16(self.msi + 0x02, 1);
                let enables = SLTCTL_HPIE | SLTCTL_CCIE | SLTCTL_ABPE | SLTCTL_DLLSCE;
                self.write_u16(self.pcie + SLTCTL, self.slot_control() | enables);
            }
            Op::GuestPowerOn => {
                let control =
                    (self.slot_control() & !(SLTCTL_PCC | SLTCTL_PIC_OFF)) | SLTCTL_PIC_ON;
                self.write_u16(self.pcie + SLTCTL, control);
            }
            Op::GuestPowerOff => {
                let control = self.slot_control() | SLTCTL_PCC | SLTCTL_PIC_OFF;
                self.write_u16(self.pcie + SLTCTL, control);
            }
            Op::Insert => {
                let ready = self.port().check_insert_ready();
                let result = self.port().insert_device(Self::device());
                assert_eq!(result, ready, "insert disagrees with check_insert_ready");
                if before.present {
                    assert!(
                        matches!(result, Err(SlotError::Occupied { .. })),
                        "insert into an occupied slot: {result:?}"
                    );
                }
                if result.is_ok() {
                    assert_eq!(self.port().slot_state(), SlotState::Adding);
                }
            }
            Op::InsertAtBoot => {
                let result = self.port().insert_device_at_boot(Self::device());
                assert_eq!(result.is_ok(), !before.present, "boot insert: {result:?}");
                if result.is_ok() {
                    let port = self.port();
                    assert_eq!(port.slot_state(), SlotState::Present);
                    assert!(port.link_active(), "a boot device without link");
                }
            }
            Op::Attention => {
                let result = self.port().press_attention_button();
                if !before.present {
                    assert!(matches!(result, Err(SlotError::Empty { .. })), "{result:?}");
                } else if before.state != SlotState::Present {
                    assert!(
                        matches!(result, Err(SlotError::WrongState { .. })),
                        "{result:?}"
                    );
                }
                if result.is_ok() {
                    let port = self.port();
                    assert_eq!(port.slot_state(), SlotState::Removing);
                    assert_ne!(
                        port.slot_status() & SLTSTA_ABP,
                        0,
                        "button press not latched"
                    );
                }
            }
            Op::Surprise => {
                let result = self.port().surprise_remove();
                assert_eq!(result.is_ok(), before.present, "surprise removal");
            }
            Op::Take => {
                let result = self.port().take_device();
                match (before.present, before.powered_off) {
                    (false, _) => assert!(matches!(result, Err(SlotError::Empty { .. }))),
                    (true, false) => {
                        assert!(matches!(result, Err(SlotError::NotPoweredOff { .. })))
                    }
                    (true, true) => assert!(result.is_ok(), "take: {:?}", result.err()),
                }
            }
        }
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.read_u32(self.msi + 0x08)) << 32
                | u64::from(self.read_u32(self.msi + 0x04)),
            data: u32::from(self.read_u16(self.msi + 0x0c)),
        }
    }

    fn check(&self, before: &Before) {
        // Registers first: reading them locks the port.
        let lnksta = self.read_u16(self.pcie + LNKSTA);
        let msi_control = self.read_u16(self.msi + 0x02);
        let msi_mask = self.read_u32(self.msi + 0x10);
        let message = self.message();
        let port = self.port();
        let present = port.device().is_some();
        assert_eq!(
            port.slot_state() == SlotState::Empty,
            !present,
            "slot state {:?} with a device: {present}",
            port.slot_state()
        );
        assert!(!port.link_active() || present, "link up without a device");
        assert_eq!(
            port.slot_status() & SLTSTA_PDS != 0,
            present,
            "presence detect does not match the slot"
        );
        assert_eq!(
            lnksta & LNKSTA_DLLLA != 0,
            port.link_active(),
            "Link Status does not match the link"
        );
        let secondary = port.bus_numbers().secondary;
        let id = port.read_downstream(secondary, 0, 0, 0);
        let expected = if port.link_active() {
            DEVICE_ID
        } else {
            ABSENT
        };
        assert_eq!(id, expected, "downstream device reachability");
        drop(port);
        if self.sender.count() > before.sent {
            assert_ne!(msi_control & 1, 0, "an MSI was sent with MSI disabled");
            assert_eq!(msi_mask & 1, 0, "an MSI was sent while masked");
            assert_eq!(
                self.sender.last(),
                Some(message),
                "the MSI sent is not the one programmed"
            );
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let machine = Machine::new();
    for op in ops.iter().take(MAX_OPS) {
        let before = machine.before();
        machine.apply(op, &before);
        machine.check(&before);
    }
});
