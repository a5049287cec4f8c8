//! Passthrough devices of a VM: host checks, the VFIO container with guest RAM mapped for DMA, the
//! device model, its root port and BAR placement inside that port's windows.

use std::fmt;
use std::str::FromStr;
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

/// Errors in a device spec.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceSpecError {
    /// No `path=`.
    #[error("device {0:?} has no path: use path=/sys/bus/pci/devices/BDF[,id=NAME] or a bare BDF")]
    NoPath(String),
    /// A key that is not known.
    #[error("device {spec:?}: unknown key {key:?} (known: path, id)")]
    UnknownKey {
        /// The whole spec.
        spec: String,
        /// The key.
        key: String,
    },
    /// An id that is empty or has characters outside [A-Za-z0-9_.-].
    #[error("device id {0:?} is invalid: use 1 to 64 of A-Z a-z 0-9 _ . -")]
    BadId(String),
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut id = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(v.to_owned()),
                Some(("id", v)) => id = Some(v.to_owned()),
                None if path.is_none() && !part.is_empty() => path = Some(part.to_owned()),
                Some((k, _)) if k != "path" => {
                    return Err(DeviceSpecError::UnknownKey {
                        spec: s.to_owned(),
                        key: k.to_owned(),
                    })
                }
                _ => return Err(DeviceSpecError::NoPath(s.to_owned())),
            }
        }
        if let Some(id) = &id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(DeviceSpecError::BadId(id.clone()));
            }
        }
        let path = path.ok_or_else(|| DeviceSpecError::NoPath(s.to_owned()))?;
        Ok(Self { path, id })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_accepts_path_and_id() {
        let s: DeviceSpec = "path=/sys/bus/pci/devices/0000:01:00.0,id=nvme0"
            .parse()
            .unwrap();
        assert_eq!(s.path, "/sys/bus/pci/devices/0000:01:00.0");
        assert_eq!(s.id.as_deref(), Some("nvme0"));
    }

    #[test]
    fn spec_accepts_bare_bdf() {
        let s: DeviceSpec = "0000:01:00.0".parse().unwrap();
        assert_eq!(s.path, "0000:01:00.0");
        assert_eq!(s.id, None);
    }

    #[test]
    fn spec_accepts_bare_bdf_with_id() {
        let s: DeviceSpec = "01:00.0,id=nv".parse().unwrap();
        assert_eq!((s.path.as_str(), s.id.as_deref()), ("01:00.0", Some("nv")));
    }

    #[test]
    fn spec_without_path_is_refused() {
        assert!(matches!(
            "id=x".parse::<DeviceSpec>(),
            Err(DeviceSpecError::NoPath(_))
        ));
        assert!(matches!(
            "".parse::<DeviceSpec>(),
            Err(DeviceSpecError::NoPath(_))
        ));
    }

    #[test]
    fn spec_with_unknown_key_is_refused() {
        assert!(matches!(
            "path=01:00.0,mac=1".parse::<DeviceSpec>(),
            Err(DeviceSpecError::UnknownKey { .. })
        ));
    }

    #[test]
    fn spec_with_bad_id_is_refused() {
        assert!(matches!(
            "path=01:00.0,id=a b".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadId(_))
        ));
        assert!(matches!(
            "path=01:00.0,id=".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadId(_))
        ));
    }

    #[test]
    fn spec_round_trips_through_display() {
        let s: DeviceSpec = "path=01:00.0,id=a".parse().unwrap();
        assert_eq!(s.to_string().parse::<DeviceSpec>().unwrap(), s);
    }
}
