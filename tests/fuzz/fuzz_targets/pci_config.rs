//! PCI configuration accesses of a hostile guest through both front-ends a vCPU reaches: ports
//! 0xCF8/0xCFC (`PioConfigAccess`) and the ECAM window (`EcamAccess`), on a segment with a host
//! bridge, four root ports and two passthrough devices (the fake NVMe) behind ports 0 and 2.
//!
//! Invariants checked after every access: the identity of the host bridge, the root ports and
//! the passthrough devices never changes; an invalid ECAM access (size or dword crossing) reads
//! zero; the 0xCF8 address register reads back what was written; absent functions read all ones.
//! At the end both devices are released and must leave nothing behind in the VM.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvmm_devices::BusDevice;
use rvmm_fuzz::{segment, CountingEvents, Data, Passthrough, ReadLen, RecordingSender, MAX_OPS};
use rvmm_pci::root_port::ABSENT;
use rvmm_pci::{EcamAccess, PciDevice, PciSegment, PioConfigAccess, PIO_CONFIG_BASE};

const PORTS: usize = 4;
const HOST_BRIDGE_ID: u32 = 0x0008_1b36;
const ROOT_PORT_ID: u32 = 0x000c_1b36;
const PASSTHROUGH_ID: u32 = 0x10ca_8086;
/// Ports holding a passthrough device.
const OCCUPIED: [usize; 2] = [0, 2];

/// Which bus an ECAM access or a 0xCF8 address names.
#[derive(Arbitrary, Debug)]
enum BusSel {
    /// The root bus.
    Root,
    /// The secondary bus of root port `n % PORTS` as the guest has programmed it.
    Secondary(u8),
    /// Any bus number.
    Any(u8),
}

#[derive(Arbitrary, Debug)]
enum EcamAt {
    /// A function and a byte offset in its 4 KiB.
    Function {
        bus: BusSel,
        device: u8,
        function: u8,
        byte: u16,
    },
    /// Any offset into the window (and past it).
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A write to port 0xCF8 + `port % 8`.
    PioWrite { port: u8, data: Data },
    /// A read of port 0xCF8 + `port % 8`.
    PioRead { port: u8, len: ReadLen },
    /// A dword write to 0xCF8 selecting a function and register.
    PioSelect {
        enable: bool,
        bus: BusSel,
        device: u8,
        function: u8,
        reg: u8,
    },
    /// An ECAM write.
    EcamWrite { at: EcamAt, data: Data },
    /// An ECAM read.
    EcamRead { at: EcamAt, len: ReadLen },
}

struct Machine {
    segment: Arc<PciSegment>,
    pio: PioConfigAccess,
    ecam: EcamAccess,
    devices: Vec<Passthrough>,
    /// The last dword written to 0xCF8.
    address: u32,
}

impl Machine {
    fn new() -> Self {
        let segment = Arc::new(segment(
            PORTS,
            Arc::new(RecordingSender::default()),
            Arc::new(CountingEvents::default()),
        ));
        let mut devices = Vec::new();
        for (n, &port) in OCCUPIED.iter().enumerate() {
            let pt = Passthrough::nvme_like(Some(20 + n as u32));
            // Firmware-style placement inside the port's 32-bit window.
            let base = 0xc000_0000 + 0x0100_0000 * port as u64;
            pt.device.set_bar_address(0, base);
            pt.device.set_bar_address(2, base + 0x10_0000);
            pt.device.set_bar_address(4, 0xc000 + 0x100 * port as u64);
            let slot: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(pt.device.clone()));
            let Some(root_port) = segment.port(port) else {
                panic!("the segment has no port {port}");
            };
            if let Err(e) = root_port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert_device_at_boot(slot)
            {
                panic!("cannot put a device in port {port}: {e}");
            }
            devices.push(pt);
        }
        Self {
            pio: PioConfigAccess::new(segment.clone()),
            ecam: EcamAccess::new(segment.clone()),
            segment,
            devices,
            address: 0,
        }
    }

    fn bus(&self, sel: &BusSel) -> u8 {
        match sel {
            BusSel::Root => 0,
            BusSel::Secondary(n) => self.segment.port(usize::from(*n) % PORTS).map_or(0, |p| {
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .bus_numbers()
                    .secondary
            }),
            BusSel::Any(bus) => *bus,
        }
    }

    fn ecam_offset(&self, at: &EcamAt) -> u64 {
        match at {
            EcamAt::Function {
                bus,
                device,
                function,
                byte,
            } => {
                u64::from(self.bus(bus)) << 20
                    | u64::from(device & 0x1f) << 15
                    | u64::from(function & 0x7) << 12
                    | u64::from(byte & 0xfff)
            }
            EcamAt::Raw(offset) => *offset,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::PioWrite { port, data } => {
                let bytes = data.bytes();
                let port = u64::from(port % 8);
                self.pio.write(PIO_CONFIG_BASE, port, &bytes);
                if port == 0 {
                    if let Ok(dword) = <[u8; 4]>::try_from(bytes.as_slice()) {
                        self.address = u32::from_le_bytes(dword);
                    }
                }
            }
            Op::PioRead { port, len } => {
                let port = u64::from(port % 8);
                let mut data = vec![0xa5; len.len()];
                self.pio.read(PIO_CONFIG_BASE, port, &mut data);
                if port == 0 && data.len() == 4 {
                    assert_eq!(
                        data,
                        self.address.to_le_bytes(),
                        "0xCF8 does not read back the address written"
                    );
                }
            }
            Op::PioSelect {
                enable,
                bus,
                device,
                function,
                reg,
            } => {
                let address = u32::from(*enable) << 31
                    | u32::from(self.bus(bus)) << 16
                    | u32::from(device & 0x1f) << 11
                    | u32::from(function & 0x7) << 8
                    | u32::from(reg & 0x3f) << 2;
                self.pio.write(PIO_CONFIG_BASE, 0, &address.to_le_bytes());
                self.address = address;
            }
            Op::EcamWrite { at, data } => {
                let offset = self.ecam_offset(at);
                self.ecam.write(0, offset, &data.bytes());
            }
            Op::EcamRead { at, len } => {
                let offset = self.ecam_offset(at);
                let mut data = vec![0xa5; len.len()];
                self.ecam.read(0, offset, &mut data);
                let in_window = offset < self.segment.ecam_size();
                let valid =
                    matches!(data.len(), 1 | 2 | 4) && (offset % 4) as usize + data.len() <= 4;
                if in_window && !valid {
                    assert!(
                        data.iter().all(|&b| b == 0),
                        "invalid ECAM read of {} bytes at {offset:#x} returned {data:02x?}",
                        data.len()
                    );
                }
                if !in_window {
                    assert!(
                        data.iter().all(|&b| b == 0xff),
                        "ECAM read past the window at {offset:#x} returned {data:02x?}"
                    );
                }
            }
        }
    }

    fn check(&self) {
        let seg = &self.segment;
        assert_eq!(
            seg.read_config(0, 0, 0, 0),
            HOST_BRIDGE_ID,
            "host bridge identity"
        );
        for info in seg.ports() {
            let a = info.address;
            assert_eq!(
                seg.read_config(a.bus, a.device, a.function, 0),
                ROOT_PORT_ID,
                "identity of root port {}",
                info.index
            );
        }
        assert_eq!(seg.read_config(0, 31, 7, 0), ABSENT, "absent function");
        for &port in &OCCUPIED {
            let Some(root_port) = seg.port(port) else {
                continue;
            };
            let p = root_port.lock().unwrap_or_else(|e| e.into_inner());
            let id = p.read_downstream(p.bus_numbers().secondary, 0, 0, 0);
            let expected = if p.link_active() {
                PASSTHROUGH_ID
            } else {
                ABSENT
            };
            assert_eq!(id, expected, "identity of the device behind port {port}");
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut machine = Machine::new();
    for op in ops.iter().take(MAX_OPS) {
        machine.apply(op);
        machine.check();
    }
    for device in &machine.devices {
        device.release_and_check();
    }
});
