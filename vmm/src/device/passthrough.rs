//! Passthrough devices of a VM: host checks, the VFIO container with guest RAM mapped for DMA, the
//! device model, its root port and BAR placement inside that port's windows. A device is a given
//! host device (`path=`) or a VF taken from an SR-IOV PF's pool (`vf=`), whose lease (claim,
//! port policy, vfio-pci binding) lives as long as the device.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvmm_pci::{AddressAllocator, AddressRange, Bdf, PciSegment, SlotDevice, SlotError, SlotState};
use rvmm_vfio::container::{create_kvm_vfio_device, Container, ContainerError, Type1Iommu};
use rvmm_vfio::sriov::{Sriov, SriovError, VfLease, VfOwner};
use rvmm_vfio::{
    check_passthrough_limit, BarKind, DeviceConfig, DeviceError, HostDevice, HostError, LimitError,
    Sysfs, VfioPciDevice,
};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::api::types::{VfInfo, VmResources};
use crate::device::{DeviceId, DeviceSource, DeviceSpec, DeviceState, GroupFd, GroupFdError};
use crate::kvm::guest_mmio::KvmGuestMmio;
use crate::kvm::irq_routing::GsiRouter;
use crate::machine::layout;
use rvmm_devices::sync::MutexExt;

/// The group descriptor of `spec` the VFIO layer may use. It must already be held by this
/// process ([`GroupFd::Open`]): a bare number is refused, so no request can make rvmm use a
/// descriptor it was not given for the purpose; a VF never comes with one (rvmm opens the VF it
/// picks itself).
fn held_group(spec: &DeviceSpec) -> Result<Option<&Arc<OwnedFd>>, PassthroughError> {
    match (&spec.group, &spec.source) {
        (None, _) => Ok(None),
        (Some(GroupFd::Number(fd)), _) => Err(PassthroughError::GroupNotHeld(*fd)),
        (Some(GroupFd::Open(_)), DeviceSource::Vf(_)) => Err(PassthroughError::GroupForVf),
        (Some(GroupFd::Open(fd)), DeviceSource::Host(_)) => Ok(Some(fd)),
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
    #[error("device id \"{0}\" is already used in this VM")]
    DuplicateId(DeviceId),
    /// The host device is already in this VM.
    #[error("host device {bdf} is already attached to this VM as \"{id}\"")]
    AlreadyAttached {
        /// The host device.
        bdf: Bdf,
        /// Its id in the VM.
        id: DeviceId,
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
    #[error("BAR {bar} of host device {bdf} ({size:#x} bytes) does not fit the {window} window of root port {port} ({window_size:#x} bytes); use fewer --root-ports, or for a 64-bit BAR give each port a larger 64-bit window with --root-ports N,mmio64=SIZE (a power of two at least the BAR)")]
    BarDoesNotFit {
        /// The host device.
        bdf: Bdf,
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
    /// An I/O BAR on a root port without an I/O window.
    #[error("BAR {bar} of host device {bdf} is an I/O BAR ({size:#x} ports) and root port {port} has no I/O window: the 60 KiB of I/O space above the platform devices give only the first {io_ports} root ports a 4 KiB window; free one of those ports for this device")]
    NoIoWindow {
        /// The host device.
        bdf: Bdf,
        /// BAR index.
        bar: usize,
        /// Its size.
        size: u64,
        /// Port index.
        port: usize,
        /// How many ports have an I/O window.
        io_ports: usize,
    },
    /// No VF could be taken from the PF's pool (or given back).
    #[error(transparent)]
    Vf(#[from] SriovError),
    /// No device has this id.
    #[error("no device with id \"{0}\"")]
    UnknownId(DeviceId),
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
    pub id: DeviceId,
    /// The host device.
    pub host: HostDevice,
    /// Index of its root port.
    pub port: usize,
    /// Physical slot number of that port.
    pub slot: u16,
    /// Its address in the guest.
    pub guest_bdf: Bdf,
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
            pf: lease.pf(),
            index: lease.vf().index,
            mac: Some(settings.mac),
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
                rvmm_devices::error_chain(&e)
            );
        }
    }
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        self.release_vf();
    }
}

/// The passthrough devices of one VM and what they share.
pub struct Passthrough {
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    router: Arc<GsiRouter>,
    guest_mmio: Arc<KvmGuestMmio>,
    sysfs: Sysfs,
    container: Option<Arc<Container>>,
    devices: BTreeMap<DeviceId, AttachedDevice>,
    next_id: usize,
    sriov: Sriov,
    vm_name: String,
    /// The host node behind each root port's guest node (`--numa`), by port index; empty
    /// without a guest NUMA topology.
    port_host_nodes: Vec<Option<u32>>,
}

/// A device checked and given a port, not opened yet ([`Passthrough::reserve`]).
pub struct Reservation {
    id: DeviceId,
    host: HostDevice,
    port: usize,
    vf: Option<VfLease>,
    group: Option<OwnedFd>,
}

impl Reservation {
    /// The root port (index) the device will be in.
    pub fn port(&self) -> usize {
        self.port
    }

    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }
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
            devices: BTreeMap::new(),
            next_id: 0,
            sriov: Sriov::new(),
            vm_name: format!("rvmm-{}", std::process::id()),
            port_host_nodes: Vec::new(),
        }
    }

    /// The attached devices, by id.
    pub fn devices(&self) -> impl Iterator<Item = &AttachedDevice> {
        self.devices.values()
    }

    /// What the VM holds on the host: fds, device memory slots, MSI routes and GSIs.
    pub fn resources(&self) -> VmResources {
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        VmResources {
            open_fds,
            fd_limit: fd_limit().0,
            memory_slots: self.guest_mmio.slots_in_use() as u64,
            msi_routes: self.router.msi_routes() as u64,
            msi_gsis: self.router.allocated() as u64,
            host_vectors: self
                .devices
                .values()
                .map(|d| d.device.live_vectors() as u64)
                .sum(),
        }
    }

    /// Bytes of guest RAM DMA-mapped in the VM's container now (0 without a device).
    pub fn dma_mapped_bytes(&self) -> u64 {
        self.container.as_ref().map_or(0, |c| c.mapped_bytes())
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

    /// Checks the host device and the VM's limits (for a VF: takes one from the PF's pool) and
    /// picks a free root port: everything of an attach that is quick and can be refused. The
    /// device is opened by [`Passthrough::open_reserved`]; dropping the reservation gives a VF
    /// back.
    pub fn reserve(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<Reservation, PassthroughError> {
        check_passthrough_limit(self.devices.len())?;
        let group = held_group(spec)?;
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => self.generated_id(),
        };
        if self.devices.contains_key(&id) {
            return Err(PassthroughError::DuplicateId(id));
        }
        let (host, vf) = match &spec.source {
            DeviceSource::Host(bdf) => (self.sysfs.prepare(*bdf)?, None),
            DeviceSource::Vf(request) => {
                // The VM's own limits first: a VF is configured only if it can be attached.
                self.check_dma_memlock()?;
                self.free_port(segment)?;
                let owner = VfOwner {
                    vm: self.vm_name.clone(),
                    device: id.to_string(),
                };
                let lease = self.sriov.take(request, &owner)?;
                // Dropping the lease on an error below gives the VF back.
                let host = self.sysfs.prepare(lease.vf().bdf)?;
                (host, Some(lease))
            }
        };
        if let Some(d) = self.devices.values().find(|d| d.host.bdf == host.bdf) {
            return Err(PassthroughError::AlreadyAttached {
                bdf: host.bdf,
                id: d.id.clone(),
            });
        }
        self.check_dma_memlock()?;
        let port = self.port_for(segment, &host)?;
        // The vfio layer owns the group descriptor while the group is attached; the request
        // keeps its own.
        let group = match group {
            Some(fd) => Some(fd.try_clone().map_err(PassthroughError::GroupDup)?),
            None => None,
        };
        Ok(Reservation {
            id,
            host,
            port,
            vf,
            group,
        })
    }

    /// Bytes of guest RAM that opening a device now pins for DMA first: all of it when no device
    /// is attached (the host kernel drops the IOMMU domain with the last one), else none.
    pub fn dma_map_on_open(&self) -> u64 {
        match &self.container {
            Some(c) if c.attached_devices() > 0 => 0,
            _ => self.memory_size(),
        }
    }

    /// Opens the reserved device (the host kernel resets it as its VFIO descriptor opens; the
    /// first device also maps guest RAM for DMA), places its BARs in its port's windows and adds
    /// it to the VM. Returns its id; the caller puts it in the slot.
    pub fn open_reserved(
        &mut self,
        reservation: Reservation,
        segment: &PciSegment,
    ) -> Result<DeviceId, PassthroughError> {
        let Reservation {
            id,
            host,
            port,
            vf,
            group,
        } = reservation;
        let container = self.container()?;
        let device = VfioPciDevice::open(
            &container,
            &self.sysfs,
            &host,
            group,
            DeviceConfig {
                intx_gsi: Some(layout::port_intx_gsi(port)),
            },
            self.router.clone(),
            self.guest_mmio.clone(),
        )?;
        place_bars(&device, &host, port, segment)?;
        let info = segment.ports()[port];
        log::info!(
            "passthrough {id}: host {} for guest 0000:{:02x}:00.0 (slot {})",
            host.bdf,
            info.secondary_bus,
            info.slot_number
        );
        self.devices.insert(
            id.clone(),
            AttachedDevice {
                id: id.clone(),
                host,
                port,
                slot: info.slot_number,
                guest_bdf: Bdf {
                    domain: 0,
                    bus: info.secondary_bus,
                    device: 0,
                    function: 0,
                },
                device,
                state: DeviceState::Adding,
                vf,
            },
        );
        Ok(id)
    }

    /// Attaches a device before the guest starts: it is present and powered in its slot.
    pub fn attach_at_boot(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<&AttachedDevice, PassthroughError> {
        let id = self.attach(spec, segment)?;
        let inserted = match self.devices.get(&id) {
            Some(d) => {
                let slot_device: SlotDevice = Arc::new(Mutex::new(d.device.clone()));
                match segment.port(d.port) {
                    Some(p) => p
                        .locked()
                        .insert_device_at_boot(slot_device)
                        .map_err(|source| PassthroughError::Slot {
                            port: d.port,
                            source,
                        }),
                    None => Err(PassthroughError::NoSuchPort(d.port)),
                }
            }
            None => Err(PassthroughError::UnknownId(id.clone())),
        };
        if let Err(e) = inserted {
            if let Some(d) = self.devices.remove(&id) {
                d.device.release();
            }
            return Err(e);
        }
        let d = self
            .devices
            .get_mut(&id)
            .ok_or(PassthroughError::UnknownId(id))?;
        d.state = DeviceState::Present;
        Ok(d)
    }

    /// Opens a device and gives it a port ([`Passthrough::reserve`], then
    /// [`Passthrough::open_reserved`]); the caller puts it into the slot. Returns its id.
    pub fn attach(
        &mut self,
        spec: &DeviceSpec,
        segment: &PciSegment,
    ) -> Result<DeviceId, PassthroughError> {
        let reservation = self.reserve(spec, segment)?;
        self.open_reserved(reservation, segment)
    }

    /// Device `id` as its slot holds it.
    pub fn slot_device(&self, id: &DeviceId) -> Option<SlotDevice> {
        self.get(id)
            .map(|d| Arc::new(Mutex::new(d.device.clone())) as SlotDevice)
    }

    /// The device with id `id`.
    pub fn get(&self, id: &DeviceId) -> Option<&AttachedDevice> {
        self.devices.get(id)
    }

    /// The device with id `id`, mutable.
    pub fn get_mut(&mut self, id: &DeviceId) -> Option<&mut AttachedDevice> {
        self.devices.get_mut(id)
    }

    /// Takes device `id` out of the VM's list and releases it (unmap, interrupts off, reset,
    /// fds closed); its port, GSIs and memory slots are free again when this returns. A VF taken
    /// from a PF's pool has its previous settings and driver back and is free for others.
    pub fn detach(&mut self, id: &DeviceId) -> Option<AttachedDevice> {
        let mut d = self.devices.remove(id)?;
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

    /// The first `devN` id no device has.
    fn generated_id(&mut self) -> DeviceId {
        loop {
            let n = self.next_id;
            self.next_id += 1;
            // "dev" and digits always make a valid id (at most 23 characters).
            if let Ok(id) = DeviceId::new(&format!("dev{n}")) {
                if !self.devices.contains_key(&id) {
                    return id;
                }
            }
        }
    }

    /// The first device DMA-maps all guest RAM (the container is made with it), which pins it
    /// again on top of what is locked: the memlock limit must allow that. Later devices share
    /// the mapping and pin nothing more.
    fn check_dma_memlock(&self) -> Result<(), PassthroughError> {
        if self.container.is_some() {
            return Ok(());
        }
        Ok(self.sysfs.check_memlock(self.memory_size())?)
    }

    fn memory_size(&self) -> u64 {
        self.memory.iter().map(|r| r.len()).sum()
    }

    /// Which root ports are taken (a device in the slot, or one promised to a device being
    /// added) and the first free one: the one answer to "is this port in use".
    pub fn port_usage(&self, segment: &PciSegment) -> PortUsage {
        let mut usage = PortUsage {
            used: 0,
            total: segment.ports().len(),
            first_free: None,
        };
        for info in segment.ports() {
            let occupied = segment
                .port(info.index)
                .is_some_and(|port| port.locked().slot_state() != SlotState::Empty);
            if occupied || self.devices.values().any(|d| d.port == info.index) {
                usage.used += 1;
            } else if usage.first_free.is_none() {
                usage.first_free = Some(info.index);
            }
        }
        usage
    }

    /// Sets the host node behind each root port's guest node (`--numa`), by port index.
    pub fn set_port_host_nodes(&mut self, nodes: Vec<Option<u32>>) {
        self.port_host_nodes = nodes;
    }

    /// The root port for `host`: with a guest NUMA topology, the first free port whose guest
    /// node sits on the device's host node (sysfs `numa_node`), else the first free port; free
    /// ports whose slot can take a device now come first ([`Passthrough::free_ports`]).
    fn port_for(&self, segment: &PciSegment, host: &HostDevice) -> Result<usize, PassthroughError> {
        let first_in_order = self.free_port(segment)?;
        let free = self.free_ports(segment);
        let first = free.first().copied().unwrap_or(first_in_order);
        if self.port_host_nodes.iter().all(Option::is_none) {
            return Ok(first);
        }
        let node = std::fs::read_to_string(host.sysfs_path.join("numa_node"))
            .ok()
            .and_then(|text| crate::placement::topology::parse_numa_node(&text))
            .flatten();
        let Some(node) = node else {
            log::info!(
                "passthrough {}: the host does not say its NUMA node; first free root port",
                host.bdf
            );
            return Ok(first);
        };
        match pick_port(&free, &self.port_host_nodes, node) {
            Some(port) => Ok(port),
            None => {
                log::warn!(
                    "passthrough {}: on host node {node}, but no free root port's guest node is \
                     on host node {node}; root port {first} instead",
                    host.bdf
                );
                Ok(first)
            }
        }
    }

    /// Every root port whose slot is empty and not promised to another device: first those
    /// whose slot can take a device now, then the others, each in port order. A slot the guest
    /// has just let go of is not ready for a while (Linux's pciehp ignores a slot for a second
    /// after it powered it off); another free port takes a new device at once.
    fn free_ports(&self, segment: &PciSegment) -> Vec<usize> {
        let free: Vec<(usize, bool)> = segment
            .ports()
            .iter()
            .map(|info| info.index)
            .filter_map(|index| {
                let (occupied, ready) = segment.port(index).map_or((false, false), |port| {
                    let port = port.locked();
                    (
                        port.slot_state() != SlotState::Empty,
                        port.check_insert_ready().is_ok(),
                    )
                });
                let free = !occupied && !self.devices.values().any(|d| d.port == index);
                free.then_some((index, ready))
            })
            .collect();
        ready_first(&free)
    }

    /// The first root port whose slot is empty and not promised to another device.
    fn free_port(&self, segment: &PciSegment) -> Result<usize, PassthroughError> {
        let usage = self.port_usage(segment);
        usage.first_free.ok_or(PassthroughError::NoFreePort {
            used: usage.used,
            total: usage.total,
        })
    }
}

/// The ports of `ports` (index, whether its slot can take a device now): the ready ones first,
/// then the others, each in the given order.
pub fn ready_first(ports: &[(usize, bool)]) -> Vec<usize> {
    let ready = ports.iter().filter(|(_, ready)| *ready);
    let waiting = ports.iter().filter(|(_, ready)| !*ready);
    ready.chain(waiting).map(|&(index, _)| index).collect()
}

/// The first of the `free` ports whose guest node is on host node `node` (`port_nodes`: the host
/// node behind each port, by index).
pub fn pick_port(free: &[usize], port_nodes: &[Option<u32>], node: u32) -> Option<usize> {
    free.iter()
        .copied()
        .find(|&port| port_nodes.get(port).copied().flatten() == Some(node))
}

/// How the VM's root ports are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortUsage {
    /// Ports with a device in their slot or promised to one.
    pub used: usize,
    /// Ports in all.
    pub total: usize,
    /// The first port that is neither.
    pub first_free: Option<usize>,
}

/// The process's soft and hard `RLIMIT_NOFILE` (`u64::MAX`: unlimited).
pub fn fd_limit() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: each MSI-X vector the guest enables takes
/// an eventfd, and the usual soft limit (1024) is few for devices with many vectors. Returns the
/// limit in force.
pub fn raise_fd_limit() -> u64 {
    let (soft, hard) = fd_limit();
    if soft >= hard {
        return soft;
    }
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard one needs
    // no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        log::warn!(
            "cannot raise the file descriptor limit from {soft} to {hard}: {}",
            std::io::Error::last_os_error()
        );
        return soft;
    }
    log::debug!("file descriptor limit raised from {soft} to {hard}");
    hard
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
    let mut alloc_io = windows.io.and_then(allocator);
    let mut bars = device.bars();
    bars.sort_by_key(|b| std::cmp::Reverse(b.size));
    for bar in bars {
        let (alloc, window, name) = match bar.kind {
            BarKind::Io => {
                let Some(io) = windows.io else {
                    return Err(PassthroughError::NoIoWindow {
                        bdf: host.bdf,
                        bar: bar.index,
                        size: bar.size,
                        port,
                        io_ports: segment
                            .ports()
                            .iter()
                            .filter(|p| p.windows.io.is_some())
                            .count(),
                    });
                };
                (alloc_io.as_mut(), io, "I/O")
            }
            BarKind::Mem64 { prefetchable: true } if alloc64.is_some() => {
                (alloc64.as_mut(), windows.mmio64, "64-bit prefetchable")
            }
            _ => (alloc32.as_mut(), windows.mmio32, "32-bit"),
        };
        let gpa = alloc
            .and_then(|a| a.allocate(bar.size, bar.size).ok())
            .ok_or(PassthroughError::BarDoesNotFit {
                bdf: host.bdf,
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
mod port_tests {
    use super::{pick_port, ready_first};

    #[test]
    fn ports_that_can_take_a_device_now_come_first() {
        assert_eq!(
            ready_first(&[(0, false), (1, true), (2, true), (3, false)]),
            vec![1, 2, 0, 3]
        );
        // Before the guest runs no slot is ready: the port order stays.
        assert_eq!(ready_first(&[(0, false), (2, false)]), vec![0, 2]);
        assert_eq!(ready_first(&[]), Vec::<usize>::new());
    }

    #[test]
    fn a_free_port_on_the_device_node_is_picked() {
        let nodes = [Some(0), Some(1), Some(0), Some(1)];
        assert_eq!(pick_port(&[0, 1, 2, 3], &nodes, 1), Some(1));
        assert_eq!(pick_port(&[0, 2, 3], &nodes, 1), Some(3));
        assert_eq!(pick_port(&[0, 2], &nodes, 1), None);
        assert_eq!(pick_port(&[0, 1], &[None, None], 0), None);
    }
}
