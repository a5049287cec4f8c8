//! MSI-X of a passthrough device under a hostile guest: table and PBA accesses through the
//! trapped pages of BAR 0 (any offset, any width), MSI-X and MSI capability writes, command
//! register toggles and BAR 0 moves, on the device model over the fake VFIO backend.
//!
//! Invariants checked after every step: an aligned dword or qword table write reads back (with
//! the reserved bits dropped); the live interrupt mode follows the capabilities (MSI-X, else
//! MSI, else INTx); in MSI-X mode exactly the unmasked vectors have an irqfd, each routed with its
//! vector's message; in INTx mode only the INTx line has one. At the end the device is released
//! and must leave nothing behind in the VM.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvmm_fuzz::{Data, Passthrough, ReadLen, MAX_OPS};
use rvmm_pci::{MsiMessage, PciDevice};
use rvmm_vfio::testing::RouterOp;
use rvmm_vfio::IrqMode;

const INTX_GSI: u32 = 20;
const BAR0: u64 = 0xd000_0000;
const TABLE: u64 = 0x2000;
const VECTORS: u64 = 16;
const MSIX_CAP: usize = 0xb0;
const MSI_CAP: usize = 0x50;
const MSI_CAP_LEN: u8 = 0x18;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A write in the table and PBA pages (BAR 0 + 0x2000 + `offset % 0x2000`).
    TableWrite { offset: u16, data: Data },
    /// A read in the table and PBA pages.
    TableRead { offset: u16, len: ReadLen },
    /// An aligned dword write to dword `dword % 4` of vector `vector % 20` (some past the table).
    Vector { vector: u8, dword: u8, value: u32 },
    /// An aligned qword write to half `high` of vector `vector % 20`.
    VectorQword { vector: u8, high: bool, value: u64 },
    /// A write to MSI-X Message Control.
    MsixControl(u16),
    /// Any write into the MSI-X capability.
    MsixCap { byte: u8, data: Data },
    /// Any write into the MSI capability.
    Msi { byte: u8, data: Data },
    /// A write to the command register.
    Command(u16),
    /// The guest moves BAR 0 (both halves written).
    MoveBar0 { low: u32, high: u32 },
}

struct Machine {
    pt: Passthrough,
}

impl Machine {
    fn new() -> Self {
        let mut pt = Passthrough::nvme_like(Some(INTX_GSI));
        pt.device.set_bar_address(0, BAR0);
        pt.device.set_bar_address(2, BAR0 + 0x10_0000);
        pt.device.set_bar_address(4, 0xc000);
        pt.device.write_config_register(1, 0, &[0x07, 0x00]);
        Self { pt }
    }

    fn cfg_write(&mut self, at: usize, data: &[u8]) {
        self.pt
            .device
            .write_config_register(at / 4, (at % 4) as u64, data);
    }

    fn cfg_read(&mut self, at: usize) -> u32 {
        self.pt.device.read_config_register(at / 4)
    }

    /// Where BAR 0 is placed in the guest, if it is.
    fn bar0(&self) -> Option<u64> {
        self.pt
            .device
            .placed_bars()
            .into_iter()
            .find_map(|(bar, gpa)| (bar == 0).then_some(gpa))
    }

    /// A table access at byte `offset` of the table: whether it reached a trapped range.
    fn table_write(&self, offset: u64, data: &[u8]) -> bool {
        match self.bar0().and_then(|b| b.checked_add(TABLE + offset)) {
            Some(addr) => self.pt.mmio.write(addr, data),
            None => false,
        }
    }

    fn table_read(&self, offset: u64, data: &mut [u8]) -> bool {
        match self.bar0().and_then(|b| b.checked_add(TABLE + offset)) {
            Some(addr) => self.pt.mmio.read(addr, data),
            None => false,
        }
    }

    fn table_dword(&self, offset: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.table_read(offset, &mut b)
            .then_some(u32::from_le_bytes(b))
    }

    /// What a table dword reads after `value` was written to it.
    fn stored(dword: u64, value: u32) -> u32 {
        match dword {
            0 => value & !0x3,
            3 => value & 1,
            _ => value,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::TableWrite { offset, data } => {
                self.table_write(u64::from(offset % 0x2000), &data.bytes());
            }
            Op::TableRead { offset, len } => {
                let mut data = vec![0xa5; len.len()];
                self.table_read(u64::from(offset % 0x2000), &mut data);
            }
            Op::Vector {
                vector,
                dword,
                value,
            } => {
                let vector = u64::from(vector % 20);
                let dword = u64::from(dword % 4);
                let offset = vector * 16 + dword * 4;
                if self.table_write(offset, &value.to_le_bytes()) && vector < VECTORS {
                    assert_eq!(
                        self.table_dword(offset),
                        Some(Self::stored(dword, *value)),
                        "MSI-X vector {vector} dword {dword} does not read back"
                    );
                }
            }
            Op::VectorQword {
                vector,
                high,
                value,
            } => {
                let vector = u64::from(vector % 20);
                let first = if *high { 2 } else { 0 };
                let offset = vector * 16 + first * 4;
                if self.table_write(offset, &value.to_le_bytes()) && vector < VECTORS {
                    for (i, half) in [*value as u32, (*value >> 32) as u32]
                        .into_iter()
                        .enumerate()
                    {
                        let dword = first + i as u64;
                        assert_eq!(
                            self.table_dword(offset + i as u64 * 4),
                            Some(Self::stored(dword, half)),
                            "MSI-X vector {vector} qword half {i} does not read back"
                        );
                    }
                }
            }
            Op::MsixControl(v) => self.cfg_write(MSIX_CAP + 2, &v.to_le_bytes()),
            Op::MsixCap { byte, data } => {
                self.cfg_write(MSIX_CAP + usize::from(byte % 12), &data.bytes())
            }
            Op::Msi { byte, data } => {
                self.cfg_write(MSI_CAP + usize::from(byte % MSI_CAP_LEN), &data.bytes())
            }
            Op::Command(v) => self.cfg_write(4, &v.to_le_bytes()),
            Op::MoveBar0 { low, high } => {
                self.cfg_write(0x10, &low.to_le_bytes());
                self.cfg_write(0x14, &high.to_le_bytes());
            }
        }
    }

    /// GSIs with an irqfd, from the router's log.
    fn irqfds(&self) -> Vec<u32> {
        let mut live: BTreeMap<u32, i32> = BTreeMap::new();
        for op in self.pt.router.ops() {
            match op {
                RouterOp::AddIrqfd(g) | RouterOp::AddResampleIrqfd(g) => {
                    *live.entry(g).or_default() += 1
                }
                RouterOp::RemoveIrqfd(g) => *live.entry(g).or_default() -= 1,
                _ => {}
            }
        }
        for (gsi, count) in &live {
            assert!(
                (0..=1).contains(count),
                "GSI {gsi} has {count} irqfds: added twice or removed without being added"
            );
        }
        live.into_iter()
            .filter_map(|(g, n)| (n == 1).then_some(g))
            .collect()
    }

    fn check(&mut self) {
        let msix_ctrl = self.cfg_read(MSIX_CAP) >> 16;
        let msi_ctrl = self.cfg_read(MSI_CAP) >> 16;
        let mode = self.pt.device.irq_mode();
        let expected_kind = if msix_ctrl & 0x8000 != 0 {
            "msix"
        } else if msi_ctrl & 1 != 0 {
            "msi"
        } else {
            "intx"
        };
        let kind = match mode {
            IrqMode::Msix(_) => "msix",
            IrqMode::Msi(_) => "msi",
            IrqMode::Intx => "intx",
            IrqMode::Off => "off",
        };
        assert_eq!(kind, expected_kind, "interrupt mode {mode:?}");
        let irqfds = self.irqfds();
        match mode {
            IrqMode::Msix(n) => {
                assert_eq!(u64::from(n), VECTORS, "MSI-X vector count");
                let Some(_) = self.bar0() else {
                    return;
                };
                let function_masked = msix_ctrl & 0x4000 != 0;
                let mut wanted = Vec::new();
                for v in 0..VECTORS {
                    let dw = |i: u64| self.table_dword(v * 16 + i * 4).unwrap_or(0);
                    if function_masked || dw(3) & 1 != 0 {
                        continue;
                    }
                    wanted.push(MsiMessage {
                        address: u64::from(dw(1)) << 32 | u64::from(dw(0)),
                        data: dw(2),
                    });
                }
                let mut routed: Vec<MsiMessage> = irqfds
                    .iter()
                    .map(|&gsi| self.pt.router.route(gsi).unwrap_or_default())
                    .collect();
                let key = |m: &MsiMessage| (m.address, m.data);
                wanted.sort_by_key(key);
                routed.sort_by_key(key);
                assert_eq!(
                    routed, wanted,
                    "irqfd routes do not match the unmasked vectors"
                );
            }
            IrqMode::Intx => assert_eq!(irqfds, vec![INTX_GSI], "INTx irqfds"),
            IrqMode::Off => assert!(irqfds.is_empty(), "irqfds with interrupts off"),
            IrqMode::Msi(_) => {}
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
