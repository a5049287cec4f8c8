//! Passthrough devices of a VM: host checks, the VFIO container with guest RAM mapped for DMA, the
//! device model, its root port and BAR placement inside that port's windows. A device is a given
//! host device (`path=`) or a VF taken from an SR-IOV PF's pool (`vf=`), whose lease (claim,
//! port policy, vfio-pci binding) lives as long as the device.

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvmm_pci::{
    AddressAllocator, AddressRange, PciAddress, PciSegment, SlotDevice, SlotError, SlotState,
};
use rvmm_vfio::container::{create_kvm_vfio_device, Container, ContainerError, Type1Iommu};
use rvmm_vfio::sriov::{
    MacAddress, PfSpec, Sriov, SriovError, VfLease, VfOwner, VfPolicy, VfRequest,
};
use rvmm_vfio::{
    check_passthrough_limit, BarKind, DeviceConfig, DeviceError, HostDevice, HostError, LimitError,
    Sysfs, VfioPciDevice,
};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::api::types::{DeviceSpec as ApiDeviceSpec, VfInfo, VfSpec, VmResources};
use crate::api::{AddDeviceRequest, GroupFd, GroupFdError, MacAddr, PhysicalFunction};
use crate::guest_mmio::KvmGuestMmio;
use crate::irq_routing::GsiRouter;

/// A passthrough device as asked for: `path=/sys/bus/pci/devices/BDF[,id=NAME]` (or a bare BDF)
/// or `vf=PF[,id=NAME][,mac=..][,vlan=..][,trust=..][,spoofchk=..]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The host device.
    pub source: DeviceSource,
    /// Name in the VM; generated when absent.
    pub id: Option<String>,
    /// The VFIO group descriptor the caller opened (only for `path=`, always
    /// [`GroupFd::Open`]); `None`: rvmm opens `/dev/vfio/<group>` itself.
    pub group: Option<GroupFd>,
}

/// Where a passthrough device comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSource {
    /// A host device bound to vfio-pci: sysfs path or BDF.
    Path(String),
    /// A free VF of an SR-IOV PF, set up with a port policy.
    Vf(VfRequest),
}

/// The vfio crate's form of a `vf=` request.
fn vf_request(spec: &VfSpec) -> Result<VfRequest, PassthroughError> {
    let pf = match &spec.pf {
        PhysicalFunction::Pci(bdf) => PfSpec::Pci(bdf.to_string().parse()?),
        PhysicalFunction::Netdev(name) => PfSpec::Netdev(name.clone()),
    };
    Ok(VfRequest {
        pf,
        policy: VfPolicy {
            mac: spec.mac.map(|m| MacAddress(m.0)),
            vlan: spec.vlan,
            trust: spec.trust,
            spoofchk: spec.spoofchk,
        },
    })
}

impl DeviceSpec {
    /// The passthrough device of an add request (API, `--device` or `--vf`).
    ///
    /// A group descriptor must already be held by this process ([`GroupFd::Open`]): a bare
    /// number is refused, so no request can make rvmm use a descriptor it was not given for the
    /// purpose.
    pub fn from_request(req: &AddDeviceRequest) -> Result<Self, PassthroughError> {
        let source = match &req.device {
            ApiDeviceSpec::Host(bdf) => DeviceSource::Path(bdf.to_string()),
            ApiDeviceSpec::Vf(vf) => DeviceSource::Vf(vf_request(vf)?),
        };
        let group = match &req.group {
            None => None,
            Some(GroupFd::Number(fd)) => return Err(PassthroughError::GroupNotHeld(*fd)),
            Some(GroupFd::Open(_)) if matches!(source, DeviceSource::Vf(_)) => {
                return Err(PassthroughError::GroupForVf)
            }
            Some(open) => Some(open.clone()),
        };
        Ok(Self {
            source,
            id: req.id.as_ref().map(|id| id.as_str().to_owned()),
            group,
        })
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            DeviceSource::Path(path) => write!(f, "path={path}")?,
            DeviceSource::Vf(vf) => write!(f, "vf={}", vf.pf)?,
        }
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        if let Some(group) = &self.group {
            write!(f, ",group-fd={}", group.number())?;
        }
        if let DeviceSource::Vf(vf) = &self.source {
            let p = &vf.policy;
            if let Some(mac) = p.mac {
                write!(f, ",mac={mac}")?;
            }
            if let Some(vlan) = p.vlan {
                write!(f, ",vlan={vlan}")?;
            }
            if let Some(trust) = p.trust {
                write!(f, ",trust={}", on_off(trust))?;
            }
            if let Some(spoofchk) = p.spoofchk {
                write!(f, ",spoofchk={}", on_off(spoofchk))?;
            }
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
    /// A group descriptor number that this process does not hold for the request.
    #[error("group-fd={0} was not handed over with the request: send the descriptor itself (SCM_RIGHTS over the API socket, as `rvmm ctl add-device ...,group-fd=N` does; GroupFd::Open in the library)")]
    GroupNotHeld(i32),
    /// A group descriptor with a `vf=` request.
    #[error("group-fd applies only to path= devices: rvmm opens the VF it picks itself")]
    GroupForVf,
    /// An inherited group descriptor cannot be taken over.
    #[error(transparent)]
    GroupFd(#[from] GroupFdError),
    /// The group descriptor cannot be duplicated for the VFIO layer.
    #[error("cannot duplicate the VFIO group descriptor")]
    GroupDup(#[source] std::io::Error),
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
    /// No VF could be taken from the PF's pool (or given back).
    #[error(transparent)]
    Vf(#[from] SriovError),
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
    /// For a VF taken from a PF's pool: the lease that gives it back on release.
    pub vf: Option<VfLease>,
}

impl AttachedDevice {
    /// How its VF was set up, for a VF taken from a PF's pool.
    pub fn vf_info(&self) -> Option<VfInfo> {
        let lease = self.vf.as_ref()?;
        let settings = lease.settings();
        Some(VfInfo {
            pf: lease.pf().to_string().parse().ok()?,
            index: lease.vf().index,
            mac: Some(MacAddr(settings.mac.0)),
            vlan: Some(settings.vlan),
            trust: Some(settings.trust),
            spoofchk: Some(settings.spoofchk),
        })
    }

    /// Releases a VF's lease (settings restored, previous driver, claim dropped) after closing
    /// the device, which must let go of the VF before it changes driver.
    fn release_vf(&mut self) {
        let Some(lease) = self.vf.take() else {
            return;
        };
        self.device.release();
        if let Err(e) = lease.release() {
            log::warn!(
                "device {}: giving VF {} back: {}",
                self.id,
                self.host.bdf,
                crate::controller::error_chain(&e)
            );
        }
    }
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        self.release_vf();
    }
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
    sriov: Sriov,
    vm_name: String,
}

/// What [`Passthrough::prepare`] opened and placed.
struct Prepared {
    id: String,
    host: HostDevice,
    port: usize,
    device: VfioPciDevice,
    vf: Option<VfLease>,
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
            sriov: Sriov::new(),
            vm_name: format!("rvmm-{}", std::process::id()),
        }
    }

    /// Names the VM for its VF claims and the MAC addresses derived for VFs given without one
    /// (default `rvmm-<pid>`; a stable name gives stable addresses across restarts).
    pub fn set_vm_name(&mut self, name: &str) {
        self.vm_name = name.to_owned();
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

    /// Checks the host device and the VM's limits (for a VF: takes one from the PF's pool),
    /// opens the device, places its BARs in a free root port's windows and returns it with its
    /// port; the caller puts it in the slot.
    fn prepare(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<Prepared, PassthroughError> {
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
        let (host, vf) = match &spec.source {
            DeviceSource::Path(path) => (self.sysfs.prepare(path)?, None),
            DeviceSource::Vf(request) => {
                // The VM's own limits first: a VF is configured only if it can be attached.
                self.sysfs.check_memlock(self.memory_size())?;
                self.free_port(segment)?;
                let owner = VfOwner {
                    vm: self.vm_name.clone(),
                    device: id.clone(),
                };
                let lease = self.sriov.take(request, &owner)?;
                // Dropping the lease on an error below gives the VF back.
                let host = self.sysfs.prepare(&lease.vf().bdf.to_string())?;
                (host, Some(lease))
            }
        };
        if let Some(d) = self.devices.iter().find(|d| d.host.bdf == host.bdf) {
            return Err(PassthroughError::AlreadyAttached {
                bdf: host.bdf.to_string(),
                id: d.id.clone(),
            });
        }
        self.sysfs.check_memlock(self.memory_size())?;
        let port = self.free_port(segment)?;
        let container = self.container()?;
        // The vfio layer owns the group descriptor while the group is attached; the request
        // keeps its own.
        let group = match spec.group.as_ref().and_then(GroupFd::open) {
            Some(fd) => Some(fd.try_clone().map_err(PassthroughError::GroupDup)?),
            None => None,
        };
        let device = VfioPciDevice::open(
            &container,
            &self.sysfs,
            &host,
            group,
            DeviceConfig { intx_gsi: None },
            self.router.clone(),
            self.guest_mmio.clone(),
        )?;
        place_bars(&device, &host, port, segment)?;
        Ok(Prepared {
            id,
            host,
            port,
            device,
            vf,
        })
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
        let Prepared {
            id,
            host,
            port,
            device,
            vf,
        } = self.prepare(spec, segment)?;
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
            vf,
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
    /// fds closed); its port, GSIs and memory slots are free again when this returns. A VF taken
    /// from a PF's pool has its previous settings and driver back and is free for others.
    pub fn detach(&mut self, id: &str) -> Option<AttachedDevice> {
        let pos = self.devices.iter().position(|d| d.id == id)?;
        let mut d = self.devices.remove(pos);
        d.device.release();
        d.release_vf();
        if self.devices.is_empty() {
            // The kernel dropped the IOMMU domain with the last group, so the container holds
            // nothing of value: close it and the KVM VFIO device until the next device comes.
            // (A group that died under us is released with its device either way: see
            // rvmm_vfio::legacy.)
            self.container = None;
        }
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

    fn spec(arg: &str) -> DeviceSpec {
        let req: AddDeviceRequest = arg.parse().expect("valid device argument");
        DeviceSpec::from_request(&req).expect("a passthrough device")
    }

    #[test]
    fn vf_request_keeps_pf_and_policy() {
        let s = spec("vf=0000:3b:00.0,id=net0,mac=52:54:00:00:00:02,vlan=100,trust=on");

        assert_eq!(s.id.as_deref(), Some("net0"));
        assert_eq!(
            s.source,
            DeviceSource::Vf(VfRequest {
                pf: PfSpec::Pci("0000:3b:00.0".parse().expect("valid address")),
                policy: VfPolicy {
                    mac: Some(MacAddress([0x52, 0x54, 0, 0, 0, 2])),
                    vlan: Some(100),
                    trust: Some(true),
                    spoofchk: None,
                },
            })
        );
    }

    #[test]
    fn vf_by_interface_name_names_the_netdev() {
        let DeviceSource::Vf(vf) = spec("vf=enp59s0f0").source else {
            panic!("not a VF");
        };

        assert_eq!(vf.pf, PfSpec::Netdev("enp59s0f0".into()));
    }

    #[test]
    fn vf_spec_prints_as_its_argument() {
        let arg = "vf=eth0,id=net0,mac=52:54:00:00:00:02,vlan=7,trust=off,spoofchk=on";

        assert_eq!(spec(arg).to_string(), arg);
    }

    #[test]
    fn host_spec_prints_its_path() {
        assert_eq!(
            spec("0000:01:00.0,id=disk0").to_string(),
            "path=0000:01:00.0,id=disk0"
        );
    }
}
