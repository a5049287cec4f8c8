//! Shared pieces of rvmm's fuzz targets: the guest's access widths, recording fakes of the
//! traits the PCI model calls out through, and the machines the targets drive (a segment with
//! root ports and passthrough devices, a passthrough device over the fake VFIO backend).
//!
//! Every target decodes its input with [`arbitrary`] into a short list of operations, applies them
//! through the same entry points a vCPU or the API server uses, and checks invariants after each
//! step. A panic anywhere (an out-of-bounds index, an overflow in a debug build, a broken
//! invariant) is a crash libFuzzer reports.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use rvmm_pci::allocator::AddressRange;
use rvmm_pci::root_port::slot::SlotEvents;
use rvmm_pci::{LinkSpeed, LinkWidth, MsiMessage, MsiSender, PciSegment, SegmentConfig};
use rvmm_vfio::testing::{FakeDevice, FakeMmio, FakeRouter};
use rvmm_vfio::{DeviceConfig, VfioPciDevice};

/// Most operations one input is decoded into: bounds the time one input takes.
pub const MAX_OPS: usize = 256;

/// The data of one guest write: the widths a CPU issues, plus odd lengths a buggy caller could
/// pass (the bus hands devices whatever length the exit reports).
#[derive(Arbitrary, Clone, Debug)]
pub enum Data {
    /// A byte.
    Byte(u8),
    /// A word.
    Word(u16),
    /// A dword.
    Dword(u32),
    /// A qword (MSI-X table accesses may be 8 bytes wide).
    Qword(u64),
    /// Any bytes (at most 16 are used).
    Raw(Vec<u8>),
}

impl Data {
    /// The bytes of the access, little-endian.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Data::Byte(v) => vec![*v],
            Data::Word(v) => v.to_le_bytes().to_vec(),
            Data::Dword(v) => v.to_le_bytes().to_vec(),
            Data::Qword(v) => v.to_le_bytes().to_vec(),
            Data::Raw(v) => v.iter().copied().take(16).collect(),
        }
    }
}

/// The length of a guest read: 1, 2, 4 or 8 bytes, or an odd one.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum ReadLen {
    /// 1 byte.
    Byte,
    /// 2 bytes.
    Word,
    /// 4 bytes.
    Dword,
    /// 8 bytes.
    Qword,
    /// 0 to 15 bytes.
    Odd(u8),
}

impl ReadLen {
    /// The number of bytes.
    pub fn len(self) -> usize {
        match self {
            ReadLen::Byte => 1,
            ReadLen::Word => 2,
            ReadLen::Dword => 4,
            ReadLen::Qword => 8,
            ReadLen::Odd(n) => usize::from(n % 16),
        }
    }

    /// Whether the length is zero.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// An [`MsiSender`] that records every message.
#[derive(Default)]
pub struct RecordingSender {
    sent: Mutex<Vec<MsiMessage>>,
}

impl RecordingSender {
    /// How many messages were sent so far.
    pub fn count(&self) -> usize {
        self.sent.lock().map_or(0, |sent| sent.len())
    }

    /// The last message sent.
    pub fn last(&self) -> Option<MsiMessage> {
        self.sent.lock().ok().and_then(|sent| sent.last().copied())
    }
}

impl MsiSender for RecordingSender {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        if let Ok(mut sent) = self.sent.lock() {
            sent.push(msg);
        }
        Ok(())
    }
}

/// A [`SlotEvents`] that counts notifications, as the VMM's eventfd-writing observer would.
#[derive(Default)]
pub struct CountingEvents {
    calls: AtomicUsize,
}

impl CountingEvents {
    /// How many notifications arrived so far.
    pub fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl SlotEvents for CountingEvents {
    fn slot_changed(&self, _port: usize) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// Base of the ECAM window the targets use (the VMM's).
pub const ECAM_BASE: u64 = 0xe000_0000;

/// The VMM's segment shape with `ports` root ports: buses 0..=255, a 32-bit window of 512 MiB
/// below the ECAM and a 64-bit window of 64 GiB.
pub fn segment(ports: usize, msi: Arc<RecordingSender>, events: Arc<CountingEvents>) -> PciSegment {
    let config = SegmentConfig {
        ecam_base: ECAM_BASE,
        bus_start: 0,
        bus_end: 255,
        mmio32: AddressRange::new(0xc000_0000, 0x2000_0000),
        mmio64: AddressRange::new(0x100_0000_0000, 0x10_0000_0000),
        mmio64_per_port: None,
        mmio64_minimums: Vec::new(),
        io: AddressRange::new(0x1000, 0xf000),
        root_ports: ports,
        link_speed: LinkSpeed::Gen4,
        link_width: LinkWidth::X16,
        root_buses: 1,
    };
    match PciSegment::new(config, msi, events) {
        Ok(segment) => segment,
        Err(e) => panic!("the fuzz segment configuration is invalid: {e}"),
    }
}

/// A passthrough device over the fake NVMe-like VFIO backend, with the fakes it talks to.
pub struct Passthrough {
    /// The device model.
    pub device: VfioPciDevice,
    /// The fake host device behind it.
    pub backend: FakeDevice,
    /// The fake interrupt router (GSIs, routes, irqfds).
    pub router: Arc<FakeRouter>,
    /// The fake guest address space (memory slots, trapped ranges on a bus).
    pub mmio: Arc<FakeMmio>,
}

impl Passthrough {
    /// Opens the NVMe-like fake (BAR0 16 KiB with the MSI-X table at 0x2000 and the PBA at
    /// 0x3000, MSI, PCIe, hidden capabilities) with INTx on GSI `intx_gsi`.
    pub fn nvme_like(intx_gsi: Option<u32>) -> Self {
        let backend = FakeDevice::nvme_like();
        let router = Arc::new(FakeRouter::default());
        let mmio = Arc::new(FakeMmio::default());
        let device = VfioPciDevice::with_backend(
            "0000:01:00.0".to_string(),
            Box::new(backend.clone()),
            DeviceConfig { intx_gsi },
            router.clone(),
            mmio.clone(),
        );
        match device {
            Ok(device) => Self {
                device,
                backend,
                router,
                mmio,
            },
            Err(e) => panic!("the fake NVMe cannot be opened: {e}"),
        }
    }

    /// Releases the device and checks that nothing it held in the VM is left: no GSI, no memory
    /// slot, no trapped range, no enabled VFIO interrupt.
    pub fn release_and_check(&self) {
        self.device.release();
        assert!(
            self.router.live_gsis().is_empty(),
            "GSIs left after release: {:?}",
            self.router.live_gsis()
        );
        assert!(
            self.mmio.live_slots().is_empty(),
            "memory slots left after release: {:?}",
            self.mmio.live_slots()
        );
        assert!(
            self.mmio.live_traps().is_empty(),
            "trapped ranges left after release: {:?}",
            self.mmio.live_traps()
        );
        // INTx, MSI, MSI-X, error and request: VFIO IRQ indexes 0 to 4.
        for index in 0u32..5 {
            assert_eq!(
                self.backend.enabled_irq(index),
                None,
                "VFIO IRQ index {index} left enabled after release"
            );
        }
    }
}
