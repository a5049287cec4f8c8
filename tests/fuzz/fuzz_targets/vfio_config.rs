//! The virtual config space of a passthrough device under a hostile guest: reads and writes of
//! any register (including past the 4 KiB), at any byte offset and width, on the device model
//! over the fake NVMe-like VFIO backend.
//!
//! Invariants checked after every step: the guest never changes the host device's BARs, ROM,
//! emulated capabilities (MSI, MSI-X, AER), hidden capabilities (AF, SR-IOV, ARI, Resizable BAR),
//! capability headers or the protected PCIe control bits (initiate FLR, MPS, link disable,
//! retrain, ASPM, ARI forwarding); the identity and BAR type bits it reads never change, unimplemented BARs stay zero; the
//! capability lists it walks end and never show a hidden capability; registers past the config
//! space read zero. At the end the device is released and must leave nothing behind in the VM.

#![no_main]

use std::ops::Range;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvmm_fuzz::{Data, Passthrough, MAX_OPS};
use rvmm_pci::PciDevice;

const DEVICE_ID: u32 = 0x10ca_8086;
/// Byte ranges of the host's config space the guest must never change (see
/// `FakeDevice::nvme_like` for the layout): IDs, class, header type, BARs, subsystem, ROM,
/// capability pointer, interrupt line and pin; each capability header; MSI; PCIe Device Capabilities;
/// MSI-X; AF; the extended headers; the AER registers (emulated: the guest's are its own);
/// SR-IOV, ARI, Resizable BAR.
const PROTECTED: [Range<usize>; 14] = [
    0x00..0x04,
    0x08..0x0c,
    0x0e..0x40,
    0x40..0x42,
    0x50..0x68,
    0x70..0x72,
    0x74..0x78,
    0xb0..0xbc,
    0xc0..0xc8,
    0x100..0x104,
    0x104..0x140,
    0x140..0x188,
    0x1c0..0x1f4,
    0x200..0x204,
];
/// (offset, bits) of the PCIe control registers whose protected bits keep the host value:
/// Device Control, Link Control, Device Control 2.
const KEPT_BITS: [(usize, u32); 3] = [(0x78, 0x0000_82e0), (0x80, 0x0000_0033), (0x98, 0x20)];
/// (BAR, type bits mask, type bits) of the implemented BARs: BAR 0 64-bit memory (BAR 1 is its
/// upper half), BAR 2 32-bit prefetchable memory, BAR 4 I/O.
const BAR_FLAGS: [(usize, u32, u32); 3] = [(0, 0xf, 0x4), (2, 0xf, 0x8), (4, 0x3, 0x1)];
/// BARs the device does not implement: they read zero whatever the guest writes.
const UNIMPLEMENTED_BARS: [usize; 2] = [3, 5];
/// Config space length the guest sees; registers from here on read zero.
const CONFIG_REGS: usize = 1024;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A write at register `reg % 1100`, byte offset `offset % 8` (4..8 are invalid).
    Write { reg: u16, offset: u8, data: Data },
    /// A read of register `reg % 1100`.
    Read { reg: u16 },
    /// BAR sizing: all ones to BAR register `bar % 7` (6 is the ROM).
    Size { bar: u8 },
}

struct Machine {
    pt: Passthrough,
    /// The host's config space as the device model left it after opening.
    host: Vec<u8>,
}

fn dword(cfg: &[u8], at: usize) -> u32 {
    cfg.get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes)
}

impl Machine {
    fn new() -> Self {
        let pt = Passthrough::nvme_like(Some(20));
        let host = pt.backend.config();
        Self { pt, host }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { reg, offset, data } => {
                let reg = usize::from(reg % 1100);
                self.pt
                    .device
                    .write_config_register(reg, u64::from(offset % 8), &data.bytes());
            }
            Op::Read { reg } => {
                let reg = usize::from(reg % 1100);
                let value = self.pt.device.read_config_register(reg);
                if reg >= CONFIG_REGS {
                    assert_eq!(
                        value, 0,
                        "register {reg} past the config space reads {value:#x}"
                    );
                }
            }
            Op::Size { bar } => {
                let reg = if bar % 7 == 6 {
                    12
                } else {
                    4 + usize::from(bar % 7)
                };
                self.pt
                    .device
                    .write_config_register(reg, 0, &u32::MAX.to_le_bytes());
            }
        }
    }

    /// The capability IDs the guest finds walking the standard list.
    fn caps(&mut self) -> Vec<u8> {
        let mut ids = Vec::new();
        let mut at = (self.pt.device.read_config_register(0x34 / 4) & 0xfc) as usize;
        while at != 0 {
            assert!(ids.len() < 48, "the capability list does not end");
            let header = self.pt.device.read_config_register(at / 4);
            ids.push(header as u8);
            at = ((header >> 8) & 0xfc) as usize;
        }
        ids
    }

    /// The extended capability IDs the guest finds walking the extended list.
    fn ext_caps(&mut self) -> Vec<u16> {
        let mut ids = Vec::new();
        let mut at = 0x100usize;
        while at != 0 {
            assert!(ids.len() < 960, "the extended capability list does not end");
            let header = self.pt.device.read_config_register(at / 4);
            if header == 0 {
                break;
            }
            ids.push(header as u16);
            at = ((header >> 20) & 0xffc) as usize;
        }
        ids
    }

    fn check(&mut self) {
        let now = self.pt.backend.config();
        for range in &PROTECTED {
            assert_eq!(
                now.get(range.clone()),
                self.host.get(range.clone()),
                "the guest changed host config bytes {range:x?}"
            );
        }
        for (at, bits) in KEPT_BITS {
            assert_eq!(
                dword(&now, at) & bits,
                dword(&self.host, at) & bits,
                "the guest changed protected bits {bits:#x} of host register {at:#x}"
            );
        }
        let dev = &mut self.pt.device;
        assert_eq!(dev.read_config_register(0), DEVICE_ID, "identity");
        assert_eq!(dev.read_config_register(3) >> 16 & 0x7f, 0, "header type");
        for (bar, mask, flags) in BAR_FLAGS {
            let raw = dev.read_config_register(4 + bar);
            assert_eq!(raw & mask, flags, "type bits of BAR {bar}");
        }
        for bar in UNIMPLEMENTED_BARS {
            assert_eq!(
                dev.read_config_register(4 + bar),
                0,
                "unimplemented BAR {bar}"
            );
        }
        let caps = self.caps();
        assert!(!caps.contains(&0x13), "AF is visible: {caps:x?}");
        let ext = self.ext_caps();
        for hidden in [0x0e, 0x10, 0x15] {
            assert!(
                !ext.contains(&hidden),
                "extended capability {hidden:#x} is visible: {ext:x?}"
            );
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut machine = Machine::new();
    for op in ops.iter().take(MAX_OPS) {
        machine.apply(op);
        machine.check();
    }
    machine.pt.release_and_check();
});
