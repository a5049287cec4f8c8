//! Passthrough devices of a VM: host checks, the VFIO container with guest RAM mapped for DMA, the
//! device model, its root port and BAR placement inside that port's windows.

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvmm_pci::{
    AddressAllocator, AddressRange, PciAddress, PciSegment, SlotDevice, SlotError, SlotState,
};
use rvmm_vfio::container::{create_kvm_vfio_device, Container, ContainerError, Type1Iommu};
use rvmm_vfio::{
    check_passthrough_limit, BarKind, DeviceConfig, DeviceError, HostDevice, HostError, LimitError,
    Sysfs, VfioPciDevice,
};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::api::types::{DeviceSpec as ApiDeviceSpec, VmResources};
use crate::api::AddDeviceRequest;
use crate::guest_mmio::KvmGuestMmio;
use crate::irq_routing::GsiRouter;

/// A passthrough device as asked for: `path=/sys/bus/pci/devices/BDF[,id=NAME]` or a bare BDF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Host device: sysfs path or BDF.
    pub path: String,
    /// Name in the VM; generated when absent.
    pub id: Option<String>,
}

impl DeviceSpec {
    /// The passthrough device of an add request (API or `--device`); VF pool requests are
    /// refused until rvmm manages VF pools.
    pub fn from_request(req: &AddDeviceRequest) -> Result<Self, PassthroughError> {
        match &req.device {
            ApiDeviceSpec::Host(bdf) => Ok(Self {
                path: bdf.to_string(),
                id: req.id.as_ref().map(|id| id.as_str().to_owned()),
            }),
            ApiDeviceSpec::Vf(_) => Err(PassthroughError::VfPoolUnsupported),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "path={}", self.path)?;
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        Ok(())
    }
}

/// Errors of attaching a passthrough device.
#[derive(Debug, Error)]
pub enum PassthroughError {
    /// The VM has the most passthrough devices it may have.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The id is taken.
    #[error("device id {0:?} is already used in this VM")]
    DuplicateId(String),
    /// The host device is already in this VM.
    #[error("host device {bdf} is already attached to this VM as {id:?}")]
    AlreadyAttached {
        /// The host device.
        bdf: String,
        /// Its id in the VM.
        id: String,
    },
    /// The host device cannot be used.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Every root port has a device.
    #[error("no free hotplug port (used {used} of {total}); start the VM with more --root-ports")]
    NoFreePort {
        /// Ports in use.
        used: usize,
        /// Ports in all.
        total: usize,
    },
    /// The VFIO container could not be created.
    #[error("cannot set up the VFIO container")]
    Container(#[source] ContainerError),
    /// The device model could not be built.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A BAR does not fit the port's window.
    #[error("BAR {bar} of host device {bdf} ({size:#x} bytes) does not fit the {window} window of root port {port} ({window_size:#x} bytes); use fewer --root-ports so each gets a larger window")]
    BarDoesNotFit {
        /// The host device.
        bdf: String,
        /// BAR index.
        bar: usize,
        /// Its size.
        size: u64,
        /// Which window.
        window: &'static str,
        /// Port index.
        port: usize,
        /// Size of that window.
        window_size: u64,
    },
    /// `vf=PF` requests need VF pool management.
    #[error("adding a VF from a PF's pool (vf=PF) is not supported by this rvmm yet; bind a VF to vfio-pci and give its address with path=")]
    VfPoolUnsupported,
    /// No device has this id.
    #[error("no device with id {0:?}")]
    UnknownId(String),
    /// The segment has no such port (an internal inconsistency).
    #[error("root port {0} does not exist")]
    NoSuchPort(usize),
    /// The slot refused the device.
    #[error("root port {port} refused the device")]
    Slot {
        /// Port index.
        port: usize,
        /// The slot error.
        #[source]
        source: SlotError,
    },
}

/// A device attached to the VM.
pub struct AttachedDevice {
    /// Its id in the VM.
    pub id: String,
    /// The host device.
    pub host: HostDevice,
    /// Index of its root port.
    pub port: usize,
    /// Physical slot number of that port.
    pub slot: u16,
    /// Its address in the guest.
    pub guest_bdf: PciAddress,
    /// The device model.
    pub device: VfioPciDevice,
    /// Where it is in its hotplug life.
    pub state: DeviceState,
}

/// Hotplug state of an attached device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Opened and placed; the guest has not taken it yet.
    Adding,
    /// The guest has it.
    Present,
    /// Removal under way (attention button pressed, waiting for the guest).
    Removing,
}

/// The passthrough devices of one VM and what they share.
pub struct Passthrough {
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    router: Arc<GsiRouter>,
    guest_mmio: Arc<KvmGuestMmio>,
    sysfs: Sysfs,
    container: Option<Arc<Container>>,
    devices: Vec<AttachedDevice>,
    next_id: usize,
}

impl Passthrough {
    /// Creates the manager; no VFIO object is opened before the first device.
    pub fn new(
        vm_fd: Arc<VmFd>,
        memory: GuestMemoryMmap,
        router: Arc<GsiRouter>,
        guest_mmio: Arc<KvmGuestMmio>,
    ) -> Self {
        Self {
            vm_fd,
            memory,
            router,
            guest_mmio,
            sysfs: Sysfs::new(),
            container: None,
            devices: Vec::new(),
            next_id: 0,
        }
    }

    /// The attached devices.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// What the VM holds on the host: fds, device memory slots, MSI routes and GSIs.
    pub fn resources(&self) -> VmResources {
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        VmResources {
            open_fds,
            memory_slots: self.guest_mmio.slots_in_use() as u64,
            msi_routes: self.router.msi_routes() as u64,
            msi_gsis: self.router.allocated() as u64,
        }
    }

    /// The VM's container, created (with every RAM region registered for DMA) on first use.
    fn container(&mut self) -> Result<Arc<Container>, PassthroughError> {
        if let Some(c) = &self.container {
            return Ok(c.clone());
        }
        let kvm_vfio = create_kvm_vfio_device(&self.vm_fd).map_err(PassthroughError::Container)?;
        let iommu = Type1Iommu::new(Some(kvm_vfio)).map_err(PassthroughError::Container)?;
        let container = Container::new(Box::new(iommu));
        for region in self.memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| {
                    PassthroughError::Container(ContainerError::InvalidRegion {
                        gpa: region.start_addr().raw_value(),
                        size: region.len(),
                    })
                })?;
            // SAFETY: guest RAM is a private mapping owned by the VM's GuestMemoryMmap, which
            // `self.memory` keeps alive (and never remaps) for as long as the container exists;
            // the VMM only touches it through vm-memory's volatile accessors.
            unsafe {
                container.map_guest_ram(region.start_addr().raw_value(), region.len(), host as u64)
            }
            .map_err(PassthroughError::Container)?;
        }
        self.container = Some(container.clone());
        Ok(container)
    }

    /// Checks the host device and the VM's limits, opens the device, places its BARs in a free
    /// root port's windows and returns it with its port; the caller puts it in the slot.
    fn prepare(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<(String, HostDevice, usize, VfioPciDevice), PassthroughError> {
        check_passthrough_limit(self.devices.len())?;
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => loop {
                let candidate = format!("dev{}", self.next_id);
                self.next_id += 1;
                if !self.devices.iter().any(|d| d.id == candidate) {
                    break candidate;
                }
            },
        };
        if self.devices.iter().any(|d| d.id == id) {
            return Err(PassthroughError::DuplicateId(id));
        }
        let host = self.sysfs.prepare(&spec.path)?;
        if let Some(d) = self.devices.iter().find(|d| d.host.bdf == host.bdf) {
            return Err(PassthroughError::AlreadyAttached {
                bdf: host.bdf.to_string(),
                id: d.id.clone(),
            });
        }
        self.sysfs.check_memlock(self.memory_size())?;
        let port = self.free_port(segment)?;
        let container = self.container()?;
        let device = VfioPciDevice::open(
            &container,
            &self.sysfs,
            &host,
            DeviceConfig { intx_gsi: None },
            self.router.clone(),
            self.guest_mmio.clone(),
        )?;
        place_bars(&device, &host, port, segment)?;
        Ok((id, host, port, device))
    }

    /// Attaches a device before the guest starts: it is present and powered in its slot.
    pub fn attach_at_boot(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<&AttachedDevice, PassthroughError> {
        let index = self.attach(spec, segment)?;
        let d = &self.devices[index];
        let slot_device: SlotDevice = Arc::new(Mutex::new(d.device.clone()));
        let inserted = match segment.port(d.port) {
            Some(p) => p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert_device_at_boot(slot_device)
                .map_err(|source| PassthroughError::Slot {
                    port: d.port,
                    source,
                }),
            None => Err(PassthroughError::NoSuchPort(d.port)),
        };
        if let Err(e) = inserted {
            let d = self.devices.remove(index);
            d.device.release();
            return Err(e);
        }
        let d = &mut self.devices[index];
        d.state = DeviceState::Present;
        Ok(d)
    }

    /// Opens a device for hot-add and reserves a port for it; the caller puts it into the slot
    /// (see [`Passthrough::insert_into_slot`]) when the slot is ready. Returns its index.
    pub fn attach(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<usize, PassthroughError> {
        let (id, host, port, device) = self.prepare(spec, segment)?;
        let info = segment.ports()[port];
        log::info!(
            "passthrough {id}: host {} for guest 0000:{:02x}:00.0 (slot {})",
            host.bdf,
            info.secondary_bus,
            info.slot_number
        );
        self.devices.push(AttachedDevice {
            id,
            host,
            port,
            slot: info.slot_number,
            guest_bdf: PciAddress {
                bus: info.secondary_bus,
                device: 0,
                function: 0,
            },
            device,
            state: DeviceState::Adding,
        });
        Ok(self.devices.len() - 1)
    }

    /// Tells the guest about device `id` (presence detect + link up on its slot).
    pub fn insert_into_slot(&self, id: &str, segment: &PciSegment) -> Result<(), PassthroughError> {
        let d = self
            .get(id)
            .ok_or_else(|| PassthroughError::UnknownId(id.to_owned()))?;
        let port = segment
            .port(d.port)
            .ok_or(PassthroughError::NoSuchPort(d.port))?;
        let slot_device: SlotDevice = Arc::new(Mutex::new(d.device.clone()));
        let r = port
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert_device(slot_device)
            .map_err(|source| PassthroughError::Slot {
                port: d.port,
                source,
            });
        r
    }

    /// The device with id `id`.
    pub fn get(&self, id: &str) -> Option<&AttachedDevice> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// The device with id `id`, mutable.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut AttachedDevice> {
        self.devices.iter_mut().find(|d| d.id == id)
    }

    /// Takes device `id` out of the VM's list and releases it (unmap, interrupts off, reset,
    /// fds closed); its port, GSIs and memory slots are free again when this returns.
    pub fn detach(&mut self, id: &str) -> Option<AttachedDevice> {
        let pos = self.devices.iter().position(|d| d.id == id)?;
        let d = self.devices.remove(pos);
        d.device.release();
        Some(d)
    }

    fn memory_size(&self) -> u64 {
        self.memory.iter().map(|r| r.len()).sum()
    }

    /// The first root port whose slot is empty and not promised to another device.
    fn free_port(&self, segment: &PciSegment) -> Result<usize, PassthroughError> {
        let total = segment.ports().len();
        let mut used = 0;
        let mut free = None;
        for info in segment.ports() {
            let Some(port) = segment.port(info.index) else {
                continue;
            };
            let state = port.lock().unwrap_or_else(|e| e.into_inner()).slot_state();
            let taken =
                state != SlotState::Empty || self.devices.iter().any(|d| d.port == info.index);
            if taken {
                used += 1;
            } else if free.is_none() {
                free = Some(info.index);
            }
        }
        free.ok_or(PassthroughError::NoFreePort { used, total })
    }
}

/// Places every memory BAR in the port's windows, largest first, naturally aligned:
/// 64-bit prefetchable BARs in the 64-bit window, the rest in the 32-bit window. I/O BARs are left
/// unassigned (root ports have no I/O window).
fn place_bars(
    device: &VfioPciDevice,
    host: &HostDevice,
    port: usize,
    segment: &PciSegment,
) -> Result<(), PassthroughError> {
    let windows = segment.ports()[port].windows;
    let mut alloc32 = allocator(windows.mmio32);
    let mut alloc64 = allocator(windows.mmio64);
    let mut bars = device.bars();
    bars.sort_by_key(|b| std::cmp::Reverse(b.size));
    for bar in bars {
        let (alloc, window, name) = match bar.kind {
            BarKind::Io => {
                log::warn!(
                    "host device {}: I/O BAR {} is not mapped (root ports have no I/O window)",
                    host.bdf,
                    bar.index
                );
                continue;
            }
            BarKind::Mem64 { prefetchable: true } if alloc64.is_some() => {
                (alloc64.as_mut(), windows.mmio64, "64-bit prefetchable")
            }
            _ => (alloc32.as_mut(), windows.mmio32, "32-bit"),
        };
        let gpa = alloc
            .and_then(|a| a.allocate(bar.size, bar.size).ok())
            .ok_or_else(|| PassthroughError::BarDoesNotFit {
                bdf: host.bdf.to_string(),
                bar: bar.index,
                size: bar.size,
                window: name,
                port,
                window_size: window.size,
            })?;
        device.set_bar_address(bar.index, gpa);
    }
    Ok(())
}

fn allocator(range: AddressRange) -> Option<AddressAllocator> {
    (range.size > 0)
        .then(|| AddressAllocator::new(range).ok())
        .flatten()
}
