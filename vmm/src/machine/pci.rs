//! The PCIe segment of the VM: host bridge and hotplug-capable root ports behind ECAM and
//! 0xCF8/0xCFC.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvmm_devices::{Bus, SharedBusDevice};
use rvmm_pci::segment::SegmentError;
use rvmm_pci::{
    AddressRange, EcamAccess, LinkSpeed, LinkWidth, PciSegment, PioConfigAccess, SegmentConfig,
    SlotEvents, PIO_CONFIG_BASE, PIO_CONFIG_LEN,
};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::msi::KvmMsiSender;
use crate::machine::layout;

/// Last bus number of the segment: the ECAM covers all 256 buses.
pub const BUS_END: u8 = 255;

/// Wakes the event loop when the guest changes a slot (power, indicators, status bits).
pub struct SlotNotifier {
    event: EventFd,
}

impl SlotNotifier {
    /// Creates the notifier.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The event fd the event loop waits on.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl SlotEvents for SlotNotifier {
    fn slot_changed(&self, port: usize) {
        if let Err(e) = self.event.write(1) {
            log::warn!("cannot signal a change of slot {port}: {e}");
        }
    }
}

/// The segment and the bus front-ends that expose it.
pub struct PciRoot {
    /// The segment: host bridge and root ports.
    pub segment: Arc<PciSegment>,
    /// Guest slot changes.
    pub notifier: Arc<SlotNotifier>,
    /// The 0xCF8 and ECAM front-ends; the buses only hold weak references to them.
    _front_ends: Vec<SharedBusDevice>,
}

/// Errors of building the PCI segment.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The segment could not be built.
    #[error("cannot build the PCIe topology")]
    Segment(#[source] SegmentError),
    /// A front-end could not be registered.
    #[error("cannot register PCI configuration access at {base:#x}")]
    Register {
        /// Its base.
        base: u64,
        /// The bus error.
        #[source]
        source: rvmm_devices::BusError,
    },
    /// The slot notifier could not be created.
    #[error("cannot create the slot change event")]
    Notifier(#[source] std::io::Error),
}

impl PciRoot {
    /// Builds `root_ports` root ports sharing the 32-bit window and `mmio64` on `root_buses`
    /// root buses (1, or one per guest NUMA node: port `i` on root bus `i % root_buses`), and
    /// registers the config-space front-ends on the buses.
    pub fn new(
        vm_fd: &Arc<VmFd>,
        pio: &Bus,
        mmio: &Bus,
        root_ports: u8,
        (mmio64, mmio64_per_port): ((u64, u64), Option<u64>),
        mmio64_minimums: Vec<u64>,
        root_buses: usize,
    ) -> Result<Self, PciError> {
        let notifier = Arc::new(SlotNotifier::new().map_err(PciError::Notifier)?);
        let config = SegmentConfig {
            ecam_base: layout::PCI_ECAM_START,
            bus_start: 0,
            bus_end: BUS_END,
            mmio32: AddressRange::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            mmio64: AddressRange::new(mmio64.0, mmio64.1),
            mmio64_per_port,
            mmio64_minimums,
            io: AddressRange::new(layout::PCI_IO_START, layout::PCI_IO_SIZE),
            root_ports: usize::from(root_ports),
            link_speed: LinkSpeed::Gen4,
            link_width: LinkWidth::X8,
            root_buses: root_buses.clamp(1, usize::from(root_ports.max(1))),
        };
        let segment = Arc::new(
            PciSegment::new(
                config,
                Arc::new(KvmMsiSender::new(vm_fd.clone())),
                notifier.clone(),
            )
            .map_err(PciError::Segment)?,
        );
        let pio_dev: SharedBusDevice = Arc::new(Mutex::new(PioConfigAccess::new(segment.clone())));
        pio.insert(&pio_dev, PIO_CONFIG_BASE, PIO_CONFIG_LEN)
            .map_err(|source| PciError::Register {
                base: PIO_CONFIG_BASE,
                source,
            })?;
        let ecam: SharedBusDevice = Arc::new(Mutex::new(EcamAccess::new(segment.clone())));
        mmio.insert(&ecam, layout::PCI_ECAM_START, segment.ecam_size())
            .map_err(|source| PciError::Register {
                base: layout::PCI_ECAM_START,
                source,
            })?;
        Ok(Self {
            segment,
            notifier,
            _front_ends: vec![pio_dev, ecam],
        })
    }

    /// The host bridges of a segment with several root buses, for ACPI: bridge `g` in proximity
    /// domain `g`, its bus range, its ports and their windows; empty with one root bus.
    pub fn numa_bridges(&self) -> Vec<rvmm_acpi::NumaBridge> {
        let config = self.segment.config();
        let k = config.root_buses;
        if k <= 1 {
            return Vec::new();
        }
        (0..k)
            .map(|g| {
                let (bus_start, bus_end) = config.root_bus_range(g);
                let ports: Vec<&rvmm_pci::segment::PortInfo> = self
                    .segment
                    .ports()
                    .iter()
                    .filter(|p| p.index % k == g)
                    .collect();
                rvmm_acpi::NumaBridge {
                    domain: g as u32,
                    bus_start,
                    bus_end,
                    ports: ports.iter().map(|p| p.index).collect(),
                    windows: ports
                        .iter()
                        .flat_map(|p| [p.windows.mmio32, p.windows.mmio64])
                        .map(|w| rvmm_acpi::MmioWindow {
                            base: w.base,
                            size: w.size,
                        })
                        .collect(),
                    io_windows: ports
                        .iter()
                        .filter_map(|p| p.windows.io)
                        .filter_map(|w| {
                            Some(rvmm_acpi::IoWindow {
                                base: u16::try_from(w.base).ok()?,
                                size: u32::try_from(w.size).ok()?,
                            })
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Root ports for ACPI: (device, function, physical slot number).
    pub fn acpi_ports(&self) -> Vec<(u8, u8, u16, u32)> {
        self.segment
            .ports()
            .iter()
            .map(|p| {
                (
                    p.address.device,
                    p.address.function,
                    p.slot_number,
                    layout::port_intx_gsi(p.index),
                )
            })
            .collect()
    }
}
